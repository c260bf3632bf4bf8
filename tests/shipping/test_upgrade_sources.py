"""What `cube upgrade --from` accepts, and that a wheel that does not install changes nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from appliance.master.upgrade import UpgradeFailed, VenvLayout, find_wheel, install_venv, point_link

WHEEL_NAME = "cube_appliance-9.9.9-cp311-cp311-linux_x86_64.whl"


def test_directory_without_or_with_several_wheels_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UpgradeFailed, match="no cube_appliance-"):
        find_wheel(tmp_path, tmp_path / "work")
    (tmp_path / WHEEL_NAME).write_bytes(b"")
    assert find_wheel(tmp_path, tmp_path / "work") == tmp_path / WHEEL_NAME
    (tmp_path / "cube_appliance-9.9.8-py3-none-any.whl").write_bytes(b"")
    with pytest.raises(UpgradeFailed, match="several cube wheels"):
        find_wheel(tmp_path, tmp_path / "work")


def test_wheel_is_read_from_an_iso_without_mounting_it(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "cube" / "wheels").mkdir(parents=True)
    (tree / "cube" / "wheels" / WHEEL_NAME).write_bytes(b"the wheel")
    (tree / "cube" / "wheels" / "trio-0.30.0-py3-none-any.whl").write_bytes(b"a dependency")
    (tree / "cube" / "templates").mkdir()
    (tree / "cube" / "templates" / "code-interpreter.squashfs").write_bytes(b"big, never extracted")
    iso = tmp_path / "appliance.iso"
    subprocess.run(
        ["xorriso", "-as", "mkisofs", "-R", "-o", str(iso), str(tree)], check=True, capture_output=True
    )

    work = tmp_path / "work"
    wheel = find_wheel(iso, work)
    assert wheel.name == WHEEL_NAME and wheel.read_bytes() == b"the wheel"
    assert (wheel.parent / "trio-0.30.0-py3-none-any.whl").is_file()  # pip's --find-links
    assert not list(work.rglob("*.squashfs"))


def test_a_wheel_that_does_not_install_leaves_the_running_venv_alone(tmp_path: Path) -> None:
    layout = VenvLayout(tmp_path / "venv")
    running = tmp_path / "venvs" / "running"
    running.mkdir(parents=True)
    point_link(layout, running)
    broken = tmp_path / WHEEL_NAME
    broken.write_bytes(b"not a zip file")
    with pytest.raises(UpgradeFailed, match="failed"):
        install_venv(broken, layout, "9.9.9", print)
    assert [p.name for p in layout.versions_dir.iterdir()] == ["running"]
    assert layout.link.resolve() == running
