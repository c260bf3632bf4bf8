"""Kernels that speak the Jupyter messaging protocol (ipykernel, IRkernel, bash_kernel) over ZMQ IPC.

One class drives them all: a connection file in a private directory, the kernel process in its own
session as the context's user, shell and iopub sockets read by router tasks, executions turned
into /execute events. A language says how to start its kernel and how to set env vars in it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import tempfile
import uuid
from typing import TYPE_CHECKING, Any

import trio

from appliance.guest.http import ClientGone
from appliance.guest.kernel import (
    INTERRUPT_GRACE_S,
    KERNEL_START_TIMEOUT_S,
    Emit,
    Kernel,
    KernelSpec,
    KernelStartError,
    died_event,
    discard_event,
    output_event,
    spawn_kernel_process,
    start_failure,
)

if TYPE_CHECKING:
    from appliance.guest.jupyter import Session, TrioSocket

# How long to wait for the iopub status echo of a kernel_info request before asking again:
# a SUB socket only receives once its subscription reached the kernel.
IOPUB_HANDSHAKE_S = 0.5
# Jupyter MIME types → fields of an /execute `result` event (PROTOCOL.md §4.1); others go to `extra`.
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
}

Routed = tuple[str, dict[str, object]]  # (socket name, message)


def result_event(
    data: dict[str, object], is_main_result: bool, fields: dict[str, str] = MIME_FIELDS
) -> dict[str, object]:
    event: dict[str, object] = {"type": "result", "is_main_result": is_main_result}
    extra = {}
    for mime, value in data.items():
        field = fields.get(mime)
        if field:
            event[field] = value.strip() if field in ("png", "jpeg") and isinstance(value, str) else value
        else:
            extra[mime] = value
    if extra:
        event["extra"] = extra
    return event


class JupyterKernel(Kernel[Routed]):
    """A Jupyter kernel process; subclasses say how to start it and how to set env vars in it."""

    mime_fields = MIME_FIELDS

    def __init__(self, spec: KernelSpec) -> None:
        super().__init__(spec)
        self._pending_env: dict[str, str] = {}
        self._reseed_pending = False
        self._process: trio.Process | None = None
        self._session: Session | None = None
        self._shell: TrioSocket | None = None
        self._started = False

    # What a language provides.

    def kernel_argv(self, connection_file: str) -> list[str]:
        raise NotImplementedError

    def kernel_env(self, env: dict[str, str], directory: str) -> dict[str, str]:
        """The kernel process's environment; `directory` is its private, removed with it."""
        return env

    def startup_code(self) -> str:
        """Run silently once the kernel answers, before any execution."""
        return ""

    def set_env_code(self, env_vars: dict[str, str]) -> str:
        """Code that sets env vars for the rest of the kernel's life (sandbox env vars)."""
        raise NotImplementedError

    def scoped_env_code(self, env_vars: dict[str, str]) -> tuple[str, str]:
        """(set, restore): env vars for one execution, then the values from before it."""
        raise NotImplementedError

    def reseed_code(self) -> str:
        """Code that reseeds the language's own random generators from the OS (`reseed`)."""
        return ""

    # The protocol.

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        import zmq  # lazy: slow to import, and envd does not need it

        from appliance.guest.jupyter import Session, TrioSocket

        directory = tempfile.mkdtemp(prefix="kernel-", dir=self.spec.runtime_dir)
        self.spec.user.chown(directory)
        key = uuid.uuid4().hex
        connection_file, address = self._write_connection_file(directory, key)
        env = self.kernel_env(dict(self.spec.env), directory)
        context: zmq.Context[Any] = zmq.Context.instance()
        sockets: list[TrioSocket] = []
        try:
            with self.cancel_scope:
                self._process = process = await spawn_kernel_process(
                    self.kernel_argv(connection_file), dataclasses.replace(self.spec, env=env)
                )
                self._session = session = Session(key.encode())
                shell_socket = context.socket(zmq.DEALER)
                shell_socket.connect(f"ipc://{address}-1")
                iopub_socket = context.socket(zmq.SUB)
                iopub_socket.setsockopt(zmq.SUBSCRIBE, b"")
                iopub_socket.connect(f"ipc://{address}-2")
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
                    if startup := self.startup_code():
                        self._send_silently(startup)
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

    def _write_connection_file(self, directory: str, key: str) -> tuple[str, str]:
        """The kernel's connection file (IPC sockets beside it); returns (its path, socket prefix)."""
        address = os.path.join(directory, "k")
        connection = {
            "transport": "ipc",
            "ip": address,
            "shell_port": 1,
            "iopub_port": 2,
            "stdin_port": 3,
            "control_port": 4,
            "hb_port": 5,
            "key": key,
            "signature_scheme": "hmac-sha256",
            "kernel_name": self.language,
        }
        connection_file = os.path.join(directory, "connection.json")
        with open(os.open(connection_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            json.dump(connection, f)
        self.spec.user.chown(connection_file)
        return connection_file, address

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
                        raise KernelStartError(f"the {self.language} kernel exited while starting")
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
        self._reseed_pending = bool(self.reseed_code())

    async def execute(self, code: str, env_vars: dict[str, str], emit: Emit) -> None:
        if self._reseed_pending:
            self._send_silently(self.reseed_code())
            self._reseed_pending = False
        if self._pending_env:
            self._send_silently(self.set_env_code(self._pending_env))
            self._pending_env.clear()
        restore = ""
        if env_vars:
            setup, restore = self.scoped_env_code(env_vars)
            self._send_silently(setup)
        msg_id, replies = self._execute_request(code, silent=False)
        try:
            await self._collect(replies, emit)
        except (trio.Cancelled, ClientGone):
            if self._process is not None and self.alive:
                # The client is gone: stop the cell but keep the kernel's state, and let the cell
                # wind down before the context takes the next request.
                self._process.send_signal(signal.SIGINT)
                with trio.CancelScope(shield=True), trio.move_on_after(INTERRUPT_GRACE_S):
                    await self._collect(replies, discard_event)
            raise
        finally:
            self._stop_waiting(msg_id)
            if restore and self.alive:
                self._send_silently(restore)

    async def _collect(self, replies: trio.MemoryReceiveChannel[Routed | None], emit: Emit) -> None:
        """Events of one execution, up to both its reply and its `idle` status: a kernel may still be
        busy after the reply (IRkernel drops the requests queued behind a failed cell then), so the
        next request goes out only after idle."""
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
                    await emit(result_event(data, msg_type == "execute_result", self.mime_fields))
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
