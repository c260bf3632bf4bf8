"""A pytest plugin the conformance runner loads into E2B's suites (`-p cube_conformance_plugin`).

It records each test's outcome by exact node id into the JSON file named by
CUBE_CONFORMANCE_RESULTS, written once by the controlling process (also under
pytest-xdist, whose workers send their reports to it). Not a test module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

_outcomes: dict[str, dict[str, str]] = {}


def pytest_runtest_logreport(report: Any) -> None:
    entry = _outcomes.setdefault(report.nodeid, {"outcome": "passed", "message": ""})
    if report.failed and entry["outcome"] != "failed":
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)
        phase = "" if report.when == "call" else f"[{report.when}] "
        entry.update(outcome="failed", message=phase + message.splitlines()[0][:300] if message else phase)
    elif report.skipped and entry["outcome"] == "passed":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        entry.update(outcome="skipped", message=str(reason)[:300])


def pytest_sessionfinish(session: Any) -> None:
    target = os.environ.get("CUBE_CONFORMANCE_RESULTS")
    if target and not hasattr(session.config, "workerinput"):
        Path(target).write_text(json.dumps(_outcomes, indent=1, sort_keys=True))
