"""Images from local files: oci:DIR, oci-archive:PATH, docker-archive:PATH (written by skopeo)."""

from __future__ import annotations

import subprocess

import pytest
from registry_world import Images, Puller

from appliance.templates.manifests import ManifestError
from appliance.templates.pull import pull_image


def skopeo_local(source: str, dest: str) -> None:
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--quiet", source, dest],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.mark.root
async def test_oci_layout_directory(images: Images, puller: Puller) -> None:
    rootfs = await puller(f"oci:{images.layout}:multi")
    assert (rootfs / "data/keep.txt").read_bytes() == b"keep v2"
    assert not (rootfs / "data/gone.txt").exists()


@pytest.mark.root
async def test_oci_layout_index_picks_amd64(images: Images, puller: Puller) -> None:
    rootfs = await puller(f"oci:{images.layout}:multiarch")
    assert (rootfs / "arch.txt").read_text() == "amd64"


async def test_oci_layout_without_ref_needs_one(images: Images, puller: Puller) -> None:
    with pytest.raises(ManifestError, match="name one"):
        await puller(f"oci:{images.layout}")


@pytest.mark.root
async def test_oci_archive(images: Images, puller: Puller) -> None:
    archive = puller.scratch / "image.oci.tar"
    skopeo_local(f"oci:{images.layout}:multi", f"oci-archive:{archive}")
    rootfs = await puller(f"oci-archive:{archive}")
    assert sorted(p.name for p in (rootfs / "opaque").iterdir()) == ["upper.txt"]


@pytest.mark.root
async def test_docker_archive(images: Images, puller: Puller) -> None:
    archive = puller.scratch / "image.docker.tar"
    skopeo_local(f"oci:{images.layout}:multi-gzip", f"docker-archive:{archive}:test/multi:v1")
    rootfs = puller.scratch / "rootfs"
    rootfs.mkdir()
    image = await pull_image(
        puller.store, puller.job, f"docker-archive:{archive}", rootfs, puller.scratch / "work", puller.cache
    )
    assert image.config.entrypoint == ("/usr/bin/tool",)
    assert (rootfs / "data/keep.txt").read_bytes() == b"keep v2"
    assert (rootfs / "data/original").stat().st_ino == (rootfs / "data/link").stat().st_ino


@pytest.mark.root
async def test_arm64_archive_is_refused(images: Images, puller: Puller) -> None:
    archive = puller.scratch / "arm.oci.tar"
    skopeo_local(f"oci:{images.layout}:arm64", f"oci-archive:{archive}")
    with pytest.raises(ManifestError, match="linux/amd64 only"):
        await puller(f"oci-archive:{archive}")
