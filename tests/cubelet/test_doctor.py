"""`cube doctor` says why the uml runtime cannot use a kernel, instead of naming it as usable."""

from __future__ import annotations

from pathlib import Path

from appliance.config import Config
from appliance.cubelet.doctor import check_uml


def fake_uml_kernel(path: Path, options: str) -> Path:
    """An executable that answers `--showconfig` as a UML kernel built with `options` would."""
    path.write_text(f"#!/bin/sh\nprintf 'CONFIG_UML=y\\n{options}'\n")
    path.chmod(0o755)
    return path


def test_a_kernel_with_hostfs_is_reported_refused(tmp_path: Path) -> None:
    kernel = fake_uml_kernel(tmp_path / "linux.uml", "CONFIG_HOSTFS=y\\n")
    check = check_uml(Config(uml_kernel=kernel, state_dir=tmp_path, cache_dir=tmp_path))
    assert not check.ok
    assert "hostfs" in check.detail and "refused" in check.detail


def test_a_kernel_without_hostfs_is_usable(tmp_path: Path) -> None:
    kernel = fake_uml_kernel(tmp_path / "linux", "CONFIG_EXT4_FS=y\\n")
    check = check_uml(Config(uml_kernel=kernel, state_dir=tmp_path, cache_dir=tmp_path))
    assert check.ok and check.detail == str(kernel)


def test_no_kernel_is_reported(tmp_path: Path) -> None:
    check = check_uml(Config(uml_kernel=tmp_path / "missing", state_dir=tmp_path, cache_dir=tmp_path))
    assert not check.ok and "no UML kernel" in check.detail
