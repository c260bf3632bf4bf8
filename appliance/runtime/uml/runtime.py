"""The `uml` runtime: one sandbox = one confined user-mode Linux kernel process.

`run()` owns everything of one sandbox, set up in this order and torn down in
reverse however the task ends (ready and cancelled, boot failure, guest exit):
network (CubeVS: netns, tap owned by the sandbox uid) → sandbox directory
(console log; `vm/` with the COW disk and uml_dir, owned by the sandbox uid) →
cgroup leaf → the launcher chain (command.py) with the console pump. The
instance is handed over at the agent's first ready line (`CUBE-AGENT-READY`, then
envd's /health); `UmlInstance.wait_fully_ready` waits for the second
(`CUBE-INTERPRETER-READY`: the default Python kernel answers). Cancel =
kill: every process in the cgroup gets SIGKILL. A graceful halt would buy
nothing, the COW disk is deleted with the sandbox.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import trio

from appliance.config import Config
from appliance.net.addressing import Addressing
from appliance.runtime.base import ENVD_PORT, BootFailed, BootSpec, BootStalled, GuestExited, Instance
from appliance.runtime.detect import find_uml_kernel
from appliance.runtime.readiness import ReadinessProbe
from appliance.runtime.uml.balloon import SandboxBalloon
from appliance.runtime.uml.cgroups import SandboxCgroup, create_cgroup, io_limits_for, sweep_empty_leaves
from appliance.runtime.uml.command import LaunchPlan, check_paths, launcher_argv, launcher_environment
from appliance.runtime.uml.console import ConsoleLog
from appliance.runtime.uml.instance import UmlInstance
from appliance.runtime.uml.kernel import refuse_unsafe_kernel
from appliance.runtime.uml.mconsole import Mconsole
from appliance.runtime.uml.process import SpawnedProcess, spawn
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
# Killing the pid-namespace init tears the whole guest down; past this, kill the cgroup's processes.
REAP_TIMEOUT_S = 10.0
REAP_POLL_S = 0.01
CONSOLE_LOG = "console.log"
VM_DIR = "vm"
COW_FILE = "disk.cow"  # in VM_DIR: LaunchPlan.cow_file
STAGE_DIR = "stage"
REPLY_DIR = "reply"  # LaunchPlan.reply_dir


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
        disk = next(p for p in (config.sandboxes_dir, *config.sandboxes_dir.parents) if p.exists())
        self.io_limits = io_limits_for(disk, config.uml_io_bps_max, config.uml_io_iops_max)
        if self.io_limits.device is None:
            log.warning("uml runtime: sandboxes get no IO limit: %s", self.io_limits.unavailable)
        self._cubevs = cubevs
        self._seccomp = compile_filter()
        # A sandbox this service had still has its directory (removed at a clean teardown).
        if swept := sweep_empty_leaves(lambda sandbox_id: (config.sandboxes_dir / sandbox_id).is_dir()):
            log.info("uml runtime: removed %d stale cgroup leaves: %s", len(swept), ", ".join(swept))

    async def finalize_template(self, template: TemplateManifest, instance: Instance) -> None:
        """Nothing to keep of the build's guest: the warm pool boots fresh ones."""

    def close(self) -> None:
        """Nothing is kept between sandboxes."""

    async def run(
        self, spec: BootSpec, *, task_status: trio.TaskStatus[Instance] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        uid = self.config.uid_base + spec.slot
        policy = spec.network_policy
        async with self._cubevs.sandbox_network(spec.sandbox_id, spec.slot, uid, policy) as net:
            try:
                await trio.to_thread.run_sync(_prepare_sandbox_dir, spec.sandbox_dir, uid)
                if spec.disk is not None:
                    await trio.to_thread.run_sync(_adopt_disk, spec.disk, spec.sandbox_dir, uid)
                limit = (spec.memory_mb + HOST_OVERHEAD_MB) << 20
                cgroup = await trio.to_thread.run_sync(
                    create_cgroup, spec.sandbox_id, limit, spec.cpu_count, spec.background, self.io_limits
                )
                try:
                    with SandboxBalloon.open(spec.sandbox_dir / VM_DIR, uid, self.kernel) as balloon:
                        await self._run_guest(spec, net, cgroup, uid, task_status, balloon)
                finally:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(cgroup.remove)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(shutil.rmtree, spec.sandbox_dir, True)

    async def _run_guest(
        self,
        spec: BootSpec,
        net: SandboxNetwork,
        cgroup: SandboxCgroup,
        uid: int,
        task_status: trio.TaskStatus[Instance],
        balloon: SandboxBalloon,
    ) -> NoReturn:
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
                uid=uid,
                netns_path=net.netns_path,
                tap=net.tap,
                cgroup_procs=tuple(cgroup.procs_files()),
                seccomp_fd=seccomp_fd,
                resolver_ip=net.resolver_ip,
                balloon_argument=balloon.kernel_argument(),
                agent_token=spec.agent_token,
            )
            try:
                check_paths(plan)
            except ValueError as exc:
                raise BootFailed(spec.sandbox_id, str(exc)) from exc
            started = trio.current_time()
            process = spawn(launcher_argv(plan), launcher_environment(), seccomp_fd)
        finally:
            os.close(seccomp_fd)
        console = ConsoleLog(spec.sandbox_dir / CONSOLE_LOG)
        guest_init = _GuestInit()
        exited = trio.Event()

        async def watch_exit() -> None:
            await process.wait()
            exited.set()

        # Failures are raised after the nursery, so callers get them bare, not in a group.
        failure: BootFailed | GuestExited
        try:
            async with trio.open_nursery() as nursery:
                try:
                    nursery.start_soon(console.pump, process.console)
                    nursery.start_soon(watch_exit)
                    nursery.start_soon(balloon.serve, spec.sandbox_id)
                    factor = BACKGROUND_TIMEOUT_FACTOR if spec.background else 1
                    boot_timeout = self.config.uml_boot_timeout_s * factor
                    stall_timeout = min(self.config.uml_first_output_timeout_s * factor, boot_timeout)
                    with trio.move_on_at(started + stall_timeout) as stall_deadline:
                        await _first_of(console.first_output, exited)
                    if not exited.is_set():
                        guest_init.watch(process.pid)  # the kernel runs: bwrap has forked its init
                    with trio.move_on_at(started + boot_timeout) as boot_deadline:
                        if stall_deadline.cancelled_caught:
                            boot_deadline.cancel()
                        await _first_of(console.ready, exited)
                        if not exited.is_set():
                            probe_timeout = self.config.guest_agent_timeout_s * PROBE_TIMEOUT_SHARE
                            probe = ReadinessProbe((net.host_ip, ENVD_PORT), "/health", probe_timeout)
                            await probe.wait(PROBE_INTERVAL_S, gave_up=exited.is_set)
                    if exited.is_set():
                        await _drain(console)
                        failure = BootFailed(
                            spec.sandbox_id,
                            f"the UML kernel exited (status {process.returncode}) before the agent was ready",
                            console.tail(),
                        )
                    elif stall_deadline.cancelled_caught:
                        failure = BootStalled(
                            spec.sandbox_id, f"the UML kernel wrote nothing within {stall_timeout:.0f} s"
                        )
                    elif boot_deadline.cancelled_caught:
                        failure = BootFailed(
                            spec.sandbox_id,
                            f"the agent was not ready within {boot_timeout:.0f} s",
                            console.tail(),
                        )
                    else:
                        instance = UmlInstance(
                            sandbox_id=spec.sandbox_id,
                            console_log=console.path,
                            agent_token=spec.agent_token,
                            host_ip=net.host_ip,
                            mconsole=Mconsole(plan.mconsole_socket, vm_dir, plan.reply_dir, uid),
                            cgroup=cgroup,
                            console=console,
                            boot_seconds=trio.current_time() - started,
                            started_at=started,
                        )
                        task_status.started(instance)
                        if spec.background:
                            nursery.start_soon(_normal_weight_when_fully_ready, console, cgroup)
                        await exited.wait()
                        await _drain(console)
                        failure = GuestExited(
                            spec.sandbox_id, f"UML exited with status {process.returncode}", console.tail()
                        )
                finally:
                    with trio.CancelScope(shield=True):
                        await _kill_and_reap(process, cgroup, guest_init)
                    nursery.cancel_scope.cancel()
        finally:
            await process.console.aclose()
        raise failure


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
    (vm_dir / "uml").mkdir(parents=True, mode=0o700)
    for directory in (vm_dir, vm_dir / "uml"):
        os.chown(directory, uid, uid)


