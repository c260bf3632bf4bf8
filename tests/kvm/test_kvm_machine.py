"""Small guest payloads on the VMM: long mode, exits to the right device, serial, IRQs, SMP."""

from __future__ import annotations

import os
import struct

import trio
from kvm_guest import RecordingDevice, assemble, serial_print

from appliance.runtime.kvm.machine import Machine, MachineConfig
from appliance.runtime.kvm.vcpu import VcpuExit
from appliance.runtime.kvm.x86 import enter_long_mode
from cffi_kvm import Kvm, lib

CODE = 0x10000
STACK = 0x8000
MIB = 1 << 20
STOP_PORT = 0xF4  # the test's "done" device: any write stops the machine


def load(machine: Machine, source: str, *, origin: int = CODE) -> None:
    machine.memory.write(origin, assemble(source, origin=origin))


def add_stop_device(machine: Machine) -> RecordingDevice:
    device = RecordingDevice()
    device.on_write = lambda offset, value: machine.request_stop()
    machine.add_pio_device("stop", device, STOP_PORT, 1)
    return device


async def run_until_stopped(machine: Machine, timeout: float = 20) -> VcpuExit:
    with trio.fail_after(timeout):
        return await machine.run()


async def test_long_mode_and_port_io_reach_the_right_device(kvm: Kvm) -> None:
    machine = Machine.new(kvm, MachineConfig(memory_size=16 * MIB))
    try:
        low, high = RecordingDevice(), RecordingDevice(answer=lambda offset, size: 0x5A)
        machine.add_pio_device("low", low, 0x10, 4)
        machine.add_pio_device("high", high, 0x20, 4)
        add_stop_device(machine)
        load(
            machine,
            """
            mov %cr0, %rax
            out %eax, $0x10          # low+0: CR0 (PG and PE on in long mode)
            mov $0xC0000080, %ecx
            rdmsr
            out %eax, $0x11          # low+1: EFER (LMA set)
            in $0x22, %al            # high+2 answers 0x5A
            add $1, %al
            out %al, $0x23           # high+3: 0x5B
            out %al, $0xF4
            """,
        )
        enter_long_mode(machine.memory, machine.vcpus[0].vcpu, rip=CODE, rsp=STACK)
        assert await run_until_stopped(machine) is VcpuExit.STOPPED
        cr0 = low.writes[0][1]
        efer = low.writes[1][1]
        assert low.writes[0][0] == 0 and cr0 & 0x80000001 == 0x80000001
        assert low.writes[1][0] == 1 and efer & (1 << 10)
        assert high.reads == [(2, 1)]
        assert high.writes == [(3, 0x5B)]
        regs = machine.vcpus[0].vcpu.get_regs()
        assert regs.rip > CODE
    finally:
        machine.close()


async def test_mmio_exits_reach_the_right_device(kvm: Kvm) -> None:
    machine = Machine.new(kvm, MachineConfig(memory_size=16 * MIB))
    try:
        first = RecordingDevice(answer=lambda offset, size: 0x1000 + offset)
        second = RecordingDevice(answer=lambda offset, size: 0x2000 + offset)
        machine.add_mmio_device("first", first, 0xD000_0000, 0x1000)
        machine.add_mmio_device("second", second, 0xD000_1000, 0x1000)
        add_stop_device(machine)
        load(
            machine,
            """
            mov $0xD0000000, %rbx
            movl $0xAABBCCDD, 0x10(%rbx)
            movl 0x1008(%rbx), %eax     # second+8 -> 0x2008
            movq %rax, 0x20(%rbx)       # first+0x20 <- 0x2008 (8 bytes)
            movw 0x4(%rbx), %ax         # first+4 -> 0x1004
            movw %ax, 0x1030(%rbx)      # second+0x30 <- 0x1004
            out %al, $0xF4
            """,
        )
        enter_long_mode(machine.memory, machine.vcpus[0].vcpu, rip=CODE, rsp=STACK)
        await run_until_stopped(machine)
        assert first.writes == [(0x10, 0xAABBCCDD), (0x20, 0x2008)]
        assert first.reads == [(4, 2)]
        assert second.reads == [(8, 4)]
        assert second.writes == [(0x30, 0x1004)]
    finally:
        machine.close()


