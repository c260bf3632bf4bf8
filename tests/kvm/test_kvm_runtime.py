"""KvmRuntime and its instances: on a host where a Linux guest cannot run the runtime refuses
with the detector's reason; an instance's pause stops the vCPUs and, for a clone of a
template snapshot, swaps its changed pages out to a diff until resume; sandbox taps get
the one gateway MAC snapshot clones expect."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter as Tally
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from kvm_guest import RecordingDevice, assemble
from test_kvm_snapshot import (
    PAGE_TABLE_PAGES,
    PAGE_WRITER,
    PAGES,
    Counter,
    expected_page_values,
    page_values,
    snapshot_after,
)

from appliance.config import Config
from appliance.net.service import CubeVS
from appliance.records import TemplateManifest
from appliance.runtime.base import BootFailed, BootSpec, GuestExited
from appliance.runtime.detect import detect_host
from appliance.runtime.kvm.machine import Machine, MachineConfig
from appliance.runtime.kvm.runtime import (
    DEVICE_SLOTS,
    GATEWAY_MAC,
    OVERLAY_NAME,
    PAUSED_SNAPSHOT_DIR,
    VMMS_DIR,
    KvmInstance,
    KvmRuntime,
    KvmSandbox,
    SandboxDeviceParts,
    attach_device,
    guest_mac,
    open_sandbox_tap,
)
from appliance.runtime.kvm.sandbox import _take_over
from appliance.runtime.kvm.snapshot import read_state
from appliance.runtime.kvm.template_snapshots import KEY_FILE, SnapshotBuild, SnapshotKey, TemplateUnservable
from appliance.runtime.kvm.vmm import SNAPSHOT_OUT
from appliance.runtime.kvm.x86 import enter_long_mode
from appliance.runtime.supervisor.client import SupervisorClient
from appliance.runtime.supervisor.protocol import RECORD_FILE, Op
from appliance.runtime.uml.cgroups import SUPERVISOR_SUFFIX, open_cgroup
from appliance.runtime.virtio.blk.disk import CowDisk
from appliance.runtime.virtio.net.device import VirtioNet
from cffi_kvm import Kvm

MIB = 1 << 20
# Test-only sandbox addresses (test_kvm_linux.py and tests/uml use others) and a resolver
# upstream nothing listens on.
TEST_HOST_NETWORK = "10.233.0.0/24"
DEAD_DNS_UPSTREAM = "127.0.0.1:9"


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
            diff_pages = sum(count for _first, count in state.diff_runs)
            assert PAGES <= diff_pages <= PAGES + PAGE_TABLE_PAGES, state.diff_runs
            assert page_values(clone) == expected_page_values(5) != expected_page_values(5 + steps)
            await trio.sleep(0.1)
            assert len(clone_counter.values()) == steps  # nothing runs while paused
            await instance.resume()
            assert not paused_dir.exists()
            # The kick may have stopped the guest between a step's page write and its report.
            assert page_values(clone) in (expected_page_values(5 + steps), expected_page_values(6 + steps))
            with trio.fail_after(20):
                while len(clone_counter.values()) < steps + 10:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert clone_counter.values() == list(range(6, 6 + len(clone_counter.values())))
    finally:
        clone.close()


def test_sandbox_taps_get_the_gateway_mac_every_clone_expects() -> None:
    """A clone keeps the template guest's ARP entry for its gateway: every sandbox's tap
    (the gateway side) gets the same MAC when the runtime opens it."""
    if os.geteuid() != 0:
        pytest.skip("a netns and a tap need root")
    namespace = "cubetest-kvmmac-" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        add_tap = ["ip", "-n", namespace, "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr"]
        subprocess.run(add_tap, check=True)
        fd = open_sandbox_tap(f"/run/netns/{namespace}", "tap0")
        try:
            shown = subprocess.run(
                ["ip", "-n", namespace, "-j", "link", "show", "tap0"], capture_output=True, check=True
            ).stdout
            assert json.loads(shown)[0]["address"] == GATEWAY_MAC.hex(":")
        finally:
            os.close(fd)
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=True)


# Reads virtio-blk's MagicValue ("virt") through the MMIO bus and prints it on the serial port.
MAGIC_TO_SERIAL = """
mov $0xd0000000, %rsi
mov (%rsi), %ebx
mov $0x3f8, %dx
mov $4, %ecx
next:
mov %bl, %al
out %al, (%dx)
shr $8, %ebx
dec %ecx
jnz next
again:
hlt
jmp again
"""


def _template_snapshot(
    kvm: Kvm, runtime: KvmRuntime, template: TemplateManifest, kernel: Path, work: Path
) -> Path:
    """A template snapshot as the runtime's first boot of a template publishes one, of a small
    payload instead of a booted Linux, with the runtime's devices (never activated) in their
    slots; published in the runtime's store under the key a create of `template` looks up."""
    machine = Machine.new(kvm, MachineConfig(memory_size=SNAPSHOT_MEMORY_MB * MIB))
    disk = CowDisk(work / "template-overlay", base=template.rootfs)
    try:
        parts = SandboxDeviceParts(disk, "cube", -1, guest_mac(0), work / "unused.sock")
        for index, slot in enumerate(DEVICE_SLOTS):
            attach_device(machine, index, slot.name, slot.build(parts))
        machine.memory.write(0x10000, assemble(MAGIC_TO_SERIAL, origin=0x10000))
        enter_long_mode(machine.memory, machine.vcpus[0].vcpu, rip=0x10000, rsp=0x8000)
        key = SnapshotKey.of(template, kernel, SNAPSHOT_MEMORY_MB, 1)
        build = trio.run(runtime.snapshots.ready_or_claim, key, "test")
        assert isinstance(build, SnapshotBuild)
        machine.snapshot(build.staging)
        (build.staging / OVERLAY_NAME).write_bytes((work / "template-overlay").read_bytes())
        return runtime.snapshots.publish(build)
    finally:
        machine.close()
        disk.close()


