"""The uninstaller ends the sandboxes that outlived the service (installer/install.sh --uninstall).

A private service laid out as an install under `--root` (its run directory is that root's
/run/cube, its venv that root's /opt/cube/venv: this very interpreter's) gets two sandboxes,
is stopped with SIGTERM (they run on, as after `systemctl stop`), and the uninstaller runs:
afterwards nothing of them is left on the host.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from hostprocs import sandbox_leftovers

from appliance.bench.private import PrivateService
from appliance.net.addressing import Addressing
from appliance.net.ebpf import pin_dir_of
from appliance.runtime.supervisor.protocol import RECORD_FILE, SupervisorRecord

pytestmark = [pytest.mark.uml]

INSTALLER = Path(__file__).resolve().parents[2] / "installer" / "install.sh"
SANDBOXES = 2
UNINSTALL_TIMEOUT_S = 600  # the last start compiles the eBPF program: long on a loaded host


@pytest.fixture
def install_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="cubeun-", dir="/tmp"))  # short: UML's socket paths
    (root / "opt" / "cube").mkdir(parents=True)
    (root / "opt" / "cube" / "venv").symlink_to(Path(sys.prefix))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def alive(record: SupervisorRecord) -> bool:
    """The supervisor of this record runs (its pid with its start time: never a recycled pid)."""
    pidfd = record.identity.open_pidfd()
    if pidfd is None:
        return False
    os.close(pidfd)
    return True


def host_links() -> set[str]:
    shown = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split()[1].split("@")[0].rstrip(":") for line in shown.splitlines()}


def test_uninstall_ends_the_sandboxes_that_outlived_the_service(
    install_root: Path,  # first: removed after the service's own teardown, which may need its run dir
    private_service: Callable[..., PrivateService],
) -> None:
    service = private_service(extra_env={"CUBE_RUN_DIR": str(install_root / "run" / "cube")})
    service.start()
    service.wait_ready()
    key = service.create_key("uninstall")
    with httpx.Client(base_url=service.url, timeout=300, trust_env=False) as client:
        for _ in range(SANDBOXES):
            made = client.post(
                "/sandboxes", json={"templateID": "code-interpreter"}, headers={"X-API-KEY": key}
            )
            assert made.status_code == 201, made.text
    ids = service.sandbox_ids()
    service.stop(signal.SIGTERM)  # as `systemctl stop`: the sandboxes run on
    supervisors = service.run_dir / "supervisors"
    records = [SupervisorRecord.decode((supervisors / i / RECORD_FILE).read_bytes()) for i in ids]
    assert len(records) == SANDBOXES and all(alive(record) for record in records)

    # Hard links of the run dir (its sockets too): should the uninstaller leave the sandboxes
    # running, they go back in place for the fixture's end to take over and end.
    kept_run_dir = service.root / "kept-run"
    shutil.copytree(service.run_dir, kept_run_dir, copy_function=os.link)
    try:
        check_uninstall(service, install_root, ids, records)
    finally:
        if any(alive(record) for record in records):
            service.run_dir.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(service.run_dir, ignore_errors=True)
            kept_run_dir.rename(service.run_dir)


def check_uninstall(
    service: PrivateService, install_root: Path, ids: set[str], records: list[SupervisorRecord]
) -> None:
    uninstall = subprocess.run(
        ["bash", str(INSTALLER), "--root", str(install_root), "--uninstall"],
        env={**os.environ, **service.environment()},
        capture_output=True,
        text=True,
        timeout=UNINSTALL_TIMEOUT_S,
    )

    assert uninstall.returncode == 0, uninstall.stdout + uninstall.stderr + service.log_tail()
    assert "Ending the sandboxes that outlived the service" in uninstall.stdout
    assert [record.pid for record in records if alive(record)] == []
    addressing = Addressing(service.settings.host_network)
    slots = addressing.max_slots
    assert sandbox_leftovers(ids, service.settings.uid_base, slots) == {
        "netns": [],
        "cgroups": [],
        "processes": [],
    }
    assert not [link for link in host_links() if link.startswith(addressing.veth_prefix)]
    assert not pin_dir_of(addressing).exists()
    assert [p for p in install_root.rglob("*") if not p.is_dir()] == []  # run/cube, the venv link: gone
    assert not any((service.state_dir / "sandboxes").iterdir())
    with contextlib.closing(sqlite3.connect(service.state_dir / "cube.db")) as db:
        states = dict(db.execute("SELECT sandbox_id, state FROM sandboxes"))
    assert set(states) == ids and set(states.values()) == {"dead"}, states