async def test_serial_output_is_captured(kvm: Kvm) -> None:
    machine = Machine.new(kvm, MachineConfig(memory_size=16 * MIB))
    try:
        add_stop_device(machine)
        load(machine, serial_print("hello from the guest\\n", then="out %al, $0xF4"))
        enter_long_mode(machine.memory, machine.vcpus[0].vcpu, rip=CODE, rsp=STACK)
        await run_until_stopped(machine)
        assert bytes(machine.console_output) == b"hello from the guest\n"
        assert machine.serial.bytes_out == 21
    finally:
        machine.close()


IRQ_GSI = 5
IRQ_VECTOR = 0x40


async def test_interrupt_through_irqfd_runs_the_guest_handler(kvm: Kvm) -> None:
    machine = Machine.new(kvm, MachineConfig(memory_size=16 * MIB))
    try:
        seen = RecordingDevice()
        machine.add_pio_device("seen", seen, 0x30, 1)
        ready = RecordingDevice()
        machine.add_pio_device("ready", ready, 0x31, 1)
        load(
            machine,
            f"""
            mov $0xff, %al               # mask both PICs: the IOAPIC delivers
            out %al, $0x21
            out %al, $0xA1
            mov $0xFEE00000, %rbx        # local APIC
            movl $0x1FF, 0xF0(%rbx)      # software-enable (SVR)
            movl $0x10000, 0x350(%rbx)   # mask LINT0 (ExtINT from the PIC)
            mov $0xFEC00000, %rcx        # IOAPIC: GSI {IRQ_GSI} -> vector {IRQ_VECTOR:#x}, edge, CPU 0
            movl ${0x10 + 2 * IRQ_GSI}, (%rcx)
            movl ${IRQ_VECTOR}, 0x10(%rcx)
            movl ${0x11 + 2 * IRQ_GSI}, (%rcx)
            movl $0, 0x10(%rcx)
            out %al, $0x31               # tell the host we are ready
            sti
        idle:
            hlt
            jmp idle
        handler:
            mov $0x77, %al
            out %al, $0x30
            movl $0, 0xB0(%rbx)          # EOI
            iretq
            """,
        )
        code = assemble_handler_offset(machine)
        vcpu = machine.vcpus[0].vcpu
        enter_long_mode(machine.memory, vcpu, rip=CODE, rsp=STACK)
        idt = 0x3000
        gate = struct.pack("<HHBBHIi", code & 0xFFFF, 0x08, 0, 0x8E, (code >> 16) & 0xFFFF, code >> 32, 0)
        machine.memory.write(idt + IRQ_VECTOR * 16, gate)
        sregs = vcpu.get_sregs()
        sregs.idt.base, sregs.idt.limit = idt, 256 * 16 - 1
        vcpu.set_sregs(sregs)

        irq = machine.irq_eventfd(IRQ_GSI)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(machine.run)
            with trio.fail_after(20):
                while not ready.writes:
                    await trio.sleep(0.01)
                await trio.sleep(0.05)  # let it reach HLT: the interrupt must wake it
                os.eventfd_write(irq, 1)
                while not seen.writes:
                    await trio.sleep(0.01)
            # Cancelling kicks the vCPU out of HLT inside KVM_RUN.
            nursery.cancel_scope.cancel()
        assert seen.writes == [(0, 0x77)]
    finally:
        machine.close()


