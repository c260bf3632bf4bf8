"""A real IPython kernel (ipykernel), spoken to over ZMQ IPC sockets.

Images and rich reprs come back as Jupyter display data: matplotlib's inline backend is
selected through MPLBACKEND, so figures arrive as PNG; pandas frames bring text/html.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import uuid
from typing import TYPE_CHECKING, Any

import trio

from appliance.guest import kernel_charts
from appliance.guest.http import ClientGone
from appliance.guest.kernel import (
    KERNEL_START_TIMEOUT_S,
    Emit,
    Kernel,
    KernelSpec,
    KernelStartError,
    died_event,
    output_event,
    spawn_kernel_process,
    start_failure,
)
from appliance.guest.kernel_charts import CHART_MIME, KERNEL_MODULE_NAME

# How long to wait for the iopub status echo of a kernel_info request before asking again:
# a SUB socket only receives once its subscription reached the kernel.
IOPUB_HANDSHAKE_S = 0.5
# How long an interrupted cell may take to wind down before the context is used again.
INTERRUPT_GRACE_S = 5.0
MIME_FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    CHART_MIME: "chart",
}
if TYPE_CHECKING:
    from appliance.guest.jupyter import Session, TrioSocket

INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
# `python3 -m ipykernel_launcher`, minus ipykernel's debugger: importing debugpy (pydevd) is
# about a quarter of a kernel's start-up under UML, for a feature no E2B client uses.
# `import debugpy` fails while sys.modules holds None for it; RESTORE_DEBUGPY undoes that
# once the kernel answers, so user code can still import it.
KERNEL_BOOTSTRAP = (
    "import sys\n"
    "if sys.path and sys.path[0] == '':\n"
    "    del sys.path[0]\n"
    "sys.modules['debugpy'] = None\n"
    "from ipykernel import kernelapp\n"
    "kernelapp.launch_new_instance()\n"
)
RESTORE_DEBUGPY = (
    "import sys as _cube_sys\n"
    "if 'debugpy' in _cube_sys.modules and _cube_sys.modules['debugpy'] is None:\n"
    "    del _cube_sys.modules['debugpy']\n"
    "del _cube_sys\n"
)


@functools.cache
def chart_setup_code() -> str:
    """Registers the figure → chart formatter in a kernel (kernel_charts.py, run from its source)."""
    with open(kernel_charts.__file__) as f:
        source = f.read()
    return f"exec(compile({source!r}, 'cube-charts', 'exec'), {{'__name__': {KERNEL_MODULE_NAME!r}}})\n"


Routed = tuple[str, dict[str, object]]  # (socket name, message)


def result_event(data: dict[str, object], is_main_result: bool) -> dict[str, object]:
    event: dict[str, object] = {"type": "result", "is_main_result": is_main_result}
    extra = {}
    for mime, value in data.items():
        field = MIME_FIELDS.get(mime)
        if field:
            event[field] = value.strip() if field in ("png", "jpeg") and isinstance(value, str) else value
        else:
            extra[mime] = value
    if extra:
        event["extra"] = extra
    return event


def _env_setup_code(env_vars: dict[str, str]) -> str:
    return (
        "import os as _cube_os\n"
        f"_cube_saved_env = {{k: _cube_os.environ.get(k) for k in {sorted(env_vars)!r}}}\n"
        f"_cube_os.environ.update({env_vars!r})\n"
    )


ENV_RESTORE_CODE = (
    "for _cube_k, _cube_v in _cube_saved_env.items():\n"
    "    if _cube_v is None:\n"
    "        _cube_os.environ.pop(_cube_k, None)\n"
    "    else:\n"
    "        _cube_os.environ[_cube_k] = _cube_v\n"
    "del _cube_saved_env\n"
)


# `random` (and numpy's global generator, once imported) seed themselves from the OS when
# imported: in a kernel that was running when a template was snapshotted, every clone would
# draw the same numbers. The kernel's OS entropy is the clone's own once /init reseeded it.
RESEED_CODE = (
    "import random as _cube_random, sys as _cube_sys\n"
    "_cube_random.seed()\n"
    "if 'numpy' in _cube_sys.modules:\n"
    "    _cube_sys.modules['numpy'].random.seed()\n"
    "del _cube_random, _cube_sys\n"
)


class PythonKernel(Kernel[Routed]):
    language = "python"

    def __init__(self, spec: KernelSpec) -> None:
        super().__init__(spec)
        self._pending_env: dict[str, str] = {}
        self._reseed_pending = False
        self._process: trio.Process | None = None
        self._session: Session | None = None
        self._shell: TrioSocket | None = None
        self._started = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        import zmq  # lazy: slow to import, and envd does not need it

        from appliance.guest.jupyter import Session, TrioSocket

        directory = tempfile.mkdtemp(prefix="kernel-", dir=self.spec.runtime_dir)
        self.spec.user.chown(directory)
        key = uuid.uuid4().hex
        connection = {
            "transport": "ipc",
            "ip": os.path.join(directory, "k"),
            "shell_port": 1,
            "iopub_port": 2,
            "stdin_port": 3,
            "control_port": 4,
            "hb_port": 5,
            "key": key,
            "signature_scheme": "hmac-sha256",
            "kernel_name": "python3",
        }
        connection_file = os.path.join(directory, "connection.json")
        with open(os.open(connection_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            json.dump(connection, f)
        self.spec.user.chown(connection_file)
        env = dict(self.spec.env)
        if not self.spec.user.can_write(env.get("HOME", self.spec.user.home)):
            # IPython and matplotlib would each make a fresh directory in /tmp (and never remove
            # it) for want of ~/.ipython and ~/.config/matplotlib: theirs go with the kernel's.
            env.setdefault("IPYTHONDIR", os.path.join(directory, "ipython"))
            env.setdefault("MPLCONFIGDIR", os.path.join(directory, "matplotlib"))
        env.setdefault("MPLBACKEND", INLINE_BACKEND)
        # ipykernel imports debugpy, which otherwise warns about frozen modules on every start.
        env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
        argv = [
            sys.executable,
            "-c",
            KERNEL_BOOTSTRAP,
            "-f",
            connection_file,
            # No history database (sqlite) and no thread saving to it: nothing reads it back.
            "--HistoryManager.enabled=False",
        ]
        context: zmq.Context[Any] = zmq.Context.instance()
        sockets: list[TrioSocket] = []
        try:
            with self.cancel_scope:
                self._process = process = await spawn_kernel_process(
                    argv, dataclasses.replace(self.spec, env=env)
                )
                self._session = session = Session(key.encode())
                shell_socket = context.socket(zmq.DEALER)
                shell_socket.connect(f"ipc://{connection['ip']}-1")
                iopub_socket = context.socket(zmq.SUB)
                iopub_socket.setsockopt(zmq.SUBSCRIBE, b"")
                iopub_socket.connect(f"ipc://{connection['ip']}-2")
                self._shell = shell = TrioSocket(shell_socket)
                iopub = TrioSocket(iopub_socket)
                sockets += [shell, iopub]
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._route, shell, "shell", session)
                    nursery.start_soon(self._route, iopub, "iopub", session)
                    nursery.start_soon(self._watch, process, nursery.cancel_scope)
                    with trio.fail_after(KERNEL_START_TIMEOUT_S):
                        await self._handshake()
                    self.alive = self._started = True
                    self._send_silently(RESTORE_DEBUGPY + chart_setup_code())
                    task_status.started()
        except (KernelStartError, trio.TooSlowError, BaseExceptionGroup) as exc:
            failure = start_failure(exc)
            if failure is None:
                raise
            raise failure from None
        finally:
            await self._reap(self._process)
            for socket in sockets:
                socket.close()
            shutil.rmtree(directory, ignore_errors=True)

    async def _watch(self, process: trio.Process, scope: trio.CancelScope) -> None:
        await process.wait()
        self.alive = False
        self._notify_died()
        if self._started:
            scope.cancel()  # before that, the handshake sees the death and raises KernelStartError

    async def _route(self, socket: TrioSocket, name: str, session: Session) -> None:
        while True:
            message = session.parse(await socket.receive())
            if message is None:
                continue
            parent = message["parent_header"]
            if isinstance(parent, dict):
                self._deliver(parent.get("msg_id"), (name, message))

    def _request(
        self, msg_type: str, content: dict[str, object]
    ) -> tuple[str, trio.MemoryReceiveChannel[Routed | None]]:
        assert self._session is not None and self._shell is not None
        msg_id, frames = self._session.build(msg_type, content)
        receive_channel = self._wait_for(msg_id)
        self._shell.send(frames)
        return msg_id, receive_channel

    async def _handshake(self) -> None:
        """Wait until the kernel answers on shell and its iopub messages reach us."""
        while True:
            msg_id, replies = self._request("kernel_info_request", {})
            try:
                got_reply = got_iopub = False
                while not got_reply:
                    routed = await replies.receive()
                    if routed is None:
                        raise KernelStartError("the Python kernel exited while starting")
                    name = routed[0]
                    got_reply = got_reply or name == "shell"
                    got_iopub = got_iopub or name == "iopub"
                with trio.move_on_after(IOPUB_HANDSHAKE_S):
                    while not got_iopub:
                        routed = await replies.receive()
                        got_iopub = routed is not None and routed[0] == "iopub"
                if got_iopub:
                    return
            finally:
                self._stop_waiting(msg_id)

    def _execute_request(
        self, code: str, silent: bool
    ) -> tuple[str, trio.MemoryReceiveChannel[Routed | None]]:
        content = {
            "code": code,
            "silent": silent,
            "store_history": not silent,
            "user_expressions": {},
            "allow_stdin": False,
            # Executions are serialised per context, so there is never a queued cell to skip; and
            # after a failing (or interrupted) cell, the next request (e.g. the env restore) must run.
            "stop_on_error": False,
        }
        return self._request("execute_request", content)

    def _send_silently(self, code: str) -> None:
        """Shell requests run in order, so nobody needs to wait for a silent one's reply."""
        msg_id, _replies = self._execute_request(code, silent=True)
        self._stop_waiting(msg_id)

    def update_env(self, env_vars: dict[str, str]) -> None:
        # Applied with the next execution: only code run in the kernel sees its environment,
        # and a sandbox's /init (which brings the create's variables) then costs the guest no
        # kernel round trip (~30 ms of its one vCPU) while its creator waits.
        self._pending_env.update(env_vars)

    def reseed(self) -> None:
        self._reseed_pending = True

    async def execute(self, code: str, env_vars: dict[str, str], emit: Emit) -> None:
        if self._reseed_pending:
            self._send_silently(RESEED_CODE)
            self._reseed_pending = False
        if self._pending_env:
            self._send_silently(f"import os as _cube_os\n_cube_os.environ.update({self._pending_env!r})\n")
            self._pending_env.clear()
        if env_vars:
            self._send_silently(_env_setup_code(env_vars))
        msg_id, replies = self._execute_request(code, silent=False)
        try:
            await self._collect(replies, emit)
        except (trio.Cancelled, ClientGone):
            if self._process is not None and self.alive:
                # The client is gone: stop the cell but keep the kernel's state, and let the cell
                # wind down before the context takes the next request.
                self._process.send_signal(signal.SIGINT)
                with trio.CancelScope(shield=True), trio.move_on_after(INTERRUPT_GRACE_S):
                    await self._wait_for_reply(replies)
            raise
        finally:
            self._stop_waiting(msg_id)
            if env_vars and self.alive:
                self._send_silently(ENV_RESTORE_CODE)

    @staticmethod
    async def _wait_for_reply(replies: trio.MemoryReceiveChannel[Routed | None]) -> None:
        while True:
            routed = await replies.receive()
            if routed is None or routed[0] == "shell":
                return

    async def _collect(self, replies: trio.MemoryReceiveChannel[Routed | None], emit: Emit) -> None:
        idle = replied = False
        while not (idle and replied):
            routed = await replies.receive()
            if routed is None:
                await emit(died_event(self.language))
                return
            name, message = routed
            msg_type = message["header"]["msg_type"]  # type: ignore[index]
            content: dict[str, object] = message["content"]  # type: ignore[assignment]
            if name == "shell":
                if msg_type == "execute_reply":
                    replied = True
                    count = content.get("execution_count")
                    await emit({"type": "number_of_executions", "execution_count": count})
            elif msg_type == "stream":
                await emit(output_event(str(content.get("name", "stdout")), str(content.get("text", ""))))
            elif msg_type in ("execute_result", "display_data"):
                data = content.get("data")
                if isinstance(data, dict):
                    await emit(result_event(data, msg_type == "execute_result"))
            elif msg_type == "error":
                traceback = content.get("traceback") or []
                lines = traceback if isinstance(traceback, list) else [traceback]
                await emit(
                    {
                        "type": "error",
                        "name": str(content.get("ename", "")),
                        "value": str(content.get("evalue", "")),
                        "traceback": "\n".join(str(line) for line in lines),
                    }
                )
            elif msg_type == "status" and content.get("execution_state") == "idle":
                idle = True
