"""Python contexts on IPython's InteractiveShell in a small process of their own (python_shell.py),
driven with pipe_kernel.py's JSON lines: no ZMQ, tornado, jupyter_client or ipykernel app.

Under UML an ipykernel took ~4 s to start and ~58 MiB; most of that is the Jupyter machinery
around the shell (docs/BENCHMARKS.md, "Python contexts"). The results are ipykernel's: the
same display formatters (kernel_display.py, kernel_charts.py) run in the shell, and replies are
turned into /execute events by the same code as the ipykernel's messages (jupyter_kernel.py).
`/etc/cube/python-kernel` holding `ipykernel` brings the ipykernel back (python_kernel.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import trio

from appliance.guest.jupyter_kernel import result_event
from appliance.guest.kernel import KernelSpec
from appliance.guest.pipe_kernel import PipeKernel, Reply, json_line
from appliance.guest.python_kernel import (
    PYTHON_MIME_FIELDS,
    RESEED_CODE,
    RESTORE_SKIPPED_MODULES,
    SKIPPED_MODULES,
    display_setup_code,
    python_kernel_env,
)

SCRIPT = Path(__file__).with_name("python_shell.py")
SHELL_MODULE_NAME = "__cube_shell__"  # python_shell.py's main() runs under this name
# The engine's source is read by path (the context's user can read the agent's files, as it
# runs node_kernel.js) but not imported from its directory: the agent's modules (http.py...)
# must not shadow the standard library for user code, so nothing is added to sys.path.
BOOTSTRAP = (
    "import sys\n"
    "if sys.path and sys.path[0] == '':\n"
    "    del sys.path[0]\n"
    f"sys.modules.update(dict.fromkeys({SKIPPED_MODULES!r}))\n"
    "_cube_path = sys.argv.pop(1)\n"
    "with open(_cube_path) as _cube_file:\n"
    "    _cube_source = _cube_file.read()\n"
    f"exec(compile(_cube_source, _cube_path, 'exec'), {{'__name__': {SHELL_MODULE_NAME!r}}})\n"
)
ENGINE_SETTING = "/etc/cube/python-kernel"  # `ipykernel`: the Jupyter kernel instead of this
ENGINE_ENV = "CUBE_PYTHON_KERNEL"  # the same, for an agent run as a host process (tests, benches)


def shell_wanted() -> bool:
    """Whether Python contexts run on this engine (the default) rather than on an ipykernel."""
    choice = os.environ.get(ENGINE_ENV, "")
    if not choice:
        try:
            with open(ENGINE_SETTING) as f:
                choice = f.read()
        except OSError:
            choice = ""
    return choice.strip() != "ipykernel"


class ShellKernel(PipeKernel):
    language = "python"

    def __init__(self, spec: KernelSpec) -> None:
        super().__init__(spec)
        self._directory = ""
        self._reseed_pending = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._directory = tempfile.mkdtemp(prefix="shell-", dir=self.spec.runtime_dir)
        self.spec.user.chown(self._directory)
        try:
            await super().run(task_status=task_status)
        finally:
            shutil.rmtree(self._directory, ignore_errors=True)

    def argv(self) -> list[str]:
        return [sys.executable, "-c", BOOTSTRAP, str(SCRIPT)]

    def kernel_env(self, env: dict[str, str]) -> dict[str, str]:
        return python_kernel_env(self.spec, env, self._directory)

    def startup_request(self) -> bytes | None:
        return json_line({"type": "silent", "code": RESTORE_SKIPPED_MODULES + display_setup_code()})

    def execute_request(self, request_id: str, code: str, env_vars: dict[str, str]) -> bytes:
        reseed = json_line({"type": "silent", "code": RESEED_CODE}) if self._reseed_pending else b""
        self._reseed_pending = False
        return reseed + json_line({"type": "execute", "id": request_id, "code": code, "env": env_vars})

    def env_request(self, env_vars: dict[str, str]) -> bytes:
        return json_line({"type": "env", "vars": env_vars})

    def reseed(self) -> None:
        self._reseed_pending = True  # with the next execution, which the interpreter sends next

    def reply_event(self, kind: str, message: dict[str, object]) -> dict[str, object]:
        data = message.get("data")
        if kind == "result" and isinstance(data, dict):
            return result_event(data, bool(message.get("is_main_result")), PYTHON_MIME_FIELDS)
        return super().reply_event(kind, message)

    async def interrupt(self, receive_channel: trio.MemoryReceiveChannel[Reply | None]) -> bool:
        """SIGINT, as Jupyter interrupts a kernel: a KeyboardInterrupt in the running cell."""
        if self._process is None or not self.alive:
            return False
        self._process.send_signal(signal.SIGINT)
        return await self._wind_down(receive_channel)
