"""virtio-net device model (virtio 1.x §5.1): an rx and a tx queue over a tap fd.

Frames cross unchanged with their 12-byte virtio-net header, so checksum and TSO
offloads work end to end (the tap is told which offloads the guest accepted).
tx runs when the driver notifies; rx runs when the tap is readable (`run_io`,
a Trio task) and when the driver adds rx buffers (a notification), whichever
thread that arrives on: a lock keeps the two apart.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import asdict, dataclass
from typing import Any

import trio

from appliance.runtime.virtio.device import (
    DEVICE_ID_NET,
    VIRTIO_F_VERSION_1,
    DeviceState,
    VirtioDevice,
    state_from_json,
)
from appliance.runtime.virtio.net import tap
from appliance.runtime.virtio.net.metrics import NetMetrics
from appliance.runtime.virtio.queue import read_chain_bytes, write_chain_bytes
from appliance.runtime.virtio.rate_limiter import RateLimiter

RX, TX = 0, 1
QUEUE_SIZE = 256
MAX_FRAME = 65562 + tap.VNET_HEADER_SIZE  # a 64 KiB GSO frame plus headers

F_CSUM = 1 << 0
F_GUEST_CSUM = 1 << 1
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7
F_GUEST_TSO6 = 1 << 8
F_HOST_TSO4 = 1 << 11
F_HOST_TSO6 = 1 << 12


@dataclass
class NetState(DeviceState):
    mac: str  # hex: the MAC the guest's driver read
    metrics: NetMetrics


class VirtioNet(VirtioDevice):
    device_type = DEVICE_ID_NET
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(
        self,
        tap_fd: int,
        mac: bytes,
        *,
        rx_rate_limiter: RateLimiter | None = None,
        tx_rate_limiter: RateLimiter | None = None,
    ) -> None:
        super().__init__()
        self.tap_fd = tap_fd
        self.mac = mac
        self.rx_rate_limiter = rx_rate_limiter
        self.tx_rate_limiter = tx_rate_limiter
        self.metrics = NetMetrics()
        self._rx_lock = threading.Lock()
        self._pending_frame: bytes | None = None  # read from the tap, waiting for rx buffers
        self._rx_buffers_added = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def close(self) -> None:
        os.close(self._rx_buffers_added)

    def available_features(self) -> int:
        return (
            VIRTIO_F_VERSION_1
            | F_CSUM
            | F_GUEST_CSUM
            | F_MAC
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_HOST_TSO4
            | F_HOST_TSO6
        )

    def config_space(self) -> bytes:
        return self.mac + struct.pack("<HHH", 0, 1, 1500)  # status, max_virtqueue_pairs, mtu

    def activate(self, memory: Any, queues: Any, interrupt: Any) -> None:
        super().activate(memory, queues, interrupt)
        offload = 0
        if self.acked_features & F_GUEST_CSUM:
            offload |= tap.TUN_F_CSUM
            if self.acked_features & F_GUEST_TSO4:
                offload |= tap.TUN_F_TSO4
            if self.acked_features & F_GUEST_TSO6:
                offload |= tap.TUN_F_TSO6
        tap.set_offload(self.tap_fd, offload)

    def process_queue(self, index: int) -> None:
        if index == TX:
            self._transmit()
        else:
            os.eventfd_write(self._rx_buffers_added, 1)
            self.receive()

    def _transmit(self) -> None:
        assert self.memory is not None
        queue = self.queues[TX]
        sent = False
        self.retry_after = None
        while (chain := queue.pop(self.memory)) is not None:
            frame = read_chain_bytes(self.memory, chain.readable())
            if self.tx_rate_limiter is not None and not self.tx_rate_limiter.consume(len(frame)):
                queue.state.next_avail = (queue.state.next_avail - 1) & 0xFFFF
                self.retry_after = self.tx_rate_limiter.wait_time(len(frame))
                self.metrics.throttled_events += 1
                break
            try:
                os.write(self.tap_fd, frame)
                self.metrics.tx_packets += 1
                self.metrics.tx_bytes += len(frame) - tap.VNET_HEADER_SIZE
            except OSError:
                self.metrics.tx_errors += 1  # the tap is full or down: the frame is lost, as on a wire
            queue.add_used(self.memory, chain.head, 0)
            sent = True
        if sent:
            self.interrupt(TX)

    def receive(self) -> bool:
        """Move frames from the tap into rx buffers; False when the guest has no buffer left
        (or cannot take frames now: paused)."""
        if self.memory is None or self.io_paused:
            return False
        with self._rx_lock:
            queue = self.queues[RX]
            delivered = False
            has_buffers = True
            while True:
                frame = self._pending_frame
                if frame is None:
                    try:
                        frame = os.read(self.tap_fd, MAX_FRAME)
                    except BlockingIOError:
                        break
                if self.rx_rate_limiter is not None and not self.rx_rate_limiter.consume(len(frame)):
                    self._pending_frame = frame
                    self.metrics.throttled_events += 1
                    break
                chain = queue.pop(self.memory)
                if chain is None:
                    self._pending_frame = frame
                    has_buffers = False
                    break
                self._pending_frame = None
                # num_buffers (last 2 header bytes) is 1: no mergeable rx buffers.
                frame = frame[:10] + b"\x01\x00" + frame[12:]
                written = write_chain_bytes(self.memory, chain.writable(), frame)
                if written < len(frame):
                    self.metrics.rx_dropped_no_buffer += 1
                self.metrics.rx_packets += 1
                self.metrics.rx_bytes += len(frame) - tap.VNET_HEADER_SIZE
                queue.add_used(self.memory, chain.head, written)
                delivered = True
            if delivered:
                self.interrupt(RX)
            return has_buffers

    async def run_io(self) -> None:
        """Feed the guest from the tap for as long as the device is active."""
        while True:
            await self.wait_io_allowed()
            has_buffers = self.receive()
            if has_buffers and self._pending_frame is not None and self.rx_rate_limiter is not None:
                await trio.sleep(self.rx_rate_limiter.wait_time(len(self._pending_frame)))
            elif has_buffers:
                await trio.lowlevel.wait_readable(self.tap_fd)
            else:
                await trio.lowlevel.wait_readable(self._rx_buffers_added)
                try:
                    os.eventfd_read(self._rx_buffers_added)
                except BlockingIOError:
                    pass

    def save(self) -> dict[str, Any]:
        return asdict(NetState(self.acked_features, self.mac.hex(), self.metrics))

    def restore(self, saved: dict[str, Any]) -> None:
        state = state_from_json(NetState, saved)
        self.acked_features, self.metrics = state.acked_features, state.metrics
        # The restored guest's driver read its MAC from the snapshotted device: keep showing it.
        self.mac = bytes.fromhex(state.mac)