SNAPSHOT_MEMORY_MB = 16


@contextlib.contextmanager
def kvm_runtime_on_this_host() -> Iterator[tuple[Path, Config, TemplateManifest]]:
    """A private config whose kvm runtime can restore here (PVM with a kernel configured: a
    restore never runs the kernel, which cannot boot on PVM), and a published template."""
    if os.geteuid() != 0:
        pytest.skip("the sandbox network needs root")
    work = Path(tempfile.mkdtemp(prefix="cubetest-kvmrt-"))  # short paths: unix sockets
    try:
        kernel = work / "vmlinux"  # a stand-in: a cold boot of it fails at once
        kernel.write_bytes(b"not a kernel")
        config = Config(
            state_dir=work / "state",
            run_dir=work / "run",
            cache_dir=work / "cache",
            kvm_guest_kernel=kernel,
            host_network=TEST_HOST_NETWORK,
            allow_unenforced_network=True,
        )
        if not detect_host(config).kvm_usable:
            pytest.skip(detect_host(config).reason)
        template = TemplateManifest(template_id="t", directory=config.templates_dir / "t")
        template.directory.mkdir(parents=True)
        template.rootfs.write_bytes(os.urandom(MIB))
        template.save()
        yield work, config, template
    finally:
        shutil.rmtree(work)


@contextlib.asynccontextmanager
async def kvm_runtime_with_a_snapshot(
    kvm: Kvm, work: Path, config: Config, template: TemplateManifest
) -> AsyncIterator[tuple[KvmRuntime, Path]]:
    """kvm_runtime_on_this_host's kvm runtime on CubeVS, `template`'s snapshot published in its
    store (the snapshot's directory); the runtime is closed at the end, then CubeVS stopped."""
    kernel = config.kvm_guest_kernel
    assert kernel is not None
    async with CubeVS.start(config, dns_upstreams=[DEAD_DNS_UPSTREAM]) as cubevs:
        runtime = KvmRuntime(config, cubevs)
        try:
            snapshot = await trio.to_thread.run_sync(_template_snapshot, kvm, runtime, template, kernel, work)
            yield runtime, snapshot
        finally:
            runtime.close()


