"""`cube bench cluster`: what the cluster adds to a create (docs/CLUSTER.md).

Against a running cluster (the config's `etcd_endpoints`), through one entry node (`--via`):
- create latency, `POST /sandboxes` → 201, p50/p95, split by where the sandbox landed: on the
  entry node itself ("local") or on another node, the create forwarded ("forwarded"); placement
  decides, so both appear when several nodes can take the template (drain nodes to force one);
- placement's own cost: `placement()` over the cluster's current view, in process;
- etcd requests per create, by gRPC method, from the etcd members' own counters (`/metrics`,
  `grpc_server_handled_total`) before and after the creates: membership ticks (Put,
  LeaseKeepAlive) run meanwhile, so read the create's own methods (Txn: the create-only record).
Sandboxes are created one after the other, held, then deleted (outside the timing).
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import click
import httpx
import trio

from appliance.bench.report import Report, percentiles
from appliance.cluster.etcd import EtcdClient, EtcdSecurity
from appliance.cluster.membership import ClusterView, SandboxOwner, read_view, sandbox_key
from appliance.cluster.node import ClusterConfigError, etcd_endpoints, etcd_security, placement
from appliance.config import Config

PLACEMENTS = 10_000
CREATE_TIMEOUT_S = 600.0
METHOD = re.compile(r'grpc_method="([^"]+)"')


async def etcd_requests(client: httpx.AsyncClient, endpoints: list[str]) -> Counter[str]:
    """Requests every etcd member has handled so far, by gRPC method (its JSON gateway's calls too)."""
    counts: Counter[str] = Counter()
    for endpoint in endpoints:
        try:
            text = (await client.get(f"{endpoint.rstrip('/')}/metrics")).text
        except httpx.HTTPError:
            continue  # a member down: its counts are not part of this run
        for line in text.splitlines():
            method = METHOD.search(line) if line.startswith("grpc_server_handled_total{") else None
            if method is not None:
                counts[method.group(1)] += int(float(line.rsplit(" ", 1)[1]))
    return counts


def placement_cost_us(view: ClusterView, here: str, template: str) -> float:
    started = time.perf_counter()
    for _ in range(PLACEMENTS):
        placement(view, here, template)
    return (time.perf_counter() - started) / PLACEMENTS * 1e6


async def run_cluster_bench(
    endpoints: list[str],
    via: str,
    api_key: str,
    template: str,
    creates: int,
    security: EtcdSecurity | None = None,
) -> Report:
    security = security or EtcdSecurity()
    report = Report("cluster")
    async with (
        EtcdClient(endpoints, security=security) as etcd,
        httpx.AsyncClient(trust_env=False, timeout=CREATE_TIMEOUT_S, verify=security.ssl_context()) as client,
    ):
        view = await read_view(etcd)
        entry = view.nodes.get(via)
        if entry is None:
            raise click.ClickException(f"no node {via} in the cluster (`cube node list`; --via NODE_ID)")
        headers = {"X-API-KEY": api_key}
        latencies: dict[str, list[float]] = {}
        created: list[tuple[str, float]] = []
        before = await etcd_requests(client, endpoints)
        try:
            for _ in range(creates):
                started = time.perf_counter()
                response = await client.post(
                    f"{entry.api_url}/sandboxes",
                    json={"templateID": template, "timeout": 600},
                    headers=headers,
                )
                took = time.perf_counter() - started
                if response.status_code != 201:
                    raise click.ClickException(
                        f"create through {via}: {response.status_code} {response.text}"
                    )
                created.append((response.json()["sandboxID"], took))
            after = await etcd_requests(client, endpoints)
            for sandbox_id, took in created:
                record = await etcd.get(sandbox_key(sandbox_id))
                owner = SandboxOwner.decode(record.value).node_id if record is not None else "?"
                latencies.setdefault("local" if owner == via else "forwarded", []).append(took)
        finally:
            for sandbox_id, _ in created:
                await client.delete(f"{entry.api_url}/sandboxes/{sandbox_id}", headers=headers)
    for path, samples in sorted(latencies.items()):
        stats = percentiles(samples)
        report.add(create=path, via=via, n=stats["n"], p50_ms=stats["p50_ms"], p95_ms=stats["p95_ms"])
        report.samples[f"create {path}"] = samples
    # Placement reads the in-memory view: microseconds, its mean over many calls.
    report.add(create="placement", via=via, n=PLACEMENTS, mean_us=placement_cost_us(view, via, template))
    delta = after - before
    per_create = ", ".join(f"{method} {count / creates:.2f}" for method, count in sorted(delta.items()))
    report.notes.append(f"etcd requests per create (all members, by method): {per_create or 'none seen'}")
    report.notes.append(
        f"{len(view.nodes)} nodes: {', '.join(sorted(view.nodes))}; drained: {sorted(view.drained)}"
    )
    return report


@click.command("cluster")
@click.option(
    "--via", default=None, help="The entry node's id (default: this node's node_id, or the host name)."
)
@click.option("--creates", default=10, show_default=True, help="Sandboxes created (one after the other).")
@click.option("--template", default=None, help="Template to create (default: the config's default_template).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--json-dir", type=click.Path(path_type=Path), default=None, help="Also write cluster.json here."
)
@click.option("--api-key", envvar="CUBE_API_KEY", required=True, help="A key the entry node knows.")
@click.pass_obj
def cluster_bench(
    config: Config,
    via: str | None,
    creates: int,
    template: str | None,
    as_json: bool,
    json_dir: Path | None,
    api_key: str,
) -> None:
    """Create p50/p95 through the entry node, local vs forwarded; placement cost; etcd requests per create."""
    endpoints = etcd_endpoints(config)
    if not endpoints:
        raise click.ClickException("not a cluster: the config names no etcd_endpoints")
    entry = via or config.node_id or socket.gethostname()
    try:
        security = etcd_security(config)
    except ClusterConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    template = template or config.default_template
    report = trio.run(run_cluster_bench, endpoints, entry, api_key, template, max(1, creates), security)
    if as_json:
        click.echo(json.dumps({k: v for k, v in asdict(report).items() if k != "samples"}, default=str))
    else:
        report.print_table()
    if json_dir is not None:
        click.echo(f"wrote {report.write_json(json_dir)}")
