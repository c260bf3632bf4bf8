"""Templates on the control plane: list, get, delete (building them: appliance/templates/api.py).

A team sees its own templates and the built-in ones; it may delete only its own.
Another team's template is not found; a built-in one is read-only (403).
"""

from __future__ import annotations

from quart import Response, request

from appliance.api import validation as v
from appliance.api.auth import Access, guarded
from appliance.api.bodies import json_response, no_content, template_body, template_detail_body
from appliance.api.errors import ApiError
from appliance.api.services import services
from appliance.records import SandboxQuery, TemplateManifest
from appliance.tenancy import current_principal

blueprint = guarded("templates", __name__, Access.KEY)


def find_template(template_id: str) -> TemplateManifest:
    manifest = services().templates.resolve(template_id, current_principal())
    if manifest is None:
        raise ApiError(404, f"template '{template_id}' not found")
    return manifest


@blueprint.get("/templates")
async def list_templates() -> Response:
    s = services()
    visible = s.templates.visible(current_principal()).values()
    return json_response([template_body(t, s.cubelet) for t in visible])


@blueprint.get("/templates/<template_id>")
async def get_template(template_id: str) -> Response:
    return json_response(template_detail_body(find_template(template_id), services().cubelet))


@blueprint.delete("/templates/<template_id>")
async def delete_template(template_id: str) -> Response:
    s = services()
    manifest = find_template(template_id)
    if not current_principal().owns(manifest.owner):
        raise ApiError(403, f"template '{manifest.template_id}' is built in: only the admin may delete it")
    force = request.args.get("force", "false").lower() in ("1", "true", "yes")
    running = [
        r.sandbox_id
        for r in s.store.query_sandboxes(
            SandboxQuery(template_id=manifest.template_id, limit=v.MAX_LIST_LIMIT)
        )
    ]
    if running and not force:
        raise ApiError(
            409, f"template '{manifest.template_id}' has {len(running)} live sandboxes; kill them first"
        )
    for sandbox_id in running:
        await s.cubelet.kill(sandbox_id, reason=f"template {manifest.template_id} deleted")
    s.templates.delete(manifest.template_id)
    s.cubelet.wake_pools()
    return no_content()
