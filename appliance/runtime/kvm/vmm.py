"""One kvm sandbox's VMM in its own process (`python -m appliance.runtime.kvm.vmm`): the
machine (VM, memory, vCPU threads), its virtio devices and its console, owned by a process
that outlives the service which started it, as the uml runtime's supervisor does for a UML
guest (runtime/supervisor). The VMM is its guest's supervisor: the machine's state cannot
move between processes, so the process holding it is the one that must outlive the
service; a second process in front of it would add a hop to every pause and snapshot
without separating anything.

Start (the service's side is KvmRuntime's `_launch`): the `VmmSpec` on stdin; /dev/kvm
and the sandbox's tap (opened in its netns, which needs root) arrive as file descriptors
over the handover socket; the process joins its own cgroup leaf (a `systemctl restart`
of the service does not kill it), opens its control socket and files, and builds the
machine as root: restored from the template snapshot, or a cold boot of the kernel with
the sandbox's command line. Before the guest runs a single instruction it drops root for
the sandbox's uid (config.uid_base + slot; no supplementary groups, no capabilities, an
empty bounding set, no_new_privs): device emulation, which faces the guest, never runs
privileged. Then `supervisor.json`, one line `{"pid":..,"start_time":..}` on stdout, and
from then on its log to `supervisor.log`.

Control: the supervisor protocol (runtime/supervisor/control.py) on `control.sock`:
state, watch, pause/resume (the vCPUs; a clone's diff written and its pages given back),
snapshot (the whole machine into `<sandbox_dir>/snapshot`), kill, console, metrics.

End: when the guest stops by itself (poweroff, panic, triple fault), on `kill` or on
SIGTERM: the vCPUs are stopped, the machine closed, the end written to `exit.json`
(through a descriptor opened while root) and sent to watchers, and the process exits.
Network, cgroup leaf and files are the service's to remove.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import re
import resource
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from appliance.guest.options import BOOT_TOKEN_PARAMETER
from appliance.runtime.kvm.boot import load_linux, prepare_boot_vcpu
from appliance.runtime.kvm.console import SerialConsole
from appliance.runtime.kvm.instance import KvmInstance
from appliance.runtime.kvm.machine import Machine, MachineConfig
from appliance.runtime.kvm.template_snapshots import OVERLAY_NAME
from appliance.runtime.kvm.vcpu import VcpuExit, VcpuFault
from appliance.runtime.kvm.volumes import FIRST_SLOT, VOLUME_SLOTS, open_image, slot_name
from appliance.runtime.sparse import sparse_copy
from appliance.runtime.supervisor.control import ControlServer, open_listener
from appliance.runtime.supervisor.guest import first_of
from appliance.runtime.supervisor.protocol import (
    CONTROL_SOCKET,
    EXIT_FILE,
    MAX_SPEC_BYTES,
    PROTOCOL_VERSION,
    GuestExit,
    GuestState,
    Reply,
    decode_message,
    encode_exit,
    encode_message,
)
from appliance.runtime.supervisor.server import (
    join_cgroup,
    log_from_now_on,
    open_log,
    write_supervisor_record,
)
from appliance.runtime.uml.console import ConsoleLog
from appliance.runtime.virtio.blk.device import VirtioBlock
from appliance.runtime.virtio.blk.disk import CowDisk, RawDisk
from appliance.runtime.virtio.device import VirtioDevice
from appliance.runtime.virtio.mmio import MMIO_SIZE, QUEUE_NOTIFY, MmioTransport, cmdline_device
from appliance.runtime.virtio.net.device import VirtioNet
from appliance.runtime.virtio.rng.device import VirtioRng
from appliance.runtime.virtio.vsock.device import VirtioVsock
from cffi_kvm import Kvm

log = logging.getLogger("cube.vmm")

MIB = 1 << 20
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_IRQS = (5, 6, 7, 9, 10, 11)  # ISA lines Linux leaves free (4 is the serial port)
GUEST_CID = 3
KERNEL_CMDLINE = (
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd "
    "root=/dev/vda rw init=/sbin/cube-init"
)
GUEST_HOSTNAME = "sandbox"
CONSOLE_LOG = "console.log"
VSOCK_SOCKET = "vsock.sock"
# In the sandbox's directory (the sandbox uid's): where `snapshot` writes the machine.
SNAPSHOT_OUT = "snapshot"
VMM_MODULE = "appliance.runtime.kvm.vmm"
HANDED_FDS = 2  # /dev/kvm, the tap
_PANIC = re.compile(r"Kernel panic - not syncing: ([^\r\n]*)")


@dataclass(frozen=True)
class VmmSpec:
    """Everything a VMM process needs, on its stdin. Holds the boot token (a cold boot puts it
    on the guest's command line): never logged."""

    sandbox_id: str
    control_dir: str  # root's, 0700: control.sock, supervisor.json, exit.json, supervisor.log
    sandbox_dir: str  # the sandbox uid's, 0700: console log, disk overlay, vsock, pause diff
    uid: int  # the sandbox's: the VMM runs as it once the machine is built
    memory_mb: int
    cpu_count: int
    disk_id: str  # virtio-blk serial (the template id)
    rootfs: str  # the template's image under the copy-on-write overlay
    mac: str  # the guest NIC's, hex
    handover_fd: int  # inherited: the socket /dev/kvm and the tap arrive on
    supervisor_cgroup: list[str]  # cgroup.procs files the VMM moves itself into first
    snapshot: str = ""  # a template snapshot to restore; "" for a cold boot of `kernel`
    kernel: str = ""
    resolver_ip: str = ""  # cold boot: the guest's DNS resolver, on its command line
    # Cold boot: `cube.egress_ca=<base64 DER>`, the egress CA's certificate the guest agent
    # installs into the guest's trust stores (net/egress_tls.py), on its command line; "" for none.
    egress_ca_argument: str = ""
    agent_token: str = field(default="", repr=False)  # see Instance.agent_token
    guest: dict[str, Any] = field(default_factory=dict)  # the runtime's, handed back in the record
    protocol: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return encode_message(self)

    @classmethod
    def decode(cls, data: bytes) -> VmmSpec:
        return decode_message(cls, data)


# The machine.


@dataclass(frozen=True)
class SandboxDeviceParts:
    """What a sandbox's devices are made of: host resources opened for it."""

    disk: CowDisk
    disk_id: str
    tap_fd: int
    mac: bytes
    vsock_path: Path


@dataclass(frozen=True)
class DeviceSlot:
    name: str  # keys the device's state in a snapshot
    device_class: type[VirtioDevice]  # its queues: a shell wires them before it exists
    build: Callable[[SandboxDeviceParts], VirtioDevice]


def _empty_volume_slot(name: str, _parts: SandboxDeviceParts) -> VirtioDevice:
    return VirtioBlock(RawDisk.empty(), disk_id=f"cube-{name}")


# The one device table: every sandbox's devices in virtio-mmio slot order, built from it;
# a restore shell has their interrupt and queue-notify eventfds made ahead from it.
DEVICE_SLOTS: tuple[DeviceSlot, ...] = (
    DeviceSlot("virtio-blk", VirtioBlock, lambda parts: VirtioBlock(parts.disk, disk_id=parts.disk_id)),
    DeviceSlot("virtio-net", VirtioNet, lambda parts: VirtioNet(parts.tap_fd, parts.mac)),
    DeviceSlot("virtio-vsock", VirtioVsock, lambda parts: VirtioVsock(GUEST_CID, parts.vsock_path)),
    DeviceSlot("virtio-rng", VirtioRng, lambda _parts: VirtioRng()),
    # Empty until a volume is plugged in at the claim (volumes.py): vdb, vdc.
    *(
        DeviceSlot(slot_name(slot), VirtioBlock, functools.partial(_empty_volume_slot, slot_name(slot)))
        for slot in range(FIRST_SLOT, FIRST_SLOT + VOLUME_SLOTS)
    ),
)


def guest_mac(slot: int) -> bytes:
    """Locally administered, unique per slot (the guest IP is the same everywhere, the MAC need not be)."""
    return bytes([0x02, 0xCB, 0xE0, (slot >> 16) & 0xFF, (slot >> 8) & 0xFF, slot & 0xFF])


def device_slot(index: int) -> tuple[int, int]:
    """MMIO base and interrupt line of the `index`th virtio device."""
    return VIRTIO_MMIO_BASE + index * MMIO_SIZE, VIRTIO_IRQS[index]


def wire_device_slots(machine: Machine) -> None:
    """Make the interrupt and queue-notify eventfds of every DEVICE_SLOTS device in
    `machine`: a restore shell's preparation, so a restore only binds the devices to them."""
    for index, slot in enumerate(DEVICE_SLOTS):
        base, irq = device_slot(index)
        machine.irq_eventfd(irq)
        machine.notify_eventfds(base + QUEUE_NOTIFY, len(slot.device_class.queue_max_sizes))


def attach_device(machine: Machine, index: int, name: str, device: VirtioDevice) -> MmioTransport:
    base, irq = device_slot(index)
    irq_fd = machine.irq_eventfd(irq)
    transport = MmioTransport(device, machine.memory, lambda: os.eventfd_write(irq_fd, 1), base=base, irq=irq)
    machine.add_mmio_device(name, transport, base, MMIO_SIZE)
    return transport


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


def boot_cmdline(spec: VmmSpec, transports: list[MmioTransport]) -> str:
    """The cold boot's kernel command line. The default template's init reads cube_* words (the
    kernel hands them to it as environment), the agent its boot token."""
    identity = [
        f"cube_hostname={GUEST_HOSTNAME}",
        f"cube_resolver={spec.resolver_ip}",
        f"{BOOT_TOKEN_PARAMETER}={spec.agent_token}",
        *([spec.egress_ca_argument] if spec.egress_ca_argument else []),
    ]
    return " ".join([KERNEL_CMDLINE, *identity, *(cmdline_device(t.base, t.irq) for t in transports)])


@dataclass
class Built:
    """The machine as `build_machine` made it, with what serves it."""

    instance: KvmInstance
    devices: list[VirtioDevice]
    transports: list[MmioTransport]


def build_machine(
    spec: VmmSpec, kvm: Kvm, tap_fd: int, serial: SerialConsole, resources: contextlib.ExitStack
) -> Built:
    """The sandbox's machine, ready to run (as root, in the main thread; `resources` closes it).
    Its files are reached through `serial.console.path`'s directory (see `sandbox_dir_path`)."""
    sandbox_dir = serial.console.path.parent
    overlay = sandbox_dir / OVERLAY_NAME
    snapshot = Path(spec.snapshot) if spec.snapshot else None
    if snapshot is not None:  # still root: the real path
        sparse_copy(snapshot / OVERLAY_NAME, Path(spec.sandbox_dir) / OVERLAY_NAME)
    disk = resources.enter_context(contextlib.closing(CowDisk(overlay, base=Path(spec.rootfs))))
    os.chown(overlay, spec.uid, spec.uid)  # a snapshot copies it (as the sandbox uid)
    parts = SandboxDeviceParts(
        disk, spec.disk_id, tap_fd, bytes.fromhex(spec.mac), sandbox_dir / VSOCK_SOCKET
    )
    devices: list[tuple[str, VirtioDevice]] = []
    for slot in DEVICE_SLOTS:
        device = slot.build(parts)
        resources.callback(device.close)  # at once: a later slot's failure closes it
        devices.append((slot.name, device))
    transports: list[MmioTransport] = []

    def attach_devices(machine: Machine) -> None:
        wire_device_slots(machine)
        for index, (name, device) in enumerate(devices):
            transports.append(attach_device(machine, index, name, device))

    if snapshot is not None:
        machine = Machine.restore(
            kvm, snapshot, add_devices=attach_devices, track_dirty_pages=True, console=serial.write
        )
    else:
        machine = Machine.new(kvm, MachineConfig(spec.memory_mb * MIB, spec.cpu_count), console=serial.write)
    resources.callback(machine.close)
    if snapshot is None:
        attach_devices(machine)
        entry = load_linux(machine.memory, Path(spec.kernel), boot_cmdline(spec, transports))
        prepare_boot_vcpu(machine.memory, machine.vcpus[0].vcpu, entry, spec.cpu_count)
    for transport in transports:
        resources.callback(transport.close)
    serial.on_power_down = functools.partial(machine.request_stop, VcpuExit.POWEROFF)
    instance = KvmInstance(
        spec.sandbox_id,
        serial.console.path,
        "",
        machine,
        overlay,
        console=serial.console,
        restored=snapshot is not None,
        devices=[device for _name, device in devices],
        agent_token=spec.agent_token,
    )
    return Built(instance, [device for _name, device in devices], transports)


# Privileges.

_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
CAPABILITY_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def _prctl(option: int, arg: int, arg3: int = 0) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, arg3, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl({option}): {os.strerror(error)}")


def capabilities(status: str) -> dict[str, int]:
    """The capability sets of a /proc/<pid>/status text, by name."""
    sets = {}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in CAPABILITY_FIELDS:
            sets[name] = int(value.strip(), 16)
    return sets


def drop_privileges(uid: int) -> None:
    """Become `uid` (and gid) for good, with no capability in any set and no_new_privs (no
    execve can give any back). Only while the process has one thread: the bounding set and
    no_new_privs are per thread, and a thread made before would keep them."""
    threads = os.listdir("/proc/self/task")
    if len(threads) != 1:
        names = [thread.name for thread in threading.enumerate()]
        raise RuntimeError(f"dropping privileges with {len(threads)} threads ({names})")
    if uid <= 0:
        raise ValueError(f"a VMM never runs as uid {uid}")
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last_cap + 1):
        _prctl(_PR_CAPBSET_DROP, cap)
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # clears the permitted and effective sets
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    # The uid change made the process non-dumpable, which gives its /proc/self files to root:
    # the VMM reads its own pagemap (a pause's diff, memory figures). Dumpable again, with
    # no core file ever (guest memory must not land on disk): only its own uid, which no other
    # process has while the sandbox lives, may then trace it.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _prctl(_PR_SET_DUMPABLE, 1)
    left = {k: v for k, v in capabilities(Path("/proc/self/status").read_text()).items() if v}
    if left or os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or os.getgroups():
        raise RuntimeError(f"privileges left after the drop: {left}")


