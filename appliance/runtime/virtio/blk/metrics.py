from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BlockMetrics:
    read_count: int = 0
    write_count: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    flush_count: int = 0
    discard_count: int = 0
    invalid_requests: int = 0
    io_errors: int = 0
    throttled_events: int = 0
