"""Snapshot → restore round trips: a new VM continues exactly where the old one stopped,
clones of one snapshot diverge without touching each other or the memory file, a pause
of a clone is a diff of the pages it dirtied, and a restored guest's clock moves on."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import trio
from kvm_guest import RecordingDevice, assemble

from appliance.runtime.kvm.machine import Machine, MachineConfig, SnapshotInfo
from appliance.runtime.kvm.snapshot import MEMORY_FILE, read_state
from appliance.runtime.kvm.x86 import enter_long_mode
from cffi_kvm import Kvm

CODE = 0x10000
MIB = 1 << 20
COUNTER_PORT = 0x90
CLONE_ID_PORT = 0x91
COUNTER_ADDR = 0x2000
CLONE_PAGE = 0x3000

# Counts in rbx and in memory, reports every step on a port, and (after the
# snapshot point) stores the id the host answers on CLONE_ID_PORT in memory.
COUNTER_LOOP = f"""
    xor %ebx, %ebx
again:
    inc %rbx
    mov %rbx, {COUNTER_ADDR:#x}
    mov %ebx, %eax
    out %eax, ${COUNTER_PORT:#x}
    in ${CLONE_ID_PORT:#x}, %eax
    mov %eax, {CLONE_PAGE:#x}
    jmp again
"""


class Counter(RecordingDevice):
    """Records the guest's counter and stops its machine once it reaches `stop_at`."""

    def __init__(self, clone_id: int = 0) -> None:
        super().__init__(answer=lambda offset, size: self.clone_id)
        self.clone_id = clone_id
        self.stop_at = 0
        self.machine: Machine | None = None
        self.on_write = self._count

    def _count(self, offset: int, value: int) -> None:
        if value >= self.stop_at and self.machine is not None:
            self.machine.request_stop()

    def attach(self, machine: Machine) -> None:
        self.machine = machine
        machine.add_pio_device("counter", self, COUNTER_PORT, 2)

    def values(self) -> list[int]:
        return [value for offset, value in self.writes if offset == 0]


async def run_to(machine: Machine, counter: Counter, stop_at: int) -> None:
    counter.stop_at = stop_at
    with trio.fail_after(20):
        await machine.run()


def booted(kvm: Kvm, counter: Counter, vcpus: int = 1, program: str = COUNTER_LOOP) -> Machine:
    """A new machine about to run `program` in long mode, `counter` on its ports."""
    machine = Machine.new(kvm, MachineConfig(memory_size=32 * MIB, vcpu_count=vcpus))
    counter.attach(machine)
    machine.memory.write(CODE, assemble(program, origin=CODE))
    enter_long_mode(machine.memory, machine.vcpus[0].vcpu, rip=CODE, rsp=0x8000)
    return machine


async def snapshot_after(
    kvm: Kvm,
    directory: Path,
    steps: int,
    *,
    program: str = COUNTER_LOOP,
    vcpus: int = 1,
    ram: dict[int, bytes] | None = None,
) -> SnapshotInfo:
    """Snapshot of a new machine that ran `program` for `steps` counter steps, with
    `ram` ({guest address: bytes}) written into its memory first."""
    counter = Counter()
    machine = booted(kvm, counter, vcpus, program)
    try:
        for address, data in (ram or {}).items():
            machine.memory.write(address, data)
        await run_to(machine, counter, steps)
        return machine.snapshot(directory)
    finally:
        machine.close()


async def test_restore_continues_exactly_where_the_snapshot_stopped(kvm: Kvm, tmp_path: Path) -> None:
    counter = Counter()
    original = booted(kvm, counter)
    try:
        await run_to(original, counter, 50)
        assert counter.values() == list(range(1, 51))
        regs_at_snapshot = original.vcpus[0].vcpu.get_regs()
        original.snapshot(tmp_path / "snap")
        # The original keeps going after a snapshot.
        await run_to(original, counter, 55)
        assert counter.values()[50:] == [51, 52, 53, 54, 55]
    finally:
        original.close()

    state = read_state(tmp_path / "snap")
    assert state.vcpus[0].regs  # plain bytes, survived JSON
    restored_counter = Counter()
    restored = Machine.restore(kvm, tmp_path / "snap", add_devices=restored_counter.attach)
    try:
        regs = restored.vcpus[0].vcpu.get_regs()
        assert (regs.rip, regs.rbx) == (regs_at_snapshot.rip, regs_at_snapshot.rbx) == (regs.rip, 50)
        assert restored.memory.read_int(COUNTER_ADDR, 8) == 50
        await run_to(restored, restored_counter, 60)
        assert restored_counter.values() == list(range(51, 61))
        assert restored.memory.read_int(COUNTER_ADDR, 8) == 60
    finally:
        restored.close()


async def test_clones_diverge_without_touching_each_other_or_the_memory_file(
    kvm: Kvm, tmp_path: Path
) -> None:
    await snapshot_after(kvm, tmp_path / "snap", 10, vcpus=2)
    memory_file = tmp_path / "snap" / MEMORY_FILE
    digest_before = hashlib.sha256(memory_file.read_bytes()).hexdigest()

    counters = [Counter(clone_id=0xA1), Counter(clone_id=0xB2)]
    clones = [Machine.restore(kvm, tmp_path / "snap", add_devices=c.attach) for c in counters]
    try:
        assert len(clones[0].vcpus) == 2
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_to, clones[0], counters[0], 20)
            nursery.start_soon(run_to, clones[1], counters[1], 40)
        assert counters[0].values() == list(range(11, 21))
        assert counters[1].values() == list(range(11, 41))
        assert clones[0].memory.read_int(CLONE_PAGE, 4) == 0xA1
        assert clones[1].memory.read_int(CLONE_PAGE, 4) == 0xB2
        assert clones[0].memory.read_int(COUNTER_ADDR, 8) == 20
        assert clones[1].memory.read_int(COUNTER_ADDR, 8) == 40
    finally:
        for clone in clones:
            clone.close()
    assert hashlib.sha256(memory_file.read_bytes()).hexdigest() == digest_before


# Each step stores the counter into one of PAGES pages (step k → page k % PAGES), so
# after a few rounds the guest has dirtied exactly PAGES pages, and nothing else.
PAGES = 48
PAGES_BASE = 0x100000
PAGE_WRITER = f"""
    xor %ebx, %ebx
again:
    inc %rbx
    mov %rbx, %rax
    xor %edx, %edx
    mov ${PAGES}, %ecx
    div %rcx
    shl $12, %rdx
    mov %rbx, {PAGES_BASE:#x}(%rdx)
    mov %ebx, %eax
    out %eax, ${COUNTER_PORT:#x}
    jmp again
"""


DEVICE_PAGE = 0x200000
# Besides what the program writes: the identity map's PML4, PDPT and PD pages, whose
# accessed/dirty bits the CPU's page walk sets. With hardware paging (VMX/SVM) those are
# guest writes that KVM logs; under PVM they are not.
PAGE_TABLE_PAGES = 3
DEVICE_DATA = b"written by a device model"


def page_values(machine: Machine) -> list[int]:
    return [machine.memory.read_int(PAGES_BASE + i * 4096, 8) for i in range(PAGES)]


def expected_page_values(count: int) -> list[int]:
    """What the pages hold after `count` steps: the last step that wrote each one."""
    return [max((k for k in range(1, count + 1) if k % PAGES == i), default=0) for i in range(PAGES)]


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


async def test_pause_writes_only_the_pages_dirtied_since_the_template_and_resume_continues(
    kvm: Kvm, tmp_path: Path
) -> None:
    # Guest RAM that a real guest would have filled (kernel, page cache): 4 MiB non-zero.
    filled = {0x400000: os.urandom(4 * MIB)}
    full = await snapshot_after(kvm, tmp_path / "template", 5, program=PAGE_WRITER, ram=filled)
    assert full.memory_bytes_written > 4 * MIB

    # create = restore with dirty-page tracking; the guest writes all PAGES pages.
    sandbox_counter = Counter()
    sandbox = Machine.restore(
        kvm, tmp_path / "template", add_devices=sandbox_counter.attach, track_dirty_pages=True
    )
    try:
        await run_to(sandbox, sandbox_counter, 5 + 3 * PAGES)
        # A device model writes guest memory from the host side, which KVM does not log.
        sandbox.memory.write(DEVICE_PAGE, DEVICE_DATA)
        paused = sandbox.snapshot(tmp_path / "paused", incremental=True)
    finally:
        sandbox.close()
    # Only the written pages: the program's, the device's, the page tables' accessed bits.
    diff_pages = paused.memory_bytes_written // 4096
    assert PAGES + 1 <= diff_pages <= PAGES + 1 + PAGE_TABLE_PAGES, paused.state.diff_runs
    diff_file = tmp_path / "paused" / MEMORY_FILE
    sparse_bound = (PAGES + 1 + PAGE_TABLE_PAGES) * 4096 + 64 * 1024
    assert allocated_bytes(diff_file) <= sparse_bound  # sparse: the diff alone
    assert read_state(tmp_path / "paused").base_memory == str(tmp_path / "template" / MEMORY_FILE)

    # resume = restore of the diff over the template's memory file: continues exactly.
    resumed_counter = Counter()
    resumed = Machine.restore(
        kvm, tmp_path / "paused", add_devices=resumed_counter.attach, track_dirty_pages=True
    )
    try:
        count = 5 + 3 * PAGES
        assert page_values(resumed) == expected_page_values(count)
        assert resumed.memory.read(DEVICE_PAGE, len(DEVICE_DATA)) == DEVICE_DATA
        assert (
            resumed.memory.read(0x400000, 4 * MIB)
            == (tmp_path / "template" / MEMORY_FILE).read_bytes()[0x400000 : 0x400000 + 4 * MIB]
        )
        await run_to(resumed, resumed_counter, count + 10)
        assert resumed_counter.values() == list(range(count + 1, count + 11))
        # Pausing a resumed guest still writes every page that differs from the template,
        # also those it has not touched since the resume.
        again = resumed.snapshot(tmp_path / "paused-again", incremental=True)
    finally:
        resumed.close()
    assert PAGES + 1 <= again.memory_bytes_written // 4096 <= PAGES + 1 + PAGE_TABLE_PAGES
    last = Machine.restore(kvm, tmp_path / "paused-again", add_devices=Counter().attach)
    try:
        assert page_values(last) == expected_page_values(count + 10)
        assert last.memory.read(DEVICE_PAGE, len(DEVICE_DATA)) == DEVICE_DATA
    finally:
        last.close()


MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
PVCLOCK_PAGE = 0x5000
SEEN_TIME = 0x6000
# Turns on kvmclock (KVM keeps a pvclock_vcpu_time_info at PVCLOCK_PAGE up to date) and
# copies its system_time (ns since the VM's clock epoch) to SEEN_TIME on every step.
CLOCK_READER = f"""
    mov ${MSR_KVM_SYSTEM_TIME_NEW:#x}, %ecx
    mov ${PVCLOCK_PAGE | 1:#x}, %eax
    xor %edx, %edx
    wrmsr
    xor %ebx, %ebx
again:
    inc %rbx
    mov {PVCLOCK_PAGE + 16:#x}, %rax
    mov %rax, {SEEN_TIME:#x}
    mov %ebx, %eax
    out %eax, ${COUNTER_PORT:#x}
    jmp again
"""


async def test_restored_guest_clock_moves_on_by_the_time_the_snapshot_was_stored(
    kvm: Kvm, tmp_path: Path
) -> None:
    await snapshot_after(kvm, tmp_path / "snap", 5, program=CLOCK_READER)
    with (tmp_path / "snap" / MEMORY_FILE).open("rb") as memory:
        memory.seek(SEEN_TIME)
        seen_before = int.from_bytes(memory.read(8), "little")
    assert seen_before > 0  # kvmclock runs

    stored_s = 1.0
    await trio.sleep(stored_s)
    restored_counter = Counter()
    restored = Machine.restore(kvm, tmp_path / "snap", add_devices=restored_counter.attach)
    try:
        await run_to(restored, restored_counter, 10)
        seen_after = restored.memory.read_int(SEEN_TIME, 8)
    finally:
        restored.close()
    # What the guest reads from kvmclock after the restore is at least the stored time later.
    assert seen_after - seen_before >= stored_s * 1e9
