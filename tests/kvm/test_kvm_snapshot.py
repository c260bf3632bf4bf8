"""Snapshot → restore round trips: a new VM continues exactly where the old one stopped,
and clones of one snapshot diverge without touching each other or the memory file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import trio
from kvm_guest import RecordingDevice, assemble

from appliance.runtime.kvm.machine import Machine, MachineConfig
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


def booted(kvm: Kvm, counter: Counter, vcpus: int = 1) -> Machine:
    machine = Machine.new(kvm, MachineConfig(memory_size=32 * MIB, vcpu_count=vcpus))
    counter.attach(machine)
    machine.memory.write(CODE, assemble(COUNTER_LOOP, origin=CODE))
    enter_long_mode(machine.memory, machine.vcpus[0].vcpu, rip=CODE, rsp=0x8000)
    return machine


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
    counter = Counter()
    original = booted(kvm, counter, vcpus=2)
    try:
        await run_to(original, counter, 10)
        original.snapshot(tmp_path / "snap")
    finally:
        original.close()
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


async def test_pause_writes_only_dirtied_pages_and_resumes(kvm: Kvm, tmp_path: Path) -> None:
    counter = Counter()
    original = booted(kvm, counter)
    try:
        await run_to(original, counter, 5)
        full = original.snapshot(tmp_path / "template")
    finally:
        original.close()

    sandbox_counter = Counter(clone_id=7)
    sandbox = Machine.restore(
        kvm, tmp_path / "template", add_devices=sandbox_counter.attach, track_dirty_pages=True
    )
    try:
        await run_to(sandbox, sandbox_counter, 15)
        paused = sandbox.snapshot(tmp_path / "paused", incremental=True)
    finally:
        sandbox.close()
    # The loop dirties its counter page and the clone-id page (plus the stack page at most).
    assert 0 < paused.memory_bytes_written <= 3 * 4096 < full.memory_bytes_written

    resumed_counter = Counter(clone_id=7)
    resumed = Machine.restore(kvm, tmp_path / "paused", add_devices=resumed_counter.attach)
    try:
        assert resumed.memory.read_int(CLONE_PAGE, 4) == 7
        await run_to(resumed, resumed_counter, 20)
        assert resumed_counter.values() == [16, 17, 18, 19, 20]
    finally:
        resumed.close()
