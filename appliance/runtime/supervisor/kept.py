"""Guests a previous service left running, found again at start: one way for every runtime
whose guests have supervisors (uml's supervisor process, kvm's VMM process).

Each control directory's supervisor is attached (its recorded pid and start time checked,
runtime/supervisor/client.py) and asked for its guest's state. A supervisor that is gone,
or whose guest has ended or whose record says too little, is ended for good and its
sandbox reported gone with the reason; its leftovers are the runtime's to remove."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trio

from appliance.runtime.base import KeptGuest
from appliance.runtime.supervisor.client import SupervisorClient, SupervisorGone
from appliance.runtime.supervisor.protocol import Op, ProtocolError

log = logging.getLogger(__name__)

# How long a supervisor that cannot be adopted gets to end once killed.
KILL_TIMEOUT_S = 30.0
# What every runtime records of its guest in its supervisor's record (`guest`).
KEPT_FIELDS: Mapping[str, type] = {"slot": int, "template_id": str, "memory_mb": int, "cpu_count": int}


@dataclass
class Found:
    guests: list[KeptGuest] = field(default_factory=list)  # sorted by sandbox id
    supervisors: dict[str, SupervisorClient] = field(default_factory=dict)  # by sandbox id
    gone: dict[str, str] = field(default_factory=dict)  # sandbox id: why it is gone


async def find_kept(
    control_dirs: list[Path], fields: Mapping[str, type], remove_leftovers: Callable[[str], None]
) -> Found:
    """Attach to the supervisor of every `control_dirs` entry (all at once: each is a round trip
    to another process, on the way of every sandbox); `remove_leftovers(sandbox_id)` (in a
    thread) for each that is gone. `fields`: what its record must hold of its guest."""
    found = Found()

    async def attach(control_dir: Path) -> None:
        sandbox_id = control_dir.name
        try:
            guest, supervisor = await attach_kept(control_dir, fields)
        except SupervisorGone as exc:
            found.gone[sandbox_id] = str(exc)
            await trio.to_thread.run_sync(remove_leftovers, sandbox_id)
            return
        found.supervisors[sandbox_id] = supervisor
        found.guests.append(guest)

    async with trio.open_nursery() as nursery:
        for control_dir in control_dirs:
            nursery.start_soon(attach, control_dir)
    found.guests.sort(key=lambda guest: guest.sandbox_id)
    return found


async def attach_kept(control_dir: Path, fields: Mapping[str, type]) -> tuple[KeptGuest, SupervisorClient]:
    """The guest `control_dir`'s supervisor runs, and that supervisor attached; SupervisorGone
    (the supervisor ended for good) if it cannot be adopted."""
    supervisor = SupervisorClient.attach(control_dir)
    try:
        values = supervisor.record.guest
        if any(not isinstance(values.get(k), t) for k, t in fields.items()):
            raise SupervisorGone(f"its supervisor's record says too little of its guest: {values}")
        state = (await supervisor.request(Op.STATE)).state
        if state is None or state.exit is not None:
            raise SupervisorGone(f"its guest has ended: {state.exit.reason if state and state.exit else '?'}")
    except (SupervisorGone, ProtocolError) as exc:
        supervisor.kill_hard()  # whatever it still runs ends
        await supervisor.end(KILL_TIMEOUT_S)
        raise SupervisorGone(str(exc)) from exc
    guest = KeptGuest(
        sandbox_id=control_dir.name,
        slot=int(values["slot"]),
        template_id=str(values["template_id"]),
        memory_mb=int(values["memory_mb"]),
        cpu_count=int(values["cpu_count"]),
        paused=state.paused,
        fully_ready=state.interpreter_ready,
    )
    return guest, supervisor


def remove_orphan_directories(sandboxes_dir: Path, keep: set[str], runtime: str) -> None:
    """Sandbox directories no live supervisor owns (a previous run's, even from before a reboot)."""
    if sandboxes_dir.is_dir():
        for directory in sandboxes_dir.iterdir():
            if directory.name not in keep:
                log.info("%s runtime: removing %s (no guest owns it)", runtime, directory)
                shutil.rmtree(directory, ignore_errors=True)
