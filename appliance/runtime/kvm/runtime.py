"""`KvmRuntime`: one microVM per sandbox, behind runtime.base's Runtime interface.

Per sandbox (all owned by the sandbox's nursery, torn down when `run` ends):
CubeVS's netns with tap0 → virtio-net; the template's rootfs as a copy-on-write
virtio-blk; virtio-vsock (host side `<sandbox_dir>/vsock.sock`); virtio-rng; the
guest kernel (PVH or 64-bit entry) with the devices on its command line; vCPU
threads; the console in `<sandbox_dir>/console.log`. Ready = the guest agent
accepts TCP on its port through the sandbox's host address.

With a template snapshot (taken by the template build once the agent is ready), a
sandbox is a restore instead of a boot: a pooled VM shell gets the snapshot's state,
the guest clock moves on, and the cubelet's /init hands over env, token, time and RNG
seed. A clone's pause writes only what it changed since the template (a diff) and
gives those pages back to the host; resume copies them back.

Runs only where a guest kernel can run at full speed: VMX/SVM, or PVM with a PVM
guest kernel configured (`detect_host` says which, and why not).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from appliance.config import Config
from appliance.guest.options import BOOT_TOKEN_PARAMETER
from appliance.net.netns import entered
from appliance.runtime.base import ENVD_PORT, BootFailed, BootSpec, GuestExited, Instance, read_console_tail
from appliance.runtime.detect import detect_host
from appliance.runtime.kvm.boot import load_linux, prepare_boot_vcpu
from appliance.runtime.kvm.machine import Machine, MachineConfig
from appliance.runtime.kvm.pool import ShellPool
from appliance.runtime.kvm.snapshot import MEMORY_FILE, STATE_FILE
from appliance.runtime.kvm.vcpu import VcpuExit
from appliance.runtime.readiness import ReadinessProbe
from appliance.runtime.virtio.blk.device import VirtioBlock
from appliance.runtime.virtio.blk.disk import CowDisk
from appliance.runtime.virtio.device import VirtioDevice
from appliance.runtime.virtio.mmio import MMIO_SIZE, QUEUE_NOTIFY, MmioTransport, cmdline_device
from appliance.runtime.virtio.net.device import VirtioNet
from appliance.runtime.virtio.net.tap import open_tap, set_tap_mac
from appliance.runtime.virtio.rng.device import VirtioRng
from appliance.runtime.virtio.vsock.device import VirtioVsock
from cffi_kvm import Kvm

if TYPE_CHECKING:
    from appliance.records import TemplateManifest

MIB = 1 << 20
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_IRQS = (5, 6, 7, 9, 10, 11)  # ISA lines Linux leaves free (4 is the serial port)
GUEST_CID = 3
# The host side of every sandbox's tap: a guest restored from a template snapshot has
# the template guest's ARP entry for its gateway, which must still be right in its own netns.
GATEWAY_MAC = bytes.fromhex("06cbe0000001")
BOOT_TIMEOUT_S = 60
READY_PROBE_INTERVAL_S = 0.05
KERNEL_CMDLINE = (
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd "
    "root=/dev/vda rw init=/sbin/cube-init"
)
GUEST_HOSTNAME = "sandbox"
# Every sandbox's devices in virtio-mmio slot order (their names key the snapshot's device
# state); a pooled shell has their interrupt and queue-notify eventfds made ahead.
DEVICE_SLOTS: tuple[tuple[str, type[VirtioDevice]], ...] = (
    ("virtio-blk", VirtioBlock),
    ("virtio-net", VirtioNet),
    ("virtio-vsock", VirtioVsock),
    ("virtio-rng", VirtioRng),
)
OVERLAY_NAME = "rootfs.overlay"
TEMPLATE_SNAPSHOT_DIR = "kvm-snapshot"  # in the template's directory: state.json, memory, rootfs.overlay
# In the sandbox's directory while it is paused: the pause's diff snapshot (a `run` of a
# sandbox that has one, e.g. after the service restarted, resumes from it).
PAUSED_SNAPSHOT_DIR = "kvm-paused"
# Beside a template snapshot: the boot token its guest's agent holds, and so every clone's.
AGENT_TOKEN_FILE = "agent-token"


def find_guest_kernel(config: Config) -> Path | None:
    """Configured kernel, else the newest microVM kernel image/kernel built into the cache."""
    if config.kvm_guest_kernel is not None:
        return config.kvm_guest_kernel if config.kvm_guest_kernel.exists() else None
    built = sorted((config.cache_dir / "kernels").glob("microvm-*/vmlinux"), key=lambda p: p.stat().st_mtime)
    return built[-1] if built else None


def guest_mac(slot: int) -> bytes:
    """Locally administered, unique per slot (the guest IP is the same everywhere, the MAC need not be)."""
    return bytes([0x02, 0xCB, 0xE0, (slot >> 16) & 0xFF, (slot >> 8) & 0xFF, slot & 0xFF])


def open_sandbox_tap(netns_path: str, tap_name: str) -> int:
    """An fd on the sandbox's tap (opened inside its netns), its host side given GATEWAY_MAC."""
    with entered(netns_path):
        fd = open_tap(tap_name)
    try:
        set_tap_mac(fd, GATEWAY_MAC)
    except BaseException:
        os.close(fd)
        raise
    return fd


