"""Loading a Linux kernel into guest RAM and pointing vCPU 0 at its entry.

Three ways in, picked from the image:
- ELF vmlinux with a XEN_ELFNOTE_PHYS32_ENTRY note: PVH (32-bit protected mode,
  paging off, %ebx = struct hvm_start_info) — what the microVM kernel uses;
- ELF vmlinux without it: the 64-bit boot protocol at the ELF entry (%rsi = boot_params);
- bzImage: its protected-mode part at 1 MiB, 64-bit entry at 1 MiB + 0x200.
Both protocols get the command line, the initramfs (if any) and an e820 map.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from appliance.runtime.kvm.memory import MMIO_GAP_END, MMIO_GAP_START, GuestMemory
from appliance.runtime.kvm.mptable import write_mptable
from appliance.runtime.kvm.x86 import GDT_ADDR, RFLAGS_RESERVED, enter_long_mode, gdt_entry, load_segment
from cffi_kvm import Vcpu

ZERO_PAGE = 0x7000
PVH_START_INFO = 0x6000
PVH_MEMMAP = 0x6100
PVH_MODLIST = 0x6400
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
BOOT_STACK = 0x8FF0
HIGH_MEMORY = 0x100000  # bzImage protected-mode kernel load address
EBDA_START = 0x9FC00
E820_RAM = 1
E820_RESERVED = 2

PVH_MAGIC = 0x336EC578
XEN_ELFNOTE_PHYS32_ENTRY = 18
HDRS_MAGIC = 0x53726448  # "HdrS"
XLF_KERNEL_64 = 1 << 0
LOADFLAG_LOADED_HIGH = 0x01
LOADFLAG_CAN_USE_HEAP = 0x80


class KernelFormatError(ValueError):
    pass


@dataclass(frozen=True)
class BootEntry:
    protocol: str  # "pvh" | "linux64"
    entry: int
    initrd: tuple[int, int] | None  # (guest address, size)


def e820_map(memory: GuestMemory) -> list[tuple[int, int, int]]:
    """(address, size, type): low RAM below the EBDA, RAM from 1 MiB, the MMIO gap reserved."""
    entries = [(0, EBDA_START, E820_RAM)]
    for region in memory.regions:
        start = max(region.start, HIGH_MEMORY)
        if region.end > start:
            entries.append((start, region.end - start, E820_RAM))
    entries.append((MMIO_GAP_START, MMIO_GAP_END - MMIO_GAP_START, E820_RESERVED))
    return sorted(entries)


def _load_elf(memory: GuestMemory, image: bytes) -> tuple[int, int | None, int]:
    """Load PT_LOAD segments at their physical addresses; (ELF entry, PVH entry or None, end)."""
    if image[:4] != b"\x7fELF" or image[4] != 2:
        raise KernelFormatError("not a 64-bit ELF")
    e_entry, e_phoff = struct.unpack_from("<QQ", image, 0x18)
    e_phentsize, e_phnum = struct.unpack_from("<HH", image, 0x36)
    pvh_entry = None
    end = 0
    for i in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", image, e_phoff + i * e_phentsize
        )
        if p_type == 1:  # PT_LOAD
            memory.write(p_paddr, image[p_offset : p_offset + p_filesz])
            if p_memsz > p_filesz:
                memory.write(p_paddr + p_filesz, bytes(p_memsz - p_filesz))
            end = max(end, p_paddr + p_memsz)
        elif p_type == 4:  # PT_NOTE
            pvh_entry = _pvh_note(image[p_offset : p_offset + p_filesz]) or pvh_entry
    return e_entry, pvh_entry, end


def _pvh_note(notes: bytes) -> int | None:
    offset = 0
    while offset + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, offset)
        name_start = offset + 12
        desc_start = name_start + (namesz + 3) // 4 * 4
        if (
            kind == XEN_ELFNOTE_PHYS32_ENTRY
            and notes[name_start : name_start + namesz].rstrip(b"\0") == b"Xen"
        ):
            size = 8 if descsz >= 8 else 4
            return int.from_bytes(notes[desc_start : desc_start + size], "little")
        offset = desc_start + (descsz + 3) // 4 * 4
    return None


def _place_initrd(memory: GuestMemory, initrd: bytes, max_address: int, kernel_end: int) -> int:
    """At the top of low RAM (below `max_address`), clear of the kernel image."""
    low_ram_end = min(memory.regions[0].end, max_address + 1)
    address = (low_ram_end - len(initrd)) & ~0xFFF
    if address < kernel_end:
        raise KernelFormatError(f"initramfs of {len(initrd)} bytes does not fit in guest RAM")
    memory.write(address, initrd)
    return address


def load_linux(memory: GuestMemory, kernel: Path, cmdline: str, initrd: Path | None = None) -> BootEntry:
    image = kernel.read_bytes()
    arguments = cmdline.encode() + b"\0"
    if len(arguments) > CMDLINE_MAX:
        raise KernelFormatError("kernel command line too long")
    memory.write(CMDLINE_ADDR, arguments)
    initrd_data = initrd.read_bytes() if initrd is not None else None

    if image[:4] == b"\x7fELF":
        elf_entry, pvh_entry, kernel_end = _load_elf(memory, image)
        if pvh_entry is not None:
            placed = _place_initrd(memory, initrd_data, 0xFFFFFFFF, kernel_end) if initrd_data else None
            loaded = (placed, len(initrd_data)) if placed is not None and initrd_data else None
            _write_pvh_start_info(memory, loaded)
            return BootEntry("pvh", pvh_entry, loaded)
        setup_header = _default_setup_header()
        entry = elf_entry
        initrd_max = 0x37FFFFFF
    else:
        if len(image) < 0x250 or struct.unpack_from("<I", image, 0x202)[0] != HDRS_MAGIC:
            raise KernelFormatError(f"{kernel}: neither an ELF vmlinux nor a bzImage")
        version, xloadflags = (
            struct.unpack_from("<H", image, 0x206)[0],
            struct.unpack_from("<H", image, 0x236)[0],
        )
        if version < 0x206 or not xloadflags & XLF_KERNEL_64:
            raise KernelFormatError(f"{kernel}: bzImage protocol {version:#x} without a 64-bit entry")
        setup_sects = image[0x1F1] or 4
        header_end = 0x202 + image[0x201]
        setup_header = bytearray(image[0x1F1:header_end])
        memory.write(HIGH_MEMORY, image[(setup_sects + 1) * 512 :])
        entry = HIGH_MEMORY + 0x200
        initrd_max = struct.unpack_from("<I", image, 0x22C)[0] or 0x37FFFFFF
        # The kernel decompresses in place and needs init_size bytes from where it was loaded.
        kernel_end = HIGH_MEMORY + max(len(image), struct.unpack_from("<I", image, 0x260)[0])

    placed = _place_initrd(memory, initrd_data, initrd_max, kernel_end) if initrd_data else None
    loaded = (placed, len(initrd_data)) if placed is not None and initrd_data else None
    _write_boot_params(memory, setup_header, len(arguments), loaded)
    return BootEntry("linux64", entry, loaded)


def _default_setup_header() -> bytearray:
    """The setup header a bzImage would carry, for an ELF vmlinux (as Firecracker does)."""
    header = bytearray(0x268 - 0x1F1)
    struct.pack_into("<H", header, 0x1FE - 0x1F1, 0xAA55)
    struct.pack_into("<I", header, 0x202 - 0x1F1, HDRS_MAGIC)
    struct.pack_into("<I", header, 0x230 - 0x1F1, 0x1000000)  # kernel_alignment
    return header


def _write_boot_params(
    memory: GuestMemory, setup_header: bytearray, cmdline_size: int, initrd: tuple[int, int] | None
) -> None:
    params = bytearray(4096)
    params[0x1F1 : 0x1F1 + len(setup_header)] = setup_header
    params[0x210] = 0xFF  # type_of_loader: undefined
    params[0x211] |= LOADFLAG_LOADED_HIGH | LOADFLAG_CAN_USE_HEAP
    struct.pack_into("<H", params, 0x224, 0xFE00)  # heap_end_ptr
    struct.pack_into("<I", params, 0x228, CMDLINE_ADDR)
    struct.pack_into("<I", params, 0x238, cmdline_size)
    if initrd is not None:
        struct.pack_into("<II", params, 0x218, *initrd)
    entries = e820_map(memory)
    params[0x1E8] = len(entries)
    for i, (address, size, kind) in enumerate(entries):
        struct.pack_into("<QQI", params, 0x2D0 + 20 * i, address, size, kind)
    memory.write(ZERO_PAGE, params)


def _write_pvh_start_info(memory: GuestMemory, initrd: tuple[int, int] | None) -> None:
    entries = e820_map(memory)
    memory.write(PVH_MEMMAP, b"".join(struct.pack("<QQII", a, s, t, 0) for a, s, t in entries))
    modules = 0
    if initrd is not None:
        memory.write(PVH_MODLIST, struct.pack("<QQQQ", initrd[0], initrd[1], 0, 0))
        modules = 1
    start_info = struct.pack(
        "<IIIIQQQQII",
        PVH_MAGIC,
        1,  # version (has memmap)
        0,
        modules,
        PVH_MODLIST if modules else 0,
        CMDLINE_ADDR,
        0,  # rsdp: no ACPI
        PVH_MEMMAP,
        len(entries),
        0,
    )
    memory.write(PVH_START_INFO, start_info)


def prepare_boot_vcpu(memory: GuestMemory, vcpu: Vcpu, entry: BootEntry, vcpu_count: int = 1) -> None:
    """Point the boot vCPU at the kernel; the MP table tells Linux about the other vCPUs."""
    write_mptable(memory, vcpu_count)
    if entry.protocol == "linux64":
        enter_long_mode(memory, vcpu, rip=entry.entry, rsp=BOOT_STACK, rsi=ZERO_PAGE)
        return
    # PVH: flat 32-bit protected mode, no paging; %ebx points at hvm_start_info.
    code32, data32 = gdt_entry(0xC09B, 0, 0xFFFFF), gdt_entry(0xC093, 0, 0xFFFFF)
    tss = gdt_entry(0x008B, 0, 0x67)
    memory.write(GDT_ADDR, struct.pack("<4Q", 0, code32, data32, tss))
    sregs = vcpu.get_sregs()
    sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, 4 * 8 - 1
    load_segment(sregs.cs, code32, 0x08)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        load_segment(seg, data32, 0x10)
    load_segment(sregs.tr, tss, 0x18)
    sregs.cr0 = 0x11  # PE | ET
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rbx, regs.rsp, regs.rflags = entry.entry, PVH_START_INFO, BOOT_STACK, RFLAGS_RESERVED
    vcpu.set_regs(regs)
