"""What a build is asked to do, validated from the API's JSON (the CLI flags map 1:1)."""

from __future__ import annotations

import ipaddress
import math
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from appliance.config import Config
from appliance.runtime.base import ENVD_PORT
from appliance.templates.catalog import validate_name
from appliance.templates.registry_auth import Credentials

_SIZE_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MIN_WRITABLE_MB = 16
MIN_MEMORY_MB = 64
MAX_PROBE_TIMEOUT_S = 3600.0
MAX_PROBE_PERIOD_S = 60.0
# user:password@ and query strings of URLs (presigned URLs carry their signature there).
_URL_SECRETS = re.compile(
    r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s@]*@)?(?P<rest>[^\s?#]*)(?P<query>\?[^\s#]*)?"
)


def parse_size_mb(text: str | int) -> int:
    """`1G`, `512M`, `512Mi`, `2048` (MiB) -> MiB."""
    if isinstance(text, int):
        return text
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1] if value and value[-1] in "kmgt" else ""
    number = value[: len(value) - len(unit)]
    try:
        size = float(number) * _SIZE_UNITS[unit]
    except ValueError as exc:
        raise ValueError(f"invalid size {text!r} (use e.g. 512M or 1G)") from exc
    if not math.isfinite(size):
        raise ValueError(f"invalid size {text!r} (use e.g. 512M or 1G)")
    return int(size) >> 20


def _port(value: Any) -> int:
    port = int(value)
    if not 0 < port < 65536:
        raise ValueError(f"invalid port {value!r}")
    return port


def _cidrs(values: Any) -> list[str]:
    return [str(ipaddress.ip_network(str(v), strict=False)) for v in (values or [])]


@dataclass(frozen=True)
class TemplateLimits:
    """The most one template may ask for (a request beyond is refused with 400), from the config file:
    `template_max_cpu = 16`, `template_max_memory = "32G"`, `template_max_writable_layer_size = "64G"`."""

    cpu_count: int = 16
    memory_mb: int = 32 << 10
    writable_layer_mb: int = 64 << 10

    @classmethod
    def from_config(cls, config: Config) -> TemplateLimits:
        extra = config.extra
        return cls(
            cpu_count=int(extra.get("template_max_cpu", cls.cpu_count)),
            memory_mb=parse_size_mb(extra.get("template_max_memory", f"{cls.memory_mb}M")),
            writable_layer_mb=parse_size_mb(
                extra.get("template_max_writable_layer_size", f"{cls.writable_layer_mb}M")
            ),
        )

    def check(self, settings: TemplateSettings) -> None:
        if not 1 <= settings.cpu_count <= self.cpu_count:
            raise ValueError(f"--cpu must be 1..{self.cpu_count} (template_max_cpu in the config file)")
        if not MIN_MEMORY_MB <= settings.memory_mb <= self.memory_mb:
            raise ValueError(
                f"--memory must be at least {MIN_MEMORY_MB}M and at most {self.memory_mb}M "
                "(template_max_memory in the config file)"
            )
        if not MIN_WRITABLE_MB <= settings.writable_layer_mb <= self.writable_layer_mb:
            raise ValueError(
                f"--writable-layer-size must be at least {MIN_WRITABLE_MB}M "
                f"and at most {self.writable_layer_mb}M "
                "(template_max_writable_layer_size in the config file)"
            )
        if not 0 < settings.probe_timeout_s <= MAX_PROBE_TIMEOUT_S:
            raise ValueError(f"the probe timeout must be more than 0 and at most {MAX_PROBE_TIMEOUT_S:.0f}s")
        if not 0 < settings.probe_period_s <= MAX_PROBE_PERIOD_S:
            raise ValueError(f"the probe period must be more than 0 and at most {MAX_PROBE_PERIOD_S:.0f}s")


