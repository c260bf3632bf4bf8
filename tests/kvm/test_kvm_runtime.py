"""KvmRuntime and its instances: on a host where a Linux guest cannot run the runtime refuses
with the detector's reason; an instance's pause stops the vCPUs and, for a clone of a
template snapshot, swaps its changed pages out to a diff until resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from kvm_guest import RecordingDevice, assemble
from test_kvm_snapshot import PAGE_WRITER, PAGES, Counter, expected_page_values, page_values, snapshot_after

from appliance.config import Config
from appliance.runtime.base import BootFailed, BootSpec
from appliance.runtime.detect import detect_host
from appliance.runtime.kvm.machine import Machine, MachineConfig
from appliance.runtime.kvm.runtime import PAUSED_SNAPSHOT_DIR, KvmInstance, KvmRuntime
from appliance.runtime.kvm.snapshot import read_state
from appliance.runtime.kvm.x86 import enter_long_mode
from appliance.templates.manifest import TemplateManifest
from cffi_kvm import Kvm

MIB = 1 << 20


def config_for(tmp_path: Path) -> Config:
    return Config(state_dir=tmp_path / "state", cache_dir=tmp_path / "cache", run_dir=tmp_path / "run")


async def test_refuses_with_the_reason_where_no_guest_kernel_can_run(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    host = detect_host(config)
    if host.kvm in ("VMX", "SVM") and host.kvm_usable:
        pytest.skip("this host can run a guest kernel: test_kvm_linux.py covers it")
    template = TemplateManifest(template_id="t", directory=tmp_path / "template")
    spec = BootSpec("sbx", template, slot=1, sandbox_dir=tmp_path / "sbx", memory_mb=128, cpu_count=1)
    with pytest.raises(BootFailed) as failure:
        await KvmRuntime(config, cubevs=None).run(spec)
    assert failure.value.reason.endswith(host.reason)
    assert not (tmp_path / "sbx").exists()  # nothing was set up


async def test_instance_pause_stops_the_vcpus_and_resume_continues(kvm: Kvm, tmp_path: Path) -> None:
    machine = Machine.new(kvm, MachineConfig(memory_size=16 * MIB))
    counter = RecordingDevice()
    machine.add_pio_device("counter", counter, 0x90, 4)
    # Count forever, reporting every step.
    machine.memory.write(
        0x10000, assemble("again:\ninc %ebx\nmov %ebx, %eax\nout %eax, $0x90\njmp again", origin=0x10000)
    )
    enter_long_mode(machine.memory, machine.vcpus[0].vcpu, rip=0x10000, rsp=0x8000)
    instance = KvmInstance("sbx", tmp_path / "console.log", "127.0.0.1", machine, tmp_path / "overlay")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(instance.run_until_exit)
            with trio.fail_after(20):
                while len(counter.writes) < 100:
                    await trio.sleep(0.01)
                await instance.pause()
                paused_at = len(counter.writes)
                await trio.sleep(0.2)
                assert len(counter.writes) == paused_at  # no vCPU runs while paused
                await instance.resume()
                while len(counter.writes) < paused_at + 100:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        values = [value for _, value in counter.writes]
        assert values == list(range(1, len(values) + 1))  # nothing lost or repeated across the pause
        assert instance.memory_usage_bytes() > 0
    finally:
        machine.close()


async def test_pause_of_a_clone_writes_its_diff_frees_its_memory_and_resume_continues(
    kvm: Kvm, tmp_path: Path
) -> None:
    await snapshot_after(kvm, tmp_path / "template", 5, program=PAGE_WRITER)

    sandbox_dir = tmp_path / "sbx"
    sandbox_dir.mkdir()
    clone_counter = Counter()
    clone_counter.stop_at = 1 << 40  # runs until cancelled
    clone = Machine.restore(
        kvm, tmp_path / "template", add_devices=clone_counter.attach, track_dirty_pages=True
    )
    instance = KvmInstance("sbx", sandbox_dir / "console.log", "127.0.0.1", clone, sandbox_dir / "overlay")
    paused_dir = sandbox_dir / PAUSED_SNAPSHOT_DIR
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(instance.run_until_exit)
            with trio.fail_after(20):
                while len(clone_counter.values()) < 3 * PAGES:
                    await trio.sleep(0.01)
                resident_running = instance.memory_usage_bytes()
                await instance.pause()
            # The pages the clone wrote are no longer resident (read before anything faults them in).
            assert instance.memory_usage_bytes() <= resident_running - PAGES * 4096
            steps = len(clone_counter.values())
            # The diff holds the pages the clone wrote; its RAM is the template's again.
            state = read_state(paused_dir)
            assert PAGES <= sum(count for _first, count in state.diff_runs) <= PAGES + 1
            assert page_values(clone) == expected_page_values(5) != expected_page_values(5 + steps)
            await trio.sleep(0.1)
            assert len(clone_counter.values()) == steps  # nothing runs while paused
            await instance.resume()
            assert not paused_dir.exists()
            assert page_values(clone) == expected_page_values(5 + steps)
            with trio.fail_after(20):
                while len(clone_counter.values()) < steps + 10:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert clone_counter.values() == list(range(6, 6 + len(clone_counter.values())))
    finally:
        clone.close()
