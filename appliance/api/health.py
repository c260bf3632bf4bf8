"""Public routes: `/health` and `/openapi.json` (what the API serves, for clients and the fuzz test)."""

from __future__ import annotations

import json
import time
from functools import cache
from pathlib import Path

from quart import Response

from appliance import __version__
from appliance.api.auth import Access, guarded
from appliance.api.bodies import json_response
from appliance.api.services import services

OPENAPI_FILE = Path(__file__).with_name("openapi.json")

blueprint = guarded("health", __name__, Access.PUBLIC)


@cache
def openapi_document() -> dict[str, object]:
    document: dict[str, object] = json.loads(OPENAPI_FILE.read_text())
    document["info"] = {**document["info"], "version": __version__}  # type: ignore[dict-item]
    return document


@blueprint.get("/health")
async def health() -> Response:
    started_at = services().started_at
    return json_response(
        {"status": "ok", "version": __version__, "uptimeSeconds": int(time.time() - started_at)}
    )


@blueprint.get("/openapi.json")
async def openapi() -> Response:
    return json_response(openapi_document())
