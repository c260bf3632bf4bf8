"""guest_diff (what a RUN step changed, as a layer) on a host directory, applied back with the unpacker."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from appliance.templates import guest_diff
from appliance.templates.unpack import apply_layer


def test_diff_applied_to_a_copy_reproduces_the_changes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "gone/deep").mkdir(parents=True)
    (root / "gone/deep/f").write_text("x")
    (root / "keep").mkdir()
    (root / "keep/changed").write_text("v1")
    (root / "keep/same").write_text("same")
    (root / "unlinked").write_text("h")
    os.link(root / "unlinked", root / "keep/other-name")
    (root / "excluded").mkdir()
    before = json.loads(json.dumps(guest_diff.walk(frozenset({"/excluded"}), str(root))))
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(root), str(copy)], check=True)

    shutil.rmtree(root / "gone")
    (root / "keep/changed").write_text("v2")
    (root / "keep/sym").symlink_to("same")
    (root / "new").mkdir()
    (root / "new/file").write_bytes(b"new")
    os.setxattr(root / "new/file", "user.cube", b"\xff\x00bin")
    os.link(root / "new/file", root / "new/link")
    (root / "unlinked").unlink()
    (root / "excluded/noise").write_text("not part of the image")

    layer = tmp_path / "changes.tar"
    with layer.open("wb") as out:
        guest_diff.write_diff(before, guest_diff.walk(frozenset({"/excluded"}), str(root)), out, str(root))
    with tarfile.open(layer) as tar:
        names = tar.getnames()
    assert ".wh.gone" in names and "gone/.wh.deep" not in names and ".wh.unlinked" in names
    assert "keep/same" not in names and not any(n.startswith("excluded") for n in names)

    apply_layer(copy, layer, None, "changes")
    (root / "excluded/noise").unlink()
    assert subprocess.run(["diff", "-r", "--no-dereference", str(root), str(copy)]).returncode == 0
    assert os.stat(copy / "new/file").st_ino == os.stat(copy / "new/link").st_ino
    assert os.getxattr(copy / "new/file", "user.cube") == b"\xff\x00bin"
