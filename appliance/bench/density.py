"""`cube bench density`: how many idle sandboxes this host holds, and what each costs.

CubeSandbox's method: read MemAvailable, start N sandboxes and let them go idle,
read it again; idle memory per sandbox = the drop / N. Sandboxes are started one at
a time through the API (raw HTTP) until the service refuses one (memory budget),
`--max` is reached, or MemAvailable would fall below `--reserve-mib`; the
memory-vs-count curve is recorded on the way. Every sandbox started is killed at
the end, whatever happened. The bench must run on the appliance's host (it reads
this host's /proc/meminfo); warm pools refill in the background, so each reading
waits for MemAvailable to settle, and the pool is full before and after.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import httpx

from appliance.api.client import ApiClient
from appliance.bench.create import mem_available_bytes
from appliance.bench.live import (
    http_client,
    kill_all,
    progress,
    target,
    wait_memory_settled,
    wait_pool_idle,
)
from appliance.bench.options import api_key_option, json_dir_option, template_option
from appliance.bench.report import Report, percentiles
from appliance.config import Config

MIB = 1 << 20
# Filling, then waiting for the pool and memory to settle, takes minutes on a busy host: every
# sandbox must still be alive at the reading (a crashed bench leaves them this long at most).
DENSITY_TIMEOUT_S = 1800


@dataclass
class DensityRun:
    """What one density run read on its way: the fill, then the settled reading."""

    template: str
    max_sandboxes: int
    live: list[str] = field(default_factory=list)
    creates: list[float] = field(default_factory=list)  # POST → 201 while filling
    counts: list[int] = field(default_factory=lambda: [0])
    drops_mib: list[float] = field(default_factory=lambda: [0.0])
    charged_mib: list[float] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)  # died before the reading: the drop / N is then wrong
    stop_reason: str = ""
    before: int = 0  # MemAvailable (bytes) with the pool full, before the first create
    drop_mib: float = 0.0
    added_guests: int = 0
    pool_before: dict[str, int] = field(default_factory=dict)
    pool_after: dict[str, int] = field(default_factory=dict)


def _fill(client: httpx.Client, run: DensityRun, reserve_mib: int, settle_each: bool) -> None:
    """Start sandboxes one at a time until refused, the reserve or `max_sandboxes`; the curve."""
    run.stop_reason = f"--max {run.max_sandboxes} reached"
    with progress(run.max_sandboxes, "density: start sandboxes") as bar:
        for n in range(1, run.max_sandboxes + 1):
            if mem_available_bytes() < reserve_mib * MIB:
                run.stop_reason = f"MemAvailable below the {reserve_mib} MiB reserve"
                return
            started = time.perf_counter()
            response = client.post(
                "/v2/sandboxes", json={"templateID": run.template, "timeout": DENSITY_TIMEOUT_S}
            )
            if response.status_code != 201:
                run.stop_reason = f"create #{n} refused: {response.status_code} {response.text[:200]}"
                return
            run.creates.append(time.perf_counter() - started)
            run.live.append(response.json()["sandboxID"])
            now = wait_memory_settled(mem_available_bytes) if settle_each else mem_available_bytes()
            run.counts.append(n)
            run.drops_mib.append((run.before - now) / MIB)
            bar.update(1)


def _read_settled(client: httpx.Client, run: DensityRun) -> None:
    """Once the guests and the pool refills are idle: the drop, and each sandbox's charge."""
    click.echo("  density: letting the guests (and the pool refills) go idle", err=True)
    run.pool_after = wait_pool_idle(client, run.template)
    after = wait_memory_settled(mem_available_bytes, window_s=3.0, tolerance=8 * MIB)
    run.drop_mib = (run.before - after) / MIB
    # Pooled guests are in both readings; the pool may end smaller (claimed, and the memory budget
    # keeps it from refilling) or larger: count the guests that changed.
    run.added_guests = len(run.live) + run.pool_after["ready"] - run.pool_before["ready"]
    run.counts.append(len(run.live))
    run.drops_mib.append(run.drop_mib)
    for sandbox_id in run.live:
        metrics = client.get(f"/sandboxes/{sandbox_id}/metrics")
        if metrics.status_code == 200 and metrics.json():
            run.charged_mib.append(metrics.json()[-1].get("memUsed", 0) / MIB)
        elif metrics.status_code == 404:
            run.ended.append(f"{sandbox_id}: {metrics.text[:120]}")


