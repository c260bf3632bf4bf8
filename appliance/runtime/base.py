"""The interface every isolation runtime (uml, kvm) offers the cubelet.

Trio shape: a runtime's `run()` is a task. The cubelet starts it with
`instance = await sandbox_nursery.start(runtime.run, spec)`; `run()` boots the
guest, waits until the guest agent answers (`appliance.runtime.readiness`), hands
the `Instance` back through `task_status.started()`, then stays running for as
long as the guest lives.

`run()` never returns. It ends in one of three ways, each after tearing down
everything it set up (processes, network, files):
- cancelled (that is how the cubelet kills a guest): `trio.Cancelled` goes through;
- before `started()`, the guest never became ready: `BootFailed` (`BootStalled`
  when it showed no sign of life at all, which is worth one more try);
- after `started()`, the guest stopped on its own (crash, panic, poweroff):
  `GuestExited` with the reason and the console's last words.

A runtime whose guests can outlive the service (`AdoptingRuntime`: uml, through its
per-sandbox supervisors) also lists at start the guests a previous service left running
(`kept_guests`) and takes one over with `adopt(sandbox_id, spec)`, a task shaped like
`run()` without the boot. Its instances are `Detachable`: `detach()` before the task is
cancelled makes the cancel leave the guest running, with everything it holds, for the
next service. Other runtimes' guests end with the service (kvm: one process holds them).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Protocol, runtime_checkable

import trio

from appliance.records import TemplateManifest

if TYPE_CHECKING:
    from appliance.config import Config
    from appliance.net.policy import NetworkPolicy

ENVD_PORT = 49983
CODE_INTERPRETER_PORT = 49999


class GuestFailure(Exception):
    """How a runtime's `run()` reports a guest that failed; carries the console tail for the user."""

    what = "failed"

    def __init__(self, sandbox_id: str, reason: str, console_tail: str = "") -> None:
        super().__init__(f"sandbox {sandbox_id} {self.what}: {reason}")
        self.sandbox_id = sandbox_id
        self.reason = reason
        self.console_tail = console_tail


class GuestExited(GuestFailure):
    """The guest stopped without being asked to (crash, panic, poweroff)."""

    what = "exited"


class BootFailed(GuestFailure):
    """The guest never became ready."""

    what = "failed to boot"


class HostBusy(BootFailed):
    """The host cannot take another sandbox now (e.g. not enough memory for its guest): nothing
    was started and nothing else was touched; the client may retry later (HTTP 503)."""


class BootStalled(BootFailed):
    """The guest kernel showed no sign of life at all (no console output) in time: a launch
    that hung rather than a slow boot; worth one more try."""


def _open_policy() -> NetworkPolicy:
    """E2B's default: everything allowed that is not always blocked (imported late: appliance.net
    imports this module)."""
    from appliance.net.policy import NetworkPolicy

    return NetworkPolicy()


@dataclass(frozen=True)
class BootSpec:
    """Everything a runtime needs to start one sandbox."""

    sandbox_id: str
    template: TemplateManifest
    # Small integer unique among live sandboxes on this node: picks the sandbox's
    # uid (config.uid_base + slot) and its host-side network address.
    slot: int
    sandbox_dir: Path  # private per-sandbox files: COW disk, console log, sockets
    memory_mb: int
    cpu_count: int
    # Egress policy handed to CubeVS (parsed once, at the API's edge).
    network_policy: NetworkPolicy = field(default_factory=lambda: _open_policy())
    # Nobody waits for this boot (a warm-pool refill): runtimes that can give it the least CPU
    # weight until the guest is fully ready, so it does not slow the sandboxes being claimed.
    background: bool = False
    # The writable disk layer to continue from instead of a fresh one: a sandbox carried
    # over a service restart onto new code (`cube upgrade`, appliance/master/carryover.py).
    disk: Path | None = None
    # A secret of this boot, on the guest kernel's command line (`cube.agent_token=`): until
    # /init hands the guest its sandbox's token, its agent accepts calls carrying only this
    # (appliance/guest/state.py). Never logged.
    agent_token: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)

    @classmethod
    def for_template(
        cls,
        config: Config,
        template: TemplateManifest,
        sandbox_id: str,
        slot: int,
        *,
        memory_mb: int | None = None,
        cpu_count: int | None = None,
        network_policy: NetworkPolicy | None = None,
        background: bool = False,
        disk: Path | None = None,
    ) -> BootSpec:
        """A sandbox of `template`, sized as the template says unless told otherwise, with its
        files under the config's sandboxes directory."""
        return cls(
            sandbox_id=sandbox_id,
            template=template,
            slot=slot,
            sandbox_dir=config.sandboxes_dir / sandbox_id,
            memory_mb=template.memory_mb if memory_mb is None else memory_mb,
            cpu_count=template.cpu_count if cpu_count is None else cpu_count,
            network_policy=network_policy or _open_policy(),
            background=background,
            disk=disk,
        )


