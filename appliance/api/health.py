"""Public routes: `/health` and `/openapi.json` (what the API serves, for clients and the fuzz test)."""

from __future__ import annotations

import time

from quart import Response

from appliance import __version__
from appliance.api.auth import Access, guarded
from appliance.api.bodies import json_response
from appliance.api.openapi import openapi_document
from appliance.api.services import services

blueprint = guarded("health", __name__, Access.PUBLIC)


@blueprint.get("/health")
async def health() -> Response:
    uptime_s = int(time.time() - services().started_at)
    return json_response({"status": "ok", "version": __version__, "uptimeSeconds": uptime_s})


@blueprint.get("/openapi.json")
async def openapi() -> Response:
    return json_response(openapi_document())
