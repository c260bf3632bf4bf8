"""Who is calling: an API key (stored hashed), the local admin token, or anyone in local-dev mode;
and what each blueprint lets them do.

Keys arrive as `X-API-KEY` (what the E2B SDKs send) or `Authorization: Bearer`.
The admin token lives in `<state_dir>/admin-token` (mode 0600) and is what the
CLI on the appliance itself uses; it may also manage API keys. Every blueprint
declares its `Access` when it is made (`guarded`); `build_app` refuses one that
does not, so no route is served without a rule.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from quart import Blueprint, current_app, g, request

from appliance.api.errors import ApiError
from appliance.cluster.forwarding import forwarded_principal
from appliance.config import Config
from appliance.records import ApiKeyRecord, Store
from appliance.tenancy import ADMIN, LOCAL_DEV_TEAM, Principal, current_principal

ADMIN_TOKEN_FILE = "admin-token"
AUTHENTICATOR = "cube.authenticator"  # its key in app.extensions


class Access(enum.Enum):
    PUBLIC = "public"  # no key
    KEY = "key"  # any valid key; what it reaches is scoped to its team
    ADMIN = "admin"  # the admin token only


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
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name in a Host header, without the port (and the brackets of an IPv6 address)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


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


class ApiKeys(Protocol):
    """Where API keys (and so teams) live: this node's SQLite (`LocalKeys`), or in a cluster its
    etcd (cluster/keys.py `ClusterKeys`), so that a key works at every node. Checked on every
    request (no I/O: it must not wait); the admin's changes may wait on the store."""

    def check_api_key(self, key: str) -> ApiKeyRecord | None: ...
    def active_key(self, key_id: str) -> ApiKeyRecord | None: ...
    async def create_api_key(self, name: str, team_id: str | None = None) -> tuple[ApiKeyRecord, str]: ...
    async def team_exists(self, team_id: str) -> bool: ...
    async def list_api_keys(self) -> list[ApiKeyRecord]: ...
    async def revoke_api_key(self, key_id: str) -> bool: ...


class LocalKeys:
    """A single node's keys: its own store's."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def check_api_key(self, key: str) -> ApiKeyRecord | None:
        return self.store.check_api_key(key)

    def active_key(self, key_id: str) -> ApiKeyRecord | None:
        """The key with this id, unless revoked (a dashboard session names its key by id)."""
        return next(
            (k for k in self.store.list_api_keys() if k.key_id == key_id and k.revoked_at is None), None
        )

    async def create_api_key(self, name: str, team_id: str | None = None) -> tuple[ApiKeyRecord, str]:
        return self.store.create_api_key(name, team_id)

    async def team_exists(self, team_id: str) -> bool:
        return self.store.team_exists(team_id)

    async def list_api_keys(self) -> list[ApiKeyRecord]:
        return self.store.list_api_keys()

    async def revoke_api_key(self, key_id: str) -> bool:
        return self.store.revoke_api_key(key_id)


class Authenticator:
    def __init__(
        self,
        config: Config,
        store: Store,
        admin_token: str,
        cluster_token_check: Callable[[str], bool] | None = None,
    ) -> None:
        # Any key goes only while the service listens on loopback alone (checked at start too).
        self.local_dev = config.local_dev and is_loopback(config.api_host)
        self.keys: ApiKeys = LocalKeys(store)  # a cluster node's are its etcd's (master/service.py)
        self.admin_token = admin_token
        # In a cluster: a caller another node authenticated (appliance/cluster/forwarding.py).
        self.cluster_token_check = cluster_token_check

    def authenticate(self, headers: dict[str, str]) -> Principal | None:
        """`headers` with lower-case names."""
        if self.cluster_token_check is not None:
            forwarded = forwarded_principal(headers, self.cluster_token_check)
            if forwarded is not None:
                return forwarded
        key = presented_key(headers)
        if not key:
            return None
        if hmac.compare_digest(key.encode(), self.admin_token.encode()):
            return ADMIN
        record = self.keys.check_api_key(key)
        if record is not None:
            return Principal(record.name, record.team_id)
        # local_dev: a web page the developer opens could reach a loopback port through
        # a DNS name its attacker points at 127.0.0.1 (DNS rebinding): that request
        # names the attacker's host, so any key is accepted only for a loopback Host.
        if self.local_dev and is_loopback(host_name(headers.get("host", ""))):
            return Principal("local-dev", LOCAL_DEV_TEAM)
        return None


def _authenticate(access: Access) -> None:
    authenticator: Authenticator = current_app.extensions[AUTHENTICATOR]
    principal = authenticator.authenticate({k.lower(): v for k, v in request.headers.items()})
    if principal is None:
        raise ApiError(401, "missing or invalid API key (send it as X-API-KEY)")
    if access is Access.ADMIN and not principal.is_admin:
        raise ApiError(403, "this call needs the admin token")
    g.principal = principal


def protect(blueprint: Blueprint, access: Access) -> Blueprint:
    """Every route of `blueprint` needs `access` (for blueprints made elsewhere, e.g. template builds)."""
    if access_of(blueprint) is not None:
        raise ValueError(f"blueprint {blueprint.name} already declares its access")
    blueprint.access = access  # type: ignore[attr-defined]  # read by build_app and the tests
    if access is not Access.PUBLIC:

        @blueprint.before_request
        async def _check() -> None:
            _authenticate(access)

    return blueprint


def guarded(name: str, import_name: str, access: Access) -> Blueprint:
    """A new blueprint whose every route needs `access`."""
    return protect(Blueprint(name, import_name), access)


def access_of(blueprint: Blueprint) -> Access | None:
    access = getattr(blueprint, "access", None)
    return access if isinstance(access, Access) else None


__all__ = [
    "Access",
    "ApiKeys",
    "Authenticator",
    "LocalKeys",
    "Principal",
    "access_of",
    "check_local_dev_allowed",
    "current_principal",
    "ensure_admin_token",
    "guarded",
    "protect",
]
