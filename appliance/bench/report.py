"""One way to report a benchmark: a table for people, JSON for scripts, host kind in both."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from appliance.runtime.detect import detect_host


def percentiles(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean in milliseconds of samples given in seconds."""
    if not samples_s:
        return {"n": 0}
    ordered = sorted(samples_s)

    def pick(q: float) -> float:
        index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
        return ordered[index] * 1000

    return {
        "n": len(ordered),
        "p50_ms": pick(0.50),
        "p95_ms": pick(0.95),
        "p99_ms": pick(0.99),
        "max_ms": ordered[-1] * 1000,
        "mean_ms": statistics.fmean(ordered) * 1000,
    }


def host_kind() -> dict[str, object]:
    """What the numbers were measured on: cores, memory, kernel, virtualization kind."""
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    kind: dict[str, object] = {
        "cores": os.cpu_count(),
        "memory_mib": mem_kb // 1024,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    kind.update(detect_host().as_dict())
    return kind


@dataclass
class Report:
    """`rows` make the table. For charts (bench.charts): `samples` are raw latencies in
    seconds keyed by label (drawn as CDFs); `series` are x/y curves, each
    {"x_label": str, "y_label": str, "x": [...], "y": {label: [...]}}."""

    name: str
    rows: list[dict[str, object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)
    series: dict[str, dict[str, Any]] = field(default_factory=dict)
    host: dict[str, object] = field(default_factory=host_kind)
    started_at: float = field(default_factory=time.time)

    def add(self, **row: object) -> None:
        self.rows.append(row)

    def print_table(self) -> None:
        click.echo(f"\n{self.name}  ({', '.join(f'{k}={v}' for k, v in self.host.items())})")
        if not self.rows:
            click.echo("  (no rows)")
            return
        columns: list[str] = []
        for row in self.rows:
            columns.extend(k for k in row if k not in columns)
        cells = [[_fmt(row.get(c, "")) for c in columns] for row in self.rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        click.echo("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
        for r in cells:
            click.echo("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
        for note in self.notes:
            click.echo(f"  note: {note}")

    def show(self, json_dir: Path | None) -> None:
        """The table on stdout, and the JSON in `json_dir` if one is given (a scenario's last step)."""
        self.print_table()
        if json_dir is not None:
            click.echo(f"wrote {self.write_json(json_dir)}")

    def write_json(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}.json"
        path.write_text(json.dumps(asdict(self), indent=2, default=str))
        return path


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)
