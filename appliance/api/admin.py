"""`/cube/*`: the operator's calls (the `cube` CLI): every team's sandboxes and events, API keys.

Admin token only.
"""

from __future__ import annotations

from quart import Response, request

from appliance.api import validation as v
from appliance.api.auth import Access, ApiKeys, guarded
from appliance.api.bodies import admin_sandbox_body, event_body, json_response, no_content
from appliance.api.errors import ApiError, error_response
from appliance.api.services import services
from appliance.cluster.etcd import EtcdUnavailable
from appliance.cubelet.cubelet import rfc3339
from appliance.records import DEAD, LIVE_STATES, PAUSED, RUNNING, ApiKeyRecord, SandboxQuery
from appliance.tenancy import SYSTEM_TEAM

blueprint = guarded("admin", __name__, Access.ADMIN)


@blueprint.get("/cube/sandboxes")
async def list_sandboxes() -> Response:
    states = (RUNNING, PAUSED, DEAD) if request.args.get("all") else LIVE_STATES
    records = services().store.query_sandboxes(
        SandboxQuery(states=states, limit=v.parse_limit(request.args.get("limit")))
    )
    return json_response([admin_sandbox_body(r) for r in records])


@blueprint.get("/cube/sandboxes/<sandbox_id>")
async def get_sandbox(sandbox_id: str) -> Response:
    s = services()
    record = s.store.get_sandbox(sandbox_id)
    if record is None:
        raise ApiError(404, f"sandbox {sandbox_id} not found")
    body = admin_sandbox_body(record)
    body["network"] = s.cubelet.network_counters(sandbox_id)
    body["events"] = [
        {"at": rfc3339(e.at), "kind": e.kind, "message": e.message} for e in s.store.events(sandbox_id)
    ]
    return json_response(body)


@blueprint.get("/cube/events")
async def list_events() -> Response:
    events = services().store.events(limit=v.parse_limit(request.args.get("limit")))
    return json_response([event_body(e) for e in events])


def key_body(key: ApiKeyRecord) -> dict[str, object]:
    return {
        "id": key.key_id,
        "name": key.name,
        "team": key.team_id,
        "prefix": key.prefix,
        "createdAt": rfc3339(key.created_at),
        "revokedAt": rfc3339(key.revoked_at) if key.revoked_at else None,
        "lastUsedAt": rfc3339(key.last_used_at) if key.last_used_at else None,
    }


def api_keys() -> ApiKeys:
    """This node's keys, or in a cluster every node's (kept in etcd: cluster/keys.py)."""
    return services().auth.keys


@blueprint.errorhandler(EtcdUnavailable)
async def etcd_unavailable(exc: EtcdUnavailable) -> Response:
    """A change to a cluster's keys while its etcd cannot be reached: nothing was changed."""
    return error_response(503, f"the cluster's etcd is unavailable, retry later: {exc}")


@blueprint.post("/cube/keys")
async def create_key() -> Response:
    """A key in a team of its own, or (`team`) in an existing team, which it then shares."""
    keys = api_keys()
    data = await v.request_object()
    name = data.get("name", "")
    if not isinstance(name, str) or not name.strip():
        raise ApiError(400, "'name' must be a non-empty string")
    team = data.get("team")
    if team is not None:
        if not isinstance(team, str) or not team:
            raise ApiError(400, "'team' must be the id of an existing team")
        if team == SYSTEM_TEAM:
            raise ApiError(400, f"'{SYSTEM_TEAM}' is the admin's team; no API key can join it")
        if not await keys.team_exists(team):
            raise ApiError(404, f"no team {team}: give a team that a key was created in (`cube keys list`)")
    record, key = await keys.create_api_key(name.strip(), team)
    return json_response({**key_body(record), "key": key}, status=201)


@blueprint.get("/cube/keys")
async def list_keys() -> Response:
    return json_response([key_body(k) for k in await api_keys().list_api_keys()])


@blueprint.delete("/cube/keys/<key_id>")
async def revoke_key(key_id: str) -> Response:
    if not await api_keys().revoke_api_key(key_id):
        raise ApiError(404, f"no active API key with id {key_id}")
    return no_content()
