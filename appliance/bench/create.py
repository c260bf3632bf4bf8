"""`cube bench create`: how fast sandboxes start, and what an idle one costs.

Two measurements:
- through the API (default): `POST /v2/sandboxes` → 201 latency p50/p95/p99 at
  each concurrency. A round runs in batches as big as the template's warm pool
  (at least the concurrency); before each batch the bench waits until the pool
  the service reports (`warmPool` of `GET /templates/{id}`) is full, and deletes
  the batch's sandboxes after it (outside the timing). So a round measures the
  warm path; a concurrency above the pool's target boots the excess cold.
- `--direct` (root, on the node): boots guests with the uml runtime itself,
  bypassing the service: cold boot → agent-ready (envd answers) and →
  interpreter-ready (default Python kernel up) times, and idle memory per
  sandbox (kernels started) as the MemAvailable drop over N guests held at
  once, divided by N.
  It uses its own host_network and uid range, so it can run beside `cube serve`.
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import click
import httpx
import trio

from appliance.api.client import ApiClient
from appliance.bench.live import pool_state_of, target
from appliance.bench.options import api_key_option, json_dir_option, template_option
from appliance.bench.report import Report, percentiles
from appliance.config import Config

BENCH_HOST_NETWORK = "10.232.0.0/22"
BENCH_UID_OFFSET = 50_000  # above the service's slots
FULLY_READY_TIMEOUT_S = 120.0
IDLE_SETTLE_S = 5.0
POOL_POLL_S = 0.5  # let guests finish their start-up before reading MemAvailable


async def _timed_create(client: httpx.AsyncClient, template: str) -> tuple[str, float] | None:
    """One `POST /v2/sandboxes` → (sandbox id, seconds to the 201), or None if it failed."""
    started = time.perf_counter()
    try:
        response = await client.post("/v2/sandboxes", json={"templateID": template, "timeout": 120})
    except httpx.HTTPError:
        return None
    if response.status_code != 201:
        return None
    return response.json()["sandboxID"], time.perf_counter() - started


async def _create_batch(
    client: httpx.AsyncClient, template: str, concurrency: int, count: int
) -> tuple[list[float], int]:
    """`count` creates by `concurrency` workers; the sandboxes are deleted after the batch,
    so no teardown competes with the creates being timed."""
    latencies: list[float] = []
    created: list[str] = []
    errors = 0
    remaining = count

    async def worker() -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            outcome = await _timed_create(client, template)
            if outcome is None:
                errors += 1
                continue
            created.append(outcome[0])
            latencies.append(outcome[1])

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    finally:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for sandbox_id in created:
                    nursery.start_soon(client.delete, f"/sandboxes/{sandbox_id}")
    return latencies, errors


async def _sustained(
    client: httpx.AsyncClient, template: str, concurrency: int, seconds: float
) -> tuple[list[float], int, float]:
    """Create → delete in a loop by `concurrency` workers for `seconds`: the rate the service
    keeps up once the warm pool is drained and refills and teardowns compete with creates.
    Returns the create latencies, the errors and the elapsed time."""
    latencies: list[float] = []
    errors = 0
    started = time.perf_counter()

    async def worker(deletes: trio.Nursery) -> None:
        nonlocal errors
        while time.perf_counter() - started < seconds:
            outcome = await _timed_create(client, template)
            if outcome is None:
                errors += 1
                continue
            latencies.append(outcome[1])
            deletes.start_soon(client.delete, f"/sandboxes/{outcome[0]}")

    async with trio.open_nursery() as deletes:
        async with trio.open_nursery() as workers:
            for _ in range(concurrency):
                workers.start_soon(worker, deletes)
        elapsed = time.perf_counter() - started
    return latencies, errors, elapsed


async def pool_state(client: httpx.AsyncClient, template: str) -> dict[str, int]:
    """The template's warm pool as the service reports it: target, ready, booting."""
    response = await client.get(f"/templates/{template}")
    return pool_state_of(response.raise_for_status().json())


