"""A sandbox's lifecycle: its states and the transitions between them, as tables.

h11's `_state.py` shape: the rules are data, checked in one place
(`SandboxTable.transition`), so every reader sees the whole machine here and
nothing else decides what may follow what.

    BOOTING ──────► READY ──────► RUNNING ◄────► PAUSED
       │              │              │              │
       │ boot failed  └──────────────┴──────┬───────┘
       ▼                                    ▼  killed, timed out, exited, unhealthy
     FAILED              BOOTING ────────► ENDING ──► ENDED
                                          (teardown)  (slot, uid, network, memory free)

- BOOTING: the runtime is starting the guest; nothing answers yet.
- READY: the guest agent answers; the guest is nobody's sandbox yet: in its warm pool
  (once fully ready), or about to be claimed by the create or build that booted it.
- RUNNING / PAUSED: a user's sandbox (it has a record in the store).
- ENDING: over for its users (not listed, found or claimed) while its teardown runs
  and still holds its slot, uid, network and memory.
- ENDED / FAILED: gone; FAILED when it never got to READY (its boot failed).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from appliance.records import DEAD, PAUSED, RUNNING


class SandboxState(enum.StrEnum):
    BOOTING = "booting"
    READY = "ready"
    # The store's record states have the same values: `live.state == PAUSED` holds either way.
    RUNNING = "running"
    PAUSED = "paused"
    ENDING = "ending"
    ENDED = "ended"
    FAILED = "failed"


S = SandboxState

TRANSITIONS: Mapping[SandboxState, frozenset[SandboxState]] = {
    S.BOOTING: frozenset({S.READY, S.ENDING, S.FAILED}),
    S.READY: frozenset({S.RUNNING, S.ENDING}),
    S.RUNNING: frozenset({S.PAUSED, S.ENDING}),
    S.PAUSED: frozenset({S.RUNNING, S.ENDING}),
    S.ENDING: frozenset({S.ENDED}),
    S.ENDED: frozenset(),
    S.FAILED: frozenset(),
}

# What the store's record says in each state a user's sandbox can be in (ENDING: it is dead
# for its users, though its teardown still runs).
RECORD_STATE: Mapping[SandboxState, str] = {S.RUNNING: RUNNING, S.PAUSED: PAUSED, S.ENDING: DEAD}

# The event a transition of a user's sandbox is recorded as (guests that never were one, such
# as pooled guests and template-build probes, leave no events).
EVENT_KIND: Mapping[tuple[SandboxState, SandboxState], str] = {
    (S.READY, S.RUNNING): "created",
    (S.RUNNING, S.PAUSED): "paused",
    (S.PAUSED, S.RUNNING): "resumed",
    (S.RUNNING, S.ENDING): "dead",
    (S.PAUSED, S.ENDING): "dead",
}

# Users see a sandbox (list, find, kill, connect) only in these.
USER_VISIBLE = frozenset({S.RUNNING, S.PAUSED})
# The guest still runs and holds its resources for its users' sake: not yet ending or gone.
ACTIVE = frozenset({S.BOOTING, S.READY, S.RUNNING, S.PAUSED})
# Its guest agent answers and is expected to (the health probes watch these).
AGENT_UP = frozenset({S.READY, S.RUNNING})
FINAL = frozenset(state for state, successors in TRANSITIONS.items() if not successors)


class IllegalTransition(RuntimeError):
    """A transition the table does not allow: a bug in the caller, never a user's error."""

    def __init__(self, sandbox_id: str, old: SandboxState, new: SandboxState) -> None:
        super().__init__(f"sandbox {sandbox_id}: no transition from {old} to {new}")
        self.sandbox_id = sandbox_id
        self.old = old
        self.new = new


def check_transition(sandbox_id: str, old: SandboxState, new: SandboxState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(sandbox_id, old, new)
