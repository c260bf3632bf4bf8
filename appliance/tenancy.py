"""Who owns what: every API key belongs to a team, and every sandbox, template, build and event to one.

A team sees and changes only what it owns. The admin token (the operator on the
appliance itself) sees everything; what it creates belongs to `SYSTEM_TEAM`,
as does everything that existed before teams did (built-in templates such as the
default `code-interpreter`): readable by every team, writable only by the admin.
Another team's things are "not found", never "forbidden", so their existence
does not leak (E2B answers 404 the same way).
"""

from __future__ import annotations

from dataclasses import dataclass

SYSTEM_TEAM = "system"
LOCAL_DEV_TEAM = "local-dev"


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
