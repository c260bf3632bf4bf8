"""Pulling from a loopback registry and unpacking: layers, whiteouts, platforms, auth, digests, cache."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio
from registry_world import PASSWORD, USER, BasicAuthProxy, Images, Puller, Registries

from appliance.templates.jobs import BuildJob
from appliance.templates.manifests import DigestMismatch, ManifestError
from appliance.templates.pull import pull_image
from appliance.templates.registry import ImageNotFound
from appliance.templates.registry_auth import Credentials, RegistryAuthError


@pytest.mark.root
async def test_multi_layer_image_unpacks_like_a_container_runtime(images: Images, puller: Puller) -> None:
    rootfs = await puller(images.multi)
    data = rootfs / "data"
    assert not (data / "gone.txt").exists(), "whiteout must delete the lower file"
    assert (data / "keep.txt").read_bytes() == b"keep v2"
    assert sorted(os.listdir(rootfs / "opaque")) == ["upper.txt"], "opaque dir hides the lower entries"
    assert (rootfs / "swap").is_file() and (rootfs / "swap").read_bytes() == b"now a file"
    tool = (rootfs / "usr/bin/tool").stat()
    assert stat.S_IMODE(tool.st_mode) == 0o4755
    owned = (rootfs / "home/app/owned.txt").stat()
    assert (owned.st_uid, owned.st_gid, stat.S_IMODE(owned.st_mode)) == (1000, 1000, 0o600)
    home = (rootfs / "home/app").stat()
    assert (home.st_uid, stat.S_IMODE(home.st_mode)) == (1000, 0o750)
    assert (data / "original").stat().st_ino == (data / "link").stat().st_ino
    assert os.readlink(data / "sym") == "keep.txt"
    assert os.getxattr(data / "xattr.txt", "user.cube") == b"\xff\x00binary"
    device = (rootfs / "dev/cube0").stat()
    assert stat.S_ISCHR(device.st_mode) and os.major(device.st_rdev) == 1 and os.minor(device.st_rdev) == 3
    assert stat.S_ISFIFO((data / "pipe").stat().st_mode)
    # The planted symlink was followed inside the rootfs, never onto the host.
    assert not Path("/tmp/cube-escape-test").exists()
    assert (rootfs / "tmp/cube-escape-test/pwned").read_bytes() == b"must stay inside the rootfs"
    assert [layer["cached"] for layer in puller.job.layers] == [False, False, False]
    assert puller.job.progress >= 59


@pytest.mark.root
async def test_image_config_is_read(images: Images, puller: Puller) -> None:
    rootfs = puller.scratch / "rootfs"
    rootfs.mkdir()
    image = await pull_image(
        puller.store,
        puller.job,
        images.multi,
        rootfs,
        puller.scratch / "work",
        puller.cache,
        insecure_registries=puller.insecure,
    )
    assert image.config.entrypoint == ("/usr/bin/tool",)
    assert image.config.cmd == ("--serve",)
    assert image.config.env_dict()["GREETING"] == "hello world"
    assert (image.config.workdir, image.config.user, image.config.exposed_ports) == ("/data", "app", (8080,))


@pytest.mark.root
async def test_layer_cache_is_reused_by_the_next_pull(images: Images, puller: Puller) -> None:
    await puller(images.multi, into="first")
    for digest in images.multi_layer_digests:
        assert puller.cache.has(digest)
    second = BuildJob(job_id="job-second", kind="image", request={}, template_id="tpl-2")
    await puller(images.multi, into="second", job=second)
    assert [layer["cached"] for layer in second.layers] == [True, True, True]


@pytest.mark.root
async def test_interrupted_download_resumes_from_the_partial_file(
    images: Images, puller: Puller, registries: Registries
) -> None:
    digest = images.multi_layer_digests[0]
    blob = registries.plain.blob_data_path(digest).read_bytes()
    partial, _ = puller.cache.prepare_partial(digest)
    partial.write_bytes(blob[: len(blob) // 2])
    await puller(images.multi)
    assert puller.cache.blob_path(digest).read_bytes() == blob
    assert not partial.exists()


@pytest.mark.root
async def test_manifest_list_picks_linux_amd64(images: Images, puller: Puller) -> None:
    rootfs = await puller(images.multiarch)
    assert (rootfs / "arch.txt").read_text() == "amd64"


@pytest.mark.parametrize("which", ["arm64", "arm64_list"])
async def test_arm64_only_image_is_refused_clearly(images: Images, puller: Puller, which: str) -> None:
    with pytest.raises(ManifestError, match=r"linux/amd64") as caught:
        await puller(getattr(images, which))
    assert "arm64" in str(caught.value)


async def test_corrupt_layer_fails_with_digest_mismatch_and_caches_nothing(
    images: Images, puller: Puller
) -> None:
    with pytest.raises(DigestMismatch, match=r"expected sha256:"):
        await puller(images.corrupt)
    blobs = puller.cache.root / "sha256"
    leftovers = list(blobs.iterdir()) if blobs.exists() else []
    assert leftovers == []


async def test_unknown_image_is_a_clear_error(puller: Puller, registries: Registries) -> None:
    with pytest.raises(ImageNotFound, match="not found"):
        await puller(f"{registries.plain.host}/test/nothing:v1")


@pytest.mark.root
async def test_token_auth_with_credentials(images: Images, puller: Puller, registries: Registries) -> None:
    rootfs = await puller(images.private, Credentials(USER, PASSWORD))
    assert (rootfs / "private.txt").read_text() == "secret"
    users = {user for user, _ in registries.token_server.requests}
    assert USER in users


async def test_wrong_password_is_a_clear_error(images: Images, puller: Puller) -> None:
    with pytest.raises(RegistryAuthError, match="wrong username or password"):
        await puller(images.private, Credentials(USER, "nope"))


async def test_anonymous_pull_of_a_private_image_is_denied(images: Images, puller: Puller) -> None:
    with pytest.raises(RegistryAuthError, match="denied"):
        await puller(images.private)


@pytest.mark.root
async def test_basic_auth_registry(images: Images, puller: Puller, registries: Registries) -> None:
    proxy = BasicAuthProxy(registries.plain.host)
    try:
        image = images.multiarch.replace(registries.plain.host, proxy.host)
        insecure = puller.insecure | {proxy.host}
        with pytest.raises(RegistryAuthError, match="requires a username and password"):
            await puller(image, insecure=insecure)
        rootfs = await puller(image, Credentials(USER, PASSWORD), into="ok", insecure=insecure)
        assert (rootfs / "arch.txt").read_text() == "amd64"
    finally:
        await trio.to_thread.run_sync(proxy.close)
