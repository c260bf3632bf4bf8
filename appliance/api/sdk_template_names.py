"""The E2B SDKs' template names and tags on the control plane (their e2b/template_sync/build_api.py
and `Template.exists`, `assign_tags`, `remove_tags`, `get_tags`); the builds themselves are
api/sdk_templates.py:

  GET    /templates/aliases/{alias}             -> {templateID, public}; 403 for another team's name
  POST   /templates/tags  {target: name:tag, tags}  -> 201 {tags, buildID}
  DELETE /templates/tags  {name, tags}          -> 204
  GET    /templates/{id}/tags                   -> [{tag, buildID, createdAt}]
  GET    /v2/templates                          -> [Template] (as GET /templates)
  PATCH  /templates/{id}, /v2/templates/{id}    {public} -> 200 {names}

A name is its team's: another team's is not found (403 where E2B says the name is taken).
"""

from __future__ import annotations

from quart import Response

from appliance.api.auth import Access, guarded
from appliance.api.bodies import json_response, no_content
from appliance.api.errors import ApiError
from appliance.api.services import Services, services
from appliance.api.validation import request_object, string_list
from appliance.records import TemplateManifest
from appliance.templates.catalog import (
    DEFAULT_TAG,
    AliasEntry,
    TemplateNotFound,
    assign_tags,
    load_aliases,
    name_owner,
    remove_tags,
    resolve_tag,
    split_name_tag,
    tags_of,
)
from appliance.tenancy import SYSTEM_TEAM, Principal, current_principal

blueprint = guarded("sdk_template_names", __name__, Access.KEY)


# Names and tags.


def _alias_entry(s: Services, name: str, principal: Principal, *, write: bool) -> AliasEntry:
    """The caller's template name (a built-in one to read); another team's is not found."""
    entry = load_aliases(s.config).get(name)
    owner = entry.get("owner", SYSTEM_TEAM) if entry is not None else None
    if entry is None or owner is None or not principal.sees(owner):
        raise ApiError(404, f"template '{name}' not found")
    if write and not principal.owns(owner):
        raise ApiError(403, f"template '{name}' is built in: only the admin may change it")
    return entry


@blueprint.get("/templates/aliases/<alias>")
async def get_alias(alias: str) -> Response:
    s, principal = services(), current_principal()
    owner = name_owner(s.config, alias)
    if owner is None:
        raise ApiError(404, f"template '{alias}' not found")
    if not principal.sees(owner):
        # As E2B: the name exists but is not the caller's (building under it would be refused too).
        raise ApiError(403, f"the template name '{alias}' belongs to another team")
    return json_response({"templateID": alias, "public": owner == SYSTEM_TEAM})


def _manifest(s: Services, template_id: str) -> TemplateManifest | None:
    return s.templates.all().get(template_id) or s.templates.refresh().get(template_id)


@blueprint.post("/templates/tags")
async def assign_template_tags() -> Response:
    s, principal = services(), current_principal()
    data = await request_object(required=True)
    target, tags = data.get("target"), string_list(data, "tags")
    if not isinstance(target, str) or not target or not tags:
        raise ApiError(400, "'target' (name:tag) and 'tags' are required")
    name, tag = split_name_tag(target)
    _alias_entry(s, name, principal, write=True)
    source = resolve_tag(s.config, name, tag or DEFAULT_TAG)
    manifest = _manifest(s, source) if source is not None else None
    if manifest is None:
        raise ApiError(404, f"template '{target}' not found")
    try:
        assign_tags(s.config, name, manifest.template_id, tuple(tags))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from exc
    except TemplateNotFound as exc:
        raise ApiError(404, str(exc)) from exc
    s.templates.refresh()
    return json_response({"tags": tags, "buildID": manifest.e2b_build_id}, 201)


@blueprint.delete("/templates/tags")
async def delete_template_tags() -> Response:
    s, principal = services(), current_principal()
    data = await request_object(required=True)
    name, tags = data.get("name"), string_list(data, "tags")
    if not isinstance(name, str) or not name or not tags:
        raise ApiError(400, "'name' and 'tags' are required")
    base = split_name_tag(name)[0]
    _alias_entry(s, base, principal, write=True)
    try:
        remove_tags(s.config, base, tuple(tags))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from exc
    except TemplateNotFound as exc:
        raise ApiError(404, str(exc)) from exc
    return no_content()


@blueprint.get("/templates/<template_id>/tags")
async def get_template_tags(template_id: str) -> Response:
    s, principal = services(), current_principal()
    name = split_name_tag(template_id)[0]
    if name in load_aliases(s.config):
        found = tags_of(_alias_entry(s, name, principal, write=False))
        tags = [(tag, entry["template_id"], entry["created_at"]) for tag, entry in sorted(found.items())]
    else:
        manifest = s.templates.resolve(name, principal)
        if manifest is None:
            raise ApiError(404, f"template '{template_id}' not found")
        tags = [(DEFAULT_TAG, manifest.template_id, manifest.created_at)]
    body = []
    for tag, version, created_at in tags:
        manifest = _manifest(s, version)
        if manifest is not None:
            body.append({"tag": tag, "buildID": manifest.e2b_build_id, "createdAt": created_at})
    return json_response(body)


# Updating.


@blueprint.patch("/templates/<template_id>")
@blueprint.patch("/v2/templates/<template_id>")
async def update_template(template_id: str) -> Response:
    s, principal = services(), current_principal()
    data = await request_object(required=True)
    manifest = s.templates.resolve(template_id, principal)
    if manifest is None:
        raise ApiError(404, f"template '{template_id}' not found")
    if not principal.owns(manifest.owner):
        raise ApiError(403, f"template '{manifest.template_id}' is built in: only the admin may change it")
    public = data.get("public")
    if public is not None and not isinstance(public, bool):
        raise ApiError(400, "'public' must be a boolean")
    if public:
        raise ApiError(
            400,
            "public templates are not supported here: a template is its team's (built-in ones are "
            "every team's)",
        )
    return json_response({"names": [manifest.template_id, *manifest.aliases]})
