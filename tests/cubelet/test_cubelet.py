"""The cubelet with the runtime double: deadlines, auto-pause, warm pools, crashes, health."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import trio
from cubelets import next_pooled, request_for, running_cubelet, slot_of, wait_until

from appliance.config import Config
from appliance.cubelet import capacity as capacity_module
from appliance.cubelet import health as health_module
from appliance.cubelet import lifecycle as lifecycle_module
from appliance.cubelet import pools as pools_module
from appliance.cubelet.cubelet import Cubelet, SandboxRequest, SandboxStartFailed
from appliance.net.policy import NetworkPolicy
from appliance.records import DEAD, PAUSED, RUNNING, SandboxQuery, SandboxRecord

if TYPE_CHECKING:
    from conftest import FakeRuntime


async def test_deadline_kills_and_set_timeout_moves_it(
    service_config: Config, fake_runtime: FakeRuntime
) -> None:
    async with running_cubelet(service_config, fake_runtime) as cubelet:
        short = await cubelet.create(request_for(cubelet, timeout_s=1))
        extended = await cubelet.create(request_for(cubelet, timeout_s=1))
        cubelet.set_timeout(extended.sandbox_id, 30)
        await wait_until(lambda: cubelet.live(short.sandbox_id) is None)
        await trio.sleep(0.5)
        assert cubelet.live(extended.sandbox_id) is not None
        record = cubelet.store.get_sandbox(short.sandbox_id)
        assert record is not None and record.state == DEAD and record.end_reason == "timeout"
        assert short.sandbox_id not in fake_runtime.instances  # the guest was torn down
        assert not (service_config.sandboxes_dir / short.sandbox_id).exists()


async def test_auto_pause_on_timeout_and_resume(service_config: Config, fake_runtime: FakeRuntime) -> None:
    async with running_cubelet(service_config, fake_runtime) as cubelet:
        record = await cubelet.create(request_for(cubelet, timeout_s=1, on_timeout="pause"))
        await wait_until(lambda: record.state == PAUSED)
        assert fake_runtime.instances[record.sandbox_id].paused_count == 1
        assert cubelet.live(record.sandbox_id) is not None  # paused, not killed
        resumed, was_paused = await cubelet.connect(record.sandbox_id, 60)
        assert was_paused and resumed.state == RUNNING
        events = [e.kind for e in cubelet.store.events(record.sandbox_id)]
        assert events == ["created", "paused", "resumed"]


async def test_guest_crash_is_recorded(service_config: Config, fake_runtime: FakeRuntime) -> None:
    async with running_cubelet(service_config, fake_runtime) as cubelet:
        record = await cubelet.create(request_for(cubelet))
        fake_runtime.instances[record.sandbox_id].crash.set()
        await wait_until(lambda: cubelet.live(record.sandbox_id) is None)
        stored = cubelet.store.get_sandbox(record.sandbox_id)
        assert stored is not None and stored.state == DEAD
        assert stored.end_reason == "guest exited: kernel panic (simulated)"


async def test_unhealthy_guest_is_killed(
    service_config: Config,
    fake_runtime: FakeRuntime,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(health_module, "HEALTH_INTERVAL_S", 0.05)
    async with running_cubelet(service_config, fake_runtime) as cubelet:
        record = await cubelet.create(request_for(cubelet))
        fake_runtime.instances[record.sandbox_id].app.healthy = False
        await wait_until(lambda: cubelet.live(record.sandbox_id) is None)
        stored = cubelet.store.get_sandbox(record.sandbox_id)
        assert stored is not None and stored.end_reason == "guest agent unresponsive"
    # The service log says so too (the operator's trace, as for a guest that exits).
    assert f"sandbox {record.sandbox_id} is dead: guest agent unresponsive" in caplog.text


async def test_slow_agent_is_given_the_configured_time(
    service_config: Config, fake_runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """guest_agent_timeout_s bounds /init and (a fifth of it) each health probe: agents answering
    in 0.5 s are fine with 5 s (1 s per probe) and count as hung with 1 s (0.2 s per probe)."""
    monkeypatch.setattr(health_module, "HEALTH_INTERVAL_S", 0.05)
    fake_runtime.answer_delay_s = 0.5
    patient = dataclasses.replace(service_config, guest_agent_timeout_s=5)
    async with running_cubelet(patient, fake_runtime) as cubelet:
        record = await cubelet.create(request_for(cubelet))  # its /init took 0.5 s
        await trio.sleep(2.0)  # probes answered in 0.5 s all along
        assert cubelet.live(record.sandbox_id) is not None
    hasty = dataclasses.replace(service_config, guest_agent_timeout_s=1)
    async with running_cubelet(hasty, fake_runtime) as cubelet:
        record = await cubelet.create(request_for(cubelet))  # /init: 0.5 s of 1 s
        await wait_until(lambda: cubelet.live(record.sandbox_id) is None)
        stored = cubelet.store.get_sandbox(record.sandbox_id)
        assert stored is not None and stored.end_reason == "guest agent unresponsive"


async def test_warm_pool_claim_inits_guest_and_tops_up(
    service_config: Config, fake_runtime: FakeRuntime
) -> None:
    config = dataclasses.replace(service_config, pool_size=1)
    async with running_cubelet(config, fake_runtime) as cubelet:
        await wait_until(lambda: cubelet.pooled_count("code-interpreter") == 1)
        assert fake_runtime.boots == 1
        pooled_id = next_pooled(cubelet)
        record = await cubelet.create(request_for(cubelet, env_vars={"A": "b"}))
        assert record.sandbox_id == pooled_id  # claimed, not booted
        init = fake_runtime.instances[record.sandbox_id].app.init_calls
        assert len(init) == 1 and init[0]["envVars"] == {"TEMPLATE_VAR": "1", "A": "b"}
        assert init[0]["accessToken"] == record.envd_access_token
        assert init[0]["defaultUser"] == "user"
        # The pooled guest answered to its boot token until the claim's /init, to the sandbox's after.
        instance = fake_runtime.instances[record.sandbox_id]
        calls = instance.app.access_tokens
        claim = calls.index(("/init", instance.agent_token))
        assert len(instance.agent_token) == 32 and instance.agent_token != record.envd_access_token
        assert {token for _path, token in calls[:claim]} == {instance.agent_token}
        await cubelet.metrics(record.sandbox_id)
        after = {token for _path, token in calls[claim + 1 :]}
        assert after == {record.envd_access_token}
        await wait_until(lambda: cubelet.pooled_count("code-interpreter") == 1)
        assert fake_runtime.boots == 2
        # Pooled guests are not sandboxes: invisible to lookups and the store.
        assert [r.sandbox_id for r in cubelet.store.query_sandboxes(SandboxQuery())] == [record.sandbox_id]


async def test_pools_stay_within_the_memory_budget(service_config: Config, fake_runtime: FakeRuntime) -> None:
    # The template needs 256 MB: a 600 MB budget holds two guests, whatever pool_size says.
    config = dataclasses.replace(service_config, pool_size=5, memory_budget_mb=600)
    async with running_cubelet(config, fake_runtime) as cubelet:
        await wait_until(lambda: cubelet.pooled_count("code-interpreter") == 2)
        await cubelet.create(request_for(cubelet))
        await trio.sleep(0.3)
        assert cubelet.pooled_count("code-interpreter") == 1
        assert cubelet.memory_committed_mb() <= 600


async def test_freed_slots_rest_before_reuse(service_config: Config, fake_runtime: FakeRuntime) -> None:
    # A slot is the sandbox's host address: reusing it at once would hand the new
    # guest the dead one's keep-alive connections. Slots rotate, then wrap.
    config = dataclasses.replace(service_config, host_network="10.250.0.0/28")  # 4 /30s: 3 slots
    async with running_cubelet(config, fake_runtime) as cubelet:
        first = await cubelet.create(request_for(cubelet))
        second = await cubelet.create(request_for(cubelet))
        assert [slot_of(cubelet, s.sandbox_id) for s in (first, second)] == [0, 1]
        await cubelet.kill(first.sandbox_id)
        third = await cubelet.create(request_for(cubelet))
        assert slot_of(cubelet, third.sandbox_id) == 2
        await cubelet.kill(second.sandbox_id)
        fourth = await cubelet.create(request_for(cubelet))
        assert slot_of(cubelet, fourth.sandbox_id) == 0  # wrapped; slot 1 rests longest
        fifth = await cubelet.create(request_for(cubelet))
        assert slot_of(cubelet, fifth.sandbox_id) == 1
        with pytest.raises(SandboxStartFailed, match="slots are in use"):
            await cubelet.create(request_for(cubelet))


async def test_failed_guest_init_kills_the_guest(service_config: Config, fake_runtime: FakeRuntime) -> None:
    async with running_cubelet(service_config, fake_runtime) as cubelet:
        fake_runtime.fail_init = True
        with pytest.raises(SandboxStartFailed, match="/init answered 500"):
            await cubelet.create(request_for(cubelet))
        await wait_until(lambda: not fake_runtime.instances)
        assert cubelet.store.query_sandboxes(SandboxQuery()) == []


async def test_warm_instance_that_fails_init_falls_back_to_cold_boot(
    service_config: Config, fake_runtime: FakeRuntime
) -> None:
    config = dataclasses.replace(service_config, pool_size=1)
    fake_runtime.fail_init = True
    async with running_cubelet(config, fake_runtime) as cubelet:
        await wait_until(lambda: cubelet.pooled_count("code-interpreter") == 1)
        broken = next_pooled(cubelet)
        fake_runtime.fail_init = False
        record = await cubelet.create(request_for(cubelet))
        assert record.sandbox_id != broken
        await wait_until(lambda: broken not in fake_runtime.instances)


async def test_temporary_guest_for_template_builds(service_config: Config, fake_runtime: FakeRuntime) -> None:
    async with running_cubelet(service_config, fake_runtime) as cubelet:
        template = cubelet._templates()["code-interpreter"]
        async with cubelet.temporary_guest(template) as instance:
            assert instance.sandbox_id in fake_runtime.instances
            assert cubelet.live(instance.sandbox_id) is None  # not a sandbox
        assert instance.sandbox_id not in fake_runtime.instances
        assert cubelet.store.get_sandbox(instance.sandbox_id) is None


async def test_a_failing_runtime_kills_one_sandbox_not_the_node(
    service_config: Config, fake_runtime: FakeRuntime
) -> None:
    async with running_cubelet(service_config, fake_runtime) as cubelet:
        broken = await cubelet.create(request_for(cubelet, timeout_s=1, on_timeout="pause"))
        healthy = await cubelet.create(request_for(cubelet))

        async def pause_fails() -> None:
            raise OSError("mconsole went away")

        fake_runtime.instances[broken.sandbox_id].pause = pause_fails  # type: ignore[method-assign]
        await wait_until(lambda: cubelet.live(broken.sandbox_id) is None)
        stored = cubelet.store.get_sandbox(broken.sandbox_id)
        assert stored is not None and "mconsole went away" in stored.end_reason
        assert cubelet.live(healthy.sandbox_id) is not None
        assert (await cubelet.create(request_for(cubelet))).state == RUNNING


class KernelGatedRuntime:
    """The runtime double, with instances whose default kernel is up only once `kernel_up` is set
    (what UmlInstance reports through CUBE-INTERPRETER-READY)."""

    name = "fake"

    def __init__(self, inner: FakeRuntime) -> None:
        self.inner = inner
        self.kernel_up = trio.Event()

    async def run(self, spec: object, *, task_status: trio.TaskStatus[object]) -> None:
        gate = self.kernel_up

        class Status:
            def started(self, instance: object) -> None:
                instance.wait_fully_ready = gate.wait  # type: ignore[attr-defined]
                instance.fully_ready = gate.is_set  # type: ignore[attr-defined]
                task_status.started(instance)

        await self.inner.run(spec, task_status=Status())  # type: ignore[arg-type]


async def test_pool_holds_only_fully_ready_guests_and_cold_creates_do_not_wait(
    service_config: Config, fake_runtime: FakeRuntime
) -> None:
    runtime = KernelGatedRuntime(fake_runtime)
    config = dataclasses.replace(service_config, pool_size=1)
    async with running_cubelet(config, runtime) as cubelet:  # type: ignore[arg-type]
        await wait_until(lambda: fake_runtime.boots == 1)
        await trio.sleep(0.3)
        assert cubelet.pooled_count("code-interpreter") == 0  # booted, kernel still starting
        # Not claimable yet: a create boots cold and returns once envd answers.
        record = await cubelet.create(request_for(cubelet))
        assert fake_runtime.boots == 2 and cubelet.live(record.sandbox_id) is not None
        runtime.kernel_up.set()
        await wait_until(lambda: cubelet.pooled_count("code-interpreter") == 1)
        pooled_id = next_pooled(cubelet)
        assert (await cubelet.create(request_for(cubelet))).sandbox_id == pooled_id


async def test_pooled_guest_whose_kernel_never_starts_is_killed(
    service_config: Config, fake_runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lifecycle_module, "FULLY_READY_TIMEOUT_S", 0.3)
    monkeypatch.setattr(pools_module, "POOL_RETRY_DELAY_S", 60)
    runtime = KernelGatedRuntime(fake_runtime)
    config = dataclasses.replace(service_config, pool_size=1)
    async with running_cubelet(config, runtime) as cubelet:  # type: ignore[arg-type]
        await wait_until(lambda: fake_runtime.boots == 1)
        await wait_until(lambda: not fake_runtime.instances)  # killed after the timeout
        assert cubelet.pooled_count("code-interpreter") == 0


class CountingNetwork:
    """Stands in for CubeVS's policy service: counts per sandbox like its eBPF maps do."""

    def __init__(self) -> None:
        self.policies: dict[str, NetworkPolicy] = {}

    async def update_policy(self, sandbox_id: str, policy: NetworkPolicy) -> None:
        self.policies[sandbox_id] = policy

    def counters(self, sandbox_id: str) -> dict[str, int]:
        return {"allowed_packets": 7, "dropped_packets": 2} if sandbox_id in self.policies else {}


