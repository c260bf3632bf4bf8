"""The per-node agent: sandbox lifecycle, warm pools, timeouts, health, metrics.

Every guest is a task in the cubelet's nursery (`_sandbox_task`), owning a
lifetime `CancelScope` (cancel = kill) and, inside it, a deadline scope whose
deadline is the E2B timeout (`set_timeout` moves it). The runtime's `run()` is a
child of that task, so cancelling the lifetime tears the guest down.

Warm pools hold booted instances per template that no one has claimed yet: the
same task, with no deadline. A runtime hands an instance over once its guest agent
answers (envd: commands and files work), which is when a cold create returns;
the default Python kernel may still be starting then (executions wait for it).
A pooled instance joins its pool only when fully ready (`wait_fully_ready`, for
runtimes whose instances have it), so a warm create never waits for a kernel.
Claiming one flips it to a sandbox, sets its deadline and sends the user's env
vars, access token and clock to the guest agent's `/init`. A claim's critical path
is that one round trip: the guest's connection is already open (each guest has its
own HTTP client, kept warm by the health probes), its network policy is changed
only if the request asks for another one, and refills wait until a burst of claims
has been answered (`REFILL_QUIET_S`), since a boot's host-side set-up and guest CPU
slow every claim still in flight — unless the pool is down to half its target, so
that steady creates cannot starve the refills.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import logging
import math
import os
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx
import trio

from appliance.config import Config
from appliance.master.store import DEAD, PAUSED, RUNNING, SandboxRecord, Store
from appliance.runtime.base import (
    ENVD_PORT,
    BootSpec,
    BootStalled,
    GuestExited,
    HostBusy,
    Instance,
    Runtime,
    read_console_tail,
)
from appliance.templates.manifest import TemplateManifest

log = logging.getLogger(__name__)

ENVD_VERSION = "0.6.4"
POOLED = "pooled"
HEALTH_INTERVAL_S = 5.0
# A health probe's share of config.guest_agent_timeout_s (10 s by default: 2 s per probe).
HEALTH_TIMEOUT_SHARE = 0.2
HEALTH_FAILURES_BEFORE_KILL = 3
POOL_RETRY_DELAY_S = 5.0
# Refills start only once no warm claim has ended for this long: the answers of a burst of
# creates go out first (a refill's network set-up and boot compete with them for the cores).
REFILL_QUIET_S = 0.5
# A pooled guest whose default kernel is not up by then is killed (refills boot at a low CPU weight).
FULLY_READY_TIMEOUT_S = 180.0
# pool_size = -1 sizes each pool to the memory budget, but never above this: a pool deeper than
# a burst of creates costs idle memory and boots the host's cores for nothing.
AUTO_POOL_CAP = 16
CONSOLE_TAIL_CHARS = 2000  # of a dead guest's console, in the service log


class SandboxNotFound(Exception):
    def __init__(self, sandbox_id: str) -> None:
        super().__init__(f"sandbox {sandbox_id} not found")
        self.sandbox_id = sandbox_id


class SandboxStartFailed(Exception):
    """Booting or initialising a guest failed; the message is for the user."""


class SandboxCapacityExceeded(SandboxStartFailed):
    """The runtime refused the sandbox for want of host resources (HostBusy): retry later."""


class NetworkPolicyService(Protocol):
    """What the cubelet needs from CubeVS to change a running sandbox's policy.

    `policy` is an E2B body (`PUT /sandboxes/{id}/network`, or the create body's
    `allow_internet_access` + `network`); a policy it refuses raises ValueError.
    """

    async def update_policy(self, sandbox_id: str, policy: dict[str, object]) -> None: ...

    def counters(self, sandbox_id: str) -> dict[str, int]:
        """Packets/bytes the sandbox's policy allowed and dropped; {} for an unknown sandbox."""
        ...


