"""Side by side: the appliance's paths as ratios over the floor measured in the same run,
the runtime issue's targets (met or not), and published numbers of other systems —
those are theirs, quoted with their sources, never measured here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from appliance.bench.report import Report

# Targets from the runtime issue (issue 4): (metric key, threshold, unit).
TARGETS: dict[str, tuple[str, float, str]] = {
    "warm create p50, c=1": ("p50_ms", 30.0, "ms"),
    "warm create p99, c=10": ("p99_ms", 150.0, "ms"),
    "cold boot to agent ready p50": ("p50_ms", 1500.0, "ms"),
    "idle memory per sandbox": ("mib", 128.0, "MiB"),
}

PUBLISHED: list[dict[str, str]] = [
    {
        "system": "CubeSandbox (bare metal, 2 vCPU / 2 GiB sandbox)",
        "measure": "create avg: c=1 47.8 ms, c=10 88.7 ms, c=50 276.1 ms (c=50 p95 508.4 ms)",
        "source": "TencentCloud/CubeSandbox docs/blog/posts/2026-06-01-cubesandbox-perf-benchmark.md",
    },
    {
        "system": "CubeSandbox (bare metal)",
        "measure": "~21.5-25.7 MB memory per VM at 100-1000 VMs",
        "source": "TencentCloud/CubeSandbox docs/blog/posts/2026-06-01-cubesandbox-perf-benchmark.md",
    },
    {
        "system": "CubeSandbox (PVM)",
        "measure": "create avg c=1 66.7 ms",
        "source": "TencentCloud/CubeSandbox docs/blog/posts/2026-06-03-cubesandbox-perf-benchmark-pvm.md",
    },
    {
        "system": "Firecracker",
        "measure": "snapshot restore ~8 ms class",
        "source": "firecracker-microvm/firecracker docs/snapshotting/snapshot-support.md",
    },
]


def ratio_rows(
    floor: Mapping[str, Mapping[str, float]], paths: Mapping[str, Mapping[str, float]]
) -> list[dict]:
    """One row per appliance path: its p50 and its p50 over each floor path's p50.

    `floor` and `paths` map a name to `percentiles()` output (p50_ms …). Paths or floors
    without a p50 are skipped; the floor paths themselves come first, as ratio 1 over
    the fastest floor.
    """
    floors = {name: stats["p50_ms"] for name, stats in floor.items() if stats.get("p50_ms")}
    rows: list[dict[str, Any]] = []
    for name, p50 in floors.items():
        rows.append({"path": f"floor: {name}", "p50_ms": p50})
    for name, stats in paths.items():
        path_p50 = stats.get("p50_ms")
        if not path_p50:
            continue
        row: dict[str, Any] = {"path": name, "p50_ms": path_p50}
        for floor_name, floor_p50 in floors.items():
            row[f"x {floor_name}"] = path_p50 / floor_p50
        rows.append(row)
    return rows


def target_rows(measured: Mapping[str, Mapping[str, float]]) -> list[dict]:
    """For each issue-4 target that was measured: the value, the target and whether it is met."""
    rows = []
    for name, (key, threshold, unit) in TARGETS.items():
        stats = measured.get(name)
        if not stats or not isinstance(stats.get(key), int | float):
            rows.append({"target": name, "value": "not measured", "limit": f"< {threshold:g} {unit}"})
            continue
        value = float(stats[key])
        rows.append(
            {
                "target": name,
                "value": f"{value:.1f} {unit}",
                "limit": f"< {threshold:g} {unit}",
                "met": "yes" if value < threshold else "NO",
            }
        )
    return rows


def find_row(report: Report | None, **match: object) -> dict[str, Any] | None:
    """The first row of `report` whose fields equal `match` (str fields: prefix match)."""
    if report is None:
        return None
    for row in report.rows:
        ok = True
        for key, value in match.items():
            cell = row.get(key)
            if isinstance(value, str):
                ok = isinstance(cell, str) and cell.startswith(value)
            else:
                ok = cell == value
            if not ok:
                break
        if ok:
            return row
    return None


def published_report() -> Report:
    report = Report("published")
    for entry in PUBLISHED:
        report.add(**entry)
    report.notes.append("THEIR numbers, from their own hardware and write-ups; not measured here")
    return report
