"""`KvmRuntime`: one microVM per sandbox, behind runtime.base's Runtime interface.

Per sandbox, `run()` owns (and tears down in reverse, however it ends): the sandbox
directory; CubeVS's netns with tap0 → virtio-net; the template's rootfs as a
copy-on-write virtio-blk; virtio-vsock (host side `<sandbox_dir>/vsock.sock`);
virtio-rng; the machine (VM, memory, vCPUs); and the sandbox's nursery, which owns
the vCPU threads (`Machine.run`), every device's handlers and the console pump. The
nursery's cancel scope is the sandbox's lifetime: the cubelet cancels `run()` to kill
it (its E2B deadline is the cubelet's scope around this task), and nothing of the
sandbox outlives `run()`: no thread, fd, tap, netns or file.

Where the guest comes from:
- a template snapshot (template_snapshots.py), the normal case: a pooled VM shell
  gets the snapshot's state, the guest clock moves on, and the cubelet's /init
  hands over env, a fresh access token, time and an RNG seed;
- a cold boot of the microVM kernel, for the first sandbox of a template (or a
  template version, kernel or VMM) without a valid snapshot: once its agent's
  default kernel answers, it is snapshotted into the store, then handed out; other
  creates of the template wait for that snapshot and restore it;
- a cold boot without a snapshot: throwaway guests of template builds (Dockerfile
  RUN) and sandboxes carried over a restart on their kept disk (`spec.disk`).
A clone's pause writes only what it changed since the template (a diff) and gives
those pages back to the host; resume copies them back.

Runs only where a guest kernel can run at full speed: VMX/SVM, or PVM with a PVM
guest kernel configured (`detect_host` says which, and why not).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from appliance.config import Config
from appliance.guest.options import BOOT_TOKEN_PARAMETER
from appliance.net.netns import entered
from appliance.runtime.base import ENVD_PORT, BootFailed, BootSpec, GuestExited, HostBusy, Instance
from appliance.runtime.detect import detect_host, find_guest_kernel
from appliance.runtime.kvm.boot import load_linux, prepare_boot_vcpu
from appliance.runtime.kvm.console import SerialConsole
from appliance.runtime.kvm.instance import PAUSED_SNAPSHOT_DIR, KvmInstance, copy_sparse, snapshot_agent_token
from appliance.runtime.kvm.machine import Machine, MachineConfig
from appliance.runtime.kvm.pool import ShellPool
from appliance.runtime.kvm.snapshot import STATE_FILE
from appliance.runtime.kvm.template_snapshots import (
    OVERLAY_NAME,
    SNAPSHOT_STORE,
    SnapshotBuild,
    SnapshotKey,
    TemplateSnapshots,
    TemplateUnservable,
)
from appliance.runtime.kvm.vcpu import VcpuExit, VcpuFault
from appliance.runtime.readiness import ReadinessProbe
from appliance.runtime.uml.console import ConsoleLog
from appliance.runtime.virtio.blk.device import VirtioBlock
from appliance.runtime.virtio.blk.disk import CowDisk
from appliance.runtime.virtio.device import VirtioDevice
from appliance.runtime.virtio.mmio import MMIO_SIZE, QUEUE_NOTIFY, MmioTransport, cmdline_device
from appliance.runtime.virtio.net.device import VirtioNet
from appliance.runtime.virtio.net.tap import open_tap, set_tap_mac
from appliance.runtime.virtio.rng.device import VirtioRng
from appliance.runtime.virtio.vsock.device import VirtioVsock
from cffi_kvm import Kvm

__all__ = ["OVERLAY_NAME", "PAUSED_SNAPSHOT_DIR", "KvmInstance", "KvmRuntime", "TemplateUnservable"]

if TYPE_CHECKING:
    from appliance.records import TemplateManifest

log = logging.getLogger(__name__)

MIB = 1 << 20
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_IRQS = (5, 6, 7, 9, 10, 11)  # ISA lines Linux leaves free (4 is the serial port)
GUEST_CID = 3
# The host side of every sandbox's tap: a guest restored from a template snapshot has
# the template guest's ARP entry for its gateway, which must still be right in its own netns.
GATEWAY_MAC = bytes.fromhex("06cbe0000001")
KERNEL_CMDLINE = (
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd "
    "root=/dev/vda rw init=/sbin/cube-init"
)
GUEST_HOSTNAME = "sandbox"


@dataclass(frozen=True)
class SandboxDeviceParts:
    """What a sandbox's devices are made of: host resources the runtime opened for it."""

    disk: CowDisk
    disk_id: str
    tap_fd: int
    mac: bytes
    vsock_path: Path


