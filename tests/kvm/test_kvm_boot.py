"""The Linux loader: PVH and 64-bit entries, boot_params/start_info, e820, initramfs.

Synthetic kernels (assembled here) report what they were handed on port 0x90, so each
protocol is checked from inside the guest; a real kernel only boots with hardware
virtualization (see test_kvm_linux.py)."""

from __future__ import annotations

import struct
import subprocess
import tempfile
from pathlib import Path

import trio
from kvm_guest import RecordingDevice

from appliance.runtime.kvm.boot import (
    CMDLINE_ADDR,
    HDRS_MAGIC,
    PVH_MAGIC,
    load_linux,
    prepare_boot_vcpu,
)
from appliance.runtime.kvm.machine import Machine, MachineConfig
from appliance.runtime.kvm.mptable import MPTABLE_ADDR, build_mptable
from cffi_kvm import Kvm

MIB = 1 << 20
REPORT = """
    out %eax, $0x90
"""


def link_elf(source: str, path: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="cubetest-kvm-") as tmp:
        work = Path(tmp)
        (work / "k.s").write_text(source)
        subprocess.run(["as", "--64", "-o", work / "k.o", work / "k.s"], check=True, capture_output=True)
        subprocess.run(
            ["ld", "-static", "-nostdlib", "-Ttext=0x1000000", "-o", path, work / "k.o"],
            check=True,
            capture_output=True,
        )
    return path


async def boot_and_collect(
    kvm: Kvm, kernel: Path, initrd: Path | None, reports: int
) -> tuple[list[int], object]:
    machine = Machine.new(kvm, MachineConfig(memory_size=64 * MIB))
    try:
        device = RecordingDevice()
        device.on_write = lambda offset, value: len(device.writes) >= reports and machine.request_stop()
        machine.add_pio_device("report", device, 0x90, 4)
        entry = load_linux(machine.memory, kernel, "console=ttyS0 cube=test", initrd)
        prepare_boot_vcpu(machine.memory, machine.vcpus[0].vcpu, entry)
        with trio.fail_after(20):
            await machine.run()
        return [value for _, value in device.writes], entry
    finally:
        machine.close()


async def test_pvh_entry_gets_start_info_cmdline_and_initramfs(kvm: Kvm, tmp_path: Path) -> None:
    kernel = link_elf(
        """
        .section .note.Xen, "a", @note
        .align 4
        .long 4, 4, 18
        .asciz "Xen"
        .long _start
        .text
        .code32
        .globl _start
    _start:
        mov (%ebx), %eax          # magic
        out %eax, $0x90
        mov 16(%ebx), %eax        # modlist_paddr -> first module's address
        mov (%eax), %eax
        mov (%eax), %eax          # first 4 bytes of the initramfs
        out %eax, $0x90
        mov 24(%ebx), %eax        # cmdline_paddr
        out %eax, $0x90
        mov 48(%ebx), %eax        # memmap_entries
        out %eax, $0x90
        mov %cr0, %eax            # paging must be off
        out %eax, $0x90
        hlt
        """,
        tmp_path / "vmlinux-pvh",
    )
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"CUBE" + bytes(5000))
    values, entry = await boot_and_collect(kvm, kernel, initrd, 5)
    assert entry.protocol == "pvh"  # type: ignore[attr-defined]
    assert values[0] == PVH_MAGIC
    assert values[1] == int.from_bytes(b"CUBE", "little")
    assert values[2] == CMDLINE_ADDR
    assert values[3] == 3  # low RAM, RAM from 1 MiB, the reserved MMIO gap
    assert values[4] & 0x80000001 == 0x1


LINUX64_PROBE = """
    mov 0x202(%rsi), %eax      # setup header magic "HdrS"
    out %eax, $0x90
    mov 0x228(%rsi), %eax      # cmd_line_ptr
    mov (%rax), %eax           # its first 4 bytes: "cons"
    out %eax, $0x90
    mov 0x218(%rsi), %eax      # ramdisk_image
    mov (%rax), %eax
    out %eax, $0x90
    movzbl 0x1e8(%rsi), %eax   # e820 entries
    out %eax, $0x90
    hlt
"""


async def test_vmlinux_without_pvh_note_uses_the_64bit_protocol(kvm: Kvm, tmp_path: Path) -> None:
    kernel = link_elf(".text\n.code64\n.globl _start\n_start:\n" + LINUX64_PROBE, tmp_path / "vmlinux")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"CUBE")
    values, entry = await boot_and_collect(kvm, kernel, initrd, 4)
    assert entry.protocol == "linux64"  # type: ignore[attr-defined]
    assert values == [HDRS_MAGIC, int.from_bytes(b"cons", "little"), int.from_bytes(b"CUBE", "little"), 3]


async def test_bzimage_64bit_entry(kvm: Kvm, tmp_path: Path) -> None:
    code = link_elf(".text\n.code64\n.globl _start\n_start:\n" + LINUX64_PROBE, tmp_path / "probe.elf")
    flat = tmp_path / "probe.bin"
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", code, flat], check=True)
    setup_sects = 4
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x201] = 0x68  # setup header length from 0x202
    struct.pack_into("<IH", setup, 0x202, HDRS_MAGIC, 0x20F)
    struct.pack_into("<I", setup, 0x22C, 0x37FFFFFF)  # initrd_addr_max
    struct.pack_into("<H", setup, 0x236, 1)  # XLF_KERNEL_64
    struct.pack_into("<I", setup, 0x260, 2 * MIB)  # init_size
    bzimage = tmp_path / "bzImage"
    bzimage.write_bytes(bytes(setup) + bytes(0x200) + flat.read_bytes())
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"CUBE")
    values, entry = await boot_and_collect(kvm, bzimage, initrd, 4)
    assert entry.protocol == "linux64"  # type: ignore[attr-defined]
    assert values == [HDRS_MAGIC, int.from_bytes(b"cons", "little"), int.from_bytes(b"CUBE", "little"), 3]


def test_mp_table_lists_every_vcpu_with_valid_checksums() -> None:
    table = build_mptable(4)
    assert table[:4] == b"_MP_" and sum(table[:16]) % 256 == 0
    config_addr = struct.unpack_from("<I", table, 4)[0]
    config = table[config_addr - MPTABLE_ADDR :]
    length, entry_count = struct.unpack_from("<H", config, 4)[0], struct.unpack_from("<H", config, 34)[0]
    assert config[:4] == b"PCMP" and sum(config[:length]) % 256 == 0
    processors = [config[44 + 20 * i : 44 + 20 * (i + 1)] for i in range(4)]
    assert [p[1] for p in processors] == [0, 1, 2, 3]  # APIC ids
    assert [p[3] for p in processors] == [3, 1, 1, 1]  # enabled, CPU 0 boots
    assert entry_count == 4 + 1 + 1 + 24 + 2
