"""What a virtio device needs from guest memory; the VMM's GuestMemory and the
vhost-user backend's mapping of the frontend's memory both provide it."""

from __future__ import annotations

from typing import Protocol


class GuestMemoryAccess(Protocol):
    def slice(self, gpa: int, length: int) -> memoryview:
        """Writable view of guest-physical [gpa, gpa+length); raises ValueError outside RAM."""
        ...

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None: ...

    def read_int(self, gpa: int, size: int) -> int: ...

    def write_int(self, gpa: int, size: int, value: int) -> None: ...