async def test_network_counters_reach_metrics(service_config: Config, fake_runtime: FakeRuntime) -> None:
    network = CountingNetwork()
    async with running_cubelet(service_config, fake_runtime, network) as cubelet:
        sandbox = await cubelet.create(request_for(cubelet))
        await cubelet.update_network(sandbox.sandbox_id, NetworkPolicy(allow_internet_access=False))
        sample = await cubelet.metrics(sandbox.sandbox_id)
        assert sample["network"] == {"allowed_packets": 7, "dropped_packets": 2}
        assert cubelet.network_counters(sandbox.sandbox_id)["dropped_packets"] == 2
        await cubelet.kill(sandbox.sandbox_id)
        assert cubelet.network_counters(sandbox.sandbox_id) == {}


class SlowRuntime:
    """The runtime double with boots that take a moment (counted while they overlap) and a
    teardown that waits for `teardown_done` (a UML guest takes its time to die)."""

    name = "fake"

    def __init__(self, inner: FakeRuntime) -> None:
        self.inner = inner
        self.teardown_done = trio.Event()
        self.booting = 0
        self.most_booting_at_once = 0
        self.tearing_down = 0

    async def run(self, spec: object, *, task_status: trio.TaskStatus[object]) -> None:
        runtime = self
        runtime.booting += 1
        runtime.most_booting_at_once = max(runtime.most_booting_at_once, runtime.booting)

        class Status:
            def started(self, instance: object) -> None:
                runtime.booting -= 1
                task_status.started(instance)

        try:
            await trio.sleep(0.05)
            await self.inner.run(spec, task_status=Status())  # type: ignore[arg-type]
        finally:
            with trio.CancelScope(shield=True):
                self.tearing_down += 1
                await self.teardown_done.wait()
                self.tearing_down -= 1


