"""Volumes mounted into real UML sandboxes through the unmodified E2B SDK (root only; the template
this host's installer built, read-only through a symlink, as tests/sdkextras does).

A `cube serve` of the test's own (uml runtime, volumes capped at 16 MiB): sandbox 1 mounts a
volume, sees what the content API put there, writes (as the sandbox's user), leaves symlinks at
host files and passes the cap; a second mount, changes through the content API and destroying the
volume are refused while it is mounted; bad mounts kill nothing; after the kill the content API
and sandbox 2 see sandbox 1's files, and nothing of the host was read or written through its links.
A paused sandbox's and a timed-out one's files come back too; a crashed guest's do not, and the
volume is left as it was, free for the next sandbox.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import umlguests
from e2b import CommandExitException, Sandbox, Volume
from e2b.exceptions import SandboxException, VolumeException, VolumePathNotFoundException

from appliance.cubelet.volume_mounts import DATA_DIR, MOUNT_FILE, VOLUMES_DIR

pytestmark = [
    pytest.mark.uml,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="real UML guests need root"),
]

CAP_MB = 16


@pytest.fixture
def uml_service(start_service: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[umlguests.UmlService]:
    with umlguests.uml_service(start_service, monkeypatch, volume_max_mb=CAP_MB) as service:
        yield service


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _usage(root: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_blocks * 512 for d, _, files in os.walk(root) for f in files)


def test_a_volume_written_in_one_sandbox_is_read_by_the_next(uml_service: umlguests.UmlService) -> None:
    alice, bob = uml_service.key("alice"), uml_service.key("bob")
    volume = Volume.create("work", api_key=alice)
    volume.write_file("/seed.txt", "from the content API")
    data = uml_service.config.state_dir / VOLUMES_DIR / volume.volume_id / DATA_DIR
    shadow_before, passwd_before = _digest("/etc/shadow"), _digest("/etc/passwd")

    first = Sandbox.create(volume_mounts={"/mnt/data": volume}, timeout=600, api_key=alice)
    assert first.commands.run("cat /mnt/data/seed.txt").stdout == "from the content API"
    assert first.commands.run("stat -c %U /mnt/data").stdout.strip() == "user"
    assert first.get_info().volume_mounts == [{"name": "work", "path": "/mnt/data"}]
    first.files.write("/mnt/data/out/result.txt", "written in sandbox 1")
    first.commands.run(
        "ln -s /etc/shadow /mnt/data/shadow && ln -s ../../../../etc /mnt/data/up"
        " && ln -s /etc/passwd /mnt/data/out/passwd"
    )
    with pytest.raises(CommandExitException) as full:
        first.commands.run(f"dd if=/dev/zero of=/mnt/data/big bs=1M count={2 * CAP_MB} 2>&1")
    assert "No space left on device" in full.value.stdout

    # One sandbox at a time; a mounted volume is neither changed nor destroyed under it.
    with pytest.raises(SandboxException) as caught:
        Sandbox.create(volume_mounts={"/mnt/other": "work"}, api_key=alice)
    assert "409" in str(caught.value) and first.sandbox_id in str(caught.value)
    with pytest.raises(VolumeException) as changed:
        volume.write_file("/meanwhile.txt", "x")
    assert "409" in str(changed.value) or "mounted" in str(changed.value)
    with pytest.raises(Exception) as destroyed:
        Volume.destroy(volume.volume_id, api_key=alice)
    assert "409" in str(destroyed.value) or "mounted" in str(destroyed.value)
    # Bad mounts: E2B's errors, and the running sandbox is untouched.
    with pytest.raises(SandboxException) as caught:
        Sandbox.create(volume_mounts={"relative": "work"}, api_key=alice)
    assert "400" in str(caught.value)
    Volume.create("bob-vol", api_key=bob)
    with pytest.raises(SandboxException) as caught:
        Sandbox.create(volume_mounts={"/mnt/x": "bob-vol"}, api_key=alice)
    assert "404" in str(caught.value)
    assert first.commands.run("cat /mnt/data/out/result.txt").stdout == "written in sandbox 1"

    first.kill()  # answers once the volume holds the sandbox's files
    assert volume.read_file("/out/result.txt") == "written in sandbox 1"
    assert volume.read_file("/seed.txt") == "from the content API"
    assert not (data.parent / MOUNT_FILE).exists()
    # The guest's links are kept as links, inside the volume; the host read and wrote nothing
    # through them.
    assert os.readlink(data / "shadow") == "/etc/shadow"
    assert os.readlink(data / "up") == "../../../../etc"
    with pytest.raises(VolumePathNotFoundException):  # a link is not a file: never followed
        volume.read_file("/shadow")
    assert _digest("/etc/shadow") == shadow_before and _digest("/etc/passwd") == passwd_before
    assert _usage(data) <= CAP_MB << 20

    second = Sandbox.create(volume_mounts={"/home/user/vol": "work"}, timeout=600, api_key=alice)
    try:
        assert second.files.read("/home/user/vol/out/result.txt") == "written in sandbox 1"
        assert second.commands.run("readlink /home/user/vol/shadow").stdout.strip() == "/etc/shadow"
        second.files.write("/home/user/vol/second.txt", "and sandbox 2")
        assert second.pause()  # a paused sandbox's volume comes back too (thawed for it)
    finally:
        second.kill()
    assert volume.read_file("/second.txt") == "and sandbox 2"

    # A guest that dies before its volume is copied back: the volume keeps what it had, and is free.
    third = Sandbox.create(volume_mounts={"/mnt/data": "work"}, timeout=600, api_key=alice)
    third.files.write("/mnt/data/lost.txt", "written before the crash")
    third.commands.run("(sleep 1; echo o > /proc/sysrq-trigger) >/dev/null 2>&1 &", user="root")
    deadline = time.monotonic() + 120  # the service notices the guest's exit (health, supervisor)
    while (data.parent / MOUNT_FILE).exists():
        assert time.monotonic() < deadline, "the crashed sandbox still holds the volume"
        time.sleep(0.5)
    assert not volume.exists("/lost.txt") and volume.read_file("/second.txt") == "and sandbox 2"

    # A sandbox that times out hands its volume back as a killed one does.
    fourth = Sandbox.create(volume_mounts={"/mnt/data": "work"}, timeout=600, api_key=alice)
    fourth.files.write("/mnt/data/timed-out.txt", "written before the timeout")
    fourth.set_timeout(0)  # E2B's "time out now"
    deadline = time.monotonic() + 120
    while not volume.exists("/timed-out.txt"):
        assert time.monotonic() < deadline, "the timed-out sandbox's files did not come back"
        time.sleep(0.5)
    assert volume.read_file("/timed-out.txt") == "written before the timeout"
    assert Volume.destroy(volume.volume_id, api_key=alice) is True