def _density_report(run: DensityRun, report: Report) -> None:
    held = len(run.live)
    per_sandbox = run.drop_mib / max(1, run.added_guests)
    report.add(
        measure="idle memory per sandbox (MemAvailable drop / N)",
        n=held,
        mib=per_sandbox,
        target="< 128 MiB",
        met=per_sandbox < 128,
    )
    if run.charged_mib:
        report.add(
            measure="memory charged per sandbox (API metrics memUsed, mean)",
            n=len(run.charged_mib),
            mib=sum(run.charged_mib) / len(run.charged_mib),
        )
    report.add(measure="max live sandboxes reached", n=held, stopped_by=run.stop_reason)
    report.notes.append(
        f"warm pool ready before {run.pool_before['ready']}, after {run.pool_after['ready']} (target "
        f"{run.pool_after['target']}): the drop is divided by the {run.added_guests} guests added in all"
    )
    report.add(
        measure="projected max by memory (MemAvailable before / per-sandbox cost)",
        n=int(run.before / MIB / per_sandbox),
    )
    report.add(measure="create while filling (POST → 201)", **percentiles(run.creates))
    report.samples["create while filling"] = run.creates
    report.series["memory"] = {
        "x_label": "live sandboxes",
        "y_label": "MemAvailable drop (MiB)",
        "x": run.counts,
        "y": {
            "measured": run.drops_mib,
            f"{per_sandbox:.0f} MiB x N": [per_sandbox * c for c in run.counts],
        },
    }
    if run.ended:
        report.notes.append(
            f"{len(run.ended)} of {held} sandboxes had ended before the reading, e.g. {run.ended[0]}"
        )


def run_density_bench(
    api: ApiClient, template: str, max_sandboxes: int, reserve_mib: int, settle_each: bool
) -> Report:
    report = Report("density")
    run = DensityRun(template, max_sandboxes)
    with http_client(api) as client:
        try:
            click.echo("  density: waiting for the warm pool and MemAvailable to settle", err=True)
            run.pool_before = wait_pool_idle(client, template)
            run.before = wait_memory_settled(mem_available_bytes)
            _fill(client, run, reserve_mib, settle_each)
            if run.live:
                _read_settled(client, run)
        finally:
            killed = len(run.live)
            failed = kill_all(client, run.live)
    if not run.live:
        report.notes.append(f"no sandbox started: {run.stop_reason}")
        return report
    _density_report(run, report)
    report.notes.append(f"{killed - failed}/{killed} sandboxes killed at the end")
    report.notes.append(
        "MemAvailable is host-wide: anything else running on the host moves it (read with that in mind)"
    )
    return report


@click.command("density")
@click.option("--max", "max_sandboxes", default=20, show_default=True, help="Stop after this many.")
@click.option("--reserve-mib", default=2048, show_default=True, help="Stop before MemAvailable goes below.")
@click.option("--settle-each", is_flag=True, help="Wait for memory to settle after every create (slower).")
@template_option
@json_dir_option("density.json")
@api_key_option
@click.pass_obj
def density_bench(
    config: Config,
    max_sandboxes: int,
    reserve_mib: int,
    settle_each: bool,
    template: str | None,
    json_dir: Path | None,
    api_key: str | None,
) -> None:
    """Idle memory per sandbox (MemAvailable drop / N) and max live sandboxes; kills them all after."""
    report = run_density_bench(
        target(config, api_key), template or config.default_template, max_sandboxes, reserve_mib, settle_each
    )
    report.show(json_dir)
