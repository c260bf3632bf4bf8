"""Sandbox metrics over time: `get_metrics(start=, end=)` answers from the samples the cubelet keeps."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import httpx
import pytest
import trio
from e2b import Sandbox

from appliance.cubelet.metrics import RING_SAMPLES, SAMPLE_INTERVAL_S, MetricsHistory
from appliance.cubelet.sandboxes import SandboxNotFound

if TYPE_CHECKING:
    from conftest import ServiceHarness

UTC = dt.UTC


def test_metrics_in_a_time_range_through_the_sdk(sdk_env: ServiceHarness) -> None:
    before = dt.datetime.now(UTC)
    sandbox = Sandbox.create(timeout=60)
    try:
        until = dt.datetime.now(UTC) + dt.timedelta(seconds=5)  # a range that reaches the present
        metrics = sandbox.get_metrics(start=before, end=until)
        assert metrics, "a running sandbox has metrics at once"
        for metric in metrics:
            assert int(before.timestamp()) <= metric.timestamp.timestamp() < int(until.timestamp()) + 1
            assert metric.cpu_used_pct == 12.5 and metric.mem_total == 4321  # the guest's own numbers
        # A range from before the sandbox existed holds nothing.
        assert (
            sandbox.get_metrics(start=before - dt.timedelta(hours=1), end=before - dt.timedelta(minutes=30))
            == []
        )
        # No range: everything kept so far.
        assert len(sandbox.get_metrics()) >= len(metrics)
    finally:
        sandbox.kill()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("start=yesterday", "'start' must be a unix time in seconds"),
        ("end=-5", "'end' must be a unix time in seconds"),
        ("start=20&end=10", "'start' must not be after 'end'"),
    ],
)
def test_a_bad_range_is_400_and_the_sandbox_lives_on(
    sdk_env: ServiceHarness, api_key: str, query: str, message: str
) -> None:
    sandbox = Sandbox.create(timeout=60)
    try:
        response = httpx.get(
            f"{sdk_env.url}/sandboxes/{sandbox.sandbox_id}/metrics?{query}", headers={"X-API-KEY": api_key}
        )
        assert response.status_code == 400
        assert response.json() == {"code": 400, "message": message}
        assert sandbox.is_running()
    finally:
        sandbox.kill()


class Node:
    """The two things MetricsHistory reads: sandboxes (id -> running) and one sample's body."""

    def __init__(self) -> None:
        self.sandboxes: dict[str, bool] = {}
        self.now = 1_000_000.0
        self.measured: list[str] = []

    async def measure(self, sandbox_id: str) -> dict[str, object]:
        if sandbox_id not in self.sandboxes:
            raise SandboxNotFound(sandbox_id)
        self.measured.append(sandbox_id)
        return {"cpuCount": 2, "cpuUsedPct": 50.0, "memUsed": int(self.now), "memTotal": 1 << 30}

    def history(self) -> MetricsHistory:
        return MetricsHistory(self.measure, lambda: self.sandboxes.items(), clock=lambda: self.now)


async def test_samples_are_filtered_by_their_unix_second() -> None:
    node = Node()
    node.sandboxes["a"] = True
    history = node.history()
    for _ in range(4):
        await history.sample_all()
        node.now += SAMPLE_INTERVAL_S
    stamps = [s.unix for s in await history.query("a", None, None)]
    assert stamps == [1_000_000, 1_000_005, 1_000_010, 1_000_015, 1_000_020]  # the last: taken by the query
    assert [s.unix for s in await history.query("a", 1_000_005, 1_000_010)] == [1_000_005, 1_000_010]
    assert await history.query("a", 0, 999_999) == []
    body = (await history.query("a", 1_000_010, 1_000_010))[0].body(lambda t: f"T{t}")
    assert body == {
        "timestamp": "T1000010.0",
        "timestampUnix": 1_000_010,
        "cpuCount": 2,
        "cpuUsedPct": 50.0,
        "memUsed": 1_000_010,
        "memTotal": 1 << 30,
        "memCache": 0,
        "diskUsed": 0,
        "diskTotal": 0,
    }


async def test_a_query_takes_a_fresh_sample_only_when_the_range_reaches_now() -> None:
    node = Node()
    node.sandboxes["a"] = True
    history = node.history()
    assert await history.query("a", 0, int(node.now) - 60) == []  # the past: nothing measured for it
    assert node.measured == []
    assert len(await history.query("a", None, None)) == 1
    assert len(await history.query("a", None, None)) == 1  # within the interval: the same sample
    assert node.measured == ["a"]


async def test_paused_sandboxes_keep_their_samples_and_ended_ones_lose_them() -> None:
    node = Node()
    node.sandboxes.update(a=True, b=True)
    history = node.history()
    await history.sample_all()
    node.sandboxes["a"] = False  # paused: not measured, its samples kept
    del node.sandboxes["b"]  # ended
    node.now += SAMPLE_INTERVAL_S
    await history.sample_all()
    assert node.measured == ["a", "b"] or node.measured == ["b", "a"]
    assert len(await history.query("a", None, None)) == 1
    assert await history.query("b", None, None) == []


async def test_the_ring_is_bounded() -> None:
    node = Node()
    node.sandboxes["a"] = True
    history = node.history()
    for _ in range(RING_SAMPLES + 10):
        await history.sample_all()
        node.now += SAMPLE_INTERVAL_S
    kept = await history.query("a", None, int(node.now) - 1)
    assert len(kept) == RING_SAMPLES
    assert kept[0].unix == 1_000_000 + 10 * SAMPLE_INTERVAL_S  # the oldest went first


async def test_a_sample_that_fails_does_not_stop_the_sampler() -> None:
    node = Node()
    node.sandboxes.update(a=True, b=True)

    async def measure(sandbox_id: str) -> dict[str, object]:
        if sandbox_id == "a":
            raise OSError("the guest's cgroup is gone")
        return await node.measure(sandbox_id)

    history = MetricsHistory(measure, lambda: node.sandboxes.items(), clock=lambda: node.now)
    with trio.fail_after(5):
        await history.sample_all()
    assert await history.query("a", None, 0) == [] and len(await history.query("b", None, None)) == 1
