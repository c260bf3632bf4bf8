"""`GET /metrics`: the overview's figures in the Prometheus text format, for the admin token
(a Prometheus scrape job's `authorization: {credentials: <admin token>}`): they are every team's.
"""

from __future__ import annotations

from quart import Response

from appliance.api.auth import Access, guarded
from appliance.api.services import services
from appliance.dashboard.stats import create_times, host_figures, live_counts, pool_fill
from appliance.tenancy import ADMIN

blueprint = guarded("prometheus", __name__, Access.ADMIN)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def family(name: str, help_text: str, samples: dict[str, float]) -> list[str]:
    """A gauge: its HELP and TYPE lines and one line per sample (`labels` -> value)."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    return lines + [f"{name}{labels} {value:g}" for labels, value in samples.items()]


def label(**pairs: str) -> str:
    def escaped(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{name}="{escaped(value)}"' for name, value in pairs.items()) + "}"


@blueprint.get("/metrics")
async def metrics() -> Response:
    s = services()
    host = host_figures(s)
    creates = create_times().kept
    pools = pool_fill(s, ADMIN)
    lines = [
        *family(
            "cube_sandboxes",
            "Live sandboxes by state.",
            {label(state=state): count for state, count in live_counts(s, ADMIN).items()},
        ),
        *family(
            "cube_sandbox_creates_last_hour",
            "Sandboxes the API created in the last hour.",
            {"": len(creates)},
        ),
        *family(
            "cube_sandbox_create_seconds_last_hour_sum",
            "Their create latencies added up (seconds).",
            {"": sum(c.seconds for c in creates)},
        ),
        *family(
            "cube_host_memory_bytes",
            "The host's memory.",
            {label(kind="total"): host["memTotal"], label(kind="available"): host["memAvailable"]},
        ),
        *family("cube_host_load1", "The host's one-minute load average.", {"": host["load1"]}),
        *family("cube_host_cpus", "The host's CPUs.", {"": host["cpuCount"]}),
        *family(
            "cube_sandbox_memory_mb",
            "Sandbox memory: committed to sandboxes, and the budget.",
            {
                label(kind="committed"): host["memoryCommittedMB"],
                label(kind="budget"): host["memoryBudgetMB"],
            },
        ),
        *family(
            "cube_pool_guests",
            "Warm pool guests per template: target, ready, booting.",
            {
                label(template=template, kind=kind): float(count)
                for template, state in pools.items()
                for kind, count in state.items()
            },
        ),
    ]
    return Response("\n".join(lines) + "\n", content_type=CONTENT_TYPE)
