"""How much one template build may take from the host, from the config file.

    build_context_max_size     = "2G"    an uploaded build context, extracted
    build_layer_max_size       = "8G"    one image layer as downloaded (compressed)
    build_unpacked_max_size    = "32G"   an image's layers decompressed, all together (and an ADD'ed archive)
    build_fetch_max_size       = "2G"    one `ADD <url>` download
    build_fetch_timeout_s      = 600     one `ADD <url>` download, start to end
    build_fetch_allow          = ""      networks `ADD <url>` may reach although they are not public
                                         ("127.0.0.1/32,10.1.0.0/16"; for tests and local mirrors)

Past a limit the build fails with a message naming the limit and what was refused; the build's
files go with it (the job's scratch directory is removed).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from appliance.config import Config
from appliance.templates.requests import parse_size_mb

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SizeLimitExceeded(ValueError):
    pass


def config_list(config: Config, key: str) -> tuple[str, ...]:
    """A list-valued config key: `"a,b"` (a TOML list arrives as its str(): `['a', 'b']`)."""
    raw = config.extra.get(key, "")
    return tuple(w for w in (p.strip().strip("'\"[] ") for p in raw.split(",")) if w)


def _size(config: Config, key: str, default: str) -> int:
    return parse_size_mb(config.extra.get(key, default)) << 20


@dataclass(frozen=True)
class BuildLimits:
    context_bytes: int = 2 << 30
    layer_bytes: int = 8 << 30
    unpacked_bytes: int = 32 << 30
    fetch_bytes: int = 2 << 30
    fetch_timeout_s: float = 600.0
    fetch_allow: tuple[IpNetwork, ...] = ()

    @classmethod
    def from_config(cls, config: Config) -> BuildLimits:
        return cls(
            context_bytes=_size(config, "build_context_max_size", "2G"),
            layer_bytes=_size(config, "build_layer_max_size", "8G"),
            unpacked_bytes=_size(config, "build_unpacked_max_size", "32G"),
            fetch_bytes=_size(config, "build_fetch_max_size", "2G"),
            fetch_timeout_s=float(config.extra.get("build_fetch_timeout_s", "600")),
            fetch_allow=tuple(
                ipaddress.ip_network(n, strict=False) for n in config_list(config, "build_fetch_allow")
            ),
        )


class SizeBudget:
    """Bytes something may still grow by; `spend` past the limit raises SizeLimitExceeded."""

    def __init__(self, limit: int, what: str, setting: str) -> None:
        self.limit = limit
        self.used = 0
        self.what = what
        self.setting = setting

    def spend(self, count: int) -> None:
        self.used += count
        if self.used > self.limit:
            raise SizeLimitExceeded(
                f"{self.what} is larger than {self.limit >> 20} MiB ({self.setting} in the config file)"
            )