def _spec(config: Config, template: TemplateManifest, name: str, slot: int = 1) -> BootSpec:
    sandbox_id = f"cubetest-{name}-{secrets.token_hex(2)}"
    return BootSpec.for_template(config, template, sandbox_id, slot, memory_mb=16)


async def _until_console_has(spec: BootSpec, text: bytes) -> None:
    console = spec.sandbox_dir / "console.log"
    with trio.fail_after(30):
        while not (console.exists() and text in console.read_bytes()):
            await trio.sleep(0.05)


def _vmm_pid(config: Config, spec: BootSpec) -> int:
    record = json.loads((config.run_dir / VMMS_DIR / spec.sandbox_id / RECORD_FILE).read_text())
    return int(record["pid"])


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {name: value.strip() for name, _, value in (line.partition(":") for line in lines)}


def _fds_of(pid: int) -> list[str]:
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return fds


def test_a_create_restores_the_template_snapshot_in_its_own_unprivileged_vmm(kvm: Kvm) -> None:
    """KvmRuntime.run on a template with a snapshot: network, tap, the snapshot's overlay
    copied, a VMM process restoring it with the sandbox's devices, vCPU running. The payload
    stands in for Linux (which cannot boot on PVM): its serial output in the sandbox's
    console log shows the restored guest running on the VMM's MMIO bus. The VMM runs as the
    sandbox's uid with no capability in any set and no_new_privs, /dev/kvm and the tap
    handed to it as descriptors. Readiness (the guest agent) is the Linux test's; this one
    cancels the create once the guest ran."""
    with kvm_runtime_on_this_host() as (work, config, template):

        async def main() -> None:
            async with kvm_runtime_with_a_snapshot(kvm, work, config, template) as (runtime, snapshot):
                spec = _spec(config, template, "kvmrt")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(runtime.run, spec)
                    await _until_console_has(spec, b"virt")
                    overlay = (spec.sandbox_dir / OVERLAY_NAME).read_bytes()
                    assert overlay == (snapshot / OVERLAY_NAME).read_bytes()
                    pid = _vmm_pid(config, spec)
                    status = _status(pid)
                    uid = str(config.uid_base + spec.slot)
                    assert status["Uid"].split() == [uid] * 4 and status["Gid"].split() == [uid] * 4
                    assert status["Groups"] == ""
                    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                        assert int(status[capabilities], 16) == 0, (capabilities, status[capabilities])
                    assert status["NoNewPrivs"] == "1"
                    fds = _fds_of(pid)
                    assert "/dev/kvm" in fds and "/dev/net/tun" in fds, fds
                    assert any(fd.endswith("kvm-vcpu:0") for fd in fds), fds
                    # A snapshot (what a template's first boot takes): written by the VMM into the
                    # sandbox's directory, taken over by the service as root's regular files.
                    vmm = SupervisorClient.attach(config.run_dir / VMMS_DIR / spec.sandbox_id)
                    try:
                        reply = await vmm.request(Op.SNAPSHOT, timeout=120)
                    finally:
                        vmm.close()
                    assert reply.ok, reply.error
                    taken = work / "taken"
                    await trio.to_thread.run_sync(_take_over, spec.sandbox_dir / SNAPSHOT_OUT, taken)
                    assert {p.name for p in taken.iterdir()} >= {"state.json", "memory", OVERLAY_NAME}
                    assert all(p.stat().st_uid == 0 for p in taken.iterdir())
                    assert read_state(taken).memory_size == SNAPSHOT_MEMORY_MB * MIB
                    nursery.cancel_scope.cancel()
                # Gone with the cancelled create, before the runtime closes.
                assert not Path(f"/proc/{pid}").exists()
                assert not Path(f"/run/netns/cube-{spec.sandbox_id}").exists()
                assert not spec.sandbox_dir.exists()
                assert not (config.run_dir / VMMS_DIR / spec.sandbox_id).exists()

        trio.run(main)


