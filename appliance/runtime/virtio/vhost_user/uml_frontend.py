"""A UML guest as the vhost-user frontend: real Linux virtio drivers for our device models.

Boots a throwaway UML kernel whose init runs a shell script (tests, `cube bench
kvm`). Its root filesystem is a small ext4 image (ubd0) holding a static busybox,
the virtio driver modules the script needs and the script. Two kernels qualify:
the UML kernel built into the cache (drivers built in, vsock too; no initrd) and
Debian's linux.uml (drivers as modules; no virtio-rng; it does not boot on CPUs with
AMX), so the kernel is picked by the drivers a script needs. The guest has no network beyond what
the caller gives it; its console (stdout) comes back as text.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trio

from appliance.config import load_config
from appliance.runtime.detect import DEBIAN_UML

# busybox-static's; CUBE_BUSYBOX names another static one (a host without the package).
BUSYBOX = Path(os.environ.get("CUBE_BUSYBOX", "/bin/busybox"))
PT_INTERP = 3
DEBIAN_UML_MODULES = Path("/usr/lib/uml/modules")
DONE_MARKER = "CUBETEST-DONE"
ROOTFS_MB = 32

# Driver (module name) → the option that builds it in.
DRIVER_OPTIONS = {
    "virtio_blk": "CONFIG_VIRTIO_BLK",
    "virtio_net": "CONFIG_VIRTIO_NET",
    "vmw_vsock_virtio_transport": "CONFIG_VIRTIO_VSOCKETS",
    "virtio_rng": "CONFIG_HW_RANDOM_VIRTIO",
    "virtio_balloon": "CONFIG_VIRTIO_BALLOON",
}


def _module_dir() -> Path | None:
    versions = sorted(DEBIAN_UML_MODULES.glob("*"))
    return versions[-1] if versions else None


def _debian_modules() -> dict[str, list[str]]:
    """module name → [its .ko path, dependencies...] from Debian's UML modules.dep."""
    base = _module_dir()
    if base is None:
        return {}
    deps: dict[str, list[str]] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        module, _, requires = line.partition(":")
        deps[Path(module).name.removesuffix(".ko")] = [module, *requires.split()]
    return deps


def _built_kernels() -> list[Path]:
    kernels = (load_config().cache_dir / "kernels").glob("uml-*/linux")
    return sorted(kernels, key=lambda p: p.stat().st_mtime, reverse=True)


def kernel_for(drivers: list[str]) -> Path | None:
    """A UML kernel that has every driver in `drivers` (built in, or as a Debian module)."""
    for kernel in _built_kernels():
        config = kernel.with_name("config")
        options = set(config.read_text().splitlines()) if config.exists() else set()
        if all(f"{DRIVER_OPTIONS[d]}=y" in options for d in drivers):
            return kernel
    if DEBIAN_UML.exists():
        modules = _debian_modules()
        if all(d in modules for d in drivers):
            return DEBIAN_UML
    return None


def statically_linked(executable: Path) -> bool:
    """An ELF with no program interpreter (PT_INTERP): it runs in a root with no libraries."""
    try:
        image = executable.read_bytes()
    except OSError:
        return False
    if image[:4] != b"\x7fELF" or image[4] != 2:
        return False
    phoff = int.from_bytes(image[0x20:0x28], "little")
    entry_size = int.from_bytes(image[0x36:0x38], "little")
    count = int.from_bytes(image[0x38:0x3A], "little")
    types = (
        int.from_bytes(image[phoff + i * entry_size : phoff + i * entry_size + 4], "little")
        for i in range(count)
    )
    return PT_INTERP not in types


def missing_prerequisite(drivers: list[str]) -> str | None:
    if not statically_linked(BUSYBOX):
        # Debian's `busybox` (dynamic, e.g. the appliance ISO's) would not start as the guest's init.
        return "no static busybox for the guest's root filesystem (install busybox-static)"
    if shutil.which("mkfs.ext4") is None:
        return "no mkfs.ext4 (install e2fsprogs)"
    if kernel_for(drivers) is None:
        return (
            f"no UML kernel with {', '.join(drivers)}: build one (`cube image build-uml-kernel`: "
            "blk/net/vsock/rng/balloon built in); Debian's linux.uml has virtio blk/net/vsock as modules"
        )
    return None


def module_paths(kernel: Path, drivers: list[str]) -> list[Path]:
    """The .ko files (dependencies first) Debian's UML needs for `drivers`; none for a built kernel."""
    base = _module_dir()
    if kernel != DEBIAN_UML or base is None:
        return []
    deps = _debian_modules()
    ordered: list[Path] = []
    for name in drivers:
        module, *requires = deps[name]
        for path in [*reversed(requires), module]:
            if base / path not in ordered:
                ordered.append(base / path)
    return ordered


