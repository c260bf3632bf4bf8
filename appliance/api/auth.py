"""Who is calling: an API key (stored hashed), the local admin token, or anyone in local-dev mode.

Keys arrive as `X-API-KEY` (what the E2B SDKs send) or `Authorization: Bearer`.
The admin token lives in `<state_dir>/admin-token` (mode 0600) and is what the
CLI on the appliance itself uses; it may also manage API keys.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from appliance.config import Config
from appliance.master.store import Store

ADMIN_TOKEN_FILE = "admin-token"


@dataclass(frozen=True)
class Principal:
    name: str
    is_admin: bool


def admin_token_path(state_dir: Path) -> Path:
    return state_dir / ADMIN_TOKEN_FILE


def ensure_admin_token(state_dir: Path) -> str:
    path = admin_token_path(state_dir)
    if path.exists():
        return path.read_text().strip()
    state_dir.mkdir(parents=True, exist_ok=True)
    token = "cubeadmin_" + secrets.token_hex(16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_local_dev_allowed(config: Config) -> None:
    if config.local_dev and not is_loopback(config.api_host):
        raise SystemExit(
            f"local_dev accepts any API key, so it is only allowed on a loopback address; "
            f"api_host is {config.api_host!r}. Bind to 127.0.0.1 or create keys with `cube keys create`."
        )


def presented_key(headers: dict[str, str]) -> str:
    key = headers.get("x-api-key", "").strip()
    if key:
        return key
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    return ""


class Authenticator:
    def __init__(self, config: Config, store: Store, admin_token: str) -> None:
        self.local_dev = config.local_dev
        self.store = store
        self.admin_token = admin_token

    def authenticate(self, headers: dict[str, str]) -> Principal | None:
        key = presented_key(headers)
        if not key:
            return None
        if hmac.compare_digest(key.encode(), self.admin_token.encode()):
            return Principal("admin", is_admin=True)
        record = self.store.check_api_key(key)
        if record is not None:
            return Principal(record.name, is_admin=False)
        if self.local_dev:
            return Principal("local-dev", is_admin=False)
        return None
