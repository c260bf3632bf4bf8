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
_finished: set[str] = set()
_controller = True  # False in a pytest-xdist worker (its reports reach the controller)


def pytest_configure(config: Any) -> None:
    global _controller
    _controller = not hasattr(config, "workerinput")


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
    if report.when == "teardown":
        _finished.add(report.nodeid)
        _write()  # after every test: a suite stopped by its timeout keeps the tests it finished


def pytest_sessionfinish(session: Any) -> None:
    _write()


def _write() -> None:
    """Only tests whose teardown was reported: one stopped midway is not run, not passed."""
    target = os.environ.get("CUBE_CONFORMANCE_RESULTS")
    if not target or not _controller:
        return
    done = {node: entry for node, entry in _outcomes.items() if node in _finished}
    partial = Path(target + ".partial")
    partial.write_text(json.dumps(done, indent=1, sort_keys=True))
    partial.rename(target)
