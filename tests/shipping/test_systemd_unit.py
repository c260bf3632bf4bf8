"""systemd/cube.service: a valid unit, Type=notify with a watchdog that the real `cube serve`
feeds, and none of the hardening options that would break sandboxes (see the unit's comments)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "cube.service"
STATE = Path("/tmp/h9w")  # short: UML's mconsole socket paths must fit in 107 bytes
START_TIMEOUT_S = 600.0  # a loaded 2-core machine; never a speed assertion

# Each of these breaks KVM, UML, netns, bpf or cgroups for the service's children.
BREAKS_SANDBOXES = (
    "ProtectSystem",
    "ProtectHome",
    "ReadWritePaths",
    "ReadOnlyPaths",
    "PrivateTmp",
    "PrivateMounts",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectKernelModules",
    "ProtectKernelTunables",
    "ProtectClock",
    "PrivateDevices",
    "DevicePolicy",
    "DeviceAllow",
    "ProtectHostname",
    "NoNewPrivileges",
    "RestrictSUIDSGID",
    "RestrictNamespaces",
    "MemoryDenyWriteExecute",
    "SystemCallFilter",
    # The UML launcher sets ADDR_NO_RANDOMIZE (runtime/uml/command.py: `setarch -R`); a
    # locked personality made every sandbox boot on the ISO fail with "setarch: failed to
    # set personality: Operation not permitted".
    "LockPersonality",
)


def unit_settings() -> dict[str, str]:
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings[key.strip()] = value.strip()
    return settings


def test_unit_verifies() -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze (package systemd) is needed to verify the unit"
    result = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True)
    assert result.returncode == 0 and "cube.service" not in result.stderr, result.stderr


def test_unit_is_notify_with_watchdog_and_restart() -> None:
    settings = unit_settings()
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert int(settings["WatchdogSec"]) > 0
    assert settings["Restart"] == "on-failure"
    assert settings["ExecStart"] == "/opt/cube/venv/bin/cube serve"
    assert settings["StandardOutput"] == "journal"


def test_unit_sets_no_option_that_breaks_sandboxes() -> None:
    assert sorted(set(unit_settings()) & set(BREAKS_SANDBOXES)) == []


def test_a_stop_or_restart_leaves_the_sandboxes_to_their_supervisors() -> None:
    """Supervisors and guests live in cgroup leaves of their own: the unit's kill reaches the
    service and its helpers only (not KillMode=process, which would leave the helpers too; and not
    Delegate=, which would put the sandboxes' leaves inside the unit, where a stop kills them);
    the supervisors' sockets and the networks' records in /run/cube survive the stop."""
    settings = unit_settings()
    assert settings["KillMode"] == "mixed"
    assert "Delegate" not in settings
    assert settings["RuntimeDirectory"] == "cube" and settings["RuntimeDirectoryPreserve"] == "yes"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(START_TIMEOUT_S)
    yield sock, path
    sock.close()


def test_cube_serve_reports_ready_pings_the_watchdog_and_says_stopping(
    notify_socket: tuple[socket.socket, Path],
) -> None:
    sock, path = notify_socket
    shutil.rmtree(STATE, ignore_errors=True)
    (STATE / "cache").mkdir(parents=True)
    (STATE / "cache" / "kernels").symlink_to("/var/cache/cube/kernels")
    env = {
        "PATH": os.environ["PATH"],
        "CUBE_CONFIG": "/nonexistent",
        "CUBE_STATE_DIR": str(STATE / "s"),
        "CUBE_CACHE_DIR": str(STATE / "cache"),
        "CUBE_RUN_DIR": str(STATE / "run"),
        "CUBE_API_PORT": "3400",
        "CUBE_TLS_PORT": "3843",
        "CUBE_HOST_NETWORK": "10.216.0.0/16",
        "CUBE_UID_BASE": "500000",
        "CUBE_POOL_SIZE": "0",
        # What systemd sets for Type=notify + WatchdogSec=1 (pings every 0.5 s).
        "NOTIFY_SOCKET": str(path),
        "WATCHDOG_USEC": "1000000",
    }
    cube = Path(sys.executable).with_name("cube")
    service = subprocess.Popen(
        [str(cube), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        assert sock.recv(4096) == b"READY=1"
        pings = [sock.recv(4096) for _ in range(3)]
        assert pings == [b"WATCHDOG=1"] * 3
        service.send_signal(signal.SIGTERM)
        while (message := sock.recv(4096)) == b"WATCHDOG=1":
            pass
        assert message == b"STOPPING=1"
        service.wait(timeout=START_TIMEOUT_S)
        assert service.returncode == 0, service.stderr.read() if service.stderr else ""
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
        shutil.rmtree(STATE, ignore_errors=True)
