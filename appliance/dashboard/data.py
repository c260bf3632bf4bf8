"""`/dashboard/api/...`: the JSON the dashboard's script reads and the actions its buttons take.

Each call runs the E2B API's own handler (`call_api`) as the signed-in principal, with the
dashboard request's query and body: listing, killing, pausing, deleting and their tenancy
are that handler's, not a second copy. The handler's blueprint's access rule is checked
here as its before_request would have (an admin-only call stays the admin's). Only what
the API has no call for is here: a team's list of its API keys, a team's events, a sandbox's
record once it ended.

In a cluster the pages show every node: the sandbox list and metrics merge every node's, the
overview adds up every node's figures and shows each node's, the events merge every node's (each
naming its node), and a sandbox's page, its log and its buttons go to the node that runs it, as
`/sandboxes/<id>` does through the node hop (`node_running`). Another node asks this one for its
own figures with the cluster token (guard.NODE_ENDPOINTS): answered with this node's only.
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import quote

import httpx
from quart import Blueprint, Response, current_app, request

from appliance.api import validation as v
from appliance.api.admin import key_body
from appliance.api.auth import Access, access_of
from appliance.api.bodies import admin_sandbox_body, event_body, json_response, network_body
from appliance.api.errors import ApiError
from appliance.api.sandboxes import not_found, owned_record
from appliance.api.services import services
from appliance.cluster.fanout import NodeAnswer, call_node, latest_first
from appliance.cluster.membership import NodeRecord, left_reason
from appliance.cluster.node import ClusterNode
from appliance.cluster.pages import merge_pages
from appliance.dashboard import guard
from appliance.dashboard.pages import blueprint
from appliance.dashboard.stats import overview, per_node_total
from appliance.templates.api import Refused
from appliance.templates.api import error as build_error
from appliance.tenancy import current_principal

# A pause or resume another node runs for a button here: as long as the API's forwarded calls.
ACTION_TIMEOUT = httpx.Timeout(5.0, read=600.0)


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
    """This node's figures; for a signed-in caller also every node's (`perNode`, this one first)
    and the cluster's totals of sandboxes and creates."""
    here = {**overview(services(), current_principal()), "nodeID": this_node_id()}
    if guard.from_other_node():
        return json_response(here)
    figures = [here]
    cluster = cluster_wide()
    if cluster is not None:
        asked = await cluster.ask_others(current_principal(), "/dashboard/api/overview", "")
        figures += [found for node_id, answer in asked if (found := answer.fields(node_id))]
    return json_response({**here, **per_node_total(figures)})


# The cluster.


def this_node_id() -> str | None:
    cluster = services().cluster
    return None if cluster is None else cluster.node_id


def cluster_wide() -> ClusterNode | None:
    """This node's cluster when the request speaks for the whole cluster: None on a single node,
    and for a request another node sent (it gets this node's own)."""
    cluster = services().cluster
    return None if cluster is None or guard.from_other_node() else cluster


def node_running(sandbox_id: str) -> tuple[ClusterNode, NodeRecord] | None:
    """The other live node that runs (or ran) the caller's sandbox; None for this node's own or
    one the cluster does not know (answered here); a 404 saying why when its node left."""
    cluster = cluster_wide()
    if cluster is None or cluster.cubelet.live(sandbox_id) is not None:
        return None
    owner = cluster.owner(sandbox_id)
    if owner is None or owner.node_id == cluster.node_id:
        return None
    if not current_principal().owns(owner.team_id):
        raise not_found(sandbox_id)
    node = cluster.view.nodes.get(owner.node_id)
    if node is None:
        gone = owner.reason or left_reason(owner.node_id)
        raise ApiError(404, f"sandbox {sandbox_id} not found (it ended: {gone})")
    return cluster, node


async def on_node(
    running: tuple[ClusterNode, NodeRecord],
    method: str,
    path: str,
    sandbox_id: str,
    timeout: httpx.Timeout | None = None,
) -> Response:
    """This request (its query and body) as `path` at the node that runs `sandbox_id`, for the
    signed-in caller; its answer as it is."""
    cluster, node = running
    body = cast(bytes, await request.get_data(as_text=False)) if method != "GET" else b""
    answer = await call_node(
        cluster.client,
        cluster.token,
        node.node_id,
        node.cluster_url,
        method,
        path,
        current_principal(),
        query=request.query_string.decode("latin-1"),
        body=body,
        content_type=request.content_type if body else None,
        timeout=timeout,
    )
    if answer is None:
        raise ApiError(502, f"node {node.node_id}, which runs sandbox {sandbox_id}, is unreachable")
    kind = next((v.decode("latin-1") for k, v in answer.headers if k.lower() == b"content-type"), None)
    return Response(answer.body, status=answer.status, content_type=kind or "application/json")


# Sandboxes.


async def other_nodes(here: Response, path: str) -> tuple[str, list[tuple[str, NodeAnswer]]] | None:
    """In a cluster, `path` with this request's query as every other live node answers it for the
    signed-in principal (the node hop does so for the API's lists; the dashboard's come here
    with a session, not a key), with this node's id; None for a single node, or when this node
    refused the request."""
    cluster = services().cluster
    if cluster is None or here.status_code != 200:
        return None
    query = request.query_string.decode("latin-1")
    return cluster.node_id, await cluster.ask_others(current_principal(), path, query)


