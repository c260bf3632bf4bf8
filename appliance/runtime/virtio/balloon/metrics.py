from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BalloonMetrics:
    reports: int = 0  # reporting-queue buffers handled
    reported_bytes: int = 0  # what those buffers described
    released_bytes: int = 0  # punched out of the memory file (whole pages inside guest RAM)
    rejected_ranges: int = 0  # ranges outside guest RAM or not page-sized: acknowledged, not released
    release_errors: int = 0  # fallocate failures (e.g. a memory file that cannot punch holes)
    ignored_buffers: int = 0  # inflate/deflate buffers: the host never asks for them
