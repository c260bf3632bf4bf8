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


def host_links() -> set[str]:
    shown = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split()[1].split("@")[0].rstrip(":") for line in shown.splitlines()}


def test_uninstall_ends_the_sandboxes_that_outlived_the_service(
    private_service: Callable[..., PrivateService], install_root: Path
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
    running = [pidfd for record in records if (pidfd := record.identity.open_pidfd()) is not None]
    for pidfd in running:
        os.close(pidfd)
    assert len(records) == SANDBOXES and len(running) == SANDBOXES

    uninstall = subprocess.run(
        ["bash", str(INSTALLER), "--root", str(install_root), "--uninstall"],
        env={**os.environ, **service.environment()},
        capture_output=True,
        text=True,
        timeout=UNINSTALL_TIMEOUT_S,
    )

    assert uninstall.returncode == 0, uninstall.stdout + uninstall.stderr + service.log_tail()
    assert "Ending the sandboxes that outlived the service" in uninstall.stdout
    assert [record.pid for record in records if record.identity.open_pidfd() is not None] == []
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
