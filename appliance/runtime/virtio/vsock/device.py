"""virtio-vsock device with Firecracker's host side (docs/vsock.md there):

- guest connects to CID 2 port P → the device connects to the Unix socket `<uds_path>_P`;
- a host program connects to `<uds_path>`, writes `CONNECT <port>\\n`, and once the guest
  accepts reads `OK <host_port>\\n`; after that both are plain byte streams.

Flow control is virtio's credit scheme: we tell the guest how much we buffer
(buf_alloc) and how much we forwarded (fwd_cnt); we never send it more than its
own credit allows. Guest packets arrive on any thread (vCPU for mmio, Trio for
vhost-user) and are handled without blocking; the socket side (`run_io`) is Trio
tasks: a listener, and per connection a reader and a writer.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from appliance.runtime.virtio.device import (
    DEVICE_ID_VSOCK,
    VIRTIO_F_VERSION_1,
    DeviceState,
    VirtioDevice,
    state_from_json,
)
from appliance.runtime.virtio.queue import read_chain_bytes, write_chain_bytes
from appliance.runtime.virtio.vsock import packet as pkt
from appliance.runtime.virtio.vsock.metrics import VsockMetrics

RX, TX, EVENT = 0, 1, 2
QUEUE_SIZE = 256
HOST_CID = 2
BUF_ALLOC = 256 * 1024  # what we buffer per connection for guest→host data
MAX_RW_PAYLOAD = 64 * 1024
FIRST_HOST_PORT = 1 << 30  # local ports for host-initiated connections


def _wakeup_fd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _signal(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except OSError:
        pass  # closed already: the task it would wake is gone


async def _wait(fd: int) -> None:
    await trio.lowlevel.wait_readable(fd)
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


@dataclass
class VsockState(DeviceState):
    guest_cid: int  # the CID the guest's driver read
    metrics: VsockMetrics


@dataclass(eq=False)
class _Connection:
    local_port: int  # the host side's port, as the guest sees it
    peer_port: int  # the guest's port
    sock: socket.socket
    host_initiated: bool
    established: bool = False
    closed: bool = False
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0  # bytes sent to the guest
    fwd_cnt: int = 0  # guest bytes written to the socket
    fwd_cnt_told: int = 0  # fwd_cnt the guest last heard
    outbuf: bytearray = field(default_factory=bytearray)  # guest data for the socket
    greeting: bytearray = field(default_factory=bytearray)  # "OK <port>\n": ours, not in fwd_cnt
    peer_done_sending: bool = False  # the guest shut down its sending side
    host_write_shut: bool = False  # ...and we passed that on to the socket
    host_eof: bool = False  # the host program will send no more (we told the guest)
    wake_writer: int = field(default_factory=_wakeup_fd)
    wake_reader: int = field(default_factory=_wakeup_fd)

    def credit(self) -> int:
        return self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt)


class VirtioVsock(VirtioDevice):
    device_type = DEVICE_ID_VSOCK
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, guest_cid: int, uds_path: Path) -> None:
        super().__init__()
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.metrics = VsockMetrics()
        self._lock = threading.RLock()
        self._connections: dict[tuple[int, int], _Connection] = {}
        self._rx_pending: deque[bytes] = deque()
        self._new_connections: list[_Connection] = []
        self._changes = _wakeup_fd()
        self._next_host_port = FIRST_HOST_PORT

    def close(self) -> None:
        """Release the device's own fd (its connections are closed when `run_io` ends)."""
        if self._changes >= 0:
            os.close(self._changes)
            self._changes = -1

    def available_features(self) -> int:
        return VIRTIO_F_VERSION_1

    def config_space(self) -> bytes:
        return self.guest_cid.to_bytes(8, "little")

    # ---- guest → device -----------------------------------------------------------

    def process_queue(self, index: int) -> None:
        assert self.memory is not None
        if index == TX:
            queue = self.queues[TX]
            handled = False
            while (chain := queue.pop(self.memory)) is not None:
                data = read_chain_bytes(self.memory, chain.readable())
                if len(data) >= pkt.HEADER_SIZE:
                    header = pkt.Header.parse(data)
                    with self._lock:
                        self._from_guest(header, data[pkt.HEADER_SIZE : pkt.HEADER_SIZE + header.length])
                queue.add_used(self.memory, chain.head, 0)
                handled = True
            if handled:
                self.interrupt(TX)
        self._deliver()

    def _reply(self, to: pkt.Header, op: int, *, flags: int = 0, conn: _Connection | None = None) -> None:
        self._queue_packet(
            pkt.Header(
                HOST_CID,
                self.guest_cid,
                to.dst_port,
                to.src_port,
                0,
                pkt.TYPE_STREAM,
                op,
                flags,
                BUF_ALLOC,
                conn.fwd_cnt if conn else 0,
            )
        )
        if op == pkt.OP_RST:
            self.metrics.resets_sent += 1

    def _queue_packet(self, header: pkt.Header, payload: bytes = b"") -> None:
        self._rx_pending.append(header.pack() + payload)

    def _from_guest(self, h: pkt.Header, payload: bytes) -> None:
        if h.type != pkt.TYPE_STREAM or h.dst_cid != HOST_CID:
            self._reply(h, pkt.OP_RST)
            return
        key = (h.dst_port, h.src_port)
        conn = self._connections.get(key)
        if conn is not None:
            conn.peer_buf_alloc, conn.peer_fwd_cnt = h.buf_alloc, h.fwd_cnt
            _signal(conn.wake_reader)  # its credit may have grown
        if h.op == pkt.OP_REQUEST:
            if conn is not None:
                self._reply(h, pkt.OP_RST)
                return
            self._connect_for_guest(h)
        elif conn is None:
            if h.op != pkt.OP_RST:
                self._reply(h, pkt.OP_RST)
        elif h.op == pkt.OP_RESPONSE and conn.host_initiated and not conn.established:
            conn.established = True
            conn.greeting += f"OK {conn.local_port}\n".encode()
            _signal(conn.wake_writer)
        elif h.op == pkt.OP_RW:
            conn.outbuf += payload
            self.metrics.tx_bytes += len(payload)
            _signal(conn.wake_writer)
        elif h.op == pkt.OP_CREDIT_REQUEST:
            self._reply(h, pkt.OP_CREDIT_UPDATE, conn=conn)
            conn.fwd_cnt_told = conn.fwd_cnt
        elif h.op == pkt.OP_SHUTDOWN:
            # Data already queued is still written; the writer closes once both sides are done.
            conn.peer_done_sending = conn.peer_done_sending or bool(h.flags & pkt.SHUTDOWN_SEND)
            _signal(conn.wake_writer)
        elif h.op == pkt.OP_RST:
            self._close(conn)

    def _connect_for_guest(self, h: pkt.Header) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(f"{self.uds_path}_{h.dst_port}")
        except OSError:
            sock.close()
            self.metrics.connect_failures += 1
            self._reply(h, pkt.OP_RST)
            return
        sock.setblocking(False)
        conn = _Connection(h.dst_port, h.src_port, sock, host_initiated=False, established=True)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = h.buf_alloc, h.fwd_cnt
        self._connections[(conn.local_port, conn.peer_port)] = conn
        self._new_connections.append(conn)
        self.metrics.connections_from_guest += 1
        self._reply(h, pkt.OP_RESPONSE, conn=conn)
        _signal(self._changes)

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._connections.pop((conn.local_port, conn.peer_port), None)
        _signal(conn.wake_reader)
        _signal(conn.wake_writer)

    # ---- device → guest -----------------------------------------------------------

    def _deliver(self) -> None:
        """Move queued packets into the guest's rx buffers (any thread); while paused they
        stay queued until `catch_up`."""
        if self.memory is None or self.io_paused:
            return
        with self._lock:
            queue = self.queues[RX]
            delivered = False
            while self._rx_pending:
                chain = queue.pop(self.memory)
                if chain is None:
                    break
                data = self._rx_pending.popleft()
                capacity = sum(d.length for d in chain.writable())
                if len(data) > capacity:
                    # Linux posts 4 KiB rx buffers: split a long RW into packets that fit.
                    data, rest = self._split(data, capacity)
                    self._rx_pending.appendleft(rest)
                written = write_chain_bytes(self.memory, chain.writable(), data)
                queue.add_used(self.memory, chain.head, written)
                delivered = True
            if delivered:
                self.interrupt(RX)

    def catch_up(self) -> None:
        self._deliver()

    @staticmethod
    def _split(data: bytes, capacity: int) -> tuple[bytes, bytes]:
        header = pkt.Header.parse(data)
        room = capacity - pkt.HEADER_SIZE
        payload = data[pkt.HEADER_SIZE :]
        first = dataclasses.replace(header, length=room)
        rest = dataclasses.replace(header, length=len(payload) - room)
        return first.pack() + payload[:room], rest.pack() + payload[room:]

    def _header_for(self, conn: _Connection, op: int, length: int = 0, flags: int = 0) -> pkt.Header:
        conn.fwd_cnt_told = conn.fwd_cnt
        return pkt.Header(
            HOST_CID,
            self.guest_cid,
            conn.local_port,
            conn.peer_port,
            length,
            pkt.TYPE_STREAM,
            op,
            flags,
            BUF_ALLOC,
            conn.fwd_cnt,
        )

    # ---- socket side (Trio) -------------------------------------------------------

    async def run_io(self) -> None:
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.uds_path.unlink(missing_ok=True)
            await listener.bind(str(self.uds_path))
            listener.listen(16)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept_host_connections, listener, nursery)
                while True:
                    await _wait(self._changes)
                    with self._lock:
                        fresh, self._new_connections = self._new_connections, []
                    for conn in fresh:
                        nursery.start_soon(self._serve_connection, conn)
        finally:
            listener.close()
            self.uds_path.unlink(missing_ok=True)
            with self._lock:
                for conn in list(self._connections.values()):
                    self._close(conn)

    async def _accept_host_connections(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            client, _ = await listener.accept()
            nursery.start_soon(self._host_connect, client)

    async def _host_connect(self, client: trio.socket.SocketType) -> None:
        """Read `CONNECT <port>\\n`, then ask the guest to accept."""
        line = b""
        with trio.move_on_after(5):
            while not line.endswith(b"\n") and len(line) < 64:
                chunk = await client.recv(1)
                if not chunk:
                    break
                line += chunk
        words = line.decode(errors="replace").split()
        if len(words) != 2 or words[0] != "CONNECT" or not words[1].isdigit():
            client.close()
            return
        sock = socket.socket(fileno=client.detach())
        sock.setblocking(False)
        with self._lock:
            port = self._next_host_port
            self._next_host_port += 1
            conn = _Connection(port, int(words[1]), sock, host_initiated=True)
            self._connections[(conn.local_port, conn.peer_port)] = conn
            self.metrics.connections_from_host += 1
            self._queue_packet(self._header_for(conn, pkt.OP_REQUEST))
        self._deliver()
        await self._serve_connection(conn)

    async def _serve_connection(self, conn: _Connection) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._socket_to_guest, conn)
                await self._guest_to_socket(conn)
                nursery.cancel_scope.cancel()
        finally:
            with self._lock:
                if not conn.closed:
                    self._queue_packet(self._header_for(conn, pkt.OP_RST))
                    self.metrics.resets_sent += 1
                    self._close(conn)
            self._deliver()
            conn.sock.close()
            os.close(conn.wake_reader)
            os.close(conn.wake_writer)

    async def _guest_to_socket(self, conn: _Connection) -> None:
        """Write guest data to the socket; returns when both directions are finished."""
        while not conn.closed:
            with self._lock:
                greeting = bool(conn.greeting)
                data = bytes(conn.greeting or conn.outbuf)
            if not data:
                if conn.peer_done_sending and not conn.host_write_shut:
                    conn.sock.shutdown(socket.SHUT_WR)
                    conn.host_write_shut = True
                if conn.host_write_shut and conn.host_eof:
                    return
                await _wait(conn.wake_writer)
                continue
            try:
                sent = conn.sock.send(data)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(conn.sock)
                continue
            except OSError:
                return  # the host program went away: reset
            with self._lock:
                if greeting:
                    del conn.greeting[:sent]
                    continue
                del conn.outbuf[:sent]
                conn.fwd_cnt += sent
                if conn.fwd_cnt - conn.fwd_cnt_told >= BUF_ALLOC // 2:
                    self._queue_packet(self._header_for(conn, pkt.OP_CREDIT_UPDATE))
            self._deliver()

    async def _socket_to_guest(self, conn: _Connection) -> None:
        while not conn.closed:
            if not conn.established or conn.credit() <= 0:
                await _wait(conn.wake_reader)
                continue
            try:
                data = conn.sock.recv(min(conn.credit(), MAX_RW_PAYLOAD))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(conn.sock)
                continue
            except OSError:
                data = b""
            if not data:
                # The host program sends no more: tell the guest, keep receiving from it.
                with self._lock:
                    if conn.closed:
                        return
                    self._queue_packet(self._header_for(conn, pkt.OP_SHUTDOWN, flags=pkt.SHUTDOWN_SEND))
                    conn.host_eof = True
                self._deliver()
                _signal(conn.wake_writer)
                return
            with self._lock:
                if conn.closed:
                    return
                conn.tx_cnt += len(data)
                self.metrics.rx_bytes += len(data)
                self._queue_packet(self._header_for(conn, pkt.OP_RW, len(data)), data)
            self._deliver()

    def reset(self) -> None:
        with self._lock:
            for conn in list(self._connections.values()):
                self._close(conn)
            self._rx_pending.clear()
        super().reset()

    def save(self) -> dict[str, Any]:
        # Connections do not survive a snapshot (Firecracker resets them too).
        return asdict(VsockState(self.acked_features, self.guest_cid, self.metrics))

    def restore(self, saved: dict[str, Any]) -> None:
        state = state_from_json(VsockState, saved)
        self.acked_features, self.metrics = state.acked_features, state.metrics
        # The restored guest's driver read its CID from the snapshotted device's config.
        self.guest_cid = state.guest_cid
