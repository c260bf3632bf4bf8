"""Intel MultiProcessor Specification table: how a guest without ACPI finds its CPUs,
its IOAPIC and how ISA interrupts are wired (Linux scans the last KiB of base memory
for it). Same layout Firecracker writes: one processor entry per vCPU, one ISA bus,
one IOAPIC with identity-mapped IRQ lines, ExtINT on LINT0 and NMI on LINT1.
"""

from __future__ import annotations

import struct

from appliance.runtime.kvm.memory import GuestMemory

MPTABLE_ADDR = 0x9FC00  # start of the EBDA, which the e820 map leaves out of RAM
LAPIC_ADDR = 0xFEE0_0000
IOAPIC_ADDR = 0xFEC0_0000
IOAPIC_PINS = 24
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_ENABLED = 1
CPU_BOOTPROCESSOR = 2
INT_TYPE_INT = 0
INT_TYPE_NMI = 1
INT_TYPE_EXTINT = 3


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def build_mptable(vcpu_count: int, base: int = MPTABLE_ADDR) -> bytes:
    ioapic_id = vcpu_count + 1
    entries = [
        struct.pack(
            "<BBBBII8x",
            0,  # processor
            cpu,
            APIC_VERSION,
            CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0),
            0x600,  # family 6 signature
            0x201,  # FPU and APIC present
        )
        for cpu in range(vcpu_count)
    ]
    entries.append(struct.pack("<BB6s", 1, 0, b"ISA   "))  # bus 0
    entries.append(struct.pack("<BBBBI", 2, ioapic_id, IOAPIC_VERSION, 1, IOAPIC_ADDR))
    entries.extend(
        struct.pack("<BBHBBBB", 3, INT_TYPE_INT, 0, 0, irq, ioapic_id, irq) for irq in range(IOAPIC_PINS)
    )
    entries.append(struct.pack("<BBHBBBB", 4, INT_TYPE_EXTINT, 0, 0, 0, 0, 0))  # LINT0 of CPU 0
    entries.append(struct.pack("<BBHBBBB", 4, INT_TYPE_NMI, 0, 0, 0, 0xFF, 1))  # LINT1 of every CPU
    body = b"".join(entries)

    header_size = 44
    table_addr = base + 16
    header = bytearray(
        struct.pack(
            "<4sHBB8s12sIHHIHBB",
            b"PCMP",
            header_size + len(body),
            4,  # spec revision 1.4
            0,  # checksum, below
            b"CUBE    ",
            b"MICROVM     ",
            0,
            0,
            len(entries),
            LAPIC_ADDR,
            0,
            0,
            0,
        )
    )
    header[7] = _checksum(bytes(header) + body)
    floating = bytearray(struct.pack("<4sIBBB5x", b"_MP_", table_addr, 1, 4, 0))
    floating[10] = _checksum(bytes(floating))
    return bytes(floating) + bytes(header) + body


def write_mptable(memory: GuestMemory, vcpu_count: int) -> None:
    table = build_mptable(vcpu_count)
    if MPTABLE_ADDR + len(table) > 0xA0000:
        raise ValueError(f"an MP table for {vcpu_count} vCPUs does not fit below 640 KiB")
    memory.write(MPTABLE_ADDR, table)
