"""Templates on the control plane: list, get, delete (building them: appliance/templates/api.py and,
for the E2B SDKs, api/sdk_templates.py).

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
from appliance.templates.catalog import delete_alias, load_aliases
from appliance.tenancy import current_principal

blueprint = guarded("templates", __name__, Access.KEY)


def find_template(template_id: str) -> TemplateManifest:
    manifest = services().templates.resolve(template_id, current_principal())
    if manifest is None:
        raise ApiError(404, f"template '{template_id}' not found")
    return manifest


@blueprint.get("/templates")
@blueprint.get("/v2/templates")
async def list_templates() -> Response:
    s = services()
    visible = s.templates.visible(current_principal()).values()
    return json_response([template_body(t, s.cubelet) for t in visible])


@blueprint.get("/templates/<template_id>")
async def get_template(template_id: str) -> Response:
    return json_response(template_detail_body(find_template(template_id), services().cubelet))


@blueprint.delete("/templates/<template_id>")
async def delete_template(template_id: str) -> Response:
    """A template version by its id; a template name (an alias, the E2B SDKs' templateID) with
    every version of it."""
    s = services()
    manifest = find_template(template_id)
    if not current_principal().owns(manifest.owner):
        raise ApiError(403, f"template '{manifest.template_id}' is built in: only the admin may delete it")
    force = request.args.get("force", "false").lower() in ("1", "true", "yes")
    entry = load_aliases(s.config).get(template_id)
    versions = [v["template_id"] for v in entry["versions"]] if entry is not None else []
    ids = list(dict.fromkeys([manifest.template_id, *versions]))
    running = [
        r.sandbox_id
        for template in ids
        for r in s.store.query_sandboxes(SandboxQuery(template_id=template, limit=v.MAX_LIST_LIMIT))
    ]
    if running and not force:
        raise ApiError(409, f"template '{template_id}' has {len(running)} live sandboxes; kill them first")
    for sandbox_id in running:
        await s.cubelet.kill(sandbox_id, reason=f"template {template_id} deleted")
    if entry is not None:
        delete_alias(s.config, template_id)
    for template in ids:
        s.templates.delete(template)
        await s.cubelet.forget_template(template)
    s.cubelet.wake_pools()
    return no_content()
