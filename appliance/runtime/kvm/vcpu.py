"""One vCPU: its KVM_RUN loop (run in a Trio worker thread), exit dispatch and state.

The loop handles exits in the vCPU thread itself (port I/O and MMIO go straight
to the device on the bus), like Firecracker. It stops when asked: the owner sets
`stop_requested`, `immediate_exit`, and sends KICK_SIGNAL to the thread so a
guest sitting in HLT (inside KVM_RUN) comes back at once with EINTR.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from enum import Enum

from appliance.runtime.kvm.bus import Bus
from cffi_kvm import CData, Vcpu, ffi, lib, struct_bytes, struct_from_bytes

KICK_SIGNAL = signal.SIGRTMIN + 3
_kick_handler_installed = False


def install_kick_handler() -> None:
    """A no-op C handler (no SA_RESTART), so the signal only interrupts KVM_RUN."""
    global _kick_handler_installed
    if not _kick_handler_installed:
        result = lib.cube_install_kick_handler(KICK_SIGNAL)
        if result < 0:
            raise OSError(-result, "sigaction(KICK_SIGNAL)")
        _kick_handler_installed = True


class VcpuExit(Enum):
    STOPPED = "stopped"  # the owner asked (pause, snapshot, kill)
    SHUTDOWN = "shutdown"  # triple fault / guest shutdown
    RESET = "reset"  # guest asked for a reset (i8042, system event)
    POWEROFF = "poweroff"


class VcpuFault(Exception):
    """KVM could not run the vCPU (failed entry, internal error, unexpected exit)."""


@dataclass
class VcpuState:
    """Everything KVM holds for one vCPU, as bytes of the kernel's own structs."""

    vcpu_id: int
    regs: bytes
    sregs: bytes
    fpu: bytes
    xsave: bytes
    xcrs: bytes
    lapic: bytes
    events: bytes
    debugregs: bytes
    mp_state: int
    cpuid: list[tuple[int, int, int, int, int, int, int]]  # function, index, flags, eax..edx
    msrs: list[tuple[int, int]] = field(default_factory=list)


