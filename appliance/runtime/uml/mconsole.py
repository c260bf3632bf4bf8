"""A client for UML's management console (arch/um/drivers/mconsole_*).

The guest kernel listens on a unix datagram socket (`<uml_dir>/<umid>/mconsole`)
and answers each request datagram to the sender's address, possibly in several
parts (`more` set on all but the last). The UML process runs in its own mount
namespace, so the client binds a *path* socket inside the sandbox directory
(mounted at the same path in the guest's namespace) that the guest's uid may
write to; an abstract address would not do either, the guest is in another netns.

Commands the runtime uses: `stop` (freeze: the kernel then only serves
mconsole), `go` (resume), `halt`, `sysrq <key>`, `version`.
"""

from __future__ import annotations

import os
import secrets
import socket
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


class Mconsole:
    """Serialised requests to one guest's mconsole socket."""

    def __init__(self, socket_path: Path, client_dir: Path, owner_uid: int) -> None:
        self.socket_path = socket_path
        self._client_dir = client_dir
        self._owner_uid = owner_uid
        self._lock = trio.Lock()

    async def request(self, command: str, timeout: float = 5.0) -> str:
        """Send `command`; return the reply text or raise MconsoleError with the guest's message."""
        data = command.encode()
        if len(data) >= MAX_DATA:
            raise ValueError(f"mconsole command too long: {command[:40]!r}...")
        packet = _REQUEST.pack(MAGIC, VERSION, len(data)) + data.ljust(MAX_DATA, b"\0")
        async with self._lock:
            client_path = self._client_dir / f"mc-{secrets.token_hex(4)}"  # short: sun_path is 108 bytes
            with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                await sock.bind(os.fspath(client_path))
                try:
                    # The guest replies as its own unprivileged uid.
                    os.chown(client_path, self._owner_uid, -1)
                    await sock.connect(os.fspath(self.socket_path))
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
                    client_path.unlink(missing_ok=True)
        text = "".join(parts)
        if err:
            raise MconsoleError(f"mconsole {command!r}: {text}")
        return text
