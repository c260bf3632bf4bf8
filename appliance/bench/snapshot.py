"""`cube bench snapshot`: what a snapshot and a fork cost, through the unmodified E2B SDK.

One sandbox writes `--write-mb` MiB (so the snapshot has a disk to capture) and holds a
Python variable, then per round:
- snapshot: `create_snapshot(mode=--mode)` → its answer (filesystem on uml: sync, freeze,
  COW copy, thaw, merge over a copy of the template image, master/snapshots.py; on kvm a
  checkpoint, cubelet/checkpoints.py: vCPUs stopped while RAM and the disk overlay are
  written, the overlay folded into a copy of the template image; full keeps the memory);
- create from it: `Sandbox.create(<snapshot id>)` → ready (filesystem: a cold boot; full:
  a restore of the checkpoint), then a read of the written file to prove it is there;
- delete: `Sandbox.delete_snapshot` (outside the timings above).
Plus `fork(count=1)`: its answer (on uml, each fork's error, at once; on kvm a checkpoint
and a sandbox restored from it, which is then killed and its checkpoint deleted, untimed).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from appliance.api.client import ApiClient
from appliance.bench.live import SANDBOX_TIMEOUT_S, progress, sdk_pointed_at, target, timed
from appliance.bench.options import api_key_option, json_dir_option, template_option
from appliance.bench.report import Report, percentiles
from appliance.config import Config

MARKER = "/home/user/bench-snapshot.bin"
MODES = ("filesystem", "full")


def _one_round(source: Any, mode: str, write_mb: int, samples: dict[str, list[float]]) -> None:
    from e2b import Sandbox

    started = time.perf_counter()
    snapshot_id = source.create_snapshot(mode=mode).snapshot_id
    samples[f"create_snapshot ({mode})"].append(time.perf_counter() - started)
    try:
        started = time.perf_counter()
        created = Sandbox.create(snapshot_id, timeout=SANDBOX_TIMEOUT_S)
        samples["create from snapshot"].append(time.perf_counter() - started)
        try:
            size = created.commands.run(f"stat -c %s {MARKER}").stdout.strip()
            if size != str(write_mb << 20):
                raise click.ClickException(f"the snapshot's sandbox has {size!r} bytes in {MARKER}")
        finally:
            created.kill()
    finally:
        Sandbox.delete_snapshot(snapshot_id)
    forks: list[Any] = []
    samples["fork (count=1)"].append(timed(lambda: forks.extend(source.fork(count=1))))
    _discard_forks(source, forks)


def _discard_forks(source: Any, forks: list[Any]) -> None:
    """Kill the forks that started, then delete their checkpoint (a snapshot of the source)."""
    from e2b import Sandbox

    for fork in forks:
        if not isinstance(fork, Exception):
            fork.kill()
    for checkpoint in Sandbox.list_snapshots(sandbox_id=source.sandbox_id).next_items():
        Sandbox.delete_snapshot(checkpoint.snapshot_id)


def _rounds(
    template: str, mode: str, rounds: int, write_mb: int, report: Report, source_timeout_s: int
) -> None:
    from e2b import Sandbox

    samples: dict[str, list[float]] = {
        f"create_snapshot ({mode})": [],
        "create from snapshot": [],
        "fork (count=1)": [],
    }
    source = Sandbox.create(template=template, timeout=source_timeout_s)
    try:
        source.commands.run(f"head -c {write_mb << 20} /dev/urandom > {MARKER}", timeout=120)
        with progress(rounds, "snapshot → create from it → delete, fork") as bar:
            for _ in range(rounds):
                _one_round(source, mode, write_mb, samples)
                bar.update(1)
    finally:
        source.kill()
    for name, durations in samples.items():
        report.samples[name] = durations
        report.add(metric=name, **percentiles(durations))


def run_snapshot_bench(
    api: ApiClient,
    template: str,
    rounds: int,
    write_mb: int,
    mode: str = "filesystem",
    source_timeout_s: int = SANDBOX_TIMEOUT_S,
) -> Report:
    """`source_timeout_s`: the source sandbox's E2B timeout (it lives through every round)."""
    report = Report("snapshot")
    with sdk_pointed_at(api):
        _rounds(template, mode, rounds, write_mb, report, source_timeout_s)
    report.notes.append(
        f"E2B Python SDK (sync) against {api.base_url}; the source sandbox wrote {write_mb} MiB first"
    )
    if mode == "filesystem":
        report.notes.append("create from snapshot is a cold boot (snapshots are never pooled)")
    else:
        report.notes.append("create from snapshot restores its memory checkpoint (kvm)")
    return report


@click.command("snapshot")
@click.option("--rounds", default=3, show_default=True, help="snapshot → create → delete rounds")
@click.option("--write-mb", default=64, show_default=True, help="MiB the source sandbox writes first")
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="filesystem",
    show_default=True,
    help="the snapshots' mode (full: memory too; kvm only)",
)
@template_option
@json_dir_option("snapshot.json")
@api_key_option
@click.pass_obj
def snapshot_bench(
    config: Config,
    rounds: int,
    write_mb: int,
    mode: str,
    template: str | None,
    json_dir: Path | None,
    api_key: str | None,
) -> None:
    """Snapshot, create-from-snapshot and fork latency through the E2B SDK."""
    report = run_snapshot_bench(
        target(config, api_key), template or config.default_template, rounds, write_mb, mode
    )
    report.show(json_dir)
