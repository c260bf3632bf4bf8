"""`cube bench restart`: how long sandboxes are out of reach when `cube serve` restarts.

A private service (bench/private.py: its own state, ports, network and uid range, the
host's built templates) gets N sandboxes, each holding a Python variable; then, for
each round, the service is killed (`--mode kill`: SIGKILL, a crash; `term`: SIGTERM,
systemd's stop/restart) and started again, timing from the new process's start:

- API ready: /health answers (the guests are taken over before the API serves);
- all answering: every sandbox's envd answers /health through the proxy, as the SDKs
  reach it (header-routed, with its access token).

After the last round every sandbox must still hold its variable (checked, reported).
The issue's goal: ≤ 2 s for 20. Each N runs if MemAvailable holds it with `--reserve-mib`
to spare, at the idle cost per sandbox measured on the way (the first N's MemAvailable drop).
The appliance on this host is never touched; everything started is ended at the end.
"""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import httpx

from appliance.bench.create import mem_available_bytes
from appliance.bench.options import json_dir_option
from appliance.bench.private import PrivateService, PrivateSettings
from appliance.bench.report import Report, percentiles
from appliance.config import Config
from appliance.runtime.base import CODE_INTERPRETER_PORT, ENVD_PORT

MIB = 1 << 20
ANSWER_TIMEOUT_S = 300.0  # after a restart, for all N to answer
# Each create is bounded by its request's timeout (300 s); none is begun after N times this
# (~1.2 s each with PARALLEL creates on a loaded 2-core host: N = 100 in about two minutes).
CREATE_BUDGET_S = 30.0
PARALLEL = 4
HELD = "kept = 6 * 7"


def _sandbox_headers(sandbox_id: str, port: int, token: str) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(port), "X-Access-Token": token}


def _create(service: PrivateService, key: str, template: str, deadline: float) -> tuple[str, str]:
    """One sandbox holding a variable in its interpreter; (id, envd access token). None is begun
    past `deadline` (monotonic): the whole N is bounded, not only each create."""
    if time.monotonic() > deadline:
        raise click.ClickException("the sandboxes were not all created in time (CREATE_BUDGET_S each)")
    with httpx.Client(base_url=service.url, timeout=300, trust_env=False) as client:
        made = client.post(
            "/sandboxes", json={"templateID": template, "timeout": 3600}, headers={"X-API-KEY": key}
        )
        made.raise_for_status()
        sandbox_id, token = made.json()["sandboxID"], made.json()["envdAccessToken"]
        ran = client.post(
            "/execute",
            json={"code": HELD},
            headers=_sandbox_headers(sandbox_id, CODE_INTERPRETER_PORT, token),
        )
        ran.raise_for_status()
    return sandbox_id, token


def _holds_its_variable(service: PrivateService, sandbox_id: str, token: str) -> bool:
    with httpx.Client(base_url=service.url, timeout=120, trust_env=False) as client:
        ran = client.post(
            "/execute",
            json={"code": "print(kept)"},
            headers=_sandbox_headers(sandbox_id, CODE_INTERPRETER_PORT, token),
        )
    lines = (
        [json.loads(line) for line in ran.text.splitlines() if line.strip()] if ran.status_code == 200 else []
    )
    return any(event.get("type") == "stdout" and event.get("text") == "42\n" for event in lines)


def _until_all_answer(service: PrivateService, sandboxes: dict[str, str]) -> float:
    """Until every sandbox's envd answers /health through the proxy, asked by PARALLEL clients at
    once (as many SDK users would: one client asking 100 in turn would time itself); the
    monotonic time then."""
    items = list(sandboxes.items())
    shares = [dict(items[i::PARALLEL]) for i in range(PARALLEL)]
    with ThreadPoolExecutor(PARALLEL) as pool:
        return max(pool.map(lambda share: _until_answer(service, share), shares))


def _until_answer(service: PrivateService, sandboxes: dict[str, str]) -> float:
    waiting = dict(sandboxes)
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    with httpx.Client(base_url=service.url, timeout=5, trust_env=False) as client:
        while waiting:
            if time.monotonic() > deadline:
                raise click.ClickException(f"{len(waiting)} sandboxes did not answer after the restart")
            for sandbox_id, token in list(waiting.items()):
                try:
                    answer = client.get("/health", headers=_sandbox_headers(sandbox_id, ENVD_PORT, token))
                except httpx.HTTPError:
                    continue
                if answer.status_code < 300:
                    del waiting[sandbox_id]
    return time.monotonic()


def _restart_rounds(
    service: PrivateService, sandboxes: dict[str, str], mode: str, rounds: int
) -> tuple[list[float], list[float]]:
    to_api: list[float] = []
    to_all: list[float] = []
    for _ in range(rounds):
        service.stop(signal.SIGKILL if mode == "kill" else signal.SIGTERM)
        started = service.start()
        to_api.append(service.wait_ready() - started)
        to_all.append(_until_all_answer(service, sandboxes) - started)
    return to_api, to_all


