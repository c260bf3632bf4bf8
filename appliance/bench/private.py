"""A private `cube serve` started as a process of its own: its own state and run
directories (short, under /tmp: UML's socket paths must fit in 107 bytes), ports,
sandbox network and uid range, with the host's built templates and kernels linked in
read-only. What `cube bench restart` kills and starts again, and what the fault tests
(tests/supervisor) do the same to; the appliance on this host is never touched.

`stop(signal.SIGINT)` ends its sandboxes with it; SIGTERM leaves them running for the
next `start()`, SIGKILL leaves everything as a crash does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from appliance.config import Config
from appliance.runtime.readiness import ReadinessProbe

START_TIMEOUT_S = 600.0  # start-up compiles the eBPF programs: minutes on a loaded 2-core host
STOP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class PrivateSettings:
    api_port: int
    tls_port: int
    host_network: str
    uid_base: int
    pool_size: int = 0
    memory_budget_mb: int = 16384
    extra_env: dict[str, str] = field(default_factory=dict)


class PrivateService:
    def __init__(self, host: Config, settings: PrivateSettings, prefix: str = "cubeps-") -> None:
        self.host = host
        self.settings = settings
        self.root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.process: subprocess.Popen[bytes] | None = None
        (self.root / "s" / "templates").mkdir(parents=True)
        for template in sorted(host.templates_dir.iterdir()) if host.templates_dir.is_dir() else []:
            if (template / "template.json").is_file():
                (self.root / "s" / "templates" / template.name).symlink_to(template)
        if (host.templates_dir / "aliases.json").is_file():
            shutil.copy(host.templates_dir / "aliases.json", self.root / "s" / "templates")
        (self.root / "cache").mkdir()
        (self.root / "cache" / "kernels").symlink_to(host.cache_dir / "kernels")
        self.log_path = self.root / "cube.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.api_port}"

    @property
    def state_dir(self) -> Path:
        return self.root / "s"

    @property
    def run_dir(self) -> Path:
        """Its own, unless the settings' environment names another (an install's layout)."""
        return Path(self.settings.extra_env.get("CUBE_RUN_DIR", self.root / "run"))

    def environment(self) -> dict[str, str]:
        s = self.settings
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "CUBE_CONFIG": "/nonexistent",
            "CUBE_STATE_DIR": str(self.state_dir),
            "CUBE_CACHE_DIR": str(self.root / "cache"),
            "CUBE_RUN_DIR": str(self.run_dir),
            "CUBE_API_PORT": str(s.api_port),
            "CUBE_TLS_PORT": str(s.tls_port),
            "CUBE_HOST_NETWORK": s.host_network,
            "CUBE_UID_BASE": str(s.uid_base),
            "CUBE_RUNTIME": "uml",
            "CUBE_POOL_SIZE": str(s.pool_size),
            "CUBE_MEMORY_BUDGET_MB": str(s.memory_budget_mb),
            "CUBE_DOMAIN": "cube.test",
            **s.extra_env,
        }
        if "PYTHONPATH" in os.environ:  # a checkout run from its tree (tests)
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        return env

    def start(self, join: Sequence[Path] = ()) -> float:
        """Start `cube serve`; returns the monotonic time it was started at. `join`: cgroup.procs
        files it is put into before it runs (a test's stand-in for a systemd unit's cgroup)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        cube = Path(sys.executable).with_name("cube")

        def join_cgroups() -> None:
            for procs in join:
                procs.write_text(str(os.getpid()))

        with self.log_path.open("ab") as log:
            started = time.monotonic()
            self.process = subprocess.Popen(
                [str(cube), "serve"],
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=join_cgroups if join else None,
            )
        return started

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> float:
        """Until /health answers (`runtime.readiness`, the one probe); the monotonic time it first
        did. RuntimeError if the service exited or did not answer in time (with its log's tail)."""
        probe = ReadinessProbe(("127.0.0.1", self.settings.api_port), "/health", attempt_timeout_s=2.0)

        def exited() -> bool:
            return self.process is not None and self.process.poll() is not None

        async def answered_at() -> float | None:
            with trio.move_on_after(timeout):
                if await probe.wait(0.05, gave_up=exited):
                    return time.monotonic()
            return None

        answered = trio.run(answered_at)
        if answered is not None:
            return answered
        if exited():
            assert self.process is not None
            raise RuntimeError(f"cube serve exited ({self.process.returncode}):\n{self.log_tail()}")
        raise RuntimeError(f"cube serve did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> None:
        """Signal the service and wait until it has exited."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signum)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"cube serve did not stop on {signal.Signals(signum).name}") from None

    @property
    def admin_token(self) -> str:
        return (self.state_dir / "admin-token").read_text().strip()

    def admin(self, timeout: float = 180) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"X-API-KEY": self.admin_token}, timeout=timeout, trust_env=False
        )

    def create_key(self, name: str = "bench") -> str:
        with self.admin() as client:
            response = client.post("/cube/keys", json={"name": name})
            response.raise_for_status()
            return str(response.json()["key"])

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-max_bytes:].decode(errors="replace")
        except OSError:
            return ""

    def sandbox_ids(self) -> set[str]:
        """Every guest it has or had a supervisor for (pooled ones too), and every sandbox its
        store knows: what to look for on the host once it is gone."""
        supervisors = self.run_dir / "supervisors"
        ids = {p.name for p in supervisors.iterdir()} if supervisors.is_dir() else set()
        if (self.state_dir / "cube.db").is_file():
            with contextlib.closing(sqlite3.connect(self.state_dir / "cube.db")) as db:
                ids |= {row[0] for row in db.execute("SELECT sandbox_id FROM sandboxes")}
        return ids

    def end(self) -> None:
        """End the service and every sandbox it has (SIGINT)."""
        supervisors = self.run_dir / "supervisors"
        stopped = self.process is None or self.process.poll() is not None
        if stopped and supervisors.is_dir() and any(supervisors.iterdir()):
            # Sandboxes run on (after a SIGTERM or a kill): a start and an interactive stop end them.
            self.start()
            self.wait_ready()
        self.stop(signal.SIGINT)

    def remove(self) -> None:
        """`end`, then delete its directories."""
        self.end()
        shutil.rmtree(self.root, ignore_errors=True)
