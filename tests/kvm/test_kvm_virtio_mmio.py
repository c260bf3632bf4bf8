"""The virtio-mmio transport in guest RAM, driven register by register the way Linux's
virtio_mmio driver does it (the guest side written in Python), with blk and rng behind it."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest
import trio
from kvm_guest import RecordingDevice, assemble

from appliance.runtime.kvm.bus import Bus
from appliance.runtime.kvm.machine import Machine, MachineConfig
from appliance.runtime.kvm.memory import GuestMemory
from appliance.runtime.kvm.x86 import enter_long_mode
from appliance.runtime.virtio import mmio
from appliance.runtime.virtio.blk.device import T_IN, T_OUT, VirtioBlock
from appliance.runtime.virtio.blk.disk import CowDisk
from appliance.runtime.virtio.device import VIRTIO_F_VERSION_1, VirtioDevice
from appliance.runtime.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, QueueError
from appliance.runtime.virtio.rate_limiter import RateLimiter, TokenBucket
from appliance.runtime.virtio.rng.device import VirtioRng
from cffi_kvm import Kvm

MIB = 1 << 20
BASE = 0xD000_0000
DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000
BUFFERS = 0x20000
CODE = 0x30000  # guest payloads, clear of the rings and buffers


class Driver:
    """Linux's virtio_mmio probe sequence, one queue, chains written into guest RAM."""

    def __init__(self, bus: Bus, memory: GuestMemory) -> None:
        self.bus, self.memory = bus, memory
        self.avail_idx = 0
        self.used_seen = 0

    def reg(self, offset: int, value: int | None = None) -> int:
        if value is None:
            return int.from_bytes(self.bus.read(BASE + offset, 4), "little")
        self.bus.write(BASE + offset, value.to_bytes(4, "little"))
        return value

    def probe(self, queue_size: int = 16) -> int:
        assert self.reg(mmio.MAGIC_VALUE) == mmio.MAGIC and self.reg(mmio.VERSION_REG) == 2
        self.reg(mmio.STATUS, 0)
        self.reg(mmio.STATUS, 1 | 2)  # ACKNOWLEDGE | DRIVER
        self.reg(mmio.DEVICE_FEATURES_SEL, 1)
        high = self.reg(mmio.DEVICE_FEATURES)
        self.reg(mmio.DEVICE_FEATURES_SEL, 0)
        features = (high << 32) | self.reg(mmio.DEVICE_FEATURES)
        for select, half in ((0, features & 0xFFFFFFFF), (1, features >> 32)):
            self.reg(mmio.DRIVER_FEATURES_SEL, select)
            self.reg(mmio.DRIVER_FEATURES, half)
        self.reg(mmio.STATUS, 1 | 2 | mmio.STATUS_FEATURES_OK)
        assert self.reg(mmio.STATUS) & mmio.STATUS_FEATURES_OK
        self.reg(mmio.QUEUE_SEL, 0)
        assert self.reg(mmio.QUEUE_NUM_MAX) >= queue_size
        self.reg(mmio.QUEUE_NUM, queue_size)
        for low, addr in (
            (mmio.QUEUE_DESC_LOW, DESC),
            (mmio.QUEUE_DRIVER_LOW, AVAIL),
            (mmio.QUEUE_DEVICE_LOW, USED),
        ):
            self.reg(low, addr)
            self.reg(low + 4, 0)
        self.reg(mmio.QUEUE_READY, 1)
        self.reg(mmio.STATUS, 1 | 2 | mmio.STATUS_FEATURES_OK | mmio.STATUS_DRIVER_OK)
        self.queue_size = queue_size
        return features

    def submit(self, buffers: list[tuple[int, int, bool]]) -> None:
        """One chain of (guest address, length, device-writable) buffers, then notify."""
        for i, (addr, length, writable) in enumerate(buffers):
            flags = (VIRTQ_DESC_F_NEXT if i + 1 < len(buffers) else 0) | (
                VIRTQ_DESC_F_WRITE if writable else 0
            )
            self.memory.write(DESC + 16 * i, struct.pack("<QIHH", addr, length, flags, i + 1))
        self.memory.write_int(AVAIL + 4 + 2 * (self.avail_idx % self.queue_size), 2, 0)
        self.avail_idx += 1
        self.memory.write_int(AVAIL + 2, 2, self.avail_idx)
        self.reg(mmio.QUEUE_NOTIFY, 0)

    def used(self) -> tuple[int, int]:
        assert self.memory.read_int(USED + 2, 2) == self.used_seen + 1
        head, written = struct.unpack(
            "<II", self.memory.read(USED + 4 + 8 * (self.used_seen % self.queue_size), 8)
        )
        self.used_seen += 1
        return head, written


