"""The memory budget charges each guest what it really holds (appliance/cubelet/memory_charges.py):
a kvm clone its private pages plus growth headroom, capped at its template's memory; what clones
share once; a guest its runtime cannot measure (uml) its whole memory_mb."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.cubelet.memory_charges import MIB, growth_headroom_mb
from appliance.cubelet.sandboxes import LiveSandbox, SandboxTable, template_network_policy
from appliance.cubelet.state import SandboxState
from appliance.records import TemplateManifest
from appliance.runtime.base import MemoryFootprint

S = SandboxState
NOMINAL_MB = 512
HEADROOM_MB = growth_headroom_mb(NOMINAL_MB)  # 64
SNAPSHOT = "/var/lib/cube/snapshots/t/memory"


@dataclass
class MeasuredGuest:
    """An instance as the budget sees it: what its runtime measures (None: it cannot)."""

    footprint: MemoryFootprint | None
    ready: bool = True

    def memory_footprint(self) -> MemoryFootprint | None:
        return self.footprint

    def fully_ready(self) -> bool:
        return self.ready


def template(tmp_path: Path, template_id: str = "t") -> TemplateManifest:
    return TemplateManifest(template_id=template_id, directory=tmp_path / template_id, memory_mb=NOMINAL_MB)


def guest(
    table: SandboxTable, tpl: TemplateManifest, state: SandboxState, footprint: MemoryFootprint | None = None
) -> LiveSandbox:
    live = table.add(tpl, template_network_policy(tpl))
    live.state = state
    if state is not S.BOOTING:
        live.instance = MeasuredGuest(footprint)  # type: ignore[assignment]
    return live


def clone(private_mb: int, shared_mb: int = 300) -> MemoryFootprint:
    return MemoryFootprint(private_mb * MIB, SNAPSHOT, shared_mb * MIB)


def test_clones_are_charged_their_private_pages_and_headroom_and_share_the_snapshot_once(
    table: SandboxTable, tmp_path: Path
) -> None:
    tpl = template(tmp_path)
    guest(table, tpl, S.RUNNING, clone(22, shared_mb=280))
    guest(table, tpl, S.RUNNING, clone(30, shared_mb=300))
    assert table.memory_committed_mb() == (22 + HEADROOM_MB) + (30 + HEADROOM_MB) + 300


def test_a_guest_is_never_charged_more_than_its_template_memory(table: SandboxTable, tmp_path: Path) -> None:
    guest(table, template(tmp_path), S.RUNNING, clone(NOMINAL_MB, shared_mb=0))
    assert table.memory_committed_mb() == NOMINAL_MB


def test_a_guest_its_runtime_cannot_measure_is_charged_its_template_memory(
    table: SandboxTable, tmp_path: Path
) -> None:
    guest(table, template(tmp_path), S.RUNNING, None)  # uml
    assert table.memory_committed_mb() == NOMINAL_MB


def test_a_booting_guest_is_charged_what_a_fresh_guest_of_its_template_was(
    table: SandboxTable, tmp_path: Path
) -> None:
    tpl, other = template(tmp_path), template(tmp_path, "other")
    booting = guest(table, tpl, S.BOOTING)
    assert table.memory_committed_mb() == NOMINAL_MB  # nothing measured yet: its whole memory
    assert table.boot_charge_mb(tpl) == NOMINAL_MB
    grown = guest(table, tpl, S.RUNNING, clone(200, shared_mb=0))
    fresh = guest(table, tpl, S.READY, clone(20, shared_mb=0))
    assert table.memory_committed_mb() == NOMINAL_MB + (200 + HEADROOM_MB) + (20 + HEADROOM_MB)
    assert table.boot_charge_mb(tpl) == 20 + HEADROOM_MB  # the least a fully ready one held
    assert table.memory_committed_mb() == 3 * HEADROOM_MB + 200 + 20 + 20
    assert table.boot_charge_mb(other) == NOMINAL_MB  # learnt per template
    for live in (booting, grown, fresh):
        table.forget(live)
    assert table.memory_committed_mb() == 0
    assert table.boot_charge_mb(tpl) == 20 + HEADROOM_MB  # remembered for the next burst of creates


def test_paused_or_still_starting_guests_do_not_lower_the_boot_estimate(
    table: SandboxTable, tmp_path: Path
) -> None:
    tpl = template(tmp_path)
    guest(table, tpl, S.PAUSED, clone(0))  # a paused kvm clone's pages are on disk
    starting = guest(table, tpl, S.READY, clone(5))
    assert starting.instance is not None
    starting.instance.ready = False  # type: ignore[attr-defined]  # its default kernel not up yet
    table.memory_committed_mb()
    assert table.boot_charge_mb(tpl) == NOMINAL_MB


def test_ten_clones_fit_where_nominal_sizes_allowed_eight(table: SandboxTable, tmp_path: Path) -> None:
    """The emulated host's case (a 6 GiB host, budget 4444 MiB): ten 512 MiB clones created at
    once each really hold ~22 MiB; charged nominally the ninth was refused (503)."""
    budget_mb, tpl = 4444, template(tmp_path)
    for _ in range(10):
        guest(table, tpl, S.RUNNING, clone(22))
    committed = table.memory_committed_mb()
    assert committed == 10 * (22 + HEADROOM_MB) + 300
    assert committed + table.boot_charge_mb(tpl) <= budget_mb
    assert 10 * NOMINAL_MB > budget_mb
