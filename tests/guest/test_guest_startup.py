"""The agent's start-up path: what it leaves until envd's first /health answer (lazy_imports.py).

Under UML every module imported before readiness delays it; these modules are imported after.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from appliance.guest import INTERPRETER_READY_LINE, READY_LINE
from appliance.guest.launcher import running_agent

ENVD_PORT = 49783
INTERPRETER_PORT = 49799
ENVD_READY_LOG = "cube-agent: envd ready"
# Deferred modules (lazy_imports.DEFERRED_MODULES) that neither the test interpreter's own start-up
# (site, .pth files) nor any trio version imports for itself.
DEFERRED = {"json", "base64", "datetime", "pwd"}


def _imported(importtime_lines: list[str]) -> set[str]:
    """The modules named in `python -X importtime` lines."""
    return {line.rsplit("|", 1)[-1].strip() for line in importtime_lines if line.startswith("import time:")}


def test_deferred_modules_load_after_the_first_health_answer() -> None:
    ports = ("--envd-port", str(ENVD_PORT), "--interpreter-port", str(INTERPRETER_PORT), "--no-interpreter")
    with running_agent(*ports, python_args=("-X", "importtime", "-m", "appliance.guest")) as agent:
        agent.wait_for_line(READY_LINE)
        health = httpx.get(f"http://127.0.0.1:{ENVD_PORT}/health", timeout=10)
        assert health.status_code == 204
        # Without a kernel to start, the second line follows the first /health answer and the preload.
        agent.wait_for_line(INTERPRETER_READY_LINE, timeout=30)
        # Requests after start-up find the deferred modules loaded: one that decodes JSON.
        assert agent.claim(ENVD_PORT, {"envVars": {"A": "1"}}) == 204
        stderr = agent.stderr().splitlines()
    ready_at = next(i for i, line in enumerate(stderr) if line.startswith(ENVD_READY_LOG))
    before, after = _imported(stderr[:ready_at]), _imported(stderr[ready_at:])
    assert not DEFERRED & before, f"imported before envd was ready: {sorted(DEFERRED & before)}"
    assert DEFERRED <= after


def test_a_deferred_module_that_fails_to_import_does_not_stop_the_preload(tmp_path: Path) -> None:
    """An image's Python may lack a module's C part: the preload says so and goes on."""
    (tmp_path / "cube_broken_module.py").write_text("raise ImportError('no C part here')\n")
    (tmp_path / "cube_fine_module.py").write_text("VALUE = 1\n")
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from appliance.guest.lazy_imports import import_lazily, is_stand_in, preload\n"
        "names = ('cube_broken_module', 'cube_fine_module')\n"
        "import_lazily(names)\n"
        "assert all(is_stand_in(name) for name in names)\n"
        "preload(names)\n"
        "import cube_fine_module\n"
        "print(cube_fine_module.VALUE)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1\n"
    assert "module cube_broken_module not preloaded: no C part here" in result.stderr
