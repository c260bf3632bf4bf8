"""installer/install.sh: preflight on this host, and install twice + uninstall inside a --root.

The host-wide steps (apt, kernel header links, systemd, service start, netns, bpf
pins, nftables, cgroups) are skipped under --root, so this never touches the
appliance installed on this machine; the full install on a fresh host is what
tests/run.sh (the integrator's CI) runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]
INSTALLER = CHECKOUT / "installer" / "install.sh"
# Directories every Debian/Ubuntu host already has; the installer writes inside them.
HOST_DIRS = (
    "opt",
    "etc/systemd/system",
    "etc/logrotate.d",
    "usr/local/bin",
    "var/lib",
    "var/cache",
    "var/log",
    "run",
)


def install_sh(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(
        ["bash", str(INSTALLER), *args], env=env, capture_output=True, text=True, timeout=1800
    )


def everything_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_check_reports_this_host_and_changes_nothing(tmp_path: Path) -> None:
    result = install_sh("--check", "--root", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    expected_kind = (
        "PVM" if Path("/sys/module/kvm_pvm").is_dir() else ("none" if not Path("/dev/kvm").exists() else "")
    )
    assert lines["kvm"].strip().startswith(expected_kind)
    assert "uml runtime" in lines["kvm"] or "kvm runtime" in lines["kvm"]
    for key in ("os", "arch", "headers", "disk", "systemd"):
        assert lines[key].strip(), key
    assert "GiB free" in lines["disk"]
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def no_build_dir_left() -> Iterator[None]:
    """`pip install CHECKOUT` (what the installer runs) builds in the tree: build/ (git-ignored)."""
    existed = (CHECKOUT / "build").exists()
    yield
    if not existed:
        shutil.rmtree(CHECKOUT / "build", ignore_errors=True)


@pytest.mark.usefixtures("no_build_dir_left")
def test_installs_twice_then_uninstall_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "host"
    for directory in HOST_DIRS:
        (root / directory).mkdir(parents=True)
    before = everything_under(root)

    first = install_sh("--root", str(root), "--no-build")
    assert first.returncode == 0, first.stdout + first.stderr
    installed = everything_under(root)
    for path in (
        "opt/cube/venv/bin/cube",
        "etc/cube/appliance.toml",
        "etc/systemd/system/cube.service",
        "etc/logrotate.d/cube",
        "usr/local/bin/cube",
        "usr/local/bin/cubemastercli",
        "var/lib/cube",
        "var/cache/cube",
        "var/log/cube",
        "run/cube",
    ):
        assert path in installed, path
    assert (root / "var/lib/cube").stat().st_mode & 0o777 == 0o700
    version = subprocess.run(
        [str(root / "usr/local/bin/cube"), "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("cube, version ")
    assert "export E2B_API_URL=http://127.0.0.1:3000" in first.stdout

    # The operator's edits survive a second run, which must succeed and change nothing else.
    config = root / "etc/cube/appliance.toml"
    config.write_text(config.read_text() + "\n# edited by the operator\n")
    (root / "var/cache/cube/kernels").mkdir()
    (root / "var/cache/cube/kernels/uml-cached").write_text("a cached build")
    second = install_sh("--root", str(root), "--no-build")
    assert second.returncode == 0, second.stdout + second.stderr
    assert config.read_text().endswith("# edited by the operator\n")

    # Outside the venv (whose packages follow the checkout, which other work may change meanwhile).
    def outside_venv(paths: set[str]) -> set[str]:
        return {p for p in paths if not p.startswith("opt/cube/venv/")}

    cached = {"var/cache/cube/kernels", "var/cache/cube/kernels/uml-cached"}
    assert outside_venv(everything_under(root)) == outside_venv(installed) | cached

    keep = install_sh("--root", str(root), "--uninstall", "--keep-cache")
    assert keep.returncode == 0, keep.stdout + keep.stderr
    assert everything_under(root) == before | {
        "var/cache/cube",
        "var/cache/cube/kernels",
        "var/cache/cube/kernels/uml-cached",
    }

    gone = install_sh("--root", str(root), "--uninstall")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert everything_under(root) == before
