"""The egress proxy's decisions without a guest: which request heads it takes, which rules cover a
request (E2B's precedence; a domain's only at an address resolved for it), and the head it forwards
(the secret set, the guest's own placeholders left alone, a deleted secret stopping the request)."""

from __future__ import annotations

import ipaddress

import pytest

from appliance.net.egress_proxy import (
    BadRequest,
    IPAddress,
    SandboxEgress,
    covering_rules,
    parse_head,
    transform,
)
from appliance.net.policy import NetworkPolicy

SERVER = ipaddress.ip_address("203.0.113.10")
OTHER = ipaddress.ip_address("203.0.113.11")


def egress(
    rules: dict[str, object], secrets: dict[str, str], resolved: dict[str, set[IPAddress]]
) -> SandboxEgress:
    policy = NetworkPolicy.from_e2b({"network": {"rules": rules}})
    return SandboxEgress(
        sandbox_id="sbx",
        netns_path="/nonexistent",
        gateway_ip="169.254.0.1",
        policy=lambda: policy,
        answered=lambda name: frozenset(resolved.get(name, set())),
        secret_values=lambda: lambda _sandbox, name: secrets.get(name),
    )


def rule(**headers: str) -> list[dict[str, object]]:
    return [{"transform": {"headers": headers}}]


def test_heads_are_parsed_strictly() -> None:
    head = parse_head(b"GET /x HTTP/1.1\r\nHost: API.Example.test:80\r\nAccept: */*")
    assert head.host == "api.example.test" and head.headers[1] == ("Accept", "*/*")
    assert parse_head(b"GET http://a.test/x HTTP/1.1\r\nHost: b.test").host == "a.test"  # absolute form wins
    for bad in (
        b"GET /x\r\nHost: a.test",
        b"GET /x HTTP/2\r\nHost: a.test",
        b"GET /x HTTP/1.1\r\nHost: a.test\r\nHost: b.test",
        b"GET /x HTTP/1.1\r\nHost: a.test\r\n folded: line",
        b"GET /x HTTP/1.1\r\nAuthorization : x",
        b"GET /x HTTP/1.1\r\nno colon",
    ):
        with pytest.raises(BadRequest):
            parse_head(bad)


def test_a_domain_rule_covers_only_addresses_resolved_for_that_name() -> None:
    e = egress({"api.test": rule(A="1")}, {}, {"api.test": {SERVER}})
    head = parse_head(b"GET / HTTP/1.1\r\nHost: api.test")
    assert [r.host for r in covering_rules(e, head, SERVER)] == ["api.test"]
    assert covering_rules(e, head, OTHER) == []  # the name, sent somewhere it did not resolve to
    assert covering_rules(e, parse_head(b"GET / HTTP/1.1\r\nHost: other.test"), SERVER) == []


def test_precedence_exact_then_longest_wildcard_then_network_not_merged() -> None:
    rules = {
        "203.0.113.0/24": rule(Net="1"),
        "*.ex.test": rule(Short="1"),
        "*.api.ex.test": rule(Long="1"),
        "v1.api.ex.test": rule(Exact="1"),
    }
    resolved = {name: {SERVER} for name in ("v1.api.ex.test", "v2.api.ex.test", "x.ex.test", "other.example")}
    e = egress(rules, {}, resolved)

    def covering(host: str) -> list[str]:
        return [
            r.host for r in covering_rules(e, parse_head(f"GET / HTTP/1.1\r\nHost: {host}".encode()), SERVER)
        ]

    assert covering("v1.api.ex.test") == ["v1.api.ex.test"]
    assert covering("v2.api.ex.test") == ["*.api.ex.test"]
    assert covering("x.ex.test") == ["*.ex.test"]
    assert covering("other.example") == ["203.0.113.0/24"]


def test_the_forwarded_head_carries_the_secret_and_nothing_else_changes() -> None:
    secrets = {"key": "s3cret"}
    e = egress({"api.test": rule(Authorization="Bearer ${e2b.secrets.KEY}")}, secrets, {"api.test": {SERVER}})
    head = parse_head(
        b"POST /v1 HTTP/1.1\r\nHost: api.test\r\nauthorization: mine\r\nX-Own: ${e2b.secrets.key}\r\n"
        b"Connection: keep-alive\r\nContent-Length: 2"
    )
    forwarded = transform(e, head, SERVER)
    assert forwarded == (
        b"POST /v1 HTTP/1.1\r\nHost: api.test\r\nX-Own: ${e2b.secrets.key}\r\nContent-Length: 2\r\n"
        b"Authorization: Bearer s3cret\r\nConnection: close\r\n\r\n"
    )
    assert transform(e, head, OTHER) == (  # untouched
        b"POST /v1 HTTP/1.1\r\nHost: api.test\r\nauthorization: mine\r\nX-Own: ${e2b.secrets.key}\r\n"
        b"Connection: keep-alive\r\nContent-Length: 2\r\n\r\n"
    )
    secrets.clear()
    assert transform(e, head, SERVER) is None  # a deleted secret: the request is not sent
