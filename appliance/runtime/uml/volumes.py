"""Block devices hot-plugged into a booted UML guest: how a volume reaches a sandbox.

The guest kernel has no 9p, NFS or FUSE and hostfs is refused (kernel.py), so a volume
is an image file the guest sees as one more ubd device, plugged through its mconsole
(`config ubdN=<file>`) into a guest that is already up (a pooled one at its claim, a
cold one the same way). The file is made in the guest's vm directory, which the UML
process sees at the same path; the host never mounts it, never reads it back
(cubelet/volume_mounts.py brings the files back through the guest agent).

The vm directory belongs to the guest's uid, so the image is made as runtime/guest_images.py
says (no link followed, filled through its own fd: `/proc/self/fd/N` to the filler).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from appliance.runtime.guest_images import new_image
from appliance.runtime.uml.mconsole import Mconsole

FIRST_SLOT = 1  # ubd0 is the guest's root disk
MAX_SLOTS = 8  # UML's ubd driver has 16; a sandbox gets a few
IMAGE_PREFIX = "volume-"


def guest_device(slot: int) -> str:
    """The guest's name of ubd device `slot` (`ubd1` is /dev/ubdb)."""
    return "/dev/ubd" + chr(ord("a") + slot)


async def hotplug_image(
    mconsole: Mconsole,
    vm_dir: Path,
    uid: int,
    slot: int,
    size_bytes: int,
    fill: Callable[[int], Awaitable[None]],
) -> str:
    """Make image `slot` (`fill(fd)` writes its filesystem), plug it in as ubd<slot>; the guest's
    device path. Raises OSError or MconsoleError (the guest refused the device)."""
    if not FIRST_SLOT <= slot < FIRST_SLOT + MAX_SLOTS:
        raise ValueError(f"ubd slot {slot} is not one for volumes")
    name = f"{IMAGE_PREFIX}{slot}.img"
    fd = new_image(vm_dir, name, size_bytes, uid)
    try:
        await fill(fd)
    finally:
        os.close(fd)
    await mconsole.request(f"config ubd{slot}={vm_dir / name}")
    return guest_device(slot)
