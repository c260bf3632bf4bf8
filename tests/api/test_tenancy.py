"""Tenancy, attacked: team B holds an ordinary API key and goes after team A's sandbox, template
and build through every route the service serves.

The route table below must name every route of the app (`test_every_route_has_a_tenancy_rule`):
a new route without a rule here fails the suite.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from api_routes import app_routes

from appliance.master.store import MIGRATIONS, SqliteStore, hash_api_key, migrate, schema_version
from appliance.records import SandboxQuery, SandboxRecord, TemplateManifest

if TYPE_CHECKING:
    from conftest import FakeRuntime, ServiceHarness


@dataclass
class World:
    """Two teams on one service: A owns a sandbox, a template and a build job; B attacks them."""

    service: ServiceHarness
    a: httpx.Client
    b: httpx.Client
    admin: httpx.Client
    team_a: str
    sandbox: str  # A's
    envd_token: str  # A's sandbox's
    template: str  # A's (id); alias `team-a-tpl`
    job: str  # A's build job
    b_sandbox: str
    b_envd_token: str


def make_key(service: ServiceHarness, name: str, team: str | None = None) -> dict[str, Any]:
    body = {"name": name} if team is None else {"name": name, "team": team}
    response = httpx.post(f"{service.url}/cube/keys", json=body, headers={"X-API-KEY": service.admin_token})
    assert response.status_code == 201, response.text
    return dict(response.json())


@pytest.fixture
def world(service: ServiceHarness) -> Iterator[World]:
    key_a, key_b = make_key(service, "alice"), make_key(service, "bob")
    assert key_a["team"] != key_b["team"]
    manifest = TemplateManifest(
        template_id="tpl-teama",
        directory=service.config.templates_dir / "tpl-teama",
        aliases=("team-a-tpl",),
        memory_mb=256,
        owner=key_a["team"],
    )
    manifest.save()
    with (
        httpx.Client(base_url=service.url, headers={"X-API-KEY": key_a["key"]}) as a,
        httpx.Client(base_url=service.url, headers={"X-API-KEY": key_b["key"]}) as b,
        httpx.Client(base_url=service.url, headers={"X-API-KEY": service.admin_token}) as admin,
    ):
        created = a.post("/v2/sandboxes", json={"templateID": "team-a-tpl", "timeout": 600})
        assert created.status_code == 201, created.text
        b_created = b.post("/v2/sandboxes", json={})
        assert b_created.status_code == 201, b_created.text
        # A build that fails at once (nothing listens on loopback port 1): a job of A's.
        job = a.post("/templates/builds", json={"image": "127.0.0.1:1/nothing/here:v1"})
        assert job.status_code == 202, job.text
        yield World(
            service,
            a,
            b,
            admin,
            key_a["team"],
            created.json()["sandboxID"],
            created.json()["envdAccessToken"],
            "tpl-teama",
            job.json()["job_id"],
            b_created.json()["sandboxID"],
            b_created.json()["envdAccessToken"],
        )


def is_e2b_error(response: httpx.Response, status: int) -> bool:
    body = response.json()
    return response.status_code == status and body["code"] == status and isinstance(body["message"], str)


def same_as_missing(world: World, method: str, path: str, **kwargs: Any) -> None:
    """B's request for A's sandbox is answered exactly like one for a sandbox that never existed."""
    theirs = world.b.request(method, path.format(id=world.sandbox), **kwargs)
    missing = world.b.request(method, path.format(id="nosuchsandbox00000000"), **kwargs)
    assert is_e2b_error(theirs, 404), (path, theirs.text)
    assert theirs.json()["message"].replace(world.sandbox, "X") == missing.json()["message"].replace(
        "nosuchsandbox00000000", "X"
    )


def b_gets(status: int) -> Callable[[World, str, str], None]:
    def check(world: World, method: str, path: str) -> None:
        response = world.b.request(method, path)
        assert is_e2b_error(response, status), (method, path, response.text)

    return check


def listing_hides_a(world: World, method: str, path: str) -> None:
    response = world.b.request(method, path)
    assert response.status_code == 200, response.text
    for hidden in (world.sandbox, world.template, world.job):
        assert hidden not in response.text, (path, response.text)


def create_from_a_template(world: World, method: str, path: str) -> None:
    for name in (world.template, "team-a-tpl"):
        response = world.b.post(path, json={"templateID": name})
        assert is_e2b_error(response, 404) and "not found" in response.json()["message"], response.text


def publish_over_a_name(world: World, method: str, path: str) -> None:
    """Poisoning: B may not publish under A's alias nor the built-in template's names."""
    for alias in ("team-a-tpl", "code-interpreter", "code-interpreter-v1", "base", "ci"):
        if path.endswith("dockerfile"):
            response = world.b.post(
                path, params={"options": f'{{"alias": "{alias}", "dockerfile": "FROM x"}}'}
            )
        else:
            response = world.b.post(path, json={"image": "127.0.0.1:1/x/y:z", "alias": alias})
        assert is_e2b_error(response, 409), (alias, response.text)
        assert response.json()["error_code"] == "name_taken"


def read_a_template(world: World, method: str, path: str) -> None:
    for name in (world.template, "team-a-tpl"):
        b_gets(404)(world, method, f"/templates/{name}")


def delete_templates(world: World, method: str, path: str) -> None:
    b_gets(404)(world, method, f"/templates/{world.template}")
    b_gets(403)(world, method, "/templates/code-interpreter")  # built in: read-only but for the admin


Check = Callable[[World, str, str], None]
S = "/sandboxes/{id}"


def on_a_sandbox(path: str, **kwargs: Any) -> Check:
    return lambda world, method, _: same_as_missing(world, method, path, **kwargs)


def a_secret(world: World) -> str:
    created = world.a.post("/secrets", json={"name": "a-token", "value": "a-secret-value"})
    assert created.status_code in (201, 409), created.text
    return next(str(s["secretID"]) for s in world.a.get("/secrets").json() if s["name"] == "a-token")


def secrets_hidden(world: World, method: str, path: str) -> None:
    secret_id = a_secret(world)
    listing_hides_a(world, method, path)
    assert secret_id not in world.b.get(path).text and "a-token" not in world.b.get(path).text


def on_a_secret(world: World, method: str, path: str) -> None:
    """A's secret, by id and by name, is as missing to B as one that never existed."""
    secret_id = a_secret(world)
    for name in (secret_id, "a-token"):
        body = {"value": "overwritten-by-b"} if method == "POST" else None
        response = world.b.request(method, f"/secrets/{name}", json=body)
        assert is_e2b_error(response, 404) and response.json()["message"] == f"secret {name} not found"
    assert world.a.get(f"/secrets/{secret_id}").json()["currentVersion"] == 1


