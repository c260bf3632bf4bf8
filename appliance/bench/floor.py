"""The floor: what starting isolated code costs on this host without the appliance.

Reported beside the appliance's own numbers so a reader sees ratios measured in
the same run on the same machine: a bare `python3 -c pass`, and the same inside a
`bwrap` namespace sandbox (Debian's bubblewrap), the cheapest isolation there is.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import click
import trio

from appliance.bench.options import json_dir_option
from appliance.bench.report import Report, percentiles

PYTHON = "/usr/bin/python3" if shutil.which("/usr/bin/python3") else sys.executable


def _bwrap_argv() -> list[str] | None:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None
    return [
        bwrap,
        "--unshare-all",
        "--die-with-parent",
        "--ro-bind",
        "/usr",
        "/usr",
        "--ro-bind",
        "/etc",
        "/etc",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--symlink",
        "usr/bin",
        "/bin",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        PYTHON,
        "-c",
        "pass",
    ]


async def _time_command(argv: list[str], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await trio.run_process(argv, capture_stdout=True, capture_stderr=True)
        samples.append(time.perf_counter() - started)
    return samples


async def measure_floor(runs: int = 20) -> dict[str, dict[str, float]]:
    """p50/p95/… of each floor path, keyed by its name."""
    results = {"python3 -c pass": percentiles(await _time_command([PYTHON, "-c", "pass"], runs))}
    bwrap = _bwrap_argv()
    if bwrap is not None:
        results["bwrap + python3 -c pass"] = percentiles(await _time_command(bwrap, runs))
    return results


@click.command("floor")
@click.option("--runs", default=20, show_default=True, help="Starts measured per path.")
@json_dir_option("floor.json")
def floor_command(runs: int, json_dir: Path | None) -> None:
    """Start cost of isolated code on this host without the appliance."""
    report = Report("floor")
    for name, stats in trio.run(measure_floor, runs).items():
        report.add(path=name, **stats)
    report.show(json_dir)