def device_slot(index: int) -> tuple[int, int]:
    """MMIO base and interrupt line of the `index`th virtio device."""
    return VIRTIO_MMIO_BASE + index * MMIO_SIZE, VIRTIO_IRQS[index]


def wire_device_slots(machine: Machine) -> None:
    """Make the interrupt and queue-notify eventfds of every DEVICE_SLOTS device in
    `machine`: a pooled shell's `prepare`, so a restore only binds the devices to them."""
    for index, (_name, device_class) in enumerate(DEVICE_SLOTS):
        base, irq = device_slot(index)
        machine.irq_eventfd(irq)
        machine.notify_eventfds(base + QUEUE_NOTIFY, len(device_class.queue_max_sizes))


def _save_agent_token(directory: Path, token: str) -> None:
    path = directory / AGENT_TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)


def _snapshot_agent_token(directory: Path) -> str:
    """The boot token a snapshot's agent holds. The clones of one template snapshot all hold it
    (it is in their memory and on their /proc/cmdline): safe only because /init kills it, and
    the cubelet sends /init before anything else. "" if unknown (a paused sandbox's diff: its
    agent was initialized already; a snapshot taken before agents had boot tokens)."""
    try:
        return (directory / AGENT_TOKEN_FILE).read_text().strip()
    except OSError:
        return ""


def _copy_sparse(source: Path, target: Path) -> None:
    """Copy keeping holes (and sharing blocks where the filesystem can reflink)."""
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(source), str(target)], check=True)


