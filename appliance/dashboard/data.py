"""`/dashboard/api/...`: the JSON the dashboard's script reads and the actions its buttons take.

Each call runs the E2B API's own handler (`call_api`) as the signed-in principal, with the
dashboard request's query and body: listing, killing, pausing, deleting and their tenancy
are that handler's, not a second copy. The handler's blueprint's access rule is checked
here as its before_request would have (an admin-only call stays the admin's). Only what
the API has no call for is here: a team's list of its API keys, a team's events, a sandbox's
record once it ended.
"""

from __future__ import annotations

from typing import cast

from quart import Blueprint, Response, current_app, request

from appliance.api import validation as v
from appliance.api.admin import key_body
from appliance.api.auth import Access, access_of
from appliance.api.bodies import admin_sandbox_body, event_body, json_response, network_body
from appliance.api.errors import ApiError
from appliance.api.sandboxes import owned_record
from appliance.api.services import services
from appliance.dashboard.pages import blueprint
from appliance.dashboard.stats import overview
from appliance.templates.api import Refused
from appliance.templates.api import error as build_error
from appliance.tenancy import current_principal


@blueprint.errorhandler(Refused)
async def _build_refused(refused: Refused) -> tuple[Response, int]:
    """What the build handlers raise, answered as their blueprint answers it (a blueprint's error
    handlers serve only requests routed to it, and `call_api` runs them under the dashboard's)."""
    return build_error(refused.status, refused.code, refused.message)


async def call_api(endpoint: str, **arguments: str) -> Response:
    """The API handler `endpoint` ("blueprint.function") on the current request."""
    view = current_app.view_functions.get(endpoint)
    owner = current_app.blueprints.get(endpoint.partition(".")[0])
    if view is None or owner is None:
        raise ApiError(404, f"this appliance does not serve {endpoint}")
    if access_of(cast(Blueprint, owner)) is Access.ADMIN and not current_principal().is_admin:
        raise ApiError(403, "this needs the admin token")
    answer = await current_app.ensure_async(view)(**arguments)
    return cast(Response, await current_app.make_response(answer))  # type: ignore[arg-type]


@blueprint.get("/api/overview")
async def overview_data() -> Response:
    return json_response(overview(services(), current_principal()))


# Sandboxes.


@blueprint.get("/api/sandboxes")
async def sandboxes() -> Response:
    return await call_api("sandbox_info.list_v2")


@blueprint.get("/api/sandboxes/metrics")
async def sandboxes_metrics() -> Response:
    return await call_api("sandbox_info.metrics_many")


@blueprint.get("/api/sandboxes/<sandbox_id>")
async def sandbox(sandbox_id: str) -> Response:
    record = owned_record(sandbox_id)  # live or ended, the caller's team's
    body = admin_sandbox_body(record)
    body.pop("consoleLog")  # a host path
    body["network"] = network_body(record)
    body["allowInternetAccess"] = record.allow_internet_access
    body["lifecycle"] = {"autoResume": record.auto_resume, "onTimeout": record.on_timeout}
    body["events"] = [event_body(e) for e in services().store.events(sandbox_id, limit=v.MAX_LIST_LIMIT)]
    return json_response(body)


@blueprint.get("/api/sandboxes/<sandbox_id>/logs")
async def sandbox_logs(sandbox_id: str) -> Response:
    return await call_api("sandbox_info.logs_v2", sandbox_id=sandbox_id)


SANDBOX_ACTIONS = {
    "kill": "sandboxes.kill",
    "pause": "sandboxes.pause",
    "resume": "sandboxes.resume",
    "timeout": "sandboxes.set_timeout",  # body {"timeout": seconds from now}
}


@blueprint.post("/api/sandboxes/<sandbox_id>/<action>")
async def sandbox_action(sandbox_id: str, action: str) -> Response:
    endpoint = SANDBOX_ACTIONS.get(action)
    if endpoint is None:
        raise ApiError(404, f"no sandbox action {action!r}")
    return await call_api(endpoint, sandbox_id=sandbox_id)


# Templates and their builds.


@blueprint.get("/api/templates")
async def templates() -> Response:
    return await call_api("templates.list_templates")


@blueprint.get("/api/templates/<template_id>")
async def template(template_id: str) -> Response:
    return await call_api("templates.get_template", template_id=template_id)


@blueprint.post("/api/templates/<template_id>/delete")
async def delete_template(template_id: str) -> Response:
    return await call_api("templates.delete_template", template_id=template_id)


@blueprint.get("/api/builds")
async def builds() -> Response:
    return await call_api("template_builds.list_builds")


@blueprint.post("/api/builds")
async def submit_build() -> Response:
    """An image build (body: templates/requests.py's ImageBuildRequest JSON)."""
    return await call_api("template_builds.submit_image_build")


@blueprint.get("/api/builds/<job_id>")
async def build(job_id: str) -> Response:
    return await call_api("template_builds.get_build", job_id=job_id)


# API keys: the admin's calls (every team's keys, create, revoke); a key sees its own team's
# keys (never their secrets) and manages none, as on the API, where keys are the admin's.


@blueprint.get("/api/keys")
async def keys() -> Response:
    principal = current_principal()
    if principal.is_admin:
        return await call_api("admin.list_keys")
    return json_response([key_body(k) for k in services().store.list_api_keys() if principal.owns(k.team_id)])


@blueprint.post("/api/keys")
async def create_key() -> Response:
    return await call_api("admin.create_key")


@blueprint.post("/api/keys/<key_id>/revoke")
async def revoke_key(key_id: str) -> Response:
    return await call_api("admin.revoke_key", key_id=key_id)


@blueprint.get("/api/events")
async def events() -> Response:
    """The newest events (`?limit=`), the caller's team's; `?sandbox=` one sandbox's."""
    sandbox_id = request.args.get("sandbox") or None
    if sandbox_id is not None:
        owned_record(sandbox_id)
    found = services().store.events(
        sandbox_id, limit=v.parse_limit(request.args.get("limit")), team_id=current_principal().scope
    )
    return json_response([event_body(e) for e in found])
