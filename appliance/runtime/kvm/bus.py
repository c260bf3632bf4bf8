"""Address buses that route port-I/O and MMIO exits to the device owning the address.

A device sees only offsets into its own range. Each registration has its own
lock: vCPU threads and Trio-side device tasks may touch one device concurrently.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Protocol


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


@dataclass
class _Range:
    base: int
    length: int
    device: BusDevice
    lock: threading.Lock = field(default_factory=threading.Lock)


class Bus:
    def __init__(self, name: str) -> None:
        self.name = name
        self._ranges: list[_Range] = []
        self._bases: list[int] = []
        # Accesses no device claimed: the guest probing absent hardware reads all-ones.
        self.unclaimed_accesses = 0

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        index = bisect.bisect_right(self._bases, base)
        before = self._ranges[index - 1] if index else None
        after = self._ranges[index] if index < len(self._ranges) else None
        if (before and before.base + before.length > base) or (after and base + length > after.base):
            raise ValueError(f"{self.name}: {base:#x}+{length:#x} overlaps a registered device")
        self._ranges.insert(index, _Range(base, length, device))
        self._bases.insert(index, base)

    def _find(self, address: int) -> _Range | None:
        index = bisect.bisect_right(self._bases, address) - 1
        if index >= 0:
            candidate = self._ranges[index]
            if address < candidate.base + candidate.length:
                return candidate
        return None

    def read(self, address: int, size: int) -> bytes:
        found = self._find(address)
        if found is None:
            self.unclaimed_accesses += 1
            return b"\xff" * size
        with found.lock:
            return found.device.read(address - found.base, size)

    def write(self, address: int, data: bytes) -> None:
        found = self._find(address)
        if found is None:
            self.unclaimed_accesses += 1
            return
        with found.lock:
            found.device.write(address - found.base, data)
