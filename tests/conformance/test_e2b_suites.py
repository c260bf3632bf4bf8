"""E2B's own public test suites against a private `cube serve` of this tree (uml runtime, real
guests, the installed `code-interpreter` template), through run_e2b_suites.py.

- test_smoke_code_interpreter_basics: always (root): code-interpreter's test_basic files only, a
  minute or two, so CI sees that the runner, the pinned SDKs and the appliance still fit together.
- test_full_conformance_report: opt-in, CUBE_CONFORMANCE_FULL=1 (about 13 minutes on two cores):
  every suite in run_e2b_suites.py (or those named in CUBE_CONFORMANCE_SUITES, comma-separated);
  CUBE_CONFORMANCE_BUDGET_S bounds the whole run (shared out equally between the suites);
  CUBE_CONFORMANCE_ARGS adds runner arguments (e.g. "-- -k test_files": pytest's, to the pytest suites);
  asserts issue #23's bar (>= 95 % of the tests run pass) and leaves
  <CUBE_CONFORMANCE_WORK or a temp dir>/summary.json for docs/CONFORMANCE.md.

Every E2B URL variable points at the private service and E2B_DOMAIN at an unresolvable name
(run_e2b_suites.suite_env); the runner refuses tests that could reach the internet.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import umlguests

from appliance.config import load_config
from appliance.records import TemplateManifest
from appliance.templates.default import TEMPLATE_ID

pytestmark = [
    pytest.mark.uml,
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="real UML guests need root"),
]

RUNNER = Path(__file__).resolve().parent / "run_e2b_suites.py"
PASS_BAR = 0.95  # issue #23: "both suites at >= 95 % passing of the tests in scope"


@pytest.fixture
def conformance_service(start_service: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """(API URL, API key file) of a private service serving the installed default template, as it is
    (never rebuilt here: the conformance report is about the template users have)."""
    installed = load_config().templates_dir / TEMPLATE_ID
    if not (installed / "rootfs.ext4").is_file():
        pytest.skip(f"no installed default template in {installed} (installer/install.sh builds it)")
    template = TemplateManifest.load(installed)
    with umlguests.uml_service(start_service, monkeypatch, template, memory_budget_mb=6144) as service:
        key_file = service.config.state_dir.parent / "api-key"
        key_file.write_text(service.key("cf"))
        yield service.url, key_file


def _run_suites(service: tuple[str, Path], work: Path, *args: str) -> dict[str, Any]:
    url, key_file = service
    cmd = [sys.executable, str(RUNNER), "--api-url", url, "--api-key-file", str(key_file)]
    cmd += ["--work", str(work)]
    # Its output (counts, each failure) goes where pytest's goes: shown on failure or with -s.
    done = subprocess.run([*cmd, *args], check=False, timeout=4 * 3600)
    summary = work / "summary.json"
    assert summary.exists(), f"the runner wrote no summary (rc={done.returncode})"
    suites: dict[str, Any] = json.loads(summary.read_text())["suites"]
    return suites


def test_smoke_code_interpreter_basics(conformance_service: tuple[str, Path], tmp_path: Path) -> None:
    only_basics = ("--suite", "code-interpreter", "--", "-k", "test_basic")
    suites = _run_suites(conformance_service, tmp_path, *only_basics)
    smoke = suites["code-interpreter"]
    assert smoke["failed"] == {}, smoke["failed"]
    assert any("sync/test_basic.py" in node for node in smoke["passed"]), smoke["passed"]
    assert any("async/test_async_basic.py" in node for node in smoke["passed"]), smoke["passed"]


@pytest.mark.skipif(
    os.environ.get("CUBE_CONFORMANCE_FULL") != "1", reason="opt-in: CUBE_CONFORMANCE_FULL=1 (13 minutes)"
)
def test_full_conformance_report(conformance_service: tuple[str, Path]) -> None:
    work = Path(os.environ.get("CUBE_CONFORMANCE_WORK") or tempfile.mkdtemp(prefix="cube-conformance-"))
    chosen = [f"--suite={name}" for name in os.environ.get("CUBE_CONFORMANCE_SUITES", "").split(",") if name]
    budget = os.environ.get("CUBE_CONFORMANCE_BUDGET_S")
    chosen += [f"--budget={budget}"] if budget else []
    chosen += shlex.split(os.environ.get("CUBE_CONFORMANCE_ARGS", ""))  # e.g. "-- -k test_files"
    suites = _run_suites(conformance_service, work, *chosen)
    below = {}
    for name, suite in suites.items():
        ran = len(suite["passed"]) + len(suite["failed"])
        if ran == 0 or len(suite["passed"]) < PASS_BAR * ran:
            below[name] = f"{len(suite['passed'])} of {ran} passed: {sorted(suite['failed'])}"
    assert not below, below
