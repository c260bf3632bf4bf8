"""The microVM: one KVM VM with its memory, vCPUs, buses and legacy devices.

Trio shape: `await machine.run()` runs every vCPU in a worker thread owned by a
nursery inside `run()`, and returns when the guest stops (or raises what a vCPU
raised). Cancelling `run()` kicks every vCPU out of KVM_RUN and waits for the
threads, so a cancelled machine is a paused machine: snapshot it, run it again,
or close it. No thread outlives `run()`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from appliance.runtime.kvm.bus import Bus, BusDevice
from appliance.runtime.kvm.devices.i8042 import I8042
from appliance.runtime.kvm.devices.serial import Serial
from appliance.runtime.kvm.memory import PAGE_SIZE, GuestMemory
from appliance.runtime.kvm.snapshot import MEMORY_FILE, MachineState, read_state, write_state
from appliance.runtime.kvm.vcpu import (
    VcpuExit,
    VcpuRunner,
    cpuid_entries,
    cpuid_for_vcpu,
    cpuid_struct,
    install_kick_handler,
    readable_msrs,
)
from cffi_kvm import Kvm, struct_bytes, struct_from_bytes

# Legacy PC layout (what Linux probes without ACPI or a device tree).
SERIAL_PORT = 0x3F8
SERIAL_IRQ = 4
I8042_PORT = 0x60
TSS_ADDR = 0xFFFB_D000
IRQCHIP_IDS = (0, 1, 2)  # KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE, _IOAPIC


class Persistent(Protocol):
    """A device whose state goes into snapshots as plain data."""

    def save(self) -> dict[str, Any]: ...

    def restore(self, saved: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class SnapshotInfo:
    state: MachineState
    memory_bytes_written: int


@dataclass(frozen=True)
class MachineConfig:
    memory_size: int
    vcpu_count: int = 1
    track_dirty_pages: bool = False


class Machine:
    def __init__(
        self,
        kvm: Kvm,
        config: MachineConfig,
        memory: GuestMemory,
        *,
        console: Callable[[bytes], object] | None = None,
    ) -> None:
        install_kick_handler()
        self.kvm = kvm
        self.config = config
        self.memory = memory
        self.console_output = bytearray()
        self._console: Callable[[bytes], object] = console or self.console_output.extend
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self._persistent: dict[str, Persistent] = {}
        self._irq_eventfds: dict[int, int] = {}  # gsi -> eventfd bound with KVM_IRQFD
        self._notify_eventfds: dict[int, list[int]] = {}  # MMIO address -> KVM_IOEVENTFD per queue
        self.exit_reason: VcpuExit | None = None
        self.vm = kvm.create_vm()
        try:
            # The memory slot first: measured on PVM (512 MiB, loaded host), registering it
            # in a fresh VM takes ~0.5-0.8 ms p50, after the irqchip and PIT 6-7 ms (it then
            # waits on the VM's SRCU behind theirs); the PIT pays a little instead (~1.5 ms).
            memory.register(self.vm)
            self.vm.set_tss_addr(TSS_ADDR)
            self.vm.create_irqchip()
            self.vm.create_pit2()
            supported = cpuid_entries(kvm.supported_cpuid())
            self.cpuid = [cpuid_for_vcpu(supported, i, config.vcpu_count) for i in range(config.vcpu_count)]
            self.vcpus: list[VcpuRunner] = []
            msr_indices: list[int] | None = None
            for i in range(config.vcpu_count):
                vcpu = self.vm.create_vcpu(i)
                vcpu.set_cpuid2(cpuid_struct(self.cpuid[i]))
                if msr_indices is None:
                    msr_indices = readable_msrs(vcpu, kvm.msr_index_list())
                self.vcpus.append(VcpuRunner(vcpu, self.pio_bus, self.mmio_bus, msr_indices))
            serial_irq = self.irq_eventfd(SERIAL_IRQ)
            self.serial = Serial(self._write_console, lambda: os.eventfd_write(serial_irq, 1))
            self.i8042 = I8042(lambda: self.request_stop(VcpuExit.RESET))
            self.add_pio_device("serial", self.serial, SERIAL_PORT, 8)
            self.add_pio_device("i8042", self.i8042, I8042_PORT, 5)
        except BaseException:
            self.close()
            raise

    @classmethod
    def new(cls, kvm: Kvm, config: MachineConfig, **kwargs: Any) -> Machine:
        memory = GuestMemory.anonymous(config.memory_size, track_dirty=config.track_dirty_pages)
        try:
            return cls(kvm, config, memory, **kwargs)
        except BaseException:
            memory.close()
            raise

    def _write_console(self, data: bytes) -> None:
        self._console(data)

    def set_console(self, console: Callable[[bytes], object]) -> None:
        """Where serial output goes from now on (a pooled shell learns its sandbox's log late)."""
        self._console = console

    # ---- devices ------------------------------------------------------------------

    def add_pio_device(self, name: str, device: BusDevice, base: int, length: int) -> None:
        self.pio_bus.insert(device, base, length)
        self._remember(name, device)

    def add_mmio_device(self, name: str, device: BusDevice, base: int, length: int) -> None:
        self.mmio_bus.insert(device, base, length)
        self._remember(name, device)

    def _remember(self, name: str, device: object) -> None:
        if name in self._persistent:
            raise ValueError(f"device name {name!r} is taken")
        if hasattr(device, "save") and hasattr(device, "restore"):
            self._persistent[name] = device  # type: ignore[assignment]

    def irq_eventfd(self, gsi: int) -> int:
        """The eventfd that raises interrupt `gsi` in the in-kernel irqchip when written
        (made on first use, then the same one: a pooled shell has them made ahead)."""
        fd = self._irq_eventfds.get(gsi)
        if fd is None:
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                self.vm.irqfd(fd, gsi)
            except BaseException:
                os.close(fd)
                raise
            self._irq_eventfds[gsi] = fd
        return fd

    def notify_eventfds(self, address: int, queues: int) -> list[int]:
        """One eventfd per queue that KVM signals when the guest writes that queue's index
        to the 4-byte register at `address` (virtio-mmio QueueNotify), instead of an MMIO
        exit. Made on first use, then the same ones (a pooled shell has them made ahead)."""
        fds = self._notify_eventfds.setdefault(address, [])
        while len(fds) < queues:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                self.vm.ioeventfd(fd, address, 4, datamatch=len(fds))
            except BaseException:
                os.close(fd)
                raise
            fds.append(fd)
        return fds[:queues]

    # ---- running ------------------------------------------------------------------

    async def run(self) -> VcpuExit:
        """Run all vCPUs until the guest stops; cancel to pause (threads are joined)."""
        self.exit_reason = None
        for runner in self.vcpus:
            runner.prepare_to_run()
        async with trio.open_nursery() as nursery:
            for runner in self.vcpus:
                nursery.start_soon(self._run_vcpu, runner)
        assert self.exit_reason is not None
        return self.exit_reason

    async def _run_vcpu(self, runner: VcpuRunner) -> None:
        finished = trio.Event()

        async def kick_on_cancel() -> None:
            try:
                await finished.wait()
            except trio.Cancelled:
                runner.request_stop()
                with trio.CancelScope(shield=True):
                    # Kick until the thread has left KVM_RUN: a signal sent just
                    # before it entered is covered by immediate_exit, not lost.
                    while not finished.is_set():
                        runner.kick()
                        with trio.move_on_after(0.001):
                            await finished.wait()
                raise

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kick_on_cancel)
            try:
                outcome = await trio.to_thread.run_sync(runner.run_loop, abandon_on_cancel=False)
            finally:
                finished.set()
            # The guest stopped on its own (or another vCPU asked): stop the others too.
            self.request_stop(outcome)

    def request_stop(self, reason: VcpuExit = VcpuExit.STOPPED) -> None:
        """Ask every vCPU to leave its loop; callable from any thread."""
        if self.exit_reason is None or self.exit_reason is VcpuExit.STOPPED:
            self.exit_reason = reason
        for runner in self.vcpus:
            runner.request_stop()

    # ---- snapshot / restore (only while `run()` is not running) -------------------

    def save_state(self) -> MachineState:
        return MachineState(
            memory_size=self.config.memory_size,
            vcpu_count=self.config.vcpu_count,
            regions=self.memory.layout,
            vcpus=[runner.save_state(self.cpuid[i]) for i, runner in enumerate(self.vcpus)],
            irqchips=[struct_bytes(self.vm.get_irqchip(chip)) for chip in IRQCHIP_IDS],
            pit=struct_bytes(self.vm.get_pit2()),
            clock=struct_bytes(self.vm.get_clock()),
            devices={name: device.save() for name, device in self._persistent.items()},
            saved_at_ns=time.clock_gettime_ns(time.CLOCK_REALTIME),
        )

    def snapshot(self, directory: Path, *, incremental: bool = False) -> SnapshotInfo:
        """Write state.json and the memory file into `directory`.

        `incremental` (a pause; needs dirty-page tracking and a guest restored from
        a snapshot) writes only the pages that differ from the memory file the
        guest was restored from, which stays the diff's base.
        """
        directory.mkdir(parents=True, exist_ok=True)
        state = self.save_state()
        if incremental:
            state.diff_runs = self.memory.save_dirty(directory / MEMORY_FILE, self.vm)
            state.base_memory = str(self.memory.backing_file)
            written = sum(count for _first, count in state.diff_runs) * PAGE_SIZE
        else:
            written = self.memory.save(directory / MEMORY_FILE)
        write_state(directory, state)
        return SnapshotInfo(state, written)

    def apply_state(self, state: MachineState) -> None:
        for runner, vcpu_state in zip(self.vcpus, state.vcpus, strict=True):
            runner.restore_state(vcpu_state)
        self.cpuid = [v.cpuid for v in state.vcpus]
        for data in state.irqchips:
            self.vm.set_irqchip(struct_from_bytes("struct kvm_irqchip *", data))
        self.vm.set_pit2(struct_from_bytes("struct kvm_pit_state2 *", state.pit))
        clock = struct_from_bytes("struct kvm_clock_data *", state.clock)
        clock.flags = 0  # only the value: KVM rejects flags it reported but does not accept
        if state.saved_at_ns:
            # The guest's clock moves on by the time the snapshot was not running (as
            # across a suspend), so clones of an old template do not start in the past.
            clock.clock += max(0, time.clock_gettime_ns(time.CLOCK_REALTIME) - state.saved_at_ns)
        self.vm.set_clock(clock)
        for name, saved in state.devices.items():
            if name not in self._persistent:
                raise ValueError(f"snapshot has state for device {name!r}, which this machine lacks")
            self._persistent[name].restore(saved)
        if self.memory.track_dirty:
            self.memory.reset_dirty_log(self.vm)  # count only what the guest writes from here on

    @classmethod
    def prepare_restore(
        cls,
        kvm: Kvm,
        directory: Path,
        state: MachineState,
        *,
        track_dirty_pages: bool = False,
        **kwargs: Any,
    ) -> Machine:
        """A VM shell for `state`: RAM mapped from the memory file (MAP_PRIVATE), vCPUs
        created, no state applied yet. Creating the VM and its memory slot is most of a
        restore's cost, so a pool of shells per template makes the restore itself cheap:
        add the devices, then `apply_state(state)`.
        """
        # A pause (diff) maps the template's memory file and copies its own pages over it.
        base = directory / MEMORY_FILE if state.base_memory is None else Path(state.base_memory)
        memory = GuestMemory.from_file(base, state.regions, track_dirty=track_dirty_pages)
        if state.base_memory is not None:
            try:
                memory.apply_diff(directory / MEMORY_FILE, state.diff_runs)
            except BaseException:
                memory.close()
                raise
        config = MachineConfig(state.memory_size, state.vcpu_count, track_dirty_pages)
        try:
            return cls(kvm, config, memory, **kwargs)
        except BaseException:
            memory.close()
            raise

    @classmethod
    def restore(
        cls,
        kvm: Kvm,
        directory: Path,
        *,
        add_devices: Callable[[Machine], None] | None = None,
        track_dirty_pages: bool = False,
        state: MachineState | None = None,
        **kwargs: Any,
    ) -> Machine:
        """A new machine continuing where the snapshot stopped; RAM is the memory file, MAP_PRIVATE.

        `add_devices` re-creates the snapshot's non-legacy devices (same names)
        before their state is applied. `state` skips re-reading state.json.
        """
        state = state or read_state(directory)
        machine = cls.prepare_restore(kvm, directory, state, track_dirty_pages=track_dirty_pages, **kwargs)
        try:
            if add_devices is not None:
                add_devices(machine)
            machine.apply_state(state)
        except BaseException:
            machine.close()
            raise
        return machine

    async def aclose(self) -> None:
        """close() in a worker thread: tearing down a VM takes ~20 ms of kernel time on PVM."""
        await trio.to_thread.run_sync(self.close)

    def close(self) -> None:
        for runner in getattr(self, "vcpus", []):
            runner.vcpu.close()
        if hasattr(self, "vm"):
            self.vm.close()
        notify_fds = [fd for fds in self._notify_eventfds.values() for fd in fds]
        for fd in [*self._irq_eventfds.values(), *notify_fds]:
            os.close(fd)
        self._irq_eventfds, self._notify_eventfds = {}, {}
        self.memory.close()
