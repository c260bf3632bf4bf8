"""Fixtures for template builds: loopback registries (plain and token auth) with test images pushed by skopeo.

Session-wide (built and pushed once): `registries` and `images`. Everything
lives under one temporary directory that is removed, and both registries and
the token server are stopped, when the session ends.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from registry_world import (
    MULTI_CONFIG,
    MULTI_LAYERS,
    PASSWORD,
    USER,
    Entry,
    Images,
    OciLayout,
    Puller,
    Registries,
    TokenServer,
    skopeo_copy,
    start_registry,
)
from sandbox_doubles import LoopbackSandboxes
from served_builds import Served, serve_builds
from uml_world import python_rootfs, test_image, uml_service, uml_service_config  # noqa: F401 (fixtures)

from appliance.config import Config
from appliance.templates.builds import TemplateBuilds
from appliance.templates.jobs import BuildJob, JobStore
from appliance.templates.layer_cache import LayerCache
from appliance.templates.registry import insecure_registries


@pytest.fixture(scope="session")
def session_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cube-templates-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def registries(session_dir: Path) -> Iterator[Registries]:
    token_server = TokenServer(session_dir)
    plain = start_registry(session_dir / "plain")
    try:
        token = start_registry(session_dir / "token", token_server)
    except BaseException:
        plain.stop()
        token_server.close()
        raise
    yield Registries(plain, token, token_server)
    plain.stop()
    token.stop()
    token_server.close()


@pytest.fixture(scope="session")
def images(registries: Registries, session_dir: Path) -> Images:
    layout = OciLayout(session_dir / "layout")
    multi = layout.image(MULTI_LAYERS, run_config=MULTI_CONFIG)
    layout.tag(multi, "multi")
    # Docker's image format has no zstd: the same files, all gzip, for docker-archive.
    layout.tag(
        layout.image([(entries, "gzip") for entries, _ in MULTI_LAYERS], run_config=MULTI_CONFIG),
        "multi-gzip",
    )
    amd64 = layout.image([([Entry("arch.txt", data=b"amd64")], "gzip")])
    arm64 = layout.image([([Entry("arch.txt", data=b"arm64")], "gzip")], architecture="arm64")
    layout.tag(layout.index([amd64, arm64]), "multiarch")
    layout.tag(arm64, "arm64")
    layout.tag(layout.index([arm64]), "arm64list")
    corrupt = layout.image([([Entry("corrupt.txt", data=b"this blob gets damaged in the registry")], "gzip")])
    layout.tag(corrupt, "corrupt")
    private = layout.image([([Entry("private.txt", data=b"secret")], "gzip")])
    layout.tag(private, "private")

    plain = registries.plain.host
    refs = {
        "multi": f"{plain}/test/multi:v1",
        "multiarch": f"{plain}/test/multiarch:v1",
        "arm64": f"{plain}/test/arm64:v1",
        "arm64list": f"{plain}/test/arm64list:v1",
        "corrupt": f"{plain}/test/corrupt:v1",
    }
    for name, ref in refs.items():
        skopeo_copy(
            f"oci:{layout.root}:{name}", f"docker://{ref}", all_images=name in ("multiarch", "arm64list")
        )
    private_ref = f"{registries.token.host}/test/private:v1"
    skopeo_copy(f"oci:{layout.root}:private", f"docker://{private_ref}", creds=f"{USER}:{PASSWORD}")

    # Damage the corrupt image's layer where the registry keeps it: it is served as is.
    manifest = (layout.root / "blobs/sha256" / str(corrupt["digest"]).split(":")[1]).read_text()
    layer_digest = json.loads(manifest)["layers"][0]["digest"]
    data_path = registries.plain.blob_data_path(layer_digest)
    damaged = bytearray(data_path.read_bytes())
    damaged[-12] ^= 0xFF
    data_path.write_bytes(bytes(damaged))

    multi_manifest = json.loads(
        (layout.root / "blobs/sha256" / str(multi["digest"]).split(":")[1]).read_text()
    )
    return Images(
        layout=layout.root,
        multi=refs["multi"],
        multiarch=refs["multiarch"],
        arm64=refs["arm64"],
        arm64_list=refs["arm64list"],
        corrupt=refs["corrupt"],
        private=private_ref,
        multi_layer_digests=[layer["digest"] for layer in multi_manifest["layers"]],
    )


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cube-templates-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def config_extra() -> dict[str, str]:
    """More config file keys for one test: `@pytest.mark.parametrize("config_extra", [{...}])`."""
    return {}


@pytest.fixture
def config(scratch: Path, registries: Registries, config_extra: dict[str, str]) -> Config:
    return Config(
        state_dir=scratch / "state",
        cache_dir=scratch / "cache",
        run_dir=scratch / "run",
        extra={"insecure_registries": registries.plain_http_hosts, **config_extra},
    )


@pytest.fixture
def insecure(config: Config) -> frozenset[str]:
    return insecure_registries(config)


@pytest.fixture
def job_store(config: Config) -> JobStore:
    return JobStore(config.state_dir / "template-builds")


@pytest.fixture
def job(job_store: JobStore) -> BuildJob:
    job = BuildJob(job_id="job-test", kind="image", request={}, template_id="tpl-test")
    job_store.add(job)
    return job


@pytest.fixture
def layer_cache(config: Config) -> LayerCache:
    return LayerCache(config.cache_dir / "layers")


@pytest.fixture
def puller(
    job_store: JobStore, job: BuildJob, scratch: Path, layer_cache: LayerCache, insecure: frozenset[str]
) -> Puller:
    return Puller(job_store, job, scratch, layer_cache, insecure)


@pytest.fixture
async def served(config: Config, scratch: Path) -> AsyncIterator[Served]:
    """The build API on a loopback port, over LoopbackSandboxes."""
    async with serve_builds(config, scratch) as served:
        yield served


@pytest.fixture
def sandboxes(scratch: Path) -> LoopbackSandboxes:
    return LoopbackSandboxes(scratch)


@pytest.fixture
async def builds(config: Config, sandboxes: LoopbackSandboxes) -> AsyncIterator[TemplateBuilds]:
    service = TemplateBuilds(config, sandboxes)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        yield service
        nursery.cancel_scope.cancel()
