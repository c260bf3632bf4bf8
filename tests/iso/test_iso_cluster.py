"""The appliance ISO's first-boot cluster choice, in real boots (qemu TCG, opt-in CUBE_ISO_TEST=1).

Two emulated machines boot the ISO of this checkout (tests/emulated_host.py: its kernel and
root filesystem, a fresh CUBE-DATA disk each, a test-only control channel):
- A with `cube.cluster=new` on its kernel command line (what the boot menu's "start a new
  cluster" entry adds): cube-cluster.service renders and starts this node's etcd member
  (cube-etcd.service) before cube.service, which joins it; `cube node list` shows the node, and
  a sandbox created through A's API (UML inside the emulated machine) runs a command and is
  recorded in the cluster;
- B with fw_cfg `opt/cube/cluster` (`mode=join`, `etcd=http://<A>:2379`) and A's token in fw_cfg
  `opt/cube/cluster-token`: it joins, `cube node list` on A shows both, each at its own address,
  and B's API lists A's sandbox (a call from B to A's cluster listener, TLS on cluster_port 3444)
  with the key A made; each node advertises its listener (`cluster_url` in `cube node list`) at
  its own address, the calls each way cross as TLS (the relay sees a TLS handshake, never plain
  HTTP), the cluster token is refused on A's public API port, and it is on neither console.

The machines' network: qemu user-mode networks (`restrict=on`: nothing leaves them) on one /23,
A at 10.0.2.15 and B at 10.0.3.15 (their DHCP addresses, so the appliance finds them as on a
LAN). Each reaches the other's API, etcd and cluster listener through `guestfwd`
(tests/iso/guestfwd_relay.py) to the loopback port this machine forwards to the other's: no
packet goes anywhere but loopback.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from emulated_host import EmulatedHost, emulated_host
from freeports import free_ports
from test_iso_boot import ANY_KEY_RE, BOOT_TIMEOUT_S, DEFAULT_KEY, SANDBOX_TIMEOUT_S, SEED_CONFIG

from appliance.cluster.forwarding import TOKEN_HEADER

pytestmark = [
    pytest.mark.slow,
    # Opt-in with the other ISO tests: two TCG boots and a sandbox take ~10-15 min on an idle host.
    pytest.mark.skipif(os.environ.get("CUBE_ISO_TEST") != "1", reason="opt-in: CUBE_ISO_TEST=1"),
    pytest.mark.skipif(os.geteuid() != 0, reason="qemu's ISO cache and build need root"),
]

RELAY = Path(__file__).with_name("guestfwd_relay.py")
UML_CPU = "qemu64,+rdrand,-svm"  # no SVM: the appliance picks uml (a sandbox boots faster under TCG)
NEW_ADDRESS = "10.0.2.15"  # A's DHCP address on its user network (net 10.0.2.0/23)
JOIN_ADDRESS = "10.0.3.15"  # B's, on its own user network with the same /23
NODE_NAME_RE = re.compile(r"cube-[0-9a-f]{6}")
CLUSTER_PORT = 3444  # cluster_port's default, which `cube node setup` writes on the ISO


def network(
    dhcp: str,
    forwards: dict[tuple[str, int], int],
    hostfwds: dict[int, int],
    sniffed: dict[tuple[str, int], Path] | None = None,
) -> str:
    """User-network options: this machine's DHCP address in the shared /23, its own ports forwarded
    from loopback (`hostfwds`: guest port -> loopback port), and for each (address, port) of the
    other machine a guestfwd to the loopback port it is forwarded to (the relay logging the first
    bytes of each connection to `sniffed[(address, port)]` if given)."""
    options = f",net=10.0.2.0/23,dhcpstart={dhcp}"
    for guest_port, loopback in hostfwds.items():
        options += f",hostfwd=tcp:127.0.0.1:{loopback}-:{guest_port}"
    for (address, port), loopback in forwards.items():
        log = (sniffed or {}).get((address, port))
        relay = f"{sys.executable} {RELAY} {loopback}" + (f" {log}" if log else "")
        options += f",guestfwd=tcp:{address}:{port}-cmd:{relay}"
    return options


def handshakes(log: Path) -> list[str]:
    """The first bytes of each connection the relay logged to `log` (hex)."""
    return log.read_text().splitlines() if log.exists() else []


def assert_listed_over_tls(host: EmulatedHost, key: str, log: Path, expected: list[str]) -> None:
    """`host`'s API lists the `expected` sandboxes, asking the other node on its cluster listener:
    through the relay `log` watches, as TLS (a handshake record, `16 03`), never plain HTTP."""
    before = len(handshakes(log))
    listed = httpx.get(f"{host.url}/sandboxes", headers={"X-API-KEY": key}, timeout=120, trust_env=False)
    assert listed.status_code == 200, listed.text
    assert [s["sandboxID"] for s in listed.json()] == expected, listed.json()
    crossed = handshakes(log)[before:]
    assert crossed and all(first.startswith("16 03") for first in crossed), crossed


def nodes(host: EmulatedHost) -> dict[str, dict[str, Any]]:
    listed = json.loads(host.run("cube node list --json", timeout=300).check().stdout)
    return {row["node_id"]: row for row in listed}


def default_key(host: EmulatedHost) -> str:
    wait = f"for i in $(seq {BOOT_TIMEOUT_S}); do test -s {DEFAULT_KEY} && break; sleep 1; done"
    key = host.run(f"{wait}; cat {DEFAULT_KEY}", timeout=BOOT_TIMEOUT_S).check().stdout.strip()
    assert ANY_KEY_RE.fullmatch(key), key
    return key


def assert_new_cluster_node(a: EmulatedHost) -> str:
    """A hosts the cluster's etcd member and is its one node; returns its name."""
    assert a.run("systemctl is-active cube-etcd.service").stdout.strip() == "active"
    assert a.run("systemctl is-active cube-cluster.service").stdout.strip() == "active"
    assert "mode=new" in a.run("cat /var/lib/cube/cluster-mode").check().stdout
    health = a.run("curl -sf http://127.0.0.1:2379/health").check().stdout
    assert json.loads(health)["health"] == "true", health
    listed = nodes(a)
    assert len(listed) == 1, listed
    ((name, row),) = listed.items()
    assert NODE_NAME_RE.fullmatch(name) and row["api_url"] == f"http://{NEW_ADDRESS}:3000", row
    assert row["cluster_url"] == f"https://{NEW_ADDRESS}:{CLUSTER_PORT}", row
    return name


