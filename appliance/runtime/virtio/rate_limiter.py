"""Token buckets (Firecracker's rate limiter): one for bytes, one for operations.

A device asks `consume(bytes)` before serving a request; when either bucket is
short it answers False and `wait_time()` says how long until it would succeed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    size: int  # burst capacity
    refill_per_second: float
    tokens: float = field(init=False)
    _last: float = field(init=False, default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = float(self.size)

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(float(self.size), self.tokens + (now - self._last) * self.refill_per_second)
        self._last = now

    def available(self, amount: int) -> bool:
        self._refill()
        return self.tokens >= min(amount, self.size)

    def take(self, amount: int) -> None:
        self.tokens -= min(amount, self.size)

    def wait_time(self, amount: int) -> float:
        self._refill()
        missing = min(amount, self.size) - self.tokens
        return max(0.0, missing / self.refill_per_second)


@dataclass
class RateLimiter:
    bandwidth: TokenBucket | None = None  # bytes
    ops: TokenBucket | None = None  # requests

    def consume(self, nbytes: int) -> bool:
        buckets = [(self.bandwidth, nbytes), (self.ops, 1)]
        if not all(bucket.available(amount) for bucket, amount in buckets if bucket is not None):
            return False
        for bucket, amount in buckets:
            if bucket is not None:
                bucket.take(amount)
        return True

    def wait_time(self, nbytes: int) -> float:
        waits = [
            bucket.wait_time(amount) for bucket, amount in [(self.bandwidth, nbytes), (self.ops, 1)] if bucket
        ]
        return max(waits, default=0.0)