async def test_kill_answers_before_the_teardown_and_holds_the_slot_until_it_ends(
    service_config: Config, fake_runtime: FakeRuntime
) -> None:
    runtime = SlowRuntime(fake_runtime)
    config = dataclasses.replace(service_config, host_network="10.250.0.0/28")  # 3 slots
    async with running_cubelet(config, runtime) as cubelet:  # type: ignore[arg-type]
        first = await cubelet.create(request_for(cubelet))
        second = await cubelet.create(request_for(cubelet))
        committed = cubelet.memory_committed_mb()
        with trio.fail_after(5):
            assert await cubelet.kill(first.sandbox_id)
        # Gone for its users at once: not found, not running, recorded dead...
        assert cubelet.live(first.sandbox_id) is None
        assert not await cubelet.kill(first.sandbox_id)
        stored = cubelet.store.get_sandbox(first.sandbox_id)
        assert stored is not None and stored.state == DEAD
        assert cubelet.live_count("code-interpreter") == 1
        # ...but still tearing down: its slot and memory are not handed out again.
        await trio.sleep(0.2)
        assert runtime.tearing_down == 1
        assert cubelet.memory_committed_mb() == committed
        third = await cubelet.create(request_for(cubelet))
        assert slot_of(cubelet, third.sandbox_id) == 2
        with pytest.raises(SandboxStartFailed, match="slots are in use"):
            await cubelet.create(request_for(cubelet))
        runtime.teardown_done.set()
        await wait_until(lambda: first.sandbox_id not in cubelet.sandboxes)
        fourth = await cubelet.create(request_for(cubelet))
        assert slot_of(cubelet, fourth.sandbox_id) == 0  # free once its teardown ended
        assert cubelet.live(second.sandbox_id) is not None


