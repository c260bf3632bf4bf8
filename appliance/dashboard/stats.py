"""The overview's figures: creates and their latency, the host's memory and CPU, the warm pools.

Create latency is measured where the SDK sees it, around the API's create handler
(`time_creates`, installed on the app by the dashboard's blueprint), and kept for the
last hour in memory: a restart starts the chart afresh.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from quart import Response, current_app, g, request

from appliance.api.services import Services
from appliance.records import LIVE_STATES, PAUSED, RUNNING, SandboxQuery
from appliance.tenancy import Principal

CREATE_ENDPOINTS = ("sandboxes.create",)
KEPT_S = 3600
BUCKET_S = 60
CREATE_TIMES = "cube.dashboard.creates"  # its key in app.extensions


@dataclass(frozen=True)
class Create:
    at: float
    seconds: float
    team_id: str


@dataclass
class CreateTimes:
    kept: deque[Create] = field(default_factory=deque)

    def add(self, create: Create) -> None:
        self.kept.append(create)
        while self.kept and self.kept[0].at < create.at - KEPT_S:
            self.kept.popleft()

    def per_minute(self, principal: Principal, now: float) -> list[dict[str, float]]:
        """One point a minute over the last hour: creates, p50 and p95 latency in ms."""
        buckets: dict[int, list[float]] = {}
        for c in self.kept:
            if principal.owns(c.team_id) and c.at >= now - KEPT_S:
                buckets.setdefault(int(c.at // BUCKET_S) * BUCKET_S, []).append(c.seconds)
        return [
            {
                "at": minute,
                "creates": len(times),
                "p50Ms": percentile(times, 0.50) * 1000,
                "p95Ms": percentile(times, 0.95) * 1000,
            }
            for minute, times in sorted(buckets.items())
        ]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def create_times() -> CreateTimes:
    found = current_app.extensions.setdefault(CREATE_TIMES, CreateTimes())
    assert isinstance(found, CreateTimes)
    return found


async def start_timing() -> None:
    if request.endpoint in CREATE_ENDPOINTS:
        g.dashboard_create_started = time.monotonic()


async def time_creates(response: Response) -> Response:
    started = g.get("dashboard_create_started")
    principal = g.get("principal")
    if started is not None and response.status_code == 201 and isinstance(principal, Principal):
        create_times().add(Create(time.time(), time.monotonic() - started, principal.team_id))
    return response


def host_figures(s: Services) -> dict[str, float]:
    meminfo: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            meminfo[name] = int(rest.split()[0]) * 1024
    load1, _, _ = os.getloadavg()
    return {
        "memTotal": meminfo.get("MemTotal", 0),
        "memAvailable": meminfo.get("MemAvailable", 0),
        "cpuCount": os.cpu_count() or 1,
        "load1": load1,
        "memoryBudgetMB": s.cubelet.memory_budget_mb,
        "memoryCommittedMB": s.cubelet.memory_committed_mb(),
    }


def live_counts(s: Services, principal: Principal) -> dict[str, int]:
    query = SandboxQuery(states=LIVE_STATES, team_id=principal.scope, limit=100_000)
    states = [r.state for r in s.store.query_sandboxes(query)]
    return {RUNNING: states.count(RUNNING), PAUSED: states.count(PAUSED)}


def pool_fill(s: Services, principal: Principal) -> dict[str, dict[str, int]]:
    """Per template the caller sees: its warm pool's target, ready and booting guests."""
    return {
        t.template_id: s.cubelet.pool_state(t.template_id, t) for t in s.templates.visible(principal).values()
    }


# A node's part of the overview, as every node's is shown side by side.
NODE_FIGURES = ("nodeID", "sandboxes", "createsLastMinute", "creates", "host", "pools")


def per_node_total(figures: list[dict[str, Any]]) -> dict[str, object]:
    """Several nodes' overviews (this node's first): the live sandboxes and recent creates of them
    all, and each node's own figures (`perNode`). A node whose answer lacks a figure is left out."""
    shown = [
        {name: node[name] for name in NODE_FIGURES}
        for node in figures
        if all(name in node for name in NODE_FIGURES) and isinstance(node["sandboxes"], dict)
    ]
    return {
        "sandboxes": {
            state: sum(int(node["sandboxes"].get(state, 0)) for node in shown) for state in (RUNNING, PAUSED)
        },
        "createsLastMinute": sum(int(node["createsLastMinute"]) for node in shown),
        "perNode": shown,
    }


def overview(s: Services, principal: Principal) -> dict[str, object]:
    now = time.time()
    times = create_times()
    return {
        "sandboxes": live_counts(s, principal),
        "createsLastMinute": sum(1 for c in times.kept if c.at >= now - 60 and principal.owns(c.team_id)),
        "creates": times.per_minute(principal, now),
        "host": host_figures(s),
        "pools": pool_fill(s, principal),
        # The cluster's nodes (the admin's to see; none on a single node).
        "nodes": s.cluster.view.node_rows() if s.cluster is not None and principal.is_admin else [],
    }
