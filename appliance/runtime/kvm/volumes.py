"""Volume slots: how a volume's disk image reaches a running kvm guest (cubelet/volume_mounts.py).

A booted Linux guest cannot take a new virtio-mmio device (the devices are declared on its
kernel command line, probed once), so every kvm guest is made with VOLUME_SLOTS virtio-blk
devices of 0 bytes beside its root disk (`vdb`, `vdc`: vmm.py's DEVICE_SLOTS). They are in
every template snapshot too, so a guest restored from one has them exactly as a cold-booted
guest does. At the claim, for volume slot N:
1. the service makes `volume-N.img` in the sandbox's directory (runtime/guest_images.py: no
   link followed, nothing there before) and fills it (the volume's ext4, made by mke2fs
   through the image's own fd);
2. it asks the VMM (`attach_disk`, naming the slot only) to plug it in: the VMM opens that one
   name in its own directory, without following a link, checks it is a regular file of a
   whole number of sectors within the cap, makes it the slot's disk and raises the slot's
   config-change interrupt (virtio 1.x §4.2.2.1, as for a disk that grew: Firecracker's
   drive update does the same);
3. the guest's virtio_blk driver reads the new capacity and `vdb` has the volume's size: the
   guest agent waits for that, then mounts it (volume_mounts.MOUNT_SCRIPT).
A slot is plugged once: the disk the guest has seen is never swapped under it. The image
lives and dies with the sandbox's directory; the host never mounts it or reads it back (the
files come back through the guest agent's tar).

A guest holding a volume is never memory-checkpointed (a full snapshot or a fork would copy
a mounted filesystem whose disk is not in the checkpoint; cubelet/checkpoints.py refuses it).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

from appliance.runtime.guest_images import new_image
from appliance.runtime.virtio.blk.device import SECTOR
from appliance.runtime.virtio.blk.disk import RawDisk

VOLUME_SLOTS = 2  # the ISA interrupt lines left after the four devices every sandbox has
FIRST_SLOT = 1  # vda is the root disk
# A volume image is its cap and mke2fs's overhead (cubelet/volume_mounts.py); the VMM refuses a
# file larger than this, whatever the service or the sandbox's uid put there.
MAX_IMAGE_BYTES = 1 << 40


def slot_name(slot: int) -> str:
    """The device's name in DEVICE_SLOTS and in a snapshot's device states."""
    return f"volume-{slot}"


def image_name(slot: int) -> str:
    """The image's file in the sandbox's directory."""
    return f"volume-{slot}.img"


def guest_device(slot: int) -> str:
    """The guest's device of volume slot `slot`: the virtio-blk devices are probed in
    DEVICE_SLOTS order, the root disk first (`vda`)."""
    return "/dev/vd" + chr(ord("a") + slot)


def check_slot(slot: int) -> None:
    if not FIRST_SLOT <= slot < FIRST_SLOT + VOLUME_SLOTS:
        raise ValueError(f"a kvm sandbox takes at most {VOLUME_SLOTS} volumes (slot {slot} asked)")


async def make_image(
    sandbox_dir: Path, uid: int, slot: int, size_bytes: int, fill: Callable[[int], Awaitable[None]]
) -> None:
    """The service's side: image `slot` made in the sandbox's directory (the VMM's uid's) and
    filled (`fill(fd)`); the VMM plugs it in when asked."""
    check_slot(slot)
    fd = new_image(sandbox_dir, image_name(slot), size_bytes, uid)
    try:
        await fill(fd)
    finally:
        os.close(fd)


def open_image(sandbox_dir: Path, slot: int) -> RawDisk:
    """The VMM's side: the image of `slot` in its own directory, checked (a regular file, not a
    link, a whole number of sectors, at most MAX_IMAGE_BYTES). ValueError or OSError otherwise."""
    check_slot(slot)
    fd = os.open(sandbox_dir / image_name(slot), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{image_name(slot)} is not a regular file")
        size = info.st_size
        if size == 0 or size % SECTOR or size > MAX_IMAGE_BYTES:
            raise ValueError(f"{image_name(slot)} has {size} bytes, not a volume image's size")
    except BaseException:
        os.close(fd)
        raise
    return RawDisk(fd, size)
