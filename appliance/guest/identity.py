"""File I/O with a user's identity: what `/files` and `filesystem.Filesystem` calls go through.

The agent runs as root, but `files.read("/root/secret", user="user")` must fail as it would
for `user`, and what `user` creates must be theirs. The I/O for another user runs in a
worker thread that takes the user's filesystem identity (fsuid, fsgid, supplementary
groups) for the duration of one call, then gives it back.

Why threads and fsuid, and why that is safe under concurrency:
- On Linux, credentials belong to a thread. The raw `setfsuid`, `setfsgid` and `setgroups`
  system calls change only the calling thread (glibc's `setgroups()` would change every
  thread of the process, so it is called through `syscall()` instead). The event loop's
  thread, and every other worker, keep root's identity while one worker acts as `user`.
- The kernel drops the filesystem capabilities (CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_CHOWN…)
  from a thread whose fsuid is not 0, so permission checks are exactly `user`'s, and gives
  them back when fsuid returns to 0. Files and directories the thread creates are owned by
  the fsuid/fsgid: no chown afterwards (which would leave a window with root's ownership).
- A call finishes in its worker even if the request is cancelled (trio does not abandon
  the thread), and the identity is restored in `finally` before the thread goes back to
  trio's cache; each call also checks it starts from the agent's own identity.
- A fork per call would be safe too, but costs a process per file operation (and page-table
  copies of a process holding kernels' buffers): far slower, especially under UML.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Callable
from typing import TypeVar

import trio

from appliance.guest.users import User

T = TypeVar("T")

# setgroups(2) numbers: the raw call is per thread, the libc wrapper is process-wide.
# User-mode Linux runs on x86-64 hosts only and uses their system call numbers.
SETGROUPS_SYSCALL = {"x86_64": 116, "um": 116, "aarch64": 159, "riscv64": 159}
_libc: ctypes.CDLL | None = None


def _c_library() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _set_groups(groups: list[int]) -> None:
    number = SETGROUPS_SYSCALL.get(platform.machine())
    if number is None:
        raise OSError(f"no per-thread setgroups for {platform.machine()}")
    array = (ctypes.c_uint * max(len(groups), 1))(*groups)
    libc = _c_library()
    if libc.syscall(ctypes.c_long(number), ctypes.c_size_t(len(groups)), array) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def _set_fs_ids(uid: int, gid: int) -> None:
    # setfsuid/setfsgid report no errors, only the previous id; a second call with -1 reads
    # the current one back, which tells whether the switch happened.
    libc = _c_library()
    libc.setfsgid(gid)
    libc.setfsuid(uid)
    if libc.setfsuid(-1) != uid or libc.setfsgid(-1) != gid:
        raise PermissionError(f"could not take filesystem identity {uid}:{gid}")


def call_as(user: User, function: Callable[..., T], *args: object) -> T:
    """Call `function(*args)` in this (worker) thread with `user`'s filesystem identity."""
    own_uid, own_gid = os.geteuid(), os.getegid()
    own_groups = os.getgroups()
    libc = _c_library()
    if libc.setfsuid(-1) != own_uid or libc.setfsgid(-1) != own_gid:
        raise RuntimeError("a worker thread kept another user's filesystem identity")
    _set_groups(user.groups())
    try:
        _set_fs_ids(user.uid, user.gid)
        return function(*args)
    finally:
        _set_fs_ids(own_uid, own_gid)
        _set_groups(own_groups)


async def as_user(user: User, function: Callable[..., T], *args: object, thread: bool = False) -> T:
    """`function(*args)` acting as `user`: in a worker with the user's identity if that is not
    the agent's own, else on the event loop (small calls) or, with `thread`, in a worker."""
    if user.needs_switch():
        return await trio.to_thread.run_sync(call_as, user, function, *args)
    if thread:
        return await trio.to_thread.run_sync(function, *args)
    return function(*args)
