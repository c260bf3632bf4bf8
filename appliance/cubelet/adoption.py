"""At start, taking over the guests the previous service left running (a runtime that keeps
guests across restarts: uml), before the cubelet's pools or health probes run.

A user's sandbox becomes one again as its record says (running or paused, its deadline
kept: ADOPTING → RUNNING/PAUSED); a guest that is nobody's sandbox (pooled, building), whose
template is gone or that cannot be taken over ends (ADOPTING → ENDING), with nothing of it
left behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from appliance.cubelet.lifecycle import GuestLifecycle, trio_deadline_for
from appliance.cubelet.sandboxes import (
    LiveSandbox,
    SandboxNotFound,
    SandboxStartFailed,
    SandboxTable,
    template_network_policy,
)
from appliance.cubelet.state import SandboxState
from appliance.net.policy import NetworkPolicy
from appliance.records import LIVE_STATES, PAUSED, SandboxQuery, SandboxRecord, Store, TemplateManifest
from appliance.runtime.base import AdoptingRuntime, KeptGuest


@dataclass
class Adoption:
    """What a start made of the guests the previous service had."""

    adopted: list[str] = field(default_factory=list)  # users' sandboxes running (or paused) again
    ended: dict[str, str] = field(default_factory=dict)  # sandbox id → why it is not


def _gone_template(kept: KeptGuest) -> TemplateManifest:
    """Stands in for a kept guest's template that no longer exists (the guest is only ended)."""
    return TemplateManifest(
        template_id=kept.template_id,
        directory=Path("/nonexistent") / kept.template_id,
        memory_mb=kept.memory_mb,
        cpu_count=kept.cpu_count,
    )


@dataclass
class Adopter:
    """Takes over the kept guests of `runtime` into the cubelet's table and lifecycle."""

    store: Store
    sandboxes: SandboxTable
    lifecycle: GuestLifecycle
    templates: Callable[[], dict[str, TemplateManifest]]

    async def adopt(self, runtime: AdoptingRuntime) -> Adoption:
        kept, gone = await runtime.kept_guests()
        adoption = Adoption(ended=dict(gone))
        if not kept:
            return adoption
        records = {
            r.sandbox_id: r
            for r in self.store.query_sandboxes(SandboxQuery(states=LIVE_STATES, limit=1 << 30))
        }
        templates = self.templates()
        async with trio.open_nursery() as nursery:
            for guest in kept:
                nursery.start_soon(self._adopt_one, guest, records.get(guest.sandbox_id), templates, adoption)
        return adoption

    async def _adopt_one(
        self,
        kept: KeptGuest,
        record: SandboxRecord | None,
        templates: dict[str, TemplateManifest],
        adoption: Adoption,
    ) -> None:
        """Take over one kept guest: a user's sandbox again (as its record says: running or paused,
        its deadline kept), or ended if it is nobody's (a pooled or build guest), its template is
        gone or it cannot be taken over; either way with nothing of it left behind."""
        template = templates.get(kept.template_id)
        if record is not None:
            policy = record.egress_policy()
        elif template is not None:
            policy = template_network_policy(template)
        else:
            policy = NetworkPolicy(allow_internet_access=False)
        try:
            live = self.sandboxes.adopt(kept, template or _gone_template(kept), policy, record)
            await self.lifecycle.start(live)
        except SandboxStartFailed as exc:
            adoption.ended[kept.sandbox_id] = f"it could not be taken over: {exc}"
            return
        if record is None or template is None:
            why = "nobody's sandbox (pooled or building)" if record is None else "its template is gone"
            self.lifecycle.terminate(live, f"not taken over: {why}")
            await live.gone.wait()
            return
        try:
            await self._resume_as_recorded(live, kept, record)
        except Exception as exc:  # its runtime could not pause or resume it: that sandbox ends, no other
            why = f"it could not be taken over: {exc}"
            self.lifecycle.terminate(live, why)
            adoption.ended[kept.sandbox_id] = why
            return
        adoption.adopted.append(kept.sandbox_id)

    async def _resume_as_recorded(self, live: LiveSandbox, kept: KeptGuest, record: SandboxRecord) -> None:
        """ADOPTING → RUNNING or PAUSED as its record says (what its users were told), the guest
        frozen or not to match, the deadline of a running one where it was."""
        instance = live.instance
        assert instance is not None
        paused = record.state == PAUSED
        async with live.changing:
            if paused and not kept.paused:
                await instance.pause()
            elif not paused and kept.paused:
                await instance.resume()
            if live.state is not SandboxState.ADOPTING:
                raise SandboxNotFound(live.sandbox_id)  # it ended meanwhile
            new = SandboxState.PAUSED if paused else SandboxState.RUNNING
            self.sandboxes.transition(live, new, "taken over after a service restart")
            if not paused:
                live.set_deadline(trio_deadline_for(record.end_at))