def attach(device: VirtioDevice, memory: GuestMemory) -> tuple[Driver, mmio.MmioTransport, int]:
    irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    transport = mmio.MmioTransport(device, memory, lambda: os.eventfd_write(irq, 1))
    bus = Bus("mmio")
    bus.insert(transport, BASE, mmio.MMIO_SIZE)
    return Driver(bus, memory), transport, irq


def add_to_machine(machine: Machine, name: str, device: VirtioDevice) -> mmio.MmioTransport:
    """`device` behind a virtio-mmio transport at BASE, interrupting on GSI 5 through irqfd."""
    irq = machine.irq_eventfd(5)
    transport = mmio.MmioTransport(device, machine.memory, lambda: os.eventfd_write(irq, 1))
    machine.add_mmio_device(name, transport, BASE, mmio.MMIO_SIZE)
    return transport


def test_cmdline_entry_declares_the_device() -> None:
    assert mmio.cmdline_device(0xD0000000, 5) == "virtio_mmio.device=4K@0xd0000000:5"


def test_rng_fills_the_buffer_and_interrupts() -> None:
    memory = GuestMemory.anonymous(4 * MIB)
    device = VirtioRng()
    driver, _transport, irq = attach(device, memory)
    try:
        assert driver.probe() & VIRTIO_F_VERSION_1
        assert driver.reg(mmio.DEVICE_ID) == 4
        driver.submit([(BUFFERS, 512, True)])
        assert driver.used() == (0, 512)
        assert memory.read(BUFFERS, 512) != bytes(512)
        assert os.eventfd_read(irq) == 1
        assert driver.reg(mmio.INTERRUPT_STATUS) == mmio.INTERRUPT_USED_RING
        driver.reg(mmio.INTERRUPT_ACK, 1)
        assert driver.reg(mmio.INTERRUPT_STATUS) == 0
    finally:
        _transport.close()
        os.close(irq)
        memory.close()


def test_blk_over_mmio_and_transport_state_survives_save_restore(tmp_path: Path) -> None:
    memory = GuestMemory.anonymous(4 * MIB)
    disk = CowDisk(tmp_path / "overlay.img", size=MIB)
    driver, transport, irq = attach(VirtioBlock(disk), memory)
    try:
        driver.probe()
        capacity = int.from_bytes(driver.bus.read(BASE + mmio.CONFIG, 8), "little")
        assert capacity == MIB // 512
        payload = hashlib.sha256(b"cube").digest() * 128  # 4 KiB
        memory.write(BUFFERS, struct.pack("<IIQ", T_OUT, 0, 8))
        memory.write(BUFFERS + 0x100, payload)
        driver.submit([(BUFFERS, 16, False), (BUFFERS + 0x100, 4096, False), (BUFFERS + 0x80, 1, True)])
        assert driver.used() == (0, 1)
        assert memory.read(BUFFERS + 0x80, 1) == b"\0"  # VIRTIO_BLK_S_OK
        assert disk.read(8 * 512, 4096) == payload

        # A restored transport (new memory view of the same RAM) continues the same queue.
        saved = transport.save()
        restored_device = VirtioBlock(disk)
        restored = mmio.MmioTransport(restored_device, memory, lambda: os.eventfd_write(irq, 1))
        restored.restore(saved)
        driver.bus = Bus("mmio")
        driver.bus.insert(restored, BASE, mmio.MMIO_SIZE)
        assert restored_device.active and restored_device.metrics.write_count == 1
        memory.write(BUFFERS, struct.pack("<IIQ", T_IN, 0, 8))
        driver.submit([(BUFFERS, 16, False), (BUFFERS + 0x2000, 4096, True), (BUFFERS + 0x80, 1, True)])
        assert driver.used() == (0, 4097)
        assert memory.read(BUFFERS + 0x2000, 4096) == payload
        restored.close()
    finally:
        transport.close()
        os.close(irq)
        disk.close()
        memory.close()


async def test_throttled_queue_is_served_when_the_bucket_refills(tmp_path: Path) -> None:
    memory = GuestMemory.anonymous(4 * MIB)
    disk = CowDisk(tmp_path / "overlay.img", size=MIB)
    limiter = RateLimiter(ops=TokenBucket(size=1, refill_per_second=10))
    device = VirtioBlock(disk, rate_limiter=limiter)
    driver, transport, irq = attach(device, memory)
    request = [(BUFFERS, 16, False), (BUFFERS + 0x2000, 512, True), (BUFFERS + 0x80, 1, True)]
    try:
        driver.probe()
        memory.write(BUFFERS, struct.pack("<IIQ", T_IN, 0, 0))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.serve_throttled)
            driver.submit(request)
            assert driver.used() == (0, 513)  # the burst
            driver.submit(request)
            assert memory.read_int(USED + 2, 2) == 1  # throttled: still waiting
            assert device.retry_after is not None and device.metrics.throttled_events == 1
            with trio.fail_after(2):
                while memory.read_int(USED + 2, 2) < 2:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert driver.used() == (0, 513)
    finally:
        transport.close()
        os.close(irq)
        disk.close()
        memory.close()


