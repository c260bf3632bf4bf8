"""The serial port's output into the sandbox's console log.

The 8250 model hands output over a byte per port write, in whichever vCPU thread
wrote it. Bytes gather here and go, in order, to the sandbox's `ConsoleLog` in the
Trio thread (which caps the log, keeps the tail for failure reports and sets the
guest agent's ready events): one Trio callback at a time takes everything written
since the last one, so a busy console costs a callback per batch, not per byte.
Nothing blocks a vCPU.

It also watches for the kernel's last line before it powers off: without ACPI a microVM
kernel has no way to power the machine off, it halts its CPUs and KVM keeps them asleep
in HLT, so the runtime would never see the guest stop. The line ends the machine instead
(`on_power_down`). Which line: "reboot: Power down" where the kernel has a power-off
method, "reboot: System halted" where it has none (kernel/reboot.c turns the power-off
request into a halt: what the microVM kernel does when cube-init powers off).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import trio

from appliance.runtime.uml.console import ConsoleLog

POWER_DOWN_LINES = (b"reboot: Power down", b"reboot: System halted")
_LINE_KEPT = 2 * max(map(len, POWER_DOWN_LINES)) + 32  # a timestamp, then the text


class SerialConsole:
    def __init__(self, console: ConsoleLog, token: trio.lowlevel.TrioToken | None = None) -> None:
        self.console = console
        # Called (in the vCPU thread) when the guest kernel has printed its power-down line.
        self.on_power_down: Callable[[], None] = lambda: None
        self._token = token or trio.lowlevel.current_trio_token()
        self._lock = threading.Lock()
        self._pending = bytearray()
        self._line = bytearray()  # the current line's start, enough to recognise POWER_DOWN_LINES
        self._drain_scheduled = False

    def write(self, data: bytes) -> None:
        """The serial port's sink: any thread."""
        self._watch(data)
        with self._lock:
            self._pending += data
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        self._token.run_sync_soon(self.drain)

    def _watch(self, data: bytes) -> None:
        for byte in data:
            if byte == 0x0A:
                if self._line.rstrip(b"\r").endswith(POWER_DOWN_LINES):
                    self.on_power_down()
                self._line.clear()
            elif len(self._line) < _LINE_KEPT:
                self._line.append(byte)

    def drain(self) -> None:
        """Hand what was written so far to the console log (Trio thread)."""
        with self._lock:
            chunk = bytes(self._pending)
            self._pending.clear()
            self._drain_scheduled = False
        if chunk:
            self.console.feed(chunk)
