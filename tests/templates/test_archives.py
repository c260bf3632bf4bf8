"""Images from local files: oci:DIR, oci-archive:PATH, docker-archive:PATH (written by skopeo)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from registry_world import Images

from appliance.templates.jobs import BuildJob, JobStore
from appliance.templates.layer_cache import LayerCache
from appliance.templates.manifests import ManifestError
from appliance.templates.pull import pull_image


async def unpack(store: JobStore, job: BuildJob, image: str, scratch: Path, cache: LayerCache) -> Path:
    rootfs = scratch / "rootfs"
    rootfs.mkdir()
    await pull_image(store, job, image, rootfs, scratch / "work", cache)
    return rootfs


def skopeo_local(source: str, dest: str) -> None:
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--quiet", source, dest],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.mark.root
async def test_oci_layout_directory(
    images: Images, job_store: JobStore, job: BuildJob, scratch: Path, layer_cache: LayerCache
) -> None:
    rootfs = await unpack(job_store, job, f"oci:{images.layout}:multi", scratch, layer_cache)
    assert (rootfs / "data/keep.txt").read_bytes() == b"keep v2"
    assert not (rootfs / "data/gone.txt").exists()


@pytest.mark.root
async def test_oci_layout_index_picks_amd64(
    images: Images, job_store: JobStore, job: BuildJob, scratch: Path, layer_cache: LayerCache
) -> None:
    rootfs = await unpack(job_store, job, f"oci:{images.layout}:multiarch", scratch, layer_cache)
    assert (rootfs / "arch.txt").read_text() == "amd64"


async def test_oci_layout_without_ref_needs_one(
    images: Images, job_store: JobStore, job: BuildJob, scratch: Path, layer_cache: LayerCache
) -> None:
    with pytest.raises(ManifestError, match="name one"):
        await unpack(job_store, job, f"oci:{images.layout}", scratch, layer_cache)


@pytest.mark.root
async def test_oci_archive(
    images: Images, job_store: JobStore, job: BuildJob, scratch: Path, layer_cache: LayerCache
) -> None:
    archive = scratch / "image.oci.tar"
    skopeo_local(f"oci:{images.layout}:multi", f"oci-archive:{archive}")
    rootfs = await unpack(job_store, job, f"oci-archive:{archive}", scratch, layer_cache)
    assert sorted(p.name for p in (rootfs / "opaque").iterdir()) == ["upper.txt"]


@pytest.mark.root
async def test_docker_archive(
    images: Images, job_store: JobStore, job: BuildJob, scratch: Path, layer_cache: LayerCache
) -> None:
    archive = scratch / "image.docker.tar"
    skopeo_local(f"oci:{images.layout}:multi-gzip", f"docker-archive:{archive}:test/multi:v1")
    rootfs = scratch / "rootfs"
    rootfs.mkdir()
    image = await pull_image(
        job_store, job, f"docker-archive:{archive}", rootfs, scratch / "work", layer_cache
    )
    assert image.config.entrypoint == ("/usr/bin/tool",)
    assert (rootfs / "data/keep.txt").read_bytes() == b"keep v2"
    assert (rootfs / "data/original").stat().st_ino == (rootfs / "data/link").stat().st_ino


@pytest.mark.root
async def test_arm64_archive_is_refused(
    images: Images, job_store: JobStore, job: BuildJob, scratch: Path, layer_cache: LayerCache
) -> None:
    archive = scratch / "arm.oci.tar"
    skopeo_local(f"oci:{images.layout}:arm64", f"oci-archive:{archive}")
    with pytest.raises(ManifestError, match="linux/amd64 only"):
        await unpack(job_store, job, f"oci-archive:{archive}", scratch, layer_cache)
