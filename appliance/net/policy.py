"""A sandbox's egress policy as plain data, parsed from E2B request bodies.

E2B semantics (SDK `SandboxNetworkOpts`): everything is allowed by default;
`allow_internet_access: false` behaves like `denyOut: ["0.0.0.0/0"]`; entries
in `allowOut` always beat entries in `denyOut`. Entries are CIDRs, bare IPs or
domain names (`pypi.org`, `*.example.com` — subdomains at any depth, not the
apex). Domains are enforced through the addresses our resolver hands out.

`rules` (E2B's `network.rules`): per host, headers the egress proxy (egress_proxy.py) sets on
the sandbox's plain-HTTP requests to it; their values may name a team secret as
`${e2b.secrets.NAME}`, resolved by the proxy per request. A rule allows nothing by itself.
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


# A secret's name as `/secrets` takes it (stored lower-cased), and the placeholder naming one.
SECRET_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
SECRET_PLACEHOLDER = re.compile(r"\$\{e2b\.secrets\.([^{}]*)\}")
_ANY_PLACEHOLDER = "${e2b."
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")
# Framing and routing are the proxy's: a rule setting these could split or re-aim a request.
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "trailer"}
)
MAX_RULE_HOSTS = 64
MAX_HEADERS_PER_HOST = 32
MAX_HEADER_VALUE_BYTES = 8192


@dataclass(frozen=True)
class EgressRule:
    """One rule of `network.rules[host]`: headers set on the sandbox's HTTP requests to `host`."""

    host: str  # a domain ("api.example.com", "*.example.com"), an IP or a CIDR; lower case
    headers: tuple[tuple[str, str], ...] = ()  # (name, value), values may hold secret placeholders

    def matches(self, host_name: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Does the rule cover a request naming `host_name` sent to `address`? (A domain rule's
        address check is the proxy's: the name must have resolved to it.)"""
        try:
            return address in ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            return CompiledList((), (self.host,)).matches_domain(host_name)

    def secret_names(self) -> set[str]:
        return {m.lower() for _n, value in self.headers for m in SECRET_PLACEHOLDER.findall(value)}


def _header_value(host: str, name: str, value: object) -> str:
    if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
        raise PolicyError(f"rules[{host!r}]: header {name!r} must be a string without CR, LF or NUL")
    if len(value.encode()) > MAX_HEADER_VALUE_BYTES:
        raise PolicyError(f"rules[{host!r}]: header {name!r} is longer than {MAX_HEADER_VALUE_BYTES} bytes")
    for secret in SECRET_PLACEHOLDER.findall(value):
        if not SECRET_NAME.match(secret):
            raise PolicyError(f"rules[{host!r}]: {secret!r} is not a secret name (1-128 of a-z A-Z 0-9 _ -)")
    if _ANY_PLACEHOLDER in SECRET_PLACEHOLDER.sub("", value):
        raise PolicyError(
            f"rules[{host!r}]: header {name!r}: only ${{e2b.secrets.NAME}} placeholders are supported "
            "(workload identity tokens are not)"
        )
    return value


def _rule(host: str, rule: object) -> EgressRule:
    if not isinstance(rule, Mapping):
        raise PolicyError(f"rules[{host!r}]: each rule must be a JSON object")
    transform = rule.get("transform") or {}
    if not isinstance(transform, Mapping):
        raise PolicyError(f"rules[{host!r}]: transform must be a JSON object")
    headers = transform.get("headers") or {}
    if not isinstance(headers, Mapping) or len(headers) > MAX_HEADERS_PER_HOST:
        raise PolicyError(f"rules[{host!r}]: headers must be an object of at most {MAX_HEADERS_PER_HOST}")
    checked = []
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name) or name.lower() in _RESERVED_HEADERS:
            raise PolicyError(f"rules[{host!r}]: {name!r} is not a header name a rule may set")
        checked.append((name, _header_value(host, name, value)))
    return EgressRule(host, tuple(checked))


def _rules(value: object) -> tuple[EgressRule, ...]:
    """`network.rules` (host → list of rules), in order, validated."""
    if value is None:
        return ()
    if not isinstance(value, Mapping) or len(value) > MAX_RULE_HOSTS:
        raise PolicyError(f"rules must be an object of at most {MAX_RULE_HOSTS} hosts")
    rules: list[EgressRule] = []
    for host, host_rules in value.items():
        if not isinstance(host, str) or not host.strip():
            raise PolicyError(f"rules: {host!r} is not a host")
        key = host.strip().lower().rstrip(".")
        _compile("rules", (key,))  # a domain, IP or CIDR, as allowOut takes them
        if not isinstance(host_rules, list):
            raise PolicyError(f"rules[{host!r}] must be a list of rules")
        rules.extend(_rule(key, rule) for rule in host_rules)
    return tuple(rules)


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
    rules: tuple[EgressRule, ...] = ()

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
            rules=_rules(network.get("rules")),
        )

    def to_e2b(self) -> dict[str, object]:
        """The `network` object as `GET /sandboxes/{id}` reports it (rules with their placeholders)."""
        rules: dict[str, list[dict[str, object]]] = {}
        for rule in self.rules:
            rules.setdefault(rule.host, []).append({"transform": {"headers": dict(rule.headers)}})
        return {"allowOut": list(self.allow_out), "denyOut": list(self.deny_out), "rules": rules}

    def secret_names(self) -> set[str]:
        """The secrets its rules name (lower case, as stored)."""
        return {name for rule in self.rules for name in rule.secret_names()}
