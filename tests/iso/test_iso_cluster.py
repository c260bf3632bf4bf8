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
  and B's API lists A's sandbox (a call from B to A) with the key A made.

The machines' network: qemu user-mode networks (`restrict=on`: nothing leaves them) on one /23,
A at 10.0.2.15 and B at 10.0.3.15 (their DHCP addresses, so the appliance finds them as on a
LAN). Each reaches the other's ports through `guestfwd` (tests/iso/guestfwd_relay.py) to the
loopback port this machine forwards to the other's: no packet goes anywhere but loopback.
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
from freeports import free_port
from test_iso_boot import ANY_KEY_RE, BOOT_TIMEOUT_S, DEFAULT_KEY, SANDBOX_TIMEOUT_S, SEED_CONFIG

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


def network(dhcp: str, forwards: dict[tuple[str, int], int], etcd_forward: int | None = None) -> str:
    """User-network options: this machine's DHCP address in the shared /23, and for each
    (address, port) of the other machine a guestfwd to the loopback port it is forwarded to."""
    options = f",net=10.0.2.0/23,dhcpstart={dhcp}"
    if etcd_forward is not None:
        options += f",hostfwd=tcp:127.0.0.1:{etcd_forward}-:2379"
    for (address, port), loopback in forwards.items():
        options += f",guestfwd=tcp:{address}:{port}-cmd:{sys.executable} {RELAY} {loopback}"
    return options


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
    a_api, a_etcd, b_api = free_port(), free_port(), free_port()
    started = time.monotonic()
    new_cluster: dict[str, Any] = {
        "cmdline": ("cube.cluster=new",),
        "nic_options": network(NEW_ADDRESS, {(JOIN_ADDRESS, 3000): b_api}, etcd_forward=a_etcd),
    }
    with emulated_host(cpu=UML_CPU, seed_config=SEED_CONFIG, port=a_api, **new_cluster) as a:
        print(f"A (new cluster) up in {time.monotonic() - started:.0f} s")
        a_name = assert_new_cluster_node(a)
        key = default_key(a)
        sandbox_id = run_a_sandbox(a, key, monkeypatch)
        assert nodes(a)[a_name]["sandboxes"] == 1

        token = tmp_path / "cluster-token"
        token.write_text(a.run("cat /var/lib/cube/cluster-token").check().stdout)
        seed = tmp_path / "cluster"
        seed.write_text(f"mode=join\netcd=http://{NEW_ADDRESS}:2379\n")
        joining: dict[str, Any] = {
            "fw_cfg": {"cluster": seed, "cluster-token": token},
            "nic_options": network(JOIN_ADDRESS, {(NEW_ADDRESS, 2379): a_etcd, (NEW_ADDRESS, 3000): a_api}),
            "memory_mb": 3072,  # runs no sandbox here
        }
        joined_at = time.monotonic()
        with emulated_host(cpu=UML_CPU, seed_config=SEED_CONFIG, port=b_api, **joining) as b:
            print(f"B (join) up in {time.monotonic() - joined_at:.0f} s")
            assert b.run("systemctl is-active cube-etcd.service").stdout.strip() != "active"
            assert token.read_text().strip() not in b.tail(10_000)  # never on the console
            listed = nodes(a)
            assert a_name in listed and len(listed) == 2, listed
            (b_name,) = set(listed) - {a_name}
            assert NODE_NAME_RE.fullmatch(b_name), b_name
            assert listed[b_name]["api_url"] == f"http://{JOIN_ADDRESS}:3000", listed
            assert nodes(b).keys() == listed.keys()
            # B answers for A's sandbox, with the key A made (keys live in the cluster's etcd).
            on_b = httpx.get(f"{b.url}/sandboxes", headers={"X-API-KEY": key}, timeout=120, trust_env=False)
            assert on_b.status_code == 200, on_b.text
            assert [s["sandboxID"] for s in on_b.json()] == [sandbox_id], on_b.json()
            print(f"test wall time: {time.monotonic() - started:.0f} s")
