"""The E2B SDKs' template build API attacked with bad input (api/sdk_templates.py): unknown steps,
bad hashes, missing or mismatched uploads, uploads to a link that is not theirs, oversize and
escaping archives. Each gets E2B's error body and status, and nothing is published.

The archives and hashes are the pip `e2b` SDK's own (`tar_file_stream`, `calculate_files_hash`);
the service runs the runtime double: nothing here boots a guest.
"""

from __future__ import annotations

import dataclasses
import io
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from appliance.config import Config

if TYPE_CHECKING:
    from conftest import FakeRuntime, ServiceHarness


@pytest.fixture
def small_uploads(
    service_config: Config, fake_runtime: FakeRuntime, start_service: Any
) -> Iterator[tuple[ServiceHarness, httpx.Client]]:
    """A service whose build contexts (and so SDK uploads) are capped at 1 MiB, and a key's client."""
    config = dataclasses.replace(service_config, extra={"build_context_max_size": "1M"})
    service = start_service(config, fake_runtime)
    key = httpx.post(
        f"{service.url}/cube/keys", json={"name": "sdk"}, headers={"X-API-KEY": service.admin_token}
    ).json()["key"]
    with httpx.Client(base_url=service.url, headers={"X-API-KEY": key}, timeout=30) as client:
        yield service, client


def e2b_error(response: httpx.Response, status: int) -> str:
    body = response.json()
    assert response.status_code == status, response.text
    assert body["code"] == status and isinstance(body["message"], str), body
    return str(body["message"])


def sdk_archive_and_hash(context: Path, src: str, dest: str) -> tuple[bytes, str]:
    from e2b.template.utils import calculate_files_hash, tar_file_stream

    files_hash = calculate_files_hash(src, dest, str(context), [], False, None)
    with tar_file_stream(src, str(context), [], False, True) as tar:
        return tar.read(), files_hash


def request_build(client: httpx.Client, name: str) -> str:
    response = client.post("/v3/templates", json={"name": name})
    assert response.status_code == 202, response.text
    return str(response.json()["buildID"])


def start(client: httpx.Client, name: str, build_id: str, steps: list[dict[str, Any]]) -> httpx.Response:
    body = {"fromTemplate": "code-interpreter", "steps": steps}
    return client.post(f"/v2/templates/{name}/builds/{build_id}", json=body)


def upload(client: httpx.Client, name: str, files_hash: str, archive: bytes) -> httpx.Response:
    link = client.get(f"/templates/{name}/files/{files_hash}")
    assert link.status_code == 201 and link.json()["present"] is False, link.text
    return httpx.put(link.json()["url"], content=archive)


def assert_not_published(client: httpx.Client, name: str) -> None:
    e2b_error(client.get(f"/templates/aliases/{name}"), 404)
    assert name not in [t["templateID"] for t in client.get("/v2/templates").json()]


def test_unknown_step_types_and_bad_arguments_are_refused(
    small_uploads: tuple[ServiceHarness, httpx.Client],
) -> None:
    _, client = small_uploads
    build_id = request_build(client, "bad-steps")
    refused = {
        "unknown step type": [{"type": "RUN", "args": ["true"]}, {"type": "FROBNICATE", "args": []}],
        "invalid filesHash": [{"type": "COPY", "args": ["a", "/a"], "filesHash": "../../etc"}],
        "COPY needs the filesHash": [{"type": "COPY", "args": ["a", "/a"]}],
        "must be relative": [{"type": "COPY", "args": ["../outside", "/a"], "filesHash": "a" * 64}],
        "invalid variable name": [{"type": "ENV", "args": ["BAD NAME", "x"]}],
        "invalid user": [{"type": "USER", "args": ["root; rm -rf /"]}],
    }
    for expected, steps in refused.items():
        message = e2b_error(start(client, "bad-steps", build_id, steps), 400)
        assert expected in message, (expected, message)
    message = e2b_error(client.post(f"/v2/templates/bad-steps/builds/{build_id}", json={"steps": []}), 400)
    assert "fromImage and fromTemplate" in message
    e2b_error(client.post("/v2/templates/bad-steps/builds/not-a-build", json={}), 404)
    assert_not_published(client, "bad-steps")


def test_copy_files_must_be_uploaded_and_match_their_hash(
    small_uploads: tuple[ServiceHarness, httpx.Client], tmp_path: Path
) -> None:
    _, client = small_uploads
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.py").write_text("print('hi')\n")
    archive, files_hash = sdk_archive_and_hash(tmp_path, "app/main.py", "/home/user/")
    copy = {"type": "COPY", "args": ["app/main.py", "/home/user/"], "filesHash": files_hash}
    build_id = request_build(client, "copies")

    message = e2b_error(start(client, "copies", build_id, [copy]), 400)
    assert "not uploaded" in message

    # Other files under that hash: the build is refused and the upload dropped.
    (tmp_path / "app" / "main.py").write_text("print('swapped')\n")
    swapped, _ = sdk_archive_and_hash(tmp_path, "app/main.py", "/home/user/")
    assert upload(client, "copies", files_hash, swapped).status_code == 200
    message = e2b_error(start(client, "copies", build_id, [copy]), 400)
    assert "do not match filesHash" in message
    assert client.get(f"/templates/copies/files/{files_hash}").json()["present"] is False

    # The SDK's own archive of the same files passes, and the link says they are there.
    assert upload(client, "copies", files_hash, archive).status_code == 200
    assert client.get(f"/templates/copies/files/{files_hash}").json()["present"] is True
    assert start(client, "copies", build_id, [copy]).status_code == 202
    message = e2b_error(start(client, "copies", build_id, [copy]), 400)
    assert "started already" in message