def test_machine_snapshot_carries_device_and_queue_state(kvm: Kvm, tmp_path: Path) -> None:
    """A virtio-blk device set up by its driver survives snapshot → restore into a new VM."""
    disk = CowDisk(tmp_path / "overlay.img", size=MIB)

    def add_blk(machine: Machine) -> mmio.MmioTransport:
        return add_to_machine(machine, "virtio-blk", VirtioBlock(disk))

    machine = Machine.new(kvm, MachineConfig(memory_size=4 * MIB))
    transport = add_blk(machine)
    try:
        driver = Driver(machine.mmio_bus, machine.memory)
        driver.probe()
        machine.memory.write(BUFFERS, struct.pack("<IIQ", T_OUT, 0, 0))
        machine.memory.write(BUFFERS + 0x100, b"snapshot" * 64)
        driver.submit([(BUFFERS, 16, False), (BUFFERS + 0x100, 512, False), (BUFFERS + 0x80, 1, True)])
        assert driver.used() == (0, 1)
        machine.snapshot(tmp_path / "snap")
    finally:
        transport.close()
        machine.close()

    restored_transports: list[mmio.MmioTransport] = []
    restored = Machine.restore(
        kvm, tmp_path / "snap", add_devices=lambda m: restored_transports.append(add_blk(m))
    )
    try:
        device = restored_transports[0].device
        assert device.active and device.metrics.write_count == 1  # type: ignore[attr-defined]
        driver = Driver(restored.mmio_bus, restored.memory)
        driver.avail_idx = driver.used_seen = 1  # the driver's own state lives in guest RAM
        driver.queue_size = 16
        restored.memory.write(BUFFERS, struct.pack("<IIQ", T_IN, 0, 0))
        driver.submit([(BUFFERS, 16, False), (BUFFERS + 0x400, 512, True), (BUFFERS + 0x80, 1, True)])
        assert driver.used() == (0, 513)
        assert restored.memory.read(BUFFERS + 0x400, 512) == b"snapshot" * 64
    finally:
        for t in restored_transports:
            t.close()
        restored.close()
        disk.close()


def test_clones_of_one_snapshot_draw_different_entropy_from_virtio_rng(kvm: Kvm, tmp_path: Path) -> None:
    """Clones share the template's RAM, so their kernels' CRNG starts identical: the seed
    each one gets from its own virtio-rng (and /init) must differ between clones."""

    def add_rng(machine: Machine) -> mmio.MmioTransport:
        return add_to_machine(machine, "virtio-rng", VirtioRng())

    template = Machine.new(kvm, MachineConfig(memory_size=4 * MIB))
    transport = add_rng(template)
    try:
        driver = Driver(template.mmio_bus, template.memory)
        driver.probe()
        driver.submit([(BUFFERS, 64, True)])
        assert driver.used() == (0, 64)
        template.snapshot(tmp_path / "snap")
    finally:
        transport.close()
        template.close()

    drawn = []
    transports: list[mmio.MmioTransport] = []
    for _clone in range(2):
        clone = Machine.restore(kvm, tmp_path / "snap", add_devices=lambda m: transports.append(add_rng(m)))
        try:
            driver = Driver(clone.mmio_bus, clone.memory)
            driver.avail_idx = driver.used_seen = 1  # the driver's ring state is in the restored RAM
            driver.queue_size = 16
            driver.submit([(BUFFERS + 0x100, 64, True)])
            assert driver.used() == (0, 64)
            drawn.append(clone.memory.read(BUFFERS + 0x100, 64))
        finally:
            transports[-1].close()
            clone.close()
    assert drawn[0] != drawn[1]


