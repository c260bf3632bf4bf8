"""Fixtures for the cluster's tests: real etcd members on loopback ports reserved here.

- `etcd`: `etcd(members=1) -> EtcdCluster`, that many members of one etcd cluster (Debian's
  etcd-server), each with its own data directory, started and healthy; at teardown every member
  is stopped (SIGTERM, then SIGKILL) and its directory removed.
- `etcd_of`: one member of its own; `two_nodes`: (node A, node B, a key of A's) in this process
  over it (`start_service`, FakeRuntime guests), both in each other's view.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from cluster_nodes import node_config, wait_for
from freeports import free_ports

from appliance.config import Config

if TYPE_CHECKING:
    from conftest import ServiceHarness

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
# Not the private services' range (20000-32000, tests/conftest.py), below the ephemeral one.
_ETCD_PORTS = range(32_000, 32_700)
START_TIMEOUT_S = 60.0


def reserve_ports(count: int) -> list[int]:
    return free_ports(count, _ETCD_PORTS)


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, initial_cluster: str) -> None:
        argv = [
            ETCD,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={initial_cluster}",
            "--initial-cluster-state=new",
            "--initial-cluster-token=cube-test",
            # Loopback on a loaded 2-core host: generous elections, no lost leader on a slow tick.
            "--heartbeat-interval=200",
            "--election-timeout=2000",
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signum)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self) -> str:
        try:
            return self.log_path.read_bytes()[-3000:].decode(errors="replace")
        except OSError:
            return ""


@dataclass
class EtcdCluster:
    root: Path
    members: list[EtcdMember] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self.members)
        while pending and time.monotonic() < deadline:
            member = pending[0]
            if member.process is not None and member.process.poll() is not None:
                raise RuntimeError(f"etcd {member.name} exited:\n{member.log_tail()}")
            try:
                answer = httpx.get(member.client_url + "/health", timeout=2, trust_env=False)
                if answer.status_code == 200 and answer.json().get("health") == "true":
                    pending.pop(0)
                    continue
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        if pending:
            raise RuntimeError(f"etcd {pending[0].name} not healthy in {timeout} s:\n{pending[0].log_tail()}")


@pytest.fixture
def etcd() -> Iterator[Callable[..., EtcdCluster]]:
    if not os.path.exists(ETCD):
        pytest.fail("etcd is not installed (Debian etcd-server; installer/install.sh installs it)")
    made: list[EtcdCluster] = []

    def start(members: int = 1) -> EtcdCluster:
        cluster = EtcdCluster(Path(tempfile.mkdtemp(prefix="cubeetcd-", dir="/tmp")))
        made.append(cluster)
        ports = reserve_ports(2 * members)
        for i in range(members):
            cluster.members.append(
                EtcdMember(
                    f"m{i}",
                    ports[2 * i],
                    ports[2 * i + 1],
                    cluster.root / f"m{i}",
                    cluster.root / f"m{i}.log",
                )
            )
        initial = ",".join(f"{m.name}={m.peer_url}" for m in cluster.members)
        for member in cluster.members:
            member.start(initial)
        cluster.wait_healthy()
        return cluster

    yield start
    for cluster in made:
        for member in cluster.members:
            member.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture
def etcd_of(etcd: Callable[..., EtcdCluster]) -> EtcdCluster:
    return etcd()


@pytest.fixture
def two_nodes(
    etcd_of: EtcdCluster, start_service: Any, service_config: Config, tmp_path: Path
) -> Iterator[tuple[ServiceHarness, ServiceHarness, str]]:
    cluster = etcd_of
    token_file = tmp_path / "cluster-token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    a = start_service(node_config(service_config, tmp_path, "a", cluster, token_file))
    b = start_service(node_config(service_config, tmp_path, "b", cluster, token_file))
    wait_for(a, lambda c: set(c.view.nodes) == {"a", "b"})
    key = httpx.post(f"{a.url}/cube/keys", json={"name": "t"}, headers={"X-API-KEY": a.admin_token}).json()[
        "key"
    ]
    yield a, b, key
