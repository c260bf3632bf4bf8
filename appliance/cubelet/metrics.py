"""Sandbox metrics over time: what `GET /sandboxes/{id}/metrics?start=&end=` answers from.

Every SAMPLE_INTERVAL_S (E2B's collection bucket) the cubelet takes one sample of
each running sandbox (`Cubelet.metrics`: envd's /metrics plus the host's view) into
that sandbox's ring of the last RING_SAMPLES samples; a query filters the ring by
`timestampUnix`, so a range from before the sandbox existed is empty. A query
whose range reaches the present and finds no sample from the last interval takes
one first: a sandbox has metrics as soon as it runs. Paused sandboxes keep their
ring and are not sampled (nothing runs); a ring goes with its sandbox.

Samples are kept compact (a slotted record of numbers, ~0.2 KB): the rings of a
full node stay within a few MB.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import trio

from appliance.cubelet.sandboxes import SandboxNotFound, SandboxTable
from appliance.cubelet.state import USER_VISIBLE, SandboxState

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 5.0
RING_SAMPLES = 720  # an hour of samples per sandbox


@dataclass(frozen=True, slots=True)
class Sample:
    """One sample in numbers; `body()` is E2B's SandboxMetric."""

    at: float  # unix seconds
    cpu_count: int
    cpu_used_pct: float
    mem_used: int
    mem_total: int
    mem_cache: int
    disk_used: int
    disk_total: int

    @classmethod
    def from_body(cls, at: float, body: dict[str, object]) -> Sample:
        def number(key: str) -> float:
            value = body.get(key, 0)
            return float(value) if isinstance(value, int | float) else 0.0

        return cls(
            at=at,
            cpu_count=int(number("cpuCount")),
            cpu_used_pct=number("cpuUsedPct"),
            mem_used=int(number("memUsed")),
            mem_total=int(number("memTotal")),
            mem_cache=int(number("memCache")),
            disk_used=int(number("diskUsed")),
            disk_total=int(number("diskTotal")),
        )

    @property
    def unix(self) -> int:
        return int(self.at)

    def body(self, rfc3339: Callable[[float], str]) -> dict[str, object]:
        return {
            "timestamp": rfc3339(self.at),
            "timestampUnix": self.unix,
            "cpuCount": self.cpu_count,
            "cpuUsedPct": self.cpu_used_pct,
            "memUsed": self.mem_used,
            "memTotal": self.mem_total,
            "memCache": self.mem_cache,
            "diskUsed": self.disk_used,
            "diskTotal": self.disk_total,
        }


def user_sandboxes(table: SandboxTable) -> Callable[[], Iterable[tuple[str, bool]]]:
    """(id, running) of every user's sandbox in `table`: what MetricsHistory samples and keeps."""
    return lambda: [(g.sandbox_id, g.state is SandboxState.RUNNING) for g in table if g.state in USER_VISIBLE]


class MetricsHistory:
    """The rings, the task that fills them and the query the API makes."""

    def __init__(
        self,
        measure: Callable[[str], Awaitable[dict[str, object]]],
        sandboxes: Callable[[], Iterable[tuple[str, bool]]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`measure(id)`: one sample's body (SandboxNotFound once the sandbox is gone);
        `sandboxes()`: (id, running) of every user's sandbox on this node."""
        self._measure = measure
        self._sandboxes = sandboxes
        self._clock = clock
        self._rings: dict[str, deque[Sample]] = {}

    async def run(self) -> None:
        while True:
            await self.sample_all()
            await trio.sleep(SAMPLE_INTERVAL_S)

    async def sample_all(self) -> None:
        current = dict(self._sandboxes())
        for sandbox_id in self._rings.keys() - current.keys():
            del self._rings[sandbox_id]
        async with trio.open_nursery() as nursery:
            for sandbox_id, running in current.items():
                if running:
                    nursery.start_soon(self._sample, sandbox_id)

    async def query(self, sandbox_id: str, start: int | None, end: int | None) -> list[Sample]:
        """The sandbox's samples with start <= timestampUnix <= end (either bound may be open)."""
        now = self._clock()
        ring = self._rings.get(sandbox_id)
        stale = ring is None or now - ring[-1].at >= SAMPLE_INTERVAL_S
        running = dict(self._sandboxes()).get(sandbox_id, False)
        if stale and running and (end is None or end >= int(now)):
            await self._sample(sandbox_id)
        return [
            s
            for s in self._rings.get(sandbox_id, ())
            if (start is None or s.unix >= start) and (end is None or s.unix <= end)
        ]

    async def _sample(self, sandbox_id: str) -> None:
        at = self._clock()
        try:
            body = await self._measure(sandbox_id)
        except SandboxNotFound:
            return
        except Exception:  # a guest ending mid-sample (its files gone) must not stop the service's sampler
            log.debug("metrics sample of %s failed", sandbox_id, exc_info=True)
            return
        # The sandbox may have ended while it was measured: keep no ring for it then.
        if sandbox_id in dict(self._sandboxes()):
            ring = self._rings.setdefault(sandbox_id, deque(maxlen=RING_SAMPLES))
            ring.append(Sample.from_body(at, body))
