"""Just enough of the i8042 keyboard controller for Linux to reboot through it.

Linux's `reboot=k` writes 0xFE (pulse reset line) to the command port; the VMM
treats that as the guest asking to stop. Port 0x60 is data, 0x64 status/command.
"""

from __future__ import annotations

from collections.abc import Callable

DATA_PORT_OFFSET = 0
COMMAND_PORT_OFFSET = 4
CMD_RESET_CPU = 0xFE


class I8042:
    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self.reset_requested = False

    def read(self, offset: int, size: int) -> bytes:
        # Status 0: output buffer empty, input buffer empty (never busy).
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        if offset == COMMAND_PORT_OFFSET and data[0] == CMD_RESET_CPU:
            self.reset_requested = True
            self._on_reset()
