"""A real Linux guest on the VMM: kernel → /init over virtio-blk, serial console, reset;
and KvmRuntime's whole create path on the default template: boot → guest agent ready →
template snapshot → two clones restored from it → /init each → code runs in each.

Needs hardware virtualization (VMX/SVM) or PVM with a PVM guest kernel, and a built
microVM kernel (image/kernel/build.py); elsewhere skipped with the reason, which names
the host's KVM kind (`cube doctor` explains the same). The pieces that run on any host
are tested without a Linux guest: snapshot/restore/clone and pooled shells with small
guest payloads (test_kvm_snapshot.py, test_kvm_pool.py, test_kvm_runtime.py), the
virtio models under real Linux drivers over vhost-user (tests/virtio), envd and /init
in UML guests (tests/uml, tests/cubelet)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import secrets
import shlex
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from appliance.config import Config, load_config
from appliance.cubelet.cubelet import rfc3339
from appliance.cubelet.envd_client import CommandResult, run_command
from appliance.net.service import CubeVS
from appliance.records import MANIFEST_NAME, ROOTFS_NAME, TemplateManifest
from appliance.runtime.base import ENVD_PORT, BootSpec
from appliance.runtime.detect import detect_host, find_guest_kernel
from appliance.runtime.kvm.boot import load_linux, prepare_boot_vcpu
from appliance.runtime.kvm.machine import Machine, MachineConfig
from appliance.runtime.kvm.runtime import KERNEL_CMDLINE, OVERLAY_NAME, KvmRuntime, KvmSandbox
from appliance.runtime.kvm.snapshot import MEMORY_FILE
from appliance.runtime.kvm.template_snapshots import SnapshotKey
from appliance.runtime.kvm.vcpu import VcpuExit
from appliance.runtime.virtio.blk.device import VirtioBlock
from appliance.runtime.virtio.blk.disk import CowDisk
from appliance.runtime.virtio.mmio import MMIO_SIZE, MmioTransport, cmdline_device
from appliance.runtime.virtio.vhost_user.uml_frontend import BUSYBOX, build_initramfs, statically_linked
from appliance.templates.default import TEMPLATE_ID as DEFAULT_TEMPLATE_ID
from cffi_kvm import Kvm

MIB = 1 << 20


def _why_not() -> str | None:
    config = load_config()
    host = detect_host(config)
    if host.kvm not in ("VMX", "SVM") and not (host.kvm == "PVM" and host.pvm_guest_kernel):
        return f"a Linux guest cannot boot under this host's KVM ({host.kvm}): {host.reason}"
    if find_guest_kernel(config) is None:
        return "no microVM guest kernel: run image/kernel/build.py or set kvm_guest_kernel"
    return None


WHY_NOT = _why_not()
WHY_NO_INITRAMFS = WHY_NOT or (
    None if statically_linked(BUSYBOX) else f"{BUSYBOX} is no static busybox (install busybox-static)"
)


@pytest.mark.skipif(WHY_NO_INITRAMFS is not None, reason=WHY_NO_INITRAMFS or "")
async def test_linux_boots_to_init_and_reads_virtio_blk(tmp_path: Path) -> None:
    kernel = find_guest_kernel(load_config())
    assert kernel is not None
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MIB))
    initrd = tmp_path / "initrd"
    script = "echo disk=$(dd if=/dev/vda bs=1M count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
    initrd.write_bytes(gzip.decompress(build_initramfs(script)))
    disk = CowDisk(tmp_path / "overlay", base=image)
    with Kvm() as kvm:
        machine = Machine.new(kvm, MachineConfig(memory_size=256 * MIB))
        try:
            irq_fd = machine.irq_eventfd(5)
            transport = MmioTransport(VirtioBlock(disk), machine.memory, lambda: os.eventfd_write(irq_fd, 1))
            machine.add_mmio_device("virtio-blk", transport, 0xD000_0000, MMIO_SIZE)
            cmdline = KERNEL_CMDLINE.replace("root=/dev/vda rw init=/sbin/cube-init", "rdinit=/init")
            entry = load_linux(machine.memory, kernel, f"{cmdline} {cmdline_device(0xD000_0000, 5)}", initrd)
            prepare_boot_vcpu(machine.memory, machine.vcpus[0].vcpu, entry)
            with trio.fail_after(max(60, load_config().kvm_boot_timeout_s)):
                outcome = await machine.run()
        finally:
            machine.close()
            disk.close()
    console = machine.console_output.decode(errors="replace")
    assert outcome is VcpuExit.RESET, console[-2000:]  # `reboot -f` with reboot=k → i8042 reset
    assert f"disk={hashlib.sha256(image.read_bytes()).hexdigest()}" in console


# Test-only sandbox addresses and a resolver upstream nothing listens on: no test
# traffic leaves the host (tests/uml uses 10.231.0.0/24).
TEST_HOST_NETWORK = "10.232.0.0/24"
DEAD_DNS_UPSTREAM = "127.0.0.1:9"


@pytest.fixture
async def kvm_runtime() -> AsyncIterator[tuple[KvmRuntime, Config]]:
    """KvmRuntime over a CubeVS of its own, private state (short paths: unix sockets)."""
    base = load_config()
    work = Path(tempfile.mkdtemp(prefix="cubetest-kvm-"))
    config = Config(
        state_dir=work / "state",
        run_dir=work / "run",
        cache_dir=base.cache_dir,  # the built microVM kernel
        kvm_guest_kernel=base.kvm_guest_kernel,
        # Raised through the environment on a software-emulated host (tests/kvm_host).
        kvm_boot_timeout_s=base.kvm_boot_timeout_s,
        guest_agent_timeout_s=base.guest_agent_timeout_s,
        host_network=TEST_HOST_NETWORK,
        allow_unenforced_network=True,
    )
    try:
        async with CubeVS.start(config, dns_upstreams=[DEAD_DNS_UPSTREAM]) as cubevs:
            runtime = KvmRuntime(config, cubevs)
            try:
                yield runtime, config
            finally:
                runtime.close()
    finally:
        shutil.rmtree(work)


def _spec(config: Config, template: TemplateManifest, slot: int) -> BootSpec:
    return BootSpec.for_template(config, template, f"cubetest-kvm-{slot}-{secrets.token_hex(3)}", slot)


async def _init(instance: KvmSandbox, template: TemplateManifest, env: dict[str, str]) -> None:
    """What the cubelet's create sends a guest restored from the template (cubelet._init_guest)."""
    host, port = instance.endpoint(ENVD_PORT)
    body = {
        "envVars": {**template.envs, **env},
        "timestamp": rfc3339(time.time()),
        "rngSeed": secrets.token_hex(32),
        "defaultUser": template.user,
        "defaultWorkdir": template.workdir,
    }
    async with httpx.AsyncClient(
        timeout=max(30, load_config().guest_agent_timeout_s), trust_env=False
    ) as http:
        # The clone's boot token is the snapshot's; no accessToken: its agent stays open to _run.
        headers = {"X-Access-Token": instance.agent_token}
        response = await http.post(f"http://{host}:{port}/init", json=body, headers=headers)
    assert response.status_code == 204, response.text


