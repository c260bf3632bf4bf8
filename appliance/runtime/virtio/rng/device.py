"""virtio-rng device model (virtio 1.x §5.4): one queue of device-writable buffers."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from appliance.runtime.virtio.device import DEVICE_ID_RNG, DeviceState, VirtioDevice, state_from_json
from appliance.runtime.virtio.queue import write_chain_bytes
from appliance.runtime.virtio.rng.metrics import RngMetrics

QUEUE_SIZE = 64
MAX_REQUEST = 64 * 1024  # bound what one request can make us generate


@dataclass
class RngState(DeviceState):
    metrics: RngMetrics


class VirtioRng(VirtioDevice):
    device_type = DEVICE_ID_RNG
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self) -> None:
        super().__init__()
        self.metrics = RngMetrics()

    def process_queue(self, index: int) -> None:
        assert self.memory is not None
        queue = self.queues[index]
        served = False
        while (chain := queue.pop(self.memory)) is not None:
            wanted = min(MAX_REQUEST, sum(d.length for d in chain.writable()))
            written = write_chain_bytes(self.memory, chain.writable(), os.urandom(wanted))
            queue.add_used(self.memory, chain.head, written)
            self.metrics.requests += 1
            self.metrics.bytes_served += written
            served = True
        if served:
            self.interrupt(index)

    def save(self) -> dict[str, Any]:
        return asdict(RngState(self.acked_features, self.metrics))

    def restore(self, saved: dict[str, Any]) -> None:
        state = state_from_json(RngState, saved)
        self.acked_features, self.metrics = state.acked_features, state.metrics
