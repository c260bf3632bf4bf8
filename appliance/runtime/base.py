"""The interface every isolation runtime (uml, kvm) offers the cubelet.

Trio shape: a runtime's `run()` is a task. The cubelet starts it with
`instance = await sandbox_nursery.start(runtime.run, spec)`; `run()` boots the
guest, waits until the guest agent answers, hands the `Instance` back through
`task_status.started()`, then stays running for as long as the guest lives.
Cancelling the task kills the guest and tears down everything `run()` set up
(processes, network, files) before it returns. `run()` returns normally when the
guest exits on its own, raising `GuestExited` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio

from appliance.templates.manifest import TemplateManifest

if TYPE_CHECKING:
    from appliance.config import Config

ENVD_PORT = 49983
CODE_INTERPRETER_PORT = 49999

# Every guest has the same address (snapshots and warm instances need it); the
# host reaches guest ports through the sandbox's `SandboxNetwork.host_ip`.
GUEST_IP = "169.254.0.2"
GATEWAY_IP = "169.254.0.1"
GUEST_PREFIX = 30


class GuestExited(Exception):
    """The guest stopped without being asked to (crash, panic, poweroff)."""

    def __init__(self, sandbox_id: str, reason: str, console_tail: str = "") -> None:
        super().__init__(f"sandbox {sandbox_id} exited: {reason}")
        self.sandbox_id = sandbox_id
        self.reason = reason
        self.console_tail = console_tail


class BootFailed(Exception):
    """The guest never became ready; carries the console tail for the user."""

    def __init__(self, sandbox_id: str, reason: str, console_tail: str = "") -> None:
        super().__init__(f"sandbox {sandbox_id} failed to boot: {reason}")
        self.sandbox_id = sandbox_id
        self.reason = reason
        self.console_tail = console_tail


class HostBusy(BootFailed):
    """The host cannot take another sandbox now (e.g. not enough memory for its guest): nothing
    was started and nothing else was touched; the client may retry later (HTTP 503)."""


class BootStalled(BootFailed):
    """The guest kernel showed no sign of life at all (no console output) in time: a launch
    that hung rather than a slow boot; worth one more try."""


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
    # Network policy handed to CubeVS; plain data (see appliance.net).
    network_policy: dict[str, object] = field(default_factory=dict)
    # Nobody waits for this boot (a warm-pool refill): runtimes that can give it the least CPU
    # weight until the guest is fully ready, so it does not slow the sandboxes being claimed.
    background: bool = False
    # The writable disk layer to continue from instead of a fresh one: a sandbox carried
    # over a service restart onto new code (`cube upgrade`, appliance/master/carryover.py).
    disk: Path | None = None

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
        network_policy: dict[str, object] | None = None,
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
            network_policy=network_policy or {},
            background=background,
            disk=disk,
        )


class Instance(Protocol):
    """A running guest, as seen by the cubelet and the proxy."""

    sandbox_id: str
    console_log: Path

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


class Runtime(Protocol):
    name: str

    async def run(self, spec: BootSpec, *, task_status: trio.TaskStatus[Instance]) -> None: ...


def read_console_tail(path: Path, max_bytes: int = 4096) -> str:
    """The last `max_bytes` of a guest's console log (what a failure report shows), or ""."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - max_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
