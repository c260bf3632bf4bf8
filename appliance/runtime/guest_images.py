"""Disk images the host makes for a running guest (a volume's ext4 image, cubelet/volume_mounts.py),
in a directory the guest's uid owns: uml's vm directory, kvm's sandbox directory.

That directory is the guest's (a UML process, or a VMM taken over by its guest, may write
there), so an image is created through the directory's fd, without following a link and only
if nothing is there, and is filled through its own fd: a link planted there cannot make the
host write a file of its own. The host never reads the image back.
"""

from __future__ import annotations

import os
from pathlib import Path


def new_image(directory: Path, name: str, size_bytes: int, uid: int) -> int:
    """A new sparse file `name` in `directory` of `size_bytes`, owned by `uid`; its fd (the caller
    closes it)."""
    directory_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            os.unlink(name, dir_fd=directory_fd)  # whatever the guest's uid left there (never followed)
        except FileNotFoundError:
            pass
        fd = os.open(
            name,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=directory_fd,
        )
    finally:
        os.close(directory_fd)
    try:
        os.ftruncate(fd, size_bytes)
        os.fchown(fd, uid, uid)
    except BaseException:
        os.close(fd)
        raise
    return fd
