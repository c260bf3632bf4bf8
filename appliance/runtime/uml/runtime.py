"""The `uml` runtime: one sandbox = one confined user-mode Linux kernel process, owned by its
own supervisor process (runtime/supervisor), so that it can outlive the service.

`run()` owns everything of one sandbox on the service's side, set up in this order and
torn down in reverse however the task ends (ready and cancelled, boot failure, guest
exit): network (CubeVS: netns, tap owned by the sandbox uid) → sandbox directory
(console log; `vm/` with the COW disk and uml_dir, owned by the sandbox uid) → cgroup
leaves (the guest's, the supervisor's) → the supervisor, which spawns the launcher chain
(command.py), pumps the console and serves the balloon. The instance is handed over at
the agent's first ready line (`CUBE-AGENT-READY`, then envd's /health);
`UmlInstance.wait_fully_ready` waits for the second (`CUBE-INTERPRETER-READY`: the
default Python kernel answers). Cancel = kill: the supervisor kills and reaps the guest
and exits, then the leaves (whatever is left in them gets SIGKILL), the directory and
the network go. A graceful halt would buy nothing, the COW disk is deleted with the
sandbox.

Across a restart: a cancel after `UmlInstance.detach()` leaves the guest, its supervisor,
network, cgroups and files as they are. The next service finds the supervisors
(`kept_guests`: by their records, verified by pidfd and start time), cleans up after those
that are gone, and takes each guest over with `adopt()`: the same task as `run()` from the
moment the guest was handed over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import trio

from appliance.config import Config
from appliance.net.addressing import Addressing
from appliance.runtime.base import (
    ENVD_PORT,
    BootFailed,
    BootSpec,
    BootStalled,
    GuestExited,
    GuestFailure,
    Instance,
    KeptGuest,
    read_console_tail,
)
from appliance.runtime.detect import find_uml_kernel
from appliance.runtime.readiness import ReadinessProbe
from appliance.runtime.supervisor.client import (
    GuestEvents,
    SupervisorClient,
    SupervisorGone,
    Zygote,
    control_dirs,
    follow,
    launch,
    log_tail,
    supervisors_dir,
    tear_down,
)
from appliance.runtime.supervisor.guest import first_of
from appliance.runtime.supervisor.kept import KEPT_FIELDS, find_kept, remove_orphan_directories
from appliance.runtime.supervisor.protocol import LaunchSpec
from appliance.runtime.uml.balloon import kernel_argument, kernel_has_balloon
from appliance.runtime.uml.cgroups import (
    SUPERVISOR_SUFFIX,
    SandboxCgroup,
    create_cgroup,
    create_supervisor_cgroup,
    io_limits_for,
    open_cgroup,
    sweep_empty_leaves,
)
from appliance.runtime.uml.command import (
    UML_DIR,
    LaunchPlan,
    check_paths,
    launcher_argv,
    launcher_environment,
    mconsole_socket,
)
from appliance.runtime.uml.console import LOG_LIMIT_BYTES
from appliance.runtime.uml.instance import UmlInstance
from appliance.runtime.uml.kernel import refuse_unsafe_kernel
from appliance.runtime.uml.mconsole import Mconsole
from appliance.runtime.uml.seccomp import compile_filter, filter_fd
from appliance.runtime.uml.uids import SUBID_FILES, check_uid_range

if TYPE_CHECKING:
    from appliance.net.service import CubeVS, SandboxNetwork
    from appliance.records import TemplateManifest

log = logging.getLogger(__name__)

# The boot limits are config keys: uml_boot_timeout_s (launch to agent ready) and
# uml_first_output_timeout_s (the guest wrote nothing at all: BootStalled, a hung launch that
# the cubelet retries; the kernel boots `quiet`, so its first line is usually the agent's).
# A background boot (pool refill) runs at the least CPU weight: it gets this many times each.
BACKGROUND_TIMEOUT_FACTOR = 3
# Host memory a sandbox may use beyond its guest RAM: the UML binary, page
# tables and kernel stacks of the host processes backing guest address spaces.
HOST_OVERHEAD_MB = 128
PROBE_INTERVAL_S = 0.01
# One readiness probe waits this share of config.guest_agent_timeout_s (1 s at the default 10 s):
# short enough that a probe lost before the guest's network was up is retried soon; a host that
# raises the key for slow guests (software emulation: answers in 4-40 s) raises this with it.
PROBE_TIMEOUT_SHARE = 0.1
# A supervisor asked to kill its guest answers once all of it is reaped (bounded there by
# guest.REAP_TIMEOUT_S twice); past this, it is SIGKILLed (its guest dies with it).
SUPERVISOR_KILL_TIMEOUT_S = 30.0
# A supervisor is up (its guest's launcher spawned) in a fraction of a second; this bounds one
# that hangs on its way there on a host too busy for the boot limits to mean much anyway.
SUPERVISOR_START_TIMEOUT_S = 60.0
CONSOLE_LOG = "console.log"
VM_DIR = "vm"
COW_FILE = "disk.cow"  # in VM_DIR: LaunchPlan.cow_file
STAGE_DIR = "stage"
REPLY_DIR = "reply"  # LaunchPlan.reply_dir
# What a supervisor's record says of its guest (SupervisorRecord.guest): KeptGuest's fields.


@dataclass(eq=False)
class _Guest:
    """What the service holds of one sandbox's guest, for its teardown."""

    sandbox_id: str
    sandbox_dir: Path
    control_dir: Path
    uid: int
    agent_token: str = field(default="", repr=False)  # a boot's; an adopted guest was claimed long ago
    cgroup: SandboxCgroup | None = None
    supervisor_cgroup: SandboxCgroup | None = None
    supervisor: SupervisorClient | None = None
    instance: UmlInstance | None = None
    torn_down: bool = False

    @property
    def detached(self) -> bool:
        return self.instance is not None and self.instance.detached


