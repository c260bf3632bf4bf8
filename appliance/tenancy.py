"""Who owns what: every API key belongs to a team, and every sandbox, template, build and event to one.

A team sees and changes only what it owns. The admin token (the operator on the
appliance itself) sees everything; what it creates belongs to `SYSTEM_TEAM`,
as does everything that existed before teams did (built-in templates such as the
default `code-interpreter`): readable by every team, writable only by the admin.
Another team's things are "not found", never "forbidden", so their existence
does not leak (E2B answers 404 the same way).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

SYSTEM_TEAM = "system"
LOCAL_DEV_TEAM = "local-dev"
KEY_PREFIX = "e2b_"  # what E2B's SDKs accept: newer ones check `^e2b_[0-9a-f]+$` before any request


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_hex(20)  # 40 hex digits, like an E2B key


def hash_api_key(key: str) -> str:
    """Keys are 160-bit random secrets, so one SHA-256 is enough (no password stretching needed);
    only this hash is ever stored (the node's SQLite, a cluster's etcd)."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_prefix(key: str) -> str:
    """The first characters of a key, shown in listings to tell keys apart."""
    return key[: len(KEY_PREFIX) + 4]


def new_key_id() -> str:
    return secrets.token_hex(4)


def new_team_id() -> str:
    return "team-" + secrets.token_hex(4)


def team_owns(team_id: str, owner: str) -> bool:
    """May `team_id` change (and see) something `owner` owns? The system team is the admin's."""
    return team_id == SYSTEM_TEAM or owner == team_id


def team_sees(team_id: str, owner: str) -> bool:
    """May `team_id` see or use something `owner` owns: its own team's, or a built-in."""
    return team_owns(team_id, owner) or owner == SYSTEM_TEAM


@dataclass(frozen=True)
class Principal:
    name: str
    team_id: str  # SYSTEM_TEAM only for the admin token: no API key is ever put in it

    @property
    def is_admin(self) -> bool:
        return self.team_id == SYSTEM_TEAM

    def owns(self, owner: str) -> bool:
        return team_owns(self.team_id, owner)

    def sees(self, owner: str) -> bool:
        return team_sees(self.team_id, owner)

    @property
    def scope(self) -> str | None:
        """The team whose rows a query returns; None for the admin (every team's)."""
        return None if self.is_admin else self.team_id


ADMIN = Principal("admin", SYSTEM_TEAM)


def current_principal() -> Principal:
    """The caller of the request being served, as the API's authentication recorded it.

    A blueprint served without that authentication in front has no caller: that is a
    401, never a default identity.
    """
    from quart import g
    from werkzeug.exceptions import Unauthorized

    principal = g.get("principal")
    if not isinstance(principal, Principal):
        raise Unauthorized("missing or invalid API key (send it as X-API-KEY)")
    return principal
