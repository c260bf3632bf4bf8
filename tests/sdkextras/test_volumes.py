"""Volumes through the unmodified E2B SDK (`Volume`, its content client on E2B_VOLUME_API_URL):
files kept under the data dir, owned by a team, capped, and nothing outside a volume reachable
through its paths; bad `volume_mounts` on create get E2B's errors (mounting itself: tests/volumes)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from e2b import Sandbox, Volume
from e2b.exceptions import (
    SandboxException,
    VolumeException,
    VolumeNotFoundException,
    VolumePathNotFoundException,
)

from appliance.master.volumes import DATA_DIR, VOLUMES_DIR

if TYPE_CHECKING:
    from conftest import FakeRuntime, ServiceHarness


@pytest.fixture
def volume_env(sdk_env: ServiceHarness, monkeypatch: pytest.MonkeyPatch) -> ServiceHarness:
    monkeypatch.setenv("E2B_VOLUME_API_URL", sdk_env.url)  # never the public host
    return sdk_env


def new_key(service: ServiceHarness, name: str) -> str:
    response = httpx.post(
        f"{service.url}/cube/keys", json={"name": name}, headers={"X-API-KEY": service.admin_token}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


def data_dir(service: ServiceHarness, volume: Volume) -> Path:
    return service.config.state_dir / VOLUMES_DIR / volume.volume_id / DATA_DIR


def test_files_written_through_the_sdk_are_kept_and_listed(volume_env: ServiceHarness) -> None:
    volume = Volume.create("results")
    assert volume.volume_id.startswith("vol-") and volume.token
    volume.make_dir("/runs/1", force=True)
    written = volume.write_file("/runs/1/out.txt", "42\n")
    assert written.size == 3 and written.path == "/runs/1/out.txt"
    assert volume.read_file("/runs/1/out.txt") == "42\n"
    assert volume.exists("/runs/1/out.txt") and not volume.exists("/runs/2")
    assert [e.name for e in volume.list("/runs", depth=2)] == ["1", "out.txt"]
    updated = volume.update_metadata("/runs/1/out.txt", mode=0o600)
    assert updated.mode == 0o600
    volume.remove("/runs/1/out.txt")
    with pytest.raises(VolumePathNotFoundException):
        volume.read_file("/runs/1/out.txt")

    again = Volume.connect(volume.volume_id)  # the token comes back with the volume
    again.write_file("/kept.txt", b"kept")
    assert (data_dir(volume_env, volume) / "kept.txt").read_bytes() == b"kept"
    assert [v.volume_id for v in Volume.list()] == [volume.volume_id]
    assert Volume.destroy(volume.volume_id) is True
    assert not data_dir(volume_env, volume).exists()
    with pytest.raises(VolumeNotFoundException):
        Volume.get_info(volume.volume_id)


def test_paths_cannot_leave_the_volume(volume_env: ServiceHarness, tmp_path: Path) -> None:
    volume = Volume.create("escape")
    host_file = tmp_path / "host-secret"
    host_file.write_text("host data")
    for path in ("../../../../etc/passwd", "/a/../../etc/passwd", "..", "a/.."):
        with pytest.raises(VolumeException) as caught:
            volume.read_file(path)
        assert "400" in str(caught.value) or "leaves the volume" in str(caught.value)
    # A symlink in the tree (as a guest could leave one) is never followed out of it.
    root = data_dir(volume_env, volume)
    (root / "out").symlink_to(host_file)
    (root / "etc").symlink_to("/etc")
    with pytest.raises(VolumePathNotFoundException):  # a link is not a file of the volume's
        volume.read_file("/out")
    with pytest.raises(VolumePathNotFoundException):  # /etc inside the volume: a dangling link
        volume.read_file("/etc/hostname")
    volume.write_file("/out", "replaced")  # replaces the link itself, not what it points at
    assert host_file.read_text() == "host data"
    with pytest.raises((VolumeException, VolumePathNotFoundException)):
        volume.write_file("/etc/cube-escape", "x")
    assert not Path("/etc/cube-escape").exists()
    info = volume.get_info("/etc")
    assert info.type.value == "symlink" if hasattr(info.type, "value") else info.type == "symlink"


def test_a_volume_has_a_size_cap(
    service_config: Any, fake_runtime: FakeRuntime, start_service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = start_service(dataclasses.replace(service_config, volume_max_mb=1), fake_runtime)
    key = new_key(service, "capped")
    for name, value in (
        ("E2B_API_URL", service.url),
        ("E2B_VOLUME_API_URL", service.url),
        ("E2B_API_KEY", key),
    ):
        monkeypatch.setenv(name, value)
    volume = Volume.create("small")
    volume.write_file("/a.bin", os.urandom(600 * 1024))
    with pytest.raises(VolumeException) as caught:
        volume.write_file("/b.bin", os.urandom(600 * 1024))
    assert "cap of 1 MiB" in str(caught.value)
    assert not volume.exists("/b.bin")


def test_another_team_reaches_no_volume(volume_env: ServiceHarness) -> None:
    volume = Volume.create("private")
    volume.write_file("/kept.txt", "mine")
    other = new_key(volume_env, "other-team")
    assert Volume.list(api_key=other) == []
    with pytest.raises(VolumeNotFoundException):
        Volume.get_info(volume.volume_id, api_key=other)
    assert Volume.destroy(volume.volume_id, api_key=other) is False
    theirs = Volume.create("theirs", api_key=other)
    stolen = Volume(volume.volume_id, "private", token=theirs.token)  # their token, my volume
    with pytest.raises(VolumePathNotFoundException):  # the SDK's reading of a 404
        stolen.read_file("/kept.txt")
    assert volume.read_file("/kept.txt") == "mine"


def _create_error(**kwargs: Any) -> str:
    with pytest.raises(SandboxException) as caught:
        Sandbox.create(**kwargs)
    return str(caught.value)


def test_bad_volume_mounts_get_e2b_errors_and_kill_nothing(volume_env: ServiceHarness) -> None:
    volume = Volume.create("data")
    volume.write_file("/kept.txt", "kept")
    running = Sandbox.create()
    other = new_key(volume_env, "other-team")
    theirs = Volume.create("theirs", api_key=other)
    for path, status, words in (
        ("mnt/data", "400", "absolute"),
        ("/etc/data", "400", "must be below"),
        ("/mnt", "400", "must be below"),
        ("/mnt/../etc", "400", "no '..'"),
        ("/mnt/a b", "400", "plain names"),
    ):
        message = _create_error(volume_mounts={path: volume})
        assert status in message and words in message, (path, message)
    for name in ("no-such-volume", theirs.name):  # another team's volume is as missing as none
        message = _create_error(volume_mounts={"/mnt/data": name})
        assert "404" in message and "not found" in message, message
    message = _create_error(volume_mounts={"/mnt/a": volume, "/mnt/a/b": "theirs-not-mine"})
    assert "404" in message or "overlap" in message
    message = _create_error(volume_mounts={"/mnt/a": volume, "/mnt/b": volume})
    assert "400" in message and "mounted twice" in message
    # This runtime (the test double, like kvm) takes no disks: refused, the volume left free.
    message = _create_error(volume_mounts={"/mnt/data": volume})
    assert "400" in message and "uml runtime" in message
    assert [s.sandbox_id for s in Sandbox.list().next_items()] == [running.sandbox_id]
    assert volume.read_file("/kept.txt") == "kept"
    volume.write_file("/still-writable.txt", "yes")  # not left held by the refused create
    assert Volume.destroy(volume.volume_id) is True
