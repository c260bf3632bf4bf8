"""What tests that boot real UML guests share (tests/uml, tests/virtio, tests/net).

- `default_template()`: the built default template of this host's config, the one the
  installer built (built here, minutes, cached by recipe hash, only when missing); the
  calling test is skipped with the reason when not root or when it cannot be built.
- `private_config(prefix, host_network, uid_base, ...)`: a Config whose state and run
  directories are a fresh short temporary directory (unix socket paths such as the
  mconsole's must fit in 107 bytes; pytest's tmp_path is too deep), with the host's
  cache directory (the built UML kernel) and a test-only sandbox network and uid range,
  so nothing collides with a running `cube serve`; removed afterwards.
- `uml_service(start_service, monkeypatch)`: a `cube serve` of the test's own (start_service's, in
  a thread) over a `private_config`: uml runtime, no warm pool, the default template linked in
  read-only, guest DNS going nowhere (nothing a guest looks up leaves the host); the E2B SDK's
  URL variables point at it. `.start()` again after `.harness.stop()` is a restart.
- `claim(instance)`: `/init` with the guest's boot token, as the cubelet claims a pooled
  guest, and no access token: its agent is then open to the raw calls below (an unclaimed
  agent answers nothing but /health without its boot token).
- `execute_code(host, code)`: Python in a guest's default kernel, as the E2B SDKs run it,
  over raw HTTP: the code interpreter's `POST /execute` (its NDJSON events). Commands go
  through envd with `appliance.cubelet.envd_client.run_command`.
- `routed_world(name, addresses, table, link_net, ...)`: a network namespace of the test's
  holding servers' addresses (IPv4, optionally IPv6), reached from the `uml_service` sandbox
  network only (tests/secrets, tests/browser).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from appliance.config import Config, load_config
from appliance.cubelet.runtimes import RuntimeBundle
from appliance.net.addressing import Addressing
from appliance.records import TemplateManifest
from appliance.runtime.base import CODE_INTERPRETER_PORT, ENVD_PORT, Instance


def default_template() -> TemplateManifest:
    if os.geteuid() != 0:
        pytest.skip("real UML guests need root (namespaces, cgroups, taps)")
    from appliance.templates.default import build_default_template

    try:
        return trio.run(build_default_template, load_config())
    except (OSError, RuntimeError) as exc:
        pytest.skip(f"the default template is not built and cannot be built here: {exc}")


@contextmanager
def private_config(
    prefix: str, host_network: str, uid_base: int, *, allow_unenforced_network: bool = True, **settings: Any
) -> Iterator[Config]:
    """`settings`: more Config fields (ports, runtime, pool size...)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield Config(
            state_dir=work / "state",
            run_dir=work / "run",
            cache_dir=load_config().cache_dir,
            host_network=host_network,
            uid_base=uid_base,
            allow_unenforced_network=allow_unenforced_network,
            **settings,
        )
    finally:
        shutil.rmtree(work)


# `uml_service`'s sandbox network and uid range: apart from tests/uml, tests/net, tests/kvm,
# tests/templates and conftest's private_service. Its users run one after another (the shared lock).
SERVICE_NETWORK = "10.217.0.0/24"
SERVICE_UID_BASE = 420_000
DEAD_DNS_UPSTREAM = "127.0.0.1:9"  # nothing listens: guest lookups fail fast, nothing leaves


@asynccontextmanager
async def uml_runtime(config: Config) -> AsyncIterator[RuntimeBundle]:
    """What `run_service` takes as runtime factory: the uml runtime on CubeVS, DNS to nowhere."""
    from appliance.cubelet.runtimes import CubeVSPolicies
    from appliance.net.service import CubeVS
    from appliance.runtime.uml.runtime import UmlRuntime

    async with CubeVS.start(config, dns_upstreams=[DEAD_DNS_UPSTREAM]) as cubevs:
        yield RuntimeBundle(UmlRuntime(config, cubevs), CubeVSPolicies(cubevs))


@dataclass
class UmlService:
    config: Config
    start_service: Callable[..., Any]  # tests/conftest.py's fixture
    monkeypatch: pytest.MonkeyPatch
    harness: Any = None  # the running ServiceHarness
    runtime_factory: Any = None  # what run_service takes; None: `uml_runtime`

    @property
    def url(self) -> str:
        return str(self.harness.url)

    def start(self) -> Any:
        self.harness = self.start_service(self.config, runtime_factory=self.runtime_factory or uml_runtime)
        for name in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_VOLUME_API_URL"):
            self.monkeypatch.setenv(name, self.url)
        return self.harness

    def key(self, name: str) -> str:
        """A new API key (a team of its own) made through the admin API."""
        response = httpx.post(
            f"{self.url}/cube/keys", json={"name": name}, headers={"X-API-KEY": self.harness.admin_token}
        )
        assert response.status_code == 201, response.text
        return str(response.json()["key"])


