"""JavaScript and TypeScript contexts: a small kernel of our own (node_kernel.js) on the guest's Node.js."""

from __future__ import annotations

import shutil
from pathlib import Path

from appliance.guest.kernel import KernelStartError
from appliance.guest.pipe_kernel import PipeKernel, json_line

SCRIPT = Path(__file__).with_name("node_kernel.js")


class NodeKernel(PipeKernel):
    """A synchronous JavaScript loop cannot be interrupted: a cell whose client left restarts the
    kernel (its state is lost) rather than leave the context blocked behind it."""

    language = "javascript"

    def argv(self) -> list[str]:
        node = shutil.which("node") or shutil.which("nodejs")
        if node is None:
            raise KernelStartError("Node.js is not installed")
        return [node, str(SCRIPT)]

    def execute_request(self, request_id: str, code: str, env_vars: dict[str, str]) -> bytes:
        return json_line({"type": "execute", "id": request_id, "code": code, "env": env_vars})

    def env_request(self, env_vars: dict[str, str]) -> bytes:
        return json_line({"type": "env", "vars": env_vars})


class TypeScriptKernel(NodeKernel):
    """The same kernel; node_kernel.js strips each cell's types first."""

    language = "typescript"
