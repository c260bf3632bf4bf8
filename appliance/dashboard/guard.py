"""What every dashboard request passes: a session, a same-origin POST with the session's CSRF
token, and the response headers that keep a page from running anything but our own files.

The API keys' check (`auth.Access`) does not apply to the dashboard: a browser has no key
header, it has the session cookie (session.py). A request without a valid session gets a
401 (JSON calls) or is sent to the sign-in page (pages); the principal it signed in as is
put where the API's own handlers read it (`g.principal`), so tenancy is theirs.

In a cluster another node asks for a few of this node's own figures (the overview, events, a
sandbox it runs: `NODE_ENDPOINTS`, GETs only) for its signed-in caller: with the cluster token
and that caller's team (cluster/forwarding.py), as the API's forwarded calls come; no session.
"""

from __future__ import annotations

from quart import Response, current_app, g, request

from appliance.api.errors import ApiError
from appliance.api.services import services
from appliance.cluster.forwarding import forwarded_principal
from appliance.dashboard.session import COOKIE_NAME, COOKIE_PATH, Session, Sessions, session_key

SESSIONS = "cube.dashboard.sessions"  # its key in app.extensions
API_PREFIX = "/dashboard/api/"
# No inline script or style, nothing from another origin, no framing, forms post only here.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not no-referrer: under it Chromium sends `Origin: null` on our own form posts.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}
OPEN_ENDPOINTS = ("dashboard.static", "dashboard.login_page", "dashboard.login")
# What another node of the cluster may ask for its caller (data.py answers them with this node's own).
NODE_ENDPOINTS = ("dashboard.overview_data", "dashboard.events", "dashboard.sandbox")
FROM_NODE = "dashboard_from_node"  # g's flag: the request came from another node for its caller


def sessions() -> Sessions:
    found = current_app.extensions.get(SESSIONS)
    if found is None:
        s = services()
        found = Sessions(session_key(s.config.state_dir), s.auth.keys, s.auth.admin_token)
        current_app.extensions[SESSIONS] = found
    assert isinstance(found, Sessions)
    return found


def current_session() -> Session | None:
    cookie = request.cookies.get(COOKIE_NAME, "")
    return sessions().check(cookie) if cookie else None


def check_same_origin() -> None:
    """A browser names where a request comes from; a POST from any other site is refused.

    Browsers send `Origin` on every POST and `Sec-Fetch-Site` with it; a client that sends
    neither is not a browser another site can drive (it still needs the CSRF token).
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site != "same-origin":
        raise ApiError(403, f"cross-site request refused (Sec-Fetch-Site: {site})")
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise ApiError(403, "cross-site request refused (Origin does not match this dashboard)")


async def presented_csrf() -> str:
    """The page's script sends the token as a header; the sign-out form as a field."""
    header = request.headers.get("X-CSRF-Token")
    if header is not None:
        return header
    if request.mimetype == "application/x-www-form-urlencoded":
        return str((await request.form).get("csrf_token", ""))
    return ""


async def check_request() -> Response | None:
    """The blueprint's before_request: refuses or redirects what may not go on."""
    if request.method not in ("GET", "HEAD"):
        check_same_origin()
    if request.endpoint in OPEN_ENDPOINTS:
        return None
    if request.method in ("GET", "HEAD") and request.endpoint in NODE_ENDPOINTS:
        check = services().auth.cluster_token_check
        headers = {name.lower(): value for name, value in request.headers.items()}
        forwarded = None if check is None else forwarded_principal(headers, check)
        if forwarded is not None:
            g.principal = forwarded
            setattr(g, FROM_NODE, True)
            return None
    session = current_session()
    if session is None:
        if request.path.startswith(API_PREFIX) or request.method not in ("GET", "HEAD"):
            raise ApiError(401, "sign in to the dashboard first")
        return see_other("/dashboard/login")
    if request.method not in ("GET", "HEAD") and not sessions().csrf_ok(session, await presented_csrf()):
        raise ApiError(403, "missing or wrong CSRF token")
    g.principal = session.principal
    g.dashboard_session = session
    return None


def from_other_node() -> bool:
    """The request came from another node of the cluster for its caller (answered with this
    node's own figures, never asked of the other nodes again)."""
    return bool(g.get(FROM_NODE, False))


def see_other(location: str) -> Response:
    return Response("", status=303, headers={"Location": location})


def set_session_cookie(response: Response, value: str, max_age: int) -> None:
    response.set_cookie(
        COOKIE_NAME,
        value,
        max_age=max_age,
        path=COOKIE_PATH,
        httponly=True,
        secure=request.scheme == "https",
        samesite="Strict",
    )


async def add_security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response
