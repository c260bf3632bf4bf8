"""Bounds an API key holder (or a guest) must not get past: memory, build contexts, host paths as
image sources, the guest agent's answers, local-dev's any-key mode, and the appliance CA's names."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import hypercorn.trio
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID
from hypercorn.config import Config as HypercornConfig

from appliance.config import Config
from appliance.cubelet.envd_client import EnvdError, start_process
from appliance.proxy.tls import ensure_tls_files
from appliance.records import TemplateManifest

if TYPE_CHECKING:
    from conftest import FakeRuntime, ServiceHarness


def key_for(service: ServiceHarness, name: str = "team") -> dict[str, str]:
    created = httpx.post(
        f"{service.url}/cube/keys", json={"name": name}, headers={"X-API-KEY": service.admin_token}
    )
    return {"X-API-KEY": created.json()["key"]}


def test_cold_boot_past_the_memory_budget_is_a_clear_503(
    service_config: Config, fake_runtime: FakeRuntime, start_service: Callable[..., ServiceHarness]
) -> None:
    # 600 MiB: room for two of the 256 MiB test template, not three.
    service = start_service(dataclasses.replace(service_config, memory_budget_mb=600), fake_runtime)
    headers = key_for(service)
    for _ in range(2):
        assert httpx.post(f"{service.url}/v2/sandboxes", json={}, headers=headers).status_code == 201
    refused = httpx.post(f"{service.url}/v2/sandboxes", json={}, headers=headers)
    assert refused.status_code == 503, refused.text
    assert refused.json()["code"] == 503 and "out of sandbox memory" in refused.json()["message"]
    assert refused.headers["should-retry"] == "false"
    assert fake_runtime.boots == 2  # refused before a guest was started
    assert len(httpx.get(f"{service.url}/v2/sandboxes", headers=headers).json()) == 2


def warm_ready(service: ServiceHarness, template_id: str) -> int:
    admin = {"X-API-KEY": service.admin_token}
    template = httpx.get(f"{service.url}/templates/{template_id}", headers=admin).json()
    return int(template["warmPool"]["ready"])


def test_a_cold_boot_takes_memory_back_from_the_warm_pool(
    service_config: Config, fake_runtime: FakeRuntime, start_service: Callable[..., ServiceHarness]
) -> None:
    other = dataclasses.replace(
        TemplateManifest.load(service_config.templates_dir / "code-interpreter"),
        template_id="other",
        directory=service_config.templates_dir / "other",
        aliases=(),
    )
    other.save()
    # Room for two guests: the pools hold them (one of each template) until someone needs the memory.
    config = dataclasses.replace(service_config, memory_budget_mb=600, pool_size=1)
    service = start_service(config, fake_runtime)
    headers = key_for(service)
    deadline = time.monotonic() + 30
    while warm_ready(service, "code-interpreter") + warm_ready(service, "other") < 2:
        assert time.monotonic() < deadline, "the warm pools never filled"
        time.sleep(0.05)
    first = httpx.post(f"{service.url}/v2/sandboxes", json={"templateID": "other"}, headers=headers)
    assert first.status_code == 201  # the warm one
    # The next needs a cold boot: the idle warm guest gives its memory back rather than the create failing.
    second = httpx.post(f"{service.url}/v2/sandboxes", json={"templateID": "other"}, headers=headers)
    assert second.status_code == 201, second.text
    assert warm_ready(service, "code-interpreter") == 0
    third = httpx.post(f"{service.url}/v2/sandboxes", json={"templateID": "other"}, headers=headers)
    assert third.status_code == 503


def tar_of(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize(
    "image", ["oci:/var/lib/cube", "oci-archive:/etc/shadow", "docker-archive:/root/image.tar", " oci:/x"]
)
def test_host_paths_as_image_sources_are_the_admins(service: ServiceHarness, image: str) -> None:
    headers = key_for(service)
    refused = httpx.post(f"{service.url}/templates/builds", json={"image": image}, headers=headers)
    assert refused.status_code == 403 and refused.json()["code"] == 403, refused.text
    assert httpx.get(f"{service.url}/templates/builds", headers=headers).json() == []
    # The admin may (here a path that does not exist: the build just fails).
    mine = image.strip().split(":")[0] + f":{service.config.cache_dir}/no-such-image"
    admin = {"X-API-KEY": service.admin_token}
    assert (
        httpx.post(f"{service.url}/templates/builds", json={"image": mine}, headers=admin).status_code == 202
    )


@pytest.mark.parametrize(
    ("dockerfile", "build_args"),
    [
        ("FROM oci-archive:/etc/shadow\n", {}),
        ("FROM scratch AS a\nFROM docker-archive:/x.tar\n", {}),
        ("ARG SRC=oci:/var/lib/cube\nFROM $SRC\n", {}),
        ("ARG SRC\nFROM ${SRC}\n", {"SRC": "oci-archive:/etc/passwd"}),
    ],
)
def test_a_dockerfiles_from_cannot_name_a_host_path(
    service: ServiceHarness, dockerfile: str, build_args: dict[str, str]
) -> None:
    headers = key_for(service)
    options = json.dumps({"dockerfile": dockerfile, "build_args": build_args})
    refused = httpx.post(
        f"{service.url}/templates/builds/dockerfile",
        params={"options": options},
        content=iter([tar_of({"a.txt": b"a"})]),
        headers=headers,
    )
    assert refused.status_code == 403, refused.text
    assert "host path" in refused.json()["message"]
    contexts = service.config.cache_dir / "build-work" / "contexts"
    assert list(contexts.iterdir()) == []  # the upload is gone too


def test_build_context_uploads_are_capped(
    service_config: Config, fake_runtime: FakeRuntime, start_service: Callable[..., ServiceHarness]
) -> None:
    extra = {**service_config.extra, "build_context_max_size": "1M"}
    config = dataclasses.replace(service_config, extra=extra)
    service = start_service(config, fake_runtime)
    chunk = b"\0" * 65536

    def endless() -> Iterator[bytes]:  # chunked, no Content-Length: only the cap stops it
        for _ in range(64):  # 4 MiB
            yield chunk

    options = json.dumps({"dockerfile": "FROM scratch\n"})
    refused = httpx.post(
        f"{service.url}/templates/builds/dockerfile",
        params={"options": options},
        content=endless(),
        headers=key_for(service),
    )
    assert refused.status_code == 413, refused.text
    assert refused.json()["code"] == 413 and "larger than 1 MiB" in refused.json()["message"]
    work = service.config.cache_dir / "build-work" / "contexts"
    assert list(work.iterdir()) == []
    # Declared too large: refused before a byte is stored.
    declared = httpx.post(
        f"{service.url}/templates/builds/dockerfile",
        params={"options": options},
        content=b"\0" * (2 << 20),
        headers=key_for(service),
    )
    assert declared.status_code == 413 and "larger than 1 MiB" in declared.json()["message"]


def test_a_build_context_larger_than_a_json_body_is_accepted(
    service_config: Config, fake_runtime: FakeRuntime, start_service: Callable[..., ServiceHarness]
) -> None:
    extra = {**service_config.extra, "build_context_max_size": "8M"}
    config = dataclasses.replace(service_config, extra=extra)
    service = start_service(config, fake_runtime)
    context = tar_of({"Dockerfile": b"FROM scratch\nCOPY blob /blob\n", "blob": b"\1" * (3 << 20)})
    for content in (context, iter([context[i : i + 65536] for i in range(0, len(context), 65536)])):
        response = httpx.post(
            f"{service.url}/templates/builds/dockerfile", content=content, headers=key_for(service)
        )
        assert response.status_code == 202, response.text


async def test_envd_client_refuses_a_huge_envelope_without_buffering_it() -> None:
    sent = 0

    async def guest(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal sent
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        # An envelope header announcing 1 GiB, then data that never ends.
        await send(
            {"type": "http.response.body", "body": b"\0" + (1 << 30).to_bytes(4, "big"), "more_body": True}
        )
        while sent < 64 << 20:
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
            sent += 65536
        await send({"type": "http.response.body", "body": b""})

    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(hypercorn.trio.serve, guest, config)
        async with httpx.AsyncClient(trust_env=False) as http:
            with pytest.raises(EnvdError, match="1073741824"):  # the size it announced, refused
                await start_process(http, binds[0], "user", ["true"], {}, None, print, print)
        nursery.cancel_scope.cancel()
    assert sent < 8 << 20  # refused on the header, not after reading what it announced


def test_local_dev_accepts_any_key_only_for_a_loopback_host(
    service_config: Config, fake_runtime: FakeRuntime, start_service: Callable[..., ServiceHarness]
) -> None:
    service = start_service(dataclasses.replace(service_config, local_dev=True), fake_runtime)
    port = service.url.rsplit(":", 1)[1]
    for host, status in (
        (f"localhost:{port}", 200),
        (f"127.0.0.1:{port}", 200),
        (f"[::1]:{port}", 200),
        ("127.0.0.1", 200),
        # DNS rebinding: a page on attacker.example whose name now points at 127.0.0.1.
        (f"attacker.example:{port}", 401),
        ("localhost.attacker.example", 401),
        ("127.0.0.1.nip.io", 401),
        ("", 401),
    ):
        response = httpx.get(f"{service.url}/v2/sandboxes", headers={"X-API-KEY": "anything", "Host": host})
        assert response.status_code == status, (host, response.text)
    # A real key works whatever the Host says.
    real = key_for(service)
    assert (
        httpx.get(f"{service.url}/v2/sandboxes", headers={**real, "Host": "attacker.example"}).status_code
        == 200
    )


def _leaf(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, name: x509.GeneralName
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([name]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def test_the_appliance_ca_cannot_vouch_for_names_outside_its_domain(tmp_path: Path) -> None:
    """Clients trust the CA system-wide: with its key, a certificate for any other site must not verify."""
    files = ensure_tls_files(tmp_path, "cube.test")
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key((tmp_path / "ca" / "ca-key.pem").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    store = verification.Store([ca_cert])

    def verifies(name: x509.GeneralName, as_name: verification.DNSName | verification.IPAddress) -> bool:
        verifier = verification.PolicyBuilder().store(store).build_server_verifier(as_name)
        try:
            verifier.verify(_leaf(ca_cert, ca_key, name), [])
        except verification.VerificationError:
            return False
        return True

    import ipaddress

    assert verifies(x509.DNSName("49983-abc.cube.test"), verification.DNSName("49983-abc.cube.test"))
    assert not verifies(x509.DNSName("bank.example"), verification.DNSName("bank.example"))
    assert not verifies(
        x509.DNSName("cube.test.evil.example"), verification.DNSName("cube.test.evil.example")
    )
    loopback = ipaddress.ip_address("127.0.0.1")
    assert not verifies(x509.IPAddress(loopback), verification.IPAddress(loopback))
    # The server certificate the appliance serves verifies.
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    verification.PolicyBuilder().store(store).build_server_verifier(
        verification.DNSName("api.cube.test")
    ).verify(server, [])


def test_a_ca_made_before_the_constraint_is_replaced(tmp_path: Path) -> None:
    first = ensure_tls_files(tmp_path, "cube.test")
    old_ca = first.ca_cert.read_bytes()
    second = ensure_tls_files(tmp_path, "other.test")  # another domain: the old CA does not cover it
    assert second.ca_cert.read_bytes() != old_ca
    assert (tmp_path / "ca" / "ca.pem.old").read_bytes() == old_ca
    ca = x509.load_pem_x509_certificate(second.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(second.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # re-issued by the new CA
    assert ensure_tls_files(tmp_path, "other.test").ca_cert.read_bytes() == second.ca_cert.read_bytes()
