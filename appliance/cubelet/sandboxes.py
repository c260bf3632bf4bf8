"""The guests this node runs, and the one place their state changes (`SandboxTable.transition`);
what a create asks for (`SandboxRequest`) and the record it makes.

A guest holds a slot from the moment it is about to boot until its teardown is done:
the slot picks its uid (config.uid_base + slot) and its host-side /30, so a slot is
free only once nothing of the guest is left.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from appliance.config import Config
from appliance.cubelet.envd_client import GuestAgent
from appliance.cubelet.memory_charges import MemoryCharges
from appliance.cubelet.state import (
    ACTIVE,
    EVENT_KIND,
    RECORD_STATE,
    USER_VISIBLE,
    SandboxState,
    check_transition,
)
from appliance.cubelet.volume_mounts import VolumeMount
from appliance.net.policy import NetworkPolicy
from appliance.records import RUNNING, SandboxRecord, Store, TemplateManifest
from appliance.runtime.base import BootSpec, Instance, KeptGuest
from appliance.tenancy import SYSTEM_TEAM

log = logging.getLogger(__name__)


class SandboxNotFound(Exception):
    def __init__(self, sandbox_id: str) -> None:
        super().__init__(f"sandbox {sandbox_id} not found")
        self.sandbox_id = sandbox_id


class SandboxStartFailed(Exception):
    """Booting or initialising a guest failed; the message is for the user."""


class OutOfMemoryBudget(SandboxStartFailed):
    """A cold boot would take the sandboxes past the node's memory budget: refused before it starts."""


@dataclass(frozen=True)
class SandboxRequest:
    template: TemplateManifest
    alias: str | None
    timeout_s: int
    metadata: dict[str, str] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    on_timeout: str = "kill"
    auto_resume: bool = False
    # Egress: the template's defaults with the request's settings over them (the API merges them).
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    allow_public_traffic: bool = True  # False: the sandbox's ports need its traffic access token
    team_id: str = SYSTEM_TEAM
    volume_mounts: tuple[VolumeMount, ...] = ()  # mounted at the claim (cubelet/volume_mounts.py)

    def new_record(self, sandbox_id: str, console_log: str, now: float) -> SandboxRecord:
        """The record of the sandbox this request makes (RUNNING from `now`), with new access and
        traffic tokens."""
        record = SandboxRecord(
            sandbox_id=sandbox_id,
            template_id=self.template.template_id,
            alias=self.alias,
            client_id=secrets.token_hex(4),
            state=RUNNING,
            started_at=now,
            end_at=now + self.timeout_s,
            cpu_count=self.template.cpu_count,
            memory_mb=self.template.memory_mb,
            disk_size_mb=self.template.writable_layer_mb,
            envd_access_token=secrets.token_urlsafe(24),
            metadata=dict(self.metadata),
            on_timeout=self.on_timeout,
            auto_resume=self.auto_resume,
            console_log=console_log,
            team_id=self.team_id,
            traffic_access_token=secrets.token_urlsafe(24),
            allow_public_traffic=self.allow_public_traffic,
        )
        record.set_egress_policy(self.network)
        return record

    @classmethod
    def carried_over(cls, record: SandboxRecord, template: TemplateManifest, now: float) -> SandboxRequest:
        """The request a sandbox carried over a service restart is booted again with (env vars given
        at create time are not kept: the template's are set again)."""
        return cls(
            template=template,
            alias=record.alias,
            timeout_s=max(1, int(record.end_at - now)),
            metadata=record.metadata,
            on_timeout=record.on_timeout,
            auto_resume=record.auto_resume,
            network=record.egress_policy(),
            allow_public_traffic=record.allow_public_traffic,
            team_id=record.team_id,
        )


def template_network_policy(template: TemplateManifest) -> NetworkPolicy:
    """The egress a template's sandboxes get unless the create request says otherwise: what a
    guest runs until it is claimed (the claim applies its request's), and what build guests run
    (`tpl` flags: allow_internet_access, allow_out, deny_out)."""
    defaults = template.network_defaults
    return NetworkPolicy.from_e2b(
        {
            "allow_internet_access": defaults.get("allow_internet_access", True),
            "network": {"allowOut": defaults.get("allow_out"), "denyOut": defaults.get("deny_out")},
        }
    )