def a_volume(world: World) -> dict[str, Any]:
    """A's volume (made once), holding /kept.txt."""
    found = [v for v in world.a.get("/volumes").json() if v["name"] == "a-vol"]
    if found:
        return dict(world.a.get(f"/volumes/{found[0]['volumeID']}").json())
    created = world.a.post("/volumes", json={"name": "a-vol"})
    assert created.status_code == 201, created.text
    volume = dict(created.json())
    written = world.a.put(
        f"/volumecontent/{volume['volumeID']}/file",
        params={"path": "/kept.txt"},
        content=b"a's data",
        headers={"Authorization": f"Bearer {volume['token']}"},
    )
    assert written.status_code == 201, written.text
    return volume


def volumes_hidden(world: World, method: str, path: str) -> None:
    volume = a_volume(world)
    listing_hides_a(world, method, path)
    assert volume["volumeID"] not in world.b.get(path).text


def on_a_volume(world: World, method: str, path: str) -> None:
    volume = a_volume(world)
    theirs = world.b.request(method, f"/volumes/{volume['volumeID']}")
    missing = world.b.request(method, "/volumes/vol-0000000000000000")
    assert is_e2b_error(theirs, 404) and is_e2b_error(missing, 404)
    assert theirs.json()["message"].replace(volume["volumeID"], "X") == missing.json()["message"].replace(
        "vol-0000000000000000", "X"
    )


def on_a_volumes_content(world: World, method: str, path: str) -> None:
    """B's own volume token, B's API key, or none, on A's volume: 404, as for no such volume."""
    volume = a_volume(world)
    b_volume = world.b.post(
        "/volumes", json={"name": f"b-vol-{method.lower()}-{path.rpartition('/')[2]}"}
    ).json()
    url = path.replace("<volume_id>", volume["volumeID"])
    for headers in ({"Authorization": f"Bearer {b_volume['token']}"}, {}, {"Authorization": "Bearer x"}):
        response = world.b.request(
            method, url, params={"path": "/kept.txt"}, headers=headers, json={} if method == "PATCH" else None
        )
        assert is_e2b_error(response, 404), (method, url, response.text)
    kept = world.a.get(
        f"/volumecontent/{volume['volumeID']}/file",
        params={"path": "/kept.txt"},
        headers={"Authorization": f"Bearer {volume['token']}"},
    )
    assert kept.status_code == 200 and kept.content == b"a's data"


