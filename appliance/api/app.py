"""CubeAPI: the E2B control plane (PROTOCOL.md §2) as a Quart-Trio app, plus `/cube/*` admin calls.

The routes live in blueprints, one module each, and each blueprint declares who may
call it (`auth.Access`): health and the OpenAPI document are public; sandboxes and
templates need an API key and reach only the caller's team's things; `/cube/*`
needs the admin token. Routes reach the services through `services()`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from quart import Blueprint, Response
from quart_trio import QuartTrio
from quart_trio.wrappers.request import TrioBody, TrioRequest

from appliance.api import (
    admin,
    health,
    sandbox_info,
    sandboxes,
    sdk_template_names,
    sdk_templates,
    secrets,
    snapshots,
    templates,
    volumes,
)
from appliance.api.auth import AUTHENTICATOR, access_of
from appliance.api.errors import error_response, install_error_handlers
from appliance.api.services import SERVICES, Services
from appliance.cubelet.cubelet import SandboxNotFound
from appliance.templates.api import CONTEXT_UPLOAD_PATH

MAX_BODY_BYTES = 1024 * 1024
# Quart reads a request body as fast as it arrives, whoever consumes it: its limit is on what
# waits in memory. A build context (and an E2B SDK template's files) is streamed to disk, under
# its own cap on the total (build_context_max_size, templates/limits.py); this much may wait
# while a write is under way.
UPLOAD_BUFFER_BYTES = 64 * 1024 * 1024
BLUEPRINTS = (
    health.blueprint,
    sandboxes.blueprint,
    sandbox_info.blueprint,
    templates.blueprint,
    snapshots.blueprint,
    secrets.blueprint,
    volumes.blueprint,
    volumes.content,
    sdk_templates.blueprint,
    sdk_templates.uploads_blueprint,
    sdk_template_names.blueprint,
    admin.blueprint,
)


class _UploadBody(TrioBody):
    def __init__(self, expected_content_length: int | None, max_content_length: int | None) -> None:
        super().__init__(None, UPLOAD_BUFFER_BYTES)


class CubeRequest(TrioRequest):
    """Request bodies of at most MAX_BODY_BYTES, but for the build context uploads (`_UploadBody`)."""

    def __init__(self, method: str, scheme: str, path: str, *args: Any, **kwargs: Any) -> None:
        if path == CONTEXT_UPLOAD_PATH or path.startswith(sdk_templates.UPLOAD_PREFIX):
            self.body_class = _UploadBody
        super().__init__(method, scheme, path, *args, **kwargs)


def build_app(services: Services, blueprints: Iterable[Blueprint] = ()) -> QuartTrio:
    """The control-plane app; extra `blueprints` (template builds) declare their access (`auth.protect`)."""
    app = QuartTrio("appliance.api")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.request_class = CubeRequest
    app.extensions[SERVICES] = services
    app.extensions[AUTHENTICATOR] = services.auth
    install_error_handlers(app)

    @app.errorhandler(SandboxNotFound)
    async def _sandbox_gone(error: SandboxNotFound) -> Response:
        return error_response(404, str(error))

    for blueprint in (*BLUEPRINTS, *blueprints):
        if access_of(blueprint) is None:
            raise ValueError(f"blueprint {blueprint.name} does not declare who may call it (auth.protect)")
        app.register_blueprint(blueprint)
    return app