@dataclass(frozen=True)
class SandboxRequest:
    template: TemplateManifest
    alias: str | None
    timeout_s: int
    metadata: dict[str, str] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    on_timeout: str = "kill"
    auto_resume: bool = False
    allow_internet_access: bool = True
    network: dict[str, object] = field(default_factory=dict)

    def network_policy(self) -> dict[str, object]:
        """The policy handed to CubeVS, in the create-body shape `NetworkPolicy.from_e2b` reads:
        template defaults, overridden by the request's own settings."""
        return {
            "allow_internet_access": self.allow_internet_access,
            "network": {**self.template.network_defaults, **self.network},
        }


@dataclass
class LiveSandbox:
    """A guest this node runs: pooled (unclaimed), running or paused."""

    sandbox_id: str
    template: TemplateManifest
    slot: int
    spec: BootSpec
    state: str = POOLED
    instance: Instance | None = None
    record: SandboxRecord | None = None
    lifetime: trio.CancelScope = field(default_factory=trio.CancelScope)
    deadline: float = math.inf  # trio clock
    deadline_scope: trio.CancelScope | None = None
    # The host's HTTP client for this guest's envd (`_envd_client`), from boot until the guest is gone.
    envd: httpx.AsyncClient | None = None
    end_reason: str = "killed"
    health_failures: int = 0
    # Set when the sandbox ended for its users (killed, timed out, exited): it is no longer
    # listed, found or claimed, but its slot, uid, network and memory stay taken until `gone`.
    ended: bool = False
    gone: trio.Event = field(default_factory=trio.Event)

    def envd_headers(self) -> dict[str, str]:
        """Auth for the host's own envd calls: once `/init` set a token, envd checks it on every call."""
        if self.record is None or not self.record.envd_access_token:
            return {}
        return {"X-Access-Token": self.record.envd_access_token}

    def set_deadline(self, deadline: float) -> None:
        self.deadline = deadline
        if self.deadline_scope is not None:
            self.deadline_scope.deadline = deadline