def _busy_threads_fds_netns() -> tuple[set[str], Tally[str], set[str]]:
    """Threads doing work (trio's idle cached workers are named `Trio thread N` again), the
    open fds (what they point at), the named network namespaces. Not CubeVS's workers: it is
    the service's, not the sandbox's, and the sandbox's veth coming and going sets off its
    re-reading of the host's addresses (`blocked_set from ...CubeVS._follow_host_addresses`)."""
    busy = {
        t.name
        for t in threading.enumerate()
        if t is not threading.main_thread()
        and not re.fullmatch(r"Trio thread \d+", t.name)
        and ".CubeVS." not in t.name
    }
    fds: Tally[str] = Tally()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own fd, gone by now
            fds[os.readlink(f"/proc/self/fd/{fd}")] += 1
    netns = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    return busy, fds, netns


async def _until_cubevs_is_idle() -> None:
    """Until CubeVS's worker is done: the sandbox's veth going away sets off its re-reading of
    the host's addresses, whose netlink sockets are open while it runs (seen in the emulated host)."""
    with trio.fail_after(60):
        while any(".CubeVS." in thread.name for thread in threading.enumerate()):
            await trio.sleep(0.05)


def test_killing_a_sandbox_leaves_no_process_thread_fd_netns_or_file(kvm: Kvm) -> None:
    """The machine is its VMM's: the service holds no vCPU thread or KVM fd of it. Cancelling
    `run` (the kill) ends the VMM, removes the netns and its tap, the VMM's cgroup leaf and
    control directory and the sandbox directory; the service is left as it was."""
    with kvm_runtime_on_this_host() as (work, config, template):

        async def main() -> None:
            async with kvm_runtime_with_a_snapshot(kvm, work, config, template) as (runtime, _snapshot):
                await _until_cubevs_is_idle()
                before = _busy_threads_fds_netns()
                spec = _spec(config, template, "kill")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(runtime.run, spec)
                    await _until_console_has(spec, b"virt")
                    pid = _vmm_pid(config, spec)
                    during = _busy_threads_fds_netns()
                    nursery.cancel_scope.cancel()
                await _until_cubevs_is_idle()
                after = _busy_threads_fds_netns()
            assert not any("kvm-vcpu" in fd or "kvm-vm" in fd for fd in during[1]), during[1]
            assert f"cube-{spec.sandbox_id}" in during[2] - before[2]
            assert not Path(f"/proc/{pid}").exists()
            assert after[0] == before[0], after[0] ^ before[0]
            assert after[1] == before[1], (after[1] - before[1], before[1] - after[1])
            assert after[2] == before[2], after[2] ^ before[2]
            assert not spec.sandbox_dir.exists()
            assert not (config.run_dir / VMMS_DIR / spec.sandbox_id).exists()
            assert not any(
                leaf.exists() for leaf in open_cgroup(spec.sandbox_id + SUPERVISOR_SUFFIX).leaves.values()
            )

        trio.run(main)


# A service in a process of its own: CubeVS and the kvm runtime creating one sandbox (argv:
# state dir, run dir, cache dir, kernel, template dir, sandbox id), until it is killed.
SERVICE = """
import sys, trio
from pathlib import Path
from appliance.config import Config
from appliance.net.service import CubeVS
from appliance.records import TemplateManifest
from appliance.runtime.base import BootSpec
from appliance.runtime.kvm.runtime import KvmRuntime
state, run, cache, kernel, template_dir, sandbox_id, network, dns = sys.argv[1:]
config = Config(state_dir=Path(state), run_dir=Path(run), cache_dir=Path(cache),
                kvm_guest_kernel=Path(kernel), host_network=network, allow_unenforced_network=True)
template = TemplateManifest.load(Path(template_dir))
async def main():
    async with CubeVS.start(config, dns_upstreams=[dns]) as cubevs:
        spec = BootSpec.for_template(config, template, sandbox_id, 1, memory_mb=16)
        await KvmRuntime(config, cubevs).run(spec)
trio.run(main)
"""


