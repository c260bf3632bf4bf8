"""Health: every guest whose agent should answer is asked `/health` now and then; one that
does not answer HEALTH_FAILURES_BEFORE_KILL times in a row is killed.

The probes go over the guest's own client (`GuestAgent`), so they also keep open the
connection a warm guest's claim sends its `/init` on. Paused guests cannot answer
and are not asked; a probe that was in flight when its guest paused, or while a pause,
resume or snapshot held it stopped, does not count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from appliance.config import Config
from appliance.cubelet.sandboxes import LiveSandbox, SandboxTable
from appliance.cubelet.state import AGENT_UP, SandboxState
from appliance.runtime.base import read_console_tail

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 5.0
# A health probe's share of config.guest_agent_timeout_s (10 s by default: 2 s per probe).
HEALTH_TIMEOUT_SHARE = 0.2
HEALTH_FAILURES_BEFORE_KILL = 3
UNRESPONSIVE = "guest agent unresponsive"
CONSOLE_TAIL_LOGGED = 800  # of an unresponsive guest's console, in the service log


class HealthProber:
    def __init__(self, config: Config, table: SandboxTable, kill: Callable[[LiveSandbox, str], None]) -> None:
        self.config = config
        self.table = table
        self.kill = kill

    async def run(self) -> None:
        while True:
            await trio.sleep(HEALTH_INTERVAL_S)
            async with trio.open_nursery() as nursery:
                for live in self.table:
                    if live.state in AGENT_UP:
                        nursery.start_soon(self.probe, live)

    async def probe(self, live: LiveSandbox) -> None:
        assert live.agent is not None, "the guest was not handed over yet"
        healthy = await live.agent.healthy(timeout=self.config.guest_agent_timeout_s * HEALTH_TIMEOUT_SHARE)
        # Not counted either: a probe while a pause, resume or snapshot holds the guest stopped
        # (`changing`: a memory checkpoint stops the vCPUs while it writes the guest's RAM).
        if healthy or live.state is SandboxState.PAUSED or live.changing.locked():
            live.health_failures = 0
            return
        live.health_failures += 1
        if live.health_failures >= HEALTH_FAILURES_BEFORE_KILL:
            # The operator's only trace of why (as for a guest that exits: lifecycle.py): the
            # console log is deleted with the sandbox.
            tail = read_console_tail(live.instance.console_log, CONSOLE_TAIL_LOGGED) if live.instance else ""
            log.warning(
                "sandbox %s is dead: %s%s",
                live.sandbox_id,
                UNRESPONSIVE,
                f"; console tail:\n{tail}" if tail else "",
            )
            self.kill(live, UNRESPONSIVE)