# (method, rule) -> what B gets when it goes for A's things through it.
ROUTES: dict[tuple[str, str], Check] = {
    ("GET", "/health"): lambda world, method, path: None,  # public, names nothing
    ("GET", "/openapi.json"): lambda world, method, path: None,
    ("POST", "/v2/sandboxes"): create_from_a_template,
    ("POST", "/sandboxes"): create_from_a_template,
    ("POST", "/v2/sandboxes/<sandbox_id>/connect"): on_a_sandbox("/v2" + S + "/connect", json={}),
    ("POST", "/sandboxes/<sandbox_id>/connect"): on_a_sandbox(S + "/connect", json={}),
    ("POST", "/sandboxes/<sandbox_id>/resume"): on_a_sandbox(S + "/resume", json={}),
    ("DELETE", "/sandboxes/<sandbox_id>"): on_a_sandbox(S),
    ("POST", "/sandboxes/<sandbox_id>/timeout"): on_a_sandbox(S + "/timeout", json={"timeout": 1}),
    ("POST", "/sandboxes/<sandbox_id>/refreshes"): on_a_sandbox(S + "/refreshes", json={"duration": 5}),
    ("POST", "/sandboxes/<sandbox_id>/pause"): on_a_sandbox(S + "/pause", json={}),
    ("PUT", "/sandboxes/<sandbox_id>/network"): on_a_sandbox(S + "/network", json={"denyOut": ["0.0.0.0/0"]}),
    ("GET", "/sandboxes/<sandbox_id>"): on_a_sandbox(S),
    ("GET", "/v2/sandboxes"): listing_hides_a,
    ("GET", "/sandboxes"): listing_hides_a,
    ("GET", "/sandboxes/<sandbox_id>/metrics"): on_a_sandbox(S + "/metrics"),
    ("GET", "/sandboxes/metrics"): lambda world, method, _: listing_hides_a(
        world, method, f"/sandboxes/metrics?sandbox_ids={world.sandbox}"
    ),
    ("GET", "/sandboxes/<sandbox_id>/logs"): on_a_sandbox(S + "/logs"),
    ("GET", "/v2/sandboxes/<sandbox_id>/logs"): on_a_sandbox("/v2" + S + "/logs"),
    ("POST", "/sandboxes/<sandbox_id>/snapshots"): on_a_sandbox(S + "/snapshots", json={}),
    ("POST", "/sandboxes/<sandbox_id>/fork"): on_a_sandbox(S + "/fork", json={"count": 2}),
    ("GET", "/snapshots"): lambda world, method, _: listing_hides_a(
        world, method, f"/snapshots?sandboxID={world.sandbox}"
    ),
    ("GET", "/secrets"): secrets_hidden,
    ("POST", "/secrets"): lambda world, method, path: None,  # makes B's own secret; names nothing of A's
    ("GET", "/secrets/<secret_id>"): on_a_secret,
    ("POST", "/secrets/<secret_id>"): on_a_secret,
    ("DELETE", "/secrets/<secret_id>"): on_a_secret,
    ("GET", "/volumes"): volumes_hidden,
    ("POST", "/volumes"): lambda world, method, path: None,  # makes B's own volume; names nothing of A's
    ("GET", "/volumes/<volume_id>"): on_a_volume,
    ("DELETE", "/volumes/<volume_id>"): on_a_volume,
    ("GET", "/volumecontent/<volume_id>/path"): on_a_volumes_content,
    ("PATCH", "/volumecontent/<volume_id>/path"): on_a_volumes_content,
    ("DELETE", "/volumecontent/<volume_id>/path"): on_a_volumes_content,
    ("GET", "/volumecontent/<volume_id>/dir"): on_a_volumes_content,
    ("POST", "/volumecontent/<volume_id>/dir"): on_a_volumes_content,
    ("GET", "/volumecontent/<volume_id>/file"): on_a_volumes_content,
    ("PUT", "/volumecontent/<volume_id>/file"): on_a_volumes_content,
    ("GET", "/templates"): listing_hides_a,
    ("GET", "/templates/<template_id>"): read_a_template,
    ("DELETE", "/templates/<template_id>"): delete_templates,
    ("GET", "/cube/sandboxes"): b_gets(403),
    ("GET", "/cube/sandboxes/<sandbox_id>"): lambda world, method, _: b_gets(403)(
        world, method, f"/cube/sandboxes/{world.sandbox}"
    ),
    ("GET", "/cube/events"): b_gets(403),
    ("POST", "/cube/keys"): b_gets(403),
    ("GET", "/cube/keys"): b_gets(403),
    ("DELETE", "/cube/keys/<key_id>"): lambda world, method, _: b_gets(403)(world, method, "/cube/keys/x"),
    ("POST", "/templates/builds"): publish_over_a_name,
    ("POST", "/templates/builds/dockerfile"): publish_over_a_name,
    ("GET", "/templates/builds"): listing_hides_a,
    ("GET", "/templates/builds/<job_id>"): lambda world, method, _: b_gets(404)(
        world, method, f"/templates/builds/{world.job}"
    ),
    ("GET", "/templates/build-cache"): b_gets(403),
    ("POST", "/templates/build-cache/prune"): b_gets(403),
}