async def wait_for_full_pool(client: httpx.AsyncClient, template: str, timeout_s: float) -> dict[str, int]:
    """Poll until the pool holds its target (or `timeout_s` passed); the last state read."""
    state = await pool_state(client, template)
    with trio.move_on_after(timeout_s):
        while state["ready"] < state["target"]:
            await trio.sleep(POOL_POLL_S)
            state = await pool_state(client, template)
    return state


async def run_api_create_bench(
    api: ApiClient,
    template: str,
    concurrencies: tuple[int, ...],
    per_round: int,
    pool_wait_s: float,
    sustain_s: float = 0.0,
    sustain_concurrency: int = 2,
) -> Report:
    """Each round: `per_round` creates (at least the concurrency) in batches as big as the pool
    (at least the concurrency), each batch started on a full pool (waiting up to `pool_wait_s`):
    a round measures the warm path unless its concurrency exceeds the pool, whose excess boots cold."""
    report = Report("create")
    limits = httpx.Limits(max_connections=max(concurrencies) * 2)
    short_pools: list[str] = []
    target = 0
    async with httpx.AsyncClient(
        base_url=api.base_url, headers=api.headers, limits=limits, timeout=180, trust_env=False
    ) as client:
        for concurrency in concurrencies:
            latencies: list[float] = []
            errors = 0
            remaining = max(per_round, concurrency)
            while remaining > 0:
                state = await wait_for_full_pool(client, template, pool_wait_s)
                target = state["target"]
                if state["ready"] < target:
                    short_pools.append(f"c={concurrency}: {state['ready']}/{target} ready")
                batch = min(remaining, max(concurrency, target))
                got, failed = await _create_batch(client, template, concurrency, batch)
                latencies += got
                errors += failed
                remaining -= batch
            report.samples[f"create c={concurrency}"] = latencies
            report.add(
                path="api",
                concurrency=concurrency,
                errors=errors,
                **{k: v for k, v in percentiles(latencies).items() if k != "mean_ms"},
            )
        if sustain_s > 0:
            await wait_for_full_pool(client, template, pool_wait_s)
            latencies, errors, elapsed = await _sustained(client, template, sustain_concurrency, sustain_s)
            report.samples[f"sustained c={sustain_concurrency}"] = latencies
            report.add(
                path=f"api sustained {sustain_s:.0f} s",
                concurrency=sustain_concurrency,
                errors=errors,
                **{k: v for k, v in percentiles(latencies).items() if k != "mean_ms"},
                per_s=round(len(latencies) / elapsed, 2),
            )
            report.notes.append(
                f"sustained: create → delete loops for {sustain_s:.0f} s from a full pool; "
                "per_s = sandboxes created per second over the whole run"
            )
    report.notes.append(
        f"batches of max(concurrency, pool target {target}), each on a full pool; "
        "a concurrency above the pool target boots the excess cold"
    )
    if short_pools:
        report.notes.append(f"pool not full after {pool_wait_s:.0f} s: " + "; ".join(short_pools))
    return report


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