def cpuid_entries(cpuid: CData) -> list[tuple[int, int, int, int, int, int, int]]:
    return [
        (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
        for e in (cpuid.entries[i] for i in range(cpuid.nent))
    ]


def cpuid_struct(entries: list[tuple[int, int, int, int, int, int, int]]) -> CData:
    cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
    cpuid.nent = len(entries)
    for i, (function, index, flags, eax, ebx, ecx, edx) in enumerate(entries):
        e = cpuid.entries[i]
        e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx = function, index, flags, eax, ebx, ecx, edx
    return cpuid


def cpuid_for_vcpu(
    supported: list[tuple[int, int, int, int, int, int, int]], vcpu_id: int, vcpu_count: int
) -> list[tuple[int, int, int, int, int, int, int]]:
    """KVM's supported CPUID with this vCPU's APIC ids and the topology filled in."""
    result = []
    for function, index, flags, eax, ebx, ecx, edx in supported:
        if function == 1:
            # EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
            ebx = (ebx & 0x0000FFFF) | (vcpu_count << 16) | (vcpu_id << 24)
            edx |= 1 << 28 if vcpu_count > 1 else 0  # HTT: the count above is valid
        elif function in (0xB, 0x1F):
            edx = vcpu_id  # x2APIC id
        result.append((function, index, flags, eax, ebx, ecx, edx))
    return result


class VcpuRunner:
    """Owns a `Vcpu` and the thread that runs it; I/O exits go to the two buses."""

    def __init__(self, vcpu: Vcpu, pio_bus: Bus, mmio_bus: Bus, msr_indices: list[int]) -> None:
        self.vcpu = vcpu
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.msr_indices = msr_indices
        self.stop_requested = False
        self.exits = 0
        self._thread_ident: int | None = None
        self._running = threading.Lock()

    # ---- run loop (worker thread) -------------------------------------------------

    def run_loop(self) -> VcpuExit:
        """KVM_RUN until the guest stops or the owner asks; runs in a worker thread."""
        with self._running:
            self._thread_ident = threading.get_ident()
            try:
                return self._loop()
            finally:
                self._thread_ident = None

    def _loop(self) -> VcpuExit:
        run = self.vcpu.run_state
        while True:
            if self.stop_requested:
                self._complete_pending_exit()
                return VcpuExit.STOPPED
            if not self.vcpu.run():
                continue  # kicked: re-check stop_requested
            self.exits += 1
            reason = run.exit_reason
            if reason == lib.KVM_EXIT_IO:
                self._port_io()
            elif reason == lib.KVM_EXIT_MMIO:
                self._mmio()
            elif reason == lib.KVM_EXIT_INTR:
                continue
            elif reason == lib.KVM_EXIT_HLT:
                return VcpuExit.POWEROFF  # only without an in-kernel irqchip: nothing can wake it
            elif reason == lib.KVM_EXIT_SHUTDOWN:
                return VcpuExit.SHUTDOWN
            elif reason == lib.KVM_EXIT_SYSTEM_EVENT:
                # KVM_SYSTEM_EVENT_SHUTDOWN = 1, _RESET = 2, _CRASH = 3
                kind = lib.cube_run_system_event_type(run)
                return VcpuExit.RESET if kind == 2 else VcpuExit.SHUTDOWN
            elif reason == lib.KVM_EXIT_FAIL_ENTRY:
                raise VcpuFault(
                    f"vCPU {self.vcpu.id}: entry failed, reason {lib.cube_run_fail_entry_reason(run):#x}"
                )
            elif reason == lib.KVM_EXIT_INTERNAL_ERROR:
                raise VcpuFault(
                    f"vCPU {self.vcpu.id}: KVM internal error {lib.cube_run_internal_suberror(run)}"
                )
            else:
                raise VcpuFault(f"vCPU {self.vcpu.id}: unhandled exit {reason}")

    def _complete_pending_exit(self) -> None:
        """Let KVM finish the instruction of the last I/O or MMIO exit before anyone saves the
        vCPU: with VMX/SVM it does so only at the next KVM_RUN (an `out` is skipped, an `in` or
        an MMIO read gets its data), so registers read now would point at the instruction
        again, and a snapshot's clones would repeat it. KVM_RUN with immediate_exit set
        completes it and returns at once (the kernel's documented way)."""
        self.vcpu.run_state.immediate_exit = 1
        self.vcpu.run()

    def _port_io(self) -> None:
        io = lib.cube_run_io(self.vcpu.run_state)
        data = self.vcpu.io_data()
        size = io.size
        for i in range(io.count):  # `rep outs/ins` come as one exit with count > 1
            chunk = data + i * size
            if io.direction == lib.KVM_EXIT_IO_OUT:
                self.pio_bus.write(io.port, bytes(ffi.buffer(chunk, size)))
            else:
                ffi.buffer(chunk, size)[:] = self.pio_bus.read(io.port, size)

    def _mmio(self) -> None:
        mmio = lib.cube_run_mmio(self.vcpu.run_state)
        length = mmio.len
        if mmio.is_write:
            self.mmio_bus.write(mmio.phys_addr, bytes(ffi.buffer(mmio.data, length)))
        else:
            ffi.buffer(mmio.data, length)[:] = self.mmio_bus.read(mmio.phys_addr, length)

    # ---- control (any thread) -----------------------------------------------------

    def request_stop(self) -> None:
        self.stop_requested = True
        self.vcpu.run_state.immediate_exit = 1
        self.kick()

    def kick(self) -> None:
        ident = self._thread_ident
        if ident is not None:
            try:
                signal.pthread_kill(ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass  # the thread finished between the check and the signal

    def prepare_to_run(self) -> None:
        self.stop_requested = False
        self.vcpu.run_state.immediate_exit = 0

    # ---- state (only while the run loop is not running) ---------------------------

    def save_state(self, cpuid: list[tuple[int, int, int, int, int, int, int]]) -> VcpuState:
        v = self.vcpu
        return VcpuState(
            vcpu_id=v.id,
            regs=struct_bytes(v.get_regs()),
            sregs=struct_bytes(v.get_sregs()),
            fpu=struct_bytes(v.get_fpu()),
            xsave=struct_bytes(v.get_xsave()),
            xcrs=struct_bytes(v.get_xcrs()),
            lapic=struct_bytes(v.get_lapic()),
            events=struct_bytes(v.get_vcpu_events()),
            debugregs=struct_bytes(v.get_debugregs()),
            mp_state=v.get_mp_state(),
            cpuid=cpuid,
            msrs=v.get_msrs(self.msr_indices),
        )

    def restore_state(self, state: VcpuState) -> None:
        """Firecracker's order: CPUID first (it sizes xsave), events last."""
        v = self.vcpu
        v.set_cpuid2(cpuid_struct(state.cpuid))
        v.set_mp_state(state.mp_state)
        v.set_regs(struct_from_bytes("struct kvm_regs *", state.regs))
        v.set_sregs(struct_from_bytes("struct kvm_sregs *", state.sregs))
        v.set_fpu(struct_from_bytes("struct kvm_fpu *", state.fpu))
        v.set_xsave(struct_from_bytes("struct kvm_xsave *", state.xsave))
        xcrs = struct_from_bytes("struct kvm_xcrs *", state.xcrs)
        if xcrs.nr_xcrs:
            # A host CPU without XSAVE (e.g. qemu64, as emulated by qemu) has no XCR0: KVM
            # reports none and refuses KVM_SET_XCRS (EINVAL) even with none to set.
            v.set_xcrs(xcrs)
        v.set_debugregs(struct_from_bytes("struct kvm_debugregs *", state.debugregs))
        v.set_lapic(struct_from_bytes("struct kvm_lapic_state *", state.lapic))
        remaining = list(state.msrs)
        while remaining:
            # KVM stops at the first MSR it refuses; skip that one and go on.
            written = v.set_msrs(remaining)
            remaining = remaining[written + 1 :]
        v.set_vcpu_events(struct_from_bytes("struct kvm_vcpu_events *", state.events))


def readable_msrs(vcpu: Vcpu, candidates: list[int]) -> list[int]:
    """The MSRs of KVM's index list this vCPU can actually read (PVM refuses some)."""
    readable: list[int] = []
    remaining = list(candidates)
    while remaining:
        got = vcpu.get_msrs(remaining)
        readable.extend(index for index, _ in got)
        remaining = remaining[len(got) + 1 :]
    return readable
