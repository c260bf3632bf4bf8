"""Build the kvm runtime's guest kernel from Debian's `linux-source` package.

    nice -n 19 python3 image/kernel/build.py [--cache-dir /var/cache/cube] [--jobs 2]

`make defconfig` (x86_64) + microvm.config merged over it + `make olddefconfig`,
then `make vmlinux` (an ELF with the PVH entry note, which is what the VMM boots).
The result is cached by a hash of the fragment and the source tarball at
`<cache>/kernels/microvm-<hash>/vmlinux` (with its final .config beside it);
a second run with the same inputs only prints that path. The kvm runtime picks
the newest such kernel unless `kvm_guest_kernel` is configured.

PVM hosts need CONFIG_PVM_GUEST, which Debian's 6.1 source does not have; the
kernel built here is for VMX/SVM hosts.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FRAGMENT = Path(__file__).with_name("microvm.config")
SOURCE_DIR = Path("/usr/src")


def source_tarball() -> Path:
    tarballs = sorted(SOURCE_DIR.glob("linux-source-*.tar.xz"))
    if not tarballs:
        raise SystemExit("no /usr/src/linux-source-*.tar.xz: apt-get install linux-source")
    return tarballs[-1]


def config_hash(tarball: Path) -> str:
    digest = hashlib.sha256(FRAGMENT.read_bytes())
    stat = tarball.stat()
    # The tarball is ~140 MB: its name, size and mtime identify the package version.
    digest.update(f"{tarball.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


def _run(command: list[str], cwd: Path, log: Path) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=True)


def build(cache_dir: Path, jobs: int) -> Path:
    tarball = source_tarball()
    target_dir = cache_dir / "kernels" / f"microvm-{config_hash(tarball)}"
    vmlinux = target_dir / "vmlinux"
    if vmlinux.exists():
        return vmlinux
    (cache_dir / "kernels").mkdir(parents=True, exist_ok=True)
    log = cache_dir / "kernels" / f"{target_dir.name}.log"
    with tempfile.TemporaryDirectory(prefix="build-microvm-", dir=cache_dir / "kernels") as tmp:
        work = Path(tmp)
        _run(["tar", "-xf", str(tarball), "-C", str(work)], work, log)
        tree = next(p for p in work.iterdir() if p.is_dir())
        make = ["make", "ARCH=x86_64"]
        _run([*make, "defconfig"], tree, log)
        _run(["scripts/kconfig/merge_config.sh", "-m", ".config", str(FRAGMENT)], tree, log)
        _run([*make, "olddefconfig"], tree, log)
        missing = _missing_options(tree / ".config")
        if missing:
            raise SystemExit(f"the merged config lost required options: {', '.join(missing)} (see {log})")
        _run([*make, f"-j{jobs}", "vmlinux"], tree, log)
        staging = Path(tempfile.mkdtemp(prefix="microvm-", dir=cache_dir / "kernels"))
        shutil.copy2(tree / "vmlinux", staging / "vmlinux")
        shutil.copy2(tree / ".config", staging / "config")
        os.replace(staging, target_dir)  # atomic: a half-built kernel is never picked up
    return vmlinux


def _missing_options(config: Path) -> list[str]:
    have = set(config.read_text().splitlines())
    wanted = [line for line in FRAGMENT.read_text().splitlines() if line.startswith("CONFIG_")]
    return [line for line in wanted if line not in have]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/cache/cube"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    print(build(args.cache_dir, args.jobs))


if __name__ == "__main__":
    sys.exit(main())
