"""Build the kvm runtime's guest kernel from Debian's `linux-source` package.

    nice -n 19 python3 image/kernel/build.py [--cache-dir /var/cache/cube] [--jobs 2]

`make allnoconfig` (x86_64) with microvm.config forced over it (KCONFIG_ALLCONFIG),
so only the options the fragment names (and what they select) are built, then
`make vmlinux` (an ELF with the PVH entry note, which is what the VMM boots): ~930
objects compiled into a ~21 MB vmlinux (35 min at nice 19 on two busy cores).
No RD_* decompressor is enabled: an initramfs, if any, is an uncompressed cpio.
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
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FRAGMENT = Path(__file__).with_name("microvm.config")
# Part of the cache key: changing how the config is derived must not reuse an old kernel.
BASE_CONFIG = "allnoconfig"
MAKE = ["make", "ARCH=x86_64"]
SOURCE_DIR = Path("/usr/src")


def source_tarball() -> Path:
    tarballs = sorted(SOURCE_DIR.glob("linux-source-*.tar.xz"))
    if not tarballs:
        raise SystemExit("no /usr/src/linux-source-*.tar.xz: apt-get install linux-source")
    return tarballs[-1]


def config_hash(tarball: Path) -> str:
    digest = hashlib.sha256(BASE_CONFIG.encode() + b"\0" + FRAGMENT.read_bytes())
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
        problems = configure(tree, log)
        if problems:
            raise SystemExit(f"the config does not honour microvm.config: {'; '.join(problems)} (see {log})")
        _run([*MAKE, f"-j{jobs}", "vmlinux"], tree, log)
        staging = Path(tempfile.mkdtemp(prefix="microvm-", dir=cache_dir / "kernels"))
        staging.chmod(0o755)  # mkdtemp makes it 0700
        shutil.copy2(tree / "vmlinux", staging / "vmlinux")
        shutil.copy2(tree / ".config", staging / "config")
        os.replace(staging, target_dir)  # atomic: a half-built kernel is never picked up
    return vmlinux


def configure(tree: Path, log: Path) -> list[str]:
    """Write `tree`/.config from allnoconfig + the fragment; the options it failed to keep."""
    _run([*MAKE, f"KCONFIG_ALLCONFIG={FRAGMENT}", BASE_CONFIG], tree, log)
    return config_problems((tree / ".config").read_text())


def fragment_options(text: str) -> dict[str, str]:
    """`CONFIG_X=y` lines and `# CONFIG_X is not set` lines of a config, as {name: value or "n"}."""
    options: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        unset = re.fullmatch(r"# (CONFIG_\w+) is not set", line)
        if unset:
            options[unset.group(1)] = "n"
        elif line.startswith("CONFIG_"):
            name, _, value = line.partition("=")
            options[name] = value
    return options


def config_problems(final_config: str) -> list[str]:
    """Fragment options the final .config does not honour (kconfig drops an option
    silently when a dependency is missing, so this is checked, not assumed)."""
    have = fragment_options(final_config)
    problems = []
    for name, wanted in fragment_options(FRAGMENT.read_text()).items():
        got = have.get(name, "n")
        if got != wanted:
            problems.append(f"{name}={wanted} wanted, got {got}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/cache/cube"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    print(build(args.cache_dir, args.jobs))


if __name__ == "__main__":
    main()