def init_script(script: str, modules: list[str], final_command: str) -> str:
    return "\n".join(
        [
            "#!/bin/busybox sh",
            "/bin/busybox --install -s /bin",
            "export PATH=/bin",
            "mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null",
            "mount -t tmpfs tmp /tmp",
            *(f"insmod /lib/modules/{name}" for name in modules),
            "set -x",
            script,
            "set +x",
            f"echo {DONE_MARKER} rc=$?",
            final_command,
        ]
    )


class _Cpio:
    """newc cpio writer (the initramfs format)."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.inode = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        fields = [self.inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        header = b"070701" + b"".join(f"{value:08x}".encode() for value in fields)
        self.out.write(header + name.encode() + b"\0")
        self.out.write(b"\0" * (-self.out.tell() % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-self.out.tell() % 4))
        self.inode += 1

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def build_initramfs(script: str, *, final_command: str = "reboot -f") -> bytes:
    """gzip'd cpio with busybox and /init running `script` (for a KVM guest kernel)."""
    archive = _Cpio()
    for directory in ("bin", "dev", "proc", "sys", "tmp"):
        archive.directory(directory)
    archive.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    archive.file("init", init_script(script, [], final_command).encode(), 0o755)
    return gzip.compress(archive.finish(), compresslevel=1)


def build_rootfs(
    image: Path, script: str, kernel: Path, drivers: list[str], extra_files: dict[str, bytes] | None = None
) -> None:
    """An ext4 image for ubd0: busybox, the modules `drivers` need on `kernel`, /init."""
    with tempfile.TemporaryDirectory(prefix="uml-rootfs-") as tmp:
        root = Path(tmp)
        for directory in ("bin", "dev", "proc", "sys", "tmp", "lib/modules"):
            (root / directory).mkdir(parents=True)
        shutil.copy2(BUSYBOX, root / "bin/busybox")
        names = []
        for path in module_paths(kernel, drivers):
            shutil.copy2(path, root / "lib/modules" / path.name)
            names.append(path.name)
        for name, data in (extra_files or {}).items():
            (root / name).write_bytes(data)
            (root / name).chmod(0o755)
        init = root / "init"
        init.write_text(init_script(script, names, "poweroff -f"))  # UML: reboot loops
        init.chmod(0o755)
        subprocess.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-d",
                str(root),
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                str(image),
                f"{ROOTFS_MB}M",
            ],
            check=True,
            capture_output=True,
        )


@dataclass
class GuestRun:
    console: str
    returncode: int
    seconds: float

    def value(self, key: str) -> str:
        """The text after `key=` on the console line the script printed it on."""
        for line in self.console.splitlines():
            if line.startswith(f"{key}="):
                return line.split("=", 1)[1].strip()
        raise AssertionError(f"{key}= not printed by the guest; console:\n{self.console[-3000:]}")


async def run_uml(
    script: str,
    *,
    devices: list[tuple[Path, int]],
    drivers: list[str],
    memory_mb: int = 128,
    timeout: float = 60,
    extra_files: dict[str, bytes] | None = None,
) -> GuestRun:
    """Run `script` as the guest's init; `devices` are (vhost-user socket, virtio device id)."""
    kernel = kernel_for(drivers)
    if kernel is None:
        raise RuntimeError(missing_prerequisite(drivers))
    with tempfile.TemporaryDirectory(prefix="cube-uml-frontend-") as tmp:
        work = Path(tmp)
        rootfs = work / "rootfs.ext4"
        await trio.to_thread.run_sync(build_rootfs, rootfs, script, kernel, drivers, extra_files)
        (work / "uml").mkdir()
        command = [
            str(kernel),
            f"mem={memory_mb}M",
            f"ubd0={rootfs}",
            "root=/dev/ubda",
            "rw",
            "init=/init",
            f"uml_dir={work / 'uml'}",
            "umid=cube-frontend",
            "con=null",
            "con0=null,fd:1",
            "ssl=null",
            "quiet",
            *(f"virtio_uml.device={socket_path}:{device_id}" for socket_path, device_id in devices),
        ]
        started = trio.current_time()
        # Its own session: UML forks helper processes, and a timeout kills the group.
        process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # UML's memory file lives in TMPDIR (unlinked at once); tmpfs keeps it off disk.
            env={"PATH": "/usr/bin:/bin", "TMPDIR": "/dev/shm" if Path("/dev/shm").is_dir() else str(work)},
        )
        output = bytearray()
        marker = DONE_MARKER.encode()
        try:
            assert process.stdout is not None
            with trio.move_on_after(timeout):
                async for chunk in process.stdout:
                    output.extend(chunk)
                    if marker in output and b"\n" in output[output.rfind(marker) :]:
                        break
                await process.wait()
        finally:
            if process.returncode is None:
                with trio.move_on_after(5) as cleanup:
                    cleanup.shield = True
                    await trio.sleep(1)  # poweroff -f is on its way
                    if process.returncode is None:
                        os.killpg(process.pid, signal.SIGKILL)
                    await process.wait()
        console = output.decode(errors="replace")
        return GuestRun(console, process.returncode or 0, trio.current_time() - started)