@dataclass(frozen=True)
class DeviceSlot:
    name: str  # keys the device's state in a snapshot
    device_class: type[VirtioDevice]  # its queues: a pooled shell wires them before it exists
    build: Callable[[SandboxDeviceParts], VirtioDevice]


# The one device table: every sandbox's devices in virtio-mmio slot order, built from it;
# a pooled shell has their interrupt and queue-notify eventfds made ahead from it.
DEVICE_SLOTS: tuple[DeviceSlot, ...] = (
    DeviceSlot("virtio-blk", VirtioBlock, lambda parts: VirtioBlock(parts.disk, disk_id=parts.disk_id)),
    DeviceSlot("virtio-net", VirtioNet, lambda parts: VirtioNet(parts.tap_fd, parts.mac)),
    DeviceSlot("virtio-vsock", VirtioVsock, lambda parts: VirtioVsock(GUEST_CID, parts.vsock_path)),
    DeviceSlot("virtio-rng", VirtioRng, lambda _parts: VirtioRng()),
)


CONSOLE_LOG = "console.log"
PROBE_INTERVAL_S = 0.05
# Host memory kept free beside a new guest's RAM (the service, page cache the clones share).
HOST_RESERVE_MB = 256
_PANIC = re.compile(r"Kernel panic - not syncing: ([^\r\n]*)")


