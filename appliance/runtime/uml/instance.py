"""A running UML guest as the cubelet and the proxy see it: reached over its network, changed
through its supervisor (runtime/supervisor), which owns it."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from appliance.runtime.base import MemoryFootprint
from appliance.runtime.supervisor.client import GuestEvents, SupervisorClient, SupervisorGone
from appliance.runtime.supervisor.protocol import Op
from appliance.runtime.uml.cgroups import SandboxCgroup
from appliance.runtime.uml.mconsole import Mconsole
from appliance.runtime.uml.volumes import hotplug_image


class GuestControlFailed(RuntimeError):
    """The supervisor could not pause or resume the guest; the text says why."""


@dataclass
class UmlInstance:
    sandbox_id: str
    console_log: Path
    agent_token: str = field(repr=False)  # "" for a guest adopted after a restart (claimed long ago)
    host_ip: str
    supervisor: SupervisorClient
    events: GuestEvents
    cgroup: SandboxCgroup
    # The guest kernel's management console, for the host's own diagnostics (`version`, `sysrq`);
    # pause and resume go through the supervisor, which keeps the paused flag.
    mconsole: Mconsole
    boot_seconds: float  # launch to agent answering /health (0 for an adopted guest)
    started_at: float  # trio clock at launch (adoption)
    detached: bool = False  # set by `detach`: the task's cancel leaves the guest running

    @property
    def interpreter_seconds(self) -> float:
        """Launch to the default Python kernel answering; inf while it has not (yet)."""
        at = self.events.interpreter_ready_at
        return at - self.started_at if at is not None else math.inf

    async def wait_fully_ready(self) -> None:
        """Until the guest agent's default Python kernel answers (`CUBE-INTERPRETER-READY`).

        The runtime hands an instance out once envd answers; warm pools wait for this too.
        """
        await self.events.interpreter_ready.wait()

    def fully_ready(self) -> bool:
        return self.events.interpreter_ready.is_set()

    def endpoint(self, port: int) -> tuple[str, int]:
        return (self.host_ip, port)

    async def pause(self) -> None:
        """Freeze the guest kernel: it then serves only mconsole until `go`."""
        await self._control(Op.PAUSE)

    async def resume(self) -> None:
        await self._control(Op.RESUME)

    async def _control(self, op: Op) -> None:
        try:
            reply = await self.supervisor.request(op)
        except SupervisorGone as exc:
            raise GuestControlFailed(f"{op}: {exc}") from exc
        if not reply.ok:
            raise GuestControlFailed(f"{op}: {reply.error}")

    def detach(self) -> None:
        self.detached = True

    async def attach_disk(self, slot: int, size_bytes: int, fill: Callable[[int], Awaitable[None]]) -> str:
        """A new disk image of `size_bytes` (`fill(fd)` writes it) plugged into the running guest as
        ubd device `slot`; the guest's device path (cubelet/volume_mounts.py, runtime/uml/volumes.py)."""
        m = self.mconsole
        return await hotplug_image(m, m.guest_dir, m.owner_uid, slot, size_bytes, fill)

    def memory_usage_bytes(self) -> int:
        """Everything the sandbox's cgroup is charged: guest memory file, UML processes.

        0 once the sandbox is torn down (its cgroup is gone with it)."""
        try:
            return self.cgroup.memory_usage_bytes()
        except FileNotFoundError:
            return 0

    def memory_footprint(self) -> MemoryFootprint:
        """What its cgroup is charged now, all of it private: a uml guest's RAM is a memory file
        charged as the guest touches it (and given back by its free page reporting), capped by
        memory.max = memory_mb. An idle guest holds ~130 MiB of its 512: charging it the whole
        memory_mb capped this host at 36 guests where memory holds ~150, and a warm pool at a
        third of a burst of 50. The budget adds the same growth headroom as for kvm clones."""
        return MemoryFootprint(private_bytes=self.memory_usage_bytes())