async def test_auto_sized_pool_fills_to_the_memory_budget_one_boot_at_a_time_until_creates_come(
    service_config: Config, fake_runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    runtime = SlowRuntime(fake_runtime)
    runtime.teardown_done.set()
    # 256 MB guests in a 1800 MB budget: 7 fit; a create then takes one, the pool refills
    # only as far as the budget allows.
    config = dataclasses.replace(service_config, pool_size=-1, memory_budget_mb=1800)
    async with running_cubelet(config, runtime) as cubelet:  # type: ignore[arg-type]
        assert cubelet.pool_state("code-interpreter")["target"] == 7
        await wait_until(lambda: cubelet.pooled_count("code-interpreter") == 7)
        assert runtime.most_booting_at_once == 1  # nobody creates yet: one refill at a time
        assert cubelet.pool_state("code-interpreter") == {"target": 7, "ready": 7, "booting": 0}
        created = [await cubelet.create(request_for(cubelet)) for _ in range(3)]
        await trio.sleep(0.3)
        assert cubelet.pool_state("code-interpreter") == {"target": 7, "ready": 4, "booting": 0}
        assert cubelet.memory_committed_mb() <= 1800
        runtime.most_booting_at_once = 0
        for sandbox in created:  # their memory comes back: the refills now run on every core
            await cubelet.kill(sandbox.sandbox_id)
        await wait_until(lambda: cubelet.pooled_count("code-interpreter") == 7)
        assert runtime.most_booting_at_once == 3


async def test_auto_sized_pool_is_capped_per_core(
    service_config: Config, fake_runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    config = dataclasses.replace(service_config, pool_size=-1, memory_budget_mb=1 << 20)
    async with running_cubelet(config, fake_runtime) as cubelet:
        assert cubelet.pool_state("code-interpreter")["target"] == pools_module.AUTO_POOL_DEPTH_PER_CORE
        await wait_until(
            lambda: cubelet.pooled_count("code-interpreter") == pools_module.AUTO_POOL_DEPTH_PER_CORE
        )


async def test_a_claim_changes_the_network_policy_only_when_the_request_asks_for_another(
    service_config: Config, fake_runtime: FakeRuntime
) -> None:
    network = CountingNetwork()
    config = dataclasses.replace(service_config, pool_size=1)
    async with running_cubelet(config, fake_runtime, network) as cubelet:
        await wait_until(lambda: cubelet.pooled_count("code-interpreter") == 1)
        default = await cubelet.create(request_for(cubelet))
        assert network.policies == {}  # the pooled guest already runs the template's default policy
        await wait_until(lambda: cubelet.pooled_count("code-interpreter") == 1)
        pooled_id = next_pooled(cubelet)
        no_internet = NetworkPolicy(allow_internet_access=False)
        closed = await cubelet.create(request_for(cubelet, network=no_internet))
        assert closed.sandbox_id == pooled_id
        assert network.policies == {closed.sandbox_id: no_internet}
        assert default.sandbox_id not in network.policies


async def test_refills_wait_until_a_burst_of_claims_is_answered(
    service_config: Config, fake_runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capacity_module, "REFILL_QUIET_S", 3600.0)
    config = dataclasses.replace(service_config, pool_size=4)
    async with running_cubelet(config, fake_runtime) as cubelet:
        await wait_until(lambda: cubelet.pooled_count("code-interpreter") == 4)
        await cubelet.create(request_for(cubelet))
        await cubelet.create(request_for(cubelet))
        await trio.sleep(0.3)
        assert fake_runtime.boots == 4  # both claims were answered and no refill started
        cubelet.capacity._refills_held_until = -math.inf  # the quiet period is over
        cubelet.wake_pools()
        await wait_until(lambda: cubelet.pooled_count("code-interpreter") == 4)
        assert fake_runtime.boots == 6


async def test_steady_claims_do_not_starve_the_refills_past_half_the_pool(
    service_config: Config, fake_runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capacity_module, "REFILL_QUIET_S", 3600.0)  # claims never go quiet
    config = dataclasses.replace(service_config, pool_size=4)
    async with running_cubelet(config, fake_runtime) as cubelet:
        await wait_until(lambda: cubelet.pooled_count("code-interpreter") == 4)
        for _ in range(3):
            await cubelet.create(request_for(cubelet))
        # One guest left of four: the hold gives way and the pool refills to half and beyond.
        await wait_until(lambda: cubelet.pooled_count("code-interpreter") >= 2)
        assert fake_runtime.boots >= 5


async def test_init_reuses_the_connection_the_pool_opened_and_kill_closes_it(
    service_config: Config, fake_runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Which client connection each guest request came on (the fake guest is an ASGI app).
    guest_app = fake_runtime.run.__globals__["FakeGuestApp"]
    serve = guest_app.__call__
    requests: list[tuple[str, object]] = []

    async def recording(app: object, scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] == "http":
            requests.append((str(scope["path"]), scope["client"]))
        await serve(app, scope, receive, send)

    monkeypatch.setattr(guest_app, "__call__", recording)
    monkeypatch.setattr(health_module, "HEALTH_INTERVAL_S", 3600.0)  # no probes but the pool's own
    config = dataclasses.replace(service_config, pool_size=1)
    async with running_cubelet(config, fake_runtime) as cubelet:
        await wait_until(lambda: cubelet.pooled_count("code-interpreter") == 1)
        live = cubelet.pools.ready("code-interpreter")[0]
        record = await cubelet.create(request_for(cubelet))
        assert record.sandbox_id == live.sandbox_id
        (health, init) = requests[:2]
        assert (health[0], init[0]) == ("/health", "/init")
        assert init[1] == health[1]  # same client address and port: one connection
        assert live.agent is not None
        await cubelet.kill(record.sandbox_id)
        await live.gone.wait()
        assert live.agent.is_closed


def _with_service_probe(cubelet: Cubelet) -> SandboxRequest:
    """A create of a template whose own service (its probe: GET /service on port 8080) must answer."""
    template = dataclasses.replace(
        cubelet._templates()["code-interpreter"], probe_port=8080, probe_path="/service"
    )
    return request_for(cubelet, template=template)


async def test_a_cold_create_returns_once_the_templates_service_answers(
    service_config: Config, fake_runtime: FakeRuntime
) -> None:
    fake_runtime.service_up = False  # the agent answers at once, the template's service not yet
    async with running_cubelet(service_config, fake_runtime) as cubelet:
        created: list[SandboxRecord] = []

        async def create() -> None:
            created.append(await cubelet.create(_with_service_probe(cubelet)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(create)
            await wait_until(lambda: len(fake_runtime.instances) == 1)
            await trio.sleep(0.5)
            assert created == []  # the agent answered, the service did not: not handed out yet
            next(iter(fake_runtime.instances.values())).app.service_up = True
        assert created[0].state == RUNNING and cubelet.live(created[0].sandbox_id) is not None


def _with_ready_command(cubelet: Cubelet) -> SandboxRequest:
    """A create of a template whose ready command (the SDKs' readyCmd) must succeed first."""
    template = dataclasses.replace(cubelet._templates()["code-interpreter"], ready_cmd="check-ready")
    return request_for(cubelet, template=template)


@pytest.mark.parametrize(
    ("timeout_name", "gated_request", "refusal"),
    [
        ("TEMPLATE_PROBE_TIMEOUT_S", _with_service_probe, "did not answer"),
        ("READY_CMD_TIMEOUT_S", _with_ready_command, "ready command 'check-ready' did not succeed"),
    ],
    ids=["template-service", "ready-command"],
)
async def test_a_readiness_gate_that_never_passes_fails_the_create(
    service_config: Config,
    fake_runtime: FakeRuntime,
    monkeypatch: pytest.MonkeyPatch,
    timeout_name: str,
    gated_request: Callable[[Cubelet], SandboxRequest],
    refusal: str,
) -> None:
    """The template's service never answers / its ready command never succeeds: the create
    fails saying so, and the guest is torn down with no record left."""
    monkeypatch.setattr(lifecycle_module, timeout_name, 0.5)
    fake_runtime.service_up = False
    async with running_cubelet(service_config, fake_runtime) as cubelet:
        with pytest.raises(SandboxStartFailed, match=refusal):
            await cubelet.create(gated_request(cubelet))
        await wait_until(lambda: fake_runtime.instances == {})  # the guest was torn down
        assert cubelet.store.query_sandboxes(SandboxQuery()) == []


async def test_a_cold_create_returns_once_the_ready_command_succeeds(
    service_config: Config, fake_runtime: FakeRuntime
) -> None:
    fake_runtime.service_up = False  # the ready command fails until the service is up
    async with running_cubelet(service_config, fake_runtime) as cubelet:
        request = _with_ready_command(cubelet)
        created: list[SandboxRecord] = []

        async def create() -> None:
            created.append(await cubelet.create(request))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(create)
            await wait_until(lambda: len(fake_runtime.instances) == 1)
            app = next(iter(fake_runtime.instances.values())).app
            await wait_until(lambda: len(app.processes) >= 2)  # it runs again while it fails
            assert created == []  # the agent answered, the ready command did not succeed: not handed out
            app.service_up = True
        assert created[0].state == RUNNING and cubelet.live(created[0].sandbox_id) is not None
        argv, user, token = app.processes[-1]
        # As the template's user, with the guest's boot token (before /init).
        assert (argv, user) == (["/bin/sh", "-c", "check-ready"], request.template.user)
        assert token is not None and app.init_calls and token != app.init_calls[0]["accessToken"]