@dataclass(eq=False)
class LiveSandbox:
    """A guest this node runs, in whatever state `state` says."""

    sandbox_id: str
    template: TemplateManifest
    slot: int
    spec: BootSpec
    state: SandboxState = SandboxState.BOOTING
    instance: Instance | None = None  # from READY on
    agent: GuestAgent | None = None  # from READY on, until the guest is gone
    record: SandboxRecord | None = None  # from RUNNING on: the guest is a user's sandbox
    lifetime: trio.CancelScope = field(default_factory=trio.CancelScope)  # cancel = kill
    deadline: float = math.inf  # trio clock; the E2B timeout while RUNNING
    deadline_scope: trio.CancelScope | None = None
    # Pause and resume are one at a time (a user's, the deadline's auto-pause, the proxy's auto-resume).
    changing: trio.Lock = field(default_factory=trio.Lock)
    end_reason: str = "killed"
    health_failures: int = 0
    gone: trio.Event = field(default_factory=trio.Event)  # set on ENDED, FAILED or DETACHED
    # Set when the guest stops serving its users: paused, or gone; a fresh one when a paused guest
    # runs again. The proxy ends in-flight forwards with it (a frozen guest answers nothing).
    stopped: trio.Event = field(default_factory=trio.Event)

    def envd_headers(self) -> dict[str, str]:
        """Auth for the host's own envd calls to this guest."""
        return self.agent.headers() if self.agent is not None else {}

    def set_deadline(self, deadline: float) -> None:
        self.deadline = deadline
        if self.deadline_scope is not None:
            self.deadline_scope.deadline = deadline


