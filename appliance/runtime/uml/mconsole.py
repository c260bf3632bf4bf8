"""A client for UML's management console (arch/um/drivers/mconsole_*).

The guest kernel listens on a unix datagram socket (`<uml_dir>/<umid>/mconsole`)
and answers each request datagram to the sender's address, possibly in several
parts (`more` set on all but the last). The UML process runs in its own mount
namespace, so the client binds a *path* socket that the guest's uid may write
to, in a directory mounted at the same path in the guest's namespace; an
abstract address would not do either, the guest is in another netns.

The service is root and the guest's uid is hostile, so neither path may be
swapped under it. The client's socket lives in `reply_dir`, which root owns
(0711: the guest may reach a socket there, never add, remove or rename an
entry) and is chowned through that directory's fd without following links:
chowning a path in a directory the guest owns could be raced into chowning any
host file. The guest's socket is in its own directory, so it is opened one
component at a time with O_NOFOLLOW, checked to be a socket of the guest's uid,
and connected to through that fd (/proc/self/fd/N): a link planted there
cannot send the service's datagrams to a host socket.

Commands the runtime uses: `stop` (freeze: the kernel then only serves
mconsole), `go` (resume), `halt`, `sysrq <key>`, `version`.
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
import struct
from pathlib import Path

import trio

MAGIC = 0xCAFEBABE
VERSION = 2
MAX_DATA = 512
_REQUEST = struct.Struct("=III")  # magic, version, len; then MAX_DATA bytes of data
_REPLY = struct.Struct("=III")  # err, more, len; then data


class MconsoleError(Exception):
    pass


def _open_socket_path(socket_path: Path, below: Path, owner_uid: int) -> int:
    """An O_PATH fd of the socket at `socket_path`, a path under `below` (whose own parents
    are root's), reached without following a link, owned by `owner_uid`."""
    parts = socket_path.relative_to(below).parts
    fd = os.open(below, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if last else os.O_DIRECTORY)
            next_fd = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        info = os.fstat(fd)
        if not stat.S_ISSOCK(info.st_mode) or info.st_uid != owner_uid:
            raise MconsoleError(f"{socket_path} is not the guest's mconsole socket")
        return fd
    except OSError as e:  # ELOOP: a link where a directory or the socket should be
        os.close(fd)
        raise MconsoleError(f"{socket_path}: {e.strerror}") from e
    except BaseException:
        os.close(fd)
        raise


class Mconsole:
    """Serialised requests to one guest's mconsole socket."""

    def __init__(self, socket_path: Path, guest_dir: Path, reply_dir: Path, owner_uid: int) -> None:
        self.socket_path = socket_path  # under guest_dir, the guest uid's directory
        self._guest_dir = guest_dir
        self._reply_dir = reply_dir  # root's, 0711, the same path in the guest's mount namespace
        self._owner_uid = owner_uid
        self._lock = trio.Lock()

    @property
    def guest_dir(self) -> Path:
        """The guest uid's own directory (its vm directory), at the same path in its namespace."""
        return self._guest_dir

    @property
    def owner_uid(self) -> int:
        return self._owner_uid

    async def request(self, command: str, timeout: float = 5.0) -> str:
        """Send `command`; return the reply text or raise MconsoleError with the guest's message."""
        data = command.encode()
        if len(data) >= MAX_DATA:
            raise ValueError(f"mconsole command too long: {command[:40]!r}...")
        packet = _REQUEST.pack(MAGIC, VERSION, len(data)) + data.ljust(MAX_DATA, b"\0")
        async with self._lock:
            name = f"mc-{secrets.token_hex(4)}"  # short: sun_path is 108 bytes
            client_path = self._reply_dir / name
            with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                await sock.bind(os.fspath(client_path))
                reply_dir = os.open(
                    self._reply_dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                )
                try:
                    # The guest replies as its own unprivileged uid.
                    os.chown(name, self._owner_uid, -1, dir_fd=reply_dir, follow_symlinks=False)
                    server = _open_socket_path(self.socket_path, self._guest_dir, self._owner_uid)
                    try:
                        await sock.connect(f"/proc/self/fd/{server}")
                    finally:
                        os.close(server)
                    await sock.send(packet)
                    parts: list[str] = []
                    with trio.fail_after(timeout):
                        while True:
                            reply = await sock.recv(_REPLY.size + MAX_DATA)
                            err, more, length = _REPLY.unpack_from(reply)
                            # Each part's data ends in a NUL that `length` counts.
                            part = reply[_REPLY.size : _REPLY.size + length].rstrip(b"\0")
                            parts.append(part.decode(errors="replace"))
                            if not more:
                                break
                finally:
                    os.unlink(name, dir_fd=reply_dir)
                    os.close(reply_dir)
        text = "".join(parts)
        if err:
            raise MconsoleError(f"mconsole {command!r}: {text}")
        return text
