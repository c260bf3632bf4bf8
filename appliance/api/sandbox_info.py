"""Reading sandboxes (PROTOCOL.md §2.4-2.6): detail, list, metrics, console logs; the caller's team's only."""

from __future__ import annotations

from pathlib import Path

from quart import Response, request

from appliance.api import validation as v
from appliance.api.auth import Access, guarded
from appliance.api.bodies import detail_body, json_response, listed_body
from appliance.api.errors import ApiError
from appliance.api.sandboxes import owned_live_record, owned_record
from appliance.api.services import services
from appliance.api.volumes import mounts_body
from appliance.cubelet.cubelet import SandboxNotFound, rfc3339
from appliance.records import LIVE_STATES, RUNNING, SandboxQuery, SandboxRecord
from appliance.runtime.base import read_console_tail
from appliance.tenancy import current_principal

MAX_LOG_BYTES = 1024 * 1024
MAX_METRICS_IDS = 100

blueprint = guarded("sandbox_info", __name__, Access.KEY)


@blueprint.get("/sandboxes/<sandbox_id>")
async def get_sandbox(sandbox_id: str) -> Response:
    record = owned_live_record(sandbox_id)
    return json_response({**detail_body(record), "volumeMounts": mounts_body(sandbox_id, record.team_id)})


@blueprint.get("/v2/sandboxes")
async def list_v2() -> Response:
    args = request.args
    limit = v.parse_limit(args.get("limit"))
    if args.get("order", "desc") not in ("asc", "desc"):
        raise ApiError(400, "'order' must be asc or desc")
    query = SandboxQuery(
        states=v.parse_states(args.get("state"), LIVE_STATES),
        metadata=v.parse_metadata_query(args.get("metadata")),
        template_id=args.get("template") or None,
        started_after=v.parse_rfc3339(args.get("startedAfter"), "startedAfter"),
        newest_first=args.get("order", "desc") != "asc",
        limit=limit + 1,
        after=v.decode_page_token(args.get("nextToken")),
        team_id=current_principal().scope,
    )
    records = services().store.query_sandboxes(query)
    headers = {}
    if len(records) > limit:
        records = records[:limit]
        headers["x-next-token"] = v.encode_page_token(records[-1].started_at, records[-1].sandbox_id)
    return json_response([listed_body(r) for r in records], headers=headers)


@blueprint.get("/sandboxes")
async def list_v1() -> Response:
    query = SandboxQuery(
        states=v.parse_states(request.args.get("state"), LIVE_STATES),
        metadata=v.parse_metadata_query(request.args.get("metadata")),
        limit=v.MAX_LIST_LIMIT,
        team_id=current_principal().scope,
    )
    return json_response([listed_body(r) for r in services().store.query_sandboxes(query)])


@blueprint.get("/sandboxes/<sandbox_id>/metrics")
async def metrics(sandbox_id: str) -> Response:
    """The samples the cubelet kept, in `?start=&end=` (unix seconds, both optional and inclusive)."""
    start = v.unix_seconds(request.args.get("start"), "start")
    end = v.unix_seconds(request.args.get("end"), "end")
    if start is not None and end is not None and start > end:
        raise ApiError(400, "'start' must not be after 'end'")
    owned_live_record(sandbox_id)
    samples = await services().cubelet.metrics_history.query(sandbox_id, start, end)
    return json_response([sample.body(rfc3339) for sample in samples])


@blueprint.get("/sandboxes/metrics")
async def metrics_many() -> Response:
    s, principal = services(), current_principal()
    ids = [i for i in request.args.get("sandbox_ids", "").split(",") if i][:MAX_METRICS_IDS]
    if not ids:
        query = SandboxQuery(states=(RUNNING,), limit=MAX_METRICS_IDS, team_id=principal.scope)
        ids = [r.sandbox_id for r in s.store.query_sandboxes(query)]
    found: dict[str, object] = {}
    for sandbox_id in ids:
        live = s.cubelet.live(sandbox_id)
        if live is None or live.record is None or not principal.owns(live.record.team_id):
            continue  # unknown, ended or another team's: left out alike
        try:
            found[sandbox_id] = await s.cubelet.metrics(sandbox_id)
        except SandboxNotFound:
            continue
    return json_response({"sandboxes": found})


def _console_lines(record: SandboxRecord, start_ms: int | None, limit: int) -> list[tuple[str, str]]:
    path = Path(record.console_log) if record.console_log else None
    try:
        written = path.stat().st_mtime if path is not None else None
    except OSError:
        written = None
    if path is None or written is None or (start_ms is not None and written * 1000 < start_ms):
        return []
    stamp = rfc3339(written)
    return [(stamp, line) for line in read_console_tail(path, MAX_LOG_BYTES).splitlines()][-limit:]


def log_lines(sandbox_id: str) -> list[tuple[str, str]]:
    record = owned_record(sandbox_id)
    start = request.args.get("start")
    limit = request.args.get("limit", "1000")
    if (start and not start.isdigit()) or not limit.isdigit():
        raise ApiError(400, "'start' and 'limit' must be non-negative integers")
    return _console_lines(record, int(start) if start else None, int(limit))


@blueprint.get("/sandboxes/<sandbox_id>/logs")
async def logs_v1(sandbox_id: str) -> Response:
    lines = log_lines(sandbox_id)
    return json_response(
        {
            "logs": [{"timestamp": ts, "line": line} for ts, line in lines],
            "logEntries": [
                {"timestamp": ts, "message": line, "level": "info", "fields": {}} for ts, line in lines
            ],
        }
    )


@blueprint.get("/v2/sandboxes/<sandbox_id>/logs")
async def logs_v2(sandbox_id: str) -> Response:
    lines = log_lines(sandbox_id)
    return json_response(
        {"logs": [{"timestamp": ts, "message": line, "level": "info", "fields": {}} for ts, line in lines]}
    )
