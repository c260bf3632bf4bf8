"""What one template build may take from the host (#14 item 12, template side): the resources a
template asks for, layer downloads, decompressed sizes, the build context. Past a limit: a clear
refusal (400 for a request, FAILED with the limit named for a build) and nothing left behind."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
from host_standins import build_context_dir
from registry_world import Entry, FakeRegistry, OciLayout, Registries, layer_tar, skopeo_copy
from served_builds import Served, finished

from appliance.config import Config
from appliance.templates.build_context import extract_context
from appliance.templates.builds import TemplateBuilds
from appliance.templates.jobs import BuildJob, JobStore, Phase
from appliance.templates.layer_cache import LayerCache
from appliance.templates.pull import pull_image
from appliance.templates.registry import RegistryError
from appliance.templates.requests import ImageBuildRequest, TemplateLimits, TemplateSettings

SMALL_CAPS = {"build_layer_max_size": "1M", "build_unpacked_max_size": "1M"}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cpu", 1000, "--cpu must be 1..16"),
        ("cpu", 0, "--cpu must be 1..16"),
        ("memory", "1T", "--memory must be at least 64M and at most 32768M"),
        ("memory", "inf", "invalid size"),
        ("memory", "1e400", "invalid size"),
        ("writable_layer_size", "100T", "--writable-layer-size must be at least 16M and at most 65536M"),
        ("writable_layer_size", "-5G", "--writable-layer-size must be at least 16M"),
        ("probe_timeout_s", 1e12, "the probe timeout must be"),
        ("probe_period_s", 0, "the probe period must be"),
    ],
)
async def test_a_template_asking_for_too_much_is_a_400(
    served: Served, field: str, value: object, message: str
) -> None:
    client = served.app.test_client()
    response = await client.post("/templates/builds", json={"image": "x/y:z", field: value})
    assert response.status_code == 400
    body = await response.get_json()
    assert body["code"] == 400 and body["error_code"] == "invalid_request", body
    assert message in body["message"], body
    response = await client.post(
        "/templates/builds/dockerfile",
        query_string={"options": json.dumps({"dockerfile": "FROM scratch\n", field: value})},
        data=b"\0" * 10240,
    )
    assert response.status_code == 400 and message in (await response.get_json())["message"]
    assert served.builds.jobs() == []


def test_the_operator_sets_the_template_bounds() -> None:
    limits = TemplateLimits.from_config(
        Config(
            extra={
                "template_max_cpu": "2",
                "template_max_memory": "1G",
                "template_max_writable_layer_size": "2G",
            }
        )
    )
    assert (
        TemplateSettings.from_json({"cpu": 2, "memory": "1G", "writable_layer_size": "2G"}, limits).cpu_count
        == 2
    )
    for too_much in ({"cpu": 3}, {"memory": "2G"}, {"writable_layer_size": "3G"}):
        with pytest.raises(ValueError, match="in the config file"):
            TemplateSettings.from_json(too_much, limits)


async def push(registries: Registries, layout: OciLayout, entries: list[Entry], tag: str) -> str:
    layout.tag(layout.image([(entries, "gzip")]), tag)
    ref = f"{registries.plain.host}/test/{tag}:v1"
    skopeo_copy(f"oci:{layout.root}:{tag}", f"docker://{ref}")
    return ref


def assert_nothing_left(job: BuildJob, config: Config) -> None:
    assert not (config.templates_dir / job.template_id).exists()
    assert not any((config.cache_dir / "build-work").glob("job-*")), "the build's tree is gone"


@pytest.mark.parametrize("config_extra", [SMALL_CAPS])
async def test_a_layer_larger_than_the_cap_is_not_downloaded(
    builds: TemplateBuilds, config: Config, registries: Registries, scratch: Path
) -> None:
    ref = await push(
        registries, OciLayout(scratch / "layout"), [Entry("noise", data=os.urandom(2 << 20))], "big"
    )
    job = await finished(builds.submit_image(ImageBuildRequest.from_json({"image": ref}), {}))
    assert job.phase == Phase.FAILED
    assert "more than 1 MiB (build_layer_max_size in the config file)" in job.reason, job.reason
    assert_nothing_left(job, config)
    assert not [p for p in (config.cache_dir / "layers").rglob("*") if p.is_file()], "nothing was downloaded"


@pytest.mark.parametrize("config_extra", [SMALL_CAPS])
async def test_layers_that_decompress_past_the_cap_are_refused(
    builds: TemplateBuilds, config: Config, registries: Registries, scratch: Path
) -> None:
    layout = OciLayout(scratch / "layout")
    ref = await push(registries, layout, [Entry("zeros", data=bytes(3 << 20))], "bomb")
    job = await finished(builds.submit_image(ImageBuildRequest.from_json({"image": ref}), {}))
    assert job.phase == Phase.FAILED
    assert "unpacked is larger than 1 MiB (build_unpacked_max_size in the config file)" in job.reason
    assert_nothing_left(job, config)


@pytest.mark.parametrize("config_extra", [SMALL_CAPS])
@pytest.mark.root
async def test_an_added_archive_that_decompresses_past_the_cap_is_refused(
    builds: TemplateBuilds, config: Config, scratch: Path
) -> None:
    context = scratch / "ctx"
    context.mkdir()
    (context / "bomb.tar.gz").write_bytes(gzip.compress(layer_tar([Entry("zeros", data=bytes(3 << 20))])))
    job = await build_context_dir(builds, context, "FROM scratch\nADD bomb.tar.gz /data/\n")
    assert job.phase == Phase.FAILED
    assert "an ADD'ed archive is larger than 1 MiB" in job.reason, job.reason
    assert_nothing_left(job, config)


async def test_a_registry_sending_more_than_a_layer_is_cut_off(
    job_store: JobStore, job: BuildJob, scratch: Path, layer_cache: LayerCache, insecure: frozenset[str]
) -> None:
    layout = OciLayout(scratch / "layout")
    image = layout.image([([Entry("small.txt", data=b"small")], "gzip")])
    layout.tag(image, "liar")
    manifest = json.loads((layout.root / "blobs/sha256" / str(image["digest"]).split(":")[1]).read_text())
    layer = manifest["layers"][0]["digest"]
    registry = FakeRegistry(layout.root, blob_bodies={layer: bytes(8 << 20)})
    rootfs = scratch / "rootfs"
    rootfs.mkdir()
    try:
        with pytest.raises(RegistryError, match=f"sent more than the {manifest['layers'][0]['size']} bytes"):
            await pull_image(
                job_store,
                job,
                f"{registry.host}/test/liar:liar",
                rootfs,
                scratch / "work",
                layer_cache,
                insecure_registries=insecure | {registry.host},
            )
    finally:
        registry.close()
    assert not [p for p in layer_cache.root.rglob("*") if p.is_file()], "no partial download is kept"


def test_a_context_larger_than_its_cap_is_refused(scratch: Path) -> None:
    archive = scratch / "bomb.tar.gz"
    archive.write_bytes(gzip.compress(layer_tar([Entry("zeros", data=bytes(3 << 20))])))
    assert archive.stat().st_size < 1 << 20
    dest = scratch / "context"
    dest.mkdir()
    with pytest.raises(ValueError, match="the build context is larger than 1 MiB"):
        extract_context(archive, dest, max_bytes=1 << 20)
