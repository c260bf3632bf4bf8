"""Snapshots and forks of a sandbox (E2B's `/sandboxes/{id}/snapshots`, `/snapshots`, `/fork`).

A snapshot is a template of the caller's team (`master/snapshots.py`): created from
it with `Sandbox.create(<snapshot id>)`, deleted with `DELETE /templates/<id>` (what
the SDK's `delete_snapshot` calls). Another team's sandbox or snapshot is not found,
exactly as one that never existed.

Forks need a memory checkpoint (`master.snapshots.memory_checkpoints`); where the
runtime has none, the request succeeds (201) and each requested fork carries the
error saying why and what works, as E2B reports a fork that failed to start.
"""

from __future__ import annotations

from typing import Any

from quart import Response, request

from appliance.api import validation as v
from appliance.api.auth import Access, guarded
from appliance.api.bodies import id_page, json_response
from appliance.api.errors import ApiError
from appliance.api.sandboxes import owned_live_record
from appliance.api.services import services
from appliance.master.snapshots import (
    FILESYSTEM,
    FULL,
    SnapshotFailed,
    SnapshotRefused,
    default_mode,
    memory_checkpoints,
    refusal,
    take_filesystem_snapshot,
)
from appliance.records import TemplateManifest
from appliance.templates.catalog import NameTaken, validate_name
from appliance.tenancy import current_principal

blueprint = guarded("snapshots", __name__, Access.KEY)

MAX_FORK_COUNT = 20  # the SDKs' bound (e2b.sandbox.sandbox_api.MAX_FORK_COUNT)


def snapshot_body(manifest: TemplateManifest) -> dict[str, object]:
    return {"snapshotID": manifest.template_id, "names": [manifest.template_id, *manifest.aliases]}


def _snapshot_name(data: dict[str, Any]) -> str | None:
    name = data.get("name")
    if name is None or name == "":
        return None
    if not isinstance(name, str):
        raise ApiError(400, "'name' must be a string")
    try:
        return validate_name(name)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from exc


def _snapshot_mode(data: dict[str, Any]) -> str:
    memory = data.get("memory")
    if memory is None:
        return default_mode(services().cubelet.runtime)
    if not isinstance(memory, bool):
        raise ApiError(400, "'memory' must be a boolean")
    return FULL if memory else FILESYSTEM


@blueprint.post("/sandboxes/<sandbox_id>/snapshots")
async def create_snapshot(sandbox_id: str) -> Response:
    s, principal = services(), current_principal()
    data = await v.request_object()
    name, mode = _snapshot_name(data), _snapshot_mode(data)
    owned_live_record(sandbox_id)
    runtime = s.cubelet.runtime
    if mode == FULL and not memory_checkpoints(runtime):
        raise ApiError(
            409, refusal(runtime, "a full (memory) snapshot"), error_code="snapshot_mode_unsupported"
        )
    try:
        manifest = await take_filesystem_snapshot(
            s.config, s.cubelet.require(sandbox_id), principal.team_id, name
        )
    except SnapshotRefused as exc:
        raise ApiError(409, str(exc), error_code="snapshot_filesystem_only_unsupported_node") from exc
    except NameTaken as exc:
        raise ApiError(409, str(exc), error_code="name_taken") from exc
    except SnapshotFailed as exc:
        raise ApiError(500, f"the snapshot failed: {exc}") from exc
    s.templates.refresh()
    return json_response(snapshot_body(manifest), status=201)


def _matches(manifest: TemplateManifest, name: str) -> bool:
    """`name` is the snapshot's id or alias, optionally `team/`-qualified or `:tag`-qualified."""
    bare = name.rpartition("/")[2].partition(":")[0]
    return bare == manifest.template_id or bare in manifest.aliases


@blueprint.get("/snapshots")
async def list_snapshots() -> Response:
    principal = current_principal()
    limit = v.parse_limit(request.args.get("limit"))
    source, name = request.args.get("sandboxID"), request.args.get("name")
    after = request.args.get("nextToken") or ""
    found = sorted(
        (
            m
            for m in services().templates.visible(principal).values()
            if m.snapshot_of and principal.owns(m.owner)
        ),
        key=lambda m: (m.created_at, m.template_id),
    )
    if source:
        found = [m for m in found if m.snapshot_of == source]
    if name:
        found = [m for m in found if _matches(m, name)]
    return id_page(found, lambda m: m.template_id, snapshot_body, limit, after)


def _fork_count(data: dict[str, Any]) -> int:
    count = data.get("count", 1)
    if count is None:
        return 1
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_FORK_COUNT:
        raise ApiError(400, f"count must be an integer between 1 and {MAX_FORK_COUNT}")
    return count


@blueprint.post("/sandboxes/<sandbox_id>/fork")
async def fork(sandbox_id: str) -> Response:
    s = services()
    data = await v.request_object()
    count = _fork_count(data)
    v.timeout_seconds(data, "timeout", s.config.default_timeout_s)
    owned_live_record(sandbox_id)
    runtime = s.cubelet.runtime
    if memory_checkpoints(runtime):  # the seam for kvm's full-memory forks
        raise ApiError(501, f"forks on the {runtime.name} runtime are not wired to the API yet")
    error = {"code": 409, "message": refusal(runtime, "forking a sandbox")}
    return json_response([{"error": error} for _ in range(count)], status=201)