def test_a_sandbox_outlives_a_killed_service_and_the_next_one_adopts_it(kvm: Kvm) -> None:
    """kill -9 of the process running CubeVS and the kvm runtime while a sandbox runs: its VMM
    runs on, with its network. A new CubeVS and runtime find it (`kept_guests`: its slot and
    template from the VMM's record), take it over (`adopt`: handed over at once) and control
    it (pause, resume: the same VMM process). Then kill -9 of that VMM: the adopted sandbox
    ends with the reason, and nothing of it is left."""
    with kvm_runtime_on_this_host() as (work, config, template):

        async def make_snapshot() -> None:
            async with kvm_runtime_with_a_snapshot(kvm, work, config, template):
                pass

        trio.run(make_snapshot)
        spec = _spec(config, template, "adopt")
        argv = [
            config.state_dir,
            config.run_dir,
            config.cache_dir,
            config.kvm_guest_kernel,
            template.directory,
        ]
        service = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SERVICE,
                *map(str, argv),
                spec.sandbox_id,
                TEST_HOST_NETWORK,
                DEAD_DNS_UPSTREAM,
            ]
        )
        try:
            trio.run(_until_console_has, spec, b"virt")
            pid = _vmm_pid(config, spec)
        finally:
            service.kill()
            service.wait()
        assert Path(f"/proc/{pid}").exists() and Path(f"/run/netns/cube-{spec.sandbox_id}").exists()

        async def restart() -> None:
            async with CubeVS.start(config, dns_upstreams=[DEAD_DNS_UPSTREAM]) as cubevs:
                runtime = KvmRuntime(config, cubevs)
                try:
                    kept, gone = await runtime.kept_guests()
                    assert [(k.sandbox_id, k.slot, k.template_id) for k in kept] == [
                        (spec.sandbox_id, spec.slot, template.template_id)
                    ]
                    assert gone == {}
                    ended: list[GuestExited] = []

                    async def adopt(*, task_status: trio.TaskStatus[KvmSandbox]) -> None:
                        try:
                            await runtime.adopt(spec.sandbox_id, spec, task_status=task_status)
                        except GuestExited as exc:
                            ended.append(exc)

                    async with trio.open_nursery() as nursery:
                        adopted = await nursery.start(adopt)
                        assert isinstance(adopted, KvmSandbox)
                        await adopted.pause()
                        state = (await adopted.vmm.request(Op.STATE)).state
                        assert state is not None and state.paused
                        await adopted.resume()
                        assert _vmm_pid(config, spec) == pid
                        os.kill(pid, signal.SIGKILL)
                    (exit,) = ended
                    assert f"pid {pid}" in exit.reason and "is gone" in exit.reason, exit.reason
                finally:
                    runtime.close()

        trio.run(restart)
        assert not Path(f"/run/netns/cube-{spec.sandbox_id}").exists()
        assert not spec.sandbox_dir.exists()
        assert not (config.run_dir / VMMS_DIR / spec.sandbox_id).exists()


def test_kill_9_of_one_vmm_ends_that_sandbox_only(kvm: Kvm) -> None:
    """Two sandboxes; one's VMM is SIGKILLed: that create's task ends (the runtime saw its VMM
    go), everything of it is removed, and the other's VMM runs on and answers."""
    with kvm_runtime_on_this_host() as (work, config, template):

        async def main() -> None:
            async with kvm_runtime_with_a_snapshot(kvm, work, config, template) as (runtime, _snapshot):
                victim, bystander = _spec(config, template, "victim", 1), _spec(config, template, "other", 2)
                async with trio.open_nursery() as nursery:
                    ended = trio.Event()

                    async def run_victim() -> None:
                        with pytest.raises(TemplateUnservable, match="is gone"):
                            await runtime.run(victim)
                        ended.set()

                    nursery.start_soon(run_victim)
                    nursery.start_soon(runtime.run, bystander)
                    await _until_console_has(victim, b"virt")
                    await _until_console_has(bystander, b"virt")
                    os.kill(_vmm_pid(config, victim), signal.SIGKILL)
                    with trio.fail_after(60):
                        await ended.wait()
                    assert not victim.sandbox_dir.exists()
                    assert not Path(f"/run/netns/cube-{victim.sandbox_id}").exists()
                    other = SupervisorClient.attach(config.run_dir / VMMS_DIR / bystander.sandbox_id)
                    try:
                        reply = await other.request(Op.STATE)
                        assert reply.ok and reply.state is not None and reply.state.exit is None
                    finally:
                        other.close()
                    nursery.cancel_scope.cancel()

        trio.run(main)