class _GuestInit:
    """A pidfd on the guest's pid-namespace init (the UML kernel process: `bwrap --as-pid-1`),
    taken once the guest runs.

    When the guest exits on its own, bwrap's outer process (our child) exits as soon as the
    init reports the exit status, before the init itself is reaped: it is then an orphan of
    the host's pid 1. A pidfd outlives pid reuse, so polling it (one syscall) tells when
    it is finally reaped, without scanning /proc.
    """

    def __init__(self) -> None:
        self.pidfd: int | None = None

    def watch(self, launcher_pid: int) -> None:
        for pid in _children(launcher_pid):
            try:
                self.pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                pass
            return

    def kill(self) -> bool:
        """SIGKILL it (the kernel then kills everything in the namespace); False if not watched."""
        if self.pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return True

    async def wait_reaped(self, timeout: float) -> None:
        if self.pidfd is None:
            return
        with trio.move_on_after(timeout):
            while True:
                try:
                    signal.pidfd_send_signal(self.pidfd, 0)  # succeeds until it is reaped (zombie too)
                except ProcessLookupError:
                    break
                await trio.sleep(REAP_POLL_S)
        os.close(self.pidfd)
        self.pidfd = None


async def _kill_and_reap(process: SpawnedProcess, cgroup: SandboxCgroup, guest_init: _GuestInit) -> None:
    """Kill the guest and return once every one of its processes is reaped, zombies included.

    The launcher chain ends as bwrap's outer process (our child), whose only child
    is the guest's pid-namespace init. SIGKILL to that init makes the kernel kill
    everything in the namespace, and the init's exit waits until all of it is
    reaped; the outer bwrap then reaps the init and exits, and its pidfd (our
    `process.wait()`) fires. So no zombie of the sandbox uid outlives this (a uid
    is reused only after), and nothing polls /proc. Killing the whole cgroup at
    once instead would orphan the init's zombie to the host's pid 1. Before bwrap
    has forked (killed while launching) the chain is one process; anything left
    after a bounded wait is SIGKILLed through the cgroup.
    """
    if process.returncode is None:
        if not guest_init.kill():
            for pid in _children(process.pid) or [process.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        with trio.move_on_after(REAP_TIMEOUT_S):
            await process.wait()
    else:
        guest_init.kill()  # the guest exited on its own: its init may still be tearing down
    await guest_init.wait_reaped(REAP_TIMEOUT_S)
    await trio.to_thread.run_sync(cgroup.kill_all)
    await process.wait()


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return []


async def _normal_weight_when_fully_ready(console: ConsoleLog, cgroup: SandboxCgroup) -> None:
    """A background boot is done once its default kernel answers: from then on it is an
    ordinary guest, about to be claimed."""
    await console.interpreter_ready.wait()
    cgroup.set_low_cpu_weight(False)


async def _first_of(*events: trio.Event) -> None:
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait, event)


async def _drain(console: ConsoleLog) -> None:
    """Give the console pump a moment to copy the guest's last words."""
    with trio.move_on_after(0.5):
        await console.finished.wait()
