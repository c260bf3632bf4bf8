"""The guest's console: UML writes it to a pipe, the service copies it to the console log.

Reading the pipe (rather than polling a file) tells the runtime the moment the
guest agent prints its ready line. The log file is capped so a chatty guest
cannot fill the host's disk; the pipe is still drained past the cap, or the
guest would block on its console.
"""

from __future__ import annotations

from pathlib import Path

import trio

READY_LINE = b"CUBE-AGENT-READY"
LOG_LIMIT_BYTES = 4 << 20
TAIL_BYTES = 8192


class ConsoleLog:
    def __init__(self, path: Path, limit: int = LOG_LIMIT_BYTES) -> None:
        self.path = path
        self.limit = limit
        self.ready = trio.Event()
        self.finished = trio.Event()  # the guest closed its console (its processes are gone)
        self._tail = bytearray()
        self._written = 0

    def tail(self, max_bytes: int = 4096) -> str:
        return bytes(self._tail[-max_bytes:]).decode(errors="replace")

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        """Copy the console to the log until the guest closes it (its process ended)."""
        try:
            with self.path.open("ab", buffering=0) as log:
                async for chunk in stream:
                    self._note(chunk)
                    if self._written < self.limit:
                        piece = chunk[: self.limit - self._written]
                        log.write(piece)
                        self._written += len(piece)
        finally:
            self.finished.set()

    def _note(self, chunk: bytes | bytearray) -> None:
        # Search across the chunk boundary: the line may arrive split.
        window = bytes(self._tail[-len(READY_LINE) :]) + chunk
        self._tail += chunk
        del self._tail[:-TAIL_BYTES]
        if not self.ready.is_set() and READY_LINE in window:
            self.ready.set()
