"""The operators' web dashboard at `/dashboard` (docs/ARCHITECTURE.md, "Dashboard") and the
Prometheus `/metrics`, served by the control plane on its own port.

`blueprints()` is what the service registers: the dashboard (pages.py, its JSON calls in
data.py) and the metrics (prometheus.py).
"""

from __future__ import annotations

from quart import Blueprint

from appliance.dashboard import data, prometheus, stats
from appliance.dashboard.pages import blueprint as dashboard

dashboard.before_app_request(stats.start_timing)
dashboard.after_app_request(stats.time_creates)


def blueprints() -> list[Blueprint]:
    assert data.blueprint is dashboard  # data.py's routes are on it
    return [dashboard, prometheus.blueprint]
