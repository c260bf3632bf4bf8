"""CubeAPI: the E2B control plane (PROTOCOL.md §2) as a Quart-Trio app, plus `/cube/*` admin calls."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from quart import Blueprint, Response, g, request
from quart_trio import QuartTrio

from appliance import __version__
from appliance.api import validation as v
from appliance.api.auth import Authenticator, Principal
from appliance.api.errors import ApiError, error_response, install_error_handlers
from appliance.config import Config
from appliance.cubelet.cubelet import (
    ENVD_VERSION,
    Cubelet,
    SandboxCapacityExceeded,
    SandboxNotFound,
    SandboxRequest,
    SandboxStartFailed,
    rfc3339,
)
from appliance.master.store import DEAD, LIVE_STATES, PAUSED, RUNNING, SandboxQuery, SandboxRecord, Store
from appliance.master.templates import TemplateRegistry
from appliance.net.policy import NetworkPolicy, PolicyError
from appliance.templates.manifest import TemplateManifest

MAX_BODY_BYTES = 1024 * 1024
MAX_LOG_BYTES = 1024 * 1024
PUBLIC_PATHS = frozenset({"/health"})


@dataclass
class Services:
    config: Config
    store: Store
    cubelet: Cubelet
    templates: TemplateRegistry
    auth: Authenticator
    started_at: float = field(default_factory=time.time)
    creates_in_flight: dict[str, trio.Event] = field(default_factory=dict)


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(data), status=status, content_type="application/json", headers=headers)


def no_content() -> Response:
    return Response("", status=204)


# Serialization (camelCase, E2B models).


def created_body(record: SandboxRecord) -> dict[str, object]:
    return {
        "templateID": record.template_id,
        "sandboxID": record.sandbox_id,
        "clientID": record.client_id,
        "envdVersion": ENVD_VERSION,
        "alias": record.alias,
        "envdAccessToken": record.envd_access_token,
        "trafficAccessToken": None,
        "domain": None,
    }


def listed_body(record: SandboxRecord) -> dict[str, object]:
    return {
        "templateID": record.template_id,
        "alias": record.alias,
        "sandboxID": record.sandbox_id,
        "clientID": record.client_id,
        "startedAt": rfc3339(record.started_at),
        "endAt": rfc3339(record.end_at),
        "envdVersion": ENVD_VERSION,
        "cpuCount": record.cpu_count,
        "memoryMB": record.memory_mb,
        "diskSizeMB": record.disk_size_mb,
        "state": record.state,
        "metadata": record.metadata,
    }


def detail_body(record: SandboxRecord) -> dict[str, object]:
    return {
        **listed_body(record),
        "envdAccessToken": record.envd_access_token,
        "domain": None,
        "allowInternetAccess": record.allow_internet_access,
        "network": record.network,
        "lifecycle": {"autoResume": record.auto_resume, "onTimeout": record.on_timeout},
    }


def admin_sandbox_body(record: SandboxRecord) -> dict[str, object]:
    body = listed_body(record)
    body.pop("envdVersion")
    body.update(
        {
            "endedAt": rfc3339(record.ended_at) if record.ended_at else None,
            "endReason": record.end_reason,
            "consoleLog": record.console_log,
        }
    )
    return body


def template_body(manifest: TemplateManifest, cubelet: Cubelet) -> dict[str, object]:
    created = manifest.created_at or rfc3339(
        manifest.directory.stat().st_mtime if manifest.directory.exists() else 0
    )
    return {
        "templateID": manifest.template_id,
        "buildID": manifest.source or manifest.template_id,
        "cpuCount": manifest.cpu_count,
        "memoryMB": manifest.memory_mb,
        "diskSizeMB": manifest.writable_layer_mb,
        "public": False,
        "aliases": list(manifest.aliases),
        "names": [manifest.template_id, *manifest.aliases],
        "createdAt": created,
        "updatedAt": created,
        "createdBy": None,
        "lastSpawnedAt": None,
        "spawnCount": 0,
        "buildCount": 1,
        "buildStatus": "ready",
        "envdVersion": ENVD_VERSION,
        "runningSandboxes": cubelet.live_count(manifest.template_id),
        "warmInstances": cubelet.pooled_count(manifest.template_id),
        "warmPool": cubelet.pool_state(manifest.template_id, manifest),  # target / ready / booting
    }


def _console_lines(record: SandboxRecord, start_ms: int | None, limit: int) -> list[tuple[str, str]]:
    path = Path(record.console_log) if record.console_log else None
    if path is None or not path.exists():
        return []
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - MAX_LOG_BYTES))
        text = f.read().decode("utf-8", "replace")
    stamp = rfc3339(path.stat().st_mtime)
    if start_ms is not None and path.stat().st_mtime * 1000 < start_ms:
        return []
    return [(stamp, line) for line in text.splitlines()][-limit:]


def build_app(services: Services, blueprints: Iterable[Blueprint] = ()) -> QuartTrio:
    """The control-plane app; `blueprints` (e.g. template builds) are served behind the same auth."""
    app = QuartTrio("appliance.api")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    install_error_handlers(app)

    @app.errorhandler(SandboxNotFound)
    async def _sandbox_gone(error: SandboxNotFound) -> Response:
        return error_response(404, str(error))

    config, store, cubelet, templates = services.config, services.store, services.cubelet, services.templates

    @app.before_request
    async def _authenticate() -> None:
        if request.path in PUBLIC_PATHS:
            return
        principal = services.auth.authenticate({k.lower(): val for k, val in request.headers.items()})
        if principal is None:
            raise ApiError(401, "missing or invalid API key (send it as X-API-KEY)")
        g.principal = principal

    def require_admin() -> None:
        principal: Principal = g.principal
        if not principal.is_admin:
            raise ApiError(403, "this call needs the admin token")

    async def body_object(*, required: bool = False) -> dict[str, Any]:
        raw = await request.get_data(as_text=False)
        return v.parse_json_object(raw if isinstance(raw, bytes) else raw.encode(), required=required)

    def live_record(sandbox_id: str) -> SandboxRecord:
        live = cubelet.live(sandbox_id)
        if live is None or live.record is None:
            record = store.get_sandbox(sandbox_id)
            if record is not None and record.state == DEAD:
                raise ApiError(404, f"sandbox {sandbox_id} not found (it ended: {record.end_reason})")
            raise ApiError(404, f"sandbox {sandbox_id} not found")
        return live.record

    @app.get("/health")
    async def health() -> Response:
        return json_response(
            {"status": "ok", "version": __version__, "uptimeSeconds": int(time.time() - services.started_at)}
        )

    # Create.

    async def create(*, v2: bool) -> Response:
        data = await body_object()
        template_name = data.get("templateID", config.default_template)
        if not isinstance(template_name, str) or not template_name:
            raise ApiError(400, "'templateID' must be a non-empty string")
        timeout_s = v.timeout_seconds(data, "timeout", config.default_timeout_s)
        metadata = v.metadata(data)
        env_vars = v.env_vars(data)
        auto_pause = v.optional_bool(data, "autoPause", False)
        auto_resume_value = data.get("autoResume")
        if isinstance(auto_resume_value, dict):
            auto_resume = v.optional_bool(auto_resume_value, "enabled", False)
        else:
            auto_resume = v.optional_bool(data, "autoResume", False)
        allow_internet = v.optional_bool(data, "allow_internet_access", True)
        network = v.optional_object(data, "network")
        if data.get("volumeMounts"):
            raise ApiError(400, "volume mounts are not supported by this appliance")
        if data.get("mcp"):
            raise ApiError(400, "MCP gateways are not supported by this appliance")
        template = templates.resolve(template_name)
        if template is None:
            raise ApiError(404, f"template '{template_name}' not found")
        sandbox_request = SandboxRequest(
            template=template,
            alias=template_name if template_name != template.template_id else None,
            timeout_s=timeout_s,
            metadata=metadata,
            env_vars=env_vars,
            on_timeout="pause" if auto_pause else "kill",
            auto_resume=auto_resume,
            allow_internet_access=allow_internet,
            network=network,
        )
        try:
            NetworkPolicy.from_e2b(sandbox_request.network_policy())
        except PolicyError as exc:
            raise ApiError(400, f"invalid network policy: {exc}") from exc
        idempotency_key = request.headers.get("Idempotency-Key", "").strip()
        if idempotency_key:
            principal: Principal = g.principal
            return await create_once(f"{principal.name}:{idempotency_key}", sandbox_request)
        return await create_now(sandbox_request)

    async def create_now(sandbox_request: SandboxRequest) -> Response:
        try:
            record = await cubelet.create(sandbox_request)
        except SandboxCapacityExceeded as exc:
            raise ApiError(503, f"no capacity for another sandbox now, retry later: {exc}") from exc
        except SandboxStartFailed as exc:
            raise ApiError(500, f"sandbox failed to start: {exc}") from exc
        return json_response(created_body(record), status=201)

    async def create_once(key: str, sandbox_request: SandboxRequest) -> Response:
        while key in services.creates_in_flight:
            await services.creates_in_flight[key].wait()
        existing = store.idempotent_sandbox(key)
        if existing is not None:
            record = store.get_sandbox(existing)
            if record is None or record.state == DEAD:
                raise ApiError(409, f"Idempotency-Key was used for sandbox {existing}, which has ended")
            return json_response(created_body(record), status=201)
        done = services.creates_in_flight[key] = trio.Event()
        try:
            response = await create_now(sandbox_request)
            store.remember_idempotency_key(key, json.loads(await response.get_data())["sandboxID"])
            return response
        finally:
            del services.creates_in_flight[key]
            done.set()

    @app.post("/v2/sandboxes")
    async def create_v2() -> Response:
        return await create(v2=True)

    @app.post("/sandboxes")
    async def create_v1() -> Response:
        return await create(v2=False)

    # Connect / resume.

    async def connect(sandbox_id: str) -> Response:
        data = await body_object()
        timeout_s = v.timeout_seconds(data, "timeout", config.default_timeout_s)
        live_record(sandbox_id)
        record, resumed = await cubelet.connect(sandbox_id, timeout_s)
        return json_response(created_body(record), status=201 if resumed else 200)

    @app.post("/v2/sandboxes/<sandbox_id>/connect")
    async def connect_v2(sandbox_id: str) -> Response:
        return await connect(sandbox_id)

    @app.post("/sandboxes/<sandbox_id>/connect")
    async def connect_v1(sandbox_id: str) -> Response:
        return await connect(sandbox_id)

    @app.post("/sandboxes/<sandbox_id>/resume")
    async def resume(sandbox_id: str) -> Response:
        data = await body_object()
        timeout_s = v.timeout_seconds(data, "timeout", config.default_timeout_s)
        if live_record(sandbox_id).state != PAUSED:
            raise ApiError(409, f"sandbox {sandbox_id} is already running")
        record, _ = await cubelet.connect(sandbox_id, timeout_s)
        return json_response(created_body(record), status=201)

    # Read.

    @app.get("/sandboxes/<sandbox_id>")
    async def get_sandbox(sandbox_id: str) -> Response:
        return json_response(detail_body(live_record(sandbox_id)))

    @app.get("/v2/sandboxes")
    async def list_v2() -> Response:
        args = request.args
        limit = v.parse_limit(args.get("limit"))
        query = SandboxQuery(
            states=v.parse_states(args.get("state"), LIVE_STATES),
            metadata=v.parse_metadata_query(args.get("metadata")),
            template_id=args.get("template") or None,
            started_after=v.parse_rfc3339(args.get("startedAfter"), "startedAfter"),
            newest_first=args.get("order", "desc") != "asc",
            limit=limit + 1,
            after=v.decode_page_token(args.get("nextToken")),
        )
        if args.get("order", "desc") not in ("asc", "desc"):
            raise ApiError(400, "'order' must be asc or desc")
        records = store.query_sandboxes(query)
        headers = {}
        if len(records) > limit:
            records = records[:limit]
            headers["x-next-token"] = v.encode_page_token(records[-1].started_at, records[-1].sandbox_id)
        return json_response([listed_body(r) for r in records], headers=headers)

    @app.get("/sandboxes")
    async def list_v1() -> Response:
        query = SandboxQuery(
            states=v.parse_states(request.args.get("state"), LIVE_STATES),
            metadata=v.parse_metadata_query(request.args.get("metadata")),
            limit=v.MAX_LIST_LIMIT,
        )
        return json_response([listed_body(r) for r in store.query_sandboxes(query)])

    # Lifecycle.

    @app.delete("/sandboxes/<sandbox_id>")
    async def kill(sandbox_id: str) -> Response:
        if not await cubelet.kill(sandbox_id, reason="killed by request"):
            raise ApiError(404, f"sandbox {sandbox_id} not found")
        return no_content()

    @app.post("/sandboxes/<sandbox_id>/timeout")
    async def set_timeout(sandbox_id: str) -> Response:
        data = await body_object(required=True)
        if "timeout" not in data:
            raise ApiError(400, "'timeout' is required")
        timeout_s = v.timeout_seconds(data, "timeout", config.default_timeout_s)
        live_record(sandbox_id)
        cubelet.set_timeout(sandbox_id, timeout_s)
        return no_content()

    @app.post("/sandboxes/<sandbox_id>/refreshes")
    async def refresh(sandbox_id: str) -> Response:
        data = await body_object()
        duration_s = v.timeout_seconds(data, "duration", config.default_timeout_s)
        record = live_record(sandbox_id)
        if record.end_at < time.time() + duration_s:
            cubelet.set_timeout(sandbox_id, duration_s)
        return no_content()

    @app.post("/sandboxes/<sandbox_id>/pause")
    async def pause(sandbox_id: str) -> Response:
        await body_object()
        live_record(sandbox_id)
        if not await cubelet.pause(sandbox_id):
            raise ApiError(409, f"sandbox {sandbox_id} is already paused")
        return no_content()

    @app.put("/sandboxes/<sandbox_id>/network")
    async def update_network(sandbox_id: str) -> Response:
        policy = await body_object(required=True)
        live_record(sandbox_id)
        try:
            NetworkPolicy.from_e2b(policy)
            await cubelet.update_network(sandbox_id, policy)
        except PolicyError as exc:
            raise ApiError(400, f"invalid network policy: {exc}") from exc
        return no_content()

    # Metrics and logs.

    @app.get("/sandboxes/<sandbox_id>/metrics")
    async def metrics(sandbox_id: str) -> Response:
        live_record(sandbox_id)
        return json_response([await cubelet.metrics(sandbox_id)])

    @app.get("/sandboxes/metrics")
    async def metrics_many() -> Response:
        ids = [s for s in request.args.get("sandbox_ids", "").split(",") if s]
        if not ids:
            ids = [r.sandbox_id for r in store.query_sandboxes(SandboxQuery(states=(RUNNING,), limit=100))]
        found: dict[str, object] = {}
        for sandbox_id in ids:
            try:
                found[sandbox_id] = await cubelet.metrics(sandbox_id)
            except SandboxNotFound:
                continue
        return json_response({"sandboxes": found})

    def log_query() -> tuple[SandboxRecord, int | None, int]:
        sandbox_id = request.view_args["sandbox_id"] if request.view_args else ""
        record = store.get_sandbox(sandbox_id)
        if record is None:
            raise ApiError(404, f"sandbox {sandbox_id} not found")
        start = request.args.get("start")
        limit = request.args.get("limit", "1000")
        if (start and not start.isdigit()) or not limit.isdigit():
            raise ApiError(400, "'start' and 'limit' must be non-negative integers")
        return record, int(start) if start else None, int(limit)

    @app.get("/sandboxes/<sandbox_id>/logs")
    async def logs_v1(sandbox_id: str) -> Response:
        record, start, limit = log_query()
        lines = _console_lines(record, start, limit)
        return json_response(
            {
                "logs": [{"timestamp": ts, "line": line} for ts, line in lines],
                "logEntries": [
                    {"timestamp": ts, "message": line, "level": "info", "fields": {}} for ts, line in lines
                ],
            }
        )

    @app.get("/v2/sandboxes/<sandbox_id>/logs")
    async def logs_v2(sandbox_id: str) -> Response:
        record, start, limit = log_query()
        lines = _console_lines(record, start, limit)
        return json_response(
            {
                "logs": [
                    {"timestamp": ts, "message": line, "level": "info", "fields": {}} for ts, line in lines
                ]
            }
        )

    # Templates.

    def find_template(template_id: str) -> TemplateManifest:
        manifest = templates.resolve(template_id)
        if manifest is None:
            raise ApiError(404, f"template '{template_id}' not found")
        return manifest

    @app.get("/templates")
    async def list_templates() -> Response:
        return json_response([template_body(t, cubelet) for t in templates.refresh().values()])

    @app.get("/templates/<template_id>")
    async def get_template(template_id: str) -> Response:
        body = template_body(find_template(template_id), cubelet)
        body["builds"] = [
            {
                "buildID": body["buildID"],
                "status": "ready",
                "createdAt": body["createdAt"],
                "updatedAt": body["updatedAt"],
                "cpuCount": body["cpuCount"],
                "memoryMB": body["memoryMB"],
                "diskSizeMB": body["diskSizeMB"],
                "envdVersion": ENVD_VERSION,
            }
        ]
        return json_response(body)

    @app.delete("/templates/<template_id>")
    async def delete_template(template_id: str) -> Response:
        manifest = find_template(template_id)
        force = request.args.get("force", "false").lower() in ("1", "true", "yes")
        running = [
            r.sandbox_id
            for r in store.query_sandboxes(
                SandboxQuery(template_id=manifest.template_id, limit=v.MAX_LIST_LIMIT)
            )
        ]
        if running and not force:
            raise ApiError(
                409, f"template '{manifest.template_id}' has {len(running)} live sandboxes; kill them first"
            )
        for sandbox_id in running:
            await cubelet.kill(sandbox_id, reason=f"template {manifest.template_id} deleted")
        templates.delete(manifest.template_id)
        cubelet.wake_pools()
        return no_content()

    # Admin (`cube` CLI).

    @app.get("/cube/sandboxes")
    async def admin_list() -> Response:
        states = (RUNNING, PAUSED, DEAD) if request.args.get("all") else LIVE_STATES
        records = store.query_sandboxes(
            SandboxQuery(states=states, limit=v.parse_limit(request.args.get("limit")))
        )
        return json_response([admin_sandbox_body(r) for r in records])

    @app.get("/cube/sandboxes/<sandbox_id>")
    async def admin_get(sandbox_id: str) -> Response:
        record = store.get_sandbox(sandbox_id)
        if record is None:
            raise ApiError(404, f"sandbox {sandbox_id} not found")
        body = admin_sandbox_body(record)
        body["network"] = cubelet.network_counters(sandbox_id)
        body["events"] = [
            {"at": rfc3339(e.at), "kind": e.kind, "message": e.message} for e in store.events(sandbox_id)
        ]
        return json_response(body)

    @app.get("/cube/events")
    async def admin_events() -> Response:
        return json_response(
            [
                {"at": rfc3339(e.at), "sandboxID": e.sandbox_id, "kind": e.kind, "message": e.message}
                for e in store.events(limit=v.parse_limit(request.args.get("limit")))
            ]
        )

    @app.post("/cube/keys")
    async def create_key() -> Response:
        require_admin()
        data = await body_object()
        name = data.get("name", "")
        if not isinstance(name, str) or not name.strip():
            raise ApiError(400, "'name' must be a non-empty string")
        record, key = store.create_api_key(name.strip())
        return json_response({"id": record.key_id, "name": record.name, "key": key}, status=201)

    @app.get("/cube/keys")
    async def list_keys() -> Response:
        require_admin()
        return json_response(
            [
                {
                    "id": k.key_id,
                    "name": k.name,
                    "prefix": k.prefix,
                    "createdAt": rfc3339(k.created_at),
                    "revokedAt": rfc3339(k.revoked_at) if k.revoked_at else None,
                    "lastUsedAt": rfc3339(k.last_used_at) if k.last_used_at else None,
                }
                for k in store.list_api_keys()
            ]
        )

    @app.delete("/cube/keys/<key_id>")
    async def revoke_key(key_id: str) -> Response:
        require_admin()
        if not store.revoke_api_key(key_id):
            raise ApiError(404, f"no active API key with id {key_id}")
        return no_content()

    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    return app
