"""The E2B network settings of a request, parsed once here, at the edge, into typed values.

Create (`allow_internet_access` + `network: {allowOut, denyOut, rules, allowPublicTraffic}`) over the
template's defaults, and `PUT /sandboxes/{id}/network` (`{allowOut, denyOut, rules,
allow_internet_access}`, which replaces the whole egress policy, as E2B's does). A rule naming a
secret the caller's team does not have is a 400 here, not a surprise at the destination. Everything
below the API (cubelet, CubeVS, runtimes) gets a `NetworkPolicy`, never the dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.api import validation as v
from appliance.api.errors import ApiError
from appliance.api.secrets import check_secret_references
from appliance.cubelet.cubelet import template_network_policy
from appliance.net.policy import NetworkPolicy, PolicyError
from appliance.records import TemplateManifest


@dataclass(frozen=True)
class SandboxNetwork:
    egress: NetworkPolicy
    # False: the sandbox's ports (all but envd's) need its traffic access token (proxy/router.py).
    allow_public_traffic: bool = True


def _policy(body: dict[str, Any]) -> NetworkPolicy:
    try:
        policy = NetworkPolicy.from_e2b(body)
    except PolicyError as exc:
        raise ApiError(400, f"invalid network policy: {exc}") from exc
    check_secret_references(policy.secret_names())
    return policy


def create_network(data: dict[str, Any], template: TemplateManifest) -> SandboxNetwork:
    """The create body's settings; what it leaves out comes from the template's defaults."""
    network = v.optional_object(data, "network")
    defaults = template_network_policy(template)
    internet = data.get("allow_internet_access")
    egress = _policy(
        {
            "allow_internet_access": defaults.allow_internet_access if internet is None else internet,
            "network": {
                "allowOut": network["allowOut"] if "allowOut" in network else list(defaults.allow_out),
                "denyOut": network["denyOut"] if "denyOut" in network else list(defaults.deny_out),
                "rules": network.get("rules"),
            },
        }
    )
    return SandboxNetwork(egress, v.optional_bool(network, "allowPublicTraffic", True))


def update_network(data: dict[str, Any]) -> NetworkPolicy:
    """`PUT /sandboxes/{id}/network`: the new egress policy, whole."""
    return _policy(data)