def run_a_sandbox(a: EmulatedHost, key: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A sandbox created through A's API runs a command; returns its id (it keeps running)."""
    from e2b import Sandbox

    monkeypatch.setenv("E2B_API_URL", a.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", a.url)
    monkeypatch.setenv("E2B_API_KEY", key)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    started = time.monotonic()
    sandbox = Sandbox.create(
        template="code-interpreter", timeout=SANDBOX_TIMEOUT_S, request_timeout=SANDBOX_TIMEOUT_S
    )
    print(f"sandbox create on the new cluster's node: {time.monotonic() - started:.0f} s")
    result = sandbox.commands.run(
        "echo $((6 * 7))", timeout=SANDBOX_TIMEOUT_S, request_timeout=SANDBOX_TIMEOUT_S
    )
    assert result.exit_code == 0 and result.stdout == "42\n", result
    return sandbox.sandbox_id


def test_iso_first_boot_new_cluster_then_join(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_api, a_etcd, a_cluster, b_api, b_cluster = free_ports(5)
    a_to_b, b_to_a = tmp_path / "a-to-b-cluster", tmp_path / "b-to-a-cluster"
    started = time.monotonic()
    new_cluster: dict[str, Any] = {
        "cmdline": ("cube.cluster=new",),
        "nic_options": network(
            NEW_ADDRESS,
            {(JOIN_ADDRESS, 3000): b_api, (JOIN_ADDRESS, CLUSTER_PORT): b_cluster},
            {2379: a_etcd, CLUSTER_PORT: a_cluster},
            {(JOIN_ADDRESS, CLUSTER_PORT): a_to_b},
        ),
    }
    with emulated_host(cpu=UML_CPU, seed_config=SEED_CONFIG, port=a_api, **new_cluster) as a:
        print(f"A (new cluster) up in {time.monotonic() - started:.0f} s")
        a_name = assert_new_cluster_node(a)
        key = default_key(a)
        sandbox_id = run_a_sandbox(a, key, monkeypatch)
        assert nodes(a)[a_name]["sandboxes"] == 1

        cluster_token = a.run("cat /var/lib/cube/cluster-token").check().stdout
        token = tmp_path / "cluster-token"
        token.write_text(cluster_token)
        # The token is the nodes' own: A's public API port refuses it (only its listener takes it).
        refused = httpx.get(
            f"{a.url}/sandboxes", headers={TOKEN_HEADER: cluster_token.strip()}, timeout=120, trust_env=False
        )
        assert refused.status_code == 401, refused.text
        seed = tmp_path / "cluster"
        seed.write_text(f"mode=join\netcd=http://{NEW_ADDRESS}:2379\n")
        joining: dict[str, Any] = {
            "fw_cfg": {"cluster": seed, "cluster-token": token},
            "nic_options": network(
                JOIN_ADDRESS,
                {(NEW_ADDRESS, 2379): a_etcd, (NEW_ADDRESS, 3000): a_api}
                | {(NEW_ADDRESS, CLUSTER_PORT): a_cluster},
                {CLUSTER_PORT: b_cluster},
                {(NEW_ADDRESS, CLUSTER_PORT): b_to_a},
            ),
            "memory_mb": 3072,  # runs no sandbox here
        }
        joined_at = time.monotonic()
        with emulated_host(cpu=UML_CPU, seed_config=SEED_CONFIG, port=b_api, **joining) as b:
            print(f"B (join) up in {time.monotonic() - joined_at:.0f} s")
            assert b.run("systemctl is-active cube-etcd.service").stdout.strip() != "active"
            listed = nodes(a)
            assert a_name in listed and len(listed) == 2, listed
            (b_name,) = set(listed) - {a_name}
            assert NODE_NAME_RE.fullmatch(b_name), b_name
            assert listed[b_name]["api_url"] == f"http://{JOIN_ADDRESS}:3000", listed
            assert listed[b_name]["cluster_url"] == f"https://{JOIN_ADDRESS}:{CLUSTER_PORT}", listed
            assert nodes(b).keys() == listed.keys()
            # B answers for A's sandbox, with the key A made (keys live in the cluster's etcd),
            # asking A's cluster listener over TLS; A asks B's the same way (B has none).
            assert_listed_over_tls(b, key, b_to_a, [sandbox_id])
            assert_listed_over_tls(a, key, a_to_b, [sandbox_id])
            for host in (a, b):  # never on either console
                assert cluster_token.strip() not in host.tail(10_000)
            print(f"test wall time: {time.monotonic() - started:.0f} s")
