"""JavaScript contexts: a small kernel of our own (node_kernel.js) on the guest's Node.js."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import trio

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
)

SCRIPT = Path(__file__).with_name("node_kernel.js")
Reply = dict[str, object]  # one JSON line of node_kernel.js


class NodeKernel(Kernel[Reply]):
    language = "javascript"

    def __init__(self, spec: KernelSpec) -> None:
        super().__init__(spec)
        self._next_id = 0
        self._stdin: trio.abc.SendStream | None = None
        self._input_lock = trio.Lock()
        self._ready = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        node = shutil.which("node") or shutil.which("nodejs")
        if node is None:
            raise KernelStartError("Node.js is not installed")
        read_fd, write_fd = os.pipe()
        process: trio.Process | None = None
        try:
            with self.cancel_scope:
                try:
                    env = {**self.spec.env, "CUBE_REPLY_FD": str(write_fd)}
                    process = await spawn_kernel_process(
                        [node, str(SCRIPT)],
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
                        raise KernelStartError("the JavaScript kernel did not start")
                    self.alive = True
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
                    raise KernelStartError("the JavaScript kernel exited while starting")
                self._notify_died()  # the pipe closed: the kernel is gone
                return
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in lines:
                message = json.loads(line)
                if message.get("type") == "ready":
                    self._ready.set()
                self._deliver(message.get("id"), message)

    async def _send(self, request: dict[str, object]) -> None:
        assert self._stdin is not None
        async with self._input_lock:
            try:
                await self._stdin.send_all((json.dumps(request) + "\n").encode())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the kernel died: the reply router reports it

    def update_env(self, env_vars: dict[str, str]) -> None:
        if self.alive:
            # A write of one short line to a pipe does not block; ordering matters, so no task.
            stdin = self._stdin
            assert isinstance(stdin, trio.lowlevel.FdStream)  # trio's pipes on Linux
            os.write(stdin.fileno(), (json.dumps({"type": "env", "vars": env_vars}) + "\n").encode())

    async def execute(self, code: str, env_vars: dict[str, str], emit: Emit) -> None:
        self._next_id += 1
        request_id = self._next_id
        receive_channel = self._wait_for(request_id)
        try:
            await self._send({"type": "execute", "id": request_id, "code": code, "env": env_vars})
            await self._relay(receive_channel, emit)
        except (trio.Cancelled, ClientGone):
            # A synchronous JavaScript loop cannot be interrupted: restart the kernel instead
            # (its state is lost) rather than leave the context blocked behind it.
            self.stop()
            raise
        finally:
            self._stop_waiting(request_id)

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
                await emit({"type": kind, **message})