def test_every_route_has_a_tenancy_rule() -> None:
    assert app_routes() == set(ROUTES)


def test_another_team_reaches_nothing_of_a_team_through_any_route(world: World) -> None:
    end_at = world.a.get(f"/sandboxes/{world.sandbox}").json()["endAt"]
    for (method, rule), check in ROUTES.items():
        check(world, method, rule)
    # A's sandbox came through all of it unchanged: running, same deadline, same network.
    detail = world.a.get(f"/sandboxes/{world.sandbox}").json()
    assert detail["state"] == "running" and detail["endAt"] == end_at and detail["network"] == {}
    assert world.a.get(f"/templates/{world.template}").status_code == 200
    assert world.a.get(f"/templates/builds/{world.job}").status_code == 200
    assert world.admin.get(f"/templates/builds/{world.job}").status_code == 200  # the admin sees all
    assert [s["sandboxID"] for s in world.a.get("/v2/sandboxes").json()] == [world.sandbox]


def test_a_team_reaches_its_own_and_the_built_in_ones(world: World) -> None:
    assert world.a.get("/templates/code-interpreter").status_code == 200
    assert {t["templateID"] for t in world.a.get("/templates").json()} == {"code-interpreter", world.template}
    assert world.a.post(f"/sandboxes/{world.sandbox}/timeout", json={"timeout": 900}).status_code == 204
    assert world.a.get(f"/sandboxes/{world.sandbox}/metrics").status_code == 200
    assert world.a.get(f"/sandboxes/{world.sandbox}/logs").status_code == 200
    assert [j["job_id"] for j in world.a.get("/templates/builds").json()] == [world.job]
    # A key created into A's team shares A's sandboxes.
    key = make_key(world.service, "alice-ci", team=world.team_a)
    shared = httpx.get(f"{world.service.url}/sandboxes/{world.sandbox}", headers={"X-API-KEY": key["key"]})
    assert shared.status_code == 200
    assert world.admin.get("/cube/sandboxes").status_code == 200


def test_sandbox_traffic_needs_the_sandboxs_own_token_and_does_not_leak_it_exists(world: World) -> None:
    def routed(sandbox_id: str, token: str | None) -> httpx.Response:
        headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983"}
        if token is not None:
            headers["X-Access-Token"] = token
        return httpx.get(f"{world.service.url}/health", headers=headers)

    missing = routed("nosuchsandbox00000000", world.b_envd_token)
    assert missing.status_code == 502
    for token in (world.b_envd_token, None, ""):  # B's own sandbox's token, none, an empty one
        theirs = routed(world.sandbox, token)
        assert theirs.status_code == 502, theirs.text
        assert theirs.json()["message"].replace(world.sandbox, "X") == missing.json()["message"].replace(
            "nosuchsandbox00000000", "X"
        )
    assert routed(world.sandbox, world.envd_token).status_code == 204
    assert routed(world.b_sandbox, world.b_envd_token).status_code == 204


