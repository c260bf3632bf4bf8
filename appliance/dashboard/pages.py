"""The dashboard's blueprint: sign-in, sign-out and the page shells its script fills in.

Pages are one HTML shell each (templates/dashboard/page.html) naming the page; the script
(static/dashboard.js) fetches `/dashboard/api/...` (data.py) and builds the page with DOM
calls that set text, never markup, so nothing a sandbox's owner wrote is ever parsed as HTML.
"""

from __future__ import annotations

from quart import Blueprint, Response, g, render_template, request

from appliance.api.auth import Access, protect
from appliance.dashboard import guard
from appliance.dashboard.session import SESSION_LIFETIME_S

# Access.PUBLIC as far as API keys go: every route but sign-in and the static files needs the
# dashboard's session instead (guard.check_request).
blueprint = protect(
    Blueprint(
        "dashboard",
        __name__,
        url_prefix="/dashboard",
        static_folder="static",
        static_url_path="/static",
        template_folder="templates",
    ),
    Access.PUBLIC,
)
blueprint.before_request(guard.check_request)
blueprint.after_request(guard.add_security_headers)

PAGES = {
    "overview": "Overview",
    "sandboxes": "Sandboxes",
    "sandbox": "Sandbox",
    "templates": "Templates",
    "template": "Template",
    "build": "Template build",
    "keys": "API keys",
    "events": "Events",
}


async def page(name: str, item_id: str = "") -> str:
    session = g.dashboard_session
    return await render_template(
        "dashboard/page.html",
        page=name,
        title=PAGES[name] + (f" {item_id}" if item_id else ""),
        item_id=item_id,
        csrf_token=guard.sessions().csrf_token(session),
        who=f"{session.principal.name} (team {session.principal.team_id})",
        is_admin=session.principal.is_admin,
    )


@blueprint.get("/login")
async def login_page() -> str:
    return await render_template("dashboard/login.html", error=None)


@blueprint.post("/login")
async def login() -> Response | tuple[str, int]:
    form = await request.form
    cookie = guard.sessions().sign_in(str(form.get("credential", "")).strip())
    if cookie is None:
        return await render_template("dashboard/login.html", error="That is not a valid token or key."), 401
    response = guard.see_other("/dashboard/")
    guard.set_session_cookie(response, cookie, SESSION_LIFETIME_S)
    return response


@blueprint.post("/logout")
async def logout() -> Response:
    response = guard.see_other("/dashboard/login")
    guard.set_session_cookie(response, "", 0)
    return response


# Each page's rule and its name in PAGES; an id in the rule goes to the page.
PAGE_RULES = (
    ("/", "overview"),
    ("/sandboxes", "sandboxes"),
    ("/sandboxes/<item_id>", "sandbox"),
    ("/templates", "templates"),
    ("/templates/<item_id>", "template"),
    ("/builds/<item_id>", "build"),
    ("/keys", "keys"),
    ("/events", "events"),
)


def _add_page(rule: str, name: str) -> None:
    async def view(item_id: str = "") -> str:
        return await page(name, item_id)

    blueprint.add_url_rule(rule, f"{name}_page", view, methods=["GET"])


for _rule, _name in PAGE_RULES:
    _add_page(_rule, _name)
