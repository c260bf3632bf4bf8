"""vhost-user backend (the "slave" side of QEMU's docs/interop/vhost-user.rst).

Serves one VirtioDevice to one frontend connection: feature negotiation, the
memory table, vring set-up, kick fds (watched by Trio tasks) and call fds
(written to interrupt the driver). What UML's virtio_uml needs, measured on
Debian's 6.1 UML: the SLAVE_REQ protocol feature offered (else its probe fails),
REPLY_ACK honoured, config space through GET_CONFIG, and call "fds" that are
socketpairs, so an interrupt is an 8-byte write and never an eventfd-only call.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from appliance.runtime.virtio.device import VirtioDevice
from appliance.runtime.virtio.queue import Queue
from appliance.runtime.virtio.vhost_user.memory import FrontendMemory

GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
SET_SLAVE_REQ_FD = 21
GET_CONFIG = 24
SET_CONFIG = 25

FLAG_VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
F_PROTOCOL_FEATURES = 1 << 30
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_SLAVE_REQ = 1 << 5
PROTOCOL_F_CONFIG = 1 << 9
OFFERED_PROTOCOL_FEATURES = PROTOCOL_F_MQ | PROTOCOL_F_REPLY_ACK | PROTOCOL_F_SLAVE_REQ | PROTOCOL_F_CONFIG
VRING_NOFD = 1 << 8
VRING_INDEX_MASK = 0xFF
HEADER = struct.Struct("<III")
MAX_FDS = 8


class ProtocolError(Exception):
    pass


@dataclass
class _Vring:
    queue: Queue
    kick_fd: int = -1
    call_fd: int = -1
    enabled: bool = False
    kicks: int = 0


@dataclass
class _Session:
    vrings: list[_Vring]
    memory: FrontendMemory | None = None
    protocol_features: int = 0
    slave_fd: int = -1
    watchers: dict[int, trio.CancelScope] = field(default_factory=dict)
    io_nursery: trio.Nursery = field(init=False)


@dataclass
class _Message:
    """One frontend request being handled: what its handler reads and the fds it may keep."""

    session: _Session
    nursery: trio.Nursery
    request: int
    payload: bytes
    fds: list[int]


class VhostUserBackend:
    def __init__(self, device: VirtioDevice, socket_path: Path) -> None:
        self.device = device
        self.socket_path = socket_path
        self.messages_handled = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on `socket_path`, serve one frontend until it disconnects, then return."""
        listener = self.listen()
        task_status.started()
        await self.serve_listener(listener)

    def listen(self) -> trio.socket.SocketType:
        """Bind and listen on `socket_path` now: a frontend may connect before anyone accepts."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.socket_path))
            sock.listen(1)
        except BaseException:
            sock.close()
            raise
        return trio.socket.from_stdlib_socket(sock)

    async def serve_listener(self, listener: trio.socket.SocketType) -> None:
        """Serve one frontend from `listener` (closed, its path removed, once one connects)."""
        try:
            connection, _ = await listener.accept()
        finally:
            listener.close()
            self.socket_path.unlink(missing_ok=True)
        with connection:
            await self._serve_connection(connection)

    async def _serve_connection(self, connection: trio.socket.SocketType) -> None:
        session = _Session([_Vring(Queue(size)) for size in self.device.queue_max_sizes])
        try:
            async with trio.open_nursery() as nursery:
                session.io_nursery = nursery
                while True:
                    message = await _receive(connection)
                    if message is None:
                        break
                    request, flags, payload, fds = message
                    reply = self._handle(session, nursery, request, payload, fds)
                    self.messages_handled += 1
                    if (
                        reply is None
                        and flags & FLAG_NEED_REPLY
                        and session.protocol_features & PROTOCOL_F_REPLY_ACK
                    ):
                        reply = struct.pack("<Q", 0)
                    if reply is not None:
                        await _send_all(
                            connection, HEADER.pack(request, FLAG_VERSION | FLAG_REPLY, len(reply)) + reply
                        )
                nursery.cancel_scope.cancel()
        finally:
            self.device.reset()
            for vring in session.vrings:
                for fd in (vring.kick_fd, vring.call_fd):
                    if fd >= 0:
                        os.close(fd)
            if session.slave_fd >= 0:
                os.close(session.slave_fd)
            if session.memory is not None:
                session.memory.close()

    def _handle(
        self, s: _Session, nursery: trio.Nursery, request: int, payload: bytes, fds: list[int]
    ) -> bytes | None:
        """Carry out one frontend message; its reply, if the request has one.

        Handlers take the fds they keep out of `fds`; the rest are closed here.
        """
        handler = _HANDLERS.get(request)
        try:
            return handler(self, _Message(s, nursery, request, payload, fds)) if handler else None
        finally:
            for fd in fds:  # fds of messages that do not keep them
                os.close(fd)

    def _get_features(self, m: _Message) -> bytes:
        return struct.pack("<Q", self.device.available_features() | F_PROTOCOL_FEATURES)

    def _set_features(self, m: _Message) -> None:
        self.device.ack_features(struct.unpack_from("<Q", m.payload)[0] & ~F_PROTOCOL_FEATURES)

    def _get_protocol_features(self, m: _Message) -> bytes:
        return struct.pack("<Q", OFFERED_PROTOCOL_FEATURES)

    def _set_protocol_features(self, m: _Message) -> None:
        m.session.protocol_features = struct.unpack_from("<Q", m.payload)[0] & OFFERED_PROTOCOL_FEATURES

    def _get_queue_num(self, m: _Message) -> bytes:
        return struct.pack("<Q", len(m.session.vrings))

    def _reset(self, m: _Message) -> None:
        self.device.reset()

    def _set_mem_table(self, m: _Message) -> None:
        s = m.session
        table_fds = m.fds[:]
        m.fds.clear()  # the memory table owns them now (it closes any it does not keep)
        previous, s.memory = s.memory, FrontendMemory.from_table(m.payload, table_fds)
        if self.device.active:
            self.device.memory = s.memory  # a running device follows the new table
        if previous is not None:
            previous.close()

    def _set_vring_number(self, m: _Message) -> None:
        index, number = struct.unpack_from("<II", m.payload)
        vring = m.session.vrings[index]
        if m.request == SET_VRING_NUM:
            vring.queue.state.size = number
        elif m.request == SET_VRING_BASE:
            vring.queue.state.next_avail = vring.queue.state.next_used = number
        else:
            vring.enabled = bool(number)

    def _set_vring_addr(self, m: _Message) -> None:
        memory = m.session.memory
        if memory is None:
            raise ProtocolError("SET_VRING_ADDR before SET_MEM_TABLE")
        index, _flags, desc, used, avail, _log = struct.unpack_from("<IIQQQQ", m.payload)
        q = m.session.vrings[index].queue.state
        q.desc_table = memory.user_to_guest(desc)
        q.used_ring = memory.user_to_guest(used)
        q.avail_ring = memory.user_to_guest(avail)
        q.ready = True

    def _get_vring_base(self, m: _Message) -> bytes:
        index = struct.unpack_from("<I", m.payload)[0]
        vring = m.session.vrings[index]
        if index in m.session.watchers:
            m.session.watchers.pop(index).cancel()
        vring.enabled = False
        return struct.pack("<II", index, vring.queue.state.next_avail)

    def _set_vring_fd(self, m: _Message) -> None:
        value = struct.unpack_from("<Q", m.payload)[0]
        index = value & VRING_INDEX_MASK
        vring = m.session.vrings[index]
        fd = -1 if value & VRING_NOFD or not m.fds else m.fds.pop(0)
        if m.request == SET_VRING_ERR:
            if fd >= 0:
                os.close(fd)  # errors are never reported through it
        elif m.request == SET_VRING_CALL:
            if vring.call_fd >= 0:
                os.close(vring.call_fd)
            vring.call_fd = fd
            if fd >= 0:
                os.set_blocking(fd, False)
        else:
            self._set_vring_kick(m, index, fd)

    def _set_vring_kick(self, m: _Message, index: int, fd: int) -> None:
        s, vring = m.session, m.session.vrings[index]
        if index in s.watchers:
            s.watchers.pop(index).cancel()
        if vring.kick_fd >= 0:
            os.close(vring.kick_fd)
        vring.kick_fd = fd
        if fd < 0:
            return
        os.set_blocking(fd, False)
        if not s.protocol_features:
            vring.enabled = True  # without protocol features a kick fd starts the ring
        scope = trio.CancelScope()
        s.watchers[index] = scope
        m.nursery.start_soon(self._watch_kicks, s, index, scope)

    def _set_slave_req_fd(self, m: _Message) -> None:
        # Kept open for the session: the frontend treats a closed channel as an error.
        m.session.slave_fd = m.fds.pop(0) if m.fds else -1

    def _get_config(self, m: _Message) -> bytes:
        offset, size, flags = struct.unpack_from("<III", m.payload)
        config = self.device.config_space()[offset : offset + size].ljust(size, b"\0")
        return struct.pack("<III", offset, size, flags) + config

    def _set_config(self, m: _Message) -> None:
        offset, size, _flags = struct.unpack_from("<III", m.payload)
        self.device.write_config(offset, m.payload[12 : 12 + size])

    def _interrupt(self, s: _Session, index: int) -> None:
        fd = s.vrings[index].call_fd
        if fd < 0:
            return
        try:
            os.write(fd, struct.pack("<Q", 1))
        except BlockingIOError:
            pass  # the frontend has unread notifications: one more changes nothing
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise

    async def _watch_kicks(self, s: _Session, index: int, scope: trio.CancelScope) -> None:
        vring = s.vrings[index]
        fd = vring.kick_fd
        with scope:
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    os.read(fd, 8)
                except BlockingIOError:
                    continue
                vring.kicks += 1
                if not vring.enabled or s.memory is None:
                    continue
                if not self.device.active:
                    self.device.activate(
                        s.memory, [v.queue for v in s.vrings], lambda i: self._interrupt(s, i)
                    )
                    s.io_nursery.start_soon(self.device.run_io)
                self.device.process_queue(index)
                # A throttled device asks to be called again once its bucket refills.
                while (retry := self.device.retry_after) is not None:
                    await trio.sleep(retry)
                    self.device.process_queue(index)


async def _receive(connection: trio.socket.SocketType) -> tuple[int, int, bytes, list[int]] | None:
    fds = array.array("i")
    header, ancillary, _flags, _addr = await connection.recvmsg(HEADER.size, socket.CMSG_SPACE(MAX_FDS * 4))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if not header:
        for fd in fds:
            os.close(fd)
        return None
    while len(header) < HEADER.size:
        more = await connection.recv(HEADER.size - len(header))
        if not more:
            raise ProtocolError("connection closed inside a message header")
        header += more
    request, flags, size = HEADER.unpack(header)
    payload = b""
    while len(payload) < size:
        more = await connection.recv(size - len(payload))
        if not more:
            raise ProtocolError("connection closed inside a message payload")
        payload += more
    return request, flags, payload, list(fds)


async def _send_all(connection: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await connection.send(view)
        view = view[sent:]


# The request table (the vhost-user spec's message types this backend serves); others are
# acknowledged and ignored, as the spec allows for what a backend did not offer.
_HANDLERS: dict[int, Callable[[VhostUserBackend, _Message], bytes | None]] = {
    GET_FEATURES: VhostUserBackend._get_features,
    SET_FEATURES: VhostUserBackend._set_features,
    GET_PROTOCOL_FEATURES: VhostUserBackend._get_protocol_features,
    SET_PROTOCOL_FEATURES: VhostUserBackend._set_protocol_features,
    GET_QUEUE_NUM: VhostUserBackend._get_queue_num,
    SET_OWNER: VhostUserBackend._reset,
    RESET_OWNER: VhostUserBackend._reset,
    SET_MEM_TABLE: VhostUserBackend._set_mem_table,
    SET_VRING_NUM: VhostUserBackend._set_vring_number,
    SET_VRING_BASE: VhostUserBackend._set_vring_number,
    SET_VRING_ENABLE: VhostUserBackend._set_vring_number,
    SET_VRING_ADDR: VhostUserBackend._set_vring_addr,
    GET_VRING_BASE: VhostUserBackend._get_vring_base,
    SET_VRING_KICK: VhostUserBackend._set_vring_fd,
    SET_VRING_CALL: VhostUserBackend._set_vring_fd,
    SET_VRING_ERR: VhostUserBackend._set_vring_fd,
    SET_SLAVE_REQ_FD: VhostUserBackend._set_slave_req_fd,
    GET_CONFIG: VhostUserBackend._get_config,
    SET_CONFIG: VhostUserBackend._set_config,
}
