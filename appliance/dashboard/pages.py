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


@blueprint.get("/")
async def overview() -> str:
    return await page("overview")


@blueprint.get("/sandboxes")
async def sandboxes_page() -> str:
    return await page("sandboxes")


@blueprint.get("/sandboxes/<sandbox_id>")
async def sandbox_page(sandbox_id: str) -> str:
    return await page("sandbox", sandbox_id)


@blueprint.get("/templates")
async def templates_page() -> str:
    return await page("templates")


@blueprint.get("/templates/<template_id>")
async def template_page(template_id: str) -> str:
    return await page("template", template_id)


@blueprint.get("/builds/<job_id>")
async def build_page(job_id: str) -> str:
    return await page("build", job_id)


@blueprint.get("/keys")
async def keys_page() -> str:
    return await page("keys")


@blueprint.get("/events")
async def events_page() -> str:
    return await page("events")
