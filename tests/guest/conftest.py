"""The guest agent as a plain host process, driven by the unmodified E2B SDK in debug mode.

Debug mode (`E2B_DEBUG=true`) makes the SDK skip the control plane and talk to
localhost:49983 (envd) and localhost:49999 (code interpreter), so the agent must own
those ports for the session. One agent serves the whole session (kernel start-up is
the slow part); tests that change its global state (/init) restore it. It is claimed at
start with its boot token and no access token, which leaves it open: the SDK's debug
mode sends no token (test_guest_auth.py starts unclaimed agents of its own).
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from appliance.guest import INTERPRETER_READY_LINE, READY_LINE
from appliance.guest.launcher import running_agent

ENVD_URL = "http://127.0.0.1:49983"
TOKEN = "test-access-token"
TRAFFIC_TOKEN = "test-traffic-token"
INTERPRETER_URL = "http://127.0.0.1:49999"


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
    with running_agent() as started:
        # envd first, then the default kernel: the session's tests expect both.
        started.wait_for_line(READY_LINE)
        started.wait_for_line(INTERPRETER_READY_LINE)
        assert started.claim() == 204
        scratch = started.home / "scratch"
        scratch.mkdir()
        yield Agent(started.process, started.home, scratch)


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


@pytest.fixture
def token_set(agent: Agent) -> Iterator[str]:
    """The session agent secured as the cubelet's /init secures a sandbox; open again afterwards."""
    assert agent.init({"accessToken": TOKEN, "trafficAccessToken": TRAFFIC_TOKEN}).status_code == 204
    yield TOKEN
    assert agent.init({"accessToken": None, "trafficAccessToken": None}, token=TOKEN).status_code == 204


@pytest.fixture
def secure_sandbox(token_set: str, debug_sdk: None) -> object:
    """What Sandbox.create() builds when the control plane returns both tokens (debug-mode URLs)."""
    from e2b import ConnectionConfig
    from e2b_code_interpreter import Sandbox
    from packaging.version import Version

    return Sandbox(
        sandbox_id="debug_sandbox_id",
        sandbox_domain=None,
        envd_version=Version("0.6.4"),
        envd_access_token=token_set,
        traffic_access_token=TRAFFIC_TOKEN,
        connection_config=ConnectionConfig(debug=True, extra_sandbox_headers={"X-Access-Token": token_set}),
    )
