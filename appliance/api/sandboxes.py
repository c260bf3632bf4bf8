"""Sandbox lifecycle (PROTOCOL.md §2.2-2.6): create, connect/resume, kill, timeout, pause, network.

Any API key; a team reaches only its own sandboxes (another team's are "not found",
as on E2B), and at most `config.max_sandboxes_per_team` of them are alive at once.
"""

from __future__ import annotations

import json
import time
from typing import Any

import trio
from quart import Response, request

from appliance.api import validation as v
from appliance.api.auth import Access, guarded
from appliance.api.bodies import created_body, json_response, no_content
from appliance.api.errors import ApiError
from appliance.api.network import create_network, update_network
from appliance.api.secrets import refuse_placeholders
from appliance.api.services import Services, services
from appliance.api.volumes import volume_mounts
from appliance.cubelet.cubelet import OutOfMemoryBudget, SandboxRequest, SandboxStartFailed
from appliance.cubelet.volume_mounts import VolumeMountError
from appliance.net.policy import PolicyError
from appliance.records import DEAD, LIVE_STATES, PAUSED, SandboxRecord
from appliance.templates.built_in import template_not_found_message
from appliance.tenancy import Principal, current_principal

blueprint = guarded("sandboxes", __name__, Access.KEY)


def not_found(sandbox_id: str) -> ApiError:
    return ApiError(404, f"sandbox {sandbox_id} not found")


def owned_live_record(sandbox_id: str) -> SandboxRecord:
    """The caller's running or paused sandbox; another team's is as missing as one that never was."""
    principal = current_principal()
    s = services()
    live = s.cubelet.live(sandbox_id)
    if live is None or live.record is None or not principal.owns(live.record.team_id):
        record = s.store.get_sandbox(sandbox_id)
        if record is not None and record.state == DEAD and principal.owns(record.team_id):
            raise ApiError(404, f"sandbox {sandbox_id} not found (it ended: {record.end_reason})")
        raise not_found(sandbox_id)
    return live.record


def owned_record(sandbox_id: str) -> SandboxRecord:
    """The caller's sandbox as recorded, live or ended."""
    record = services().store.get_sandbox(sandbox_id)
    if record is None or not current_principal().owns(record.team_id):
        raise not_found(sandbox_id)
    return record


# Create.


def sandbox_request(data: dict[str, Any], principal: Principal, s: Services) -> SandboxRequest:
    template_name = data.get("templateID", s.config.default_template)
    if not isinstance(template_name, str) or not template_name:
        raise ApiError(400, "'templateID' must be a non-empty string")
    timeout_s = v.timeout_seconds(data, "timeout", s.config.default_timeout_s)
    metadata = v.metadata(data)
    env_vars = v.env_vars(data)
    auto_pause = v.optional_bool(data, "autoPause", False)
    auto_resume_value = data.get("autoResume")
    if isinstance(auto_resume_value, dict):
        auto_resume = v.optional_bool(auto_resume_value, "enabled", False)
    else:
        auto_resume = v.optional_bool(data, "autoResume", False)
    refuse_placeholders(data)
    v.optional_bool(data, "allow_internet_access", True)  # its type checked here, its value in create_network
    if data.get("mcp"):
        raise ApiError(400, "MCP gateways are not supported by this appliance")
    template = s.templates.resolve(template_name, principal)
    if template is None:
        raise ApiError(404, template_not_found_message(template_name))
    network = create_network(data, template)
    mounts = volume_mounts(data.get("volumeMounts"), principal.team_id)
    return SandboxRequest(
        template=template,
        alias=template_name if template_name != template.template_id else None,
        timeout_s=timeout_s,
        metadata=metadata,
        env_vars=env_vars,
        on_timeout="pause" if auto_pause else "kill",
        auto_resume=auto_resume,
        network=network.egress,
        allow_public_traffic=network.allow_public_traffic,
        team_id=principal.team_id,
        volume_mounts=mounts,
    )


def check_team_cap(s: Services, principal: Principal) -> None:
    cap = s.config.max_sandboxes_per_team
    if principal.is_admin or cap <= 0:
        return
    if s.store.count_sandboxes(LIVE_STATES, principal.team_id) + s.creating[principal.team_id] >= cap:
        raise ApiError(
            429, f"your team has reached its limit of {cap} live sandboxes; kill one to start another"
        )


async def create_now(sandbox_request: SandboxRequest) -> Response:
    s, principal = services(), current_principal()
    check_team_cap(s, principal)
    s.creating[principal.team_id] += 1
    try:
        record = await s.cubelet.create(sandbox_request)
    except OutOfMemoryBudget as exc:
        raise ApiError(503, f"the appliance is out of sandbox memory, retry later: {exc}") from exc
    except SandboxStartFailed as exc:
        raise ApiError(500, f"sandbox failed to start: {exc}") from exc
    except VolumeMountError as exc:
        raise ApiError(exc.status, str(exc)) from exc
    finally:
        s.creating[principal.team_id] -= 1
    return json_response(created_body(record), status=201)


