"""What every rootfs gets: the agent with its dependencies, the init, the start script, DNS."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.templates.ext4 import Ext4Error, build_ext4
from appliance.templates.guest_setup import PYTHON_NET_SETUP, prepare_rootfs, start_script
from appliance.templates.untrusted_tree import Tree


def make_rootfs(root: Path) -> Path:
    rootfs = root / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nweb:x:33:33::/var/www:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\nweb:x:33:\nstaff:x:50:\n")
    os.symlink("/run/systemd/resolve/stub-resolv.conf", rootfs / "etc/resolv.conf")
    return rootfs


@pytest.mark.root
def test_agent_imports_with_nothing_but_what_was_injected(scratch: Path) -> None:
    rootfs = make_rootfs(scratch)
    prepare_rootfs(rootfs, ("/app/serve", "--port", "8080"), {"MODE": "it's prod"}, "/app", "web", ())
    python = shutil.which("python3", path="/usr/bin")
    if python is None:
        pytest.skip("no /usr/bin/python3 to import the agent with")
    # -S: no site-packages, so every import must come from /opt/cube/agent (h2 too: envd's h2c).
    # -B -v: nothing is written, and every module says where its code came from.
    check = (
        "import sys; sys.path.insert(0, sys.argv[1]); import appliance.guest.agent, appliance.guest.__main__"
        "; import appliance.guest.http2_server; print(sys.version_info[:2])"
    )
    agent_dir = str(rootfs / "opt/cube/agent")
    argv = [python, "-S", "-B", "-v", "-c", check, agent_dir]
    result = subprocess.run(argv, check=True, cwd="/", capture_output=True, text=True)
    if result.stdout.strip() == str(sys.version_info[:2]):
        # The injected agent was compiled by this Python, the guest's version: nothing compiles on import.
        lines = result.stderr.splitlines()
        loaded = [line for line in lines if "code object from" in line and agent_dir in line]
        assert loaded and all(line.endswith(".pyc'") for line in loaded), loaded


@pytest.mark.root
def test_init_and_start_scripts(scratch: Path) -> None:
    rootfs = make_rootfs(scratch)
    prepare_rootfs(
        rootfs, ("/app/serve", "--port", "8080"), {"MODE": "it's prod"}, "/app", "web:staff", ("9.9.9.9",)
    )
    init = rootfs / "sbin/cube-init"
    start = rootfs / "opt/cube/start"
    for script in (init, start):
        assert os.access(script, os.X_OK)
        subprocess.run(["sh", "-n", str(script)], check=True)  # valid POSIX sh
    text = start.read_text()
    assert "export MODE='it'\"'\"'s prod'" in text and "export HOME=/var/www" in text
    assert "cd /app" in text and "--reuid=33 --regid=50" in text and "/app/serve --port 8080" in text
    assert (rootfs / "etc/resolv.conf").read_text() == "nameserver 9.9.9.9\n"
    assert not (rootfs / "etc/resolv.conf").is_symlink()
    assert "localhost" in (rootfs / "etc/hosts").read_text()
    assert (rootfs / "tmp").stat().st_mode & 0o1777 == 0o1777
    init_text = init.read_text()
    assert "python3 -m appliance.guest --default-user web \\\n    $interpreter &" in init_text
    assert 'find_spec("ipykernel")' in init_text and 'iface="${cube_netdev:-}"' in init_text
    assert "user:x:1000:1000::/home/user:/bin/sh" in (rootfs / "etc/passwd").read_text()
    assert (rootfs / "home/user").stat().st_uid == 1000


@pytest.mark.root
def test_scratch_image_gets_root_and_user_accounts(scratch: Path) -> None:
    rootfs = scratch / "rootfs"
    rootfs.mkdir()
    assert prepare_rootfs(rootfs, (), {}, "/", "", ()) == "root"
    assert (rootfs / "etc/passwd").read_text().splitlines() == [
        "root:x:0:0:root:/root:/bin/sh",
        "user:x:1000:1000::/home/user:/bin/sh",
    ]
    assert not (rootfs / "opt/cube/start").exists()


def test_root_start_script_execs_directly_and_unknown_users_fail(scratch: Path) -> None:
    with Tree.open(make_rootfs(scratch)) as rootfs:
        assert "exec /bin/app\n" in start_script(rootfs, ("/bin/app",), {}, "/", "")
        assert "--reuid=1234 --regid=1234" in start_script(rootfs, ("/bin/app",), {}, "/", "1234")
        with pytest.raises(ValueError, match="user 'ghost' does not exist"):
            start_script(rootfs, ("/bin/app",), {}, "/", "ghost")


async def test_ext4_refuses_when_the_host_disk_is_too_small(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rootfs = make_rootfs(scratch)
    (rootfs / "big").write_bytes(b"x" * (1 << 20))
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1 << 20)
    )  # type: ignore[attr-defined]
    with pytest.raises(Ext4Error, match="not enough disk space"):
        await build_ext4(rootfs, scratch / "rootfs.ext4", 16 << 20)
    assert not (scratch / "rootfs.ext4").exists()


async def test_ext4_holds_content_plus_writable_space(scratch: Path) -> None:
    rootfs = make_rootfs(scratch)
    (rootfs / "big").write_bytes(os.urandom(3 << 20))
    image = scratch / "rootfs.ext4"
    size = await build_ext4(rootfs, image, 32 << 20)
    assert image.stat().st_size == size and size >= (35 << 20)
    assert image.stat().st_blocks * 512 < size, "the image is sparse"
    dumped = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    free_blocks = int(
        next(line for line in dumped.splitlines() if line.startswith("Free blocks:")).split()[-1]
    )
    assert free_blocks * 4096 >= 32 << 20


@pytest.mark.root
def test_python_network_fallback_configures_the_interface() -> None:
    """Slim images have neither ip nor ifconfig: the init's ioctl fallback, run in a private netns."""
    if shutil.which("unshare") is None or shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root, unshare and ip")
    script = (
        'ip link add vec0 type veth peer name peer0 && python3 -c "$SNIPPET" vec0'
        " && ip -4 -o addr show vec0 && ip route show"
    )
    result = subprocess.run(
        ["unshare", "--net", "sh", "-c", script],
        env={"PATH": os.environ["PATH"], "SNIPPET": PYTHON_NET_SETUP},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "169.254.0.2/30" in result.stdout
    assert "default via 169.254.0.1 dev vec0" in result.stdout
