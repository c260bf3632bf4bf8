from __future__ import annotations

from dataclasses import dataclass


@dataclass
class NetMetrics:
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_dropped_no_buffer: int = 0  # frames that did not fit the guest's buffers
    tx_errors: int = 0
    throttled_events: int = 0
