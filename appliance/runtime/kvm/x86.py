"""x86-64 CPU set-up shared by the Linux loader and test payloads: GDT, identity
page tables and the special registers of 64-bit long mode (the state Linux's
64-bit boot protocol expects, and what Firecracker gives a vCPU at entry).
"""

from __future__ import annotations

import struct

from appliance.runtime.kvm.memory import GuestMemory
from cffi_kvm import Vcpu

# Where the boot structures live in guest RAM (below 1 MiB, clear of the kernel).
GDT_ADDR = 0x500
IDT_ADDR = 0x520
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # four PDs, 0xB000..0xEFFF: 2 MiB pages for the first 4 GiB

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1

SELECTOR_CODE64 = 0x08
SELECTOR_DATA = 0x10
SELECTOR_TSS = 0x18


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """A GDT descriptor from Linux's GDT_ENTRY(flags, base, limit) encoding."""
    return (
        ((base & 0xFF000000) << (56 - 24))
        | ((flags & 0x0000F0FF) << 40)
        | ((limit & 0x000F0000) << (48 - 16))
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0x0000FFFF)
    )


GDT = [
    0,  # null
    gdt_entry(0xA09B, 0, 0xFFFFF),  # 64-bit code, DPL 0
    gdt_entry(0xC093, 0, 0xFFFFF),  # data, DPL 0
    gdt_entry(0x808B, 0, 0xFFFFF),  # TSS (busy)
]


def load_segment(sregs_segment: object, entry: int, selector: int) -> None:
    seg = sregs_segment
    seg.base = ((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24)  # type: ignore[attr-defined]
    limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)
    granular = (entry >> 55) & 1
    seg.limit = (limit << 12) | 0xFFF if granular else limit  # type: ignore[attr-defined]
    seg.selector = selector  # type: ignore[attr-defined]
    seg.type = (entry >> 40) & 0xF  # type: ignore[attr-defined]
    seg.present = (entry >> 47) & 1  # type: ignore[attr-defined]
    seg.dpl = (entry >> 45) & 3  # type: ignore[attr-defined]
    seg.db = (entry >> 54) & 1  # type: ignore[attr-defined]
    seg.s = (entry >> 44) & 1  # type: ignore[attr-defined]
    seg.l = (entry >> 53) & 1  # type: ignore[attr-defined]
    seg.g = granular  # type: ignore[attr-defined]
    seg.avl = (entry >> 52) & 1  # type: ignore[attr-defined]
    seg.unusable = 0 if seg.present else 1  # type: ignore[attr-defined]


def write_identity_page_tables(memory: GuestMemory) -> None:
    """Identity-map the first 4 GiB with 2 MiB pages (PML4 → PDPT → 4 PDs)."""
    memory.write(PML4_ADDR, struct.pack("<Q", PDPT_ADDR | 0x3) + bytes(4096 - 8))
    memory.write(
        PDPT_ADDR, struct.pack("<4Q", *(PD_ADDR + i * 4096 | 0x3 for i in range(4))) + bytes(4096 - 32)
    )
    entries = [(i << 21) | 0x83 for i in range(4 * 512)]  # present, writable, 2 MiB page
    memory.write(PD_ADDR, struct.pack(f"<{len(entries)}Q", *entries))


def enter_long_mode(memory: GuestMemory, vcpu: Vcpu, *, rip: int, rsp: int = 0, rsi: int = 0) -> None:
    """Put `vcpu` in 64-bit mode at `rip` with paging on and flat segments.

    `rsi` carries the boot_params address for Linux's 64-bit entry point.
    """
    memory.write(GDT_ADDR, struct.pack(f"<{len(GDT)}Q", *GDT))
    memory.write(IDT_ADDR, bytes(8))
    write_identity_page_tables(memory)

    sregs = vcpu.get_sregs()
    sregs.gdt.base = GDT_ADDR
    sregs.gdt.limit = len(GDT) * 8 - 1
    sregs.idt.base = IDT_ADDR
    sregs.idt.limit = 7
    load_segment(sregs.cs, GDT[1], SELECTOR_CODE64)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        load_segment(seg, GDT[2], SELECTOR_DATA)
    load_segment(sregs.tr, GDT[3], SELECTOR_TSS)
    sregs.cr3 = PML4_ADDR
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)

    regs = vcpu.get_regs()
    for name in (
        "rax",
        "rbx",
        "rcx",
        "rdx",
        "rdi",
        "rbp",
        "r8",
        "r9",
        "r10",
        "r11",
        "r12",
        "r13",
        "r14",
        "r15",
    ):
        setattr(regs, name, 0)
    regs.rip = rip
    regs.rsp = rsp
    regs.rsi = rsi
    regs.rflags = RFLAGS_RESERVED
    vcpu.set_regs(regs)
