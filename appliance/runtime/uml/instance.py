"""A running UML guest as the cubelet and the proxy see it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from appliance.runtime.uml.cgroups import SandboxCgroup
from appliance.runtime.uml.console import ConsoleLog
from appliance.runtime.uml.mconsole import Mconsole


@dataclass
class UmlInstance:
    sandbox_id: str
    console_log: Path
    agent_token: str = field(repr=False)
    host_ip: str
    mconsole: Mconsole
    cgroup: SandboxCgroup
    console: ConsoleLog
    boot_seconds: float  # launch to agent answering /health
    started_at: float  # trio clock at launch

    @property
    def interpreter_seconds(self) -> float:
        """Launch to the default Python kernel answering; inf while it has not (yet)."""
        at = self.console.interpreter_ready_at
        return at - self.started_at if at is not None else math.inf

    async def wait_fully_ready(self) -> None:
        """Until the guest agent's default Python kernel answers (`CUBE-INTERPRETER-READY`).

        The runtime hands an instance out once envd answers; warm pools wait for this too.
        """
        await self.console.interpreter_ready.wait()

    def fully_ready(self) -> bool:
        return self.console.interpreter_ready.is_set()

    def endpoint(self, port: int) -> tuple[str, int]:
        return (self.host_ip, port)

    async def pause(self) -> None:
        """Freeze the guest kernel: it then serves only mconsole until `go`."""
        await self.mconsole.request("stop")

    async def resume(self) -> None:
        await self.mconsole.request("go")

    async def sysrq(self, key: str) -> str:
        """Magic SysRq in the guest (e.g. `t` dumps tasks to the console log)."""
        return await self.mconsole.request(f"sysrq {key}")

    def memory_usage_bytes(self) -> int:
        """Everything the sandbox's cgroup is charged: guest memory file, UML processes.

        0 once the sandbox is torn down (its cgroup is gone with it)."""
        try:
            return self.cgroup.memory_usage_bytes()
        except FileNotFoundError:
            return 0