@dataclass(frozen=True)
class TemplateSettings:
    """Everything about the resulting template that does not come from the image."""

    writable_layer_mb: int = 1024
    expose_ports: tuple[int, ...] = ()  # empty: the image's EXPOSE list
    probe_port: int | None = None  # None: the first exposed port, else envd's
    probe_path: str | None = None  # None: TCP connect probe
    probe_timeout_s: float = 120.0
    probe_period_s: float = 1.0
    cpu_count: int = 1
    memory_mb: int = 512
    envs: dict[str, str] = field(default_factory=dict)
    entrypoint: tuple[str, ...] | None = None  # --cmd: replaces the image's ENTRYPOINT (and drops its CMD)
    args: tuple[str, ...] | None = None  # --arg: replace the image's CMD
    dns: tuple[str, ...] = ()
    network_defaults: dict[str, object] = field(default_factory=dict)
    alias: str | None = None
    # Tags the alias gets for this build (catalog.py); () is the alias alone, i.e. its default tag.
    tags: tuple[str, ...] = ()
    # A shell command run in the booted template (its start command running) until it exits 0,
    # after the probe: the E2B SDK's readyCmd.
    ready_cmd: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any], limits: TemplateLimits | None = None) -> TemplateSettings:
        envs: dict[str, str] = {}
        raw_env = data.get("env") or {}
        # The API takes {"K": "V"}; the CLI sends ["K=V", ...].
        items = (
            raw_env.items() if isinstance(raw_env, dict) else (str(e).partition("=")[::2] for e in raw_env)
        )
        for key, value in items:
            if not key:
                raise ValueError("--env needs KEY=VALUE")
            envs[str(key)] = str(value)
        cmd = data.get("cmd")
        args = data.get("args")
        network: dict[str, object] = {}
        if data.get("allow_internet_access") is not None:
            network["allow_internet_access"] = bool(data["allow_internet_access"])
        if data.get("allow_out"):
            network["allow_out"] = _cidrs(data["allow_out"])
        if data.get("deny_out"):
            network["deny_out"] = _cidrs(data["deny_out"])
        settings = cls(
            writable_layer_mb=parse_size_mb(data.get("writable_layer_size", "1G")),
            expose_ports=tuple(_port(p) for p in data.get("expose_ports") or ()),
            probe_port=_port(data["probe_port"]) if data.get("probe_port") else None,
            probe_path=str(data["probe_path"]) if data.get("probe_path") else None,
            probe_timeout_s=float(data.get("probe_timeout_s", 120.0)),
            probe_period_s=float(data.get("probe_period_s", 1.0)),
            cpu_count=int(data.get("cpu", 1)),
            memory_mb=parse_size_mb(data.get("memory", 512)),
            envs=envs,
            entrypoint=tuple(shlex.split(cmd) if isinstance(cmd, str) else cmd) if cmd else None,
            args=tuple(str(a) for a in args) if args else None,
            dns=tuple(str(ipaddress.ip_address(str(s))) for s in data.get("dns") or ()),
            network_defaults=network,
            alias=validate_name(str(data["alias"])) if data.get("alias") else None,
        )
        (limits or TemplateLimits()).check(settings)
        return settings

    def start_cmd(self, entrypoint: tuple[str, ...], cmd: tuple[str, ...]) -> tuple[str, ...]:
        if self.entrypoint is not None:
            return self.entrypoint + (self.args or ())
        return entrypoint + (self.args if self.args is not None else cmd)

    def ports(self, image_ports: tuple[int, ...]) -> tuple[int, ...]:
        return self.expose_ports or image_ports or (ENVD_PORT,)

    def probe(self, image_ports: tuple[int, ...]) -> int:
        return self.probe_port or self.ports(image_ports)[0]


@dataclass(frozen=True)
class ImageBuildRequest:
    image: str
    settings: TemplateSettings
    credentials: Credentials | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any], limits: TemplateLimits | None = None) -> ImageBuildRequest:
        image = str(data.get("image") or "").strip()
        if not image:
            raise ValueError("image is required")
        username, password = data.get("registry_username"), data.get("registry_password")
        if bool(username) != bool(password):
            raise ValueError("--registry-username and --registry-password go together")
        credentials = Credentials(str(username), str(password)) if username else None
        return cls(image, TemplateSettings.from_json(data, limits), credentials)


def redact_urls(text: str) -> str:
    """`text` with the user:password@ and query string of every URL in it replaced by ***."""

    def clean(match: re.Match[str]) -> str:
        userinfo = "***@" if match["userinfo"] else ""
        return f"{match['scheme']}{userinfo}{match['rest']}{'?***' if match['query'] else ''}"

    return _URL_SECRETS.sub(clean, text)


def public_request(data: dict[str, Any]) -> dict[str, Any]:
    """The request as recorded in the job: without the registry password or credentials in URLs (a
    Dockerfile's `ADD https://user:token@...`)."""
    return {
        k: "***" if k == "registry_password" else redact_urls(v) if isinstance(v, str) else v
        for k, v in data.items()
        if v not in (None, "", [], {})
    }


@dataclass(frozen=True)
class BuiltRootfs:
    """What a build (an image, a Dockerfile, an E2B SDK step list) made: its cache key and the
    image settings the template's manifest takes (the request's settings override them)."""

    cache_key: str
    env: dict[str, str]
    start_cmd: tuple[str, ...]
    workdir: str
    user: str
    exposed_ports: tuple[int, ...]
    labels: dict[str, str]
