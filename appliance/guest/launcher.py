"""Host side: the guest agent as a plain process on this host, for tests and `cube bench agent`.

Not used inside the guest (where init starts the agent); stdlib only, like the rest of
the package. The one way the host starts and stops an agent.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.guest.options import BOOT_TOKEN_ENV

# The directory holding the `appliance` package: the agent's PYTHONPATH.
IMPORT_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60
# The interpreter that runs the agent (and its kernels): the test venv's by default; point it at
# the guest's python3, with CUBE_GUEST_PYTHONPATH naming where Debian's packages are, to test
# against bookworm's versions (trio 0.22, h11 0.14, ipykernel 6.17).
GUEST_PYTHON = os.environ.get("CUBE_GUEST_PYTHON", sys.executable)
GUEST_PYTHONPATH = os.environ.get("CUBE_GUEST_PYTHONPATH")
# The agent gets SIGTERM (its orderly stop, which ends its kernels and processes too) when the
# thread that started it exits: a test run killed with SIGKILL (a CI timeout, a developer's
# kill -9) must not leave an agent holding 49983/49999 for the next run. util-linux's setpriv
# sets it and execs, so the pid is the agent's.
DIE_WITH_PARENT = ("setpriv", "--pdeathsig=TERM", "--")


@dataclass
class AgentProcess:
    process: subprocess.Popen[str]
    home: Path  # the agent's HOME, cwd and TMPDIR; removed when the agent stops
    stderr_path: Path
    started_at: float  # time.perf_counter() just before the process was started
    # What a runtime puts on the guest kernel's command line: the agent's only credential until /init.
    boot_token: str

    def wait_for_line(self, wanted: str, timeout: float = READY_TIMEOUT_S) -> list[str]:
        """Read the agent's stdout until the line `wanted`; the lines read, `wanted` last."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        lines: list[str] = []
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the agent exited early with code {self.process.wait()}: {self.stderr()}")
            lines.append(line.strip())
            if line.strip() == wanted:
                return lines
        raise RuntimeError(f"the agent did not print {wanted} in time")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def claim(self, envd_port: int = 49983, body: dict[str, object] | None = None) -> int:
        """`POST /init` with the boot token, as the cubelet claims a guest; the status. Without an
        `accessToken` in `body` the agent is left open (E2B's unsecured envd): what the SDK's debug
        mode, which sends no token, needs."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{envd_port}/init",
            data=json.dumps(body or {}).encode(),
            headers={"Content-Type": "application/json", "X-Access-Token": self.boot_token},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code


@contextmanager
def running_agent(
    *agent_args: str,
    python_args: tuple[str, ...] = ("-m", "appliance.guest"),
    env: dict[str, str] | None = None,
    echo_stderr: bool = True,
    boot_token: str | None = None,
) -> Iterator[AgentProcess]:
    """The agent on 127.0.0.1 (other options in `agent_args`), in a private home; stopped with
    SIGTERM on exit, and everything it started (its own session) killed. Its stderr goes to a
    file, copied to ours at the end with `echo_stderr`.

    It gets a fresh boot token (`boot_token` names one; "" gives it none), and acts for
    this process's own user by default: other users exist only where this runs as root.
    It ends when the calling thread ends (DIE_WITH_PARENT): call this from a thread that
    outlives the agent (not a worker thread of a pool).
    """
    boot_token = secrets.token_hex(16) if boot_token is None else boot_token
    if "--default-user" not in agent_args:
        agent_args = (*agent_args, "--default-user", pwd.getpwuid(os.geteuid()).pw_name)
    home = Path(tempfile.mkdtemp(prefix="cube-agent-home-"))
    home.chmod(0o711)  # as /tmp is in the guest: kernels started as another user reach their dirs
    python_path = os.pathsep.join(filter(None, [str(IMPORT_ROOT), GUEST_PYTHONPATH]))
    full_env = {
        **os.environ,
        "HOME": str(home),
        "PYTHONPATH": python_path,
        "TMPDIR": str(home),
        BOOT_TOKEN_ENV: boot_token,
        **(env or {}),
    }
    full_env.pop("E2B_DEBUG", None)
    stderr_path = home / "agent.stderr"
    with stderr_path.open("w") as stderr:
        started_at = time.perf_counter()
        process = subprocess.Popen(
            [*DIE_WITH_PARENT, GUEST_PYTHON, *python_args, "--host", "127.0.0.1", *agent_args],
            cwd=home, env=full_env, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True,
        )  # fmt: skip
    try:
        yield AgentProcess(process, home, stderr_path, started_at, boot_token)
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
        if echo_stderr:
            sys.stderr.write(stderr_path.read_text(errors="replace"))  # pytest shows it on failure
        shutil.rmtree(home, ignore_errors=True)
