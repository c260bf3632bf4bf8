"""The host's agent launcher (appliance/guest/launcher.py), what the guest tests' `agent` fixture
and `cube bench agent` start: an agent never outlives the process that started it, so a test run
killed with SIGKILL (a CI timeout, a developer's kill -9) leaves no agent holding 49983/49999
and no kernel behind it for the next run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hostprocs import descendants

from appliance.guest.launcher import IMPORT_ROOT

# A stand-in for pytest: starts an agent (ports the kernel picks, its default kernel running) as
# the `agent` fixture does, says who it is, then waits to be killed.
STARTER = """
import sys
from appliance.guest import INTERPRETER_READY_LINE, READY_LINE
from appliance.guest.launcher import running_agent

with running_agent("--envd-port", "0", "--interpreter-port", "0") as started:
    started.wait_for_line(READY_LINE)
    started.wait_for_line(INTERPRETER_READY_LINE)
    print(started.process.pid, started.home, flush=True)
    sys.stdin.read()
"""
GONE_WITHIN_S = 60  # the agent's orderly stop on a loaded 2-core host


def _alive(pid: int, start_time: str) -> bool:
    """The process `pid` that started at `start_time` is still there (a zombie is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z" and fields[19] == start_time


def test_an_agent_and_its_kernel_die_with_the_process_that_started_it() -> None:
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(IMPORT_ROOT)},
    )
    assert starter.stdout is not None
    try:
        pid, home = starter.stdout.readline().split()
        [agent] = [(p, started) for p, started, _ in descendants(starter.pid) if p == int(pid)]
        family = [agent, *((p, started) for p, started, _ in descendants(int(pid)))]
        assert len(family) >= 2, "the agent and its default kernel"
    finally:
        starter.kill()  # SIGKILL: no `finally` of the launcher runs
        starter.wait()
    deadline = time.monotonic() + GONE_WITHIN_S
    while (left := [p for p in family if _alive(*p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    shutil.rmtree(home, ignore_errors=True)  # the launcher's to remove, had it lived
    assert left == [], f"outlived their starter: {left}"