class SandboxTable:
    """Every guest of this node by id, the slots they hold, and their state changes."""

    def __init__(
        self,
        config: Config,
        store: Store,
        on_change: Callable[[LiveSandbox, SandboxState], None] = lambda live, old: None,
    ) -> None:
        self.config = config
        self.store = store
        self._on_change = on_change  # (guest, its previous state), after each transition
        self._guests: dict[str, LiveSandbox] = {}
        self._slots: set[int] = set()
        self._next_slot = 0
        # One /30 of host_network per slot; the first /30 is the node resolver's.
        self._slot_count = ipaddress.ip_network(config.host_network).num_addresses // 4 - 1
        self._reserved_mb = 0  # cold boots making room for themselves (`reserved`)
        self.memory_charges = MemoryCharges()  # what each guest really holds (memory_charges.py)

    # Queries.

    def __iter__(self) -> Iterator[LiveSandbox]:
        return iter(list(self._guests.values()))

    def __contains__(self, sandbox_id: str) -> bool:
        return sandbox_id in self._guests

    def get(self, sandbox_id: str) -> LiveSandbox | None:
        """Any guest of this node, whatever its state, until it is gone."""
        return self._guests.get(sandbox_id)

    def sandbox(self, sandbox_id: str) -> LiveSandbox | None:
        """A user's sandbox (running or paused): what users may list, find and act on."""
        live = self._guests.get(sandbox_id)
        return live if live is not None and live.state in USER_VISIBLE else None

    def active(self, sandbox_id: str) -> LiveSandbox | None:
        """A guest that is not over yet (booting, pooled, running or paused)."""
        live = self._guests.get(sandbox_id)
        return live if live is not None and live.state in ACTIVE else None

    def count(self, template_id: str, states: frozenset[SandboxState]) -> int:
        return sum(
            1
            for live in self._guests.values()
            if live.template.template_id == template_id and live.state in states
        )

    def memory_committed_mb(self) -> int:
        """Everything still holding memory, guests tearing down too, and what cold boots reserved:
        each guest charged what it really holds (`MemoryCharges`), not its nominal size."""
        return self._reserved_mb + self.memory_charges.committed_mb(self._guests.values())

    def boot_charge_mb(self, template: TemplateManifest) -> int:
        """What one more guest of `template` is charged until it is measured."""
        return self.memory_charges.estimate_mb(template)

    @contextmanager
    def reserved(self, memory_mb: int) -> Iterator[None]:
        """Count `memory_mb` as taken while a cold boot makes room for itself (`WarmPools.make_room`):
        pool refills must not take what the guests it evicts give back."""
        self._reserved_mb += memory_mb
        try:
            yield
        finally:
            self._reserved_mb -= memory_mb

    # Changes.

    def add(
        self,
        template: TemplateManifest,
        network_policy: NetworkPolicy,
        *,
        background: bool = False,
        sandbox_id: str | None = None,
        disk: Path | None = None,
    ) -> LiveSandbox:
        """A guest about to boot (BOOTING): it holds its slot and counts against the memory budget
        from now. `sandbox_id` and `disk` continue a sandbox carried over a restart. Raises
        SandboxStartFailed when every slot is taken."""
        sandbox_id = sandbox_id or secrets.token_hex(10)
        slot = self._allocate_slot()
        spec = BootSpec.for_template(
            self.config,
            template,
            sandbox_id,
            slot,
            network_policy=network_policy,
            background=background,
            disk=disk,
        )
        live = LiveSandbox(sandbox_id=sandbox_id, template=template, slot=slot, spec=spec)
        self._guests[sandbox_id] = live
        return live

    def adopt(
        self,
        kept: KeptGuest,
        template: TemplateManifest,
        network_policy: NetworkPolicy,
        record: SandboxRecord | None,
    ) -> LiveSandbox:
        """A guest the previous service left running, about to be taken over (ADOPTING), in the slot
        it was booted in; `record` is its user's sandbox's, if it is still one. Raises
        SandboxStartFailed when that slot is not free (or not one of this config's)."""
        if kept.slot in self._slots or not 0 <= kept.slot < self._slot_count:
            raise SandboxStartFailed(f"slot {kept.slot} of sandbox {kept.sandbox_id} is not free")
        self._slots.add(kept.slot)
        self._next_slot = max(self._next_slot, (kept.slot + 1) % self._slot_count)
        spec = BootSpec.for_template(
            self.config,
            template,
            kept.sandbox_id,
            kept.slot,
            memory_mb=kept.memory_mb,
            cpu_count=kept.cpu_count,
            network_policy=network_policy,
        )
        live = LiveSandbox(
            sandbox_id=kept.sandbox_id,
            template=template,
            slot=kept.slot,
            spec=spec,
            state=SandboxState.ADOPTING,
            record=record,
        )
        self._guests[kept.sandbox_id] = live
        return live

    def transition(
        self,
        live: LiveSandbox,
        new: SandboxState,
        message: str = "",
        *,
        record: SandboxRecord | None = None,
        event: str | None = None,
    ) -> None:
        """Move `live` to `new` (IllegalTransition if the table in `state.py` has no such edge).

        A user's sandbox (it has a record) has its record stored with the new state and the
        transition recorded as an event: `event`, else the table's kind for that edge, with
        `message`. `record` makes the guest a user's sandbox: it comes with READY → RUNNING.
        """
        old = live.state
        check_transition(live.sandbox_id, old, new)
        assert (record is not None) == (old is SandboxState.READY and new is SandboxState.RUNNING)
        live.state = new
        if record is not None:
            live.record = record
        if new is SandboxState.PAUSED:
            live.stopped.set()
        elif old is SandboxState.PAUSED and new is SandboxState.RUNNING:
            live.stopped = trio.Event()
        log.debug("sandbox %s: %s -> %s (%s)", live.sandbox_id, old, new, message)
        if live.record is not None and new in RECORD_STATE:
            live.record.state = RECORD_STATE[new]
            if new is SandboxState.ENDING:
                live.record.ended_at = time.time()
                live.record.end_reason = message
            self.store.put_sandbox(live.record)
            self.store.add_event(live.sandbox_id, event or EVENT_KIND[(old, new)], message)
        self._on_change(live, old)

    def save(self, live: LiveSandbox) -> None:
        """Store a user's sandbox's record after a change that is no transition (its timeout, network)."""
        assert live.record is not None, "not a user's sandbox"
        self.store.put_sandbox(live.record)

    def end(self, live: LiveSandbox, reason: str) -> bool:
        """Over for its users from now (ENDING), its teardown still to run; False if it already was."""
        if live.state not in ACTIVE:
            return False
        live.end_reason = reason
        self.transition(live, SandboxState.ENDING, reason)
        return True

    def forget(self, live: LiveSandbox) -> None:
        """Its guest is gone (ENDED; FAILED if it never got to READY), or DETACHED (it runs on for
        the next service): the slot (uid, network) and its memory are this service's no more."""
        if live.gone.is_set():
            return
        if live.state is SandboxState.BOOTING:
            self.transition(live, SandboxState.FAILED, "boot failed")
        elif live.state is not SandboxState.DETACHED:
            self.end(live, live.end_reason)
            self.transition(live, SandboxState.ENDED)
        self._guests.pop(live.sandbox_id, None)
        self._slots.discard(live.slot)
        live.gone.set()
        live.stopped.set()

    def _allocate_slot(self) -> int:
        """The next free slot after the last one handed out, wrapping around.

        A slot picks the sandbox's host address, so handing a just-freed slot to the
        next sandbox would let keep-alive connections (the router's)
        and conntrack entries made for the dead guest land on the new one. Rotating
        keeps a freed address unused until every other slot has had its turn.
        """
        if len(self._slots) >= self._slot_count:
            raise SandboxStartFailed(f"all {self._slot_count} sandbox network slots are in use")
        slot = self._next_slot
        while slot in self._slots:
            slot = (slot + 1) % self._slot_count
        self._next_slot = (slot + 1) % self._slot_count
        self._slots.add(slot)
        return slot
