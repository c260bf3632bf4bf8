"""The per-node agent: what the API, the proxy and the service call to run sandboxes.

`Cubelet` puts together the pieces (module map in docs/ARCHITECTURE.md):
- `sandboxes.SandboxTable`: every guest, its slot and its `SandboxState`
  (`state.py`: the lifecycle as a table), changed only by `transition`;
- `lifecycle.GuestLifecycle`: guests as tasks: boot, deadline, pause, resume, end;
- `pools.WarmPools`: booted guests per template, waiting to be claimed;
- `capacity.BootCapacity`: how many boots run at once (cold boots, refills, claims);
- `health.HealthProber`: kills guests whose agent stops answering;
- `envd_client.GuestAgent`: the host's calls to one guest's agent.

At start, before its pools or health probes run, it takes over the guests the previous
service left running (`adoption.Adopter`, if the runtime keeps guests across restarts: uml).

A create claims a pooled guest if there is one, else boots one cold; either way it
then hands the guest its user's env vars, access token and clock through the agent's
`/init` and the guest becomes the user's sandbox (RUNNING). A claim's critical path
is that one round trip: the guest's connection is already open (each guest has its
own HTTP client, kept warm by the health probes) and its network policy is changed
only if the request asks for another one than the template's default.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Protocol

import trio

from appliance.config import Config
from appliance.cubelet.adoption import Adopter, Adoption
from appliance.cubelet.capacity import BootCapacity
from appliance.cubelet.checkpoints import ForkCheckpoints
from appliance.cubelet.envd_client import EnvdError
from appliance.cubelet.health import HealthProber
from appliance.cubelet.lifecycle import GuestLifecycle, trio_deadline_for
from appliance.cubelet.metrics import MetricsHistory, user_sandboxes
from appliance.cubelet.pools import WarmPools
from appliance.cubelet.sandboxes import (
    LiveSandbox,
    OutOfMemoryBudget,
    SandboxNotFound,
    SandboxRequest,
    SandboxStartFailed,
    SandboxTable,
    template_network_policy,
)
from appliance.cubelet.state import ACTIVE, USER_VISIBLE, SandboxState
from appliance.cubelet.volume_mounts import VolumeMounts
from appliance.net.policy import NetworkPolicy
from appliance.records import (
    RUNNING,
    SandboxRecord,
    Store,
    TemplateManifest,
)
from appliance.runtime.base import AdoptingRuntime, Instance, Runtime

__all__ = [
    "ENVD_VERSION",
    "Cubelet",
    "LiveSandbox",
    "NetworkPolicyService",
    "OutOfMemoryBudget",
    "SandboxNotFound",
    "SandboxRequest",
    "SandboxStartFailed",
    "memory_budget_mb",
    "rfc3339",
]

log = logging.getLogger(__name__)

ENVD_VERSION = "0.6.4"


class NetworkPolicyService(Protocol):
    """What the cubelet needs from CubeVS to change a running sandbox's policy (parsed by the API)."""

    async def update_policy(self, sandbox_id: str, policy: NetworkPolicy) -> None: ...

    def counters(self, sandbox_id: str) -> dict[str, int]:
        """Packets/bytes the sandbox's policy allowed and dropped; {} for an unknown sandbox."""
        ...