@dataclass
class KvmInstance:
    sandbox_id: str
    console_log: Path
    host_ip: str
    machine: Machine
    disk_overlay: Path
    agent_token: str = field(default="", repr=False)  # see Instance.agent_token
    _run_scope: trio.CancelScope | None = None
    _resumed: trio.Event | None = None
    _paused: trio.Event | None = None
    _swapped_out: tuple[Path, list[tuple[int, int]]] | None = None  # while paused: the diff

    def endpoint(self, port: int) -> tuple[str, int]:
        return self.host_ip, port

    async def pause(self) -> None:
        """Stop the vCPUs. A guest restored from a snapshot also writes what it changed
        since (a diff: the pages dirtied since the template snapshot, its vCPU and device
        state) into PAUSED_SNAPSHOT_DIR and gives those pages back to the host: its RAM
        is the template's page cache again until resume copies the diff back."""
        if self._resumed is not None:
            return
        await self._stop_vcpus()
        memory = self.machine.memory
        if memory.track_dirty and memory.backing_file is not None:
            directory = self.disk_overlay.parent / PAUSED_SNAPSHOT_DIR
            write = functools.partial(self.machine.snapshot, directory, incremental=True)
            info = await trio.to_thread.run_sync(write)
            memory.discard_private_pages()
            self._swapped_out = (directory, info.state.diff_runs)

    async def resume(self) -> None:
        if self._swapped_out is not None:
            directory, runs = self._swapped_out
            memory = self.machine.memory
            await trio.to_thread.run_sync(memory.apply_diff, directory / MEMORY_FILE, runs)
            self._swapped_out = None
            # Only a paused sandbox has the directory: a later `run` must not resume from it.
            await trio.to_thread.run_sync(shutil.rmtree, directory)
        self._continue_vcpus()

    async def _stop_vcpus(self) -> None:
        self._resumed, self._paused = trio.Event(), trio.Event()
        if self._run_scope is not None:
            self._run_scope.cancel()  # kicks the vCPUs out of KVM_RUN; threads are joined
        await self._paused.wait()

    def _continue_vcpus(self) -> None:
        if self._resumed is not None:
            resumed, self._resumed = self._resumed, None
            resumed.set()

    async def snapshot(self, directory: Path) -> None:
        """Stop, write the whole machine (vCPUs, devices, all of RAM) and the disk overlay,
        continue. Taken once the guest agent is ready, into the template's
        TEMPLATE_SNAPSHOT_DIR, it makes every later sandbox of the template a restore."""
        await self._stop_vcpus()
        try:
            await trio.to_thread.run_sync(self.machine.snapshot, directory)  # flushes the disk
            await trio.to_thread.run_sync(_copy_sparse, self.disk_overlay, directory / OVERLAY_NAME)
            _save_agent_token(directory, self.agent_token)
        finally:
            self._continue_vcpus()

    def memory_usage_bytes(self) -> int:
        return self.machine.memory.resident_bytes()

    async def wait_fully_ready(self) -> None:
        """At once: a kvm guest is handed out only when its probe port answers."""

    def fully_ready(self) -> bool:
        return True

    async def run_until_exit(self) -> VcpuExit:
        """Run the vCPUs; a pause stops them (nothing runs) until resume."""
        while True:
            self._run_scope = trio.CancelScope()
            with self._run_scope:
                outcome = await self.machine.run()
            if not self._run_scope.cancelled_caught:
                return outcome
            assert self._paused is not None and self._resumed is not None
            self._paused.set()
            await self._resumed.wait()


