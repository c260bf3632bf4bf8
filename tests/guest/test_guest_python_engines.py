"""The two Python engines: IPython's shell in a small process (the default, python_shell.py) and
the ipykernel it replaced, still there behind CUBE_PYTHON_KERNEL=ipykernel (/etc/cube/python-kernel
in a template). Both give the same /execute events for the same cells."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from freeports import free_ports

from appliance.guest import INTERPRETER_READY_LINE, READY_LINE
from appliance.guest.launcher import running_agent

CELLS = (
    "print('out')\nimport sys\nprint('err', file=sys.stderr)\n{'k': [1, 2]}",
    "def f():\n    raise ValueError('bad value')\nf()",
    "from IPython.display import display, Markdown\ndisplay(Markdown('**md**'))\n'done'",
)


def _events(interpreter_url: str, code: str) -> list[dict[str, object]]:
    with httpx.stream("POST", f"{interpreter_url}/execute", json={"code": code}, timeout=60) as response:
        assert response.status_code == 200
        return [json.loads(line) for line in response.iter_lines()]


def _comparable(events: list[dict[str, object]]) -> list[dict[str, object]]:
    """The events without what differs from run to run (timestamps)."""
    return [{key: value for key, value in event.items() if key != "timestamp"} for event in events]


@pytest.fixture(scope="module")
def ipykernel_agent() -> Iterator[str]:
    envd_port, interpreter_port = free_ports(2)
    ports = ("--envd-port", str(envd_port), "--interpreter-port", str(interpreter_port))
    with running_agent(*ports, env={"CUBE_PYTHON_KERNEL": "ipykernel"}) as agent:
        agent.wait_for_line(READY_LINE)
        agent.wait_for_line(INTERPRETER_READY_LINE)
        assert agent.claim(envd_port) == 204
        yield f"http://127.0.0.1:{interpreter_port}"


def test_the_default_engine_runs_no_jupyter_machinery(agent) -> None:
    names = ("ipykernel", "zmq", "tornado", "jupyter_client")
    code = f"import sys\nsorted(name for name in {names!r} if name in sys.modules)"
    events = _events(agent.interpreter_url, code)
    assert any(event.get("text") == "[]" for event in events), events


def test_the_ipykernel_switch_gives_the_same_events(agent, ipykernel_agent: str) -> None:
    assert any(
        event.get("text") == "True"
        for event in _events(ipykernel_agent, "import sys\n'ipykernel' in sys.modules")
    )
    for cell in CELLS:
        shell = _comparable(_events(agent.interpreter_url, cell))
        kernel = _comparable(_events(ipykernel_agent, cell))
        # Execution counts differ (the session agent ran other cells); the rest is the same.
        for events in (shell, kernel):
            for event in events:
                event.pop("execution_count", None)
        if cell is CELLS[1]:  # IPython's traceback names the cell by its number
            for events in (shell, kernel):
                for event in events:
                    if event.get("type") == "error":
                        assert "ValueError: bad value" in str(event.pop("traceback"))
        assert shell == kernel
