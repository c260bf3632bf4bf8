"""The guest agent as a plain host process, driven by the unmodified E2B SDK in debug mode.

Debug mode (`E2B_DEBUG=true`) makes the SDK skip the control plane and talk to
localhost:49983 (envd) and localhost:49999 (code interpreter), so the agent must own
those ports for the session. One agent serves the whole session (kernel start-up is
the slow part); tests that change its global state (/init) restore it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
ENVD_URL = "http://127.0.0.1:49983"
INTERPRETER_URL = "http://127.0.0.1:49999"
READY_TIMEOUT_S = 60
# The interpreter that runs the agent (and its kernels): the test venv's by default; point it at
# the guest's python3, with CUBE_GUEST_PYTHONPATH naming where Debian's packages are, to test
# against bookworm's versions (trio 0.22, h11 0.14, ipykernel 6.17).
GUEST_PYTHON = os.environ.get("CUBE_GUEST_PYTHON", sys.executable)
GUEST_PYTHONPATH = os.environ.get("CUBE_GUEST_PYTHONPATH")


@dataclass
class Agent:
    process: subprocess.Popen[str]
    home: Path  # the agent's HOME and cwd: the default user's home on a test host
    scratch: Path  # a directory tests may fill; inside home so nothing escapes the cleanup
    envd_url: str = ENVD_URL
    interpreter_url: str = INTERPRETER_URL

    def init(self, body: dict[str, object], token: str | None = None) -> httpx.Response:
        headers = {"X-Access-Token": token} if token else {}
        return httpx.post(f"{ENVD_URL}/init", json=body, headers=headers, timeout=10)


def wait_for_line(process: subprocess.Popen[str], wanted: str, timeout: float = READY_TIMEOUT_S) -> list[str]:
    """Read the agent's stdout until the line `wanted`; the lines read, `wanted` last."""
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


def _wait_ready(process: subprocess.Popen[str]) -> None:
    # envd first, then the default kernel: the session's tests expect both.
    wait_for_line(process, "CUBE-AGENT-READY")
    wait_for_line(process, "CUBE-INTERPRETER-READY")


def _require_free_ports() -> None:
    for port in (49983, 49999):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as exc:
                pytest.fail(f"port {port} is taken ({exc}); the SDK's debug mode needs it for the agent")


@pytest.fixture(scope="session")
def agent() -> Iterator[Agent]:
    _require_free_ports()
    home = Path(tempfile.mkdtemp(prefix="cube-guest-test-"))
    home.chmod(0o711)  # as /tmp is in the guest: kernels started as another user reach their dirs
    python_path = os.pathsep.join(filter(None, [str(REPO), GUEST_PYTHONPATH]))
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": python_path, "TMPDIR": str(home)}
    env.pop("E2B_DEBUG", None)
    process = subprocess.Popen(
        [GUEST_PYTHON, "-m", "appliance.guest", "--host", "127.0.0.1"],
        cwd=home,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_ready(process)
        scratch = home / "scratch"
        scratch.mkdir()
        yield Agent(process, home, scratch)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        # Anything the agent started lives in its own session; make sure none of it survives.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if process.stdout is not None:
            process.stdout.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def debug_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_DEBUG", "true")
    monkeypatch.delenv("E2B_SANDBOX_URL", raising=False)
    monkeypatch.delenv("E2B_API_URL", raising=False)


@pytest.fixture
def sandbox(agent: Agent, debug_sdk: None) -> Iterator[object]:
    from e2b_code_interpreter import Sandbox

    sandbox = Sandbox.create()
    yield sandbox
    # In debug mode kill() makes no call; stop whatever a test left running.
    for process in sandbox.commands.list():
        sandbox.commands.kill(process.pid)
