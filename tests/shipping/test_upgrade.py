"""`cube upgrade --from ISO/WHEEL` on a real service: new venv, atomic switch, restart, the same
sandbox running on through it (its files, processes and memory), state kept, rollback of a
failed version.

Everything happens under /tmp/h9 (short: UML's mconsole socket paths must fit
in 107 bytes) with a throwaway venv link /tmp/h9/venv; /opt/cube/venv is never
touched. The wheels are built from a copy of this checkout: the current version,
a bumped one, and a bumped-again one whose store migration fails (the rollback).
The service runs the real UML runtime on private ports and networks, with the
installed default template linked read-only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from wheel_builds import build_wheel, copy_checkout

from appliance import __version__
from appliance.config import load_config
from appliance.master.upgrade import (
    DaemonLaunch,
    VenvLayout,
    install_venv,
    point_link,
    running_daemon_pid,
    start_daemon,
    stop_daemon,
)

pytestmark = [pytest.mark.uml, pytest.mark.slow]

ROOT = Path("/tmp/h9")
INSTALLED_TEMPLATE = Path("/var/lib/cube/templates/code-interpreter")
INSTALLED_KERNELS = Path("/var/cache/cube/kernels")
API = "http://127.0.0.1:3400"
START_TIMEOUT_S = 600.0  # a loaded 2-core machine; never a speed assertion
NEW_VERSION = __version__ + ".post9"
BROKEN_VERSION = __version__ + ".post10"


def service_env() -> dict[str, str]:
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "CUBE_CONFIG": "/nonexistent",
        "CUBE_STATE_DIR": str(ROOT / "s"),
        "CUBE_CACHE_DIR": str(ROOT / "cache"),
        "CUBE_RUN_DIR": str(ROOT / "run"),
        "CUBE_API_PORT": "3400",
        "CUBE_TLS_PORT": "3843",
        "CUBE_HOST_NETWORK": "10.216.0.0/16",
        "CUBE_UID_BASE": "500000",
        "CUBE_RUNTIME": "uml",
        "CUBE_POOL_SIZE": "0",
        "CUBE_MEMORY_BUDGET_MB": "4096",
        "CUBE_DOMAIN": "cube.test",
    }


@dataclass(frozen=True)
class Wheels:
    current: Path
    new: Path
    broken: Path
    new_iso: Path  # the new wheel in /cube/wheels of an ISO 9660 image, as the appliance ISO has it


def _set_version(tree: Path, version: str) -> None:
    for path, before, after in (
        (tree / "pyproject.toml", f'version = "{__version__}"', f'version = "{version}"'),
        (tree / "appliance/__init__.py", f'__version__ = "{__version__}"', f'__version__ = "{version}"'),
    ):
        text = path.read_text()
        assert before in text, path
        path.write_text(text.replace(before, after, 1))


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Wheels:
    work = tmp_path_factory.mktemp("wheels")
    built = []
    for name, version in (("current", __version__), ("new", NEW_VERSION), ("broken", BROKEN_VERSION)):
        tree = work / f"src-{name}"
        copy_checkout(tree)
        _set_version(tree, version)
        if name == "broken":
            # A migration that fails: the new service refuses to start on it.
            store = tree / "appliance/master/store.py"
            marker = "class DatabaseTooNew("
            failing = 'MIGRATIONS = (*MIGRATIONS, ("INSERT INTO no_such_table VALUES (1)",))\n\n\n'
            store.write_text(store.read_text().replace(marker, failing + marker, 1))
        built.append(build_wheel(tree, work / f"wheel-{name}"))
        shutil.rmtree(tree)
    iso_tree = work / "iso-tree"
    (iso_tree / "cube" / "wheels").mkdir(parents=True)
    shutil.copy2(built[1], iso_tree / "cube" / "wheels")
    (iso_tree / "cube" / "templates").mkdir()
    (iso_tree / "cube" / "templates" / "code-interpreter.squashfs").write_bytes(b"not read by an upgrade")
    iso = work / "new.iso"
    subprocess.run(
        ["xorriso", "-as", "mkisofs", "-R", "-V", "CUBE_APPLIANCE", "-o", str(iso), str(iso_tree)],
        check=True,
        capture_output=True,
    )
    current, new, broken = built
    return Wheels(current, new, broken, iso)


def _pids_of_uid_range(first: int, count: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if first <= entry.stat().st_uid < first + count:
                    found.append(int(entry.name))
            except FileNotFoundError:
                pass
    return found


@pytest.fixture
def appliance_root() -> Iterator[Path]:
    """/tmp/h9 with the default template and the sandbox kernels linked in; emptied afterwards."""
    if not (INSTALLED_TEMPLATE / "rootfs.ext4").is_file():
        pytest.fail(f"{INSTALLED_TEMPLATE} is not built: run the installer (cube tpl build-default)")
    if ROOT.exists():
        _stop_service()
        shutil.rmtree(ROOT)
    (ROOT / "s" / "templates").mkdir(parents=True)
    (ROOT / "s" / "templates" / "code-interpreter").symlink_to(INSTALLED_TEMPLATE)
    (ROOT / "cache").mkdir()
    (ROOT / "cache" / "kernels").symlink_to(INSTALLED_KERNELS)
    try:
        yield ROOT
    finally:
        _stop_service()
        shutil.rmtree(ROOT, ignore_errors=True)
        assert _pids_of_uid_range(500000, 1000) == []


def _stop_service() -> None:
    """Stop the service and end its sandboxes (SIGINT: SIGTERM would leave them running)."""
    config = load_config(environ=service_env())
    if (pid := running_daemon_pid(config)) is not None:
        stop_daemon(pid, signum=signal.SIGINT)


def _health() -> dict[str, object] | None:
    try:
        response = httpx.get(f"{API}/health", timeout=5)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def _wait_for_version(version: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if (answer := _health()) is not None and answer["version"] == version:
            return
        time.sleep(0.5)
    log = (ROOT / "cube.log").read_text(errors="replace")[-3000:] if (ROOT / "cube.log").exists() else ""
    pytest.fail(f"no /health with version {version}; service log tail:\n{log}")


def _cube(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin/cube"), *args], env=service_env(), capture_output=True, text=True, timeout=1800
    )


def assert_ran_on(sandbox: Any, admin: dict[str, str], upgrades: int) -> None:
    """The sandbox ran on through the upgrades: its file, its interpreter's memory and its
    background process are all still there, and each new service took it over.
    `admin`: the admin token's header (/cube/* is the admin's)."""
    assert sandbox.files.read("/home/user/kept.txt") == "written before the upgrade"
    assert sandbox.run_code("print(kept)").logs.stdout == ["42\n"]
    assert sandbox.commands.run("pgrep -x -f 'sleep 86399'").exit_code == 0
    detail = httpx.get(f"{API}/cube/sandboxes/{sandbox.sandbox_id}", headers=admin).json()
    assert detail["state"] == "running"
    assert [e["kind"] for e in detail["events"]].count("adopted") == upgrades


def _upgrade(layout: VenvLayout, source: Path) -> subprocess.CompletedProcess[str]:
    timeout = str(START_TIMEOUT_S)
    return _cube(
        layout.link, "upgrade", "--from", str(source), "--venv", str(layout.link), "--health-timeout", timeout
    )


def test_upgrade_from_a_wheel_keeps_state_and_rolls_back_a_failed_one(
    wheels: Wheels, appliance_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from e2b_code_interpreter import Sandbox

    layout = VenvLayout(appliance_root / "venv")
    first = install_venv(wheels.current, layout, __version__, print)
    assert point_link(layout, first) is None
    daemon = start_daemon(layout.link, DaemonLaunch(service_env(), "/", appliance_root / "cube.log"))
    try:
        _wait_for_version(__version__)
        admin = {"X-API-KEY": (appliance_root / "s" / "admin-token").read_text().strip()}
        created = httpx.post(f"{API}/cube/keys", json={"name": "kept"}, headers=admin)
        assert created.status_code == 201, created.text
        key = created.json()["key"]
        for name, value in (("E2B_API_URL", API), ("E2B_SANDBOX_URL", API), ("E2B_API_KEY", key)):
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("E2B_DOMAIN", raising=False)
        monkeypatch.delenv("E2B_DEBUG", raising=False)
        before = Sandbox.create(template="code-interpreter", timeout=600)
        before.files.write("/home/user/kept.txt", "written before the upgrade")
        assert before.run_code("kept = 6 * 7").error is None
        before.commands.run("nohup sleep 86399 >/dev/null 2>&1 &")

        upgraded = _upgrade(layout, wheels.new_iso)
        assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    finally:
        if os.waitpid(daemon, os.WNOHANG) == (0, 0):  # still ours and running: the upgrade failed
            os.kill(daemon, signal.SIGTERM)
            os.waitpid(daemon, 0)

    # The new version runs, from a new venv behind the same link; the old one is kept for a rollback.
    assert _health() is not None and _health()["version"] == NEW_VERSION  # type: ignore[index]
    assert _cube(layout.link, "--version").stdout.strip().endswith(NEW_VERSION)
    new_venv = layout.link.resolve()
    assert new_venv.parent == layout.versions_dir and new_venv.name.startswith(NEW_VERSION + "-")
    assert first.is_dir()
    assert list((appliance_root / "s").glob(f"cube.db.pre-{__version__}-*"))

    # State kept: the key, the template, and the sandbox: same id, its file, memory and processes.
    headers = {"X-API-KEY": key}
    listed = httpx.get(f"{API}/v2/sandboxes", headers=headers).json()
    assert [s["sandboxID"] for s in listed] == [before.sandbox_id]
    templates = httpx.get(f"{API}/templates", headers=headers).json()
    assert [t["templateID"] for t in templates] == ["code-interpreter"]
    assert_ran_on(before, admin, upgrades=1)

    after = Sandbox.create(template="code-interpreter", timeout=600)
    try:
        assert after.run_code("print(6 * 7)").logs.stdout == ["42\n"]
    finally:
        after.kill()

    # A version whose migration fails: the new service refuses to start, the upgrade puts back
    # the running version and the store as it was.
    broken = _upgrade(layout, wheels.broken)
    assert broken.returncode == 1
    assert "rolling back" in broken.stdout and "no_such_table" in (appliance_root / "cube.log").read_text()
    _wait_for_version(NEW_VERSION)
    assert layout.link.resolve() == new_venv
    assert [p.name for p in layout.versions_dir.iterdir() if p.name.startswith(BROKEN_VERSION)] == []
    assert httpx.get(f"{API}/v2/sandboxes", headers=headers).status_code == 200
    # Left running by each stop; the broken version failed at its store, before taking anything
    # over; the version put back took it over again.
    assert_ran_on(before, admin, upgrades=2)
    before.kill()
