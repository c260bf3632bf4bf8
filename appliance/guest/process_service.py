"""`process.Process`: start commands (pipes or a real PTY), stream their output, feed stdin, signal.

Every process gets its own session and process group, so a signal reaches everything it
spawned. A process belongs to the service's nursery, not to the request that started it:
a `Start` stream may disconnect (background commands) and `Connect` picks it up again.
Only the `Start` deadline (`Connect-Timeout-Ms`) kills it, because the SDK's command
timeout covers the whole command.
"""

from __future__ import annotations

import base64
import binascii
import errno
import fcntl
import os
import signal
import struct
import subprocess
import termios
from collections.abc import AsyncIterator

import trio

from appliance.guest.connect import CallContext, ConnectError, Message, Router, Send
from appliance.guest.spawn import identity_options
from appliance.guest.state import AgentState

READ_SIZE = 64 * 1024
# After the process exits, output still in flight is read until the pipes stay quiet this long
# (a grandchild holding the pipe open must not keep the command "running").
DRAIN_IDLE_S = 0.05
SUBSCRIBER_BUFFER = 256
SIGNALS: dict[object, int] = {
    "SIGNAL_SIGKILL": signal.SIGKILL,
    "SIGNAL_SIGTERM": signal.SIGTERM,
    9: signal.SIGKILL,
    15: signal.SIGTERM,
}
# Go's ProcessState.String() wording, which envd reports as `status`.
SIGNAL_WORDS = {
    signal.SIGKILL: "killed",
    signal.SIGTERM: "terminated",
    signal.SIGINT: "interrupt",
    signal.SIGHUP: "hangup",
    signal.SIGPIPE: "broken pipe",
}


def decode_bytes(value: object) -> bytes:
    """proto3 JSON bytes: standard or URL-safe base64, padding optional."""
    if not isinstance(value, str):
        raise ConnectError("invalid_argument", "bytes field must be a base64 string")
    text = value.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:
        raise ConnectError("invalid_argument", f"invalid base64: {exc}") from exc


def encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _take_controlling_terminal() -> None:
    """Runs in the child after setsid(): make the PTY on stdin its controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _set_window_size(fd: int, size: object) -> None:
    if not isinstance(size, dict):
        raise ConnectError("invalid_argument", "pty.size must be an object")
    rows, cols = int(size.get("rows") or 24), int(size.get("cols") or 80)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class ManagedProcess:
    """One started process: its output is broadcast to every subscribed stream."""

    def __init__(
        self,
        process: trio.Process,
        config: Message,
        tag: str | None,
        pty: trio.lowlevel.FdStream | None,
        pty_fd: int | None,
    ) -> None:
        self.process = process
        self.pid = process.pid
        self.config = config
        self.tag = tag
        self.pty = pty
        self.pty_fd = pty_fd
        self.stdin = process.stdin
        self._subscribers: set[trio.MemorySendChannel[Message]] = set()
        self._input_lock = trio.Lock()
        self._open_outputs = 0
        self._output_seen = 0
        self._outputs_closed = trio.Event()
        self._delivering = 0
        self._ended = False

    def info(self) -> Message:
        info: Message = {"config": self.config, "pid": self.pid}
        if self.tag is not None:
            info["tag"] = self.tag
        return info

    def subscribe(self) -> trio.MemoryReceiveChannel[Message]:
        if self._ended:
            raise ConnectError("not_found", f"process with pid {self.pid} has ended")
        send_channel, receive_channel = trio.open_memory_channel[Message](SUBSCRIBER_BUFFER)
        self._subscribers.add(send_channel)
        return receive_channel

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            raise ConnectError("permission_denied", str(exc)) from exc

    async def write_input(self, data: bytes, to_pty: bool) -> None:
        async with self._input_lock:
            try:
                if to_pty:
                    if self.pty is None:
                        raise ConnectError("failed_precondition", "process has no PTY")
                    await self.pty.send_all(data)
                else:
                    if self.stdin is None:
                        raise ConnectError("failed_precondition", "stdin is not enabled or already closed")
                    await self.stdin.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectError("failed_precondition", f"input is closed: {exc}") from exc

    async def close_stdin(self) -> None:
        async with self._input_lock:
            if self.pty is not None:
                await self.pty.send_all(b"\x04")  # a terminal's end of input is ^D
            elif self.stdin is not None:
                stdin, self.stdin = self.stdin, None
                await stdin.aclose()

    def resize(self, size: object) -> None:
        if self.pty_fd is None:
            raise ConnectError("failed_precondition", "process has no PTY")
        _set_window_size(self.pty_fd, size)

    async def run(self) -> None:
        """Pump output until the process has exited and its output is drained, then end."""
        try:
            async with trio.open_nursery() as readers:
                if self.pty is not None:
                    outputs: list[tuple[trio.abc.ReceiveStream, str]] = [(self.pty, "pty")]
                else:
                    assert self.process.stdout is not None and self.process.stderr is not None
                    outputs = [(self.process.stdout, "stdout"), (self.process.stderr, "stderr")]
                self._open_outputs = len(outputs)
                for stream, kind in outputs:
                    readers.start_soon(self._pump, stream, kind)
                await self.process.wait()
                while self._open_outputs:
                    seen = self._output_seen
                    with trio.move_on_after(DRAIN_IDLE_S):
                        await self._outputs_closed.wait()
                    # Quiet pipes end it; a reader still handing a chunk to a slow client does not.
                    if seen == self._output_seen and not self._delivering:
                        break
                readers.cancel_scope.cancel()
            await self._broadcast({"event": {"end": self._end_event()}})
        finally:
            self._ended = True
            if self.process.returncode is None:
                self.signal_group(signal.SIGKILL)
            for channel in self._subscribers:
                channel.close()
            self._subscribers.clear()
            with trio.CancelScope(shield=True):
                streams: tuple[trio.abc.AsyncResource | None, ...] = (
                    self.pty,
                    self.stdin,
                    self.process.stdout,
                    self.process.stderr,
                )
                for resource in streams:
                    if resource is not None:
                        await resource.aclose()

    def _end_event(self) -> Message:
        """envd's end event; like Go's cmd.Wait(), an unsuccessful end also carries an error text."""
        code = self.process.returncode
        assert code is not None
        if code == 0:
            return {"exitCode": 0, "exited": True, "status": "exit status 0"}
        if code > 0:
            status = f"exit status {code}"
            return {"exitCode": code, "exited": True, "status": status, "error": status}
        try:
            word = SIGNAL_WORDS.get(signal.Signals(-code), signal.Signals(-code).name)
        except ValueError:
            word = str(-code)
        status = f"signal: {word}"
        return {"exitCode": -1, "exited": False, "status": status, "error": status}

    async def _pump(self, stream: trio.abc.ReceiveStream, kind: str) -> None:
        try:
            while True:
                try:
                    chunk = await stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # a PTY master reads EIO once every slave is closed: that is its EOF
                if not chunk:
                    return
                self._output_seen += 1
                self._delivering += 1
                try:
                    await self._broadcast({"event": {"data": {kind: encode_bytes(bytes(chunk))}}})
                finally:
                    self._delivering -= 1
        finally:
            self._open_outputs -= 1
            if not self._open_outputs:
                self._outputs_closed.set()

    async def _broadcast(self, event: Message) -> None:
        for channel in list(self._subscribers):
            try:
                await channel.send(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(channel)


class ProcessService:
    def __init__(self, state: AgentState, nursery: trio.Nursery) -> None:
        self._state = state
        self._nursery = nursery
        self._processes: dict[int, ManagedProcess] = {}

    def register(self, router: Router) -> None:
        prefix = "/process.Process/"
        keepalive: Message = {"event": {"keepalive": {}}}
        router.server_streams[prefix + "Start"] = (self.start, keepalive)
        router.server_streams[prefix + "Connect"] = (self.connect, keepalive)
        router.client_streams[prefix + "StreamInput"] = self.stream_input
        router.unary[prefix + "List"] = self.list
        router.unary[prefix + "SendInput"] = self.send_input
        router.unary[prefix + "SendSignal"] = self.send_signal
        router.unary[prefix + "Update"] = self.update
        router.unary[prefix + "CloseStdin"] = self.close_stdin

    def kill_all(self) -> None:
        for managed in list(self._processes.values()):
            managed.signal_group(signal.SIGKILL)

    def _find(self, selector: object) -> ManagedProcess:
        if not isinstance(selector, dict):
            raise ConnectError("invalid_argument", "missing process selector")
        if "pid" in selector:
            try:
                managed = self._processes.get(int(selector["pid"]))  # type: ignore[arg-type]
            except (TypeError, ValueError) as exc:
                raise ConnectError("invalid_argument", "pid must be a number") from exc
            if managed is not None:
                return managed
            raise ConnectError("not_found", f"process with pid {selector['pid']} not found")
        if "tag" in selector:
            for managed in self._processes.values():
                if managed.tag == selector["tag"]:
                    return managed
            raise ConnectError("not_found", f"process with tag {selector['tag']} not found")
        raise ConnectError("invalid_argument", "process selector needs pid or tag")

    async def start(self, context: CallContext, message: Message, send: Send) -> None:
        config = message.get("process")
        if not isinstance(config, dict) or not isinstance(config.get("cmd"), str) or not config["cmd"]:
            raise ConnectError("invalid_argument", "process.cmd is required")
        args = [str(arg) for arg in config.get("args") or []]
        envs = {str(k): str(v) for k, v in (config.get("envs") or {}).items()}
        user = context.user
        cwd = config.get("cwd") or self._state.workdir(user)
        if not isinstance(cwd, str):
            raise ConnectError("invalid_argument", "cwd must be a string")
        if not os.path.isabs(cwd):
            cwd = os.path.join(user.home, cwd)
        if not os.path.isdir(cwd):
            raise ConnectError("invalid_argument", f"cwd '{cwd}' does not exist")
        pty_config = message.get("pty")
        stdin_enabled = message.get("stdin", True) is not False
        tag = message.get("tag")

        env = self._state.environment(user, envs)
        options: dict[str, object] = {"env": env, "cwd": cwd, "start_new_session": True}
        argv = [config["cmd"], *args]
        pty: trio.lowlevel.FdStream | None = None
        pty_fd: int | None = None
        try:
            if isinstance(pty_config, dict):
                env.setdefault("TERM", "xterm-256color")
                pty_fd, terminal_fd = os.openpty()
                try:
                    _set_window_size(terminal_fd, pty_config.get("size") or {})
                    # A preexec_fn forks anyway: CPython's own identity switch costs nothing more.
                    if user.needs_switch():
                        options.update(user=user.uid, group=user.gid, extra_groups=user.groups())
                    process = await trio.lowlevel.open_process(  # type: ignore[call-overload]
                        argv,
                        stdin=terminal_fd,
                        stdout=terminal_fd,
                        stderr=terminal_fd,
                        preexec_fn=_take_controlling_terminal,
                        **options,
                    )
                finally:
                    os.close(terminal_fd)
                pty = trio.lowlevel.FdStream(pty_fd)
            else:
                spawn_argv, identity = identity_options(user, argv)
                process = await trio.lowlevel.open_process(  # type: ignore[call-overload]
                    spawn_argv,
                    **identity,
                    stdin=subprocess.PIPE if stdin_enabled else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    **options,
                )
        except OSError as exc:
            if pty_fd is not None and pty is None:
                os.close(pty_fd)
            code = "permission_denied" if exc.errno in (errno.EACCES, errno.EPERM) else "invalid_argument"
            raise ConnectError(code, f"failed to start {config['cmd']}: {exc}") from exc

        record: Message = {"cmd": config["cmd"], "args": args, "envs": envs, "cwd": cwd}
        managed = ManagedProcess(process, record, tag if isinstance(tag, str) else None, pty, pty_fd)
        events = managed.subscribe()
        self._processes[managed.pid] = managed
        self._nursery.start_soon(self._supervise, managed)
        try:
            await self._follow(managed, events, send)
        finally:
            if context.deadline_passed():
                managed.signal_group(signal.SIGKILL)

    async def _supervise(self, managed: ManagedProcess) -> None:
        try:
            await managed.run()
        finally:
            self._processes.pop(managed.pid, None)

    async def _follow(
        self, managed: ManagedProcess, events: trio.MemoryReceiveChannel[Message], send: Send
    ) -> None:
        async with events:
            await send({"event": {"start": {"pid": managed.pid}}})
            async for event in events:
                await send(event)

    async def connect(self, context: CallContext, message: Message, send: Send) -> None:
        managed = self._find(message.get("process"))
        await self._follow(managed, managed.subscribe(), send)

    async def list(self, context: CallContext, message: Message) -> Message:
        return {"processes": [managed.info() for managed in self._processes.values()]}

    async def send_input(self, context: CallContext, message: Message) -> Message:
        managed = self._find(message.get("process"))
        await self._write(managed, message.get("input"))
        return {}

    async def _write(self, managed: ManagedProcess, process_input: object) -> None:
        if not isinstance(process_input, dict):
            raise ConnectError("invalid_argument", "missing input")
        if "pty" in process_input:
            await managed.write_input(decode_bytes(process_input["pty"]), to_pty=True)
        elif "stdin" in process_input:
            await managed.write_input(decode_bytes(process_input["stdin"]), to_pty=False)

    async def stream_input(self, context: CallContext, messages: AsyncIterator[Message]) -> Message:
        managed: ManagedProcess | None = None
        async for message in messages:
            if "start" in message:
                start = message["start"]
                managed = self._find(start.get("process") if isinstance(start, dict) else None)
            elif "data" in message:
                if managed is None:
                    raise ConnectError("failed_precondition", "the first message must be start")
                data = message["data"]
                await self._write(managed, data.get("input") if isinstance(data, dict) else None)
        return {}

    async def send_signal(self, context: CallContext, message: Message) -> Message:
        managed = self._find(message.get("process"))
        signum = SIGNALS.get(message.get("signal"))  # type: ignore[arg-type]
        if signum is None:
            raise ConnectError("invalid_argument", f"unsupported signal {message.get('signal')!r}")
        managed.signal_group(signum)
        return {}

    async def update(self, context: CallContext, message: Message) -> Message:
        managed = self._find(message.get("process"))
        pty = message.get("pty")
        if isinstance(pty, dict):
            managed.resize(pty.get("size") or {})
        return {}

    async def close_stdin(self, context: CallContext, message: Message) -> Message:
        managed = self._find(message.get("process"))
        await managed.close_stdin()
        return {}