async def create_once(key: tuple[str, str], sandbox_request: SandboxRequest) -> Response:
    """At most one sandbox per (team, Idempotency-Key): a retried create gets the first one's."""
    s = services()
    while key in s.creates_in_flight:
        await s.creates_in_flight[key].wait()
    existing = s.store.idempotent_sandbox(*key)
    if existing is not None:
        record = s.store.get_sandbox(existing)
        if record is None or record.state == DEAD:
            raise ApiError(409, f"Idempotency-Key was used for sandbox {existing}, which has ended")
        return json_response(created_body(record), status=201)
    done = s.creates_in_flight[key] = trio.Event()
    try:
        response = await create_now(sandbox_request)
        s.store.remember_idempotency_key(*key, json.loads(await response.get_data())["sandboxID"])
        return response
    finally:
        del s.creates_in_flight[key]
        done.set()


@blueprint.post("/v2/sandboxes")
@blueprint.post("/sandboxes")
async def create() -> Response:
    principal = current_principal()
    sandbox_request_ = sandbox_request(await v.request_object(), principal, services())
    idempotency_key = request.headers.get("Idempotency-Key", "").strip()
    if idempotency_key:
        return await create_once((principal.team_id, idempotency_key), sandbox_request_)
    return await create_now(sandbox_request_)


# Connect / resume.


@blueprint.post("/v2/sandboxes/<sandbox_id>/connect")
@blueprint.post("/sandboxes/<sandbox_id>/connect")
async def connect(sandbox_id: str) -> Response:
    s = services()
    timeout_s = v.timeout_seconds(await v.request_object(), "timeout", s.config.default_timeout_s)
    owned_live_record(sandbox_id)
    record, resumed = await s.cubelet.connect(sandbox_id, timeout_s)
    return json_response(created_body(record), status=201 if resumed else 200)


@blueprint.post("/sandboxes/<sandbox_id>/resume")
async def resume(sandbox_id: str) -> Response:
    s = services()
    timeout_s = v.timeout_seconds(await v.request_object(), "timeout", s.config.default_timeout_s)
    if owned_live_record(sandbox_id).state != PAUSED:
        raise ApiError(409, f"sandbox {sandbox_id} is already running")
    record, _ = await s.cubelet.connect(sandbox_id, timeout_s)
    return json_response(created_body(record), status=201)


# Lifecycle.


@blueprint.delete("/sandboxes/<sandbox_id>")
async def kill(sandbox_id: str) -> Response:
    owned_live_record(sandbox_id)
    cubelet = services().cubelet
    if not await cubelet.kill(sandbox_id, reason="killed by request"):
        raise not_found(sandbox_id)
    await cubelet.volume_mounts.wait_saved(sandbox_id)  # its volumes hold its files when this answers
    return no_content()


@blueprint.post("/sandboxes/<sandbox_id>/timeout")
async def set_timeout(sandbox_id: str) -> Response:
    s = services()
    data = await v.request_object(required=True)
    if "timeout" not in data:
        raise ApiError(400, "'timeout' is required")
    # 0 is E2B's "time out now": the sandbox's on-timeout action (kill or pause) runs at once.
    timeout_s = v.timeout_seconds(data, "timeout", s.config.default_timeout_s, minimum=0)
    owned_live_record(sandbox_id)
    s.cubelet.set_timeout(sandbox_id, timeout_s)
    return no_content()


@blueprint.post("/sandboxes/<sandbox_id>/refreshes")
async def refresh(sandbox_id: str) -> Response:
    s = services()
    duration_s = v.timeout_seconds(await v.request_object(), "duration", s.config.default_timeout_s)
    if owned_live_record(sandbox_id).end_at < time.time() + duration_s:
        s.cubelet.set_timeout(sandbox_id, duration_s)
    return no_content()


@blueprint.post("/sandboxes/<sandbox_id>/pause")
async def pause(sandbox_id: str) -> Response:
    await v.request_object()
    owned_live_record(sandbox_id)
    if not await services().cubelet.pause(sandbox_id):
        raise ApiError(409, f"sandbox {sandbox_id} is already paused")
    return no_content()


@blueprint.put("/sandboxes/<sandbox_id>/network")
async def set_network(sandbox_id: str) -> Response:
    policy = update_network(await v.request_object(required=True))
    owned_live_record(sandbox_id)
    try:
        await services().cubelet.update_network(sandbox_id, policy)
    except PolicyError as exc:  # CubeVS refused it (the sandbox keeps its old policy)
        raise ApiError(400, f"invalid network policy: {exc}") from exc
    return no_content()
