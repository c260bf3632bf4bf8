"""virtio-mmio transport (virtio 1.x §4.2, version 2 register layout).

Knows nothing of the device behind it: it negotiates features, keeps the queue
addresses the driver programs, and on DRIVER_OK activates the device. Linux finds
it through `virtio_mmio.device=<size>@<base>:<irq>` on the kernel command line.
Runs in the vCPU thread that took the MMIO exit (the bus serialises access).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import trio

from appliance.runtime.virtio.device import VirtioDevice, state_from_json
from appliance.runtime.virtio.memory import GuestMemoryAccess
from appliance.runtime.virtio.queue import Queue, QueueState

MMIO_SIZE = 0x1000
MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x45425543  # "CUBE"

MAGIC_VALUE = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
INTERRUPT_USED_RING = 1
INTERRUPT_CONFIG_CHANGE = 2


def cmdline_device(base: int, irq: int, size: int = MMIO_SIZE) -> str:
    """The kernel command-line entry declaring one virtio-mmio device."""
    return f"virtio_mmio.device={size // 1024}K@{base:#x}:{irq}"


@dataclass
class MmioTransportState:
    """The transport's registers and queues, and its device's own state (plain data)."""

    status: int
    device_features_sel: int
    driver_features_sel: int
    driver_features: int
    queue_sel: int
    interrupt_status: int
    config_generation: int
    queues: list[QueueState]
    device: dict[str, Any]  # the device's save(): its own state dataclass as plain data


class MmioTransport:
    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemoryAccess,
        raise_irq: Callable[[], None],
        *,
        base: int = 0,
        irq: int = 0,
    ) -> None:
        self.device = device
        self.base = base  # where the VMM mapped it and which line it raises: for the cmdline
        self.irq = irq
        self.memory = memory
        self._raise_irq = raise_irq
        self.queues = [Queue(size) for size in device.queue_max_sizes]
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        # vCPU threads (register access) and serve_throttled (a Trio task) both drive the device.
        self._lock = threading.RLock()
        self._throttled = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._throttled_queue = 0

    def close(self) -> None:
        os.close(self._throttled)

    async def serve_throttled(self) -> None:
        """Re-run a rate-limited queue once its bucket refills (the driver will not notify again)."""
        while True:
            await trio.lowlevel.wait_readable(self._throttled)
            try:
                os.eventfd_read(self._throttled)
            except BlockingIOError:
                continue
            while (retry := self.device.retry_after) is not None:
                await trio.sleep(retry)
                await self.device.wait_io_allowed()
                with self._lock:
                    self.device.process_queue(self._throttled_queue)

    def _notify(self, queue_index: int) -> None:
        if self.device.active and queue_index < len(self.queues):
            self.device.process_queue(queue_index)
            if self.device.retry_after is not None:
                self._throttled_queue = queue_index
                os.eventfd_write(self._throttled, 1)

    async def serve_notifications(self, eventfds: list[int]) -> None:
        """Serve QueueNotify writes that KVM turned into eventfd signals (KVM_IOEVENTFD with
        the queue index as datamatch), so device work runs in Trio tasks, not vCPU threads."""
        async with trio.open_nursery() as nursery:
            for queue_index, fd in enumerate(eventfds):
                nursery.start_soon(self._serve_notification, queue_index, fd)

    async def _serve_notification(self, queue_index: int, fd: int) -> None:
        while True:
            await trio.lowlevel.wait_readable(fd)
            # A notification the guest sent just before it was stopped waits for the resume:
            # its chains are in the guest memory the resume brings back.
            await self.device.wait_io_allowed()
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                continue
            with self._lock:
                self._notify(queue_index)

    def _queue(self) -> Queue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _signal_used(self, queue_index: int) -> None:
        self.interrupt_status |= INTERRUPT_USED_RING
        self._raise_irq()

    def change_config(self, change: Callable[[], None]) -> None:
        """Run `change` (to the device's config space), then tell the driver: a new config
        generation and the config-change interrupt (virtio 1.x §4.2.2.1), as for a disk that grew.
        Under the register lock: the driver never reads a half-changed config."""
        with self._lock:
            change()
            self.config_generation += 1
            self.interrupt_status |= INTERRUPT_CONFIG_CHANGE
            self._raise_irq()

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            return self._read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._write(offset, data)

    def _read(self, offset: int, size: int) -> bytes:
        if offset >= CONFIG:
            config = self.device.config_space()
            start = offset - CONFIG
            return config[start : start + size].ljust(size, b"\0")
        queue = self._queue()
        value = 0
        if offset == MAGIC_VALUE:
            value = MAGIC
        elif offset == VERSION_REG:
            value = VERSION
        elif offset == DEVICE_ID:
            value = self.device.device_type
        elif offset == VENDOR:
            value = VENDOR_ID
        elif offset == DEVICE_FEATURES:
            value = (self.device.available_features() >> (32 * self.device_features_sel)) & 0xFFFFFFFF
        elif offset == QUEUE_NUM_MAX:
            value = queue.state.max_size if queue else 0
        elif offset == QUEUE_READY:
            value = int(queue.state.ready) if queue else 0
        elif offset == INTERRUPT_STATUS:
            value = self.interrupt_status
        elif offset == STATUS:
            value = self.status
        elif offset == CONFIG_GENERATION:
            value = self.config_generation
        return value.to_bytes(4, "little")[:size]

    def _write(self, offset: int, data: bytes) -> None:
        if offset >= CONFIG:
            self.device.write_config(offset - CONFIG, data)
            return
        value = int.from_bytes(data, "little")
        queue = self._queue()
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES and self.driver_features_sel < 2:
            shift = 32 * self.driver_features_sel
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NOTIFY:
            self._notify(value)
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == STATUS:
            self._set_status(value)
        elif queue is not None:
            self._write_queue_register(queue.state, offset, value)

    def _write_queue_register(self, q: QueueState, offset: int, value: int) -> None:
        low, high = 0xFFFFFFFF, 0xFFFFFFFF << 32
        if offset == QUEUE_NUM:
            q.size = min(value, q.max_size)
        elif offset == QUEUE_READY:
            q.ready = bool(value & 1)
        elif offset == QUEUE_DESC_LOW:
            q.desc_table = (q.desc_table & high) | value
        elif offset == QUEUE_DESC_HIGH:
            q.desc_table = (q.desc_table & low) | (value << 32)
        elif offset == QUEUE_DRIVER_LOW:
            q.avail_ring = (q.avail_ring & high) | value
        elif offset == QUEUE_DRIVER_HIGH:
            q.avail_ring = (q.avail_ring & low) | (value << 32)
        elif offset == QUEUE_DEVICE_LOW:
            q.used_ring = (q.used_ring & high) | value
        elif offset == QUEUE_DEVICE_HIGH:
            q.used_ring = (q.used_ring & low) | (value << 32)

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.device.reset()
            for queue in self.queues:
                queue.reset()
            self.status = 0
            self.driver_features = 0
            self.interrupt_status = 0
            return
        if value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK:
            self.device.ack_features(self.driver_features)
            if self.device.acked_features != self.driver_features:
                value &= ~STATUS_FEATURES_OK  # the driver asked for something we never offered
        if value & STATUS_DRIVER_OK and not self.status & STATUS_DRIVER_OK:
            self.device.activate(self.memory, self.queues, self._signal_used)
        self.status = value

    # ---- persistence --------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        return asdict(
            MmioTransportState(
                status=self.status,
                device_features_sel=self.device_features_sel,
                driver_features_sel=self.driver_features_sel,
                driver_features=self.driver_features,
                queue_sel=self.queue_sel,
                interrupt_status=self.interrupt_status,
                config_generation=self.config_generation,
                queues=[q.state for q in self.queues],
                device=self.device.save(),
            )
        )

    def restore(self, saved: dict[str, Any]) -> None:
        state = state_from_json(MmioTransportState, saved)
        if len(state.queues) != len(self.device.queue_max_sizes):
            raise ValueError(f"snapshot has {len(state.queues)} queues, the device {len(self.queues)}")
        self.status = state.status
        self.device_features_sel = state.device_features_sel
        self.driver_features_sel = state.driver_features_sel
        self.driver_features = state.driver_features
        self.queue_sel = state.queue_sel
        self.interrupt_status = state.interrupt_status
        self.config_generation = state.config_generation
        self.queues = [Queue(q.max_size, q) for q in state.queues]
        self.device.restore(state.device)
        if self.status & STATUS_DRIVER_OK:
            self.device.activate(self.memory, self.queues, self._signal_used)