async def test_guest_queue_notify_through_ioeventfd_is_served_by_a_trio_task(kvm: Kvm) -> None:
    machine = Machine.new(kvm, MachineConfig(memory_size=4 * MIB))
    device = VirtioRng()
    transport = mmio.MmioTransport(device, machine.memory, lambda: None, base=BASE)
    machine.add_mmio_device("virtio-rng", transport, BASE, mmio.MMIO_SIZE)
    notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    machine.vm.ioeventfd(notify, BASE + mmio.QUEUE_NOTIFY, 4, datamatch=0)
    stop = RecordingDevice()
    stop.on_write = lambda offset, value: machine.request_stop()
    machine.add_pio_device("stop", stop, 0xF4, 1)
    try:
        driver = Driver(machine.mmio_bus, machine.memory)
        driver.probe()
        # The chain is made available from the host side; the guest only notifies.
        machine.memory.write(DESC, struct.pack("<QIHH", BUFFERS, 256, VIRTQ_DESC_F_WRITE, 0))
        machine.memory.write_int(AVAIL + 4, 2, 0)
        machine.memory.write_int(AVAIL + 2, 2, 1)
        code = assemble(
            f"mov ${BASE + mmio.QUEUE_NOTIFY:#x}, %rbx\nmovl $0, (%rbx)\nout %al, $0xF4\nhlt", origin=CODE
        )
        machine.memory.write(CODE, code)
        enter_long_mode(machine.memory, machine.vcpus[0].vcpu, rip=CODE, rsp=0x8000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.serve_notifications, [notify])
            with trio.fail_after(10):
                await machine.run()
                while machine.memory.read_int(USED + 2, 2) == 0:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert machine.vcpus[0].exits == 1  # only the stop port: the notify never left the kernel
        assert device.metrics.bytes_served == 256
        assert machine.memory.read(BUFFERS, 256) != bytes(256)
    finally:
        os.close(notify)
        transport.close()
        machine.close()


async def test_a_paused_device_takes_no_notification_until_resumed() -> None:
    """A notification the guest sent just before it was stopped (an ioeventfd still set) is
    served only after resume: while paused the device must not touch guest memory, which a
    pause's diff or a snapshot holds as it was when the vCPUs stopped."""
    memory = GuestMemory.anonymous(4 * MIB)
    device = VirtioRng()
    driver, transport, irq = attach(device, memory)
    notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        driver.probe()
        # The chain is available; the notification comes through KVM's ioeventfd, not the bus.
        memory.write(DESC, struct.pack("<QIHH", BUFFERS, 256, VIRTQ_DESC_F_WRITE, 0))
        memory.write_int(AVAIL + 4, 2, 0)
        memory.write_int(AVAIL + 2, 2, 1)
        device.pause_io()
        os.eventfd_write(notify, 1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.serve_notifications, [notify])
            await trio.sleep(0.3)
            assert memory.read_int(USED + 2, 2) == 0 and memory.read(BUFFERS, 256) == bytes(256)
            device.resume_io()
            with trio.fail_after(10):
                while memory.read_int(USED + 2, 2) == 0:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert driver.used() == (0, 256)
    finally:
        transport.close()
        for fd in (irq, notify):
            os.close(fd)
        memory.close()


def test_a_hostile_driver_cannot_reach_past_guest_ram_or_loop_the_device() -> None:
    """A guest kernel is untrusted: its virtqueues may point anywhere. Each malformed chain
    (a buffer across the end of RAM, one of 4 GiB, one far above RAM, a descriptor loop,
    rings outside RAM) is refused before a byte is read or written: the error ends that sandbox's device
    model (and so that sandbox), never the host's memory next to the guest's."""
    ram = 4 * MIB
    memory = GuestMemory.anonymous(ram)
    driver, transport, irq = attach(VirtioRng(), memory)
    try:
        driver.probe()
        tail = memory.read(ram - 256, 256)
        for chain in ([(ram - 256, 512, True)], [(ram - 16, 0xFFFF_FFFF, True)], [(1 << 48, 64, True)]):
            with pytest.raises(ValueError, match="not in guest RAM"):
                driver.submit(chain)
            assert memory.read(ram - 256, 256) == tail
        assert memory.read_int(USED + 2, 2) == 0  # nothing was returned as served
        # A chain whose last descriptor points back at its first: the walk stops at the queue size.
        memory.write(DESC, struct.pack("<QIHH", BUFFERS, 16, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1))
        memory.write(DESC + 16, struct.pack("<QIHH", BUFFERS, 16, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 0))
        memory.write_int(AVAIL + 4 + 2 * (driver.avail_idx % driver.queue_size), 2, 0)
        driver.avail_idx += 1
        memory.write_int(AVAIL + 2, 2, driver.avail_idx)
        with pytest.raises(QueueError, match="malformed"):
            driver.reg(mmio.QUEUE_NOTIFY, 0)
        # Rings outside RAM: refused as the device reads them.
        driver.reg(mmio.QUEUE_SEL, 0)
        driver.reg(mmio.QUEUE_DRIVER_LOW, 0)
        driver.reg(mmio.QUEUE_DRIVER_LOW + 4, 0x10000)
        with pytest.raises(ValueError, match="not in guest RAM"):
            driver.reg(mmio.QUEUE_NOTIFY, 0)
    finally:
        transport.close()
        os.close(irq)
        memory.close()