@dataclass(frozen=True)
class _BootLimits:
    started: float  # trio clock at launch
    stall_timeout: float
    boot_timeout: float
    background: bool


class UmlRuntime:
    name = "uml"
    snapshots_templates = False  # a template's fast start is the cubelet's warm pool

    def __init__(self, config: Config, cubevs: CubeVS, *, subid_files: Sequence[Path] = SUBID_FILES) -> None:
        kernel = find_uml_kernel(config)
        if kernel is None:
            raise RuntimeError("no UML kernel: run `cube image build-uml-kernel`")
        refuse_unsafe_kernel(kernel)  # e.g. Debian's linux.uml: hostfs built in
        check_uid_range(config.uid_base, Addressing(config.host_network).max_slots, subid_files)
        self.config = config
        self.kernel = kernel
        self.balloon = kernel_has_balloon(kernel)
        disk = next(p for p in (config.sandboxes_dir, *config.sandboxes_dir.parents) if p.exists())
        self.io_limits = io_limits_for(disk, config.uml_io_bps_max, config.uml_io_iops_max)
        if self.io_limits.device is None:
            log.warning("uml runtime: sandboxes get no IO limit: %s", self.io_limits.unavailable)
        self._cubevs = cubevs
        self._seccomp = compile_filter()
        self._supervisors = supervisors_dir(config.run_dir)
        self._kept: dict[str, SupervisorClient] = {}  # found at start, until adopted
        self._zygote: Zygote | None = None  # started at the first boot
        # Sandboxes another runtime of this service keeps (the kvm runtime's): not swept here.
        self.also_kept: set[str] = set()
        # A sandbox this service had still has its directory (removed at a clean teardown).
        if swept := sweep_empty_leaves(lambda sandbox_id: (config.sandboxes_dir / sandbox_id).is_dir()):
            log.info("uml runtime: removed %d stale cgroup leaves: %s", len(swept), ", ".join(swept))

    async def finalize_template(self, template: TemplateManifest, instance: Instance) -> None:
        """Nothing to keep of the build's guest: the warm pool boots fresh ones."""

    def forget_template(self, template_id: str) -> None:
        """Nothing: uml keeps nothing per template (its warm pool is the cubelet's)."""

    def close(self) -> None:
        """Nothing is kept between sandboxes (their supervisors keep the guests that run on)."""
        for supervisor in self._kept.values():
            supervisor.close()
        self._kept.clear()
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None

    def _supervisor_zygote(self) -> Zygote | None:
        """What supervisors are forked from: started at the first boot, and again once it is gone
        (None if it cannot be: they are exec'd then)."""
        if self._zygote is not None and not self._zygote.running:
            self._zygote.close()
            self._zygote = None
        if self._zygote is None:
            try:
                self._zygote = Zygote.start()
            except OSError as exc:
                log.warning("uml runtime: no supervisor zygote, supervisors are exec'd: %s", exc)
        return self._zygote

    # A new guest.

    async def run(
        self, spec: BootSpec, *, task_status: trio.TaskStatus[Instance] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        uid = self.config.uid_base + spec.slot
        guest = _Guest(
            spec.sandbox_id, spec.sandbox_dir, self._supervisors / spec.sandbox_id, uid, spec.agent_token
        )
        try:
            async with self._cubevs.sandbox_network(
                spec.sandbox_id, spec.slot, uid, spec.network_policy
            ) as net:
                try:
                    await trio.to_thread.run_sync(_prepare_sandbox_dir, spec.sandbox_dir, uid)
                    if spec.disk is not None:
                        await trio.to_thread.run_sync(_adopt_disk, spec.disk, spec.sandbox_dir, uid)
                    limit = (spec.memory_mb + HOST_OVERHEAD_MB) << 20
                    guest.cgroup = await trio.to_thread.run_sync(
                        create_cgroup, spec.sandbox_id, limit, spec.cpu_count, spec.background, self.io_limits
                    )
                    guest.supervisor_cgroup = await trio.to_thread.run_sync(
                        create_supervisor_cgroup, spec.sandbox_id
                    )
                    factor = BACKGROUND_TIMEOUT_FACTOR if spec.background else 1
                    boot_timeout = self.config.uml_boot_timeout_s * factor
                    limits = _BootLimits(
                        started=trio.current_time(),
                        stall_timeout=min(self.config.uml_first_output_timeout_s * factor, boot_timeout),
                        boot_timeout=boot_timeout,
                        background=spec.background,
                    )
                    guest.supervisor = await self._launch(spec, net, guest)
                    await self._cubevs.set_owner(spec.sandbox_id, guest.supervisor.record.identity)
                    await self._own(guest, net, task_status, limits)
                finally:
                    await self._tear_down(guest)
        finally:
            if not guest.detached:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(shutil.rmtree, spec.sandbox_dir, True)

    async def _launch(self, spec: BootSpec, net: SandboxNetwork, guest: _Guest) -> SupervisorClient:
        assert guest.cgroup is not None and guest.supervisor_cgroup is not None
        vm_dir = spec.sandbox_dir / VM_DIR
        seccomp_fd = filter_fd(self._seccomp)
        try:
            plan = LaunchPlan(
                kernel=self.kernel,
                base_image=spec.template.rootfs,
                vm_dir=vm_dir,
                stage_dir=spec.sandbox_dir / STAGE_DIR,
                reply_dir=spec.sandbox_dir / REPLY_DIR,
                memory_mb=spec.memory_mb,
                uid=guest.uid,
                netns_path=net.netns_path,
                tap=net.tap,
                cgroup_procs=tuple(guest.cgroup.procs_files()),
                seccomp_fd=seccomp_fd,
                resolver_ip=net.resolver_ip,
                balloon_argument=kernel_argument(vm_dir) if self.balloon else None,
                agent_token=spec.agent_token,
                egress_ca_argument=self._cubevs.egress_tls.kernel_word(),
            )
            try:
                check_paths(plan)
            except ValueError as exc:
                raise BootFailed(spec.sandbox_id, str(exc)) from exc
            launch_spec = LaunchSpec(
                sandbox_id=spec.sandbox_id,
                control_dir=str(guest.control_dir),
                argv=launcher_argv(plan),
                env=launcher_environment(),
                seccomp_fd=seccomp_fd,
                console_log=str(spec.sandbox_dir / CONSOLE_LOG),
                console_limit=LOG_LIMIT_BYTES,
                uid=guest.uid,
                vm_dir=str(vm_dir),
                mconsole_socket=str(plan.mconsole_socket),
                reply_dir=str(plan.reply_dir),
                balloon=self.balloon,
                cgroup_version=guest.cgroup.version,
                guest_cgroup={k: str(v) for k, v in guest.cgroup.leaves.items()},
                supervisor_cgroup=[str(p) for p in guest.supervisor_cgroup.procs_files()],
                guest={
                    "slot": spec.slot,
                    "template_id": spec.template.template_id,
                    "memory_mb": spec.memory_mb,
                    "cpu_count": spec.cpu_count,
                },
            )
            try:
                return await launch(launch_spec, SUPERVISOR_START_TIMEOUT_S, self._supervisor_zygote())
            except SupervisorGone as exc:
                raise BootFailed(spec.sandbox_id, str(exc), log_tail(guest.control_dir)) from exc
        finally:
            os.close(seccomp_fd)

    # A guest a previous service left running.

    async def kept_guests(self) -> tuple[list[KeptGuest], dict[str, str]]:
        """The guests whose supervisors run on (each attached: to be `adopt`ed), and why each other
        sandbox a previous service had is gone; everything of those is removed here: leaves,
        directories, kept networks. Call once, before any boot."""
        found = await find_kept(control_dirs(self.config.run_dir), KEPT_FIELDS, self._remove_leftovers)
        self._kept.update(found.supervisors)
        keep = set(self._kept) | self.also_kept
        await trio.to_thread.run_sync(remove_orphan_directories, self.config.sandboxes_dir, keep, "uml")
        released = await self._cubevs.release_kept(keep)
        if released:
            log.info("uml runtime: removed the networks of %d guests that are gone", len(released))
        return found.guests, found.gone

    def _remove_leftovers(self, sandbox_id: str) -> None:
        """Everything of a sandbox whose supervisor is gone but its network (CubeVS swept it)."""
        for name in (sandbox_id, sandbox_id + SUPERVISOR_SUFFIX):
            open_cgroup(name).remove()
        shutil.rmtree(self._supervisors / sandbox_id, ignore_errors=True)
        shutil.rmtree(self.config.sandboxes_dir / sandbox_id, ignore_errors=True)

    async def adopt(
        self,
        sandbox_id: str,
        spec: BootSpec,
        *,
        task_status: trio.TaskStatus[Instance] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        supervisor = self._kept.pop(sandbox_id)
        uid = self.config.uid_base + spec.slot
        guest = _Guest(sandbox_id, spec.sandbox_dir, supervisor.control_dir, uid, supervisor=supervisor)
        guest.cgroup = open_cgroup(sandbox_id)
        guest.supervisor_cgroup = open_cgroup(sandbox_id + SUPERVISOR_SUFFIX)
        try:
            async with contextlib.AsyncExitStack() as stack:
                network = self._cubevs.sandbox_network(
                    sandbox_id, spec.slot, uid, spec.network_policy, adopt=True
                )
                try:
                    net = await stack.enter_async_context(network)
                except KeyError as exc:
                    raise BootFailed(sandbox_id, f"its network did not survive: {exc}") from exc
                try:
                    await self._own(guest, net, task_status, None)
                finally:
                    await self._tear_down(guest)
        finally:
            await self._tear_down(guest)  # when its network could not be taken over
            if not guest.detached:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(shutil.rmtree, spec.sandbox_dir, True)

    # Either way: the guest's life, then its end.

    async def _own(
        self,
        guest: _Guest,
        net: SandboxNetwork,
        task_status: trio.TaskStatus[Instance],
        boot: _BootLimits | None,
    ) -> NoReturn:
        """Follow the guest through its supervisor: its boot (with `boot`'s limits; None: it was
        adopted and runs already), the hand-over, its end."""
        supervisor = guest.supervisor
        assert supervisor is not None and guest.cgroup is not None
        console_log = guest.sandbox_dir / CONSOLE_LOG
        events = GuestEvents()
        # Failures are raised after the nursery, so callers get them bare, not in a group.
        failure: GuestFailure | None
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(follow, supervisor, events, lambda: read_console_tail(console_log))
                if boot is not None:
                    failure = await self._boot(guest.sandbox_id, events, net, boot, console_log)
                elif events.exit is not None:
                    failure = BootFailed(guest.sandbox_id, f"its guest has ended: {events.exit.reason}")
                else:
                    failure = None
                if failure is None:
                    started = boot.started if boot is not None else trio.current_time()
                    guest.instance = self._instance(guest, net, events, started)
                    task_status.started(guest.instance)
                    if boot is not None and boot.background:
                        nursery.start_soon(_normal_weight_when_fully_ready, events, guest.cgroup)
                    await events.exited.wait()
                    assert events.exit is not None
                    failure = GuestExited(guest.sandbox_id, events.exit.reason, events.exit.console_tail)
            finally:
                nursery.cancel_scope.cancel()
        raise failure

    @staticmethod
    def _instance(guest: _Guest, net: SandboxNetwork, events: GuestEvents, started: float) -> UmlInstance:
        assert guest.supervisor is not None and guest.cgroup is not None
        vm_dir = guest.sandbox_dir / VM_DIR
        return UmlInstance(
            sandbox_id=guest.sandbox_id,
            console_log=guest.sandbox_dir / CONSOLE_LOG,
            agent_token=guest.agent_token,
            host_ip=net.host_ip,
            supervisor=guest.supervisor,
            events=events,
            cgroup=guest.cgroup,
            mconsole=Mconsole(mconsole_socket(vm_dir), vm_dir, guest.sandbox_dir / REPLY_DIR, guest.uid),
            boot_seconds=trio.current_time() - started,
            started_at=started,
        )

    async def _boot(
        self,
        sandbox_id: str,
        events: GuestEvents,
        net: SandboxNetwork,
        limits: _BootLimits,
        console_log: Path,
    ) -> GuestFailure | None:
        """Until the guest's agent answers; what went wrong, if it did not."""
        with trio.move_on_at(limits.started + limits.stall_timeout) as stall_deadline:
            await first_of(events.first_output, events.exited)
        with trio.move_on_at(limits.started + limits.boot_timeout) as boot_deadline:
            if stall_deadline.cancelled_caught:
                boot_deadline.cancel()
            await first_of(events.ready, events.exited)
            if not events.exited.is_set():
                probe_timeout = self.config.guest_agent_timeout_s * PROBE_TIMEOUT_SHARE
                probe = ReadinessProbe((net.host_ip, ENVD_PORT), "/health", probe_timeout)
                await probe.wait(PROBE_INTERVAL_S, gave_up=events.exited.is_set)
        if events.exit is not None:
            return BootFailed(
                sandbox_id,
                f"the UML kernel exited before the agent was ready ({events.exit.reason})",
                events.exit.console_tail,
            )
        if stall_deadline.cancelled_caught:
            return BootStalled(
                sandbox_id, f"the UML kernel wrote nothing within {limits.stall_timeout:.0f} s"
            )
        if boot_deadline.cancelled_caught:
            tail = read_console_tail(console_log)
            return BootFailed(sandbox_id, f"the agent was not ready within {limits.boot_timeout:.0f} s", tail)
        return None

    async def _tear_down(self, guest: _Guest) -> None:
        """Unless the guest is detached: end its supervisor (which kills and reaps the guest),
        then remove its cgroup leaves (killing anything left) and its control directory."""
        if guest.torn_down:
            return
        guest.torn_down = True
        if guest.detached:
            self._cubevs.detach(guest.sandbox_id)
            if guest.supervisor is not None:
                guest.supervisor.close()
            return
        cgroups = (guest.cgroup, guest.supervisor_cgroup)
        await tear_down(guest.supervisor, cgroups, guest.control_dir, SUPERVISOR_KILL_TIMEOUT_S)


def _adopt_disk(disk: Path, sandbox_dir: Path, uid: int) -> None:
    """Continue from a kept COW disk (over the same template image): moved in, owned by this uid."""
    cow = sandbox_dir / VM_DIR / COW_FILE
    os.rename(disk, cow)
    os.chown(cow, uid, uid)


def _prepare_sandbox_dir(sandbox_dir: Path, uid: int) -> None:
    """The sandbox directory: root's (console log, `reply/`), with `vm/` for the guest's uid."""
    shutil.rmtree(sandbox_dir, ignore_errors=True)  # a crashed service's leftovers
    sandbox_dir.mkdir(parents=True, mode=0o700)
    (sandbox_dir / STAGE_DIR).mkdir(mode=0o700)
    (sandbox_dir / REPLY_DIR).mkdir()
    os.chmod(sandbox_dir / REPLY_DIR, 0o711)  # the guest reaches a socket there, never lists or adds
    vm_dir = sandbox_dir / VM_DIR
    (vm_dir / UML_DIR).mkdir(parents=True, mode=0o700)
    for directory in (vm_dir, vm_dir / UML_DIR):
        os.chown(directory, uid, uid)


async def _normal_weight_when_fully_ready(events: GuestEvents, cgroup: SandboxCgroup) -> None:
    """A background boot is done once its default kernel answers: from then on it is an
    ordinary guest, about to be claimed."""
    await events.interpreter_ready.wait()
    cgroup.set_low_cpu_weight(False)