def host_memory_available_mb(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemAvailable: what the host can give without swapping or reclaiming what it needs."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


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
    for index, slot in enumerate(DEVICE_SLOTS):
        base, irq = device_slot(index)
        machine.irq_eventfd(irq)
        machine.notify_eventfds(base + QUEUE_NOTIFY, len(slot.device_class.queue_max_sizes))


def exit_reason(outcome: VcpuExit | str, console_tail: str) -> str:
    """Why a guest stopped, in words: its kernel's panic message when it printed one."""
    panic = _PANIC.search(console_tail)
    if panic:
        return f"guest kernel panic: {panic.group(1).strip()}"
    if outcome is VcpuExit.SHUTDOWN:
        return "the guest shut down (triple fault or shutdown request)"
    if outcome is VcpuExit.RESET:
        return "the guest reset itself (reboot)"
    if outcome is VcpuExit.POWEROFF:
        return "the guest powered off"
    return str(outcome.value if isinstance(outcome, VcpuExit) else outcome)


def _prepare_sandbox_dir(sandbox_dir: Path, disk: Path | None) -> None:
    shutil.rmtree(sandbox_dir, ignore_errors=True)  # a crashed service's leftovers
    sandbox_dir.mkdir(parents=True, mode=0o700)
    if disk is not None:  # a sandbox carried over a restart: its kept disk is the overlay
        os.replace(disk, sandbox_dir / OVERLAY_NAME)


@dataclass(frozen=True)
class GuestSource:
    """Where a sandbox's guest comes from: a template snapshot to restore, or a cold boot
    (which, holding `build`, snapshots the template once ready)."""

    key: SnapshotKey | None = None
    snapshot: Path | None = None
    build: SnapshotBuild | None = None


class Handover:
    """`task_status`, remembering whether the instance was handed out: a failure before
    that is the runtime's (the template or its snapshot), after it the sandbox's own."""

    def __init__(self, task_status: trio.TaskStatus[Instance]) -> None:
        self._task_status = task_status
        self.done = False

    def started(self, instance: Instance) -> None:
        self.done = True
        self._task_status.started(instance)


class KvmRuntime:
    name = "kvm"
    snapshots_templates = True  # into the snapshot store, at a published template's first boot

    def __init__(self, config: Config, cubevs: Any) -> None:
        self.config = config
        self.cubevs = cubevs
        self.snapshots = TemplateSnapshots(config.state_dir / SNAPSHOT_STORE)
        if removed := self.snapshots.prune(config.templates_dir):
            log.info("kvm: removed the snapshots of templates that are gone: %s", ", ".join(removed))
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

    def guest_kernel(self, sandbox_id: str) -> Path:
        """The kernel to boot; BootFailed with the detector's reason where none can run."""
        host = detect_host(self.config)
        kernel = find_guest_kernel(self.config)
        if not host.kvm_usable or host.guest_kernel is None or kernel is None:
            raise BootFailed(sandbox_id, f"the kvm runtime cannot run here: {host.reason}")
        return kernel

    def check_memory(self, spec: BootSpec) -> None:
        """HostBusy (a 503 for the client, nothing started, nothing killed) unless the host has
        the guest's whole RAM available beside what it keeps for itself: a guest may touch
        all of it, and the kernel's OOM killer must never have to choose a sandbox (or the
        service) to make room."""
        available_mb = host_memory_available_mb()
        if available_mb < spec.memory_mb + HOST_RESERVE_MB:
            raise HostBusy(
                spec.sandbox_id,
                f"the host has {available_mb} MiB of memory available; a {spec.memory_mb} MiB sandbox "
                f"needs {spec.memory_mb + HOST_RESERVE_MB} MiB",
            )

    def snapshots_template(self, template_dir: Path) -> bool:
        """Published templates get a snapshot; a build's throwaway guests do not."""
        return template_dir.parent == self.config.templates_dir

    async def finalize_template(self, template: TemplateManifest, instance: Instance) -> None:
        """Nothing: a build's probe guest is a throwaway; the published template's first kvm
        boot (its first create, or the service's start-up warm-up) is what gets snapshotted,
        into the store keyed by kernel, template, VMM and size (template_snapshots.py)."""

    async def run(
        self, spec: BootSpec, *, task_status: trio.TaskStatus[Instance] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        kernel = self.guest_kernel(spec.sandbox_id)
        self.check_memory(spec)
        source = await self._source(spec, kernel)
        handover = Handover(task_status)
        try:
            await trio.to_thread.run_sync(_prepare_sandbox_dir, spec.sandbox_dir, spec.disk)
            await self._run_sandbox(spec, kernel, source, handover)
            raise AssertionError("_run_sandbox returned")  # it raises GuestExited when the guest stops
        except Exception as exc:
            if handover.done or source.key is None:
                raise
            raise self._unservable(spec, source, exc) from exc
        except BaseException:
            if source.build is not None:
                self.snapshots.abandon(source.build, None)  # cancelled: the next create tries again
            raise
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(shutil.rmtree, spec.sandbox_dir, True)

    def _unservable(self, spec: BootSpec, source: GuestSource, exc: Exception) -> TemplateUnservable:
        """A template whose first boot, or whose snapshot's restore, failed: this create and
        the next ones of that version go to the fallback runtime (the service's uml), never
        to an error; a snapshot that did not restore is deleted (the next start rebuilds it)."""
        assert source.key is not None
        reason = getattr(exc, "reason", None) or repr(exc)
        if source.build is not None:
            self.snapshots.abandon(source.build, reason)
        else:
            reason = f"its snapshot did not restore: {reason}"
            assert source.snapshot is not None
            pool = self._pools.pop(source.snapshot, None)
            if pool is not None:
                pool.close()
            self.snapshots.refuse(source.key, reason)
        tail = getattr(exc, "console_tail", "")
        return TemplateUnservable(spec.sandbox_id, spec.template.template_id, reason, tail)

    async def _source(self, spec: BootSpec, kernel: Path) -> GuestSource:
        if spec.disk is not None or not self.snapshots_template(spec.template.directory):
            return GuestSource()
        key = await trio.to_thread.run_sync(
            SnapshotKey.of, spec.template, kernel, spec.memory_mb, spec.cpu_count
        )
        found = await self.snapshots.ready_or_claim(key, spec.sandbox_id)
        if isinstance(found, Path):
            return GuestSource(key, snapshot=found)
        return GuestSource(key, build=found)

    async def _run_sandbox(
        self, spec: BootSpec, kernel: Path, source: GuestSource, handover: Handover
    ) -> None:
        policy = spec.network_policy
        pool = self.pool_for(source.snapshot) if source.snapshot is not None else None
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
            kvm = resources.enter_context(Kvm())
            console = ConsoleLog(spec.sandbox_dir / CONSOLE_LOG)
            serial = SerialConsole(console)
            overlay = spec.sandbox_dir / OVERLAY_NAME
            if source.snapshot is not None:
                # The guest's page cache matches the template's disk as it was at the snapshot.
                await trio.to_thread.run_sync(copy_sparse, source.snapshot / OVERLAY_NAME, overlay)
            disk = resources.enter_context(contextlib.closing(CowDisk(overlay, base=spec.template.rootfs)))
            parts = SandboxDeviceParts(
                disk, spec.template.template_id, tap_fd, guest_mac(spec.slot), spec.sandbox_dir / "vsock.sock"
            )
            devices: list[tuple[str, VirtioDevice]] = []
            for slot in DEVICE_SLOTS:
                device = slot.build(parts)
                resources.callback(device.close)  # at once: a later slot's failure closes it
                devices.append((slot.name, device))
            transports: list[MmioTransport] = []

            def attach_devices(machine: Machine) -> None:
                for index, (name, device) in enumerate(devices):
                    transports.append(self._attach(machine, index, name, device))

            if pool is not None:
                machine = await pool.restore(add_devices=attach_devices, console=serial.write)
            else:
                machine = Machine.new(
                    kvm, MachineConfig(spec.memory_mb * MIB, spec.cpu_count), console=serial.write
                )
                attach_devices(machine)

            serial.on_power_down = functools.partial(machine.request_stop, VcpuExit.POWEROFF)

            async def close_machine() -> None:
                with trio.CancelScope(shield=True):  # runs while the sandbox is being cancelled
                    await machine.aclose()

            resources.push_async_callback(close_machine)
            for transport in transports:
                resources.callback(transport.close)
            if pool is None:
                egress = getattr(self.cubevs, "egress_tls", None)
                ca_word = egress.kernel_word() if egress is not None else ""
                await self._load_kernel(machine, kernel, transports, net.resolver_ip, spec, ca_word)
            # A clone's agent holds the boot token of the guest its template was snapshotted from.
            assert source.snapshot is None or pool is not None
            agent_token = snapshot_agent_token(source.snapshot) if source.snapshot else spec.agent_token
            instance = KvmInstance(
                spec.sandbox_id,
                console.path,
                net.host_ip,
                machine,
                overlay,
                console=console,
                restored=pool is not None,
                devices=[device for _name, device in devices],
                agent_token=agent_token,
            )
            await self._serve(spec, instance, serial, devices, transports, source, handover)

    @staticmethod
    async def _load_kernel(
        machine: Machine,
        kernel: Path,
        transports: list[MmioTransport],
        resolver_ip: str,
        spec: BootSpec,
        egress_ca_argument: str = "",
    ) -> None:
        # The default template's init reads cube_* words (the kernel hands them to it as
        # environment), the agent its boot token; a template snapshot keeps what its boot got.
        identity = [
            f"cube_hostname={GUEST_HOSTNAME}",
            f"cube_resolver={resolver_ip}",
            f"{BOOT_TOKEN_PARAMETER}={spec.agent_token}",
            # The egress CA's certificate, for the agent to trust (net/egress_tls.py).
            *([egress_ca_argument] if egress_ca_argument else []),
        ]
        cmdline = " ".join([KERNEL_CMDLINE, *identity, *(cmdline_device(t.base, t.irq) for t in transports)])
        entry = await trio.to_thread.run_sync(load_linux, machine.memory, kernel, cmdline)
        prepare_boot_vcpu(machine.memory, machine.vcpus[0].vcpu, entry, spec.cpu_count)

    async def _serve(
        self,
        spec: BootSpec,
        instance: KvmInstance,
        serial: SerialConsole,
        devices: list[tuple[str, VirtioDevice]],
        transports: list[MmioTransport],
        source: GuestSource,
        handover: Handover,
    ) -> None:
        """The sandbox's nursery: vCPU threads, device handlers, console; hands the instance
        over once ready and returns only when the guest stopped by itself (then raises)."""
        machine = instance.machine
        stopped: list[str] = []
        async with trio.open_nursery() as nursery:
            if source.snapshot is not None:
                nursery.start_soon(self.pool_for(source.snapshot).refill)  # the template's next shell
            for _name, device in devices:
                nursery.start_soon(device.run_io)
            for transport in transports:
                nursery.start_soon(transport.serve_throttled)
                notify_fds = machine.notify_eventfds(transport.base + QUEUE_NOTIFY, len(transport.queues))
                nursery.start_soon(transport.serve_notifications, notify_fds)
            nursery.start_soon(self._run_guest, instance, serial, stopped, nursery.cancel_scope.cancel)
            await self._wait_ready(spec, instance, stopped)
            if source.build is not None:
                await self._snapshot_template(spec, instance, source.build, stopped)
            handover.started(instance)
        # Reached only when the guest stopped by itself (cancelling `run` is the kill).
        assert instance.console is not None
        raise GuestExited(spec.sandbox_id, stopped[0] if stopped else "stopped", instance.console.tail())

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
    async def _run_guest(
        instance: KvmInstance, serial: SerialConsole, stopped: list[str], stop_all: Callable[[], None]
    ) -> None:
        """Run the vCPUs until the guest stops by itself; record why, then end the sandbox."""
        try:
            outcome: VcpuExit | str = await instance.run_until_exit()
        except VcpuFault as exc:
            outcome = f"KVM could not run the guest: {exc}"
        serial.drain()  # the guest's last words (a panic message) into the log
        assert instance.console is not None
        stopped.append(exit_reason(outcome, instance.console.tail()))
        stop_all()

    def _boot_timeout(self) -> float:
        return float(self.config.kvm_boot_timeout_s)

    async def _wait_ready(self, spec: BootSpec, instance: KvmInstance, stopped: list[str]) -> None:
        """Until the guest agent accepts connections on the template's probe port (a cold
        boot prints its ready line first); BootFailed with the console tail otherwise."""
        assert instance.console is not None
        port = spec.template.probe_port or ENVD_PORT
        timeout = self._boot_timeout()
        probe = ReadinessProbe((instance.host_ip, port), None, attempt_timeout_s=timeout)
        with trio.move_on_after(timeout):
            if not instance.restored:
                await instance.console.ready.wait()
            if await probe.wait(PROBE_INTERVAL_S, gave_up=lambda: bool(stopped)):
                return
        why = (
            f"guest stopped: {stopped[0]}"
            if stopped
            else f"no answer on port {port} in {timeout:.0f} s ({probe.last_error})"
        )
        raise BootFailed(spec.sandbox_id, why, instance.console.tail())

    async def _snapshot_template(
        self, spec: BootSpec, instance: KvmInstance, build: SnapshotBuild, stopped: list[str]
    ) -> None:
        """Once the default kernel answers, save the guest as the template's snapshot."""
        assert instance.console is not None
        timeout = self._boot_timeout()
        with trio.move_on_after(timeout):
            await instance.console.interpreter_ready.wait()
        if not instance.console.interpreter_ready.is_set() or stopped:
            why = (
                f"guest stopped: {stopped[0]}"
                if stopped
                else f"its default kernel was not up in {timeout:.0f} s"
            )
            raise BootFailed(spec.sandbox_id, why, instance.console.tail())
        await instance.snapshot(build.staging)
        directory = await trio.to_thread.run_sync(self.snapshots.publish, build)
        log.info("kvm: template %s snapshotted into %s", spec.template.template_id, directory)
