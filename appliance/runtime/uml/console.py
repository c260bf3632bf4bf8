"""The guest's console: UML writes it to a pipe, the service copies it to the console log.

Reading the pipe (rather than polling a file) tells the runtime the moment the
guest agent prints its ready lines: `CUBE-AGENT-READY` (envd answers: the sandbox
may be handed out) then `CUBE-INTERPRETER-READY` (the default Python kernel is up:
what a warm-pool instance waits for). The log file is capped so a chatty guest
cannot fill the host's disk; the pipe is still drained past the cap, or the
guest would block on its console.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import trio

READY_LINE = b"CUBE-AGENT-READY"
INTERPRETER_READY_LINE = b"CUBE-INTERPRETER-READY"
LOG_LIMIT_BYTES = 4 << 20
TAIL_BYTES = 8192


class ConsoleLog:
    def __init__(self, path: Path, limit: int = LOG_LIMIT_BYTES) -> None:
        self.path = path
        self.limit = limit
        self.ready = trio.Event()
        self.interpreter_ready = trio.Event()
        self.interpreter_ready_at: float | None = None  # trio clock
        self.finished = trio.Event()  # the guest closed its console (its processes are gone)
        self.first_output = trio.Event()  # the guest kernel wrote anything at all
        self._tail = bytearray()
        self._written = 0

    def tail(self, max_bytes: int = 4096) -> str:
        return bytes(self._tail[-max_bytes:]).decode(errors="replace")

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        """Copy the console to the log until the guest closes it (its process ended)."""
        try:
            with self.path.open("ab", buffering=0) as log:
                async for chunk in stream:
                    self._log(log, chunk)
        finally:
            self.finished.set()

    def feed(self, chunk: bytes) -> None:
        """Log one piece of output that arrives by call, not on a stream (the kvm serial port)."""
        with self.path.open("ab", buffering=0) as log:
            self._log(log, chunk)

    def _log(self, log: BinaryIO, chunk: bytes | bytearray) -> None:
        self._note(chunk)
        if self._written < self.limit:
            piece = chunk[: self.limit - self._written]
            log.write(piece)
            self._written += len(piece)

    def _note(self, chunk: bytes | bytearray) -> None:
        # Search across the chunk boundary: a line may arrive split.
        window = bytes(self._tail[-len(INTERPRETER_READY_LINE) :]) + chunk
        self._tail += chunk
        self.first_output.set()
        del self._tail[:-TAIL_BYTES]
        if not self.ready.is_set() and READY_LINE in window:
            self.ready.set()
        if not self.interpreter_ready.is_set() and INTERPRETER_READY_LINE in window:
            self.ready.set()  # the agent prints it second; never wait for a line already gone by
            self.interpreter_ready_at = trio.current_time()
            self.interpreter_ready.set()