def rfc3339(unix_s: float) -> str:
    return dt.datetime.fromtimestamp(unix_s, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def memory_budget_mb(config: Config) -> int:
    if config.memory_budget_mb >= 0:
        return config.memory_budget_mb
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 3 // 4 // 1024
    return 0


class Cubelet:
    def __init__(
        self,
        config: Config,
        runtime: Runtime,
        store: Store,
        network: NetworkPolicyService | None = None,
        templates: Callable[[], dict[str, TemplateManifest]] | None = None,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.store = store
        self.network = network
        self._templates = templates or (lambda: {t.template_id: t for t in store.list_templates()})
        self.memory_budget_mb = memory_budget_mb(config)
        self.sandboxes = SandboxTable(config, store, on_change=self._guest_changed)
        self.fork_checkpoints = ForkCheckpoints(config, runtime, lambda: self.sandboxes)
        self.capacity = BootCapacity(os.cpu_count(), on_release=self.wake_pools)
        self.lifecycle = GuestLifecycle(
            config, runtime, self.sandboxes, self.capacity, make_room=lambda t: self.pools.make_room(t)
        )
        self.volume_mounts = VolumeMounts(
            config.state_dir, config.volume_max_mb << 20, holder_alive=lambda sid: sid in self.sandboxes
        )
        self.lifecycle.volume_mounts = self.volume_mounts
        self.health = HealthProber(config, self.sandboxes, self.lifecycle.terminate)
        self.adoption = Adoption()  # what `run` took over of the previous service's guests
        self.pools = WarmPools(
            config,
            self.sandboxes,
            self.lifecycle,
            self.capacity,
            self.health.probe,
            self._templates,
            self.memory_budget_mb,
        )
        self.metrics_history = MetricsHistory(self.metrics, user_sandboxes(self.sandboxes))

    # Service task.

    async def run(self, *, task_status: trio.TaskStatus[Cubelet] = trio.TASK_STATUS_IGNORED) -> None:
        """The cubelet's tasks; started once the guests a previous service left are taken over
        (`adoption` says which), before any pool refill could take their slots."""
        try:
            async with trio.open_nursery() as nursery:
                self.lifecycle.nursery = nursery
                if isinstance(self.runtime, AdoptingRuntime):
                    adopter = Adopter(self.store, self.sandboxes, self.lifecycle, self._templates)
                    self.adoption = await adopter.adopt(self.runtime)
                self.fork_checkpoints.sweep()  # what a fork request the last service died in left
                nursery.start_soon(self.pools.keep)
                nursery.start_soon(self.health.run)
                nursery.start_soon(self.metrics_history.run)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self.lifecycle.nursery = None

    def _guest_changed(self, live: LiveSandbox, old: SandboxState) -> None:
        self.pools.guest_changed(live, old)
        self.fork_checkpoints.guest_changed(live, old)

    async def shutdown(self, reason: str, *, detach: bool = False) -> list[str]:
        """End every guest (recording `reason`) and wait until they are gone; with `detach`, users'
        sandboxes whose runtime can keep them are left running instead (for the next service):
        their ids are returned."""
        lives = list(self.sandboxes)
        detached = []
        for live in lives:
            if detach and await self.lifecycle.detach(live):
                detached.append(live.sandbox_id)
            else:
                self.lifecycle.terminate(live, reason)
        for live in lives:
            await live.gone.wait()
        return detached

    # Queries.

    def live(self, sandbox_id: str) -> LiveSandbox | None:
        """The user's sandbox `sandbox_id` (running or paused), or None."""
        return self.sandboxes.sandbox(sandbox_id)

    def require(self, sandbox_id: str) -> LiveSandbox:
        live = self.sandboxes.sandbox(sandbox_id)
        if live is None:
            raise SandboxNotFound(sandbox_id)
        return live

    def live_count(self, template_id: str) -> int:
        return self.sandboxes.count(template_id, USER_VISIBLE)

    def pooled_count(self, template_id: str) -> int:
        return len(self.pools.ready(template_id))

    def pool_state(self, template_id: str, template: TemplateManifest | None = None) -> dict[str, int]:
        """The warm pool of a template: its target size, guests ready to claim, refills booting."""
        return self.pools.state(template_id, template or self._templates().get(template_id))

    def memory_committed_mb(self) -> int:
        return self.sandboxes.memory_committed_mb()

    def wake_pools(self) -> None:
        self.pools.wake()

    async def forget_template(self, template_id: str) -> None:
        """A deleted template (no sandbox runs from it): its warm pool drained now, what the
        runtime keeps to start it deleted."""
        self.pools.drop(template_id)
        await trio.to_thread.run_sync(self.runtime.forget_template, template_id)

    # Lifecycle.

    async def create(self, request: SandboxRequest) -> SandboxRecord:
        template = request.template
        live = self.pools.claim(template.template_id)
        if live is not None:
            with self.capacity.claim():
                try:
                    return await self._activate_or_discard(live, request, source="warm pool")
                except SandboxStartFailed as exc:
                    log.warning(
                        "warm instance %s failed to initialise (%s); booting cold", live.sandbox_id, exc
                    )
        live = await self.lifecycle.boot(template, request.network)
        await self.lifecycle.until_template_ready(live)
        return await self._activate_or_discard(live, request, source="cold boot")

    async def _activate_or_discard(
        self, live: LiveSandbox, request: SandboxRequest, *, source: str
    ) -> SandboxRecord:
        """Turn a READY guest into the user's sandbox (RUNNING); if that fails or is cancelled,
        the guest is killed."""
        try:
            return await self._activate(live, request, source=source)
        except BaseException:
            self.lifecycle.terminate(live, f"initialisation after {source} failed")
            raise

    async def _activate(self, live: LiveSandbox, request: SandboxRequest, *, source: str) -> SandboxRecord:
        now = time.time()
        console_log = str(live.instance.console_log) if live.instance else ""
        record = request.new_record(live.sandbox_id, console_log, now)
        await self._init_guest(live, request, record, now)
        if request.volume_mounts:
            await self.volume_mounts.attach(
                live.sandbox_id, live.instance, live.agent, list(request.volume_mounts), request.template.user
            )
        # A warm guest was booted with the template's default policy, a cold one with the
        # request's: most requests ask for the default, and then there is nothing to change.
        if self.network is not None and request.network != live.spec.network_policy:
            await self.network.update_policy(live.sandbox_id, request.network)
        self._run(live, record, f"{source}, template {request.template.template_id}", event="created")
        return record

    async def restore(self, record: SandboxRecord, template: TemplateManifest, disk: Path) -> SandboxRecord:
        """Boot a sandbox carried over a service restart (`cube upgrade`): same id, access token and
        settings, on its kept disk. Its processes and memory did not survive; env vars given at
        create time are not kept (the template's are set again). Raises SandboxStartFailed."""
        now = time.time()
        request = SandboxRequest.carried_over(record, template, now)
        async with self.capacity.cold_boot():
            live = self.sandboxes.add(template, request.network, sandbox_id=record.sandbox_id, disk=disk)
            await self.lifecycle.start(live)
        assert live.instance is not None
        restored = dataclasses.replace(
            record, state=RUNNING, ended_at=None, end_reason="", console_log=str(live.instance.console_log)
        )
        try:
            await self._init_guest(live, request, restored, now)
            self._run(live, restored, "carried over a service restart (disk kept)", event="restored")
        except BaseException:
            self.lifecycle.terminate(live, "initialisation after a restart failed")
            raise
        return restored

    async def _init_guest(
        self, live: LiveSandbox, request: SandboxRequest, record: SandboxRecord, now: float
    ) -> None:
        assert live.agent is not None
        try:
            await live.agent.init(
                access_token=record.envd_access_token,
                traffic_token=record.traffic_access_token,
                env_vars={**request.template.envs, **request.env_vars},
                user=request.template.user,
                workdir=request.template.workdir,
                timestamp=rfc3339(now),
            )
        except EnvdError as exc:
            raise SandboxStartFailed(str(exc)) from exc

    def _run(self, live: LiveSandbox, record: SandboxRecord, message: str, *, event: str) -> None:
        """READY → RUNNING: the guest is the user's sandbox from now, its deadline running."""
        if live.state is not SandboxState.READY:
            raise SandboxStartFailed(f"the guest ended while it was being initialised ({live.end_reason})")
        self.sandboxes.transition(live, SandboxState.RUNNING, message, record=record, event=event)
        live.set_deadline(trio_deadline_for(record.end_at))

    @asynccontextmanager
    async def temporary_guest(self, template: TemplateManifest) -> AsyncIterator[Instance]:
        """A guest booted from `template` for the caller's own use (template build probes); never a
        sandbox, never pooled; killed when the context exits. Raises SandboxStartFailed."""
        live = await self.lifecycle.boot(template, template_network_policy(template))
        try:
            assert live.instance is not None
            yield live.instance
        finally:
            self.lifecycle.terminate(live, "temporary guest released")
            with trio.CancelScope(shield=True):
                await live.gone.wait()

    async def kill(self, sandbox_id: str, reason: str = "killed") -> bool:
        """End a sandbox now; False if there is no such sandbox.

        It vanishes at once (not listed, not found, recorded dead); its teardown runs on
        in the cubelet's nursery and holds its slot, uid, network and memory until done
        (`LiveSandbox.gone`).
        """
        live = self.live(sandbox_id)
        if live is None:
            return False
        self.lifecycle.terminate(live, reason)
        return True

    def set_timeout(self, sandbox_id: str, timeout_s: int) -> SandboxRecord:
        live = self.require(sandbox_id)
        self.lifecycle.set_timeout(live, timeout_s)
        return self._record_of(live)

    async def pause(self, sandbox_id: str, reason: str = "paused by request") -> bool:
        """Freeze the guest. False if it was already paused."""
        return await self.lifecycle.pause(self.require(sandbox_id), reason)

    async def connect(self, sandbox_id: str, timeout_s: int) -> tuple[SandboxRecord, bool]:
        """Resume a paused sandbox, or extend a running one's timeout (never shorten it).

        Returns the record and whether the sandbox was resumed.
        """
        live = self.require(sandbox_id)
        resumed = await self.lifecycle.resume_or_extend(live, timeout_s)
        return self._record_of(live), resumed

    async def update_network(self, sandbox_id: str, policy: NetworkPolicy) -> SandboxRecord:
        live = self.require(sandbox_id)
        if self.network is not None:
            await self.network.update_policy(sandbox_id, policy)
        record = self._record_of(live)
        record.set_egress_policy(policy)
        self.sandboxes.save(live)
        self.store.add_event(sandbox_id, "network", "network policy updated")
        return record

    async def metrics(self, sandbox_id: str) -> dict[str, object]:
        """One sample in the E2B SandboxMetric shape: host-side memory, envd's view when it answers."""
        live = self.require(sandbox_id)
        assert live.instance is not None and live.agent is not None
        now = time.time()
        sample: dict[str, object] = {
            "timestamp": rfc3339(now),
            "timestampUnix": int(now),
            "cpuCount": live.template.cpu_count,
            "cpuUsedPct": 0.0,
            "memUsed": live.instance.memory_usage_bytes(),
            "memTotal": live.template.memory_mb * 1024 * 1024,
            "memCache": 0,
            "diskUsed": 0,
            "diskTotal": live.template.writable_layer_mb * 1024 * 1024,
        }
        if live.state is SandboxState.RUNNING:
            sample.update(await live.agent.metrics())
        counters = self.network_counters(sandbox_id)
        if counters:
            sample["network"] = counters  # an extra key: the SDKs keep unknown keys
        return sample

    def network_counters(self, sandbox_id: str) -> dict[str, int]:
        """The sandbox's egress policy counters from CubeVS ({} without it, or once the sandbox is over)."""
        live = self.sandboxes.get(sandbox_id)
        if self.network is None or live is None or live.state not in ACTIVE:
            return {}
        return self.network.counters(sandbox_id)

    @staticmethod
    def _record_of(live: LiveSandbox) -> SandboxRecord:
        assert live.record is not None, "not a user's sandbox"
        return live.record