def test_an_upload_link_is_for_its_hash_team_and_time_only(
    small_uploads: tuple[ServiceHarness, httpx.Client],
) -> None:
    _, client = small_uploads
    request_build(client, "links")
    link = client.get(f"/templates/links/files/{'a' * 64}").json()["url"]
    other_hash = link.replace("a" * 64, "b" * 64)
    expired = link.replace("expires=", "expires=1")  # another expiry: the signature no longer fits
    for url in (other_hash, expired, link.replace("signature=", "signature=f"), link.split("?")[0]):
        e2b_error(httpx.put(url, content=b"x"), 403)
    for bad_hash in ("A" * 64, "a" * 63, ".." + "a" * 62):
        e2b_error(client.get(f"/templates/links/files/{bad_hash}"), 400)
    e2b_error(client.get("/templates/links/files/..%2f..%2fetc"), 404)  # no such route
    e2b_error(client.get(f"/templates/nobody-requested-this/files/{'a' * 64}"), 404)


def tar_of(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info, data in entries:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return out.getvalue()


def test_oversize_and_escaping_uploads_are_refused(
    small_uploads: tuple[ServiceHarness, httpx.Client], tmp_path: Path
) -> None:
    service, client = small_uploads
    request_build(client, "escapes")
    big = tarfile.TarInfo("big.bin")
    oversize = tar_of([(big, b"\0" * (2 << 20))])
    e2b_error(upload(client, "escapes", "1" * 64, oversize), 413)  # by its Content-Length
    link = client.get(f"/templates/escapes/files/{'1' * 64}").json()["url"]
    chunks = (oversize[i : i + 65536] for i in range(0, len(oversize), 65536))
    e2b_error(httpx.put(link, content=chunks), 413)  # chunked: counted as it arrives

    escape = tarfile.TarInfo("../../escaped.txt")
    symlink = tarfile.TarInfo("link")
    symlink.type, symlink.linkname = tarfile.SYMTYPE, str(tmp_path)
    through_link = tarfile.TarInfo("link/planted.txt")
    absolute = tarfile.TarInfo(str(tmp_path / "absolute.txt"))
    attacks = [[(escape, b"x")], [(symlink, b""), (through_link, b"x")], [(absolute, b"x")]]
    for number, entries in enumerate(attacks):
        files_hash = f"{number + 2}" * 64
        e2b_error(upload(client, "escapes", files_hash, tar_of(entries)), 400)
        assert client.get(f"/templates/escapes/files/{files_hash}").json()["present"] is False
    e2b_error(upload(client, "escapes", "5" * 64, b"\x1f\x8b not really gzip"), 400)
    assert not (tmp_path / "planted.txt").exists() and not (tmp_path / "absolute.txt").exists()
    assert not list(service.config.cache_dir.parent.rglob("escaped.txt"))


def test_another_keys_template_is_no_base_and_its_name_no_target(
    small_uploads: tuple[ServiceHarness, httpx.Client],
) -> None:
    """B cannot build from A's template (the build fails at its base: not found) nor under A's name."""
    service, a = small_uploads
    b_key = httpx.post(
        f"{service.url}/cube/keys", json={"name": "other"}, headers={"X-API-KEY": service.admin_token}
    ).json()["key"]
    a_build = request_build(a, "a-private")
    with httpx.Client(base_url=service.url, headers={"X-API-KEY": b_key}, timeout=30) as b:
        message = e2b_error(b.post("/v3/templates", json={"name": "a-private:v2"}), 409)
        assert "belongs to" in message
        e2b_error(b.get(f"/templates/a-private/builds/{a_build}/status"), 404)
        build_id = request_build(b, "b-own")
        base = {"fromTemplate": "a-private", "steps": []}
        assert b.post(f"/v2/templates/b-own/builds/{build_id}", json=base).status_code == 202
        status: dict[str, Any] = {}
        for _ in range(300):  # the job fails at once, before anything boots
            status = b.get(f"/templates/b-own/builds/{build_id}/status").json()
            if status["status"] == "error":
                break
            time.sleep(0.1)
        assert status["status"] == "error", status
        assert status["reason"]["step"] == "base" and "not found" in status["reason"]["message"]
        assert_not_published(b, "b-own")
