"""The serial port's output into the sandbox's console log.

The 8250 model hands output over a byte per port write, in whichever vCPU thread
wrote it. Bytes gather here and go, in order, to the sandbox's `ConsoleLog` in the
Trio thread (which caps the log, keeps the tail for failure reports and sets the
guest agent's ready events): one Trio callback at a time takes everything written
since the last one, so a busy console costs a callback per batch, not per byte.
Nothing blocks a vCPU.
"""

from __future__ import annotations

import threading

import trio

from appliance.runtime.uml.console import ConsoleLog


class SerialConsole:
    def __init__(self, console: ConsoleLog, token: trio.lowlevel.TrioToken | None = None) -> None:
        self.console = console
        self._token = token or trio.lowlevel.current_trio_token()
        self._lock = threading.Lock()
        self._pending = bytearray()
        self._drain_scheduled = False

    def write(self, data: bytes) -> None:
        """The serial port's sink: any thread."""
        with self._lock:
            self._pending += data
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        self._token.run_sync_soon(self.drain)

    def drain(self) -> None:
        """Hand what was written so far to the console log (Trio thread)."""
        with self._lock:
            chunk = bytes(self._pending)
            self._pending.clear()
            self._drain_scheduled = False
        if chunk:
            self.console.feed(chunk)
