"""The microVM guest kernel of image/kernel: its config fragment survives Kconfig, and
the built vmlinux is a PVH kernel the VMM's loader accepts (no Linux boot needed: that
is test_kvm_linux.py, which needs hardware virtualization)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from appliance.config import load_config
from appliance.runtime.kvm.boot import CMDLINE_ADDR, PVH_MAGIC, PVH_START_INFO, load_linux
from appliance.runtime.kvm.memory import GuestMemory

MIB = 1 << 20
BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "image" / "kernel" / "build.py"
# What Kconfig reads for allnoconfig + a fragment: every Kconfig file, the top Makefile,
# scripts/ (kconfig's sources, the toolchain probes) and the x86 Makefiles.
KCONFIG_INPUTS = ("*Kconfig*", "*/scripts/*", "*/Makefile", "*/arch/x86/Makefile*")


def load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("microvm_kernel_build", BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = load_build()


def built_kernel_dir() -> Path | None:
    """The cache entry for the current fragment and source, if it has been built."""
    try:
        tarball = build.source_tarball()
    except SystemExit:
        return None
    directory = load_config().cache_dir / "kernels" / f"microvm-{build.config_hash(tarball)}"
    return directory if (directory / "vmlinux").exists() else None


def test_fragment_asks_for_what_a_microvm_guest_needs() -> None:
    wanted = build.fragment_options(build.FRAGMENT.read_text())
    for option in (
        "CONFIG_64BIT",
        "CONFIG_PVH",
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
        "CONFIG_VIRTIO_BLK",
        "CONFIG_VIRTIO_NET",
        "CONFIG_VIRTIO_VSOCKETS",
        "CONFIG_HW_RANDOM_VIRTIO",
        "CONFIG_VIRTIO_CONSOLE",
        "CONFIG_SERIAL_8250_CONSOLE",
        "CONFIG_EXT4_FS",
        "CONFIG_OVERLAY_FS",
        "CONFIG_TMPFS",
        "CONFIG_DEVTMPFS",
        "CONFIG_UNIX",
        "CONFIG_IPV6",
        "CONFIG_FUTEX",
        "CONFIG_EPOLL",
        "CONFIG_MULTIUSER",
        "CONFIG_BINFMT_ELF",
    ):
        assert wanted.get(option) == "y", option
    assert wanted["CONFIG_MODULES"] == wanted["CONFIG_PCI"] == wanted["CONFIG_ACPI"] == "n"


def test_config_check_reports_dropped_and_unwanted_options() -> None:
    wanted = build.fragment_options(build.FRAGMENT.read_text())
    honoured = "\n".join(f"{name}={value}" for name, value in wanted.items() if value != "n")
    assert build.config_problems(honoured) == []
    dropped = honoured.replace("CONFIG_PVH=y\n", "# CONFIG_PVH is not set\n")
    assert build.config_problems(dropped) == ["CONFIG_PVH=y wanted, got n"]
    assert build.config_problems(honoured + "\nCONFIG_MODULES=y") == ["CONFIG_MODULES=n wanted, got y"]


def test_fragment_survives_kconfig(tmp_path: Path) -> None:
    """allnoconfig + the fragment through the source's own Kconfig keeps every option
    (Kconfig silently drops an option whose dependencies are missing)."""
    try:
        tarball = build.source_tarball()
    except SystemExit as e:
        pytest.skip(str(e))
    subprocess.run(["tar", "-xf", tarball, "-C", tmp_path, "--wildcards", *KCONFIG_INPUTS], check=True)
    tree = next(p for p in tmp_path.iterdir() if p.is_dir())
    log = tmp_path / "kconfig.log"
    assert build.configure(tree, log) == [], log.read_text()[-2000:]


KERNEL_DIR = built_kernel_dir()


@pytest.mark.skipif(
    KERNEL_DIR is None,
    reason="the microVM kernel is not built here (nice -n 19 python3 image/kernel/build.py, a few minutes)",
)
def test_built_vmlinux_is_a_pvh_kernel_the_loader_accepts() -> None:
    assert KERNEL_DIR is not None
    assert build.config_problems((KERNEL_DIR / "config").read_text()) == []
    vmlinux = KERNEL_DIR / "vmlinux"
    notes = subprocess.run(["readelf", "-n", vmlinux], check=True, capture_output=True, text=True).stdout
    # readelf names the owner; binutils 2.40 has no name for Xen's note type 18 (PHYS32_ENTRY).
    assert any(line.split()[:1] == ["Xen"] and "0x00000012" in line for line in notes.splitlines()), notes
    memory = GuestMemory.anonymous(256 * MIB)
    try:
        cmdline = "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"
        entry = load_linux(memory, vmlinux, cmdline)
        assert entry.protocol == "pvh"
        assert 0x100000 <= entry.entry < 0x4000000  # the 32-bit entry, physical, inside the image
        assert memory.read(CMDLINE_ADDR, len(cmdline) + 1) == cmdline.encode() + b"\0"
        # hvm_start_info: magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr
        assert memory.read_int(PVH_START_INFO, 4) == PVH_MAGIC
        # The kernel's first bytes at the entry are code the loader copied from the ELF.
        assert memory.read(entry.entry, 16) != bytes(16)
    finally:
        memory.close()