def sandbox_dir_path(sandbox_dir: str) -> Path:
    """The sandbox directory as the VMM reaches it once it is the sandbox uid: through a
    descriptor opened while root (/proc/self/fd/N), so that only the directory itself must
    be the uid's, not every directory above it (the state directory is root's)."""
    fd = os.open(sandbox_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return Path(f"/proc/self/fd/{fd}")


def receive_fds(handover_fd: int, count: int) -> list[int]:
    with socket.socket(fileno=handover_fd) as handover:
        _data, fds, _flags, _address = socket.recv_fds(handover, 16, count)
    if len(fds) != count:
        for fd in fds:
            os.close(fd)
        raise RuntimeError(f"the handover brought {len(fds)} file descriptors, not {count}")
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


# The process.


class Vmm(ControlServer):
    """The running machine behind the control socket."""

    def __init__(self, spec: VmmSpec, built: Built, serial: SerialConsole, exit_fd: int) -> None:
        super().__init__()
        self.spec = spec
        self.instance = built.instance
        self.built = built
        self.serial = serial
        self.console = serial.console
        self.exit_fd = exit_fd
        self.paused = False
        self.exit: GuestExit | None = None
        self.started = time.monotonic()
        self._pausing = trio.Lock()

    def state(self) -> GuestState:
        restored = self.instance.restored  # its snapshot was taken once the agent answered
        return GuestState(
            sandbox_id=self.spec.sandbox_id,
            first_output=restored or self.console.first_output.is_set(),
            agent_ready=restored or self.console.ready.is_set(),
            interpreter_ready=self.instance.fully_ready(),
            paused=self.paused,
            exit=self.exit,
        )

    def console_tail(self, max_bytes: int) -> str:
        return self.console.tail(max_bytes)

    async def pause_or_resume(self, pause: bool) -> Reply:
        async with self._pausing:
            if self.exit is not None or self.kill_requested.is_set():
                return Reply(ok=False, error="the guest has ended", state=self.state())
            if pause != self.paused:
                try:
                    await (self.instance.pause() if pause else self.instance.resume())
                except OSError as exc:  # its diff could not be written or read back: the host's disk
                    log.exception("%s failed", "pause" if pause else "resume")
                    return Reply(
                        ok=False, error=f"{'pause' if pause else 'resume'}: {exc!r}", state=self.state()
                    )
                self.paused = pause
                self._notify()
            return Reply(ok=True, state=self.state())

    async def snapshot(self) -> Reply:
        async with self._pausing:
            if self.exit is not None or self.paused:
                return Reply(ok=False, error="the guest is paused or has ended", state=self.state())
            directory = self.console.path.parent / SNAPSHOT_OUT
            await trio.to_thread.run_sync(shutil.rmtree, directory, True)
            try:
                await self.instance.snapshot(directory)
            except OSError as exc:
                log.exception("snapshot failed")
                return Reply(ok=False, error=f"snapshot: {exc!r}", state=self.state())
            return Reply(ok=True, state=self.state())

    async def attach_disk(self, slot: int) -> Reply:
        """Plug the image of volume slot `slot`, in the sandbox's directory, into that slot's
        empty virtio-blk device and tell the guest's driver (volumes.py)."""
        async with self._pausing:
            if self.exit is not None:
                return Reply(ok=False, error="the guest has ended", state=self.state())
            names = [device_slot.name for device_slot in DEVICE_SLOTS]
            try:
                disk = open_image(self.console.path.parent, slot)
            except (OSError, ValueError) as exc:
                return Reply(ok=False, error=f"attach_disk: {exc}", state=self.state())
            index = names.index(slot_name(slot))
            device, transport = self.built.devices[index], self.built.transports[index]
            assert isinstance(device, VirtioBlock)
            try:
                transport.change_config(functools.partial(device.plug, disk))
            except ValueError as exc:
                disk.close()
                return Reply(ok=False, error=f"attach_disk: {exc}", state=self.state())
            return Reply(ok=True, state=self.state())

    def metrics(self) -> dict[str, float]:
        footprint = self.instance.memory_footprint()
        return {
            "memory_bytes": float(self.instance.memory_usage_bytes()),
            "private_bytes": float(footprint.private_bytes),
            "shared_bytes": float(footprint.shared_bytes),
            "console_bytes": float(self.console.written),
            "uptime_s": time.monotonic() - self.started,
            "paused": float(self.paused),
        }

    async def run(self, listener: trio.socket.SocketType) -> None:
        stopped: list[str] = []
        exited = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.serve_control, listener)
            nursery.start_soon(self._kill_on_sigterm)
            async with trio.open_nursery() as machine:
                self._start_machine(machine, stopped, exited)
                # A cold boot's ready lines: what the service waits on to hand the guest out.
                machine.start_soon(self.announce_console, self.console, exited)
                await first_of(exited, self.kill_requested)
                machine.cancel_scope.cancel()  # joins the vCPU threads, stops the devices
            reason = stopped[0] if stopped else self.kill_reason
            self.exit = GuestExit(None, reason, self.console.tail())
            os.write(self.exit_fd, encode_exit(self.exit))
            self.ended.set()
            self._notify()
            await self.drain_connections()
            nursery.cancel_scope.cancel()

    def _start_machine(self, nursery: trio.Nursery, stopped: list[str], exited: trio.Event) -> None:
        machine = self.instance.machine
        for device in self.built.devices:
            nursery.start_soon(device.run_io)
        for transport in self.built.transports:
            nursery.start_soon(transport.serve_throttled)
            notify_fds = machine.notify_eventfds(transport.base + QUEUE_NOTIFY, len(transport.queues))
            nursery.start_soon(transport.serve_notifications, notify_fds)
        nursery.start_soon(self._run_guest, stopped, exited)

    async def _run_guest(self, stopped: list[str], exited: trio.Event) -> None:
        """Run the vCPUs until the guest stops by itself; record why."""
        try:
            outcome: VcpuExit | str = await self.instance.run_until_exit()
        except VcpuFault as exc:
            outcome = f"KVM could not run the guest: {exc}"
        self.serial.drain()  # the guest's last words (a panic message) into the log
        stopped.append(exit_reason(outcome, self.console.tail()))
        exited.set()

    async def _kill_on_sigterm(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                log.warning("SIGTERM: stopping the guest")
                self.kill_requested.set()


async def serve(spec: VmmSpec, kvm_fd: int, tap_fd: int) -> None:
    control_dir = Path(spec.control_dir)
    listener = open_listener(str(control_dir / CONTROL_SOCKET))
    exit_fd = os.open(
        control_dir / EXIT_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    sandbox_dir = sandbox_dir_path(spec.sandbox_dir)
    serial = SerialConsole(ConsoleLog(sandbox_dir / CONSOLE_LOG))
    with listener, contextlib.ExitStack() as resources:
        resources.callback(os.close, exit_fd)
        kvm = resources.enter_context(Kvm.from_fd(kvm_fd))
        resources.callback(os.close, tap_fd)
        built = build_machine(spec, kvm, tap_fd, serial, resources)
        me = write_supervisor_record(control_dir, spec.sandbox_id, spec.guest)
        log_fd = open_log(control_dir)
        drop_privileges(spec.uid)
        sys.stdout.write(json.dumps(me.to_json()) + "\n")
        sys.stdout.flush()
        log_from_now_on(log_fd)
        await Vmm(spec, built, serial, exit_fd).run(listener)
    with contextlib.suppress(OSError):  # the control directory is root's: the service removes it
        (control_dir / CONTROL_SOCKET).unlink()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = VmmSpec.decode(sys.stdin.buffer.read(MAX_SPEC_BYTES + 1))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    kvm_fd, tap_fd = receive_fds(spec.handover_fd, HANDED_FDS)
    join_cgroup(spec.supervisor_cgroup)  # before any thread: all of it is charged there
    trio.run(serve, spec, kvm_fd, tap_fd)


if __name__ == "__main__":
    main()
