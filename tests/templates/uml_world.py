"""The real-UML template world the end-to-end template tests share (fixtures registered in
conftest.py): a `cube serve` whose runtime is real UML, and a Python test image pushed to the
loopback registry (see test_e2e_real_sandbox.py's module doc).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
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
