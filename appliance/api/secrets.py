"""Secrets (E2B's `/secrets`): create, list, get, update, delete; values are write-only.

No response carries a value: the bodies are built from `SecretRecord`, which has none.
Another team's secret is "not found", exactly as one that never existed.

`${e2b.secrets.NAME}` placeholders: E2B resolves them at the sandbox's egress (its proxy
rewrites matching HTTP requests, `network.rules[*].transform.headers`), so the value never
sits in the sandbox. So does this appliance (net/egress_proxy.py): placeholders are taken in
rule header values only, and each must name a secret of the caller's team (else 400, at
create). Anywhere else in a create body (env vars, metadata...) resolving one would put the
value in the sandbox in clear: refused (400), saying so (`refuse_placeholders`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from typing import Any

from quart import Response, request

from appliance.api import validation as v
from appliance.api.auth import Access, guarded
from appliance.api.bodies import id_page, json_response, no_content
from appliance.api.errors import ApiError
from appliance.api.services import services
from appliance.cubelet.cubelet import rfc3339
from appliance.master.secrets import SECRET_ID_PREFIX, SecretNameTaken, SecretRecord, SecretStore
from appliance.net.policy import SECRET_NAME
from appliance.tenancy import current_principal

blueprint = guarded("secrets", __name__, Access.KEY)

_NAME_RE = SECRET_NAME
MAX_VALUE_BYTES = 64 * 1024
MAX_METADATA_ENTRIES = 32
PLACEHOLDER = "${e2b.secrets."


def secret_body(record: SecretRecord) -> dict[str, object]:
    return {
        "secretID": record.secret_id,
        "name": record.name,
        "currentVersion": record.version,
        "metadata": record.metadata,
        "createdAt": rfc3339(record.created_at),
        "updatedAt": rfc3339(record.updated_at),
    }


def _store() -> SecretStore:
    store = services().secrets
    if store is None:
        raise ApiError(503, "secrets are not available on this service")
    return store


def _value(data: dict[str, Any]) -> str:
    value = data.get("value")
    if not isinstance(value, str) or not value:
        raise ApiError(400, "'value' must be a non-empty string")
    if len(value.encode()) > MAX_VALUE_BYTES:
        raise ApiError(400, f"'value' is larger than {MAX_VALUE_BYTES} bytes")
    return value


def _metadata(data: dict[str, Any]) -> dict[str, str] | None:
    if data.get("metadata") is None:
        return None
    return v.string_map(data, "metadata", max_bytes=8192, max_entries=MAX_METADATA_ENTRIES)


def _not_found(secret: str) -> ApiError:
    return ApiError(404, f"secret {secret} not found")


@blueprint.get("/secrets")
async def list_secrets() -> Response:
    limit = v.parse_limit(request.args.get("limit"))
    after = request.args.get("nextToken") or ""
    found = _store().list(current_principal().team_id)
    return id_page(found, lambda r: r.secret_id, secret_body, limit, after)


@blueprint.post("/secrets")
async def create_secret() -> Response:
    data = await v.request_object(required=True)
    name = data.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ApiError(400, "'name' must be 1-128 of a-z A-Z 0-9 _ -")
    if name.lower().startswith(SECRET_ID_PREFIX):
        raise ApiError(400, f"secret names may not start with {SECRET_ID_PREFIX!r} (secret ids do)")
    value, metadata = _value(data), _metadata(data) or {}
    try:
        record = _store().create(current_principal().team_id, name, value, metadata)
    except SecretNameTaken as exc:
        raise ApiError(409, str(exc)) from exc
    return json_response(secret_body(record), status=201)


@blueprint.get("/secrets/<secret_id>")
async def get_secret(secret_id: str) -> Response:
    record = _store().get(current_principal().team_id, secret_id)
    if record is None:
        raise _not_found(secret_id)
    return json_response(secret_body(record))


@blueprint.post("/secrets/<secret_id>")
async def update_secret(secret_id: str) -> Response:
    data = await v.request_object(required=True)
    value, metadata = _value(data), _metadata(data)
    record = _store().update(current_principal().team_id, secret_id, value, metadata)
    if record is None:
        raise _not_found(secret_id)
    return json_response(secret_body(record))


@blueprint.delete("/secrets/<secret_id>")
async def delete_secret(secret_id: str) -> Response:
    if not _store().delete(current_principal().team_id, secret_id):
        raise _not_found(secret_id)
    return no_content()


def refuse_placeholders(data: dict[str, Any]) -> None:
    """A create body naming a secret (`${e2b.secrets.NAME}`) anywhere but in a rule's header
    values (`network.rules[host][i].transform.headers`): refused, with the reason."""
    rest = copy.deepcopy(data)
    network = rest.get("network")
    if isinstance(network, dict):
        network.pop("rules", None)
    if PLACEHOLDER in json.dumps(rest):
        raise ApiError(
            400,
            "secret placeholders (${e2b.secrets.NAME}) are resolved only in network.rules header "
            "values, by the egress proxy that rewrites the sandbox's outgoing HTTP requests; "
            "anywhere else the secret's value would sit inside the sandbox",
        )


def check_secret_references(names: Iterable[str]) -> None:
    """Every secret a policy's rules name exists in the caller's team; else a 400 naming it."""
    names = sorted(names)
    if not names:
        return
    store, team_id = _store(), current_principal().team_id
    missing = [name for name in names if store.value(team_id, name) is None]
    if missing:
        raise ApiError(400, f"network.rules name secrets that do not exist: {', '.join(missing)}")
