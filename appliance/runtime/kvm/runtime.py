"""`KvmRuntime`: one microVM per sandbox, behind runtime.base's Runtime interface.

Each sandbox's machine runs in its own VMM process (vmm.py): the service opens /dev/kvm and
the sandbox's tap (in CubeVS's netns) and hands both over; the VMM builds the machine as
root and drops to the sandbox's uid before the guest runs. The VMM is the sandbox's
supervisor: its own session and cgroup leaf, its control socket in
`<run_dir>/vmms/<sandbox_id>/` (runtime/supervisor's protocol and client), so the guest
outlives the service. Per sandbox, `run()` owns (and tears down in reverse, however it
ends): the sandbox directory (the sandbox uid's), the network (netns, tap → virtio-net),
the VMM's cgroup leaf, the VMM and its control directory. The cubelet cancels `run()` to
kill the sandbox (the VMM is asked to stop and exits); after `KvmSandbox.detach()` the
cancel leaves all of it running for the next service, which finds it (`kept_guests`) and
takes it over (`adopt`).

Where the guest comes from:
- a template snapshot (template_snapshots.py), the normal case: the VMM restores the
  snapshot's state, the guest clock moves on, and the cubelet's /init hands over env, a
  fresh access token, time and an RNG seed;
- a cold boot of the microVM kernel, for the first sandbox of a template (or a
  template version, kernel or VMM) without a valid snapshot: once its agent's
  default kernel answers, the VMM snapshots it and the service publishes it into the
  store; other creates of the template wait for that snapshot and restore it;
- a cold boot without a snapshot: throwaway guests of template builds (Dockerfile
  RUN) and sandboxes carried over a restart on their kept disk (`spec.disk`).
A clone's pause writes only what it changed since the template (a diff) and gives
those pages back to the host; resume copies them back.

Runs only where a guest kernel can run at full speed: VMX/SVM, or PVM with a PVM
guest kernel configured (`detect_host` says which, and why not).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from appliance.config import Config
from appliance.net.netns import entered
from appliance.runtime.base import (
    ENVD_PORT,
    BootFailed,
    BootSpec,
    GuestExited,
    GuestFailure,
    HostBusy,
    Instance,
    KeptGuest,
    read_console_tail,
)
from appliance.runtime.detect import detect_host, find_guest_kernel
from appliance.runtime.kvm.base_images import BASE_IMAGES_DIR, remove_unused
from appliance.runtime.kvm.instance import PAUSED_SNAPSHOT_DIR, KvmInstance, snapshot_agent_token
from appliance.runtime.kvm.sandbox import GuestControlFailed, KvmSandbox
from appliance.runtime.kvm.snapshot import MEMORY_FILE
from appliance.runtime.kvm.template_snapshots import (
    OVERLAY_NAME,
    SNAPSHOT_STORE,
    SnapshotBuild,
    SnapshotKey,
    TemplateSnapshots,
    TemplateUnservable,
)
from appliance.runtime.kvm.vmm import (
    CONSOLE_LOG,
    DEVICE_SLOTS,
    KERNEL_CMDLINE,
    VMM_MODULE,
    SandboxDeviceParts,
    VmmSpec,
    attach_device,
    device_slot,
    exit_reason,
    guest_mac,
    wire_device_slots,
)
from appliance.runtime.readiness import ReadinessProbe
from appliance.runtime.supervisor.client import (
    GuestEvents,
    SupervisorClient,
    SupervisorGone,
    control_dirs,
    follow,
    log_tail,
    start,
    supervisors_dir,
    tear_down,
)
from appliance.runtime.supervisor.guest import first_of
from appliance.runtime.supervisor.kept import KEPT_FIELDS, find_kept, remove_orphan_directories
from appliance.runtime.uml.cgroups import (
    SUPERVISOR_SUFFIX,
    SandboxCgroup,
    create_supervisor_cgroup,
    open_cgroup,
)
from appliance.runtime.virtio.net.tap import open_tap, set_tap_mac

__all__ = [
    "DEVICE_SLOTS",
    "KERNEL_CMDLINE",
    "OVERLAY_NAME",
    "PAUSED_SNAPSHOT_DIR",
    "KvmInstance",
    "KvmRuntime",
    "KvmSandbox",
    "SandboxDeviceParts",
    "TemplateUnservable",
    "attach_device",
    "device_slot",
    "exit_reason",
    "guest_mac",
    "wire_device_slots",
]

if TYPE_CHECKING:
    from appliance.net.service import SandboxNetwork
    from appliance.records import TemplateManifest

log = logging.getLogger(__name__)

VMMS_DIR = "vmms"  # in run_dir: the VMM processes' control directories
# The host side of every sandbox's tap: a guest restored from a template snapshot has
# the template guest's ARP entry for its gateway, which must still be right in its own netns.
GATEWAY_MAC = bytes.fromhex("06cbe0000001")
PROBE_INTERVAL_S = 0.05
# Host memory kept free beside a new guest's RAM (the service, page cache the clones share).
HOST_RESERVE_MB = 256
# A VMM is up (its machine built, root dropped) in well under a second; a cold boot's kernel
# load or a restore's memory mapping on a host too busy for the boot limits takes longer.
VMM_START_TIMEOUT_S = 60.0
# A VMM asked to stop answers once its vCPUs are joined; past this it is SIGKILLed.
VMM_KILL_TIMEOUT_S = 30.0
# What a VMM's record says of its guest (SupervisorRecord.guest): KeptGuest's fields.
_KEPT_FIELDS = {**KEPT_FIELDS, "shared_key": str}


def host_memory_available_mb(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemAvailable: what the host can give without swapping or reclaiming what it needs."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


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


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _prepare_sandbox_dir(sandbox_dir: Path, disk: Path | None, uid: int) -> None:
    """The sandbox directory, the sandbox uid's (its VMM writes the console log, the pause's
    diff and its snapshots there)."""
    shutil.rmtree(sandbox_dir, ignore_errors=True)  # a crashed service's leftovers
    sandbox_dir.mkdir(parents=True, mode=0o700)
    os.chown(sandbox_dir, uid, uid)
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


@dataclass(eq=False)
class _Sandbox:
    """What the service holds of one sandbox's VMM, for its teardown."""

    sandbox_id: str
    sandbox_dir: Path
    control_dir: Path
    cgroup: SandboxCgroup | None = None
    vmm: SupervisorClient | None = None
    instance: KvmSandbox | None = None
    torn_down: bool = False
    agent_token: str = field(default="", repr=False)
    shared_key: str = ""

    @property
    def detached(self) -> bool:
        return self.instance is not None and self.instance.detached


