"""The CLI's way to the running service: base URL from config, credentials from the admin token or a key."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import click
import httpx

from appliance.api.auth import admin_token_path
from appliance.config import Config

REQUEST_TIMEOUT_S = 30.0


def api_url(config: Config) -> str:
    host = config.api_host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.api_port}"


def credentials(config: Config, api_key: str | None) -> str:
    """An explicit key, else the local admin token (readable by root), else CUBE_API_KEY / E2B_API_KEY."""
    if api_key:
        return api_key
    try:
        return admin_token_path(config.state_dir).read_text().strip()
    except OSError:
        pass
    for name in ("CUBE_API_KEY", "E2B_API_KEY"):
        if os.environ.get(name):
            return os.environ[name]
    raise click.ClickException(
        f"no credentials: run as root (to read {admin_token_path(config.state_dir)}), "
        "or pass --api-key / set CUBE_API_KEY"
    )


@dataclass
class ApiClient:
    base_url: str
    key: str

    @classmethod
    def from_config(cls, config: Config, api_key: str | None = None) -> ApiClient:
        return cls(api_url(config), credentials(config, api_key))

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-KEY": self.key}

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; service errors become a ClickException with the server's message."""
        try:
            response = httpx.request(
                method,
                self.base_url + path,
                headers=self.headers,
                timeout=REQUEST_TIMEOUT_S,
                trust_env=False,
                **kwargs,
            )
        except httpx.ConnectError as exc:
            raise click.ClickException(f"cube serve is not answering at {self.base_url} ({exc})") from exc
        if response.status_code >= 400:
            try:
                message = response.json()["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise click.ClickException(f"{response.status_code}: {message}")
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.call(method, path, **kwargs).json()
