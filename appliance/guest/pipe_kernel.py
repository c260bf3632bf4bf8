"""Kernels of our own (node_kernel.js, JavaKernel.java): requests as lines on the kernel's stdin,
replies as JSON lines on a pipe of their own (CUBE_REPLY_FD), so nothing user code prints can
corrupt the protocol.

Replies: `{"type": "ready"}` once, then per execution (`id` as sent) any of
`{"type": "stdout"|"stderr", "text"}`, `{"type": "result", ...}`, `{"type": "error", "name",
"value", "traceback"}`, and last `{"type": "done", "execution_count"}`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess

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
)

Reply = dict[str, object]  # one JSON line of the kernel


def json_line(request: dict[str, object]) -> bytes:
    """A request as the kernel reads it: one line of JSON."""
    return (json.dumps(request) + "\n").encode()


def _reply(line: bytes) -> Reply | None:
    """A reply line as a message, or None if it is none. User code runs inside the kernel and may
    find the reply pipe and write anything into it: that may garble its own results, never stop
    the agent."""
    try:
        message = json.loads(line)
    except ValueError:  # also UnicodeDecodeError
        return None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return None
    if not isinstance(message.get("id"), str | None):  # ids are the request ids we sent, or none
        return None
    return message


class PipeKernel(Kernel[Reply]):
    def __init__(self, spec: KernelSpec) -> None:
        super().__init__(spec)
        self._next_id = 0
        self._stdin: trio.abc.SendStream | None = None
        self._input_lock = trio.Lock()
        self._ready = trio.Event()
        self._pending_env: dict[str, str] = {}  # sandbox env vars that came while it started
        self._process: trio.Process | None = None

    # What a kernel provides.

    def argv(self) -> list[str]:
        """The kernel's command line; KernelStartError when its runtime is missing."""
        raise NotImplementedError

    def execute_request(self, request_id: str, code: str, env_vars: dict[str, str]) -> bytes:
        raise NotImplementedError

    def env_request(self, env_vars: dict[str, str]) -> bytes:
        """Sandbox env vars, for the rest of the kernel's life."""
        raise NotImplementedError

    def interrupt_request(self) -> bytes | None:
        """What stops a running cell, keeping the kernel's state; None: the kernel restarts instead."""
        return None

    def startup_env(self) -> dict[str, str]:
        """Env vars to send once the kernel is ready (its process environment has the rest)."""
        return {}

    def startup_request(self) -> bytes | None:
        """A request to send once the kernel is ready, before any execution."""
        return None

    def kernel_env(self, env: dict[str, str]) -> dict[str, str]:
        """The kernel process's environment (the spec's, by default)."""
        return env

    def reply_event(self, kind: str, message: dict[str, object]) -> dict[str, object]:
        """The /execute event of a `result` or `error` reply."""
        return {"type": kind, **message}

    async def interrupt(self, receive_channel: trio.MemoryReceiveChannel[Reply | None]) -> bool:
        """Stop the running cell, keeping the kernel's state; False if it did not end in time
        (or the kernel cannot interrupt): then it is restarted."""
        request = self.interrupt_request()
        if request is None or not self.alive:
            return False
        await self._send(request)
        return await self._wind_down(receive_channel)

    async def _wind_down(self, receive_channel: trio.MemoryReceiveChannel[Reply | None]) -> bool:
        with trio.move_on_after(INTERRUPT_GRACE_S):
            await self._relay(receive_channel, discard_event)
            return True
        return False

    # The protocol.

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        argv = self.argv()
        read_fd, write_fd = os.pipe()
        if self.spec.user.needs_switch():
            # The kernel's user owns its end: a kernel may reopen it by path (/proc/self/fd/N is how
            # Java opens an inherited descriptor), and a pipe's inode otherwise is root's, mode 0600.
            os.fchown(write_fd, self.spec.user.uid, self.spec.user.gid)
        process: trio.Process | None = None
        try:
            with self.cancel_scope:
                try:
                    env = {
                        **self.kernel_env(dict(self.spec.env)),
                        "CUBE_REPLY_FD": str(write_fd),
                        "CUBE_LANGUAGE": self.language,
                    }
                    self._process = process = await spawn_kernel_process(
                        argv,
                        dataclasses.replace(self.spec, env=env),
                        stdin=subprocess.PIPE,
                        pass_fds=(write_fd,),
                    )
                finally:
                    os.close(write_fd)
                self._stdin = process.stdin
                replies = trio.lowlevel.FdStream(read_fd)
                read_fd = -1
                async with replies, trio.open_nursery() as nursery:
                    nursery.start_soon(self._route, replies)
                    with trio.move_on_after(KERNEL_START_TIMEOUT_S):
                        await self._ready.wait()
                    if not self._ready.is_set():
                        raise KernelStartError(f"the {self.language} kernel did not start")
                    if startup := self.startup_request():
                        await self._send(startup)  # may be long: sent whole before anything else
                    self.alive = True
                    if env_vars := {**self.startup_env(), **self._pending_env}:
                        self._pending_env.clear()
                        self.update_env(env_vars)
                    task_status.started()
                    await process.wait()
                    nursery.cancel_scope.cancel()
        finally:
            if read_fd >= 0:
                os.close(read_fd)
            await self._reap(process)

    async def _route(self, replies: trio.lowlevel.FdStream) -> None:
        buffer = b""
        while True:
            chunk = await replies.receive_some(64 * 1024)
            if not chunk:
                if not self._ready.is_set():
                    raise KernelStartError(f"the {self.language} kernel exited while starting")
                # The pipe closed: the kernel is gone (the next execution must not pick it, even
                # before `run` has reaped its process).
                self.alive = False
                self._notify_died()
                return
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in lines:
                message = _reply(line)
                if message is None:
                    continue
                if message["type"] == "ready":
                    self._ready.set()
                self._deliver(message.get("id"), message)

    async def _send(self, request: bytes) -> None:
        assert self._stdin is not None
        async with self._input_lock:
            try:
                await self._stdin.send_all(request)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the kernel died: the reply router reports it
        if self.alive and self._pending_env:
            env_vars, self._pending_env = self._pending_env, {}
            self.update_env(env_vars)

    def update_env(self, env_vars: dict[str, str]) -> None:
        if not self.alive or self._input_lock.locked():
            # Sent once the kernel is ready, or after the request being written (a long cell
            # may take several writes: a line of ours must not land inside it).
            self._pending_env.update(env_vars)
            return
        self._send_now(self.env_request(env_vars))

    def _send_now(self, request: bytes) -> None:
        """A short request, in order: a write of one short line to a pipe does not block, so no task."""
        stdin = self._stdin
        assert isinstance(stdin, trio.lowlevel.FdStream)  # trio's pipes on Linux
        try:
            os.write(stdin.fileno(), request)
        except OSError:
            pass  # the kernel died: the reply router reports it

    async def execute(self, code: str, env_vars: dict[str, str], emit: Emit) -> None:
        self._next_id += 1
        request_id = str(self._next_id)
        receive_channel = self._wait_for(request_id)
        try:
            await self._send(self.execute_request(request_id, code, env_vars))
            await self._relay(receive_channel, emit)
        except (trio.Cancelled, ClientGone):
            with trio.CancelScope(shield=True):
                await self._interrupt(receive_channel)
            raise
        finally:
            self._stop_waiting(request_id)

    async def _interrupt(self, receive_channel: trio.MemoryReceiveChannel[Reply | None]) -> None:
        """The client is gone: stop its cell, keeping the kernel's state if the cell ends in time;
        otherwise (a kernel that cannot interrupt, or a cell deaf to it) restart the kernel rather
        than leave the context blocked behind it."""
        if not await self.interrupt(receive_channel):
            self.stop()

    async def _relay(self, receive_channel: trio.MemoryReceiveChannel[Reply | None], emit: Emit) -> None:
        """Turn the kernel's replies for one execution into /execute events, up to its `done`."""
        while True:
            message = await receive_channel.receive()
            if message is None:
                await emit(died_event(self.language))
                return
            kind = message.pop("type")
            message.pop("id", None)
            if kind in ("stdout", "stderr"):
                await emit(output_event(str(kind), str(message.get("text", ""))))
            elif kind == "done":
                await emit({"type": "number_of_executions", **message})
                return
            else:
                await emit(self.reply_event(str(kind), message))