async def _run(instance: KvmSandbox, code: str) -> CommandResult:
    host, _port = instance.endpoint(ENVD_PORT)
    timeout = max(60, 6 * load_config().guest_agent_timeout_s)
    return await run_command(host, f"python3 -c {shlex.quote(code)}", timeout=timeout)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# Says who it is, when it is, a random draw, and what the other clone may have left in
# guest RAM (/tmp is a tmpfs) or on disk (the home directory, on the COW virtio-blk).
REPORT_AND_MARK = """
import os, time, uuid
name = os.environ["CUBE_CLONE"]
marks = [d + "/mark-" + n for d in ("/tmp", os.path.expanduser("~")) for n in "ab"]
seen = [p for p in marks if os.path.exists(p)]
for path in ("/tmp/mark-" + name, os.path.expanduser("~/mark-" + name)):
    with open(path, "w") as f:
        f.write(name)
    os.sync()
print(name, int(time.time()), uuid.uuid4().hex, ",".join(seen) or "-")
"""


@pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")
async def test_template_snapshot_clones_get_their_own_init_and_diverge(
    kvm_runtime: tuple[KvmRuntime, Config],
) -> None:
    runtime, config = kvm_runtime
    installed_dir = load_config().templates_dir / DEFAULT_TEMPLATE_ID
    if not (installed_dir / MANIFEST_NAME).is_file():
        pytest.skip(f"no default template installed in {installed_dir} (installer/install.sh builds it)")
    installed = TemplateManifest.load(installed_dir)
    # A template directory of the test's own, published in its own store (the installed one
    # is not the test's to write): the same read-only root image and manifest.
    directory = config.templates_dir / installed.template_id
    directory.mkdir(parents=True)
    (directory / ROOTFS_NAME).symlink_to(installed.rootfs)
    template = dataclasses.replace(installed, directory=directory)
    template.save()

    # The first create boots (kernel → cube-init → the agent and its default kernel answer),
    # snapshots the template, then serves; the next ones restore that snapshot.
    with trio.fail_after(600):
        await _build_snapshot_and_clone(runtime, config, template)


