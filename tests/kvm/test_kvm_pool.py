"""Restore shells made ahead of time: a clone from a pooled shell continues exactly like
a plain restore, the pool refills in a worker thread, shells carry the runtime's device
eventfds made ahead, and a re-taken snapshot gets a new pool in the runtime."""

from __future__ import annotations

from pathlib import Path

from test_kvm_snapshot import Counter, run_to, snapshot_after

from appliance.runtime.kvm.machine import Machine
from appliance.runtime.kvm.pool import ShellPool
from appliance.runtime.kvm.runtime import DEVICE_SLOTS, device_slot, wire_device_slots
from appliance.runtime.virtio.mmio import QUEUE_NOTIFY
from cffi_kvm import Kvm


async def test_clones_from_pooled_and_new_shells_continue_where_the_snapshot_stopped(
    kvm: Kvm, tmp_path: Path
) -> None:
    await snapshot_after(kvm, tmp_path / "snap", 10)

    pool = ShellPool(tmp_path / "snap", size=1)
    try:
        await pool.refill()
        assert pool.ready == 1
        console = bytearray()
        for expected_ready_after in (0, 0):  # the pooled shell, then a new one
            clone_counter = Counter()
            clone = await pool.restore(add_devices=clone_counter.attach, console=console.extend)
            try:
                assert pool.ready == expected_ready_after
                assert clone.memory.track_dirty  # a pause of the clone writes a diff
                await run_to(clone, clone_counter, 15)
                assert clone_counter.values() == [11, 12, 13, 14, 15]
            finally:
                clone.close()
        await pool.refill()
        assert pool.ready == 1
    finally:
        pool.close()
    assert pool.ready == 0


async def test_shells_carry_the_runtime_device_eventfds_a_restore_binds(kvm: Kvm, tmp_path: Path) -> None:
    await snapshot_after(kvm, tmp_path / "snap", 10)
    made: dict[str, object] = {}

    def prepare(shell: Machine) -> None:
        wire_device_slots(shell)
        made["fds"] = _device_eventfds(shell)

    pool = ShellPool(tmp_path / "snap", size=2, prepare=prepare)
    try:
        await pool.refill(1)  # what a create asks for while its network is being set up
        assert pool.ready == 1
        bound: dict[str, object] = {}
        clone_counter = Counter()

        def add_devices(machine: Machine) -> None:
            clone_counter.attach(machine)
            bound["fds"] = _device_eventfds(machine)  # what the VMM's attach_device asks for

        clone = await pool.restore(add_devices=add_devices, console=bytearray().extend)
        try:
            assert bound["fds"] == made["fds"]  # the shell's, not new registrations
            await run_to(clone, clone_counter, 13)
            assert clone_counter.values() == [11, 12, 13]
        finally:
            clone.close()
    finally:
        pool.close()


def _device_eventfds(machine: Machine) -> list[tuple[int, list[int]]]:
    fds = []
    for index, slot in enumerate(DEVICE_SLOTS):
        base, irq = device_slot(index)
        notify = machine.notify_eventfds(base + QUEUE_NOTIFY, len(slot.device_class.queue_max_sizes))
        fds.append((machine.irq_eventfd(irq), notify))
    return fds
