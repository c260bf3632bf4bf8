"""The control protocol's framing: messages are lines of bounded length.

`LineBuffer` is the framing itself, without I/O (bytes in, whole lines out), so both
sides and the tests share one definition of what a line is and when one is too long.
`receive_line` and `send_all` are the only I/O around it: a trio socket's, as the service
(client.py) and the supervisor (server.py) use it.
"""

from __future__ import annotations

import trio

from appliance.runtime.supervisor.protocol import ProtocolError

RECEIVE_BYTES = 65536


class LineBuffer:
    """Bytes as they arrive in, lines (without their newline) out. A line, or what is buffered
    of one, over `limit` bytes is a ProtocolError: a peer cannot make this side buffer more."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_line(self) -> bytes | None:
        """The next whole line, or None until its newline has arrived."""
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > self.limit:
                raise ProtocolError(f"a message over {self.limit} bytes")
            return None
        if end + 1 > self.limit:
            raise ProtocolError(f"a message over {self.limit} bytes")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line

    @property
    def pending(self) -> int:
        """Bytes received that are not a whole line yet."""
        return len(self._buffer)


async def receive_line(sock: trio.socket.SocketType, lines: LineBuffer) -> bytes | None:
    """The next line from `sock`; None once the peer has closed before another newline."""
    while (line := lines.next_line()) is None:
        chunk = await sock.recv(min(RECEIVE_BYTES, lines.limit + 1))
        if not chunk:
            return None
        lines.feed(chunk)
    return line


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]
