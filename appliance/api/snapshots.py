"""Snapshots and forks of a sandbox (E2B's `/sandboxes/{id}/snapshots`, `/snapshots`, `/fork`).

A snapshot is a template of the caller's team (`master/snapshots.py`): created from
it with `Sandbox.create(<snapshot id>)`, deleted with `DELETE /templates/<id>` (what
the SDK's `delete_snapshot` calls). Another team's sandbox or snapshot is not found,
exactly as one that never existed.

A full (memory) snapshot and a fork need a memory checkpoint (`master.snapshots.
memory_checkpoints`: kvm; `cubelet/checkpoints.py`). A fork is one checkpoint (a snapshot of
the caller's team, listed by `/snapshots` while it lives, deleted once no fork needs it: its
request is over and its forks have ended) and `count` sandboxes created from it at once,
each with the source's metadata and network policy and its own tokens; each fork's success
or error is its own entry, as the SDKs parse it. The source keeps its id and deadline (it is
paused only while its memory is written). Where the runtime has no checkpoints, the request
succeeds (201) and each requested fork carries the error saying why and what works, as E2B
reports a fork that failed to start. A sandbox holding a volume is not forked (a volume has
one writer at a time): each fork carries that error.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import trio
from quart import Response, request

from appliance.api import validation as v
from appliance.api.auth import Access, guarded
from appliance.api.bodies import id_page, json_response
from appliance.api.errors import ApiError
from appliance.api.sandboxes import create_now, owned_live_record
from appliance.api.services import services
from appliance.cubelet.checkpoints import CheckpointFailed, CheckpointRefused, take_memory_snapshot
from appliance.cubelet.cubelet import LiveSandbox, SandboxRequest
from appliance.master.snapshots import (
    FILESYSTEM,
    FULL,
    SnapshotFailed,
    SnapshotRefused,
    default_mode,
    filesystem_snapshot,
    memory_checkpoints,
    refusal,
)
from appliance.records import SandboxRecord, TemplateManifest
from appliance.templates.catalog import NameTaken, validate_name
from appliance.tenancy import current_principal

log = logging.getLogger(__name__)

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


def _snapshot_mode(data: dict[str, Any], live: LiveSandbox) -> str:
    memory = data.get("memory")
    if memory is None:
        return default_mode(services().cubelet.runtime, live)
    if not isinstance(memory, bool):
        raise ApiError(400, "'memory' must be a boolean")
    return FULL if memory else FILESYSTEM


@blueprint.post("/sandboxes/<sandbox_id>/snapshots")
async def create_snapshot(sandbox_id: str) -> Response:
    s, principal = services(), current_principal()
    data = await v.request_object()
    name = _snapshot_name(data)
    owned_live_record(sandbox_id)
    live = s.cubelet.require(sandbox_id)
    mode = _snapshot_mode(data, live)
    try:
        if mode == FULL:
            manifest = await _memory_snapshot(live, principal.team_id, name)
        else:
            manifest = await filesystem_snapshot(s.config, s.cubelet.runtime, live, principal.team_id, name)
    except SnapshotRefused as exc:
        raise ApiError(409, str(exc), error_code="snapshot_filesystem_only_unsupported_node") from exc
    except NameTaken as exc:
        raise ApiError(409, str(exc), error_code="name_taken") from exc
    except (SnapshotFailed, CheckpointFailed) as exc:
        raise ApiError(500, f"the snapshot failed: {exc}") from exc
    s.templates.refresh()
    return json_response(snapshot_body(manifest), status=201)


async def _memory_snapshot(live: LiveSandbox, team_id: str, name: str | None) -> TemplateManifest:
    """A full snapshot of `live`; E2B's 409 for an unsupported mode where its memory cannot be
    checkpointed (a uml sandbox, or one of a kvm host's templates that runs on uml)."""
    s = services()
    runtime = s.cubelet.runtime
    if memory_checkpoints(runtime):
        try:
            return await take_memory_snapshot(s.config, runtime, live, team_id, name)
        except CheckpointRefused as exc:
            why = f"{exc}: its memory cannot be checkpointed"
            raise ApiError(
                409, f'{why}; use mode="filesystem"', error_code="snapshot_mode_unsupported"
            ) from exc
    raise ApiError(409, refusal(runtime, "a full (memory) snapshot"), error_code="snapshot_mode_unsupported")


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
    s, principal = services(), current_principal()
    data = await v.request_object()
    count = _fork_count(data)
    timeout_s = v.timeout_seconds(data, "timeout", s.config.default_timeout_s)
    record = owned_live_record(sandbox_id)
    runtime = s.cubelet.runtime
    if not memory_checkpoints(runtime):
        error = {"code": 409, "message": refusal(runtime, "forking a sandbox")}
        return json_response([{"error": error} for _ in range(count)], status=201)
    live = s.cubelet.require(sandbox_id)
    results: list[dict[str, object]] = [{} for _ in range(count)]
    try:
        # The checkpoint is deleted once no fork needs it (cubelet/checkpoints.ForkCheckpoints).
        async with s.cubelet.fork_checkpoints.taken(live, principal.team_id) as checkpoint:
            s.templates.refresh()
            request_ = fork_request(record, checkpoint, timeout_s)
            async with trio.open_nursery() as nursery:
                for index in range(count):
                    nursery.start_soon(_start_fork, request_, results, index)
    except CheckpointRefused as exc:
        error = {"code": 409, "message": f"{exc}: its memory cannot be checkpointed, so it cannot be forked"}
        return json_response([{"error": error} for _ in range(count)], status=201)
    except CheckpointFailed as exc:
        raise ApiError(500, f"the fork's checkpoint failed: {exc}") from exc
    s.templates.refresh()
    return json_response(results, status=201)


def fork_request(source: SandboxRecord, checkpoint: TemplateManifest, timeout_s: int) -> SandboxRequest:
    """A fork: the checkpoint's template with the source's settings (its metadata, what happens
    at the timeout, and its network policy: a fork is never more open than its source)."""
    return SandboxRequest(
        template=checkpoint,
        alias=None,
        timeout_s=timeout_s,
        metadata=dict(source.metadata),
        on_timeout=source.on_timeout,
        auto_resume=source.auto_resume,
        network=source.egress_policy(),
        allow_public_traffic=source.allow_public_traffic,
        team_id=source.team_id,
    )


async def _start_fork(request_: SandboxRequest, results: list[dict[str, object]], index: int) -> None:
    """One fork, its outcome in `results[index]`: the sandbox, or the error it failed with."""
    try:
        response = await create_now(request_)
    except ApiError as exc:
        results[index] = {"error": {"code": exc.status, "message": exc.message}}
    except Exception as exc:  # one fork's failure is its own entry, never the others'
        log.exception("fork %d of a sandbox failed to start", index)
        results[index] = {"error": {"code": 500, "message": f"the fork failed to start: {exc}"}}
    else:
        results[index] = {"sandbox": json.loads(await response.get_data())}