async def _build_snapshot_and_clone(runtime: KvmRuntime, config: Config, template: TemplateManifest) -> None:
    kernel = find_guest_kernel(config)
    assert kernel is not None
    async with trio.open_nursery() as nursery:
        builder = await nursery.start(runtime.run, _spec(config, template, 0))
        assert isinstance(builder, KvmSandbox)
        assert not builder.shared_key and builder.fully_ready()  # booted, not restored
        assert b"Linux version" in builder.console_log.read_bytes()
        nursery.cancel_scope.cancel()
    snapshot = runtime.snapshots.valid(
        SnapshotKey.of(template, kernel, template.memory_mb, template.cpu_count)
    )
    assert snapshot is not None
    memory_before = _sha256(snapshot / MEMORY_FILE)
    overlay_before = _sha256(snapshot / OVERLAY_NAME)

    # Two creates: each restores the snapshot in its own VMM, gets its own env, clock and
    # RNG seed through /init, and runs code.
    async with trio.open_nursery() as nursery:
        clones: dict[str, KvmSandbox] = {}
        for slot, name in ((1, "a"), (2, "b")):
            clone = await nursery.start(runtime.run, _spec(config, template, slot))
            assert isinstance(clone, KvmSandbox)
            assert clone.shared_key == str(snapshot / MEMORY_FILE)  # restored from the snapshot
            await _init(clone, template, {"CUBE_CLONE": name})
            clones[name] = clone
        first = {name: await _run(clone, REPORT_AND_MARK) for name, clone in clones.items()}
        second = {name: await _run(clone, REPORT_AND_MARK) for name, clone in clones.items()}
        nursery.cancel_scope.cancel()

    lines = {name: result.stdout.split() for name, result in first.items()}
    for name, result in [*first.items(), *second.items()]:
        assert result.exit_code == 0, result.stderr
        assert result.stdout.split()[0] == name  # its own /init env
    # The guest clock was set by /init (the snapshot is older than this test's clones).
    assert all(abs(int(fields[1]) - time.time()) < 120 for fields in lines.values())
    assert lines["a"][2] != lines["b"][2]  # separate RNG states after the shared snapshot
    # Neither clone sees what the other wrote, in RAM or on disk; each sees its own.
    assert lines["a"][3] == lines["b"][3] == "-"
    for name, result in second.items():
        seen = result.stdout.split()[3].split(",")
        other = "b" if name == "a" else "a"
        assert f"/tmp/mark-{name}" in seen
        assert any(path.endswith(f"/mark-{name}") and not path.startswith("/tmp/") for path in seen)
        assert not any(path.endswith(f"/mark-{other}") for path in seen), seen
    # The template is untouched: the next clone starts from the same memory and disk.
    assert _sha256(snapshot / MEMORY_FILE) == memory_before
    assert _sha256(snapshot / OVERLAY_NAME) == overlay_before
