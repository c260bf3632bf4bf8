"""Template builds end to end in a real `cube serve` with real UML guests (root only).

The test image is made here: a Python rootfs (the default template's /usr and /etc,
read with debugfs and pruned) as one plain layer, then a gzip layer with an HTTP
entrypoint and a file that a third layer whiteouts. skopeo pushes it to the
loopback registry; the seed's own commands (`cubemastercli tpl create-from-image`,
`tpl watch`, `tpl build`) build templates from it in a service whose runtime is
real UML, and the E2B SDK starts sandboxes from them.

Guest networking stays on the host: the service's resolver forwards to a dead
loopback port and nothing the guests run reaches out (pip installs a local wheel).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from registry_world import (
    LAYER_TYPES,
    OCI_CONFIG,
    OCI_MANIFEST,
    PASSWORD,
    USER,
    Entry,
    OciLayout,
    Registries,
    skopeo_copy,
)

from appliance.config import Config, load_config
from appliance.cubelet.runtimes import RuntimeBundle

pytestmark = [
    pytest.mark.uml,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="real UML guests need root"),
]

TEST_HOST_NETWORK = "10.215.0.0/24"
TEST_UID_BASE = 400_000
DEAD_DNS_UPSTREAM = "127.0.0.1:9"
SERVER_PORT = 49999
# What the test image does not need from the default template's /usr (numpy, node, compilers...).
PRUNE = (
    "lib/gcc",
    "lib/jvm",
    "lib/R",
    "lib/git-core",
    "lib/node_modules",
    "lib/x86_64-linux-gnu/openblas-pthread",
    "lib/x86_64-linux-gnu/perl",
    "bin/node",
    "bin/nodejs",
)
PRUNE_GLOBS = (
    "lib/x86_64-linux-gnu/libnode*",
    "lib/x86_64-linux-gnu/libicu*",
    "lib/x86_64-linux-gnu/*.a",
    "lib/x86_64-linux-gnu/lib[atlu]san*",
    "lib/x86_64-linux-gnu/libgfortran*",
)
SERVER = b"""\
import http.server, os

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from the entrypoint, GREETING=" + os.environ.get("GREETING", "")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