def test_a_snapshot_of_another_kernel_is_refused_not_restored(kvm: Kvm) -> None:
    """A snapshot in the store whose key names another guest kernel (or template version, VMM,
    size, host) is never restored: the create boots instead, and (the kernel here being a
    stand-in that cannot boot) the template is reported unservable with the boot's error,
    which sends the service's creates to its uml fallback."""
    with kvm_runtime_on_this_host() as (work, config, template):

        async def main() -> None:
            async with kvm_runtime_with_a_snapshot(kvm, work, config, template) as (runtime, snapshot):
                stamped = json.loads((snapshot / KEY_FILE).read_text())
                (snapshot / KEY_FILE).write_text(json.dumps({**stamped, "kernel": "0" * 16}))
                spec = _spec(config, template, "stale")
                with pytest.raises(TemplateUnservable) as refused:
                    await runtime.run(spec)
                # It booted (loading the kernel failed) instead of restoring the refused snapshot.
                assert "neither an ELF vmlinux nor a bzImage" in refused.value.reason, refused.value
                # The next create is told at once, without another boot.
                with pytest.raises(TemplateUnservable):
                    await runtime.run(_spec(config, template, "again"))

        trio.run(main)


async def test_a_paused_sandboxs_nic_takes_no_frame_until_resumed() -> None:
    """Frames that reach a paused sandbox's tap stay there until resume: delivering one would
    write guest memory that the pause's diff holds as it was (the resume would write the
    old rings back under the device model's feet, and the guest's network would be dead)."""
    if os.geteuid() != 0:
        pytest.skip("a netns and a tap need root")
    from test_kvm_virtio_mmio import BUFFERS, USED, attach

    from appliance.runtime.kvm.memory import GuestMemory

    namespace = "cubetest-kvmrx-" + secrets.token_hex(3)
    netns = ["ip", "-n", namespace]
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        # No IPv6: a tap coming up sends its own frames toward the guest (MLD, DAD), which can
        # reach the rx buffer before the pause on a slow host (seen in the emulated one).
        no_ipv6 = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        subprocess.run(["ip", "netns", "exec", namespace, "sysctl", "-qw", *no_ipv6], check=True)
        subprocess.run([*netns, "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr"], check=True)
        subprocess.run([*netns, "addr", "add", "10.9.9.1/24", "dev", "tap0"], check=True)
        subprocess.run([*netns, "link", "set", "tap0", "up"], check=True)
        fd = open_sandbox_tap(f"/run/netns/{namespace}", "tap0")
        memory = GuestMemory.anonymous(4 * MIB)
        device = VirtioNet(fd, guest_mac(1))
        driver, transport, irq = attach(device, memory)
        try:
            driver.probe()
            driver.submit([(BUFFERS, 2048, True)])  # one rx buffer for the guest
            device.pause_io()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(device.run_io)
                # A datagram to 10.9.9.2: the kernel asks for it on tap0 (ARP frames toward the guest).
                send = "import socket as s; s.socket(s.AF_INET, s.SOCK_DGRAM).sendto(b'x', ('10.9.9.2', 9))"
                await trio.run_process(["ip", "netns", "exec", namespace, sys.executable, "-c", send])
                await trio.sleep(0.5)
                assert device.metrics.rx_packets == 0 and memory.read_int(USED + 2, 2) == 0, (
                    "a frame reached a paused guest"
                )
                device.resume_io()
                with trio.fail_after(10):
                    while memory.read_int(USED + 2, 2) == 0:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            assert device.metrics.rx_packets >= 1
        finally:
            transport.close()
            device.close()
            os.close(irq)
            os.close(fd)
            memory.close()
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=True)