@blueprint.get("/api/sandboxes")
async def sandboxes() -> Response:
    """The first page of the caller's sandboxes: in a cluster, every node's merged."""
    here = await call_api("sandbox_info.list_v2")
    cluster = await other_nodes(here, "/v2/sandboxes")
    if cluster is None:
        return here
    this_node, others = cluster
    pages = {this_node: await here.get_json()}
    pages.update((node_id, answer.records(node_id)) for node_id, answer in others)
    limit = v.parse_limit(request.args.get("limit"))
    shown, _ = merge_pages(pages, request.args.get("order", "desc") != "asc", limit)
    return json_response(shown)


@blueprint.get("/api/sandboxes/metrics")
async def sandboxes_metrics() -> Response:
    here = await call_api("sandbox_info.metrics_many")
    cluster = await other_nodes(here, "/sandboxes/metrics")
    if cluster is None:
        return here
    _, others = cluster
    merged = dict((await here.get_json())["sandboxes"])
    for node_id, answer in others:
        merged.update(answer.metrics(node_id))
    return json_response({"sandboxes": merged})


@blueprint.get("/api/sandboxes/<sandbox_id>")
async def sandbox(sandbox_id: str) -> Response:
    """The caller's sandbox, live or ended, with its network and events, from its node."""
    if (running := node_running(sandbox_id)) is not None:
        return await on_node(
            running, "GET", f"/dashboard/api/sandboxes/{quote(sandbox_id, safe='')}", sandbox_id
        )
    record = owned_record(sandbox_id)  # live or ended, the caller's team's
    body = admin_sandbox_body(record)
    body.pop("consoleLog")  # a host path
    body["network"] = network_body(record)
    body["allowInternetAccess"] = record.allow_internet_access
    body["lifecycle"] = {"autoResume": record.auto_resume, "onTimeout": record.on_timeout}
    body["events"] = [event_body(e) for e in services().store.events(sandbox_id, limit=v.MAX_LIST_LIMIT)]
    body["nodeID"] = this_node_id()
    return json_response(body)


@blueprint.get("/api/sandboxes/<sandbox_id>/logs")
async def sandbox_logs(sandbox_id: str) -> Response:
    if (running := node_running(sandbox_id)) is not None:
        return await on_node(running, "GET", f"/v2/sandboxes/{quote(sandbox_id, safe='')}/logs", sandbox_id)
    return await call_api("sandbox_info.logs_v2", sandbox_id=sandbox_id)


# Each action: the API's handler here, and its method and path at another node (the API's own route).
SANDBOX_ACTIONS = {
    "kill": ("sandboxes.kill", "DELETE", ""),
    "pause": ("sandboxes.pause", "POST", "/pause"),
    "resume": ("sandboxes.resume", "POST", "/resume"),
    "timeout": ("sandboxes.set_timeout", "POST", "/timeout"),  # body {"timeout": seconds from now}
}


@blueprint.post("/api/sandboxes/<sandbox_id>/<action>")
async def sandbox_action(sandbox_id: str, action: str) -> Response:
    if action not in SANDBOX_ACTIONS:
        raise ApiError(404, f"no sandbox action {action!r}")
    endpoint, method, suffix = SANDBOX_ACTIONS[action]
    if (running := node_running(sandbox_id)) is not None:
        path = f"/sandboxes/{quote(sandbox_id, safe='')}{suffix}"
        return await on_node(running, method, path, sandbox_id, ACTION_TIMEOUT)
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
    listed = await services().auth.keys.list_api_keys()
    return json_response([key_body(k) for k in listed if principal.owns(k.team_id)])


@blueprint.post("/api/keys")
async def create_key() -> Response:
    return await call_api("admin.create_key")


@blueprint.post("/api/keys/<key_id>/revoke")
async def revoke_key(key_id: str) -> Response:
    return await call_api("admin.revoke_key", key_id=key_id)


@blueprint.get("/api/events")
async def events() -> Response:
    """The newest events (`?limit=`), the caller's team's, each naming its node; in a cluster
    every node's, merged newest first; `?sandbox=` one sandbox's, from its node."""
    sandbox_id = request.args.get("sandbox") or None
    limit = v.parse_limit(request.args.get("limit"))
    if sandbox_id is not None:
        if (running := node_running(sandbox_id)) is not None:
            return await on_node(running, "GET", "/dashboard/api/events", sandbox_id)
        owned_record(sandbox_id)
    found = services().store.events(sandbox_id, limit=limit, team_id=current_principal().scope)
    here = [{**event_body(e), "nodeID": this_node_id()} for e in found]
    cluster = cluster_wide()
    if cluster is None or sandbox_id is not None:
        return json_response(here)
    query = request.query_string.decode("latin-1")
    asked = await cluster.ask_others(current_principal(), "/dashboard/api/events", query)
    merged: list[dict[str, Any]] = here + [
        {**item, "nodeID": node_id}
        for node_id, answer in asked
        for item in answer.records(node_id)
        if isinstance(item, dict)
    ]
    return json_response(latest_first(merged, "at", limit))
