"""systemd/cube.service: a valid unit, Type=notify with a watchdog that the real `cube serve`
feeds, and none of the hardening options that would break sandboxes (see the unit's comments)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.bench.private import PrivateService
from appliance.runtime.supervisor.client import SUPERVISORS_DIR
from appliance.runtime.supervisor.protocol import RECORD_FILE, SupervisorRecord
from appliance.runtime.uml.cgroups import CGROUP_ROOT, SandboxCgroup

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


def unit_cgroup_leaves(name: str) -> dict[str, Path]:
    """Where systemd keeps a unit's processes: the v2 tree (pure v2, or `unified` beside v1's
    controllers) and v1's `name=systemd` hierarchy."""
    if (CGROUP_ROOT / "cgroup.controllers").is_file():
        return {"unified": CGROUP_ROOT / name}
    return {
        h: CGROUP_ROOT / h / name
        for h in ("unified", "systemd")
        if (CGROUP_ROOT / h / "cgroup.procs").is_file()
    }


@pytest.fixture
def unit_cgroup() -> Iterator[SandboxCgroup]:
    """A stand-in for cube.service's cgroup (no systemd runs here), killed and removed after."""
    unit = SandboxCgroup(2, unit_cgroup_leaves(f"cubetest-{secrets.token_hex(4)}.service"))
    unit.make()
    try:
        yield unit
    finally:
        unit.remove()


@pytest.mark.uml
@pytest.mark.root
@pytest.mark.slow
def test_kill_mode_mixed_stops_the_service_and_leaves_the_sandboxes_running(
    unit_cgroup: SandboxCgroup,  # before private_service: the service is ended before the cgroup goes
    private_service: Callable[..., PrivateService],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`systemctl restart cube` with this unit, done as systemd does it: the service started in
    the unit's cgroup; SIGTERM to its main process; once that exited, SIGKILL to every process
    still in the unit's cgroup (KillMode=mixed); a new start. A sandbox created before, with a
    variable in its interpreter and a background process, runs on: its supervisor and guest had
    left the unit's cgroup, and the new service takes it over (the SDK runs code in it)."""
    from e2b_code_interpreter import Sandbox

    assert unit_settings()["KillMode"] == "mixed"
    service = private_service()
    service.start(join=unit_cgroup.procs_files())
    service.wait_ready()
    for name, value in (("E2B_API_URL", service.url), ("E2B_SANDBOX_URL", service.url)):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("E2B_API_KEY", service.create_key("unit"))
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    sandbox = Sandbox.create(timeout=1800)
    assert sandbox.run_code("kept = 6 * 7").error is None
    sandbox.commands.run("nohup sleep 86398 >/dev/null 2>&1 &")
    supervisor = service.run_dir / SUPERVISORS_DIR / sandbox.sandbox_id / RECORD_FILE
    supervisor_pid = SupervisorRecord.decode(supervisor.read_bytes()).pid
    assert service.process is not None and service.process.pid in unit_cgroup.pids()
    assert supervisor_pid not in unit_cgroup.pids()
    assert [p for leaf in unit_cgroup.leaves.values() for p in leaf.iterdir() if p.is_dir()] == []

    service.stop(signal.SIGTERM)
    unit_cgroup.kill_all()  # what KillMode=mixed sends once the main process has exited
    assert os.path.exists(f"/proc/{supervisor_pid}")
    service.start(join=unit_cgroup.procs_files())
    service.wait_ready()

    again = Sandbox.connect(sandbox.sandbox_id)
    assert again.run_code("print(kept)").logs.stdout == ["42\n"]
    assert again.commands.run("pgrep -x -f 'sleep 86398'").exit_code == 0
    with service.admin() as admin:
        events = admin.get(f"/cube/sandboxes/{sandbox.sandbox_id}").json()["events"]
    assert [e["kind"] for e in events].count("adopted") == 1, events


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
