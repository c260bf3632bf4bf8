"""`cube bench api`: control-plane requests/s for list and get at several concurrencies."""

from __future__ import annotations

import time
from pathlib import Path

import click
import httpx
import trio

from appliance.api.client import ApiClient
from appliance.bench.options import api_key_option, json_dir_option
from appliance.bench.report import Report, percentiles
from appliance.config import Config


async def _measure(
    client: httpx.AsyncClient, path: str, concurrency: int, seconds: float
) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    started = time.perf_counter()
    stop_at = started + seconds

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                response = await client.get(path)
                ok = response.status_code < 400
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return latencies, errors, time.perf_counter() - started


async def run_api_bench(
    api: ApiClient, concurrencies: tuple[int, ...], seconds: float, sandbox_id: str | None, template: str
) -> Report:
    report = Report("api")
    limits = httpx.Limits(max_connections=max(concurrencies), max_keepalive_connections=max(concurrencies))
    async with httpx.AsyncClient(
        base_url=api.base_url, headers=api.headers, limits=limits, trust_env=False
    ) as client:
        created: str | None = None
        if sandbox_id is None:
            listed = (await client.get("/v2/sandboxes", params={"limit": 1})).json()
            if listed:
                sandbox_id = listed[0]["sandboxID"]
            else:
                response = await client.post("/v2/sandboxes", json={"templateID": template, "timeout": 600})
                if response.status_code == 201:
                    sandbox_id = created = response.json()["sandboxID"]
        if sandbox_id is not None:
            get_path = f"/sandboxes/{sandbox_id}"
        else:
            get_path = f"/templates/{template}"
            report.notes.append(f"no sandbox could be created; 'get' measures GET {get_path}")
        try:
            for name, path in (("list", "/v2/sandboxes"), ("get", get_path)):
                for concurrency in concurrencies:
                    latencies, errors, elapsed = await _measure(client, path, concurrency, seconds)
                    report.add(
                        call=name,
                        concurrency=concurrency,
                        requests_per_s=len(latencies) / elapsed,
                        errors=errors,
                        **{k: v for k, v in percentiles(latencies).items() if k in ("p50_ms", "p99_ms")},
                    )
        finally:
            if created is not None:
                await client.delete(f"/sandboxes/{created}")
    return report


@click.command("api")
@click.option("--seconds", default=3.0, show_default=True, help="Duration of each measurement.")
@click.option(
    "--concurrency", "concurrencies", multiple=True, type=int, default=(1, 10, 50), show_default=True
)
@click.option("--sandbox-id", default=None, help="Sandbox for 'get' (default: a running one, or a new one).")
@json_dir_option("api.json")
@api_key_option
@click.pass_obj
def api_bench(
    config: Config,
    seconds: float,
    concurrencies: tuple[int, ...],
    sandbox_id: str | None,
    json_dir: Path | None,
    api_key: str | None,
) -> None:
    """Control-plane requests/s for list and get at concurrency 1/10/50."""
    api = ApiClient.from_config(config, api_key)
    report = trio.run(run_api_bench, api, concurrencies, seconds, sandbox_id, config.default_template)
    report.show(json_dir)
