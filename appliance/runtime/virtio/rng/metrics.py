from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RngMetrics:
    requests: int = 0
    bytes_served: int = 0
