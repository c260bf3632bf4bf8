"""Volume slots of kvm sandboxes (runtime/kvm/volumes.py): an empty virtio-blk device every guest
boots with, given a volume's image at the claim and announced by a config-change interrupt; the
image made and opened without following a link; a slot plugged once. The real device, transport
and VMM-side code, driven by Linux's virtio-mmio probe sequence (no guest kernel needed)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import trio
from test_kvm_virtio_mmio import BASE, BUFFERS, Driver, attach

from appliance.runtime.kvm.memory import GuestMemory
from appliance.runtime.kvm.vmm import DEVICE_SLOTS, VIRTIO_IRQS, device_slot
from appliance.runtime.kvm.volumes import (
    FIRST_SLOT,
    VOLUME_SLOTS,
    guest_device,
    image_name,
    make_image,
    open_image,
    slot_name,
)
from appliance.runtime.supervisor.protocol import Op, ProtocolError, Request
from appliance.runtime.virtio import mmio
from appliance.runtime.virtio.blk.device import T_IN, VirtioBlock
from appliance.runtime.virtio.blk.disk import RawDisk

MIB = 1 << 20


def capacity(driver: Driver) -> int:
    return int.from_bytes(driver.bus.read(BASE + mmio.CONFIG, 8), "little")


def read_sector(driver: Driver, memory: GuestMemory, sector: int) -> tuple[int, bytes]:
    """A T_IN of one sector: (status byte, data)."""
    memory.write(BUFFERS, struct.pack("<IIQ", T_IN, 0, sector))
    driver.submit([(BUFFERS, 16, False), (BUFFERS + 0x1000, 512, True), (BUFFERS + 0x80, 1, True)])
    driver.used()
    return memory.read(BUFFERS + 0x80, 1)[0], memory.read(BUFFERS + 0x1000, 512)


async def fill_with(fd: int, data: bytes) -> None:
    os.pwrite(fd, data, 0)


def test_every_guest_has_the_volume_slots_on_their_own_interrupt_lines() -> None:
    names = [slot.name for slot in DEVICE_SLOTS]
    assert names[-VOLUME_SLOTS:] == [slot_name(s) for s in range(FIRST_SLOT, FIRST_SLOT + VOLUME_SLOTS)]
    assert len({device_slot(i)[1] for i in range(len(DEVICE_SLOTS))}) == len(DEVICE_SLOTS) <= len(VIRTIO_IRQS)
    # The root disk is vda; the volume slots are the next virtio-blk devices in probe order.
    blocks = [slot.name for slot in DEVICE_SLOTS if slot.device_class is VirtioBlock]
    assert blocks == ["virtio-blk", slot_name(1), slot_name(2)]
    assert [guest_device(s) for s in (1, 2)] == ["/dev/vdb", "/dev/vdc"]


def test_a_volume_image_plugged_into_an_empty_slot_reaches_the_driver(tmp_path: Path) -> None:
    memory = GuestMemory.anonymous(4 * MIB)
    device = VirtioBlock(RawDisk.empty(), disk_id="cube-volume-1")
    driver, transport, irq = attach(device, memory)
    try:
        driver.probe()
        assert capacity(driver) == 0  # what a guest boots (or is restored) with
        assert read_sector(driver, memory, 0)[0] == 1  # VIRTIO_BLK_S_IOERR: there is no sector
        os.eventfd_read(irq)
        generation = driver.reg(mmio.CONFIG_GENERATION)
        driver.reg(mmio.INTERRUPT_ACK, driver.reg(mmio.INTERRUPT_STATUS))

        sector = b"volume!!" * 64
        trio.run(make_image, tmp_path, os.getuid(), 1, 4 * MIB, lambda fd: fill_with(fd, sector))
        disk = open_image(tmp_path, 1)
        transport.change_config(lambda: device.plug(disk))

        # The driver is told (interrupt, config-change bit, new generation) and reads the size.
        assert os.eventfd_read(irq) == 1
        assert driver.reg(mmio.INTERRUPT_STATUS) == mmio.INTERRUPT_CONFIG_CHANGE
        assert driver.reg(mmio.CONFIG_GENERATION) == generation + 1
        assert capacity(driver) == 4 * MIB // 512
        assert read_sector(driver, memory, 0) == (0, sector)
        # Plugged once: the disk the guest has seen is never swapped under it.
        with pytest.raises(ValueError, match="holds a disk"):
            device.plug(RawDisk.empty())
        # A plugged slot's state is not an empty slot's: a checkpoint of it restores nowhere.
        saved = transport.save()
        empty = mmio.MmioTransport(VirtioBlock(RawDisk.empty()), memory, lambda: None)
        with pytest.raises(ValueError, match="disk was"):
            empty.restore(saved)
        empty.close()
    finally:
        device.close()  # closes the plugged image
        transport.close()
        os.close(irq)
        memory.close()


def test_an_empty_slot_saves_and_restores_as_every_template_snapshot_has_it() -> None:
    memory = GuestMemory.anonymous(4 * MIB)
    driver, transport, irq = attach(VirtioBlock(RawDisk.empty()), memory)
    try:
        driver.probe()
        restored_device = VirtioBlock(RawDisk.empty())
        restored = mmio.MmioTransport(restored_device, memory, lambda: None)
        restored.restore(transport.save())
        assert restored_device.active and restored_device.disk.size == 0
        restored.close()
    finally:
        transport.close()
        os.close(irq)
        memory.close()


def test_the_image_is_made_without_following_a_link_the_sandbox_planted(tmp_path: Path) -> None:
    sandbox_dir, outside = tmp_path / "sandbox", tmp_path / "host-file"
    sandbox_dir.mkdir()
    outside.write_bytes(b"the host's own file")
    (sandbox_dir / image_name(1)).symlink_to(outside)
    trio.run(make_image, sandbox_dir, os.getuid(), 1, MIB, lambda fd: fill_with(fd, b"ext4"))
    assert outside.read_bytes() == b"the host's own file"
    image = sandbox_dir / image_name(1)
    assert not image.is_symlink() and image.stat().st_size == MIB
    assert image.read_bytes()[:4] == b"ext4"


@pytest.mark.parametrize("plant", ["symlink", "directory", "fifo", "empty", "odd size", "missing"])
def test_the_vmm_opens_only_a_regular_image_of_its_own(tmp_path: Path, plant: str) -> None:
    """What the VMM's uid (a VMM its guest took over) may have left at the image's name."""
    target = tmp_path / "elsewhere"
    target.write_bytes(bytes(MIB))
    path = tmp_path / image_name(2)
    if plant == "symlink":
        path.symlink_to(target)
    elif plant == "directory":
        path.mkdir()
    elif plant == "fifo":
        os.mkfifo(path)
    elif plant == "empty":
        path.write_bytes(b"")
    elif plant == "odd size":
        path.write_bytes(bytes(1000))
    with pytest.raises((OSError, ValueError)):
        open_image(tmp_path, 2)


def test_a_slot_the_guest_does_not_have_is_refused(tmp_path: Path) -> None:
    for slot in (0, FIRST_SLOT + VOLUME_SLOTS):
        with pytest.raises(ValueError, match="at most"):
            trio.run(make_image, tmp_path, os.getuid(), slot, MIB, lambda fd: fill_with(fd, b""))
        with pytest.raises(ValueError, match="at most"):
            open_image(tmp_path, slot)
    assert list(tmp_path.iterdir()) == []


def test_attach_disk_names_a_slot_and_other_requests_stay_as_they_were() -> None:
    request = Request(Op.ATTACH_DISK, slot=2)
    assert Request.decode(request.encode()) == request
    # An older supervisor refuses unknown fields: only attach_disk carries one.
    assert b"slot" not in Request(Op.STATE).encode()
    with pytest.raises(ProtocolError):
        Request.decode(b'{"op": "attach_disk", "slot": "../../etc/passwd"}\n')
    with pytest.raises(ProtocolError):
        Request.decode(b'{"op": "attach_disk", "slot": -1}\n')