def _measure(
    host: Config, settings: PrivateSettings, n: int, mode: str, rounds: int
) -> tuple[list[float], list[float], int, float]:
    """N sandboxes on a private service restarted `rounds` times: the times to API ready and to all
    answering, how many kept their variable, and the idle memory each took (MiB)."""
    service = PrivateService(host, settings, prefix="cubebr-")
    try:
        service.start()
        service.wait_ready()
        key = service.create_key("bench-restart")
        before = mem_available_bytes()
        deadline = time.monotonic() + CREATE_BUDGET_S * n
        with ThreadPoolExecutor(PARALLEL) as pool:
            sandboxes = dict(
                pool.map(lambda _: _create(service, key, "code-interpreter", deadline), range(n))
            )
        per_sandbox_mib = max(1.0, (before - mem_available_bytes()) / MIB / n)
        to_api, to_all = _restart_rounds(service, sandboxes, mode, rounds)
        with ThreadPoolExecutor(PARALLEL) as pool:
            held = sum(pool.map(lambda item: _holds_its_variable(service, *item), sandboxes.items()))
    finally:
        service.remove()
    return to_api, to_all, held, per_sandbox_mib


def run_restart_bench(
    host: Config, counts: tuple[int, ...], mode: str, rounds: int, reserve_mib: int, settings: PrivateSettings
) -> Report:
    report = Report("restart")
    per_sandbox_mib: float | None = None
    for n in counts:
        available_mib = mem_available_bytes() // MIB
        if per_sandbox_mib is not None and n * per_sandbox_mib > available_mib - reserve_mib:
            report.notes.append(
                f"N={n} skipped: ~{n * per_sandbox_mib:.0f} MiB needed ({per_sandbox_mib:.0f} MiB idle per "
                f"sandbox), {available_mib} MiB available, {reserve_mib} MiB kept in reserve"
            )
            continue
        to_api, to_all, held, per_sandbox_mib = _measure(host, settings, n, mode, rounds)
        for label, samples in (("start → API ready", to_api), ("start → all answering", to_all)):
            report.add(measure=label, sandboxes=n, mode=mode, **percentiles(samples))
            report.samples[f"{label}, N={n}"] = samples
        report.add(measure="state kept (Python variable)", sandboxes=n, mode=mode, kept=f"{held}/{n}")
        report.add(
            measure="idle memory per sandbox (MemAvailable drop / N)", sandboxes=n, mib=per_sandbox_mib
        )
        if n == 20:
            p50 = percentiles(to_all)["p50_ms"]
            met = "met" if p50 <= 2000 else "not met"
            report.notes.append(f"target ≤ 2 s for 20: {p50 / 1000:.2f} s (p50), {met}")
    # The host kind is in the report's header (bench/report.host_kind); which runtime's guests
    # were taken over (uml supervisors or kvm VMM processes) is said here too, beside the times.
    report.notes.append(
        f"sandboxes on the {report.host.get('runtime', '?')} runtime ({report.host.get('kvm', '?')})"
    )
    report.notes.append(
        "start = the new `cube serve` process is started (SIGKILL/SIGTERM of the old one before it); "
        "API ready includes taking the guests over (done before the API serves)"
    )
    return report


@click.command("restart")
@click.option(
    "--sandboxes", "counts", multiple=True, type=int, default=(20, 100), show_default=True,
    help="N: sandboxes held across the restarts (repeat for several N).",
)  # fmt: skip
@click.option("--mode", type=click.Choice(["kill", "term"]), default="kill", show_default=True)
@click.option("--rounds", default=3, show_default=True, help="Restarts per N.")
@click.option("--reserve-mib", default=3072, show_default=True, help="MemAvailable left to the host.")
@click.option("--api-port", default=3480, show_default=True)
@click.option("--tls-port", default=3881, show_default=True)
@click.option("--host-network", default="10.225.0.0/22", show_default=True, help="The private service's.")
@click.option("--uid-base", default=560000, show_default=True, help="The private service's sandbox uids.")
@json_dir_option("restart.json")
@click.pass_obj
def restart_bench(
    config: Config,
    counts: tuple[int, ...],
    mode: str,
    rounds: int,
    reserve_mib: int,
    api_port: int,
    tls_port: int,
    host_network: str,
    uid_base: int,
    json_dir: Path | None,
) -> None:
    """Service start to all N sandboxes taken over and answering, on a private service (needs root)."""
    budget = max(counts) * 1024  # the sandboxes' memory is checked against MemAvailable instead
    settings = PrivateSettings(api_port, tls_port, host_network, uid_base, memory_budget_mb=budget)
    report = run_restart_bench(config, tuple(counts), mode, rounds, reserve_mib, settings)
    report.show(json_dir)
