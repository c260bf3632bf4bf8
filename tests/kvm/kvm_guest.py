"""Helpers of the KVM tests: guest payloads assembled with GNU as (binutils), and a
bus device that records what the guest did."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path


def assemble(source: str, *, origin: int) -> bytes:
    """Flat binary of `source` (AT&T syntax, 64-bit) linked to run at guest address `origin`."""
    with tempfile.TemporaryDirectory(prefix="cubetest-kvm-") as tmp:
        work = Path(tmp)
        (work / "p.s").write_text(".code64\n.text\n.globl _start\n_start:\n" + source + "\n")
        subprocess.run(["as", "--64", "-o", work / "p.o", work / "p.s"], check=True, capture_output=True)
        subprocess.run(
            ["ld", "-static", "-nostdlib", f"-Ttext={origin:#x}", "-o", work / "p.elf", work / "p.o"],
            check=True,
            capture_output=True,
        )
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", work / "p.elf", work / "p.bin"], check=True)
        return (work / "p.bin").read_bytes()


def serial_print(message: str, then: str) -> str:
    """Assembly that writes `message` (a C string in GNU as's escapes) to the serial port (COM1,
    0x3F8) byte by byte, then runs `then`: how the guest ends (a halt loop, a stop port...)."""
    return f"""
        lea message(%rip), %rsi
        mov $0x3F8, %dx
    next:
        lodsb
        test %al, %al
        jz done
        out %al, %dx
        jmp next
    done:
        {then}
    message:
        .asciz "{message}"
    """


class RecordingDevice:
    """A bus device that logs every access and answers reads from a callback."""

    def __init__(self, answer: Callable[[int, int], int] = lambda offset, size: 0) -> None:
        self.writes: list[tuple[int, int]] = []
        self.reads: list[tuple[int, int]] = []
        self._answer = answer
        self.on_write: Callable[[int, int], None] | None = None

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return self._answer(offset, size).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        self.writes.append((offset, value))
        if self.on_write is not None:
            self.on_write(offset, value)
