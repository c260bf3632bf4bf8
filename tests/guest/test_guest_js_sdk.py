"""The unmodified JS SDK (@e2b/code-interpreter, pinned in tests/js/package.json) against the agent
(`js_sdk_dir`: tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def test_js_sdk_run_code_commands_files(agent, js_sdk_dir: Path) -> None:
    env = {**os.environ, "E2B_DEBUG": "true"}
    env.pop("E2B_SANDBOX_URL", None)
    result = subprocess.run(
        ["node", "sdk_smoke.mjs", str(agent.scratch)],
        cwd=js_sdk_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    observed = json.loads(result.stdout.strip().splitlines()[-1])
    assert observed == {
        "stdout": ["from js sdk\n"],
        "text": "42",
        "command": "commands-ok\n",
        "exitCode": 0,
        "content": "written by js",
        "missing": "FileNotFoundError",
    }
