"""What a build is asked to do, validated from the API's JSON (the CLI flags map 1:1)."""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass, field
from typing import Any

from appliance.runtime.base import ENVD_PORT
from appliance.templates.catalog import validate_name
from appliance.templates.registry_auth import Credentials

_SIZE_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MIN_WRITABLE_MB = 16


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
    return int(size) >> 20


def _port(value: Any) -> int:
    port = int(value)
    if not 0 < port < 65536:
        raise ValueError(f"invalid port {value!r}")
    return port


def _cidrs(values: Any) -> list[str]:
    return [str(ipaddress.ip_network(str(v), strict=False)) for v in (values or [])]


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

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TemplateSettings:
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
        if settings.writable_layer_mb < MIN_WRITABLE_MB:
            raise ValueError(f"--writable-layer-size must be at least {MIN_WRITABLE_MB}M")
        if not 1 <= settings.cpu_count <= 64 or settings.memory_mb < 64:
            raise ValueError("--cpu must be 1..64 and --memory at least 64M")
        if settings.probe_timeout_s <= 0 or settings.probe_period_s <= 0:
            raise ValueError("probe timeout and period must be positive")
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
    def from_json(cls, data: dict[str, Any]) -> ImageBuildRequest:
        image = str(data.get("image") or "").strip()
        if not image:
            raise ValueError("image is required")
        username, password = data.get("registry_username"), data.get("registry_password")
        if bool(username) != bool(password):
            raise ValueError("--registry-username and --registry-password go together")
        credentials = Credentials(str(username), str(password)) if username else None
        return cls(image, TemplateSettings.from_json(data), credentials)


def public_request(data: dict[str, Any]) -> dict[str, Any]:
    """The request as recorded in the job: without the registry password."""
    return {
        k: ("***" if k == "registry_password" else v) for k, v in data.items() if v not in (None, "", [], {})
    }
