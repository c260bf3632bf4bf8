"""`cube bench exec`: what running code costs an agent, through the unmodified E2B SDK.

- first exec: the whole loop an agent pays for one-shot code — Sandbox.create →
  run_code("print(1)") result → kill — timed as a whole and by phase;
- round trips on one live sandbox: run_code("1") and commands.run("true").
Plus the raw-HTTP floor of the same path: GET envd /health through the router.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import httpx

from appliance.api.client import ApiClient
from appliance.bench.live import SANDBOX_TIMEOUT_S, progress, sdk_pointed_at, target, timed
from appliance.bench.options import api_key_option, json_dir_option, template_option
from appliance.bench.report import Report, percentiles
from appliance.config import Config

ENVD_PORT = 49983
CALL_TIMEOUT_S = 30.0
MAX_ERRORS = 3  # a call failing this often is broken, not slow: stop timing it


def _first_exec_loops(template: str, loops: int, report: Report) -> None:
    from e2b_code_interpreter import Sandbox

    phases: dict[str, list[float]] = {"create": [], "run_code": [], "kill": [], "to result": [], "loop": []}
    with progress(loops, "first exec: create → run_code → kill") as bar:
        for _ in range(loops):
            sandbox = None
            try:
                t0 = time.perf_counter()
                sandbox = Sandbox.create(template=template, timeout=SANDBOX_TIMEOUT_S)
                t1 = time.perf_counter()
                execution = sandbox.run_code("print(1)")
                t2 = time.perf_counter()
                if execution.logs.stdout != ["1\n"]:
                    raise click.ClickException(f"run_code printed {execution.logs.stdout!r}")
                sandbox.kill()
                sandbox = None
                t3 = time.perf_counter()
            finally:
                if sandbox is not None:
                    sandbox.kill()
            create_s, run_s, kill_s = t1 - t0, t2 - t1, t3 - t2
            for key, value in (
                ("create", create_s),
                ("run_code", run_s),
                ("kill", kill_s),
                ("to result", create_s + run_s),
                ("loop", create_s + run_s + kill_s),
            ):
                phases[key].append(value)
            bar.update(1)
    for key, label in (
        ("loop", "first exec: create → print(1) → kill"),
        ("to result", "first exec: create → print(1) result"),
        ("create", "  phase: Sandbox.create"),
        ("run_code", "  phase: first run_code"),
        ("kill", "  phase: kill"),
    ):
        report.samples[label.strip()] = phases[key]
        report.add(metric=label, **percentiles(phases[key]))


def _round_trips(api: ApiClient, template: str, samples: int, report: Report) -> None:
    from e2b_code_interpreter import Sandbox

    sandbox = Sandbox.create(template=template, timeout=SANDBOX_TIMEOUT_S)
    try:
        sandbox.run_code("1")  # warm-up: the first request of a connection pays its set-up
        with httpx.Client(base_url=api.base_url, timeout=30, trust_env=False) as raw:
            headers = {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": str(ENVD_PORT)}
            if sandbox._envd_access_token:  # what the SDK sends on every envd request
                headers["X-Access-Token"] = sandbox._envd_access_token
            # commands.run last: on this UML guest it has made the agent stop answering (see docs).
            calls = {
                "raw HTTP GET envd /health (router)": lambda: raw.get(
                    "/health", headers=headers
                ).raise_for_status(),
                'run_code("1")': lambda: sandbox.run_code("1", request_timeout=CALL_TIMEOUT_S),
                'commands.run("true")': lambda: sandbox.commands.run("true", request_timeout=CALL_TIMEOUT_S),
            }
            for name, call in calls.items():
                durations = []
                errors: list[str] = []
                with progress(samples, name) as bar:
                    for _ in range(samples):
                        try:
                            durations.append(timed(call))
                        except Exception as exc:  # counted, reported; the round goes on
                            errors.append(f"{type(exc).__name__}: {exc}"[:160])
                            if len(errors) >= MAX_ERRORS:
                                break
                        bar.update(1)
                report.samples[name] = durations
                stats = percentiles(durations)
                per_s = 1000 / stats["mean_ms"] if durations else 0.0
                report.add(metric=name, errors=len(errors), **stats, per_s=per_s)
                if errors:
                    report.notes.append(f"{name}: {len(errors)} errors, first: {errors[0]}")
    finally:
        sandbox.kill()


def run_exec_bench(api: ApiClient, template: str, loops: int, samples: int) -> Report:
    report = Report("exec")
    with sdk_pointed_at(api):
        if loops:
            _first_exec_loops(template, loops, report)
        if samples:
            _round_trips(api, template, samples, report)
    report.notes.append(
        f"E2B Python SDK (sync) against {api.base_url}; one plain-HTTP port (E2B_SANDBOX_URL routing)"
    )
    report.notes.append("first-exec creates come from the warm pool while it lasts; kill is synchronous")
    return report


@click.command("exec")
@click.option("--loops", default=10, show_default=True, help="first-exec loops (create → run → kill)")
@click.option("--samples", default=50, show_default=True, help="round trips per call on a live sandbox")
@template_option
@json_dir_option("exec.json")
@api_key_option
@click.pass_obj
def exec_bench(
    config: Config, loops: int, samples: int, template: str | None, json_dir: Path | None, api_key: str | None
) -> None:
    """First-exec loop and run_code / commands.run round trips through the E2B SDK."""
    report = run_exec_bench(target(config, api_key), template or config.default_template, loops, samples)
    report.show(json_dir)
