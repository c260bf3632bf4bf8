"""The pure parts of `cube bench`: charts from a Report, ratios over the floor, targets.
No appliance, no timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.bench.all import side_by_side
from appliance.bench.charts import cdf_points, write_charts
from appliance.bench.compare import find_row, published_report, ratio_rows, target_rows
from appliance.bench.files import label_size, parse_size
from appliance.bench.report import Report

HOST = {"cores": 2, "memory_mib": 1024, "kvm": "PVM", "runtime": "uml"}

pytest.importorskip("matplotlib")


def _report(name: str) -> Report:
    return Report(name, host=dict(HOST))


def test_cdf_points_are_sorted_milliseconds_ending_at_one() -> None:
    xs, ys = cdf_points([0.003, 0.001, 0.002])
    assert xs == pytest.approx([1.0, 2.0, 3.0])
    assert ys == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_write_charts_draws_what_the_report_holds(tmp_path: Path) -> None:
    report = _report("create")
    report.samples["create c=1"] = [0.02, 0.03, 0.025]
    report.samples["create c=10"] = [0.1, 0.2]
    for concurrency, p50 in ((1, 25.0), (10, 120.0)):
        report.add(path="api", concurrency=concurrency, p50_ms=p50, p95_ms=p50 * 2, p99_ms=p50 * 3)
    report.series["memory"] = {
        "x_label": "live sandboxes",
        "y_label": "MemAvailable drop (MiB)",
        "x": [0, 1, 2],
        "y": {"measured": [0.0, 100.0, 210.0]},
    }
    written = write_charts(report, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == ["create-cdf.png", "create-concurrency.png", "create-memory.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_charts_skips_what_is_missing(tmp_path: Path) -> None:
    report = _report("floor")
    report.add(path="python3 -c pass", p50_ms=10.0)
    assert write_charts(report, tmp_path) == []


def test_report_json_carries_samples_and_series(tmp_path: Path) -> None:
    report = _report("density")
    report.samples["create while filling"] = [0.5]
    report.series["memory"] = {"x": [0, 1], "y": {"measured": [0, 90]}}
    data = json.loads(report.write_json(tmp_path).read_text())
    assert data["samples"] == {"create while filling": [0.5]}
    assert data["series"]["memory"]["y"]["measured"] == [0, 90]
    assert data["host"]["runtime"] == "uml"


def test_ratio_rows_divide_p50_by_each_floor() -> None:
    floor = {"python3 -c pass": {"p50_ms": 10.0}, "bwrap + python3 -c pass": {"p50_ms": 20.0}}
    paths = {"warm create": {"p50_ms": 30.0}, "cold boot": {"p50_ms": 2000.0}, "not run": {}}
    rows = ratio_rows(floor, paths)
    assert [r["path"] for r in rows] == [
        "floor: python3 -c pass",
        "floor: bwrap + python3 -c pass",
        "warm create",
        "cold boot",
    ]
    assert rows[2]["x python3 -c pass"] == pytest.approx(3.0)
    assert rows[2]["x bwrap + python3 -c pass"] == pytest.approx(1.5)
    assert rows[3]["x bwrap + python3 -c pass"] == pytest.approx(100.0)


def test_target_rows_say_met_or_not() -> None:
    rows = {
        r["target"]: r
        for r in target_rows(
            {
                "warm create p50, c=1": {"p50_ms": 25.0},
                "warm create p99, c=10": {"p99_ms": 900.0},
                "idle memory per sandbox": {"mib": 150.0},
            }
        )
    }
    assert rows["warm create p50, c=1"]["met"] == "yes"
    assert rows["warm create p99, c=10"]["met"] == "NO"
    assert rows["idle memory per sandbox"]["met"] == "NO"
    assert rows["cold boot to agent ready p50"]["value"] == "not measured"


def test_side_by_side_from_reports() -> None:
    floor = _report("floor")
    floor.add(path="python3 -c pass", p50_ms=10.0)
    create = _report("create")
    create.samples["create c=1"] = [0.02] * 5
    create.samples["create c=10"] = [0.1] * 5
    direct = _report("create-direct")
    direct.samples["cold boot → agent ready"] = [1.0, 1.2, 1.1]
    summary = side_by_side({"floor": floor, "create": create, "create-direct": direct})
    warm = find_row(summary, path="warm create")
    assert warm is not None
    assert warm["x python3 -c pass"] == pytest.approx(2.0)
    cold = find_row(summary, path="cold boot → agent ready")
    assert cold is not None
    assert cold["x python3 -c pass"] == pytest.approx(110.0)
    assert any("warm create p50, c=1: 20.0 ms" in note and "met: yes" in note for note in summary.notes)


def test_published_numbers_are_marked_as_theirs() -> None:
    report = published_report()
    assert all(row["source"] for row in report.rows)
    assert any("not measured here" in note for note in report.notes)


def test_file_sizes() -> None:
    assert parse_size("1KiB") == 1024
    assert parse_size("100 MiB") == 100 * 1024 * 1024
    assert parse_size("4096") == 4096
    assert label_size(1024 * 1024) == "1 MiB"
    assert label_size(1500) == "1500 B"