def test_idempotency_keys_are_per_team(world: World, fake_runtime: FakeRuntime) -> None:
    headers = {"Idempotency-Key": "same-key"}
    first = world.a.post("/v2/sandboxes", json={}, headers=headers)
    second = world.b.post("/v2/sandboxes", json={}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json()["sandboxID"] != second.json()["sandboxID"]
    assert "envdAccessToken" in second.json()
    assert second.json()["envdAccessToken"] != first.json()["envdAccessToken"]


def test_keys_cannot_join_the_system_team_or_a_team_that_does_not_exist(service: ServiceHarness) -> None:
    admin = {"X-API-KEY": service.admin_token}
    for team, status in (("system", 400), ("team-nosuch", 404), ("", 400)):
        response = httpx.post(f"{service.url}/cube/keys", json={"name": "x", "team": team}, headers=admin)
        assert response.status_code == status, response.text
    listed = httpx.get(f"{service.url}/cube/keys", headers=admin).json()
    assert listed == []


def test_team_cap_on_live_sandboxes_is_a_429(
    service_config: Any, fake_runtime: FakeRuntime, start_service: Callable[..., ServiceHarness]
) -> None:
    import dataclasses

    service = start_service(dataclasses.replace(service_config, max_sandboxes_per_team=2), fake_runtime)
    a, b = make_key(service, "a"), make_key(service, "b")
    for _ in range(2):
        created = httpx.post(f"{service.url}/v2/sandboxes", json={}, headers={"X-API-KEY": a["key"]})
        assert created.status_code == 201
    refused = httpx.post(f"{service.url}/v2/sandboxes", json={}, headers={"X-API-KEY": a["key"]})
    assert is_e2b_error(refused, 429) and "limit of 2" in refused.json()["message"]
    assert fake_runtime.boots == 2
    # Another team is not held back by A's sandboxes; the admin is not capped.
    other = httpx.post(f"{service.url}/v2/sandboxes", json={}, headers={"X-API-KEY": b["key"]})
    assert other.status_code == 201
    admin = {"X-API-KEY": service.admin_token}
    for _ in range(3):
        assert httpx.post(f"{service.url}/v2/sandboxes", json={}, headers=admin).status_code == 201
    # Killing one makes room again.
    with httpx.Client(base_url=service.url, headers={"X-API-KEY": a["key"]}) as client:
        first = client.get("/v2/sandboxes").json()[0]["sandboxID"]
        assert client.delete(f"/sandboxes/{first}").status_code == 204
        assert client.post("/v2/sandboxes", json={}).status_code == 201


def _database_before_teams(path: Path, keys: list[tuple[str, str, float | None]]) -> None:
    """Schema version 1 (before teams) with a sandbox, an event, an idempotency key and `keys`."""
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, path, MIGRATIONS[:1])
    record = SandboxRecord("old1", "code-interpreter", None, "c", "paused", 1000.0, 1300.0, 1, 256, 1024, "t")
    data = {k: v for k, v in record.__dict__.items() if k not in ("team_id", "traffic_access_token")}
    db.execute(
        "INSERT INTO sandboxes VALUES ('old1', 'paused', 'code-interpreter', 1000.0, ?)", (json.dumps(data),)
    )
    for key_id, name, revoked_at in keys:
        db.execute(
            "INSERT INTO api_keys(key_id, name, prefix, key_hash, created_at, revoked_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key_id, name, "cube_x", hash_api_key(f"secret-{key_id}"), 5.0, revoked_at),
        )
    db.execute("INSERT INTO events(at, sandbox_id, kind, message) VALUES (1000.0, 'old1', 'created', 'x')")
    db.execute("INSERT INTO idempotency_keys VALUES ('old-key', 'old1', ?)", (time.time(),))
    db.close()


@pytest.mark.parametrize(
    ("keys", "owner"),
    [
        ([("k1", "default", None), ("k2", "ops", None)], "team-k1"),  # the installer's key's team
        ([("k1", "default", 7.0), ("k2", "ops", None)], "system"),  # revoked: the admin's
        ([], "system"),
    ],
)
def test_rows_from_before_teams_go_to_the_default_keys_team(
    tmp_path: Path, keys: list[tuple[str, str, float | None]], owner: str
) -> None:
    path = tmp_path / "cube.db"
    _database_before_teams(path, keys)
    store = SqliteStore(path)
    try:
        assert schema_version(store._db) == len(MIGRATIONS)
        for key_id, _, revoked_at in keys:
            key = store.check_api_key(f"secret-{key_id}")
            assert (key is None) if revoked_at else (key is not None and key.team_id == f"team-{key_id}")
        [sandbox] = store.query_sandboxes(SandboxQuery(states=("paused",), team_id=owner))
        assert sandbox.sandbox_id == "old1" and sandbox.team_id == owner
        assert store.query_sandboxes(SandboxQuery(states=("paused",), team_id="team-other")) == []
        assert [e.kind for e in store.events("old1", team_id=owner)] == ["created"]
        assert store.idempotent_sandbox(owner, "old-key") == "old1"
        assert store.idempotent_sandbox("team-other", "old-key") is None
    finally:
        store.close()