class KvmRuntime:
    name = "kvm"
    snapshots_templates = True

    def __init__(self, config: Config, cubevs: Any) -> None:
        self.config = config
        self.cubevs = cubevs
        self._pools: dict[Path, ShellPool] = {}  # by template snapshot directory

    def pool_for(self, snapshot_dir: Path) -> ShellPool:
        """The template snapshot's shell pool; a re-taken snapshot replaces it."""
        pool = self._pools.get(snapshot_dir)
        if pool is not None and pool.version != (snapshot_dir / STATE_FILE).stat().st_mtime_ns:
            pool.close()
            pool = None
        if pool is None:
            pool = self._pools[snapshot_dir] = ShellPool(snapshot_dir, prepare=wire_device_slots)
        return pool

    def close(self) -> None:
        """Release the pooled shells (file descriptors and mappings; no threads)."""
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    async def finalize_template(self, template: TemplateManifest, instance: Instance) -> None:
        """Snapshot the build's probed guest: every later sandbox of the template is a restore."""
        assert isinstance(instance, KvmInstance), "a guest of another runtime"
        await instance.snapshot(template.directory / TEMPLATE_SNAPSHOT_DIR)

    async def run(
        self, spec: BootSpec, *, task_status: trio.TaskStatus[Instance] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        host = detect_host(self.config)
        kernel = find_guest_kernel(self.config)
        if not host.kvm_usable or (host.kvm == "PVM" and host.pvm_guest_kernel is None):
            raise BootFailed(spec.sandbox_id, f"the kvm runtime cannot run here: {host.reason}")
        if kernel is None:
            raise BootFailed(spec.sandbox_id, "no guest kernel: set kvm_guest_kernel or build image/kernel")
        spec.sandbox_dir.mkdir(parents=True, exist_ok=True)
        console_log = spec.sandbox_dir / "console.log"
        policy = spec.network_policy
        # Resume a paused sandbox, else clone the template's snapshot, else boot.
        snapshot_dir = spec.sandbox_dir / PAUSED_SNAPSHOT_DIR
        resuming = (snapshot_dir / STATE_FILE).exists()
        if not resuming:
            snapshot_dir = spec.template.directory / TEMPLATE_SNAPSHOT_DIR
        from_snapshot = (snapshot_dir / STATE_FILE).exists()
        pool = self.pool_for(snapshot_dir) if from_snapshot and not resuming else None
        async with contextlib.AsyncExitStack() as resources:
            async with trio.open_nursery() as setting_up:
                if pool is not None:
                    # A shell for this clone is made (if none is ready) while the network is
                    # set up, so the restore below takes a ready one.
                    setting_up.start_soon(pool.refill, 1)
                net = await resources.enter_async_context(
                    self.cubevs.sandbox_network(spec.sandbox_id, spec.slot, os.geteuid(), policy)
                )
            tap_fd = await trio.to_thread.run_sync(open_sandbox_tap, net.netns_path, net.tap)
            resources.callback(os.close, tap_fd)
            console = resources.enter_context(console_log.open("ab", buffering=0))
            kvm = resources.enter_context(Kvm())
            overlay = spec.sandbox_dir / OVERLAY_NAME
            if from_snapshot and not resuming:
                # The guest's page cache matches the template's disk as it was at the snapshot
                # (a paused sandbox's own overlay is already in place).
                await trio.to_thread.run_sync(_copy_sparse, snapshot_dir / OVERLAY_NAME, overlay)
            disk = resources.enter_context(contextlib.closing(CowDisk(overlay, base=spec.template.rootfs)))
            network = resources.enter_context(contextlib.closing(VirtioNet(tap_fd, guest_mac(spec.slot))))
            devices: list[tuple[str, VirtioDevice]] = [
                ("virtio-blk", VirtioBlock(disk, disk_id=spec.template.template_id)),
                ("virtio-net", network),
                ("virtio-vsock", VirtioVsock(GUEST_CID, spec.sandbox_dir / "vsock.sock")),
                ("virtio-rng", VirtioRng()),
            ]
            assert [name for name, _ in devices] == [name for name, _ in DEVICE_SLOTS]
            transports: list[MmioTransport] = []

            def attach_devices(machine: Machine) -> None:
                for index, (name, device) in enumerate(devices):
                    transports.append(self._attach(machine, index, name, device))

            if pool is not None:
                # A clone of the template: a pooled shell (or a new one) gets the snapshot's
                # state, devices included; the cubelet's /init then hands it its env, token,
                # time and RNG seed.
                machine = await pool.restore(add_devices=attach_devices, console=console.write)
            elif from_snapshot:
                # Same devices, same names: Machine.restore applies their saved state and
                # moves the guest clock on; dirty pages are tracked so a pause writes a diff.
                machine = await trio.to_thread.run_sync(
                    functools.partial(
                        Machine.restore,
                        kvm,
                        snapshot_dir,
                        add_devices=attach_devices,
                        track_dirty_pages=True,
                        console=console.write,
                    )
                )
            else:
                machine = Machine.new(
                    kvm, MachineConfig(spec.memory_mb * MIB, spec.cpu_count), console=console.write
                )
                attach_devices(machine)

            async def close_machine() -> None:
                with trio.CancelScope(shield=True):  # runs while the sandbox is being cancelled
                    await machine.aclose()

            resources.push_async_callback(close_machine)
            notify_fds: dict[int, list[int]] = {}
            for transport in transports:
                resources.callback(transport.close)
                # The machine owns them (a pooled shell made them ahead).
                notify_fds[transport.base] = machine.notify_eventfds(
                    transport.base + QUEUE_NOTIFY, len(transport.queues)
                )
            if not from_snapshot:
                # The default template's init reads cube_* words (the kernel hands them to it
                # as environment); a template snapshot keeps what its boot got.
                identity = [
                    f"cube_hostname={GUEST_HOSTNAME}",
                    f"cube_resolver={net.resolver_ip}",
                    f"{BOOT_TOKEN_PARAMETER}={spec.agent_token}",
                ]
                cmdline = " ".join(
                    [KERNEL_CMDLINE, *identity, *(cmdline_device(t.base, t.irq) for t in transports)]
                )
                entry = await trio.to_thread.run_sync(load_linux, machine.memory, kernel, cmdline)
                prepare_boot_vcpu(machine.memory, machine.vcpus[0].vcpu, entry, spec.cpu_count)
            agent_token = _snapshot_agent_token(snapshot_dir) if from_snapshot else spec.agent_token
            instance = KvmInstance(spec.sandbox_id, console_log, net.host_ip, machine, overlay, agent_token)
            exited: list[VcpuExit] = []
            async with trio.open_nursery() as nursery:
                if pool is not None:
                    nursery.start_soon(pool.refill)  # a shell for the template's next sandbox
                for _name, device in devices:
                    nursery.start_soon(device.run_io)
                for transport in transports:
                    nursery.start_soon(transport.serve_throttled)
                    nursery.start_soon(transport.serve_notifications, notify_fds[transport.base])
                nursery.start_soon(self._run_guest, instance, exited, nursery.cancel_scope.cancel)
                await self._wait_ready(spec, instance, net.host_ip, exited)
                if resuming:  # the pause is over: its diff must not be resumed again
                    await trio.to_thread.run_sync(shutil.rmtree, snapshot_dir)
                task_status.started(instance)
            # Reached only when the guest stopped by itself (cancelling `run` is the kill).
            reason = exited[0].value if exited else "stopped"
            raise GuestExited(spec.sandbox_id, reason, read_console_tail(console_log))

    @staticmethod
    def _attach(machine: Machine, index: int, name: str, device: VirtioDevice) -> MmioTransport:
        base, irq = device_slot(index)
        irq_fd = machine.irq_eventfd(irq)
        transport = MmioTransport(
            device, machine.memory, lambda: os.eventfd_write(irq_fd, 1), base=base, irq=irq
        )
        machine.add_mmio_device(name, transport, base, MMIO_SIZE)
        return transport

    @staticmethod
    async def _run_guest(instance: KvmInstance, exited: list[VcpuExit], stop_all: Callable[[], None]) -> None:
        exited.append(await instance.run_until_exit())
        stop_all()

    async def _wait_ready(
        self, spec: BootSpec, instance: KvmInstance, host_ip: str, exited: list[VcpuExit]
    ) -> None:
        port = spec.template.probe_port or ENVD_PORT
        probe = ReadinessProbe((host_ip, port), None, attempt_timeout_s=BOOT_TIMEOUT_S)
        with trio.move_on_after(BOOT_TIMEOUT_S):
            if await probe.wait(READY_PROBE_INTERVAL_S, gave_up=lambda: bool(exited)):
                return
        why = (
            f"guest stopped ({exited[0].value})"
            if exited
            else f"no answer on port {port} in {BOOT_TIMEOUT_S} s ({probe.last_error})"
        )
        raise BootFailed(spec.sandbox_id, why, read_console_tail(instance.console_log))
