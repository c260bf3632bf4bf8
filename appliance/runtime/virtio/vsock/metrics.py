from __future__ import annotations

from dataclasses import dataclass


@dataclass
class VsockMetrics:
    connections_from_guest: int = 0
    connections_from_host: int = 0
    connect_failures: int = 0
    rx_bytes: int = 0  # host → guest payload
    tx_bytes: int = 0  # guest → host payload
    resets_sent: int = 0
