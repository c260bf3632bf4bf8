"""How one node speaks for a caller to another: the headers of a forwarded request.

A node forwards a request only after it has authenticated the caller itself (against the
cluster's keys, cluster/keys.py). The request then carries the cluster token and the caller's team; the
receiving node believes the team only with the right token (`forwarded_principal`), handles the
request itself and never forwards it again. A wrong token is refused with a 401 before anything
else (proxy/node_hop.py). The token is never logged (ClusterSettings' repr leaves it out).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from appliance.tenancy import Principal

TOKEN_HEADER = "x-cube-cluster-token"
TEAM_HEADER = "x-cube-cluster-team"
NAME_HEADER = "x-cube-cluster-caller"
CLUSTER_HEADERS = frozenset({TOKEN_HEADER, TEAM_HEADER, NAME_HEADER})


def principal_headers(token: str, principal: Principal | None) -> list[tuple[bytes, bytes]]:
    headers = [(TOKEN_HEADER.encode(), token.encode())]
    if principal is not None:
        headers += [
            (TEAM_HEADER.encode(), principal.team_id.encode()),
            (NAME_HEADER.encode(), principal.name.encode()),
        ]
    return headers


def forwarded_principal(headers: Mapping[str, str], verify: Callable[[str], bool]) -> Principal | None:
    """The caller another node authenticated, if the request carries the valid cluster token and
    a team; None otherwise (the request is then authenticated as any other)."""
    presented = headers.get(TOKEN_HEADER)
    team = headers.get(TEAM_HEADER, "").strip()
    if presented is None or not team or not verify(presented):
        return None
    return Principal(headers.get(NAME_HEADER, "") or "cluster", team)
