"""How many guests boot at once: one object owns the limit and knows what is in flight.

Boots are CPU-bound (a kernel starting): more at once than the host has cores only
makes each slower. Three kinds compete for the cores:
- cold boots, which someone waits for (a create with no warm guest, a template
  build, a restore): at most max(2, cores) at once, the others queue;
- refills, the warm pools' boots, which nobody waits for: they take only the cores
  the cold boots leave (at most `cores` boots of both kinds at once);
- claims, warm creates initialising their guest: a boot started meanwhile slows
  every claim still in flight, so refills wait until a burst of claims has been
  answered and quiet for REFILL_QUIET_S (the pools decide how far to wait).
Each is counted by a context manager held for exactly as long as it runs, so the
counts cannot drift; leaving one wakes the pool keeper (`on_release`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import trio

# Refills start only once no warm claim has ended for this long: the answers of a burst of
# creates go out first (a refill's network set-up and boot compete with them for the cores).
REFILL_QUIET_S = 0.5


class BootCapacity:
    def __init__(self, cores: int | None, on_release: Callable[[], None]) -> None:
        cores = cores or 1
        self._cold_limiter = trio.CapacityLimiter(max(2, cores))
        self.refill_limit = max(1, cores)
        self._on_release = on_release
        self._cold_boots = 0  # waiting for the limiter or booting
        self._claims = 0
        self._refills: Counter[str] = Counter()  # by template
        self._refills_held_until = -math.inf  # trio time: REFILL_QUIET_S after the last claim ended

    @asynccontextmanager
    async def cold_boot(self) -> AsyncIterator[None]:
        """A boot someone waits for: refills wait while it waits for its turn and while it runs."""
        self._cold_boots += 1
        try:
            async with self._cold_limiter:
                yield
        finally:
            self._cold_boots -= 1
            self._on_release()

    @contextmanager
    def claim(self) -> Iterator[None]:
        """A warm create initialising its guest."""
        self._claims += 1
        try:
            yield
        finally:
            self._claims -= 1
            self._refills_held_until = trio.current_time() + REFILL_QUIET_S
            self._on_release()  # top the pools up once the burst is answered

    @contextmanager
    def refill(self, template_id: str) -> Iterator[None]:
        """A warm pool's boot of a guest of `template_id`, until it joins its pool or fails."""
        self._refills[template_id] += 1
        try:
            yield
        finally:
            self._refills[template_id] -= 1
            self._on_release()

    def refilling(self, template_id: str) -> int:
        return self._refills[template_id]

    def refill_allowed(self, parallelism: int | None = None) -> bool:
        """A core is left for one more refill: cold boots go first, refills take what they leave
        (at most `parallelism` refills at once, default every core)."""
        limit = min(self.refill_limit, parallelism or self.refill_limit)
        return self._refills.total() + self._cold_boots < limit

    def claims_quiet_in(self) -> float:
        """Seconds until the last burst of claims counts as answered; 0 when it does."""
        if self._claims:
            return math.inf
        return max(0.0, self._refills_held_until - trio.current_time())
