"""A sandbox's egress policy as plain data, parsed from E2B request bodies.

E2B semantics (SDK `SandboxNetworkOpts`): everything is allowed by default;
`allow_internet_access: false` behaves like `denyOut: ["0.0.0.0/0"]`; entries
in `allowOut` always beat entries in `denyOut`. Entries are CIDRs, bare IPs or
domain names (`pypi.org`, `*.example.com` — subdomains at any depth, not the
apex). Domains are enforced through the addresses our resolver hands out.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Per list (allowOut, denyOut). LPM tries would take more; the limit keeps one
# sandbox's policy updates well under a second and is stated in the API errors.
MAX_ENTRIES_PER_LIST = 8192

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


class PolicyError(ValueError):
    """A malformed network policy (the API answers 400 and keeps the old policy)."""


def _is_domain(entry: str) -> bool:
    name = entry[2:] if entry.startswith("*.") else entry
    if not name or len(name) > 253 or "." not in name.strip("."):
        return False
    return all(_LABEL.match(label) for label in name.rstrip(".").split("."))


@dataclass(frozen=True)
class CompiledList:
    networks: tuple[Network, ...]
    domains: tuple[str, ...]  # lower case, "*.x" for wildcards, no trailing dot

    def matches_domain(self, name: str) -> bool:
        name = name.lower().rstrip(".")
        for pattern in self.domains:
            if pattern.startswith("*."):
                if name.endswith(pattern[1:]):
                    return True
            elif name == pattern:
                return True
        return False


def _compile(field: str, entries: tuple[str, ...]) -> CompiledList:
    if len(entries) > MAX_ENTRIES_PER_LIST:
        raise PolicyError(f"{field}: {len(entries)} entries, at most {MAX_ENTRIES_PER_LIST} are allowed")
    networks: list[Network] = []
    domains: list[str] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise PolicyError(f"{field}: entry {entry!r} is not a CIDR, IP address or domain")
        text = entry.strip()
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
            continue
        except ValueError:
            pass
        if any(c in text for c in "/:") or text.replace(".", "").isdigit():
            raise PolicyError(f"{field}: {text!r} is not a valid CIDR or IP address")
        if not _is_domain(text.lower()):
            raise PolicyError(f"{field}: {text!r} is not a CIDR, IP address or domain")
        domains.append(text.lower().rstrip("."))
    return CompiledList(tuple(dict.fromkeys(networks)), tuple(dict.fromkeys(domains)))


@dataclass(frozen=True)
class NetworkPolicy:
    allow_internet_access: bool = True
    allow_out: tuple[str, ...] = ()  # CIDRs, IPs or domains
    deny_out: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.compiled()  # validate at construction: a policy that exists is a valid one

    def compiled(self) -> tuple[CompiledList, CompiledList]:
        """(allow, deny), parsed. Raises PolicyError."""
        if not isinstance(self.allow_internet_access, bool):
            raise PolicyError("allow_internet_access must be true or false")
        for name, value in (("allowOut", self.allow_out), ("denyOut", self.deny_out)):
            if not isinstance(value, tuple):
                raise PolicyError(f"{name} must be a list of strings")
        return _compile("allowOut", self.allow_out), _compile("denyOut", self.deny_out)

    @classmethod
    def from_e2b(cls, body: Mapping[str, object]) -> NetworkPolicy:
        """From a create body (`allow_internet_access` + `network: {...}`) or a PUT network body.

        The PUT body replaces the whole egress policy, as E2B's does.
        """
        if not isinstance(body, Mapping):
            raise PolicyError("network policy must be a JSON object")
        network = body.get("network", body)
        if network is None:
            network = {}
        if not isinstance(network, Mapping):
            raise PolicyError("network must be a JSON object")
        internet = body.get("allow_internet_access", body.get("allowInternetAccess", True))
        if internet is None:
            internet = True
        if not isinstance(internet, bool):
            raise PolicyError("allow_internet_access must be true or false")

        def entries(key: str) -> tuple[str, ...]:
            value = network.get(key)
            if value is None:
                return ()
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise PolicyError(f"{key} must be a list of strings")
            return tuple(value)

        return cls(
            allow_internet_access=internet,
            allow_out=entries("allowOut"),
            deny_out=entries("denyOut"),
        )

    def to_e2b(self) -> dict[str, object]:
        """The `network` object as `GET /sandboxes/{id}` reports it."""
        return {"allowOut": list(self.allow_out), "denyOut": list(self.deny_out)}
