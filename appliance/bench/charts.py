"""PNG charts from a Report (matplotlib, Agg): every bench draws through here.

What a report holds decides what is drawn:
- `samples` → `<name>-cdf.png`: latency CDFs, one curve per label (log-scale ms);
- rows with `concurrency` and `p50_ms` → `<name>-concurrency.png`: p50/p95/p99 vs concurrency;
- each `series` entry → `<name>-<key>.png`: y curves over x (e.g. memory vs sandbox count).
The host kind is in every chart's title.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from appliance.bench.report import Report


def _host_line(report: Report) -> str:
    host = report.host
    return (
        f"{host.get('cores', '?')} cores, {host.get('memory_mib', '?')} MiB, "
        f"KVM: {host.get('kvm') or 'none'}, runtime: {host.get('runtime', '?')}"
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(8, 5), dpi=100)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def cdf_points(samples_s: list[float]) -> tuple[list[float], list[float]]:
    """Sorted latencies in ms and their cumulative fractions (1/n … 1)."""
    ordered = sorted(samples_s)
    n = len(ordered)
    return [s * 1000 for s in ordered], [(i + 1) / n for i in range(n)]


def _cdf_chart(report: Report, directory: Path) -> Path:
    fig, ax = _figure()
    for label, samples in report.samples.items():
        if samples:
            xs, ys = cdf_points(samples)
            ax.step(xs, ys, where="post", label=f"{label} (n={len(samples)})")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of requests ≤ x")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{report.name}: latency CDF\n{_host_line(report)}", fontsize=10)
    return _save(fig, directory / f"{report.name}-cdf.png")


def _concurrency_chart(report: Report, directory: Path, rows: list[dict[str, Any]]) -> Path:
    fig, ax = _figure()
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row.get("path", report.name)), []).append(row)
    for group, members in groups.items():
        members.sort(key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in members]
        for key in ("p50_ms", "p95_ms", "p99_ms"):
            ys = [r.get(key) for r in members]
            if all(isinstance(y, int | float) for y in ys):
                ax.plot(xs, ys, marker="o", label=f"{group} {key[:3]}")
    ax.set_xlabel("concurrency")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{report.name}: latency vs concurrency\n{_host_line(report)}", fontsize=10)
    return _save(fig, directory / f"{report.name}-concurrency.png")


def _series_chart(report: Report, directory: Path, key: str, series: dict[str, Any]) -> Path:
    fig, ax = _figure()
    xs = series["x"]
    for label, ys in series["y"].items():
        ax.plot(xs[: len(ys)], ys, marker="o" if label == "measured" else None, label=label)
    ax.set_xlabel(series.get("x_label", "x"))
    ax.set_ylabel(series.get("y_label", "y"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(
        f"{report.name}: {series.get('y_label', key)} vs {series.get('x_label', 'x')}\n{_host_line(report)}",
        fontsize=10,
    )
    return _save(fig, directory / f"{report.name}-{_slug(key)}.png")


def write_charts(report: Report, directory: Path) -> list[Path]:
    """Every chart the report's content allows; returns the PNG paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if any(report.samples.values()):
        written.append(_cdf_chart(report, directory))
    rows = [r for r in report.rows if "concurrency" in r and isinstance(r.get("p50_ms"), int | float)]
    if len({r["concurrency"] for r in rows}) > 1:
        written.append(_concurrency_chart(report, directory, rows))
    for key, series in report.series.items():
        if series.get("x") and series.get("y"):
            written.append(_series_chart(report, directory, key, series))
    return written
