"""`cube bench kvm` runs here and reports every row with the host kind (no timing asserted)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.bench.kvm import kvm_command


def test_bench_kvm_reports_both_restore_paths_with_the_host_kind(tmp_path: Path) -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm not usable")
    arguments = ["--memory-mb", "64", "--rounds", "3", "--clones", "2", "--exits", "50", "--blk-mb", "4"]
    result = CliRunner().invoke(kvm_command, [*arguments, "--json-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "kvm.json").read_text())
    assert report["host"]["kvm"] in ("VMX", "SVM", "PVM")
    metrics = {row["metric"]: row for row in report["rows"]}
    plain = metrics["restore 64 MiB snapshot, no shell ready: vCPU running guest code"]
    pooled = metrics["restore 64 MiB snapshot from a pooled shell (KvmRuntime's usual path): vCPU running"]
    assert plain["n"] == pooled["n"] == 3 and pooled["p50_ms"] > 0
    assert metrics["memory per clone (2 live, before guest writes)"]["rss_mib"] >= 0
    blk = [row for metric, row in metrics.items() if metric.startswith("virtio-blk via UML")]
    assert blk or any("virtio-blk via UML skipped" in note for note in report.get("notes", []))
