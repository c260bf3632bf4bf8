"""BootCapacity: the counts that decide how many guests boot at once follow the context managers
that hold them, however those end (an error, a cancellation), and every end wakes the pools."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from appliance.cubelet.capacity import REFILL_QUIET_S, BootCapacity


class Wakes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


async def test_cold_boots_take_the_cores_first_and_give_them_back_however_they_end() -> None:
    wakes = Wakes()
    capacity = BootCapacity(2, on_release=wakes)
    with capacity.refill("t"):
        assert capacity.refilling("t") == 1 and capacity.refill_allowed()
        with pytest.raises(RuntimeError):
            async with capacity.cold_boot():
                assert not capacity.refill_allowed()  # one refill + one cold boot: both cores
                raise RuntimeError("the boot failed")
        assert capacity.refill_allowed() and wakes.count == 1
        with trio.move_on_after(0.05):
            async with capacity.cold_boot():
                await trio.sleep_forever()
        assert capacity.refill_allowed() and wakes.count == 2
    assert capacity.refilling("t") == 0 and wakes.count == 3


async def test_cold_boots_beyond_the_limit_wait_and_count_while_they_wait() -> None:
    capacity = BootCapacity(1, on_release=lambda: None)  # a limit of two cold boots, one refill core
    running, third_in = 0, trio.Event()
    release = trio.Event()

    async def boot(is_third: bool = False) -> None:
        nonlocal running
        async with capacity.cold_boot():
            running += 1
            if is_third:
                third_in.set()
            await release.wait()
            running -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(boot)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(boot, True)
        await trio.testing.wait_all_tasks_blocked()
        assert running == 2 and not third_in.is_set()  # the third waits for the limiter
        assert not capacity.refill_allowed()
        release.set()
    assert third_in.is_set() and capacity.refill_allowed()


async def test_claims_hold_refills_until_they_have_been_quiet_for_a_while() -> None:
    capacity = BootCapacity(2, on_release=lambda: None)
    assert capacity.claims_quiet_in() == 0
    with capacity.claim():
        assert capacity.claims_quiet_in() == math.inf
    assert 0 < capacity.claims_quiet_in() <= REFILL_QUIET_S