@contextmanager
def uml_service(
    start_service: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    template: TemplateManifest | None = None,
    memory_budget_mb: int = 4096,
    runtime_factory: Any = None,
    **settings: Any,
) -> Iterator[UmlService]:
    """A started UmlService serving `template` (default: `default_template()`), stopped at the end;
    `settings`: more Config fields (e.g. volume_max_mb); `runtime_factory`: instead of `uml_runtime`
    (e.g. CubeVS with a test DNS upstream)."""
    template = template or default_template()
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    settings = {"api_port": 0, "tls_port": 0, "runtime": "uml", "pool_size": 0, **settings}
    with private_config(
        "cubetest-svc-", SERVICE_NETWORK, SERVICE_UID_BASE, memory_budget_mb=memory_budget_mb, **settings
    ) as config:
        config.templates_dir.mkdir(parents=True)
        (config.templates_dir / template.template_id).symlink_to(template.directory)
        service = UmlService(config, start_service, monkeypatch, runtime_factory=runtime_factory)
        try:
            service.start()
            yield service
        finally:
            if service.harness is not None:
                service.harness.stop()  # before its directories go (start_service's stop is then a no-op)


async def claim(instance: Instance, body: dict[str, object] | None = None) -> None:
    host, port = instance.endpoint(ENVD_PORT)
    headers = {"X-Access-Token": instance.agent_token}
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        response = await client.post(f"http://{host}:{port}/init", json=body or {}, headers=headers)
    assert response.status_code == 204, response.text


async def execute_code(host: str, code: str, timeout: float = 60.0) -> list[dict[str, object]]:
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        response = await client.post(f"http://{host}:{CODE_INTERPRETER_PORT}/execute", json={"code": code})
    response.raise_for_status()
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


@contextmanager
def routed_world(
    name: str,
    addresses: tuple[str, ...],
    table: int,
    link_net: str,
    addresses6: tuple[str, ...] = (),
    link_net6: str = "",
) -> Iterator[str]:
    """A network namespace `name` holding `addresses` (on its loopback), reached from the
    `uml_service` sandbox network only, through the policy-routing table `table` that knows nothing
    else; `link_net`: the first address of a free /30 for the veth between host and world (host
    +1, world +2). With `addresses6`, the same over IPv6 from the network's IPv6 range, `link_net6`
    the first address of a free /126. Yields the namespace's name; everything is removed
    afterwards. Run its users under the shared lock (the tables and the rules are the host's)."""
    host_side, world_side = (ipaddress.ip_address(link_net) + n for n in (1, 2))
    link, network = f"ct{name[-10:]}", SERVICE_NETWORK
    commands = [
        f"ip netns add {name}",
        f"ip link add {link} type veth peer name w0 netns {name}",
        f"ip addr add {host_side}/30 dev {link}",
        f"ip link set {link} up",
        f"ip -n {name} link set lo up",
        *(f"ip -n {name} addr add {address}/32 dev lo" for address in addresses),
        f"ip -n {name} addr add {world_side}/30 dev w0",
        f"ip -n {name} link set w0 up",
        f"ip -n {name} route add default via {host_side}",
        *(f"ip route add {address}/32 via {world_side} table {table}" for address in addresses),
        f"ip route add throw {network} table {table}",
        f"ip route add unreachable default table {table}",
        f"ip rule add from {network} lookup {table} priority {table}",
    ]
    network6 = Addressing(network).network6
    if addresses6:
        host6, world6 = (ipaddress.ip_address(link_net6) + n for n in (1, 2))
        commands += [
            f"ip addr add {host6}/126 dev {link} nodad",
            *(f"ip -n {name} addr add {address}/128 dev lo" for address in addresses6),
            f"ip -n {name} addr add {world6}/126 dev w0 nodad",
            f"ip -n {name} -6 route add default via {host6}",
            *(f"ip -6 route add {address}/128 via {world6} table {table}" for address in addresses6),
            f"ip -6 route add throw {network6} table {table}",
            f"ip -6 route add unreachable default table {table}",
            f"ip -6 rule add from {network6} lookup {table} priority {table}",
        ]
    try:
        for command in commands:
            subprocess.run(command.split(), check=True, capture_output=True, text=True)
        yield name
    finally:
        rule6 = f"from {network6} lookup {table} priority {table}"
        undo6 = [f"ip -6 rule del {rule6}", f"ip -6 route flush table {table}"]
        for command in (
            f"ip rule del from {network} lookup {table} priority {table}",
            f"ip route flush table {table}",
            *(undo6 if addresses6 else ()),
            f"ip link del {link}",
            f"ip netns del {name}",
        ):
            subprocess.run(command.split(), check=False, capture_output=True)
