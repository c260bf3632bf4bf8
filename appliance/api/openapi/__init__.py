"""The OpenAPI 3 description of the control plane, served at `/openapi.json`.

It names every route the app serves (tests/api/test_openapi.py checks that it does):
the E2B routes the SDKs use (PROTOCOL.md §2), the template builds, and `/cube/*`.

The document is written in parts: `common` (schema pieces, `operation`), `schemas` (the
component schemas), `sandbox_paths` and `template_paths` (the routes).
"""

from __future__ import annotations

from typing import Any

from appliance import __version__
from appliance.api.openapi import sandbox_paths, template_paths
from appliance.api.openapi.schemas import SCHEMAS

PATHS = {**sandbox_paths.PATHS, **template_paths.PATHS}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "Cube appliance control plane (E2B-compatible)", "version": __version__},
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-KEY"},
                "VolumeToken": {"type": "http", "scheme": "bearer"},
            },
        },
        "security": [{"ApiKey": []}],
        "paths": PATHS,
    }
