"""CubeAPI: the E2B control plane (PROTOCOL.md §2) as a Quart-Trio app, plus `/cube/*` admin calls.

The routes live in blueprints, one module each, and each blueprint declares who may
call it (`auth.Access`): health and the OpenAPI document are public; sandboxes and
templates need an API key and reach only the caller's team's things; `/cube/*`
needs the admin token. Routes reach the services through `services()`.
"""

from __future__ import annotations

from collections.abc import Iterable

from quart import Blueprint, Response
from quart_trio import QuartTrio

from appliance.api import admin, health, sandbox_info, sandboxes, templates
from appliance.api.auth import AUTHENTICATOR, access_of
from appliance.api.errors import error_response, install_error_handlers
from appliance.api.services import SERVICES, Services
from appliance.cubelet.cubelet import SandboxNotFound

MAX_BODY_BYTES = 1024 * 1024
BLUEPRINTS = (
    health.blueprint,
    sandboxes.blueprint,
    sandbox_info.blueprint,
    templates.blueprint,
    admin.blueprint,
)


def build_app(services: Services, blueprints: Iterable[Blueprint] = ()) -> QuartTrio:
    """The control-plane app; extra `blueprints` (template builds) declare their access (`auth.protect`)."""
    app = QuartTrio("appliance.api")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
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