@dataclass(frozen=True)
class MemoryFootprint:
    """What a guest really holds of the host's memory, as its runtime measures it (what the
    cubelet's memory budget charges it: appliance/cubelet/memory_charges.py)."""

    private_bytes: int  # held for this guest alone (pages it wrote, its own allocations)
    # Held once for every guest that maps it (a kvm template snapshot's page cache): what it
    # is ("" if nothing) and how much of it this guest maps.
    shared_key: str = ""
    shared_bytes: int = 0


class Instance(Protocol):
    """A running guest, as seen by the cubelet and the proxy."""

    sandbox_id: str
    console_log: Path
    # What the guest's agent accepts until /init: the boot's `BootSpec.agent_token`, or for a
    # kvm snapshot clone the snapshot's (the same in every clone; it dies at /init).
    agent_token: str

    def endpoint(self, port: int) -> tuple[str, int]:
        """(host, port) on which the host reaches `port` inside the guest."""
        ...

    async def pause(self) -> None:
        """Freeze the guest (no CPU time, memory kept)."""
        ...

    async def resume(self) -> None: ...

    def memory_usage_bytes(self) -> int:
        """Host memory charged to this guest right now."""
        ...

    def memory_footprint(self) -> MemoryFootprint | None:
        """What the guest holds now, private and shared apart; None where the runtime cannot
        tell them apart (the budget then charges the guest its template's whole memory_mb)."""
        ...

    async def wait_fully_ready(self) -> None:
        """Until the guest agent's default Python kernel answers too: an instance is handed out
        once envd answers, and warm pools wait for this as well. Returns at once for runtimes
        that hand out instances only when fully ready."""
        ...

    def fully_ready(self) -> bool:
        """Whether `wait_fully_ready` would return at once."""
        ...


@dataclass(frozen=True)
class KeptGuest:
    """A guest that a previous service left running, as its runtime describes it."""

    sandbox_id: str
    slot: int  # the slot it was booted in (its uid and network)
    template_id: str
    memory_mb: int
    cpu_count: int
    paused: bool  # frozen as it is now (pause/resume), whatever the store says
    fully_ready: bool


@runtime_checkable
class Detachable(Protocol):
    """An instance whose guest can outlive the service."""

    def detach(self) -> None:
        """Leave the guest running when its `run()`/`adopt()` task is cancelled next."""
        ...


class Runtime(Protocol):
    name: str
    # How a template starts fast: True, from the snapshot `finalize_template` takes of the build's
    # probed guest (kvm); False, from the cubelet's warm pool of booted guests (uml).
    snapshots_templates: bool

    async def run(self, spec: BootSpec, *, task_status: trio.TaskStatus[Instance]) -> NoReturn:
        """Boot, hand over the instance, live as long as the guest: see the module's docstring."""
        ...

    async def finalize_template(self, template: TemplateManifest, instance: Instance) -> None:
        """The template build's last step on its probed guest (`instance`, a guest of this runtime):
        the snapshot into the template's directory, or nothing."""
        ...

    def forget_template(self, template_id: str) -> None:
        """A template was deleted (no sandbox runs from it): delete what the runtime keeps to
        start it (kvm: its snapshots, a full snapshot's memory among them). Blocking file work."""
        ...

    def close(self) -> None:
        """Release what the runtime keeps between sandboxes (after the last one is gone)."""
        ...


@runtime_checkable
class AdoptingRuntime(Runtime, Protocol):
    """A runtime whose guests outlive the service that started them."""

    async def kept_guests(self) -> tuple[list[KeptGuest], dict[str, str]]:
        """At start, once: the guests a previous service left running (each to be adopted), and
        why each other guest it had is gone (by sandbox id). What those left is cleaned up."""
        ...

    async def adopt(
        self, sandbox_id: str, spec: BootSpec, *, task_status: trio.TaskStatus[Instance]
    ) -> NoReturn:
        """Take over a kept guest: like `run()` from the moment its agent answers (the instance is
        handed over at once; BootFailed if it cannot be taken over, after tearing it down)."""
        ...


def read_console_tail(path: Path, max_bytes: int = 4096) -> str:
    """The last `max_bytes` of a guest's console log (what a failure report shows), or ""."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - max_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
