"""The guest's console: UML writes it to a pipe, its supervisor copies it to the console log.

Reading the pipe (rather than polling a file) tells the runtime the moment the
guest agent prints its ready lines: `CUBE-AGENT-READY` (envd answers: the sandbox
may be handed out) then `CUBE-INTERPRETER-READY` (the default Python kernel is up:
what a warm-pool instance waits for), and the moment the guest kernel panics (a
panicked UML kernel stops but does not exit: its supervisor ends it). A guest that
prints a panic line itself only ends itself. The log file is capped so a chatty guest
cannot fill the host's disk; the pipe is still drained past the cap, or the
guest would block on its console.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import trio

READY_LINE = b"CUBE-AGENT-READY"
INTERPRETER_READY_LINE = b"CUBE-INTERPRETER-READY"
PANIC_LINE = b"Kernel panic - not syncing"
_LONGEST_MARK = max(len(READY_LINE), len(INTERPRETER_READY_LINE), len(PANIC_LINE))
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
        self.panicked = trio.Event()  # the guest kernel printed its panic line
        self._tail = bytearray()
        self._written = 0

    @property
    def written(self) -> int:
        """Bytes in the log file (at most `limit`)."""
        return self._written

    def panic_message(self) -> str:
        """The panic line as far as it has come (`Kernel panic - not syncing: <why>`)."""
        text = self.tail(TAIL_BYTES)
        at = text.rfind(PANIC_LINE.decode())
        return text[at:].split("\n", 1)[0].strip() if at >= 0 else ""

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
        window = bytes(self._tail[-_LONGEST_MARK:]) + chunk
        self._tail += chunk
        self.first_output.set()
        del self._tail[:-TAIL_BYTES]
        if not self.ready.is_set() and READY_LINE in window:
            self.ready.set()
        if not self.panicked.is_set() and PANIC_LINE in window:
            self.panicked.set()
        if not self.interpreter_ready.is_set() and INTERPRETER_READY_LINE in window:
            self.ready.set()  # the agent prints it second; never wait for a line already gone by
            self.interpreter_ready_at = trio.current_time()
            self.interpreter_ready.set()
