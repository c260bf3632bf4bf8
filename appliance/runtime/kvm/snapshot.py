"""Snapshot format: `state.json` (plain data) next to `memory` (guest RAM, sparse;
for a diff snapshot only the pages that differ from `base_memory`).

Bytes fields (the kernel structs of each vCPU, irqchip, PIT, clock) are stored
base64-encoded; `format_version` guards against reading a different layout.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from appliance.runtime.kvm.memory import RegionLayout
from appliance.runtime.kvm.vcpu import VcpuState

FORMAT_VERSION = 1
STATE_FILE = "state.json"
MEMORY_FILE = "memory"


@dataclass
class MachineState:
    memory_size: int
    vcpu_count: int
    regions: list[RegionLayout]
    vcpus: list[VcpuState]
    irqchips: list[bytes]  # PIC master, PIC slave, IOAPIC (struct kvm_irqchip)
    pit: bytes
    clock: bytes
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Host CLOCK_REALTIME when the snapshot was taken: a restore moves the guest's
    # kvmclock forward by the time the snapshot spent on disk.
    saved_at_ns: int = 0
    # A diff snapshot (pause): `memory` holds only these (first page, count) runs,
    # every other page is the one in `base_memory` (the template's memory file).
    base_memory: str | None = None
    diff_runs: list[tuple[int, int]] = field(default_factory=list)
    format_version: int = FORMAT_VERSION


def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            return base64.b64decode(value["b64"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def write_state(directory: Path, state: MachineState) -> Path:
    path = directory / STATE_FILE
    path.write_text(json.dumps(_encode(asdict(state))))
    return path


def read_state(directory: Path) -> MachineState:
    raw = _decode(json.loads((directory / STATE_FILE).read_text()))
    if raw.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{directory}: snapshot format {raw.get('format_version')}, expected {FORMAT_VERSION}"
        )
    vcpu_fields = {f.name for f in fields(VcpuState)}
    raw["regions"] = [RegionLayout(**r) for r in raw["regions"]]
    raw["vcpus"] = [
        VcpuState(
            **{
                **{k: v for k, v in vcpu.items() if k in vcpu_fields},
                "cpuid": [tuple(e) for e in vcpu["cpuid"]],
                "msrs": [tuple(m) for m in vcpu["msrs"]],
            }
        )
        for vcpu in raw["vcpus"]
    ]
    raw["diff_runs"] = [tuple(run) for run in raw.get("diff_runs", [])]
    return MachineState(**raw)
