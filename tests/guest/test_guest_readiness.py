"""Two readiness levels: envd first (CUBE-AGENT-READY), the default kernel after (CUBE-INTERPRETER-READY).

A second agent on its own ports: /init and /execute sent the moment envd is ready
must work, the execution waiting for the kernel instead of failing.
"""

from __future__ import annotations

import json
import os

import httpx
from freeports import free_ports

from appliance.guest import INTERPRETER_READY_LINE, READY_LINE
from appliance.guest.launcher import running_agent

ENVD_PORT = 49883
INTERPRETER_PORT = 49899


def test_envd_is_ready_before_the_kernel_and_executions_wait_for_it() -> None:
    ports = ("--envd-port", str(ENVD_PORT), "--interpreter-port", str(INTERPRETER_PORT))
    with running_agent(*ports) as agent:
        lines = agent.wait_for_line(READY_LINE)
        assert INTERPRETER_READY_LINE not in lines
        envd = f"http://127.0.0.1:{ENVD_PORT}"
        assert httpx.get(f"{envd}/health", timeout=5).status_code in (200, 204)
        assert agent.claim(ENVD_PORT, {"envVars": {"CUBE_EARLY": "yes"}}) == 204
        # The kernel's start-up blocked debugpy and jedi; they are importable again once it answers.
        code = (
            "import os, sys\nprint(os.environ.get('CUBE_EARLY'), "
            "all(sys.modules.get(m, 1) is not None for m in ('debugpy', 'jedi')))"
        )
        response = httpx.post(
            f"http://127.0.0.1:{INTERPRETER_PORT}/execute", json={"code": code}, timeout=120
        )
        events = [json.loads(line) for line in response.text.splitlines() if line]
        stdout = "".join(e["text"] for e in events if e["type"] == "stdout")
        assert stdout == "yes True\n", events
        assert events[-1]["type"] == "end_of_execution"
        agent.wait_for_line(INTERPRETER_READY_LINE, timeout=30)


def _children_of(parent: int) -> list[str]:
    """The command lines of `parent`'s child processes (a kernel is the agent's child, in a session
    of its own)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != parent:
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_a_lazy_default_kernel_starts_at_the_first_execution() -> None:
    """--lazy-default-kernel (what the template marker file asks for in a guest): both ready lines
    come without a kernel process, and the first execution starts it and gets its result."""
    envd_port, interpreter_port = free_ports(2)
    ports = ("--envd-port", str(envd_port), "--interpreter-port", str(interpreter_port))
    with running_agent(*ports, "--lazy-default-kernel") as agent:
        agent.wait_for_line(READY_LINE)
        assert httpx.get(f"http://127.0.0.1:{envd_port}/health", timeout=5).status_code in (200, 204)
        agent.wait_for_line(INTERPRETER_READY_LINE, timeout=30)
        assert _children_of(agent.process.pid) == []
        assert agent.claim(envd_port) == 204
        response = httpx.post(
            f"http://127.0.0.1:{interpreter_port}/execute", json={"code": "print(6 * 7)"}, timeout=120
        )
        events = [json.loads(line) for line in response.text.splitlines() if line]
        assert "".join(e["text"] for e in events if e["type"] == "stdout") == "42\n", events
        assert _children_of(agent.process.pid)  # the kernel it started
