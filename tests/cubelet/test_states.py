"""The sandbox lifecycle as a state machine: every allowed transition, every refused one, and
the paths real guests take through it (runtime double)."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import pytest
import trio
from cubelets import request_for, running_cubelet, wait_until

from appliance.config import Config
from appliance.cubelet.cubelet import Cubelet, SandboxNotFound, SandboxStartFailed
from appliance.cubelet.sandboxes import LiveSandbox, SandboxTable, template_network_policy
from appliance.cubelet.state import TRANSITIONS, IllegalTransition, SandboxState
from appliance.master.templates import TemplateRegistry
from appliance.records import DEAD, PAUSED, RUNNING, SandboxRecord

if TYPE_CHECKING:
    from conftest import FakeRuntime

S = SandboxState

# What each allowed transition of a user's sandbox leaves in the store: (event kind, record
# state); None: nothing (the guest is nobody's sandbox, or the sandbox is already recorded dead).
EXPECTED: dict[tuple[SandboxState, SandboxState], tuple[str, str] | None] = {
    (S.BOOTING, S.READY): None,
    (S.BOOTING, S.ENDING): None,
    (S.BOOTING, S.FAILED): None,
    (S.READY, S.RUNNING): ("created", RUNNING),
    (S.READY, S.ENDING): None,
    (S.RUNNING, S.PAUSED): ("paused", PAUSED),
    (S.RUNNING, S.ENDING): ("dead", DEAD),
    (S.PAUSED, S.RUNNING): ("resumed", RUNNING),
    (S.PAUSED, S.ENDING): ("dead", DEAD),
    (S.ENDING, S.ENDED): None,
    (S.RUNNING, S.DETACHED): None,  # it runs on: its record still says so
    (S.PAUSED, S.DETACHED): None,
    (S.ADOPTING, S.RUNNING): ("adopted", RUNNING),
    (S.ADOPTING, S.PAUSED): ("adopted", PAUSED),
    (S.ADOPTING, S.ENDING): ("dead", DEAD),
}
REFUSED = [(old, new) for old in S for new in S if (old, new) not in EXPECTED]


def record_for(live: LiveSandbox) -> SandboxRecord:
    now = time.time()
    return SandboxRecord(
        sandbox_id=live.sandbox_id,
        template_id=live.template.template_id,
        alias=None,
        client_id="c",
        state=RUNNING,
        started_at=now,
        end_at=now + 60,
        cpu_count=1,
        memory_mb=live.template.memory_mb,
        disk_size_mb=1,
        envd_access_token="token",
    )


def guest_in(table: SandboxTable, state: SandboxState) -> LiveSandbox:
    """A guest put straight into `state` (a user's sandbox, with a record, where it would be one)."""
    template = TemplateRegistry(table.config, table.store).refresh()["code-interpreter"]
    live = table.add(template, template_network_policy(template))
    live.state = state
    if state in (S.RUNNING, S.PAUSED, S.ENDING, S.ADOPTING, S.DETACHED):
        live.record = record_for(live)
    return live


def test_the_table_is_the_documented_machine() -> None:
    allowed = {(old, new) for old, successors in TRANSITIONS.items() for new in successors}
    assert allowed == set(EXPECTED)
    assert set(TRANSITIONS) == set(S)
    # The states users see are the store's record states, by value.
    assert (S.RUNNING, S.PAUSED) == (RUNNING, PAUSED)


@pytest.mark.parametrize(("old", "new"), list(EXPECTED))
def test_every_allowed_transition_is_made_and_recorded(
    table: SandboxTable, old: SandboxState, new: SandboxState
) -> None:
    live = guest_in(table, old)
    record = record_for(live) if (old, new) == (S.READY, S.RUNNING) else None
    table.transition(live, new, "why", record=record)
    assert live.state is new
    stored = table.store.get_sandbox(live.sandbox_id)
    events = [(e.kind, e.message) for e in table.store.events(live.sandbox_id)]
    expected = EXPECTED[(old, new)]
    if expected is None:
        assert events == [] and stored is None
    else:
        kind, record_state = expected
        assert events == [(kind, "why")]
        assert stored is not None and stored.state == record_state
        if record_state == DEAD:
            assert stored.end_reason == "why" and stored.ended_at is not None


@pytest.mark.parametrize(("old", "new"), REFUSED)
def test_every_other_transition_is_refused(table: SandboxTable, old: SandboxState, new: SandboxState) -> None:
    live = guest_in(table, old)
    with pytest.raises(IllegalTransition, match=f"from {old} to {new}"):
        table.transition(live, new, "why")
    assert live.state is old
    assert table.store.events(live.sandbox_id) == []
    assert table.store.get_sandbox(live.sandbox_id) is None


def test_forget_frees_the_slot_and_ends_in_ended_or_failed(table: SandboxTable) -> None:
    booting, running = guest_in(table, S.BOOTING), guest_in(table, S.RUNNING)
    table.forget(booting)
    table.forget(running)
    assert (booting.state, running.state) == (S.FAILED, S.ENDED)
    assert booting.gone.is_set() and running.gone.is_set()
    assert booting.sandbox_id not in table and running.sandbox_id not in table
    assert table.memory_committed_mb() == 0
    stored = table.store.get_sandbox(running.sandbox_id)
    assert stored is not None and stored.state == DEAD and stored.end_reason == "killed"


def record_transitions(cubelet: Cubelet) -> list[tuple[str, SandboxState, SandboxState]]:
    """Every transition the cubelet makes from now on, as (sandbox id, old, new)."""
    seen: list[tuple[str, SandboxState, SandboxState]] = []
    pools_listener = cubelet.sandboxes._on_change

    def listener(live: LiveSandbox, old: SandboxState) -> None:
        seen.append((live.sandbox_id, old, live.state))
        pools_listener(live, old)

    cubelet.sandboxes._on_change = listener
    return seen


def path_of(seen: list[tuple[str, SandboxState, SandboxState]], sandbox_id: str) -> list[SandboxState]:
    steps = [(old, new) for sid, old, new in seen if sid == sandbox_id]
    return [steps[0][0], *(new for _, new in steps)]


async def test_a_sandbox_walks_the_machine(service_config: Config, fake_runtime: FakeRuntime) -> None:
    async with running_cubelet(service_config, fake_runtime) as cubelet:
        seen = record_transitions(cubelet)
        record = await cubelet.create(request_for(cubelet))
        live = cubelet.live(record.sandbox_id)
        assert live is not None and live.state is S.RUNNING
        assert await cubelet.pause(record.sandbox_id)
        assert not await cubelet.pause(record.sandbox_id)  # already paused: no transition
        await cubelet.connect(record.sandbox_id, 60)
        assert await cubelet.kill(record.sandbox_id)
        await live.gone.wait()
        assert path_of(seen, record.sandbox_id) == [
            S.BOOTING, S.READY, S.RUNNING, S.PAUSED, S.RUNNING, S.ENDING, S.ENDED
        ]  # fmt: skip
        events = [e.kind for e in cubelet.store.events(record.sandbox_id)]
        assert events == ["created", "paused", "resumed", "dead"]


async def test_a_failed_boot_ends_in_failed_and_leaves_no_record(
    service_config: Config, fake_runtime: FakeRuntime
) -> None:
    async with running_cubelet(service_config, fake_runtime) as cubelet:
        seen = record_transitions(cubelet)
        fake_runtime.fail_next_boot = True
        with pytest.raises(SandboxStartFailed, match="fake boot failure"):
            await cubelet.create(request_for(cubelet))
        ((sandbox_id, old, new),) = seen
        assert (old, new) == (S.BOOTING, S.FAILED)
        assert sandbox_id not in cubelet.sandboxes
        assert cubelet.store.get_sandbox(sandbox_id) is None and cubelet.store.events(sandbox_id) == []


async def test_a_pooled_guest_is_ready_until_claimed(
    service_config: Config, fake_runtime: FakeRuntime
) -> None:
    config = dataclasses.replace(service_config, pool_size=1)
    async with running_cubelet(config, fake_runtime) as cubelet:
        seen = record_transitions(cubelet)
        await wait_until(lambda: cubelet.pooled_count("code-interpreter") == 1)
        (pooled,) = cubelet.pools.ready("code-interpreter")
        assert pooled.state is S.READY and cubelet.live(pooled.sandbox_id) is None
        assert cubelet.live_count("code-interpreter") == 0
        record = await cubelet.create(request_for(cubelet))
        assert record.sandbox_id == pooled.sandbox_id
        assert path_of(seen, pooled.sandbox_id) == [S.BOOTING, S.READY, S.RUNNING]
        assert cubelet.live_count("code-interpreter") == 1


async def test_a_kill_during_a_pause_wins(service_config: Config, fake_runtime: FakeRuntime) -> None:
    """A pause that finds its sandbox killed meanwhile reports it gone; nothing is recorded paused."""
    async with running_cubelet(service_config, fake_runtime) as cubelet:
        record = await cubelet.create(request_for(cubelet))
        instance = fake_runtime.instances[record.sandbox_id]
        pausing = trio.Event()
        freeze = instance.pause

        async def slow_pause() -> None:
            pausing.set()
            await trio.sleep(0.3)
            await freeze()

        instance.pause = slow_pause  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:

            async def kill_while_pausing() -> None:
                await pausing.wait()
                assert await cubelet.kill(record.sandbox_id)

            nursery.start_soon(kill_while_pausing)
            with pytest.raises(SandboxNotFound):
                await cubelet.pause(record.sandbox_id)
        stored = cubelet.store.get_sandbox(record.sandbox_id)
        assert stored is not None and stored.state == DEAD and stored.end_reason == "killed"
        assert [e.kind for e in cubelet.store.events(record.sandbox_id)] == ["created", "dead"]
