"""Every route the service's app serves, as (METHOD, rule): what the tenancy table and the OpenAPI
document must both cover."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from appliance.api.app import build_app
from appliance.api.auth import Access, protect
from appliance.api.services import Services
from appliance.templates.api import create_blueprint as create_build_blueprint


def app_routes() -> set[tuple[str, str]]:
    builds = protect(create_build_blueprint(cast(Any, None)), Access.KEY)  # as the service registers it
    app = build_app(cast(Services, SimpleNamespace(auth=None)), [builds])
    return {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }
