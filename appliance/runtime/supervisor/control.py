"""The control socket's server side, shared by every kind of guest owner: the uml supervisor
(server.py) and the kvm VMM process (runtime/kvm/vmm.py).

`ControlServer` serves protocol.py's requests on a listening unix socket: root only
(SO_PEERCRED, on top of the control directory's 0700), at most MAX_CONNECTIONS at once,
one request per connection, `watch` streaming the state after every `_notify()`. What a
request does to the guest is the owner's: `state`, `pause_or_resume`, `console_tail`,
`metrics` and `snapshot`, which subclasses define. `kill_requested` is set by a `kill`;
`ended` must be set by the owner once its guest is gone and `state()` carries its exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from appliance.runtime.supervisor.framing import LineBuffer, receive_line, send_all
from appliance.runtime.supervisor.guest import first_of
from appliance.runtime.supervisor.protocol import (
    MAX_REQUEST_BYTES,
    GuestState,
    Op,
    ProtocolError,
    Reply,
    Request,
)

if TYPE_CHECKING:
    from appliance.runtime.uml.console import ConsoleLog

log = logging.getLogger("cube.supervisor")

MAX_CONNECTIONS = 8  # at once; the service holds one (its watch) plus short requests
# How long a connection over MAX_CONNECTIONS waits for a slot before it is refused: a watcher
# that just went away (a service restarting) frees its slot a moment after its close.
SLOT_WAIT_S = 2.0
# Connections waiting to be accepted. Above MAX_CONNECTIONS so that a burst waits for a slot
# (or its refusal) instead of finding the backlog full: a non-blocking unix connect then fails
# with EAGAIN, which trio takes for a connect in progress, handing back a socket that never
# connected (SO_PEERCRED pid 0: the client would think the supervisor gone).
LISTEN_BACKLOG = 128
REQUEST_READ_TIMEOUT_S = 5.0
CONNECTIONS_DRAIN_S = 2.0  # after the guest ended: for watchers to read its exit, kills their answer
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlServer:
    def __init__(self) -> None:
        self.kill_requested = trio.Event()
        self.kill_reason = "killed by its owner"
        self.ended = trio.Event()  # the guest is gone and state() carries its exit
        self._changed = trio.Event()
        self._slots = trio.Semaphore(MAX_CONNECTIONS)

    # What the owner defines.

    def state(self) -> GuestState:
        raise NotImplementedError

    async def pause_or_resume(self, pause: bool) -> Reply:
        raise NotImplementedError

    def console_tail(self, max_bytes: int) -> str:
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        raise NotImplementedError

    async def snapshot(self) -> Reply:
        return Reply.failed("this guest cannot be snapshotted")

    async def attach_disk(self, slot: int) -> Reply:
        return Reply.failed("this guest takes no disk through its supervisor")

    # What the owner calls.

    async def announce_console(
        self, console: ConsoleLog, ended: trio.Event, on_first_output: Callable[[], None] | None = None
    ) -> None:
        """Tell watchers as the guest shows signs of life (its console's first output and ready
        lines: what the service waits on to probe and hand out a cold-booted guest), until
        `ended`. `on_first_output`: called once its kernel runs."""
        for event in (console.first_output, console.ready, console.interpreter_ready):
            await first_of(event, ended)
            if ended.is_set():
                return
            if event is console.first_output and on_first_output is not None:
                on_first_output()
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def drain_connections(self) -> None:
        """Once the guest has ended: watchers read its exit, a `kill` gets its answer; a
        connection that says nothing is not waited for long."""
        with trio.move_on_after(CONNECTIONS_DRAIN_S):
            while self._slots.value < MAX_CONNECTIONS:
                await trio.sleep(0.01)

    async def serve_control(self, listener: trio.socket.SocketType) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                connection, _ = await listener.accept()
                nursery.start_soon(self._admit, connection)

    # Serving.

    async def _admit(self, connection: trio.socket.SocketType) -> None:
        """Serve the connection once a slot is free; refuse it if none frees up in time."""
        admitted = False
        with trio.move_on_after(SLOT_WAIT_S):
            await self._slots.acquire()
            admitted = True
        if not admitted:
            with connection, trio.move_on_after(1):
                try:
                    await connection.send(Reply.failed("too many connections").encode())
                except OSError:
                    pass  # it did not wait for the answer; nothing here may end the owner
            return
        try:
            await self._serve_connection(connection)
        finally:
            self._slots.release()

    async def _serve_connection(self, connection: trio.socket.SocketType) -> None:
        try:
            with connection:
                _pid, uid, _gid = _PEERCRED.unpack(
                    connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
                )
                if uid != 0:
                    log.warning("refused a connection from uid %d", uid)
                    await connection.send(Reply.failed("permission denied: root only").encode())
                    return
                try:
                    with trio.fail_after(REQUEST_READ_TIMEOUT_S):
                        request = await _read_request(connection)
                except (ProtocolError, trio.TooSlowError) as exc:
                    await connection.send(Reply.failed(f"bad request: {str(exc) or 'too slow'}").encode())
                    return
                await self._answer(connection, request)
        except OSError:
            pass  # the client went away

    async def _answer(self, connection: trio.socket.SocketType, request: Request) -> None:
        op = request.op
        if op is Op.WATCH:
            await self._watch(connection)
            return
        if op is Op.KILL:
            self.kill_requested.set()
            await self.ended.wait()
            reply = Reply(ok=True, state=self.state())
        elif op in (Op.PAUSE, Op.RESUME):
            reply = await self.pause_or_resume(op is Op.PAUSE)
        elif op is Op.SNAPSHOT:
            reply = await self.snapshot()
        elif op is Op.ATTACH_DISK:
            reply = await self.attach_disk(request.slot)
        elif op is Op.CONSOLE:
            reply = Reply(ok=True, console=self.console_tail(request.max_bytes))
        elif op is Op.METRICS:
            reply = Reply(ok=True, metrics=self.metrics())
        else:
            reply = Reply(ok=True, state=self.state())
        await send_all(connection, reply.encode())

    async def _watch(self, connection: trio.socket.SocketType) -> None:
        """Send the state now and after every change until the guest has ended, or until the
        watcher goes away (a service that died: its connection must not hold a slot)."""
        async with trio.open_nursery() as nursery:

            async def until_the_watcher_leaves() -> None:
                try:
                    while await connection.recv(MAX_REQUEST_BYTES):
                        pass  # a watcher has nothing more to say
                except OSError:
                    pass  # reset: it left with states unread (a service that died)
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_the_watcher_leaves)
            # OSErrors are caught here, inside the nursery: out of it they come as an
            # ExceptionGroup, which _serve_connection's `except OSError` does not catch, and that
            # would end the owner (and its guest) for one watcher that went away.
            try:
                while True:
                    changed = self._changed
                    state = self.state()
                    await send_all(connection, Reply(ok=True, state=state).encode())
                    if state.exit is not None:
                        break
                    await changed.wait()
            except OSError:
                pass  # the watcher went away
            nursery.cancel_scope.cancel()


async def _read_request(connection: trio.socket.SocketType) -> Request:
    line = await receive_line(connection, LineBuffer(MAX_REQUEST_BYTES))
    if line is None:
        raise ProtocolError("the request ended before its newline")
    return Request.decode(line)


def open_listener(path: str) -> trio.socket.SocketType:
    """A listening unix socket at `path`, 0600 from its first moment. Bound here, in this thread
    (trio's own bind would use a worker thread: the VMM must have none before it drops root)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old = os.umask(0o177)
        try:
            listener.bind(path)
        finally:
            os.umask(old)
        listener.listen(LISTEN_BACKLOG)
    except BaseException:
        listener.close()
        raise
    return trio.socket.from_stdlib_socket(listener)