http.server.ThreadingHTTPServer(("0.0.0.0", 49999), Handler).serve_forever()
"""


@dataclass(frozen=True)
class PushedImage:
    ref: str  # plain registry, one manifest, gzip layers
    registry: str
    token_list_ref: str  # token-auth registry, a manifest list, zstd layers


def _default_rootfs_image() -> Path:
    config = load_config()
    manifest = config.templates_dir / config.default_template / "rootfs.ext4"
    if not manifest.is_file():
        pytest.skip(f"the default template is not built ({manifest} missing): run `cube tpl build-default`")
    return manifest


@pytest.fixture(scope="session")
def python_rootfs(session_dir: Path) -> Path:
    """A Debian rootfs with python3 and pip: /usr and /etc of the default template, pruned."""
    image = _default_rootfs_image()
    root = session_dir / "python-rootfs"
    (root / "usr").mkdir(parents=True)
    subprocess.run(
        ["debugfs", "-R", f"rdump /usr/bin /usr/sbin /usr/lib /usr/lib64 /etc {root / 'usr'}", str(image)],
        check=True,
        capture_output=True,
    )
    (root / "usr" / "etc").rename(root / "etc")
    for path in PRUNE:
        target = root / "usr" / path
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    for pattern in PRUNE_GLOBS:
        for target in (root / "usr").glob(pattern):
            target.unlink() if not target.is_dir() else shutil.rmtree(target)
    packages = root / "usr/lib/python3/dist-packages"
    for entry in packages.iterdir():
        if not entry.name.startswith("pip"):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for name in ("bin", "sbin", "lib", "lib64"):
        (root / name).symlink_to(f"usr/{name}")
    for name in ("tmp", "root", "var/tmp", "home"):
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    return root


def _dir_layer(layout: OciLayout, source: Path) -> tuple[dict[str, object], str]:
    """A plain (uncompressed) tar layer of a directory, written straight into the layout."""
    handle, name = tempfile.mkstemp(dir=layout.root)
    os.close(handle)
    with tarfile.open(name, "w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(source.iterdir()):
            tar.add(entry, arcname=entry.name)
    digest = hashlib.sha256()
    with open(name, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    hex_digest = digest.hexdigest()
    size = os.path.getsize(name)
    os.replace(name, layout.root / "blobs" / "sha256" / hex_digest)
    return {"mediaType": LAYER_TYPES["none"], "digest": f"sha256:{hex_digest}", "size": size}, (
        f"sha256:{hex_digest}"
    )


def _push_python_image(
    layout: OciLayout, base: tuple[dict[str, object], str], ref: str, compression: str, **push: Any
) -> None:
    """The python base layer, then an app layer (`compression`) with the entrypoint and a file that a
    third layer whiteouts; with `multiarch`, tagged as a manifest list whose other entry is arm64."""
    from registry_world import OCI_INDEX, compress, layer_tar, sha256

    multiarch = push.pop("multiarch", False)
    app = layer_tar(
        [
            Entry("app", "dir", mode=0o755),
            Entry("app/server.py", data=SERVER),
            Entry("app/gone.txt", data=b"whiteouted in the next layer"),
            Entry("app/kept.txt", data=b"still here"),
            Entry("app/layer-compression.txt", data=compression.encode()),
        ]
    )
    whiteout = layer_tar([Entry("app/.wh.gone.txt")])
    layers = [base[0]]
    diff_ids = [base[1]]
    for tar in (app, whiteout):
        diff_ids.append(sha256(tar))
        layers.append(layout.blob(compress(tar, compression), LAYER_TYPES[compression]))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["python3", "/app/server.py"],
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hi"],
            "WorkingDir": "/app",
            "ExposedPorts": {f"{SERVER_PORT}/tcp": {}},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": layout.blob(json.dumps(config).encode(), OCI_CONFIG),
        "layers": layers,
    }
    descriptor = layout.blob(json.dumps(manifest).encode(), OCI_MANIFEST)
    tag = ref.rsplit("/", 1)[1].replace(":", "-")
    if multiarch:
        descriptor["platform"] = {"os": "linux", "architecture": "amd64"}
        arm64 = layout.image([([Entry("app/server.py", data=b"raise SystemExit('arm64')")], "gzip")], "arm64")
        descriptor = layout.index([arm64, descriptor])
        assert descriptor["mediaType"] == OCI_INDEX
    layout.tag(descriptor, tag)
    skopeo_copy(f"oci:{layout.root}:{tag}", f"docker://{ref}", all_images=multiarch, **push)


@pytest.fixture(scope="session")
def test_image(registries: Registries, session_dir: Path, python_rootfs: Path) -> PushedImage:
    layout = OciLayout(session_dir / "e2e-layout")
    try:
        base = _dir_layer(layout, python_rootfs)
        ref = f"{registries.plain.host}/test/e2e-python:v1"
        _push_python_image(layout, base, ref, "gzip")
        # A manifest list (arm64 first) whose amd64 image has zstd layers, in the token-auth registry.
        listed = f"{registries.token.host}/test/e2e-python-list:v1"
        _push_python_image(layout, base, listed, "zstd", multiarch=True, creds=f"{USER}:{PASSWORD}")
    finally:
        shutil.rmtree(layout.root)
    return PushedImage(ref, registries.plain.host, listed)


@asynccontextmanager
async def open_test_runtime(config: Config) -> AsyncIterator[RuntimeBundle]:
    """open_runtime for uml, with guest DNS going nowhere."""
    from appliance.cubelet.runtimes import CubeVSPolicies
    from appliance.net.service import CubeVS
    from appliance.runtime.uml.runtime import UmlRuntime

    async with CubeVS.start(config, dns_upstreams=[DEAD_DNS_UPSTREAM]) as cubevs:
        yield RuntimeBundle(UmlRuntime(config, cubevs), CubeVSPolicies(cubevs))


@pytest.fixture
def uml_service_config(registries: Registries) -> Iterator[Config]:
    _default_rootfs_image()
    # Short paths: unix socket paths (mconsole) must fit in 107 bytes.
    work = Path(tempfile.mkdtemp(prefix="cubetest-tpl-"))
    kernels = load_config().cache_dir / "kernels"
    (work / "cache").mkdir()
    if kernels.is_dir():
        (work / "cache" / "kernels").symlink_to(kernels)
    yield Config(
        state_dir=work / "state",
        cache_dir=work / "cache",
        run_dir=work / "run",
        api_port=0,
        tls_port=0,
        domain="cube.test",
        runtime="uml",
        pool_size=0,
        memory_budget_mb=4096,
        host_network=TEST_HOST_NETWORK,
        uid_base=TEST_UID_BASE,
        allow_unenforced_network=True,
        extra={"insecure_registries": registries.plain_http_hosts},
    )
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def uml_service(uml_service_config: Config, start_service: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    service = start_service(uml_service_config, runtime_factory=open_test_runtime)
    response = httpx.post(
        f"{service.url}/cube/keys", json={"name": "e2e"}, headers={"X-API-KEY": service.admin_token}
    )
    assert response.status_code == 201, response.text
    monkeypatch.setenv("E2B_API_URL", service.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", service.url)
    monkeypatch.setenv("E2B_API_KEY", response.json()["key"])
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    return service


def cli(
    service: Any, *args: str, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "CUBE_API_PORT": service.url.rsplit(":", 1)[1],
        "CUBE_STATE_DIR": str(service.config.state_dir),
        "CUBE_CONFIG": "/nonexistent",
        "CUBE_API_KEY": service.admin_token,
    }
    result = subprocess.run(
        ["cubemastercli", *args], env=env, capture_output=True, text=True, timeout=600, cwd=cwd
    )
    if check:
        assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result


def job_id_of(output: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in output.splitlines() if line.startswith("job_id:"))


def template_id_of(output: str) -> str:
    return next(word for word in output.replace(":", " ").split() if word.startswith("tpl-"))


def job(service: Any, job_id: str) -> dict[str, Any]:
    response = httpx.get(
        f"{service.url}/templates/builds/{job_id}", headers={"X-API-KEY": service.admin_token}
    )
    response.raise_for_status()
    return dict(response.json())


def seed_create(service: Any, image: str, *extra: str) -> str:
    created = cli(
        service,
        "tpl", "create-from-image",
        "--image", image,
        "--writable-layer-size", "1G",
        "--expose-port", "49999",
        "--expose-port", "49983",
        "--probe", "49999",
        *extra,
    )  # fmt: skip
    return job_id_of(created.stdout)


def assert_entrypoint_serves(service: Any, sandbox_id: str) -> None:
    """The image's entrypoint (an HTTP server) answers through the service's sandbox proxy."""
    answer = httpx.get(
        f"{service.url}/",
        headers={"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(SERVER_PORT)},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    assert answer.text == "hello from the entrypoint, GREETING=hi"


def test_image_template_serves_its_entrypoint(uml_service: Any, test_image: PushedImage) -> None:
    from e2b import Sandbox

    job_id = seed_create(uml_service, test_image.ref)
    watched = cli(uml_service, "tpl", "watch", "--job-id", job_id)
    template_id = template_id_of(watched.stdout.strip().splitlines()[-1])
    built = job(uml_service, job_id)
    assert built["phase"] == "READY", built["reason"]
    assert any(line.startswith("probe answered") for line in built["log"]), built["log"]
    assert template_id in cli(uml_service, "tpl", "list").stdout

    sandbox = Sandbox.create(template=template_id, timeout=120)
    try:
        assert_entrypoint_serves(uml_service, sandbox.sandbox_id)
        result = sandbox.commands.run(
            "cat /app/kept.txt; echo; test -e /app/gone.txt && echo present || echo gone; pwd; id -un",
            user="root",
        )
        assert result.stdout.split() == ["still", "here", "gone", "/app", "root"]
    finally:
        sandbox.kill()


def test_manifest_list_with_zstd_layers_from_a_token_registry(
    uml_service: Any, test_image: PushedImage
) -> None:
    """The seed's lifecycle on an index (arm64 listed first) of zstd layers behind token auth:
    create, watch, info, a sandbox, delete refused while it runs, delete."""
    from e2b import Sandbox

    credentials = ("--registry-username", USER, "--registry-password", PASSWORD)
    job_id = seed_create(uml_service, test_image.token_list_ref, *credentials)
    watched = cli(uml_service, "tpl", "watch", "--job-id", job_id)
    template_id = template_id_of(watched.stdout.strip().splitlines()[-1])
    built = job(uml_service, job_id)
    assert built["phase"] == "READY", built["reason"]
    assert any(line.startswith("probe answered") for line in built["log"]), built["log"]
    assert PASSWORD not in json.dumps(built)
    info = json.loads(cli(uml_service, "tpl", "info", "--template-id", template_id, "--json").stdout)
    assert info["templateID"] == template_id

    sandbox = Sandbox.create(template=template_id, timeout=120)
    try:
        assert_entrypoint_serves(uml_service, sandbox.sandbox_id)
        result = sandbox.commands.run(
            "cat /app/layer-compression.txt; echo; "
            "test -e /app/gone.txt && echo present || echo gone; uname -m",
            user="root",
        )
        assert result.stdout.split() == ["zstd", "gone", "x86_64"]
        refused = cli(uml_service, "tpl", "delete", "--template-id", template_id, check=False)
        assert refused.returncode != 0 and "1 live sandboxes" in refused.stderr, refused
    finally:
        sandbox.kill()
    cli(uml_service, "tpl", "delete", "--template-id", template_id)
    assert template_id not in cli(uml_service, "tpl", "list").stdout
    assert not (uml_service.config.templates_dir / template_id).exists()


def test_probe_that_never_answers_fails_the_build(uml_service: Any, test_image: PushedImage) -> None:
    job_id = seed_create(uml_service, test_image.ref, "--probe", "49998", "--probe-timeout", "4")
    watched = cli(uml_service, "tpl", "watch", "--job-id", job_id, check=False)
    assert watched.returncode != 0
    failed = job(uml_service, job_id)
    assert failed["phase"] == "FAILED"
    assert "49998" in failed["reason"] or "probe" in failed["reason"].lower(), failed["reason"]
    assert failed["console_tail"].strip(), "the guest's console tail is part of the failure"
    templates_dir = uml_service.config.templates_dir
    assert not (templates_dir / failed["template_id"]).exists()
    assert failed["template_id"] not in cli(uml_service, "tpl", "list").stdout


def _wheel(directory: Path) -> str:
    """A pure-Python wheel of package `cubepkg`, made by hand (no build tools, no network)."""
    name = "cubepkg-1.0-py3-none-any.whl"
    files = {
        "cubepkg/__init__.py": b"VALUE = 'installed by RUN pip install'\n",
        "cubepkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: cubepkg\nVersion: 1.0\n",
        "cubepkg-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: cube-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(
        f"{path},sha256={hashlib.sha256(data).hexdigest()},{len(data)}\n" for path, data in files.items()
    )
    files["cubepkg-1.0.dist-info/RECORD"] = (record + "cubepkg-1.0.dist-info/RECORD,,\n").encode()
    with zipfile.ZipFile(directory / name, "w") as wheel:
        for path, data in files.items():
            wheel.writestr(path, data)
    return name


def test_dockerfile_with_run_pip_install_and_cache(
    uml_service: Any, test_image: PushedImage, tmp_path: Path
) -> None:
    from e2b import Sandbox

    context = tmp_path / "context"
    context.mkdir()
    wheel = _wheel(context)
    (context / "settings.txt").write_text("copied from the context\n")
    (context / "Dockerfile").write_text(
        f"FROM {test_image.ref}\n"
        f"COPY {wheel} settings.txt /tmp/\n"
        f"RUN pip install --no-index --no-cache-dir /tmp/{wheel} && rm /tmp/{wheel}\n"
        "ENV BUILT=yes\n"
    )
    options = ("--probe", "49999", "--expose-port", "49999", "--expose-port", "49983")
    first = cli(uml_service, "tpl", "build", *options, str(context))
    template_id = template_id_of(first.stdout.strip().splitlines()[-1])
    first_job = job(uml_service, job_id_of(first.stdout))
    assert any("Successfully installed cubepkg-1.0" in line for line in first_job["log"]), first_job["log"]

    sandbox = Sandbox.create(template=template_id, timeout=120)
    try:
        result = sandbox.commands.run(
            "python3 -c 'import cubepkg; print(cubepkg.VALUE)'; cat /tmp/settings.txt; "
            "ls /tmp/*.whl 2>/dev/null | wc -l; echo $BUILT"
        )
        assert result.stdout.splitlines() == [
            "installed by RUN pip install",
            "copied from the context",
            "0",
            "yes",
        ]
    finally:
        sandbox.kill()

    second = cli(uml_service, "tpl", "build", *options, str(context))
    second_job = job(uml_service, job_id_of(second.stdout))
    assert second_job["phase"] == "READY"
    run_lines = [line for line in second_job["log"] if "RUN pip install" in line]
    assert run_lines and all("(cached)" in line for line in run_lines), second_job["log"]
    assert not any("Successfully installed" in line for line in second_job["log"])
