"""Where registry credentials may go (#14 item 15): to the registry itself, or to the token
realm it names over https; plain HTTP only to hosts the operator listed in
`insecure_registries`; never in a query string, a build log or a job record.

Every server here is on loopback and records what reached it: FakeRegistry (a registry served
from an OCI layout, asking for any challenge) and RecordingServer (a token realm or a CDN).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_world import (
    PASSWORD,
    USER,
    Entry,
    FakeRegistry,
    Images,
    OciLayout,
    Puller,
    RecordingServer,
    Registries,
    send,
)
from served_builds import Served, finished

from appliance.config import Config
from appliance.templates.builds import TemplateBuilds
from appliance.templates.jobs import BuildJob, Phase
from appliance.templates.registry import RegistryError
from appliance.templates.registry_auth import Credentials, RegistryAuthError
from appliance.templates.requests import ImageBuildRequest, public_request

BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
CREDENTIALS = Credentials(USER, PASSWORD)


@pytest.fixture
def layout(scratch: Path) -> Path:
    world = OciLayout(scratch / "layout")
    world.tag(world.image([([Entry("hello.txt", data=b"hello")], "gzip")]), "v1")
    return world.root


@pytest.fixture
def servers() -> Iterator[list[RecordingServer]]:
    started: list[RecordingServer] = []
    yield started
    for server in started:
        server.close()


@pytest.mark.root
async def test_a_plain_http_registry_the_operator_did_not_list_gets_nothing_in_clear(
    puller: Puller,
    layout: Path,
    servers: list[RecordingServer],
) -> None:
    registry = FakeRegistry(layout, challenge='Basic realm="cube-test"', accept=BASIC)
    servers.append(registry)
    with pytest.raises(RegistryError, match="cannot reach registry"):
        await puller(f"{registry.host}/test/app:v1", CREDENTIALS, insecure=frozenset())
    assert registry.requests == [], "no HTTP request (let alone credentials) reached it: https only"
    rootfs = await puller(f"{registry.host}/test/app:v1", CREDENTIALS, insecure=frozenset({registry.host}))
    assert (rootfs / "hello.txt").read_text() == "hello", "listed in insecure_registries: plain HTTP"


@pytest.mark.parametrize("credentials", [CREDENTIALS, None])
async def test_a_token_realm_over_plain_http_is_refused(
    puller: Puller,
    layout: Path,
    servers: list[RecordingServer],
    credentials: Credentials | None,
) -> None:
    realm = RecordingServer(send(200, b'{"token": "t"}'))
    registry = FakeRegistry(layout, challenge=f'Bearer realm="{realm.url}/token",service="cube"')
    servers += [realm, registry]
    with pytest.raises(RegistryAuthError, match="a token service must use https"):
        await puller(f"{registry.host}/test/app:v1", credentials, insecure=frozenset({registry.host}))
    assert realm.requests == [], "the realm got no request, with or without credentials"


async def test_a_token_realm_redirect_is_not_followed(
    puller: Puller,
    layout: Path,
    servers: list[RecordingServer],
) -> None:
    elsewhere = RecordingServer(send(200, b'{"token": "t"}'))
    realm = RecordingServer(send(302, headers={"Location": f"{elsewhere.url}/token"}))
    registry = FakeRegistry(layout, challenge=f'Bearer realm="{realm.url}/token",service="cube"')
    servers += [elsewhere, realm, registry]
    insecure = frozenset({registry.host, realm.http.host, elsewhere.http.host})
    with pytest.raises(RegistryAuthError, match="answered 302"):
        await puller(f"{registry.host}/test/app:v1", CREDENTIALS, insecure=insecure)
    assert [auth for _, auth in realm.requests] == [BASIC], "the realm itself gets the credentials"
    assert "s3cret" not in realm.requests[0][0], "in the Authorization header, not the query"
    assert elsewhere.requests == []


@pytest.mark.root
async def test_a_blob_redirect_to_another_host_carries_no_credentials(
    puller: Puller,
    layout: Path,
    servers: list[RecordingServer],
) -> None:
    cdn = FakeRegistry(layout)
    registry = FakeRegistry(layout, challenge='Basic realm="cube-test"', accept=BASIC, blob_location=cdn.url)
    servers += [cdn, registry]
    rootfs = await puller(f"{registry.host}/test/app:v1", CREDENTIALS, insecure=frozenset({registry.host}))
    assert (rootfs / "hello.txt").read_text() == "hello"
    assert cdn.requests and all(auth is None for _, auth in cdn.requests), cdn.requests
    assert any(auth == BASIC for _, auth in registry.requests)


def secrets_in(job: BuildJob, store_dir: Path, *secrets: str) -> list[str]:
    """Where any of `secrets` shows: the job's log, reason, recorded request, the store on disk."""
    places = {
        "log": "\n".join(job.log),
        "reason": job.reason,
        "request": json.dumps(job.request),
        "store": "".join(p.read_text(errors="replace") for p in store_dir.rglob("*") if p.is_file()),
    }
    return [f"{name}: {secret}" for name, text in places.items() for secret in secrets if secret in text]


@pytest.mark.parametrize("password", [PASSWORD, "not-the-password"])
@pytest.mark.root
async def test_registry_credentials_stay_out_of_query_strings_logs_and_records(
    builds: TemplateBuilds, config: Config, images: Images, registries: Registries, password: str
) -> None:
    request = {"image": images.private, "registry_username": USER, "registry_password": password}
    job = await finished(builds.submit_image(ImageBuildRequest.from_json(request), public_request(request)))
    assert job.phase == (Phase.READY if password == PASSWORD else Phase.FAILED), job.reason
    assert not secrets_in(job, config.state_dir / "template-builds", password)
    assert registries.token_server.paths and not any(password in p for p in registries.token_server.paths)


@pytest.mark.parametrize("config_extra", [{"build_fetch_allow": "127.0.0.2/32"}])
@pytest.mark.parametrize("status", [200, 404])
@pytest.mark.root
async def test_credentials_in_an_add_url_stay_out_of_logs_and_records(
    served: Served, config: Config, servers: list[RecordingServer], status: int
) -> None:
    files = RecordingServer(send(status, b"payload"), "127.0.0.2")
    servers.append(files)
    url = f"http://deploy:hunter2@{files.http.host}/file?X-Amz-Signature=sig4242"
    options = {"dockerfile": f"FROM scratch\nADD {url} /file\n", "writable_layer_size": "32M"}
    response = await served.app.test_client().post(
        "/templates/builds/dockerfile",
        query_string={"options": json.dumps(options)},
        data=b"\0" * 10240,  # an empty context
    )
    assert response.status_code == 202
    job = served.builds.job((await response.get_json())["job_id"])
    assert job is not None
    job = await finished(job)
    assert job.phase == (Phase.READY if status == 200 else Phase.FAILED), job.reason
    assert files.requests[0][1] == "Basic " + base64.b64encode(b"deploy:hunter2").decode()
    assert not secrets_in(job, config.state_dir / "template-builds", "hunter2", "sig4242")
    assert any("http://***@127.0.0.2" in line for line in job.log), job.log
