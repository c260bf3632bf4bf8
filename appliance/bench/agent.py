"""`cube bench agent`: the guest agent on this host, measured through the unmodified E2B SDK.

Reports run_code("1") and commands.run("true") round trips (p50/p99) and file
write/read throughput for 1 MiB and 100 MiB files. The SDK runs in debug mode, which
points it at localhost:49983/49999, so those ports must be free.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import click
import trio

from appliance.bench.options import results_dir_option
from appliance.bench.report import Report, percentiles
from appliance.guest import READY_LINE
from appliance.guest.launcher import AgentProcess, running_agent
from appliance.runtime.readiness import ReadinessProbe

MIB = 1024 * 1024
START_SAMPLES = 5


def seconds_to_first_health(agent: AgentProcess, port: int = 49983, timeout: float = 60) -> float:
    """From starting the agent's process to its first `GET /health` answer (polled every 2 ms)."""
    probe = ReadinessProbe(("127.0.0.1", port), "/health", attempt_timeout_s=1.0)

    async def first_answer() -> float | None:
        with trio.move_on_after(timeout):
            if await probe.wait(0.002, gave_up=lambda: agent.process.poll() is not None):
                return time.perf_counter() - agent.started_at
        return None

    seconds = trio.run(first_answer)
    if seconds is not None:
        return seconds
    if agent.process.poll() is not None:
        code = agent.process.returncode
        raise click.ClickException(f"the agent exited with code {code}: {agent.stderr()}")
    raise click.ClickException(f"the agent did not answer /health in time ({probe.last_error})")


def time_calls(call: Callable[[], object], samples: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        call()
    durations = []
    for _ in range(samples):
        started = time.perf_counter()
        call()
        durations.append(time.perf_counter() - started)
    return durations


def throughput(sandbox: object, path: str, size: int, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` write and read speed in MiB/s for one file of `size` bytes."""
    payload = os.urandom(size)
    write_s = read_s = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        sandbox.files.write(path, payload)  # type: ignore[attr-defined]
        write_s = min(write_s, time.perf_counter() - started)
        started = time.perf_counter()
        data = sandbox.files.read(path, format="bytes")  # type: ignore[attr-defined]
        read_s = min(read_s, time.perf_counter() - started)
        if len(data) != size:
            raise click.ClickException(f"read {len(data)} bytes back, wrote {size}")
    return size / MIB / write_s, size / MIB / read_s


@click.command("agent")
@click.option("--samples", default=100, show_default=True, help="round trips per latency metric")
@results_dir_option("where agent.json is written")
def agent(samples: int, json_dir: Path) -> None:
    """Guest agent latency and file throughput on this host (no VM), through the E2B SDK."""
    os.environ["E2B_DEBUG"] = "true"
    os.environ.pop("E2B_SANDBOX_URL", None)
    from e2b_code_interpreter import Sandbox  # imported here: the SDK is a test/bench dependency

    report = Report(name="agent")
    start_ups = []
    for _ in range(START_SAMPLES):
        with running_agent(echo_stderr=False) as started:
            start_ups.append(seconds_to_first_health(started))
    report.add(metric="start → first /health", **percentiles(start_ups))
    with running_agent(echo_stderr=False) as started:
        started.wait_for_line(READY_LINE)
        started.claim()  # /init with its boot token and no access token: open to the debug-mode SDK
        home = started.home
        sandbox = Sandbox.create()
        for metric, call in (
            ('run_code("1")', lambda: sandbox.run_code("1")),
            ('commands.run("true")', lambda: sandbox.commands.run("true")),
        ):
            report.add(metric=metric, **percentiles(time_calls(call, samples)))
        for label, size, repeats in (("1 MiB", MIB, 20), ("100 MiB", 100 * MIB, 3)):
            write_rate, read_rate = throughput(sandbox, str(home / "bench.bin"), size, repeats)
            report.add(metric=f"files.write {label}", mib_per_s=write_rate, n=repeats)
            report.add(metric=f"files.read {label}", mib_per_s=read_rate, n=repeats)
    report.notes.append("agent on the host as a plain process; SDK in debug mode over loopback HTTP/1.1")
    report.notes.append(f"start-up: process start to first /health answer, {START_SAMPLES} fresh agents")
    report.notes.append("throughput: best of n, multipart upload (the SDK default), bytes download")
    report.print_table()
    click.echo(f"json: {report.write_json(json_dir)}")
