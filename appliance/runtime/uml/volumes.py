"""Block devices hot-plugged into a booted UML guest: how a volume reaches a sandbox.

The guest kernel has no 9p, NFS or FUSE and hostfs is refused (kernel.py), so a volume
is an image file the guest sees as one more ubd device, plugged through its mconsole
(`config ubdN=<file>`) into a guest that is already up (a pooled one at its claim, a
cold one the same way). The file is made in the guest's vm directory, which the UML
process sees at the same path; the host never mounts it, never reads it back
(cubelet/volume_mounts.py brings the files back through the guest agent).

The vm directory belongs to the guest's uid, so the image is created through that
directory's fd, without following a link and only if nothing is there, and is filled
through its own fd (`/proc/self/fd/N` to the filler): a link the guest planted cannot
make the host write a file of its own.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from appliance.runtime.uml.mconsole import Mconsole

FIRST_SLOT = 1  # ubd0 is the guest's root disk
MAX_SLOTS = 8  # UML's ubd driver has 16; a sandbox gets a few
IMAGE_PREFIX = "volume-"


def guest_device(slot: int) -> str:
    """The guest's name of ubd device `slot` (`ubd1` is /dev/ubdb)."""
    return "/dev/ubd" + chr(ord("a") + slot)


def _new_image(vm_dir: Path, name: str, size_bytes: int, uid: int) -> int:
    """A new sparse file `name` in `vm_dir` of `size_bytes`, owned by the guest's uid; its fd."""
    directory = os.open(vm_dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            os.unlink(name, dir_fd=directory)  # whatever the guest's uid left there (never followed)
        except FileNotFoundError:
            pass
        fd = os.open(
            name,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=directory,
        )
    finally:
        os.close(directory)
    try:
        os.ftruncate(fd, size_bytes)
        os.fchown(fd, uid, uid)
    except BaseException:
        os.close(fd)
        raise
    return fd


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
    fd = _new_image(vm_dir, name, size_bytes, uid)
    try:
        await fill(fd)
    finally:
        os.close(fd)
    await mconsole.request(f"config ubd{slot}={vm_dir / name}")
    return guest_device(slot)
