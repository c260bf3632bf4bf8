"""The cube wheel, built from a copy of this checkout as it is (tracked and new files), never
in the checkout itself: a wheel build writes build/ and egg-info into its source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]


def copy_checkout(dest: Path) -> None:
    listed = subprocess.run(
        ["git", "-C", str(CHECKOUT), "ls-files", "-co", "--exclude-standard", "-z"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = CHECKOUT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def build_wheel(tree: Path, out: Path) -> Path:
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip_wheel, "-w", str(out), str(tree)], check=True, capture_output=True)
    [wheel] = out.glob("cube_appliance-*.whl")
    return wheel
