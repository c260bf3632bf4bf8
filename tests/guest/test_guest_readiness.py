"""Two readiness levels: envd first (CUBE-AGENT-READY), the default kernel after (CUBE-INTERPRETER-READY).

A second agent on its own ports: /init and /execute sent the moment envd is ready
must work, the execution waiting for the kernel instead of failing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
GUEST_PYTHON = os.environ.get("CUBE_GUEST_PYTHON", sys.executable)  # as conftest.py
GUEST_PYTHONPATH = os.environ.get("CUBE_GUEST_PYTHONPATH")
ENVD_PORT = 49883
INTERPRETER_PORT = 49899


def wait_for_line(process: subprocess.Popen[str], wanted: str, timeout: float = 60) -> list[str]:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the agent exited early with code {process.wait()}")
        lines.append(line.strip())
        if line.strip() == wanted:
            return lines
    raise RuntimeError(f"the agent did not print {wanted} in time")


def test_envd_is_ready_before_the_kernel_and_executions_wait_for_it() -> None:
    home = Path(tempfile.mkdtemp(prefix="cube-guest-ready-"))
    home.chmod(0o711)
    python_path = os.pathsep.join(filter(None, [str(REPO), GUEST_PYTHONPATH]))
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": python_path, "TMPDIR": str(home)}
    process = subprocess.Popen(
        [GUEST_PYTHON, "-m", "appliance.guest", "--host", "127.0.0.1",
         "--envd-port", str(ENVD_PORT), "--interpreter-port", str(INTERPRETER_PORT)],
        cwd=home, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        lines = wait_for_line(process, "CUBE-AGENT-READY")
        assert "CUBE-INTERPRETER-READY" not in lines
        envd = f"http://127.0.0.1:{ENVD_PORT}"
        assert httpx.get(f"{envd}/health", timeout=5).status_code in (200, 204)
        init = httpx.post(f"{envd}/init", json={"envVars": {"CUBE_EARLY": "yes"}}, timeout=10)
        assert init.status_code == 204
        # The kernel's start-up blocked debugpy; it is importable again once the kernel answers.
        code = (
            "import os, sys\nprint(os.environ.get('CUBE_EARLY'), sys.modules.get('debugpy', 1) is not None)"
        )
        response = httpx.post(
            f"http://127.0.0.1:{INTERPRETER_PORT}/execute", json={"code": code}, timeout=120
        )
        events = [json.loads(line) for line in response.text.splitlines() if line]
        stdout = "".join(e["text"] for e in events if e["type"] == "stdout")
        assert stdout == "yes True\n", events
        assert events[-1]["type"] == "end_of_execution"
        wait_for_line(process, "CUBE-INTERPRETER-READY", timeout=30)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if process.stdout is not None:
            process.stdout.close()
        shutil.rmtree(home, ignore_errors=True)
