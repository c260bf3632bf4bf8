"""NetworkPolicy parsing: E2B bodies in, PolicyError (→ HTTP 400) for anything malformed."""

from __future__ import annotations

import ipaddress

import pytest

from appliance.net import MAX_ENTRIES_PER_LIST, NetworkPolicy, PolicyError


def test_defaults_allow_everything() -> None:
    policy = NetworkPolicy.from_e2b({})
    assert policy == NetworkPolicy(allow_internet_access=True, allow_out=(), deny_out=())


def test_create_body_shape() -> None:
    body = {
        "templateID": "x",
        "allow_internet_access": False,
        "network": {"allowOut": ["1.1.1.1", "pypi.org", "*.example.com"], "denyOut": ["8.8.8.0/24"]},
    }
    policy = NetworkPolicy.from_e2b(body)
    assert policy.allow_internet_access is False
    allow, deny = policy.compiled()
    assert allow.networks == (ipaddress.ip_network("1.1.1.1/32"),)
    assert allow.domains == ("pypi.org", "*.example.com")
    assert deny.networks == (ipaddress.ip_network("8.8.8.0/24"),)


def test_update_body_shape_and_ipv6() -> None:
    policy = NetworkPolicy.from_e2b({"allowOut": ["2001:db8::/32"], "allow_internet_access": True})
    assert policy.compiled()[0].networks == (ipaddress.ip_network("2001:db8::/32"),)


def test_null_network_means_defaults() -> None:
    assert NetworkPolicy.from_e2b({"network": None}) == NetworkPolicy()


def test_wildcards_match_subdomains_not_apex() -> None:
    allow, _ = NetworkPolicy(allow_out=("*.example.com", "pypi.org")).compiled()
    assert allow.matches_domain("a.b.example.com.")
    assert not allow.matches_domain("example.com")
    assert allow.matches_domain("PyPI.org")
    assert not allow.matches_domain("files.pypi.org")


@pytest.mark.parametrize(
    "body",
    [
        {"allowOut": ["10.0.0.0/33"]},
        {"denyOut": ["300.1.2.3"]},
        {"allowOut": ["not a host"]},
        {"allowOut": ["*"]},
        {"allowOut": "1.1.1.1"},
        {"allowOut": [1]},
        {"allow_internet_access": "no"},
        {"network": []},
        {"denyOut": ["fe80::/129"]},
    ],
)
def test_malformed_policies_are_rejected(body: dict[str, object]) -> None:
    with pytest.raises(PolicyError):
        NetworkPolicy.from_e2b(body)


def test_limit_per_list() -> None:
    at_limit = [f"10.{i // 256}.{i % 256}.0/24" for i in range(MAX_ENTRIES_PER_LIST)]
    NetworkPolicy.from_e2b({"allowOut": at_limit})
    with pytest.raises(PolicyError, match=str(MAX_ENTRIES_PER_LIST)):
        NetworkPolicy.from_e2b({"denyOut": [*at_limit, "1.1.1.1"]})
    assert MAX_ENTRIES_PER_LIST >= 8192


def test_policy_error_is_a_value_error() -> None:
    assert issubclass(PolicyError, ValueError)  # the cubelet maps ValueError to 400