def rfc3339(unix_s: float) -> str:
    return dt.datetime.fromtimestamp(unix_s, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def trio_deadline_for(end_at_unix: float) -> float:
    return trio.current_time() + (end_at_unix - time.time())


def _innermost(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _log_death(live: LiveSandbox, console_tail: str) -> None:
    """A sandbox that died of its guest: the reason (also its record's and event's) and what
    its console said last, for the operator (the console log is deleted with the sandbox)."""
    tail = console_tail[-CONSOLE_TAIL_CHARS:]
    log.warning(
        "sandbox %s is dead: %s%s",
        live.sandbox_id,
        live.end_reason,
        f"; console tail:\n{tail}" if tail else "",
    )


def _envd_client(instance: Instance, timeout: float) -> httpx.AsyncClient:
    """The host's client for one guest's envd (/init, /health, /metrics). Its own connection
    pool: the connection the health probes keep open is the one a claim's /init reuses (a new
    one costs the guest's vCPU ~4 ms under UML), and closing it with the guest leaves no idle
    connection for the next guest at that address."""
    host, port = instance.endpoint(ENVD_PORT)
    return httpx.AsyncClient(
        base_url=f"http://{host}:{port}",
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(keepalive_expiry=None),  # envd never closes an idle connection
        trust_env=False,
        verify=False,  # plain HTTP: the default TLS context would load the CA bundle, ~0.1 s per guest
    )


def _default_policy(template: TemplateManifest) -> dict[str, object]:
    """A pooled guest's network policy until it is claimed (the claim applies the request's)."""
    return {"allow_internet_access": True, "network": dict(template.network_defaults)}


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
        self._live: dict[str, LiveSandbox] = {}
        self._pools: dict[str, deque[LiveSandbox]] = {}
        self._slots: set[int] = set()
        self._next_slot = 0
        # One /30 of host_network per slot; the first /30 is the node resolver's.
        self._slot_count = ipaddress.ip_network(config.host_network).num_addresses // 4 - 1
        self._pool_wakeup = trio.Event()
        # Boots are CPU-bound (a kernel starting): more at once than cores only makes each slower.
        # Creates that wait for a cold boot and pool refills each get that many.
        self._boot_limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))
        self._refill_concurrency = max(1, os.cpu_count() or 1)
        self._refills: dict[str, int] = {}  # template → pooled guests booting
        self._cold_boots = 0  # boots someone waits for, booting or waiting for the limiter
        self._claims = 0  # warm creates initialising their guest right now
        self._refills_held_until = -math.inf  # trio time: REFILL_QUIET_S after the last claim ended
        self._refill_retry_at: dict[str, float] = {}  # template → trio time after a failed refill
        self._nursery: trio.Nursery | None = None
        self.memory_budget_mb = memory_budget_mb(config)

    # Service task.

    async def run(self, *, task_status: trio.TaskStatus[Cubelet] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._pool_keeper)
                nursery.start_soon(self._health_prober)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def shutdown(self, reason: str) -> None:
        """Kill every guest (recording `reason`) and wait until they are gone."""
        lives = list(self._live.values())
        for live in lives:
            self._terminate(live, reason)
        for live in lives:
            await live.gone.wait()

    # Queries.

    def live(self, sandbox_id: str) -> LiveSandbox | None:
        live = self._live.get(sandbox_id)
        return live if live is not None and live.state != POOLED and not live.ended else None

    def pooled_count(self, template_id: str) -> int:
        return len(self._pools.get(template_id, ()))

    def pool_state(self, template_id: str, template: TemplateManifest | None = None) -> dict[str, int]:
        """The warm pool of a template: its target size, guests ready to claim, refills booting."""
        template = template or self._templates().get(template_id)
        return {
            "target": self.pool_target(template) if template is not None else 0,
            "ready": self.pooled_count(template_id),
            "booting": self._refills.get(template_id, 0),
        }

    def live_count(self, template_id: str) -> int:
        return sum(
            1
            for live in self._live.values()
            if live.template.template_id == template_id and live.record and not live.ended
        )

    def memory_committed_mb(self) -> int:
        return sum(live.template.memory_mb for live in self._live.values())

    def require(self, sandbox_id: str) -> LiveSandbox:
        live = self.live(sandbox_id)
        if live is None or live.record is None:
            raise SandboxNotFound(sandbox_id)
        return live

    # Lifecycle.

    async def create(self, request: SandboxRequest) -> SandboxRecord:
        template = request.template
        live = self._claim_pooled(template.template_id)
        if live is not None:
            self._claims += 1
            try:
                await self._activate_or_discard(live, request, source="warm pool")
                return self._record_of(live)
            except SandboxStartFailed as exc:
                log.warning("warm instance %s failed to initialise (%s); booting cold", live.sandbox_id, exc)
            finally:
                self._claims -= 1
                self._refills_held_until = trio.current_time() + REFILL_QUIET_S
                self._pool_wakeup.set()  # top the pool up once the burst is answered
        live = await self._boot(template, request.network_policy())
        await self._activate_or_discard(live, request, source="cold boot")
        return self._record_of(live)

    async def _activate_or_discard(self, live: LiveSandbox, request: SandboxRequest, *, source: str) -> None:
        """Turn a booted guest into the user's sandbox; if that fails or is cancelled, the guest is killed."""
        try:
            await self._activate(live, request, source=source)
        except BaseException:
            self._terminate(live, f"initialisation after {source} failed")
            raise

    @asynccontextmanager
    async def temporary_guest(self, template: TemplateManifest) -> AsyncIterator[Instance]:
        """A guest booted from `template` for the caller's own use (template build probes); never a
        sandbox, never pooled; killed when the context exits. Raises SandboxStartFailed."""
        live = await self._boot(
            template, {"allow_internet_access": True, "network": dict(template.network_defaults)}
        )
        try:
            assert live.instance is not None
            yield live.instance
        finally:
            self._terminate(live, "temporary guest released")
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
        self._terminate(live, reason)
        return True

    def set_timeout(self, sandbox_id: str, timeout_s: int) -> SandboxRecord:
        live = self.require(sandbox_id)
        record = self._record_of(live)
        record.end_at = time.time() + timeout_s
        if live.state == RUNNING:
            live.set_deadline(trio_deadline_for(record.end_at))
        self.store.put_sandbox(record)
        return record

    async def pause(self, sandbox_id: str, reason: str = "paused by request") -> bool:
        """Freeze the guest. False if it was already paused."""
        live = self.require(sandbox_id)
        if live.state == PAUSED:
            return False
        assert live.instance is not None
        await live.instance.pause()
        live.state = PAUSED
        live.set_deadline(math.inf)
        record = self._record_of(live)
        record.state = PAUSED
        self.store.put_sandbox(record)
        self.store.add_event(sandbox_id, "paused", reason)
        return True

    async def connect(self, sandbox_id: str, timeout_s: int) -> tuple[SandboxRecord, bool]:
        """Resume a paused sandbox, or extend a running one's timeout (never shorten it).

        Returns the record and whether the sandbox was resumed.
        """
        live = self.require(sandbox_id)
        record = self._record_of(live)
        resumed = False
        if live.state == PAUSED:
            assert live.instance is not None
            await live.instance.resume()
            live.state = record.state = RUNNING
            record.end_at = time.time() + timeout_s
            self.store.add_event(sandbox_id, "resumed", "resumed by connect")
            resumed = True
        else:
            record.end_at = max(record.end_at, time.time() + timeout_s)
        live.set_deadline(trio_deadline_for(record.end_at))
        self.store.put_sandbox(record)
        return record, resumed

    async def update_network(self, sandbox_id: str, policy: dict[str, object]) -> SandboxRecord:
        live = self.require(sandbox_id)
        if self.network is not None:
            await self.network.update_policy(sandbox_id, policy)
        record = self._record_of(live)
        record.network = {k: v for k, v in policy.items() if k != "allowInternetAccess"}
        if "allowInternetAccess" in policy:
            record.allow_internet_access = bool(policy["allowInternetAccess"])
        self.store.put_sandbox(record)
        self.store.add_event(sandbox_id, "network", "network policy updated")
        return record

    async def metrics(self, sandbox_id: str) -> dict[str, object]:
        """One sample in the E2B SandboxMetric shape: host-side memory, envd's view when it answers."""
        live = self.require(sandbox_id)
        assert live.instance is not None
        now = time.time()
        total = live.template.memory_mb * 1024 * 1024
        sample: dict[str, object] = {
            "timestamp": rfc3339(now),
            "timestampUnix": int(now),
            "cpuCount": live.template.cpu_count,
            "cpuUsedPct": 0.0,
            "memUsed": live.instance.memory_usage_bytes(),
            "memTotal": total,
            "memCache": 0,
            "diskUsed": 0,
            "diskTotal": live.template.writable_layer_mb * 1024 * 1024,
        }
        if live.state == RUNNING:
            sample.update(await self._envd_metrics(live))
        counters = self.network_counters(sandbox_id)
        if counters:
            sample["network"] = counters  # an extra key: the SDKs keep unknown keys
        return sample

    def network_counters(self, sandbox_id: str) -> dict[str, int]:
        """The sandbox's egress policy counters from CubeVS ({} without it, or once the sandbox is gone)."""
        live = self._live.get(sandbox_id)
        if self.network is None or live is None or live.ended:
            return {}
        return self.network.counters(sandbox_id)

    # Internals.

    def _record_of(self, live: LiveSandbox) -> SandboxRecord:
        assert live.record is not None
        return live.record

    def _allocate_slot(self) -> int:
        """The next free slot after the last one handed out, wrapping around.

        A slot picks the sandbox's host address, so handing a just-freed slot to the
        next sandbox would let keep-alive connections (the router's)
        and conntrack entries made for the dead guest land on the new one. Rotating
        keeps a freed address unused until every other slot has had its turn.
        """
        if len(self._slots) >= self._slot_count:
            raise SandboxStartFailed(f"all {self._slot_count} sandbox network slots are in use")
        slot = self._next_slot
        while slot in self._slots:
            slot = (slot + 1) % self._slot_count
        self._next_slot = (slot + 1) % self._slot_count
        self._slots.add(slot)
        return slot

    async def _boot(self, template: TemplateManifest, network_policy: dict[str, object]) -> LiveSandbox:
        """A cold boot for a caller who waits for it (create, template builds); returns once the
        guest agent answers. The boot keeps its place under `_boot_limiter` (and pool refills keep
        waiting) until the guest's default kernel has started too: that start is as CPU-bound as
        the boot, and boots queued behind it would otherwise run out their timeout on a busy host."""
        assert self._nursery is not None, "cubelet is not running"
        self._cold_boots += 1  # waiting ones too: pool refills wait for them
        booting = object()  # the limiter's borrower, handed from this task to `_finish_cold_boot`
        handed_over = False
        try:
            await self._boot_limiter.acquire_on_behalf_of(booting)
            try:
                try:
                    live = self._new_live(template, network_policy)
                    await self._start_guest(live)
                except SandboxStartFailed as exc:
                    if not isinstance(_innermost(exc.__cause__ or exc), BootStalled):
                        raise
                    log.warning("retrying the stalled boot of %s once", live.sandbox_id)
                    live = self._new_live(template, network_policy)
                    await self._start_guest(live)
                self._nursery.start_soon(self._finish_cold_boot, live, booting)
                handed_over = True
            finally:
                if not handed_over:
                    self._boot_limiter.release_on_behalf_of(booting)
        finally:
            if not handed_over:
                self._end_cold_boot()
        return live

    async def _finish_cold_boot(self, live: LiveSandbox, booting: object) -> None:
        try:
            await self._until_fully_ready_or_gone(live)
        finally:
            self._boot_limiter.release_on_behalf_of(booting)
            self._end_cold_boot()

    def _end_cold_boot(self) -> None:
        self._cold_boots -= 1
        self._pool_wakeup.set()

    def _new_live(
        self,
        template: TemplateManifest,
        network_policy: dict[str, object],
        *,
        background: bool = False,
        sandbox_id: str | None = None,
        disk: Path | None = None,
    ) -> LiveSandbox:
        """A guest about to boot: it holds its slot and counts against the memory budget from now.
        `sandbox_id` and `disk` continue a sandbox carried over a restart (see `restore`)."""
        sandbox_id = sandbox_id or secrets.token_hex(10)
        slot = self._allocate_slot()
        spec = BootSpec.for_template(
            self.config,
            template,
            sandbox_id,
            slot,
            network_policy=network_policy,
            background=background,
            disk=disk,
        )
        live = LiveSandbox(sandbox_id=sandbox_id, template=template, slot=slot, spec=spec)
        self._live[sandbox_id] = live
        return live

    async def _start_guest(self, live: LiveSandbox) -> None:
        """Boot `live`'s guest in the cubelet's nursery; returns once its agent answers."""
        assert self._nursery is not None, "cubelet is not running"
        try:
            # From here on `_sandbox_task` owns `live` and forgets it however it ends.
            await self._nursery.start(self._sandbox_task, live)
        except BaseException as exc:
            if not live.gone.is_set():
                self._forget(live)  # cancelled before `_sandbox_task` ran
            if not isinstance(exc, Exception):
                raise
            # BootFailed, GuestExited or anything the runtime raised while booting
            cause = _innermost(exc)
            tail = getattr(cause, "console_tail", "")[-800:]
            log.warning(
                "boot of %s failed: %r%s", live.sandbox_id, cause, f"; console tail:\n{tail}" if tail else ""
            )
            if isinstance(cause, GuestExited):
                raise SandboxStartFailed(f"guest exited while booting: {cause.reason}") from exc
            if isinstance(cause, HostBusy):
                raise SandboxCapacityExceeded(cause.reason) from exc
            raise SandboxStartFailed(str(cause)) from exc

    async def _sandbox_task(self, live: LiveSandbox, *, task_status: trio.TaskStatus[LiveSandbox]) -> None:
        try:
            with live.lifetime:
                try:
                    async with trio.open_nursery() as nursery:
                        live.instance = await nursery.start(self._guest, live)
                        live.envd = _envd_client(live.instance, self.config.guest_agent_timeout_s)
                        task_status.started(live)
                        await self._watch_deadline(live)
                except Exception as exc:
                    if live.instance is None:
                        raise  # a boot failure: the caller of _boot reports it
                    # One sandbox's runtime failing must not take the node down: record it, it is dead.
                    log.exception("sandbox %s failed", live.sandbox_id)
                    live.end_reason = f"runtime failure: {_innermost(exc)!r}"
        finally:
            self._forget(live)
            if live.envd is not None:
                with trio.CancelScope(shield=True):
                    await live.envd.aclose()

    async def _guest(self, live: LiveSandbox, *, task_status: trio.TaskStatus[Instance]) -> None:
        try:
            await self.runtime.run(live.spec, task_status=task_status)
            live.end_reason = "guest exited"
        except GuestExited as exc:
            if live.instance is None:
                raise
            live.end_reason = f"guest exited: {exc.reason}"
            _log_death(live, exc.console_tail)
        self._terminate(live, live.end_reason)

    async def _watch_deadline(self, live: LiveSandbox) -> None:
        while True:
            with trio.CancelScope(deadline=live.deadline) as live.deadline_scope:
                await trio.sleep_forever()
            live.deadline_scope = None
            if live.state != RUNNING or live.deadline > trio.current_time():
                continue  # the deadline moved while the scope was being torn down
            record = self._record_of(live)
            if record.on_timeout == "pause":
                await self.pause(live.sandbox_id, reason="timeout (auto-pause)")
                continue  # a pause that raised ends the sandbox through _sandbox_task
            self._terminate(live, "timeout")
            return

    def _terminate(self, live: LiveSandbox, reason: str) -> None:
        """End the sandbox for its users now and start its teardown (which `_forget` completes)."""
        if not live.ended:
            live.end_reason = reason
        self._end(live)
        live.lifetime.cancel()

    def _end(self, live: LiveSandbox) -> None:
        """The sandbox is over for its users: out of its pool, recorded dead (once)."""
        if live.ended:
            return
        live.ended = True
        pool = self._pools.get(live.template.template_id)
        if pool is not None and live in pool:
            pool.remove(live)
            self._pool_wakeup.set()
        if live.record is not None:
            live.record.state = DEAD
            live.record.ended_at = time.time()
            live.record.end_reason = live.end_reason
            self.store.put_sandbox(live.record)
            self.store.add_event(live.sandbox_id, "dead", live.end_reason)
        live.state = DEAD

    def _forget(self, live: LiveSandbox) -> None:
        """Its teardown is done: the slot (uid, network) and its memory are free again."""
        self._end(live)
        self._live.pop(live.sandbox_id, None)
        self._slots.discard(live.slot)
        self._pool_wakeup.set()
        live.gone.set()

    async def _activate(self, live: LiveSandbox, request: SandboxRequest, *, source: str) -> None:
        now = time.time()
        live.record = SandboxRecord(
            sandbox_id=live.sandbox_id,
            template_id=request.template.template_id,
            alias=request.alias,
            client_id=secrets.token_hex(4),
            state=RUNNING,
            started_at=now,
            end_at=now + request.timeout_s,
            cpu_count=request.template.cpu_count,
            memory_mb=request.template.memory_mb,
            disk_size_mb=request.template.writable_layer_mb,
            envd_access_token=secrets.token_urlsafe(24),
            metadata=dict(request.metadata),
            on_timeout=request.on_timeout,
            auto_resume=request.auto_resume,
            allow_internet_access=request.allow_internet_access,
            network=dict(request.network),
            console_log=str(live.instance.console_log) if live.instance else "",
        )
        try:
            await self._init_guest(live, request, now)
            # A warm guest was booted with the template's default policy, a cold one with the
            # request's: most requests ask for the default, and then there is nothing to change.
            policy = request.network_policy()
            if self.network is not None and policy != live.spec.network_policy:
                await self.network.update_policy(live.sandbox_id, policy)
        except BaseException:
            live.record = None
            raise
        live.state = RUNNING
        live.set_deadline(trio_deadline_for(live.record.end_at))
        self.store.put_sandbox(live.record)
        self.store.add_event(live.sandbox_id, "created", f"{source}, template {request.template.template_id}")

    async def restore(self, record: SandboxRecord, template: TemplateManifest, disk: Path) -> SandboxRecord:
        """Boot a sandbox carried over a service restart (`cube upgrade`): same id, access token and
        settings, on its kept disk. Its processes and memory did not survive; env vars given at
        create time are not kept (the template's are set again). Raises SandboxStartFailed."""
        now = time.time()
        request = SandboxRequest(
            template=template,
            alias=record.alias,
            timeout_s=max(1, int(record.end_at - now)),
            metadata=record.metadata,
            on_timeout=record.on_timeout,
            auto_resume=record.auto_resume,
            allow_internet_access=record.allow_internet_access,
            network=record.network,
        )
        async with self._boot_limiter:
            live = self._new_live(template, request.network_policy(), sandbox_id=record.sandbox_id, disk=disk)
            await self._start_guest(live)
        assert live.instance is not None
        live.record = dataclasses.replace(
            record, state=RUNNING, ended_at=None, end_reason="", console_log=str(live.instance.console_log)
        )
        try:
            await self._init_guest(live, request, now)
        except BaseException:
            live.record = None
            self._terminate(live, "initialisation after a restart failed")
            raise
        live.state = RUNNING
        live.set_deadline(trio_deadline_for(live.record.end_at))
        self.store.put_sandbox(live.record)
        self.store.add_event(live.sandbox_id, "restored", "carried over a service restart (disk kept)")
        return live.record

    async def _init_guest(self, live: LiveSandbox, request: SandboxRequest, now: float) -> None:
        assert live.envd is not None and live.record is not None
        body = {
            "envVars": {**request.template.envs, **request.env_vars},
            "accessToken": live.record.envd_access_token,
            "timestamp": rfc3339(now),
            # Guests cloned from one snapshot share its CRNG state: each gets its own seed.
            "rngSeed": secrets.token_hex(32),
            "defaultUser": request.template.user,
            "defaultWorkdir": request.template.workdir,
        }
        try:
            response = await live.envd.post("/init", json=body)
        except httpx.HTTPError as exc:
            raise SandboxStartFailed(f"guest agent /init failed: {exc!r}") from exc
        if response.status_code >= 300:
            raise SandboxStartFailed(f"guest agent /init answered {response.status_code}")

    async def _envd_metrics(self, live: LiveSandbox) -> dict[str, object]:
        assert live.envd is not None
        try:
            response = await live.envd.get("/metrics", headers=live.envd_headers(), timeout=1.0)
            data = response.json() if response.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        mapping = {
            "cpu_count": "cpuCount",
            "cpu_used_pct": "cpuUsedPct",
            "mem_used": "memUsed",
            "mem_total": "memTotal",
            "mem_cache": "memCache",
            "disk_used": "diskUsed",
            "disk_total": "diskTotal",
        }
        return {
            ours: data[theirs]
            for theirs, ours in mapping.items()
            if isinstance(data.get(theirs), int | float)
        }

    # Warm pools.

    def _claim_pooled(self, template_id: str) -> LiveSandbox | None:
        pool = self._pools.get(template_id)
        if not pool:
            return None
        # The refill starts once the claims are done (`create`): a boot competes with their /init.
        return pool.popleft()

    def pool_target(self, template: TemplateManifest) -> int:
        if self.config.pool_size >= 0:
            return self.config.pool_size
        return min(AUTO_POOL_CAP, self.memory_budget_mb // max(1, template.memory_mb))

    async def _pool_keeper(self) -> None:
        """Keep each template's pool at its target within the memory budget, booting up to
        `_refill_concurrency` guests at once (fewer while creates boot cold); woken whenever a
        guest is claimed or gone, or a cold boot ends."""
        async with trio.open_nursery() as refills:
            while True:
                self._pool_wakeup = trio.Event()
                templates = self._templates()
                for template_id, pool in list(self._pools.items()):
                    if template_id not in templates:
                        for live in list(pool):
                            self._terminate(live, "template removed")
                for template in templates.values():
                    self._pools.setdefault(template.template_id, deque())
                    while self._wants_refill(template):
                        live = self._new_live(template, _default_policy(template), background=True)
                        self._refills[template.template_id] = self._refills.get(template.template_id, 0) + 1
                        refills.start_soon(self._refill, live)
                wait_s = POOL_RETRY_DELAY_S
                held_for = self._refills_held_until - trio.current_time()
                if held_for > 0:
                    wait_s = min(wait_s, held_for)  # refills a burst of claims held back start then
                with trio.move_on_after(wait_s):
                    await self._pool_wakeup.wait()

    def _wants_refill(self, template: TemplateManifest) -> bool:
        template_id = template.template_id
        booting = self._refills.get(template_id, 0)
        pooled, target = len(self._pools[template_id]), self.pool_target(template)
        burst_answered = self._claims == 0 and trio.current_time() >= self._refills_held_until
        return (
            # Cold boots someone waits for go first: refills take the cores they leave.
            sum(self._refills.values()) + self._cold_boots < self._refill_concurrency
            # A burst of warm creates is answered first: a boot started meanwhile slows every
            # claim. Not past half the pool, though: steady creates must not starve the refills.
            and (burst_answered or pooled * 2 < target)
            and pooled + booting < target
            and trio.current_time() >= self._refill_retry_at.get(template_id, -math.inf)
            # Everything alive counts, guests still tearing down too: pools never exceed the budget.
            and self.memory_committed_mb() + template.memory_mb <= self.memory_budget_mb
        )

    async def _refill(self, live: LiveSandbox) -> None:
        """Boot one pooled guest (already holding its slot and memory) and add it to its pool."""
        template_id = live.template.template_id
        try:
            await self._start_guest(live)
            await self._wait_fully_ready(live)
            await self._probe(live)  # opens the connection its claim's /init will reuse
            if not live.ended:
                self._pools.setdefault(template_id, deque()).append(live)
        except SandboxStartFailed as exc:
            log.warning("warm pool boot for %s failed: %s", template_id, exc)
            self.store.add_event("", "pool", f"boot for {template_id} failed: {exc}")
            self._refill_retry_at[template_id] = trio.current_time() + POOL_RETRY_DELAY_S
        finally:
            self._refills[template_id] -= 1
            self._pool_wakeup.set()

    async def _until_fully_ready_or_gone(self, live: LiveSandbox) -> None:
        """Until the guest's default kernel answers, the guest is gone, or FULLY_READY_TIMEOUT_S."""
        wait = getattr(live.instance, "wait_fully_ready", None)
        if wait is None:
            return  # the runtime hands out instances only when fully ready
        with trio.move_on_after(FULLY_READY_TIMEOUT_S):
            async with trio.open_nursery() as nursery:

                async def until_gone() -> None:
                    await live.gone.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(until_gone)
                await wait()
                nursery.cancel_scope.cancel()

    async def _wait_fully_ready(self, live: LiveSandbox) -> None:
        """Until a booted guest's default kernel answers; killed (SandboxStartFailed) if it does not."""
        await self._until_fully_ready_or_gone(live)
        fully_ready = getattr(live.instance, "fully_ready", lambda: True)
        if live.gone.is_set() or not fully_ready():
            self._terminate(live, "default kernel not ready in time")
            raise SandboxStartFailed(f"guest {live.sandbox_id}: its default kernel did not become ready")

    def wake_pools(self) -> None:
        self._pool_wakeup.set()

    # Health.

    async def _health_prober(self) -> None:
        while True:
            await trio.sleep(HEALTH_INTERVAL_S)
            async with trio.open_nursery() as nursery:
                for live in list(self._live.values()):
                    if live.state in (RUNNING, POOLED) and live.instance is not None:
                        nursery.start_soon(self._probe, live)

    async def _probe(self, live: LiveSandbox) -> None:
        assert live.envd is not None
        try:
            response = await live.envd.get(
                "/health",
                headers=live.envd_headers(),
                timeout=self.config.guest_agent_timeout_s * HEALTH_TIMEOUT_SHARE,
            )
            healthy = response.status_code < 300
        except httpx.HTTPError:
            healthy = False
        if healthy or live.state == PAUSED:
            live.health_failures = 0
            return
        live.health_failures += 1
        if live.health_failures >= HEALTH_FAILURES_BEFORE_KILL:
            self._terminate(live, "guest agent unresponsive")
            _log_death(live, read_console_tail(live.instance.console_log) if live.instance else "")