class KvmRuntime:
    name = "kvm"
    snapshots_templates = True  # into the snapshot store, at a published template's first boot

    def __init__(self, config: Config, cubevs: Any) -> None:
        self.config = config
        self.cubevs = cubevs
        self.snapshots = TemplateSnapshots(config.state_dir / SNAPSHOT_STORE)
        if removed := self.snapshots.prune(config.templates_dir):
            log.info("kvm: removed the snapshots of templates that are gone: %s", ", ".join(removed))
        if (config.state_dir / BASE_IMAGES_DIR).is_dir():
            remove_unused(config.state_dir / BASE_IMAGES_DIR)  # of snapshots deleted meanwhile
        self._vmms = supervisors_dir(config.run_dir, VMMS_DIR)
        self._kept: dict[str, SupervisorClient] = {}  # found at start, until adopted
        # Sandboxes another runtime of this service keeps (the uml fallback's): not swept here.
        self.also_kept: set[str] = set()

    def close(self) -> None:
        """Let go of the kept VMMs not adopted (nothing else is kept between sandboxes)."""
        for vmm in self._kept.values():
            vmm.close()
        self._kept.clear()

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

    def forget_template(self, template_id: str) -> None:
        """The deleted template's snapshots go now (not at the next start's prune): a snapshot
        of a sandbox (a full snapshot, a fork's checkpoint) holds that sandbox's memory."""
        if removed := self.snapshots.forget(template_id):
            log.info("kvm: removed the snapshots of deleted template %s: %s", template_id, ", ".join(removed))

    # A new guest.

    async def run(
        self, spec: BootSpec, *, task_status: trio.TaskStatus[Instance] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        kernel = self.guest_kernel(spec.sandbox_id)
        self.check_memory(spec)
        source = await self._source(spec, kernel)
        handover = Handover(task_status)
        sandbox = _Sandbox(spec.sandbox_id, spec.sandbox_dir, self._vmms / spec.sandbox_id)
        try:
            uid = self.config.uid_base + spec.slot
            await trio.to_thread.run_sync(_prepare_sandbox_dir, spec.sandbox_dir, spec.disk, uid)
            await self._run_sandbox(spec, kernel, source, handover, sandbox)
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
            if not sandbox.detached:
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
        self, spec: BootSpec, kernel: Path, source: GuestSource, handover: Handover, sandbox: _Sandbox
    ) -> None:
        policy = spec.network_policy
        async with self.cubevs.sandbox_network(spec.sandbox_id, spec.slot, os.geteuid(), policy) as net:
            try:
                sandbox.cgroup = await trio.to_thread.run_sync(create_supervisor_cgroup, spec.sandbox_id)
                if source.snapshot is not None:
                    # A clone's agent holds the boot token of the guest its template was snapshotted from.
                    sandbox.agent_token = snapshot_agent_token(source.snapshot)
                    sandbox.shared_key = str(source.snapshot / MEMORY_FILE)
                else:
                    sandbox.agent_token = spec.agent_token
                sandbox.vmm = await self._launch(spec, kernel, source, net, sandbox)
                await self.cubevs.set_owner(spec.sandbox_id, sandbox.vmm.record.identity)
                await self._own(spec, sandbox, net, handover, source)
            finally:
                await self._tear_down(sandbox)

    async def _launch(
        self, spec: BootSpec, kernel: Path, source: GuestSource, net: SandboxNetwork, sandbox: _Sandbox
    ) -> SupervisorClient:
        """The sandbox's VMM, started with /dev/kvm and its tap handed over."""
        assert sandbox.cgroup is not None
        egress = getattr(self.cubevs, "egress_tls", None)  # the egress proxy's CA, where there is one
        vmm_spec = VmmSpec(
            sandbox_id=spec.sandbox_id,
            control_dir=str(sandbox.control_dir),
            sandbox_dir=str(spec.sandbox_dir),
            uid=self.config.uid_base + spec.slot,
            memory_mb=spec.memory_mb,
            cpu_count=spec.cpu_count,
            disk_id=spec.template.template_id,
            rootfs=str(spec.template.rootfs),
            mac=guest_mac(spec.slot).hex(),
            handover_fd=-1,
            supervisor_cgroup=[str(p) for p in sandbox.cgroup.procs_files()],
            snapshot=str(source.snapshot or ""),
            kernel=str(kernel),
            resolver_ip=net.resolver_ip,
            egress_ca_argument=egress.kernel_word() if egress is not None else "",
            agent_token=spec.agent_token,
            guest={
                "slot": spec.slot,
                "template_id": spec.template.template_id,
                "memory_mb": spec.memory_mb,
                "cpu_count": spec.cpu_count,
                "shared_key": sandbox.shared_key,
            },
        )
        tap_fd = await trio.to_thread.run_sync(open_sandbox_tap, net.netns_path, net.tap)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            kvm_fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
            try:
                socket.send_fds(ours, [b"fds"], [kvm_fd, tap_fd])
            finally:
                os.close(kvm_fd)
            data = dataclasses.replace(vmm_spec, handover_fd=theirs.fileno()).encode()
            return await start(sandbox.control_dir, VMM_MODULE, data, theirs.fileno(), VMM_START_TIMEOUT_S)
        except SupervisorGone as exc:
            raise BootFailed(spec.sandbox_id, str(exc), log_tail(sandbox.control_dir)) from exc
        finally:
            ours.close()
            theirs.close()
            os.close(tap_fd)

    # Either way: the guest's life, then its end.

    async def _own(
        self,
        spec: BootSpec,
        sandbox: _Sandbox,
        net: SandboxNetwork,
        handover: Handover | trio.TaskStatus[Instance],
        source: GuestSource | None,
    ) -> NoReturn:
        """Follow the guest through its VMM: its boot (None: it was adopted and runs already), the
        template snapshot a first boot takes, the hand-over, its end."""
        vmm = sandbox.vmm
        assert vmm is not None
        console_log = spec.sandbox_dir / CONSOLE_LOG
        events = GuestEvents()
        failure: GuestFailure | None = None
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(follow, vmm, events, lambda: read_console_tail(console_log))
                instance = KvmSandbox(
                    spec.sandbox_id,
                    console_log,
                    sandbox.agent_token,
                    net.host_ip,
                    spec.sandbox_dir,
                    vmm,
                    events,
                    shared_key=sandbox.shared_key,
                    uid=self.config.uid_base + spec.slot,
                )
                if source is not None:
                    failure = await self._wait_ready(spec, net.host_ip, events)
                    if failure is None and source.build is not None:
                        failure = await self._snapshot_template(spec, instance, source.build, events)
                elif events.exit is not None:
                    failure = BootFailed(spec.sandbox_id, f"its guest has ended: {events.exit.reason}")
                if failure is None:
                    sandbox.instance = instance
                    nursery.start_soon(instance.follow_metrics)
                    handover.started(instance)
                    await events.exited.wait()
                    assert events.exit is not None
                    failure = GuestExited(spec.sandbox_id, events.exit.reason, events.exit.console_tail)
            finally:
                nursery.cancel_scope.cancel()
        raise failure

    def _boot_timeout(self) -> float:
        return float(self.config.kvm_boot_timeout_s)

    async def _wait_ready(self, spec: BootSpec, host_ip: str, events: GuestEvents) -> GuestFailure | None:
        """Until the guest agent accepts connections on the template's probe port (a cold
        boot prints its ready line first); BootFailed with the console tail otherwise."""
        port = spec.template.probe_port or ENVD_PORT
        timeout = self._boot_timeout()
        probe = ReadinessProbe((host_ip, port), None, attempt_timeout_s=timeout)
        ready = False
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:  # cancelled if the guest ends meanwhile
                nursery.start_soon(_cancel_when, events.exited, nursery.cancel_scope)
                await events.ready.wait()
                ready = await probe.wait(PROBE_INTERVAL_S, gave_up=events.exited.is_set)
                nursery.cancel_scope.cancel()
        if ready:
            return None
        why = (
            f"guest stopped: {events.exit.reason}"
            if events.exit is not None
            else f"no answer on port {port} in {timeout:.0f} s ({probe.last_error})"
        )
        tail = events.exit.console_tail if events.exit else read_console_tail(spec.sandbox_dir / CONSOLE_LOG)
        return BootFailed(spec.sandbox_id, why, tail)

    async def _snapshot_template(
        self, spec: BootSpec, instance: KvmSandbox, build: SnapshotBuild, events: GuestEvents
    ) -> GuestFailure | None:
        """Once the default kernel answers, save the guest as the template's snapshot."""
        timeout = self._boot_timeout()
        with trio.move_on_after(timeout):
            await first_of(events.interpreter_ready, events.exited)
        if not events.interpreter_ready.is_set() or events.exit is not None:
            why = (
                f"guest stopped: {events.exit.reason}"
                if events.exit is not None
                else f"its default kernel was not up in {timeout:.0f} s"
            )
            return BootFailed(spec.sandbox_id, why, read_console_tail(spec.sandbox_dir / CONSOLE_LOG))
        try:
            await instance.snapshot(build.staging)
        except (GuestControlFailed, OSError) as exc:
            return BootFailed(spec.sandbox_id, f"its snapshot failed: {exc}")
        directory = await trio.to_thread.run_sync(self.snapshots.publish, build)
        log.info("kvm: template %s snapshotted into %s", spec.template.template_id, directory)
        return None

    async def _tear_down(self, sandbox: _Sandbox) -> None:
        """Unless the sandbox is detached: stop its VMM (its machine goes with it), then remove its
        cgroup leaf and control directory. Its network is the `sandbox_network` context's."""
        if sandbox.torn_down:
            return
        sandbox.torn_down = True
        if sandbox.detached:
            self.cubevs.detach(sandbox.sandbox_id)
            if sandbox.vmm is not None:
                sandbox.vmm.close()
            return
        await tear_down(sandbox.vmm, (sandbox.cgroup,), sandbox.control_dir, VMM_KILL_TIMEOUT_S, "its VMM")

    # A guest a previous service left running.

    async def kept_guests(self) -> tuple[list[KeptGuest], dict[str, str]]:
        """The guests whose VMMs run on (each attached: to be `adopt`ed), and why each other
        sandbox a previous service had is gone; everything of those is removed here: leaves,
        directories, kept networks (but those of `also_kept`). Call once, before any boot."""
        dirs = control_dirs(self.config.run_dir, VMMS_DIR)
        found = await find_kept(dirs, _KEPT_FIELDS, self._remove_leftovers)
        self._kept.update(found.supervisors)
        keep = set(self._kept) | self.also_kept
        await trio.to_thread.run_sync(remove_orphan_directories, self.config.sandboxes_dir, keep, "kvm")
        released = await self.cubevs.release_kept(keep)
        if released:
            log.info("kvm runtime: removed the networks of %d guests that are gone", len(released))
        return found.guests, found.gone

    def kept_ids(self) -> set[str]:
        return set(self._kept)

    def _remove_leftovers(self, sandbox_id: str) -> None:
        """Everything of a sandbox whose VMM is gone but its network (released with the others)."""
        open_cgroup(sandbox_id + SUPERVISOR_SUFFIX).remove()
        shutil.rmtree(self._vmms / sandbox_id, ignore_errors=True)
        shutil.rmtree(self.config.sandboxes_dir / sandbox_id, ignore_errors=True)

    async def adopt(
        self,
        sandbox_id: str,
        spec: BootSpec,
        *,
        task_status: trio.TaskStatus[Instance] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        vmm = self._kept.pop(sandbox_id)
        sandbox = _Sandbox(sandbox_id, spec.sandbox_dir, vmm.control_dir, vmm=vmm)
        sandbox.cgroup = open_cgroup(sandbox_id + SUPERVISOR_SUFFIX)
        sandbox.shared_key = str(vmm.record.guest.get("shared_key", ""))
        try:
            async with contextlib.AsyncExitStack() as stack:
                network = self.cubevs.sandbox_network(
                    sandbox_id, spec.slot, os.geteuid(), spec.network_policy, adopt=True
                )
                try:
                    net = await stack.enter_async_context(network)
                except KeyError as exc:
                    raise BootFailed(sandbox_id, f"its network did not survive: {exc}") from exc
                try:
                    await self._own(spec, sandbox, net, task_status, None)
                finally:
                    await self._tear_down(sandbox)
        finally:
            await self._tear_down(sandbox)  # when its network could not be taken over
            if not sandbox.detached:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(shutil.rmtree, spec.sandbox_dir, True)
