"""The unmodified JS SDK (@e2b/code-interpreter, pinned in tests/js/package.json) against the agent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

JS_DIR = Path(__file__).resolve().parents[1] / "js"
# node_modules live outside the checkout, installed once and reused by later runs.
NPM_CACHE = Path(os.environ.get("CUBE_NPM_CACHE", "/var/cache/cube/npm")) / "guest-js-sdk"


@pytest.fixture(scope="session")
def js_sdk_dir() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the JS SDK test")
    NPM_CACHE.mkdir(parents=True, exist_ok=True)
    package = (JS_DIR / "package.json").read_text()
    installed = NPM_CACHE / "package.json"
    if not (NPM_CACHE / "node_modules/@e2b/code-interpreter").is_dir() or installed.read_text() != package:
        installed.write_text(package)
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NPM_CACHE,
            check=True,
            timeout=600,
        )
    shutil.copy(JS_DIR / "sdk_smoke.mjs", NPM_CACHE / "sdk_smoke.mjs")
    return NPM_CACHE


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
