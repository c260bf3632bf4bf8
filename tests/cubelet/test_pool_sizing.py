"""Auto-sized warm pools (pool_size = -1) follow memory and demand: the default template keeps a
per-core floor, other templates grow with their peak burst of creates, none past the budget."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from appliance.config import Config
from appliance.cubelet import pools as pools_module
from appliance.cubelet.capacity import BootCapacity
from appliance.cubelet.pools import DEMAND_HORIZON_S, DEMAND_WINDOW_S, CreateDemand, WarmPools
from appliance.records import TemplateManifest


def test_demand_is_the_peak_burst_within_the_horizon() -> None:
    demand = CreateDemand()
    for second in range(10):  # ten creates in ten seconds
        demand.record("t", 100.0 + second)
    for minute in range(1, 4):  # then one a minute
        demand.record("t", 110.0 + minute * (DEMAND_WINDOW_S + 1))
    assert demand.peak("t", 300.0) == 10 and demand.peak("other", 300.0) == 0
    assert demand.active(300.0) and not demand.active(300.0 + DEMAND_WINDOW_S)
    assert demand.peak("t", 120.0 + DEMAND_HORIZON_S) == 1  # the burst forgotten; one a minute left


class ChargedTable:
    """What the pool sizing reads of the sandbox table: a fresh guest's charge."""

    def __init__(self, charge_mb: int) -> None:
        self.charge_mb = charge_mb

    def boot_charge_mb(self, template: TemplateManifest) -> int:
        return self.charge_mb


def pools_for(charge_mb: int, budget_mb: int) -> WarmPools:
    config = Config(pool_size=-1, default_template="code-interpreter")
    capacity = BootCapacity(2, on_release=lambda: None)
    table = ChargedTable(charge_mb)
    return WarmPools(config, table, None, capacity, None, dict, budget_mb)  # type: ignore[arg-type]


DEFAULT = TemplateManifest("code-interpreter", Path("/nonexistent"), aliases=("base",))
CUSTOM = TemplateManifest("my-task", Path("/nonexistent"))


async def test_the_default_template_holds_a_burst_of_50_on_a_2_core_24_gib_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    # 75 % of 24 GiB; an idle uml guest measured at ~130 MiB plus 64 MiB growth headroom.
    pools = pools_for(charge_mb=194, budget_mb=18078)
    assert pools.target(DEFAULT) == 2 * pools_module.AUTO_POOL_DEPTH_PER_CORE >= 50
    # Until a guest was measured, each is charged its whole memory_mb: the budget bounds the pool.
    assert pools_for(charge_mb=512, budget_mb=18078).target(DEFAULT) == 18078 // 512


async def test_other_templates_keep_a_floor_and_grow_with_their_bursts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    pools = pools_for(charge_mb=194, budget_mb=18078)
    assert pools.target(CUSTOM) == pools_module.AUTO_POOL_FLOOR
    assert pools.refill_parallelism() == 1  # nobody creates: one refill at a time
    for _ in range(20):
        assert pools.claim(CUSTOM.template_id) is None  # misses count as demand too
    assert pools.target(CUSTOM) == 30  # the burst of 20, with its margin
    assert pools.refill_parallelism() == 2
    small = pools_for(charge_mb=194, budget_mb=1000)
    for _ in range(20):
        small.claim(CUSTOM.template_id)
    assert small.target(CUSTOM) == 1000 // 194  # never past the memory budget


async def test_demand_fades_after_the_horizon(
    monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    pools = pools_for(charge_mb=194, budget_mb=18078)
    for _ in range(10):
        pools.claim(CUSTOM.template_id)
    assert pools.target(CUSTOM) == 15
    mock_clock.jump(DEMAND_WINDOW_S + 1)
    assert pools.target(CUSTOM) == 15 and pools.refill_parallelism() == 1  # remembered, not active
    mock_clock.jump(DEMAND_HORIZON_S)
    assert pools.target(CUSTOM) == pools_module.AUTO_POOL_FLOOR
