"""`cube bench files`: files.write / files.read of 1 KiB, 1 MiB and 100 MiB on a live
sandbox through the unmodified E2B SDK (multipart upload, bytes download), via the router."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import click

from appliance.api.client import ApiClient
from appliance.bench.live import SANDBOX_TIMEOUT_S, progress, sdk_pointed_at, target
from appliance.bench.options import api_key_option, json_dir_option, template_option
from appliance.bench.report import Report, percentiles
from appliance.config import Config

KIB = 1024
MIB = 1024 * KIB
# (label, size, repeats): small files are latency, big ones throughput.
PROBE_SIZE = 64 * KIB
WRITE_BUDGET_S = 60.0  # per size: the SDK retries timed-out uploads, so a stalled one never ends
DEFAULT_SIZES = (("1 KiB", KIB, 30), ("1 MiB", MIB, 10), ("100 MiB", 100 * MIB, 2))


def parse_size(text: str) -> int:
    """'1KiB', '1 MiB', '100MiB', '4096' → bytes."""
    text = text.replace(" ", "")
    for suffix, factor in (("KiB", KIB), ("MiB", MIB), ("GiB", 1024 * MIB)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def label_size(size: int) -> str:
    for suffix, factor in (("MiB", MIB), ("KiB", KIB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {suffix}"
    return f"{size} B"


def _timed_loop(call: Any, repeats: int, label: str) -> tuple[list[float], str | None]:
    """Durations of up to `repeats` calls; stops at the first failure and returns its text."""
    durations: list[float] = []
    with progress(repeats, label) as bar:
        for _ in range(repeats):
            started = time.perf_counter()
            try:
                call()
            except Exception as exc:  # reported in the table; the other sizes still run
                elapsed = time.perf_counter() - started
                return durations, f"{type(exc).__name__} after {elapsed:.1f} s: {exc}"[:200]
            durations.append(time.perf_counter() - started)
            bar.update(1)
    return durations, None


def _upload_rate(sandbox: Any) -> float:
    payload = os.urandom(PROBE_SIZE)
    started = time.perf_counter()
    sandbox.files.write("/home/user/bench-probe.bin", payload, request_timeout=WRITE_BUDGET_S)
    return PROBE_SIZE / (time.perf_counter() - started)


def run_files_bench(api: ApiClient, template: str, sizes: tuple[tuple[str, int, int], ...]) -> Report:
    from e2b_code_interpreter import Sandbox

    report = Report("files")
    with sdk_pointed_at(api):
        sandbox = Sandbox.create(template=template, timeout=SANDBOX_TIMEOUT_S)
        try:
            for label, size, repeats in sizes:
                if not _bench_size(sandbox, report, label, size, repeats):
                    break
        finally:
            try:
                sandbox.kill()
            except Exception as exc:  # the sandbox may already be gone (killed as unresponsive)
                report.notes.append(f"kill: {type(exc).__name__}: {exc}"[:200])
    report.notes.append("E2B SDK files.write (multipart upload) / files.read(format='bytes'), via the router")
    report.notes.append("mib_per_s = size / median duration; data from os.urandom (incompressible)")
    return report


def _bench_size(sandbox: Any, report: Report, label: str, size: int, repeats: int) -> bool:
    """Writes, then reads, of `repeats` files of `size` bytes into the report; False once the
    sandbox stopped answering (the other sizes are not tried)."""
    payload = os.urandom(size)
    path = f"/home/user/bench-{size}.bin"
    timeout = max(30.0, size / MIB)  # ≥ 1 MiB/s or it counts as failed

    def write() -> None:
        sandbox.files.write(path, payload, request_timeout=timeout)

    def read() -> None:
        data = sandbox.files.read(path, format="bytes", request_timeout=timeout)
        if len(data) != size:
            raise click.ClickException(f"read {len(data)} bytes back, wrote {size}")

    rate = _upload_rate(sandbox)  # bytes/s, so a size that would take minutes is skipped
    projected = size * repeats / rate
    if projected > WRITE_BUDGET_S:
        writes: list[float] = []
        write_error: str | None = (
            f"skipped: {repeats} x {label} would take ~{projected:.0f} s at the "
            f"{rate / KIB:.0f} KiB/s a 64 KiB upload just measured "
            f"(budget {WRITE_BUDGET_S:.0f} s)"
        )
    else:
        writes, write_error = _timed_loop(write, repeats, f"files.write {label}")
    reads: list[float] = []
    read_error: str | None = None
    answering = True
    try:
        if write_error is not None:
            # Make the file inside the guest so the read direction is still measured.
            sandbox.run_code(
                f"import os\nwith open({path!r}, 'wb') as f: f.write(os.urandom({size}))",
                request_timeout=120,
            )
        reads, read_error = _timed_loop(read, repeats, f"files.read {label}")
        sandbox.run_code(f"import os\nos.remove({path!r})", request_timeout=60)
    except Exception as exc:  # the guest is gone or stuck: report what was measured
        read_error = read_error or f"{type(exc).__name__}: {exc}"[:200]
        report.notes.append(f"stopped after {label}: the sandbox stopped answering")
        answering = False
    for op, durations, error in (("write", writes, write_error), ("read", reads, read_error)):
        report.samples[f"files.{op} {label}"] = durations
        row: dict[str, Any] = {"op": f"files.{op}", "size": label, **percentiles(durations)}
        if durations:
            row["mib_per_s"] = size / MIB / statistics.median(durations)
        row["errors"] = int(error is not None)
        report.add(**row)
        if error is not None:
            report.notes.append(f"files.{op} {label} failed: {error}")
    return answering


@click.command("files")
@click.option(
    "--size",
    "sizes",
    multiple=True,
    default=("1KiB", "1MiB", "100MiB"),
    show_default=True,
    help="File sizes (KiB/MiB suffix).",
)
@click.option("--repeats", default=0, help="Repeats per size (default: 30 / 10 / 2 by size).")
@template_option
@json_dir_option("files.json")
@api_key_option
@click.pass_obj
def files_bench(
    config: Config,
    sizes: tuple[str, ...],
    repeats: int,
    template: str | None,
    json_dir: Path | None,
    api_key: str | None,
) -> None:
    """files.write / files.read latency and throughput through the E2B SDK."""
    plan = []
    for text in sizes:
        size = parse_size(text)
        default_repeats = 30 if size <= 64 * KIB else 10 if size <= 8 * MIB else 2
        plan.append((label_size(size), size, repeats or default_repeats))
    report = run_files_bench(target(config, api_key), template or config.default_template, tuple(plan))
    report.show(json_dir)