async def run_direct_bench(
    config: Config, template_name: str, cold_boots: int, held: int, host_network: str = BENCH_HOST_NETWORK
) -> Report:
    """Boot guests with the uml runtime in this process; see the module docstring."""
    from appliance.net.service import CubeVS
    from appliance.runtime.base import BootSpec
    from appliance.runtime.uml.instance import UmlInstance
    from appliance.runtime.uml.runtime import UmlRuntime
    from appliance.templates.catalog import resolve_template

    template = resolve_template(config, template_name)
    work = Path(tempfile.mkdtemp(prefix="cube-bench-create-"))
    bench_config = dataclasses.replace(
        config,
        state_dir=work / "state",
        run_dir=work / "run",
        host_network=host_network,
        uid_base=config.uid_base + BENCH_UID_OFFSET,
        allow_unenforced_network=True,
    )
    report = Report("create-direct")
    try:
        async with CubeVS.start(bench_config) as cubevs:
            runtime = UmlRuntime(bench_config, cubevs)

            def spec(slot: int) -> BootSpec:
                return BootSpec.for_template(bench_config, template, f"bench-{secrets.token_hex(4)}", slot)

            boots: list[float] = []
            interpreter_boots: list[float] = []
            for _ in range(cold_boots):
                async with trio.open_nursery() as nursery:
                    instance = await nursery.start(runtime.run, spec(0))
                    assert isinstance(instance, UmlInstance)
                    boots.append(instance.boot_seconds)
                    with trio.move_on_after(FULLY_READY_TIMEOUT_S):
                        await instance.wait_fully_ready()
                        interpreter_boots.append(instance.interpreter_seconds)
                    nursery.cancel_scope.cancel()
            report.samples["cold boot → agent ready"] = boots
            report.samples["cold boot → interpreter ready"] = interpreter_boots
            report.add(
                measure="cold boot to agent ready (sequential)",
                **{k: v for k, v in percentiles(boots).items() if k != "mean_ms"},
            )
            report.add(
                measure="cold boot to interpreter ready (same boots)",
                errors=len(boots) - len(interpreter_boots),
                **{k: v for k, v in percentiles(interpreter_boots).items() if k != "mean_ms"},
            )

            if held:
                before = mem_available_bytes()
                async with trio.open_nursery() as nursery:
                    instances = [await nursery.start(runtime.run, spec(slot)) for slot in range(held)]
                    # Idle means the default Python kernel already started in every guest.
                    with trio.fail_after(FULLY_READY_TIMEOUT_S):
                        for instance in instances:
                            await instance.wait_fully_ready()
                    await trio.sleep(IDLE_SETTLE_S)
                    drop = before - mem_available_bytes()
                    charged = sum(i.memory_usage_bytes() for i in instances)
                    nursery.cancel_scope.cancel()
                report.add(
                    measure=f"idle memory per sandbox (N={held})",
                    mem_available_drop_mib=drop / held / (1 << 20),
                    cgroup_charged_mib=charged / held / (1 << 20),
                )
            report.notes.append(f"kernel {runtime.kernel}, template {template.template_id}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


@click.command("create")
@click.option(
    "--concurrency", "concurrencies", multiple=True, type=int, default=(1, 10, 50), show_default=True
)
@click.option(
    "--count", default=50, show_default=True, help="Creates per API round (at least the concurrency)."
)
@click.option(
    "--pool-wait", default=300.0, show_default=True, help="Longest wait for a full pool before a batch (s)."
)
@click.option(
    "--sustain",
    default=60.0,
    show_default=True,
    help="Seconds of create → delete loops (0: off).",
)
@click.option("--sustain-concurrency", default=2, show_default=True, help="Workers in the sustained loop.")
@template_option
@click.option("--direct", is_flag=True, help="Boot with the uml runtime in-process instead (root).")
@click.option("--boots", default=10, show_default=True, help="--direct: sequential cold boots to time.")
@click.option("--held", default=10, show_default=True, help="--direct: guests held at once for memory.")
@json_dir_option("the JSON")
@api_key_option
@click.pass_obj
def create_bench(
    config: Config,
    concurrencies: tuple[int, ...],
    count: int,
    pool_wait: float,
    sustain: float,
    sustain_concurrency: int,
    template: str | None,
    direct: bool,
    boots: int,
    held: int,
    json_dir: Path | None,
    api_key: str | None,
) -> None:
    """Sandbox create latency (API, warm pools) or cold boot and idle memory (--direct)."""
    template = template or config.default_template
    if direct:
        report = trio.run(run_direct_bench, config, template, boots, held)
    else:
        api = target(config, api_key)
        report = trio.run(
            run_api_create_bench, api, template, concurrencies, count, pool_wait, sustain, sustain_concurrency
        )
    report.show(json_dir)
