"""Service-level behaviour: doctor checks, and what happens when eBPF cannot be loaded."""

from __future__ import annotations

import dataclasses

import pytest
from networld import INTERNET_IP, METADATA_IP, TAP_OWNER_UID, World, connects, serving, veth_guest

from appliance.config import Config
from appliance.net import CubeVS, NetworkPolicy, NetworkUnenforced, doctor_checks, service


def test_doctor_checks_pass_here() -> None:
    checks = doctor_checks()
    assert {name for name, _ok, _detail in checks} == {
        "kernel headers",
        "bcc",
        "bpf fs",
        "tc",
        "nft",
        "netns",
    }
    assert all(ok for _name, ok, _detail in checks), checks


@pytest.fixture
def no_ebpf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        service, "_load_program", lambda addressing, blocked, keep: (None, "bcc: simulated failure", {})
    )


async def test_unenforced_networks_are_refused_by_default(
    no_ebpf: None, net_config: Config, dns_upstream: str
) -> None:
    async with CubeVS.start(net_config, dns_upstreams=[dns_upstream]) as vs:
        assert not vs.enforced
        with pytest.raises(NetworkUnenforced, match="simulated failure"):
            async with vs.sandbox_network("cubetest-net-unenf", 3, TAP_OWNER_UID, NetworkPolicy()):
                pass


async def test_operator_may_opt_out_of_enforcement(
    no_ebpf: None, world: World, net_config: Config, dns_upstream: str
) -> None:
    config = dataclasses.replace(net_config, allow_unenforced_network=True)
    async with CubeVS.start(config, dns_upstreams=[dns_upstream]) as vs:
        async with vs.sandbox_network("cubetest-net-optout", 3, TAP_OWNER_UID, NetworkPolicy()) as net:
            async with veth_guest(net, "optout") as guest, serving(world.hosts["inet"].path) as inet:
                assert await connects(guest.netns_path, INTERNET_IP)
                assert await inet.got_tcp()
                # Nothing enforces: even the metadata host is reachable (the operator chose this).
                async with serving(world.hosts["meta"].path) as meta:
                    assert await connects(guest.netns_path, METADATA_IP)
                    assert await meta.got_tcp()
            assert vs.counters(net.sandbox_id)["allowed_packets"] == 0
            await vs.update_policy(net.sandbox_id, NetworkPolicy(allow_internet_access=False))
