"""Guests as tasks: boot, deadline, pause and resume, end.

Every guest is a task in the cubelet's nursery (`_sandbox_task`) owning a lifetime
`CancelScope` (cancel = kill) and, inside it, a deadline scope whose deadline is
the E2B timeout (`set_timeout` and `connect` move it). The runtime's `run()` is a
child of that task, so cancelling the lifetime tears the guest down; the task
forgets the guest (its slot is free again) only once `run()` has ended.

A guest a previous service left running is taken over the same way (`adopt`: the task
runs the runtime's `adopt()` instead of `run()`). `detach` cancels a user's sandbox's
task without ending it, when its runtime can keep it running for the next service.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable

import httpx
import trio

from appliance.config import Config
from appliance.cubelet.capacity import BootCapacity
from appliance.cubelet.envd_client import EnvdError, GuestAgent
from appliance.cubelet.sandboxes import (
    LiveSandbox,
    OutOfMemoryBudget,
    SandboxNotFound,
    SandboxStartFailed,
    SandboxTable,
)
from appliance.cubelet.state import USER_VISIBLE, SandboxState
from appliance.cubelet.volume_mounts import VolumeMounts
from appliance.errors import first_leaf
from appliance.net.policy import NetworkPolicy
from appliance.records import SandboxRecord, TemplateManifest
from appliance.runtime.base import (
    ENVD_PORT,
    AdoptingRuntime,
    BootStalled,
    Detachable,
    GuestExited,
    GuestFailure,
    HostBusy,
    Instance,
    Runtime,
)
from appliance.runtime.readiness import ReadinessProbe
from appliance.templates.guest_setup import DEFAULT_PATH

log = logging.getLogger(__name__)

# A guest whose default kernel is not up by then counts as broken (refills boot at a low CPU weight).
FULLY_READY_TIMEOUT_S = 180.0
# A template's own service (its probe, e.g. an image's web server) gets this long after the agent.
TEMPLATE_PROBE_TIMEOUT_S = 60.0
TEMPLATE_PROBE_INTERVAL_S = 0.05
# And its ready command (the SDKs' readyCmd) as long as a template build gives it (TemplateSettings).
READY_CMD_TIMEOUT_S = 120.0
READY_CMD_INTERVAL_S = 0.2
CONSOLE_TAIL_LOGGED = 800


def trio_deadline_for(end_at_unix: float) -> float:
    return trio.current_time() + (end_at_unix - time.time())


class GuestLifecycle:
    def __init__(
        self,
        config: Config,
        runtime: Runtime,
        table: SandboxTable,
        capacity: BootCapacity,
        make_room: Callable[[TemplateManifest], Awaitable[None]],
    ) -> None:
        self.config = config
        # Frees memory for a cold boot or refuses it (`WarmPools.make_room`: OutOfMemoryBudget).
        self._make_room = make_room
        self.runtime = runtime
        self.table = table
        self.capacity = capacity
        self.nursery: trio.Nursery | None = None  # the cubelet's, while it runs
        self.volume_mounts: VolumeMounts | None = None  # volumes copied back out before a guest stops
        self._saving_volumes: set[str] = set()  # sandboxes whose volumes are being copied back

    def _running(self) -> trio.Nursery:
        assert self.nursery is not None, "cubelet is not running"
        return self.nursery

    # Booting.

    async def boot(self, template: TemplateManifest, network_policy: NetworkPolicy) -> LiveSandbox:
        """A cold boot for a caller who waits for it (create, template builds); returns once the
        guest agent answers (READY). The boot keeps its place in the boot capacity until the
        guest's default kernel has started too: that start is as CPU-bound as the boot, and
        boots queued behind it would otherwise run out their timeout on a busy host."""
        live: LiveSandbox = await self._running().start(self._cold_boot, template, network_policy)
        return live

    async def _cold_boot(
        self,
        template: TemplateManifest,
        network_policy: NetworkPolicy,
        *,
        task_status: trio.TaskStatus[LiveSandbox],
    ) -> None:
        async with self.capacity.cold_boot():
            await self._make_room(template)
            live = self.table.add(template, network_policy)
            try:
                await self.start(live)
            except SandboxStartFailed as exc:
                if not isinstance(first_leaf(exc.__cause__ or exc), BootStalled):
                    raise
                log.warning("retrying the stalled boot of %s once", live.sandbox_id)
                live = self.table.add(template, network_policy)
                await self.start(live)
            task_status.started(live)
            await self.until_fully_ready_or_gone(live)

    async def start(self, live: LiveSandbox) -> None:
        """Boot `live`'s guest in the cubelet's nursery; returns once its agent answers (READY).
        An ADOPTING guest is taken over instead (it stays ADOPTING). Raises SandboxStartFailed
        (the guest is then gone)."""
        try:
            # From here on `_sandbox_task` owns `live` and forgets it however it ends.
            await self._running().start(self._sandbox_task, live)
        except BaseException as exc:
            if not live.gone.is_set():
                self.table.forget(live)  # cancelled before `_sandbox_task` ran
            if not isinstance(exc, Exception):
                raise
            # BootFailed, GuestExited or anything the runtime raised while booting
            cause = first_leaf(exc)
            tail = cause.console_tail[-CONSOLE_TAIL_LOGGED:] if isinstance(cause, GuestFailure) else ""
            log.warning(
                "boot of %s failed: %r%s", live.sandbox_id, cause, f"; console tail:\n{tail}" if tail else ""
            )
            if isinstance(cause, GuestExited):
                raise SandboxStartFailed(f"guest exited while booting: {cause.reason}") from exc
            if isinstance(cause, HostBusy):  # nothing was started: the client may retry (503)
                raise OutOfMemoryBudget(cause.reason) from exc
            raise SandboxStartFailed(str(cause)) from exc

    async def until_fully_ready_or_gone(self, live: LiveSandbox) -> None:
        """Until the guest's default kernel answers, the guest is gone, or FULLY_READY_TIMEOUT_S."""
        instance = self._instance(live)
        with trio.move_on_after(FULLY_READY_TIMEOUT_S):
            async with trio.open_nursery() as nursery:

                async def until_gone() -> None:
                    await live.gone.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(until_gone)
                await instance.wait_fully_ready()
                nursery.cancel_scope.cancel()

    async def until_template_ready(self, live: LiveSandbox) -> None:
        """Until the template's own probe answers (an image's service on its port) and its ready
        command succeeds, for guests that become users' sandboxes: a sandbox's ports and the
        service its start command starts work once its create returns (E2B's sandboxes resume
        from a snapshot taken once the ready command succeeded). The runtimes hand a guest over
        once its agent answers; only kvm's restores also wait for the probe port.
        Raises SandboxStartFailed (and kills the guest) if either fails in time."""
        await self._until_probe_answers(live)
        if live.template.ready_cmd:
            await self._until_ready_command_succeeds(live)

    async def _until_probe_answers(self, live: LiveSandbox) -> None:
        template = live.template
        if not template.probe_port or template.probe_port == ENVD_PORT:
            return
        probe = ReadinessProbe(
            self._instance(live).endpoint(template.probe_port), template.probe_path, TEMPLATE_PROBE_TIMEOUT_S
        )
        with trio.move_on_after(TEMPLATE_PROBE_TIMEOUT_S):
            if await probe.wait(TEMPLATE_PROBE_INTERVAL_S, gave_up=live.gone.is_set):
                return
        self.terminate(live, "the template's probe did not answer")
        raise SandboxStartFailed(
            f"the template's service did not answer ({probe.describe()} on port {template.probe_port}) "
            f"within {TEMPLATE_PROBE_TIMEOUT_S:.0f} s: {probe.last_error}"
        )

    async def _until_ready_command_succeeds(self, live: LiveSandbox) -> None:
        """The template's ready command, as its user with its env, until it exits 0 (its build
        showed it does); the guest is killed if it does not within READY_CMD_TIMEOUT_S."""
        template, agent = live.template, live.agent
        assert agent is not None
        argv = ["/bin/sh", "-c", template.ready_cmd]
        env = {"PATH": DEFAULT_PATH, **template.envs}
        outcome = "it never ran"
        with trio.move_on_after(READY_CMD_TIMEOUT_S):
            while not live.gone.is_set():
                try:
                    code = await agent.run(argv, template.user, env, template.workdir)
                except (EnvdError, httpx.HTTPError) as exc:  # e.g. a silent command past the read timeout
                    outcome = str(exc) or type(exc).__name__
                else:
                    if code == 0:
                        return
                    outcome = f"last exit status {code}"
                await trio.sleep(READY_CMD_INTERVAL_S)
        self.terminate(live, "the template's ready command did not succeed")
        raise SandboxStartFailed(
            f"the template's ready command {template.ready_cmd!r} did not succeed within "
            f"{READY_CMD_TIMEOUT_S:.0f} s ({outcome})"
        )

    # A guest's task.

    async def _sandbox_task(self, live: LiveSandbox, *, task_status: trio.TaskStatus[LiveSandbox]) -> None:
        try:
            with live.lifetime:
                try:
                    async with trio.open_nursery() as nursery:
                        live.instance = await nursery.start(self._run_guest, live)
                        live.agent = GuestAgent(
                            live.instance.endpoint(ENVD_PORT),
                            self.config.guest_agent_timeout_s,
                            boot_token=live.instance.agent_token,
                        )
                        if live.state is SandboxState.ADOPTING and live.record is not None:
                            live.agent.access_token = live.record.envd_access_token  # /init was long ago
                        if live.state is SandboxState.BOOTING:  # not killed while the runtime handed it over
                            self.table.transition(live, SandboxState.READY)
                        task_status.started(live)
                        await self._watch_deadline(live)
                except Exception as exc:
                    if live.instance is None:
                        raise  # a boot failure: `start` reports it
                    # One sandbox's runtime failing must not take the node down: record it, it is dead.
                    log.exception("sandbox %s failed", live.sandbox_id)
                    live.end_reason = f"runtime failure: {first_leaf(exc)!r}"
        finally:
            self.table.forget(live)
            if live.agent is not None:
                with trio.CancelScope(shield=True):
                    await live.agent.aclose()

    async def _run_guest(self, live: LiveSandbox, *, task_status: trio.TaskStatus[Instance]) -> None:
        """The runtime's `run()`, which never returns (runtime.base): GuestExited once the guest
        was handed over is its end; anything else raised ends `_sandbox_task`."""
        try:
            if live.state is SandboxState.ADOPTING:
                assert isinstance(self.runtime, AdoptingRuntime)
                await self.runtime.adopt(live.sandbox_id, live.spec, task_status=task_status)
            else:
                await self.runtime.run(live.spec, task_status=task_status)
            raise AssertionError(f"the {self.runtime.name} runtime's run() returned")  # a contract breach
        except GuestExited as exc:
            if live.instance is None:
                raise  # it exited while booting: the boot failed
            # The operator's only trace of why: the console log is deleted with the sandbox.
            tail = exc.console_tail[-CONSOLE_TAIL_LOGGED:]
            log.warning(
                "sandbox %s is dead: %s%s",
                live.sandbox_id,
                exc.reason,
                f"; console tail:\n{tail}" if tail else "",
            )
            self.terminate(live, f"guest exited: {exc.reason}", guest_gone=True)

    async def _watch_deadline(self, live: LiveSandbox) -> None:
        while True:
            with trio.CancelScope(deadline=live.deadline) as live.deadline_scope:
                await trio.sleep_forever()
            live.deadline_scope = None
            if live.state is not SandboxState.RUNNING or live.deadline > trio.current_time():
                continue  # the deadline moved while the scope was being torn down
            if self._record(live).on_timeout == "pause":
                await self.pause(live, reason="timeout (auto-pause)")
                continue  # a pause that raised ends the sandbox through _sandbox_task
            self.terminate(live, "timeout")
            return

    # Changes of a user's sandbox.

    def terminate(self, live: LiveSandbox, reason: str, *, guest_gone: bool = False) -> None:
        """End the guest for its users now (ENDING) and start its teardown (`forget` completes it);
        a guest with volumes mounted first hands their files back (cubelet/volume_mounts.py),
        unless it is gone already (`guest_gone`: then its volumes are only released)."""
        was_paused = live.state is SandboxState.PAUSED
        ending = self.table.end(live, reason)
        mounts = self.volume_mounts
        if live.sandbox_id in self._saving_volumes:
            return  # it ends once they are saved
        if ending and mounts is not None and self.nursery is not None and mounts.held_by(live.sandbox_id):
            self._saving_volumes.add(live.sandbox_id)
            mounts.begin_saving(live.sandbox_id)
            live.set_deadline(math.inf)  # no timeout while its volumes are saved
            agent = None if guest_gone else live.agent
            self.nursery.start_soon(self._sync_volumes_then_end, live, mounts, agent, was_paused)
        else:
            live.lifetime.cancel()

    async def _sync_volumes_then_end(
        self, live: LiveSandbox, mounts: VolumeMounts, agent: GuestAgent | None, was_paused: bool
    ) -> None:
        try:
            if was_paused and agent is not None and live.instance is not None:
                try:
                    await live.instance.resume()  # a frozen guest cannot tar its volumes
                except Exception as exc:
                    log.warning(
                        "sandbox %s could not be resumed to save its volumes: %s", live.sandbox_id, exc
                    )
            await mounts.sync_out(live.sandbox_id, agent)
        except Exception:  # one sandbox's volumes must not take the node down
            log.exception("sandbox %s: saving its volumes failed", live.sandbox_id)
        finally:
            self._saving_volumes.discard(live.sandbox_id)
            live.lifetime.cancel()

    async def detach(self, live: LiveSandbox) -> bool:
        """Let go of a user's sandbox without ending it (DETACHED): its runtime keeps the guest
        running, with everything it holds, for the next service. False if it cannot be kept (not
        a user's sandbox, or its runtime's guests end with the service)."""
        async with live.changing:  # not in the middle of a pause or resume
            if live.state not in USER_VISIBLE or not isinstance(live.instance, Detachable):
                return False
            live.instance.detach()
            self.table.transition(live, SandboxState.DETACHED, "the service stopped; the guest runs on")
            live.lifetime.cancel()
            return True

    async def pause(self, live: LiveSandbox, reason: str) -> bool:
        """Freeze a running sandbox (no deadline while paused). False if it was already paused."""
        async with live.changing:
            if live.state is SandboxState.PAUSED:
                return False
            self._expect(live, SandboxState.RUNNING)
            await self._instance(live).pause()
            self._expect(live, SandboxState.RUNNING)  # not killed meanwhile
            live.set_deadline(math.inf)
            self.table.transition(live, SandboxState.PAUSED, reason)
            return True

    async def resume_or_extend(self, live: LiveSandbox, timeout_s: int) -> bool:
        """Resume a paused sandbox with `timeout_s` to run, or give a running one at least that
        long (never shorten it). True if it was resumed."""
        record = self._record(live)
        async with live.changing:
            resumed = live.state is SandboxState.PAUSED
            if resumed:
                await self._instance(live).resume()
                self._expect(live, SandboxState.PAUSED)  # not killed meanwhile
                record.end_at = time.time() + timeout_s
                self.table.transition(live, SandboxState.RUNNING, "resumed by connect")
            else:
                self._expect(live, SandboxState.RUNNING)
                record.end_at = max(record.end_at, time.time() + timeout_s)
                self.table.save(live)
            live.set_deadline(trio_deadline_for(record.end_at))
        return resumed

    def set_timeout(self, live: LiveSandbox, timeout_s: int) -> None:
        record = self._record(live)
        record.end_at = time.time() + timeout_s
        if live.state is SandboxState.RUNNING:
            live.set_deadline(trio_deadline_for(record.end_at))
        self.table.save(live)

    @staticmethod
    def _expect(live: LiveSandbox, state: SandboxState) -> None:
        if live.state is not state:
            raise SandboxNotFound(live.sandbox_id)

    @staticmethod
    def _instance(live: LiveSandbox) -> Instance:
        assert live.instance is not None, "the guest was not handed over yet"
        return live.instance

    @staticmethod
    def _record(live: LiveSandbox) -> SandboxRecord:
        assert live.record is not None, "not a user's sandbox"
        return live.record