def assemble_handler_offset(machine: Machine) -> int:
    """Address of `handler:` in the loaded payload: the bytes after the last `jmp idle`."""
    code = machine.memory.read(CODE, 256)
    # `hlt; jmp idle` is f4 eb fd; the handler follows it.
    return CODE + code.index(bytes([0xF4, 0xEB, 0xFD])) + 3


async def test_two_vcpus_share_memory_and_have_their_own_apic_ids(kvm: Kvm) -> None:
    machine = Machine.new(kvm, MachineConfig(memory_size=16 * MIB, vcpu_count=2))
    try:
        ids = RecordingDevice()
        machine.add_pio_device("ids", ids, 0x50, 1)  # 0x40-0x43 is the in-kernel PIT
        done = RecordingDevice()
        finished: list[int] = []

        def on_done(offset: int, value: int) -> None:
            finished.append(value)
            if len(finished) == 2:
                machine.request_stop()

        done.on_write = on_done
        machine.add_pio_device("done", done, 0x51, 1)
        load(
            machine,
            """
            mov $1, %eax
            cpuid
            shr $24, %ebx
            mov %bl, %al
            out %al, $0x50                # APIC id
            mov $500, %ecx
        again:
            lock incq 0x2000
            dec %ecx
            jnz again
            out %al, $0x51
        idle:
            hlt
            jmp idle
            """,
        )
        for i, runner in enumerate(machine.vcpus):
            enter_long_mode(machine.memory, runner.vcpu, rip=CODE, rsp=STACK - i * 0x1000)
        # An AP waits for INIT/SIPI; these payloads start it directly.
        machine.vcpus[1].vcpu.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)
        await run_until_stopped(machine)
        assert sorted(value for _, value in ids.writes) == [0, 1]
        assert machine.memory.read_int(0x2000, 8) == 1000
    finally:
        machine.close()


async def test_i8042_reset_stops_the_machine(kvm: Kvm) -> None:
    machine = Machine.new(kvm, MachineConfig(memory_size=16 * MIB))
    try:
        load(machine, "mov $0xFE, %al\nout %al, $0x64\nhlt")
        enter_long_mode(machine.memory, machine.vcpus[0].vcpu, rip=CODE, rsp=STACK)
        assert await run_until_stopped(machine) is VcpuExit.RESET
        assert machine.i8042.reset_requested
    finally:
        machine.close()


async def test_a_triple_fault_stops_the_machine_as_a_shutdown(kvm: Kvm) -> None:
    """enter_long_mode's IDT has no usable gate: any exception faults again, then a third
    time. KVM reports the triple fault as a shutdown; the runtime calls the guest dead."""
    machine = Machine.new(kvm, MachineConfig(memory_size=16 * MIB))
    try:
        load(machine, "ud2")
        enter_long_mode(machine.memory, machine.vcpus[0].vcpu, rip=CODE, rsp=STACK)
        assert await run_until_stopped(machine) is VcpuExit.SHUTDOWN
    finally:
        machine.close()


async def test_ioeventfd_signals_without_a_userspace_exit(kvm: Kvm) -> None:
    machine = Machine.new(kvm, MachineConfig(memory_size=16 * MIB))
    notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        add_stop_device(machine)
        machine.vm.ioeventfd(notify, 0xD000_0050, 4)  # like virtio-mmio's QueueNotify
        load(
            machine,
            """
            mov $0xD0000050, %rbx
            movl $0, (%rbx)
            movl $0, (%rbx)
            out %al, $0xF4
            """,
        )
        enter_long_mode(machine.memory, machine.vcpus[0].vcpu, rip=CODE, rsp=STACK)
        await run_until_stopped(machine)
        assert os.eventfd_read(notify) == 2  # both stores, counted by KVM
        assert machine.vcpus[0].exits == 1  # only the stop port reached userspace
        assert machine.mmio_bus.unclaimed_accesses == 0
    finally:
        machine.vm.ioeventfd(notify, 0xD000_0050, 4, deassign=True)
        os.close(notify)
        machine.close()
