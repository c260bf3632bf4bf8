"""Token buckets: bursts up to the bucket size, then the refill rate."""

from __future__ import annotations

import time

from appliance.runtime.virtio.rate_limiter import RateLimiter, TokenBucket


def test_bandwidth_bucket_allows_a_burst_then_throttles() -> None:
    limiter = RateLimiter(bandwidth=TokenBucket(size=8192, refill_per_second=4096))
    assert limiter.consume(4096)
    assert limiter.consume(4096)
    assert not limiter.consume(4096)
    assert 0.5 < limiter.wait_time(4096) <= 1.0


def test_ops_bucket_refills_over_time() -> None:
    limiter = RateLimiter(ops=TokenBucket(size=2, refill_per_second=100))
    assert limiter.consume(0) and limiter.consume(0)
    assert not limiter.consume(0)
    time.sleep(0.02)
    assert limiter.consume(0)
