"""Build the sandbox UML kernel from Debian's `linux-source` (ARCH=um), cached by input hash.

Inputs: the source tarball (`/usr/src/linux-source-<ver>.tar.xz`, from the
`linux-source` package), the patches in `image/uml/patches/` (applied in name
order) and the config fragment `image/uml/sandbox.config`.
Output: `<cache_dir>/kernels/uml-<hash>/linux` (+ the final `.config` beside it),
which `appliance.runtime.detect.find_uml_kernel` picks up. A build runs only when
that file is missing; it takes ~7 minutes on two cores, so make runs under
`nice` and reports progress by counting compiled objects.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import trio

from appliance.config import IMAGE_DIR, Config
from appliance.progress import Progress, shown

FRAGMENT = IMAGE_DIR / "uml" / "sandbox.config"
PATCH_DIR = IMAGE_DIR / "uml" / "patches"
SOURCE_DIR = Path("/usr/src")
# Objects a `make ARCH=um linux` with our config compiles; only used to turn the
# count of "CC"/"AS"/"LD" lines into a fraction, so being off just skews the bar.
EXPECTED_BUILD_STEPS = 1300


@dataclass(frozen=True)
class KernelSource:
    tarball: Path
    version: str  # Debian package version, part of the cache key


def find_kernel_source(source_dir: Path = SOURCE_DIR) -> KernelSource:
    tarballs = sorted(source_dir.glob("linux-source-*.tar.xz"))
    if not tarballs:
        raise RuntimeError(f"no linux-source tarball in {source_dir}: apt-get install linux-source")
    tarball = tarballs[-1]
    package = tarball.name.removesuffix(".tar.xz")
    version = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False
    ).stdout.strip()
    # Without dpkg metadata (a hand-placed tarball) its size stands in for a version.
    return KernelSource(tarball, version or f"size-{tarball.stat().st_size}")


def kernel_patches(patch_dir: Path = PATCH_DIR) -> list[Path]:
    return sorted(patch_dir.glob("*.patch")) if patch_dir.is_dir() else []


def kernel_key(source: KernelSource, fragment: Path = FRAGMENT, patch_dir: Path = PATCH_DIR) -> str:
    digest = hashlib.sha256()
    digest.update(source.tarball.name.encode() + b"\0" + source.version.encode() + b"\0")
    digest.update(fragment.read_bytes())
    for patch in kernel_patches(patch_dir):
        digest.update(b"\0patch\0" + patch.name.encode() + b"\0" + patch.read_bytes())
    return "uml-" + digest.hexdigest()[:16]


def kernel_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "kernels" / key / "linux"


# Options a sandbox kernel must not have, and why.
FORBIDDEN_OPTIONS = {
    "CONFIG_HOSTFS": "hostfs lets the guest mount whatever the UML process can see",
}


@functools.cache  # asked at every runtime start and boot; a kernel path's content does not change
def kernel_config(kernel: Path) -> dict[str, str]:
    """CONFIG_X → value of the options the kernel binary itself says it was built with
    (`--showconfig`: UML prints its .config and exits before touching anything)."""
    try:
        out = subprocess.run(
            [str(kernel), "--showconfig"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{kernel} --showconfig failed: {e}") from e
    return {m.group(1): m.group(2) for m in re.finditer(r"^(CONFIG_\w+)=(.*)$", out, re.MULTILINE)}


def refuse_unsafe_kernel(kernel: Path) -> None:
    """Raise RuntimeError if `kernel` has an option sandboxes must not have (built in or a module)."""
    config = kernel_config(kernel)
    if "CONFIG_UML" not in config:
        raise RuntimeError(f"{kernel} printed no UML kernel configuration (--showconfig)")
    found = [f"{name}={config[name]} ({why})" for name, why in FORBIDDEN_OPTIONS.items() if name in config]
    if found:
        raise RuntimeError(
            f"UML kernel {kernel} is refused for sandboxes: {'; '.join(found)}. "
            "Build the sandbox kernel (`cube image build-uml-kernel`) or set uml_kernel to one without it"
        )


def fragment_options(fragment: Path) -> dict[str, str | None]:
    """CONFIG_X → value, or None for `# CONFIG_X is not set`."""
    options: dict[str, str | None] = {}
    for line in fragment.read_text().splitlines():
        if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line.strip()):
            options[m.group(1)] = m.group(2)
        elif m := re.fullmatch(r"# (CONFIG_\w+) is not set", line.strip()):
            options[m.group(1)] = None
    return options


def config_mismatches(wanted: dict[str, str | None], dot_config: str) -> list[str]:
    """Options of the fragment that Kconfig dropped or changed (dependencies not met)."""
    have: dict[str, str] = {}
    for line in dot_config.splitlines():
        if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line):
            have[m.group(1)] = m.group(2)
    return [
        f"{name}: wanted {value or 'unset'}, got {have.get(name, 'unset')}"
        for name, value in wanted.items()
        if have.get(name) != value
    ]


async def _run_logged(
    argv: list[str], cwd: Path, log: Path, on_line: Callable[[str], None] | None = None
) -> None:
    """Run a build step niced, appending its output to `log`; raise with the log tail on failure."""
    with log.open("ab") as sink:
        # Own session, so cancelling kills make's whole process group, compilers included.
        process = await trio.lowlevel.open_process(
            ["nice", "-n", "10", *argv],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            assert process.stdout is not None
            pending = b""
            async for chunk in process.stdout:
                sink.write(chunk)
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if on_line is not None:
                    for line in lines:
                        on_line(line.decode(errors="replace"))
            await process.wait()
        finally:
            if process.returncode is None:
                os.killpg(process.pid, signal.SIGKILL)
                with trio.CancelScope(shield=True):
                    await process.wait()
    if process.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode}); see {log}:\n{tail}")


async def build_kernel(
    cache_dir: Path, *, progress: Progress | None = None, fragment: Path = FRAGMENT, jobs: int = 0
) -> Path:
    """Return the cached kernel for the current inputs, building it first if missing."""
    report = progress or (lambda phase, fraction: None)
    source = find_kernel_source()
    key = kernel_key(source, fragment)
    target = kernel_path(cache_dir, key)
    if target.exists():
        report("cached", 1.0)
        return target

    work = cache_dir / "kernels" / f"build-{key}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "build.log"
    report("unpacking linux-source", None)
    await _run_logged(["tar", "-xf", str(source.tarball), "--strip-components=1"], work, log)
    for patch in kernel_patches():
        await _run_logged(["patch", "-p1", "--forward", "-i", str(patch)], work, log)

    report("configuring", None)
    make = ["make", "ARCH=um", "SUBARCH=x86_64"]
    await _run_logged([*make, "defconfig"], work, log)
    await _run_logged(
        ["scripts/kconfig/merge_config.sh", "-m", "-O", str(work), ".config", str(fragment)], work, log
    )
    await _run_logged([*make, "olddefconfig"], work, log)
    wanted = fragment_options(fragment)
    if missing := config_mismatches(wanted, (work / ".config").read_text()):
        raise RuntimeError("kernel config fragment did not apply:\n  " + "\n  ".join(missing))

    steps = 0

    def count_step(line: str) -> None:
        nonlocal steps
        if re.match(r"\s+(CC|AS|LD|AR)\s", line):
            steps += 1
            report("compiling", min(steps / EXPECTED_BUILD_STEPS, 0.99))

    jobs = jobs or os.cpu_count() or 1
    await _run_logged([*make, f"-j{jobs}", "linux"], work, log, count_step)

    # Publish atomically: a half-copied kernel must never look cached.
    final_dir = target.parent
    staging = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copy2(work / "linux", staging / "linux")
    shutil.copy2(work / ".config", staging / "config")
    shutil.rmtree(final_dir, ignore_errors=True)
    staging.rename(final_dir)
    shutil.rmtree(work)
    report("built", 1.0)
    return target


@click.command("build-uml-kernel")
@click.pass_obj
def build_uml_kernel(config: Config) -> None:
    """Build the sandbox UML kernel from linux-source (cached; ~7 min on 2 cores)."""
    with shown("UML kernel") as progress:
        path = trio.run(lambda: build_kernel(config.cache_dir, progress=progress))
    click.echo(f"UML kernel: {path}")
