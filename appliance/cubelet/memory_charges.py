"""What each guest is charged against the node's memory budget (`SandboxTable.memory_committed_mb`).

A guest is charged what it really holds, as its runtime measures it (`Instance.memory_footprint`),
not its template's nominal memory_mb: a kvm clone restored from a template snapshot maps the
snapshot's memory copy-on-write and holds only the pages it wrote (about 22 MiB of a fresh
512 MiB clone), so charging it 512 MiB would cap a server at a handful of its promised thousands.

- A measured guest: its private memory plus GROWTH headroom (an eighth of its memory_mb, at
  least 32 MiB: what it may grow by before a measurement sees it), never more than its
  memory_mb. A guest cannot hold more than that anyway: its RAM is that big (kvm: the VMM's
  mapping of memory_mb; uml: its cgroup's memory.max).
- Memory its guests share (a template snapshot's page cache): once, the most any of them maps.
- A guest its runtime cannot measure (None): its memory_mb. (uml guests are measured by what
  their cgroup is charged, all of it private.)
- A guest not measured yet (booting): what a fresh guest of its template was charged (the
  least charge of a fully ready guest of it seen so far), else its memory_mb.

Headroom, so that guests growing later are not OOM-killed silently: the per-guest growth
headroom; what the budget leaves out (a quarter of the host by default, `memory_budget_mb`);
measurements at most a second old, so growth stops creates and pool refills (503) at once;
and the kvm runtime's own check before each boot that the host has the guest's whole
memory_mb available beside its reserve (`KvmRuntime.check_memory`). What is not covered:
every guest growing to its full memory_mb at the same time (that is overcommit by design).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

from appliance.cubelet.state import SandboxState
from appliance.records import TemplateManifest
from appliance.runtime.base import Instance

MIB = 1 << 20
MIN_GROWTH_MB = 32
# States whose measurement is a fresh guest's: not paused (a paused kvm clone's pages are on disk).
FRESH_STATES = frozenset({SandboxState.READY, SandboxState.RUNNING})


class Guest(Protocol):
    """What a guest's charge depends on (a `Guest`)."""

    template: TemplateManifest
    state: SandboxState
    instance: Instance | None


def growth_headroom_mb(memory_mb: int) -> int:
    return max(MIN_GROWTH_MB, memory_mb // 8)


class MemoryCharges:
    """The charges of a node's guests, and what a fresh guest of each template was charged."""

    def __init__(self) -> None:
        self._fresh_mb: dict[str, int] = {}  # template id → least charge of a fully ready guest

    def estimate_mb(self, template: TemplateManifest) -> int:
        """What a guest of `template` about to boot is charged until it is measured."""
        return min(template.memory_mb, self._fresh_mb.get(template.template_id, template.memory_mb))

    def committed_mb(self, guests: Iterable[Guest]) -> int:
        """Everything `guests` hold, each charged as the module's docstring says."""
        total = 0
        shared: dict[str, int] = {}  # what guests share → the most any of them maps
        for live in guests:
            total += self._charge_mb(live, shared)
        return total + sum(math.ceil(size / MIB) for size in shared.values())

    def _charge_mb(self, live: Guest, shared: dict[str, int]) -> int:
        nominal = live.template.memory_mb
        if live.instance is None:
            return self.estimate_mb(live.template)
        footprint = live.instance.memory_footprint()
        if footprint is None:
            return nominal
        if footprint.shared_key:
            shared[footprint.shared_key] = max(shared.get(footprint.shared_key, 0), footprint.shared_bytes)
        charge = min(nominal, math.ceil(footprint.private_bytes / MIB) + growth_headroom_mb(nominal))
        if live.state in FRESH_STATES and live.instance.fully_ready():
            template_id = live.template.template_id
            self._fresh_mb[template_id] = min(charge, self._fresh_mb.get(template_id, nominal))
        return charge
