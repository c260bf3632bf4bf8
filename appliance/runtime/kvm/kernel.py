"""`cube image build-kvm-kernel`: the kvm runtime's microVM guest kernel, from image/kernel/build.py.

The build (Debian's linux-source, allnoconfig + image/kernel/microvm.config, `make
vmlinux`) is cached under `<cache_dir>/kernels/microvm-<hash>/vmlinux` by a hash of
its inputs, where `detect.find_guest_kernel` finds it; a second run only prints the
path. ~5 min on 16 cores, ~35 min on two busy ones: it runs under `nice`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from appliance.config import IMAGE_DIR, Config

BUILD_SCRIPT = IMAGE_DIR / "kernel" / "build.py"


def build_guest_kernel(cache_dir: Path, jobs: int | None = None) -> Path:
    """Build (or find in the cache) the microVM kernel; its vmlinux path."""
    command = [
        "nice", "-n", "10", sys.executable, str(BUILD_SCRIPT),
        "--cache-dir", str(cache_dir), "--jobs", str(jobs or os.cpu_count() or 1),
    ]  # fmt: skip
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise click.ClickException(f"the guest kernel build failed (exit status {result.returncode})")
    return Path(result.stdout.strip().splitlines()[-1])


@click.command("build-kvm-kernel")
@click.option("--jobs", type=int, default=None, help="Parallel compile jobs (default: all cores).")
@click.pass_obj
def build_kvm_kernel(config: Config, jobs: int | None) -> None:
    """The kvm runtime's microVM guest kernel (cached in cache_dir/kernels)."""
    click.echo(f"kvm guest kernel: {build_guest_kernel(config.cache_dir, jobs)}")
