"""The dashboard's boundaries, attacked over real HTTP against a real `cube serve` (fake guests):
no session, a forged or altered session, a cross-site POST, another team's things.

The browser tests (test_dashboard_browser.py) drive the same pages in Chromium.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest
from dashboard_session import signed_in

from appliance.dashboard.session import COOKIE_NAME, SESSION_LIFETIME_S, Sessions

if TYPE_CHECKING:
    from conftest import ServiceHarness


def create_sandbox(service: ServiceHarness, key: str, metadata: dict[str, str] | None = None) -> str:
    response = httpx.post(
        f"{service.url}/sandboxes",
        json={"templateID": "ci", "metadata": metadata or {}},
        headers={"X-API-KEY": key},
        timeout=60,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["sandboxID"])


def is_alive(service: ServiceHarness, key: str, sandbox_id: str) -> bool:
    response = httpx.get(f"{service.url}/sandboxes/{sandbox_id}", headers={"X-API-KEY": key})
    return response.status_code == 200


@pytest.fixture
def admin(service: ServiceHarness) -> Iterator[httpx.Client]:
    with signed_in(service.url, service.admin_token) as client:
        yield client


def test_without_a_session_nothing_is_served(service: ServiceHarness) -> None:
    with httpx.Client(base_url=service.url, trust_env=False) as client:
        assert client.get("/dashboard/api/sandboxes").status_code == 401
        assert client.get("/dashboard/api/keys").status_code == 401
        page = client.get("/dashboard/sandboxes")
        assert page.status_code == 303 and page.headers["location"] == "/dashboard/login"
        refused = client.post("/dashboard/api/keys", json={"name": "x"}, headers={"X-CSRF-Token": "x"})
        assert refused.status_code == 401
        assert refused.json()["code"] == 401
        # An API key header is not a dashboard session.
        key_only = client.get("/dashboard/api/sandboxes", headers={"X-API-KEY": service.admin_token})
        assert key_only.status_code == 401


def test_a_wrong_credential_gets_no_session(service: ServiceHarness) -> None:
    with httpx.Client(base_url=service.url, trust_env=False) as client:
        response = client.post("/dashboard/login", data={"credential": "cubeadmin_nope"})
        assert response.status_code == 401
        assert COOKIE_NAME not in response.cookies
        assert client.get("/dashboard/api/sandboxes").status_code == 401


def test_the_session_cookie_is_httponly_strict_and_secure_under_tls(service: ServiceHarness) -> None:
    for url, secure in ((service.url, False), (service.tls_url, True)):
        with httpx.Client(base_url=url, trust_env=False, verify=False) as client:
            response = client.post("/dashboard/login", data={"credential": service.admin_token})
            assert response.status_code == 303
            flags = [f.strip().lower() for f in response.headers["set-cookie"].split(";")]
            assert flags[0].startswith(COOKIE_NAME + "=")
            assert "httponly" in flags
            assert "samesite=strict" in flags
            assert "path=/dashboard" in flags
            assert ("secure" in flags) is secure
            assert service.admin_token not in response.headers["set-cookie"]


def test_pages_forbid_inline_script_and_foreign_origins(admin: httpx.Client) -> None:
    for path in (
        "/dashboard/",
        "/dashboard/login",
        "/dashboard/static/dashboard.js",
        "/dashboard/api/overview",
    ):
        response = admin.get(path)
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy
        assert "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"
    reflected = admin.get('/dashboard/sandboxes/"><img src=x onerror=alert(1)>')  # an id from the URL
    assert reflected.status_code == 200
    assert "<img" not in reflected.text and "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in reflected.text
    page = admin.get("/dashboard/sandboxes").text
    assert "<script>" not in page and " on" + "click=" not in page
    assert "http://" not in page and "https://" not in page  # nothing from another origin


def test_a_forged_cross_site_post_is_refused(
    service: ServiceHarness, admin: httpx.Client, api_key: str
) -> None:
    sandbox_id = create_sandbox(service, api_key)
    kill = f"/dashboard/api/sandboxes/{sandbox_id}/kill"
    token = {"X-CSRF-Token": admin.csrf}  # type: ignore[attr-defined]
    attacks = [
        {**token, "Origin": "https://evil.example"},  # another site's form or fetch, even with a token
        {**token, "Sec-Fetch-Site": "cross-site"},
        {**token, "Sec-Fetch-Site": "same-site"},  # a sibling subdomain (a sandbox's host) is not us
        {"X-CSRF-Token": "forged"},
        {},  # no token at all: what a cross-site form sends
    ]
    for headers in attacks:
        response = admin.post(kill, headers=headers)
        assert response.status_code == 403, (headers, response.text)
        assert is_alive(service, api_key, sandbox_id), headers
    # A cross-site sign-in (login CSRF) is refused too.
    evil_login = httpx.post(
        f"{service.url}/dashboard/login",
        data={"credential": service.admin_token},
        headers={"Origin": "https://evil.example"},
    )
    assert evil_login.status_code == 403
    same_origin = admin.post(kill, headers={**token, "Origin": service.url, "Sec-Fetch-Site": "same-origin"})
    assert same_origin.status_code == 204, same_origin.text
    assert not is_alive(service, api_key, sandbox_id)


def test_an_altered_or_expired_session_is_no_session(service: ServiceHarness, admin: httpx.Client) -> None:
    api_key = service.key("someone")
    with signed_in(service.url, api_key) as user:
        cookie = user.cookies[COOKIE_NAME]
    payload, signature = cookie.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["who"] = "admin:" + admin.cookies[COOKIE_NAME]  # anything but what was signed
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=") + "." + signature
    with httpx.Client(base_url=service.url, trust_env=False, cookies={COOKIE_NAME: forged}) as client:
        assert client.get("/dashboard/api/keys").status_code == 401
    sessions = Sessions(b"k" * 32, service.running.services.auth.keys, service.admin_token)  # type: ignore[union-attr]
    value = sessions.sign_in(api_key, now=1000.0)
    assert value is not None
    assert sessions.check(value, now=1000.0 + SESSION_LIFETIME_S - 1) is not None
    assert sessions.check(value, now=1000.0 + SESSION_LIFETIME_S + 1) is None


def test_a_revoked_key_ends_its_sessions(service: ServiceHarness, admin: httpx.Client) -> None:
    api_key = service.key("leaving")
    with signed_in(service.url, api_key) as user:
        assert user.get("/dashboard/api/sandboxes").status_code == 200
        key_id = next(k["id"] for k in admin.get("/dashboard/api/keys").json() if k["name"] == "leaving")
        revoked = admin.post(f"/dashboard/api/keys/{key_id}/revoke", headers={"X-CSRF-Token": admin.csrf})  # type: ignore[attr-defined]
        assert revoked.status_code == 204
        assert user.get("/dashboard/api/sandboxes").status_code == 401


def test_a_key_sees_and_changes_only_its_own_teams_things(
    service: ServiceHarness, admin: httpx.Client
) -> None:
    key_a, key_b = service.key("team-a"), service.key("team-b")
    theirs = create_sandbox(service, key_a)
    with signed_in(service.url, key_b) as b:
        csrf = {"X-CSRF-Token": b.csrf}  # type: ignore[attr-defined]
        assert theirs not in [s["sandboxID"] for s in b.get("/dashboard/api/sandboxes").json()]
        assert b.get(f"/dashboard/api/sandboxes/{theirs}").status_code == 404
        assert b.post(f"/dashboard/api/sandboxes/{theirs}/kill", headers=csrf).status_code == 404
        assert b.get(f"/dashboard/api/events?sandbox={theirs}").status_code == 404
        assert all(e["sandboxID"] != theirs for e in b.get("/dashboard/api/events").json())
        keys = b.get("/dashboard/api/keys").json()
        assert [k["name"] for k in keys] == ["team-b"]
        # Keys are the admin's to make and revoke, as on the API: a key cannot mint one that
        # would outlive its own revocation, nor revoke a teammate's.
        own_id, key_a_id = (
            keys[0]["id"],
            next(k["id"] for k in admin.get("/dashboard/api/keys").json() if k["name"] == "team-a"),
        )
        for key_id in (own_id, key_a_id):
            assert b.post(f"/dashboard/api/keys/{key_id}/revoke", headers=csrf).status_code == 403
        assert b.post("/dashboard/api/keys", json={"name": "b-second"}, headers=csrf).status_code == 403
        assert [k["name"] for k in b.get("/dashboard/api/keys").json()] == ["team-b"]
        assert b.get("/metrics").status_code == 401  # the session is not the admin token
    assert is_alive(service, key_a, theirs)
    assert theirs in [s["sandboxID"] for s in admin.get("/dashboard/api/sandboxes").json()]


def test_metrics_are_the_admins_in_prometheus_text(service: ServiceHarness, api_key: str) -> None:
    create_sandbox(service, api_key)
    assert httpx.get(f"{service.url}/metrics").status_code == 401
    assert httpx.get(f"{service.url}/metrics", headers={"X-API-KEY": api_key}).status_code == 403
    response = httpx.get(f"{service.url}/metrics", headers={"Authorization": f"Bearer {service.admin_token}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = response.text.splitlines()
    assert 'cube_sandboxes{state="running"} 1' in lines
    assert "cube_sandbox_creates_last_hour 1" in lines
    assert any(
        line.startswith('cube_pool_guests{template="code-interpreter",kind="target"}') for line in lines
    )


def test_the_overview_counts_creates_and_their_latency(service: ServiceHarness, admin: httpx.Client) -> None:
    key = service.key("counted")
    for _ in range(2):
        create_sandbox(service, key)
    overview = admin.get("/dashboard/api/overview").json()
    assert overview["sandboxes"]["running"] == 2
    assert sum(p["creates"] for p in overview["creates"]) == 2
    assert overview["createsLastMinute"] == 2
    assert all(0 < p["p50Ms"] <= p["p95Ms"] for p in overview["creates"])
    assert overview["host"]["memTotal"] > 0
    assert "code-interpreter" in overview["pools"]


def test_a_build_the_api_refuses_is_refused_alike(service: ServiceHarness) -> None:
    with signed_in(service.url, service.key("builder")) as user:
        csrf = {"X-CSRF-Token": user.csrf}  # type: ignore[attr-defined]
        host_path = user.post("/dashboard/api/builds", json={"image": "oci:/etc:v1"}, headers=csrf)
        assert host_path.status_code == 403 and "host path" in host_path.json()["message"]
        taken = user.post("/dashboard/api/builds", json={"image": "x/y:z", "alias": "ci"}, headers=csrf)
        assert taken.status_code == 409, taken.text
        assert user.get("/dashboard/api/builds/job-nope").status_code == 404
