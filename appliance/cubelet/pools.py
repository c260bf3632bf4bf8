"""Warm pools: per template, booted guests (READY) that no one has claimed yet.

A refill boots a guest with the template's default network policy at the least
CPU weight (`BootSpec.background`), waits until it is fully ready (its default
Python kernel answers, so a warm create never waits for one) and probes it once
(that opens the connection its claim's `/init` reuses); only then does it join its
pool. A claim takes the oldest. The keeper tops every pool up to its target within
the memory budget, as far as `BootCapacity` leaves cores, and is woken whenever a
guest is claimed, ends or is gone, or a boot ends.

Auto-sized pools (`pool_size = -1`, the default) follow memory and demand:
- the default template's pool is where bursts land (an agent framework's N parallel
  rollouts): its floor is AUTO_POOL_DEPTH_PER_CORE guests per core (56 on 2 cores), so a
  burst of 50 creates at once is answered warm on a 2-core, 24 GiB host;
- every other template keeps AUTO_POOL_FLOOR warm and grows to the peak number of its
  creates in any DEMAND_WINDOW_S of the last DEMAND_HORIZON_S (plus a margin);
- no pool outgrows the memory budget: at most budget // the charge of a fresh guest
  (measured once one is ready: ~190 MiB for an idle uml guest, not its 512 MiB), and
  pooled guests give their memory back to cold boots (`make_room`);
- the per-core depth bounds the idle CPU of the pooled guests (each idle guest's
  timer ticks: see docs/BENCHMARKS.md), and refills boot one at a time while nobody
  creates (all cores while creates come, `refill_parallelism`), so a service that
  just started does not take every core to fill its pools.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from appliance.config import Config
from appliance.cubelet.capacity import BootCapacity
from appliance.cubelet.lifecycle import GuestLifecycle
from appliance.cubelet.sandboxes import (
    LiveSandbox,
    OutOfMemoryBudget,
    SandboxStartFailed,
    SandboxTable,
    template_network_policy,
)
from appliance.cubelet.state import SandboxState
from appliance.records import TemplateManifest

log = logging.getLogger(__name__)

POOL_RETRY_DELAY_S = 5.0
# Auto-sized pools (pool_size = -1): the module's docstring says why.
AUTO_POOL_DEPTH_PER_CORE = 28
AUTO_POOL_FLOOR = 1
DEMAND_WINDOW_S = 60.0
DEMAND_HORIZON_S = 3600.0
DEMAND_MARGIN = 1.5
DEMAND_SAMPLES = 4096  # creates remembered per template (a bound on memory, not a policy)


def auto_pool_cap() -> int:
    """The deepest an auto-sized pool gets on this host."""
    return AUTO_POOL_DEPTH_PER_CORE * (os.cpu_count() or 1)


class CreateDemand:
    """When each template's creates came (warm or not): the peak of a burst, and whether
    creates are coming now."""

    def __init__(self) -> None:
        self._times: dict[str, deque[float]] = {}

    def record(self, template_id: str, now: float) -> None:
        self._times.setdefault(template_id, deque(maxlen=DEMAND_SAMPLES)).append(now)

    def peak(self, template_id: str, now: float) -> int:
        """The most creates of the template in any DEMAND_WINDOW_S of the last DEMAND_HORIZON_S."""
        times = self._times.get(template_id)
        if not times:
            return 0
        while times and times[0] < now - DEMAND_HORIZON_S:
            times.popleft()
        best, first = 0, 0
        for last, at in enumerate(times):
            while times[first] < at - DEMAND_WINDOW_S:
                first += 1
            best = max(best, last - first + 1)
        return best

    def forget(self, template_id: str) -> None:
        self._times.pop(template_id, None)

    def active(self, now: float) -> bool:
        """Whether any template had a create in the last DEMAND_WINDOW_S."""
        return any(times and times[-1] >= now - DEMAND_WINDOW_S for times in self._times.values())


class WarmPools:
    def __init__(
        self,
        config: Config,
        table: SandboxTable,
        lifecycle: GuestLifecycle,
        capacity: BootCapacity,
        probe: Callable[[LiveSandbox], Awaitable[None]],
        templates: Callable[[], dict[str, TemplateManifest]],
        memory_budget_mb: int,
    ) -> None:
        self.config = config
        self.table = table
        self.lifecycle = lifecycle
        self.capacity = capacity
        self._probe = probe
        self._templates = templates
        self.memory_budget_mb = memory_budget_mb
        self._pools: dict[str, deque[LiveSandbox]] = {}
        self._wakeup = trio.Event()
        self._retry_at: dict[str, float] = {}  # template → trio time after a failed refill
        self.demand = CreateDemand()

    # Queries.

    def ready(self, template_id: str) -> list[LiveSandbox]:
        """The template's pooled guests, the next one to be claimed first."""
        return list(self._pools.get(template_id, ()))

    def target(self, template: TemplateManifest) -> int:
        if template.snapshot_of:
            return 0  # a snapshot is booted when asked for: pooling each one would hold memory idle
        if self.config.pool_size >= 0:
            return self.config.pool_size
        memory_cap = self.memory_budget_mb // max(1, self.table.boot_charge_mb(template))
        return min(memory_cap, auto_pool_cap(), max(self._floor(template), self._demanded(template)))

    def _floor(self, template: TemplateManifest) -> int:
        default = self.config.default_template
        if template.template_id == default or default in template.aliases:
            return auto_pool_cap()
        return AUTO_POOL_FLOOR

    def _demanded(self, template: TemplateManifest) -> int:
        return math.ceil(self.demand.peak(template.template_id, trio.current_time()) * DEMAND_MARGIN)

    def refill_parallelism(self) -> int:
        """Boots the refills may run at once: every core the cold boots leave while creates
        come (the pools must keep up), one while nobody creates (a service that just started
        fills its pools without taking the host's cores)."""
        return self.capacity.refill_limit if self.demand.active(trio.current_time()) else 1

    def state(self, template_id: str, template: TemplateManifest | None) -> dict[str, int]:
        """The warm pool of a template: its target size, guests ready to claim, refills booting."""
        return {
            "target": self.target(template) if template is not None else 0,
            "ready": len(self._pools.get(template_id, ())),
            "booting": self.capacity.refilling(template_id),
        }

    # Changes.

    def claim(self, template_id: str) -> LiveSandbox | None:
        """The oldest pooled guest of the template, out of its pool (the refill starts once the
        claims are answered: a boot competes with their /init), or None."""
        self.demand.record(template_id, trio.current_time())
        pool = self._pools.get(template_id)
        return pool.popleft() if pool else None

    def wake(self) -> None:
        self._wakeup.set()

    def drop(self, template_id: str) -> None:
        """A deleted template: its pooled guests end now, and nothing of its pool is kept (a refill
        still booting ends in a pool the keeper drops next)."""
        for live in self._pools.pop(template_id, ()):
            self.lifecycle.terminate(live, "template removed")
        self._retry_at.pop(template_id, None)
        self.demand.forget(template_id)

    async def make_room(self, template: TemplateManifest) -> None:
        """Room in the memory budget for one more guest of `template`, for a cold boot that adds it
        right after (no checkpoint in between): pooled guests give theirs back first (idle, and
        refilled later within the budget); a boot that still does not fit is refused
        (OutOfMemoryBudget) rather than left to the kernel's OOM killer."""
        needed_mb = self.table.boot_charge_mb(template)
        with self.table.reserved(needed_mb):
            while self.table.memory_committed_mb() > self.memory_budget_mb:
                pooled = next((live for pool in self._pools.values() for live in pool), None)
                if pooled is None:
                    in_use = self.table.memory_committed_mb() - needed_mb
                    raise OutOfMemoryBudget(
                        f"not enough memory for another {template.memory_mb} MiB sandbox "
                        f"(charged {needed_mb} MiB until measured): "
                        f"{in_use} of {self.memory_budget_mb} MiB are in use"
                    )
                self.lifecycle.terminate(pooled, "memory needed for a cold boot")
                await pooled.gone.wait()

    def guest_changed(self, live: LiveSandbox, old: SandboxState) -> None:
        """SandboxTable's listener: a pooled guest that ends leaves its pool; a guest gone frees
        memory and a slot for a refill."""
        if live.state is SandboxState.ENDING:
            pool = self._pools.get(live.template.template_id)
            if pool is not None and live in pool:
                pool.remove(live)
                self.wake()
        elif live.state in (SandboxState.ENDED, SandboxState.FAILED):
            self.wake()

    # The keeper.

    async def keep(self) -> None:
        """Keep each template's pool at its target, forever (a task of the cubelet's)."""
        async with trio.open_nursery() as refills:
            while True:
                self._wakeup = trio.Event()
                templates = self._templates()
                self._drop_removed(templates)
                for template in templates.values():
                    self._pools.setdefault(template.template_id, deque())
                    while self._wants_refill(template):
                        await refills.start(self._refill, template)
                wait_s = POOL_RETRY_DELAY_S
                quiet_in = self.capacity.claims_quiet_in()
                if 0 < quiet_in < wait_s:
                    wait_s = quiet_in  # refills a burst of claims held back start then
                with trio.move_on_after(wait_s):
                    await self._wakeup.wait()

    def _drop_removed(self, templates: dict[str, TemplateManifest]) -> None:
        for template_id in [t for t in self._pools if t not in templates]:
            self.drop(template_id)

    def _wants_refill(self, template: TemplateManifest) -> bool:
        template_id = template.template_id
        pooled, target = len(self._pools[template_id]), self.target(template)
        return (
            self.capacity.refill_allowed(self.refill_parallelism())
            # A burst of warm creates is answered first: a boot started meanwhile slows every
            # claim (a burst of 50 on a pool of 56 took half the pool at once, and two refills'
            # network set-ups ran amid its claims). Below half the pool the quiet time after the
            # burst is not waited for: steady creates must not starve the refills; they leave
            # gaps between claims, and an empty pool has no claims.
            and (
                self.capacity.claims_quiet_in() == 0 or (pooled * 2 < target and not self.capacity.claiming())
            )
            and pooled + self.capacity.refilling(template_id) < target
            and trio.current_time() >= self._retry_at.get(template_id, -math.inf)
            # Everything alive counts, guests still tearing down too: pools never exceed the budget.
            and self.table.memory_committed_mb() + self.table.boot_charge_mb(template)
            <= self.memory_budget_mb
        )

    async def _refill(self, template: TemplateManifest, *, task_status: trio.TaskStatus[None]) -> None:
        """Boot one pooled guest and add it to its pool; started once it holds its slot and
        memory (what the keeper's next `_wants_refill` must see)."""
        template_id = template.template_id
        with self.capacity.refill(template_id):
            try:
                live = self.table.add(template, template_network_policy(template), background=True)
            except SandboxStartFailed as exc:
                task_status.started()
                self._failed(template_id, exc)
                return
            task_status.started()
            try:
                await self.lifecycle.start(live)
                await self._until_claimable(live)
            except SandboxStartFailed as exc:
                self._failed(template_id, exc)
                return
            if live.state is SandboxState.READY:  # not killed meanwhile
                self._pools.setdefault(template_id, deque()).append(live)

    async def _until_claimable(self, live: LiveSandbox) -> None:
        """Until a booted guest's default kernel answers and its agent answered a probe; the
        guest is killed (SandboxStartFailed) if its kernel does not start in time."""
        await self.lifecycle.until_fully_ready_or_gone(live)
        assert live.instance is not None
        if live.gone.is_set() or not live.instance.fully_ready():
            self.lifecycle.terminate(live, "default kernel not ready in time")
            raise SandboxStartFailed(f"guest {live.sandbox_id}: its default kernel did not become ready")
        await self.lifecycle.until_template_ready(live)
        await self._probe(live)  # opens the connection its claim's /init will reuse

    def _failed(self, template_id: str, exc: SandboxStartFailed) -> None:
        log.warning("warm pool boot for %s failed: %s", template_id, exc)
        self.table.store.add_event("", "pool", f"boot for {template_id} failed: {exc}")
        self._retry_at[template_id] = trio.current_time() + POOL_RETRY_DELAY_S
