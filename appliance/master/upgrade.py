"""`cube upgrade --from PATH`: install a newer cube beside the running one, then switch over.

PATH is a wheel, a directory holding one (and, optionally, the wheels of its
dependencies: it is passed to pip as `--find-links`), or an appliance ISO, read
without mounting: `xorriso -osirrox` extracts only its `/cube/wheels` directory
(the cube wheel and its dependency wheels; image/iso/build.sh builds them).
This is for hosts set up by the installer; an appliance booted from the ISO runs
from read-only layers and is upgraded by booting the newer ISO (its state is on
the CUBE-DATA partition, and the store migrates at start).

The venv path the service runs from (`/opt/cube/venv`, the unit's ExecStart)
becomes a symlink into `<venv>s/` (`/opt/cube/venvs/<version>-<stamp>`):

1. a fresh venv (same base Python, system site-packages for bcc) gets the wheel;
   any failure here deletes it, and the running service never noticed;
2. the service stops with SIGUSR2 (systemd: `systemctl kill`, then `stop`;
   otherwise the pid-file daemon, whose environment and log file are reused
   for the restart), leaving its sandboxes running;
   the store is copied (`cube.db.pre-<old version>-<stamp>`, SQLite backup API);
3. the symlink is swapped atomically (rename over it) and the service starts;
   the new code migrates the store at start (`store.migrate`);
4. success = `/health` answers with the new version. Otherwise the new service
   is stopped, the symlink points back, the store copy is restored and the old
   version is started again. That is also what happens on a downgrade below the
   store's schema: the older code refuses a newer store (`DatabaseTooNew`).

State (store, API keys, templates, CA, admin token) lives in the state dir and is
untouched. Running sandboxes keep running, processes and memory intact: each is
owned by its supervisor process (runtime/supervisor), not by the service, so the
old service lets go of them and the new one takes them over before it reports
ready (a rollback's restart does the same). A supervisor runs the code of the
release that started its sandbox until that sandbox ends, so the venvs supervisors
run from are kept. (A service of a release before supervisors keeps its sandboxes'
disks on SIGUSR2 instead, and the new one boots them again: carryover.py.)
The previous venv is kept for a manual rollback; older ones are deleted once no
supervisor runs from them.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from appliance import __version__
from appliance.config import Config
from appliance.runtime.supervisor.client import control_dirs
from appliance.runtime.supervisor.protocol import RECORD_FILE, ProtocolError, SupervisorRecord

DEFAULT_VENV = Path("/opt/cube/venv")
DEFAULT_LOG = Path("/var/log/cube/cube.log")
UNIT = "cube.service"
WHEEL_GLOB = "cube_appliance-*.whl"
ISO_WHEEL_DIR = "/cube/wheels"  # where the ISO keeps the wheel and its dependency wheels
STOP_TIMEOUT_S = 90.0  # the service ends the sandboxes it cannot keep (kvm's) before it exits
HEALTH_TIMEOUT_S = 180.0  # start-up compiles the eBPF programs and opens the runtime


LogFn = Callable[[str], None]
AliveFn = Callable[[], bool]


class UpgradeFailed(click.ClickException):
    pass


# Finding the wheel.


def find_wheel(source: Path, workdir: Path) -> Path:
    """The cube wheel in `source` (a wheel, a directory or an ISO); ISOs are extracted into `workdir`."""
    if not source.exists():
        raise UpgradeFailed(f"{source} does not exist")
    if source.is_file() and source.name.endswith(".whl"):
        return source
    if source.is_file() and source.suffix == ".iso":
        source = extract_iso_dir(source, ISO_WHEEL_DIR, workdir / "iso-wheels")
    if source.is_dir():
        wheels = sorted(source.glob(WHEEL_GLOB)) or sorted(source.glob(f"cube/wheels/{WHEEL_GLOB}"))
        if len(wheels) == 1:
            return wheels[0]
        if wheels:
            raise UpgradeFailed(f"{source} holds several cube wheels: {', '.join(w.name for w in wheels)}")
    raise UpgradeFailed(f"no {WHEEL_GLOB} in {source}")


def extract_iso_dir(iso: Path, iso_dir: str, dest: Path) -> Path:
    """Copy one directory out of an ISO 9660 image, without mounting it (xorriso's osirrox)."""
    if shutil.which("xorriso") is None:
        raise UpgradeFailed("reading an ISO needs xorriso (apt-get install xorriso)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", iso_dir, str(dest)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or not dest.is_dir():
        raise UpgradeFailed(f"could not read {iso_dir} from {iso}: {result.stderr.strip()[-2000:]}")
    return dest


def wheel_version(wheel: Path) -> str:
    # name-version(-build)?-python-abi-platform.whl; names never contain "-" in a wheel file name.
    return wheel.name.split("-")[1]


# The venvs.


@dataclass(frozen=True)
class VenvLayout:
    link: Path  # what the service runs from: /opt/cube/venv

    @property
    def versions_dir(self) -> Path:
        return self.link.with_name(self.link.name + "s")  # /opt/cube/venvs


def base_python() -> str:
    """The interpreter venvs are made from: the one beneath the running venv (Debian's, for bcc)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def install_venv(wheel: Path, layout: VenvLayout, version: str, log: LogFn) -> Path:
    """A new venv with the wheel installed; deleted again if anything fails."""
    layout.versions_dir.mkdir(parents=True, exist_ok=True)
    target = layout.versions_dir / f"{version}-{time.strftime('%Y%m%d%H%M%S')}"
    try:
        log(f"creating {target}")
        _run([base_python(), "-m", "venv", "--system-site-packages", str(target)])
        log(f"installing {wheel.name}")
        _run(
            [
                str(target / "bin/python"),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--find-links",
                str(wheel.parent),
                # With the bench extra, as the installer installs it: `cube bench` drives the
                # appliance through the E2B SDKs (found beside the wheel in an ISO, else on PyPI).
                f"{wheel}[bench]",
            ]
        )
        reported = _run([str(target / "bin/cube"), "--version"]).strip()
        if not reported.endswith(version):
            raise UpgradeFailed(f"the new venv reports {reported!r}, expected version {version}")
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def point_link(layout: VenvLayout, target: Path) -> Path | None:
    """Point the venv link at `target` atomically; returns what it pointed at before.

    A real directory there (made by the installer) is first moved into the
    versions dir, where it keeps working for a rollback only through the link
    (its scripts name the link path in their #! lines)."""
    previous: Path | None = None
    if layout.link.is_symlink():
        previous = layout.link.resolve()
    elif layout.link.is_dir():
        previous = layout.versions_dir / f"installed-{time.strftime('%Y%m%d%H%M%S')}"
        layout.versions_dir.mkdir(parents=True, exist_ok=True)
        layout.link.rename(previous)
    staging = layout.link.with_name(f".{layout.link.name}.new")
    staging.unlink(missing_ok=True)
    staging.symlink_to(target)
    os.replace(staging, layout.link)
    return previous


def venvs_in_use(config: Config) -> set[Path]:
    """The venvs the running supervisors run from (each the code of the release that started its
    sandbox): deleting one would pull imports from under it."""
    used = set()
    for control_dir in control_dirs(config.run_dir):
        try:
            record = SupervisorRecord.decode((control_dir / RECORD_FILE).read_bytes())
        except (OSError, ProtocolError):
            continue
        if record.identity.alive():
            used.add(Path(record.venv))
    return used


def prune_versions(layout: VenvLayout, keep: set[Path]) -> list[Path]:
    removed = []
    for entry in layout.versions_dir.iterdir():
        if entry.is_dir() and entry.resolve() not in {k.resolve() for k in keep}:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


# The service.


@dataclass(frozen=True)
class DaemonLaunch:
    """How the pid-file daemon was started, to start the next version the same way."""

    environ: dict[str, str]
    cwd: str
    log_file: Path


def systemd_manages_cube() -> bool:
    if Path("/proc/1/comm").read_text().strip() != "systemd" or shutil.which("systemctl") is None:
        return False
    state = subprocess.run(["systemctl", "is-active", UNIT], capture_output=True, text=True).stdout.strip()
    return state in {"active", "activating", "reloading"}


def running_daemon_pid(config: Config) -> int | None:
    try:
        pid = int((config.run_dir / "cube.pid").read_text().strip())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid


def daemon_launch(pid: int, default_log: Path) -> DaemonLaunch:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    environ = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
    stdout = os.readlink(f"/proc/{pid}/fd/1")
    log_file = Path(stdout) if stdout.startswith("/") and Path(stdout).is_file() else default_log
    return DaemonLaunch(environ, os.readlink(f"/proc/{pid}/cwd"), log_file)


def stop_daemon(pid: int, timeout: float = STOP_TIMEOUT_S, signum: int = signal.SIGTERM) -> None:
    """Signal the service and wait until it has exited, SIGKILL after `timeout`. SIGTERM and
    SIGUSR2 let its sandboxes run on (a release before supervisors: SIGTERM ends them, SIGUSR2
    keeps their disks, carryover.py); SIGINT ends them."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signum)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            os.kill(pid, signal.SIGKILL)
            poller.poll(10_000)
    finally:
        os.close(pidfd)


def start_daemon(venv: Path, launch: DaemonLaunch) -> int:
    """`cube serve` detached (own session), appending to the same log as before."""
    launch.log_file.parent.mkdir(parents=True, exist_ok=True)
    with launch.log_file.open("ab") as log, open(os.devnull, "rb") as devnull:
        process = subprocess.Popen(
            [str(venv / "bin/cube"), "serve"],
            stdin=devnull,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=launch.environ,
            cwd=launch.cwd,
            start_new_session=True,
        )
    return process.pid


def health(config: Config) -> dict[str, object] | None:
    host = "127.0.0.1" if config.api_host in {"0.0.0.0", "::", ""} else config.api_host
    host = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{host}:{config.api_port}/health", timeout=2) as response:
            body = json.load(response)
            return body if isinstance(body, dict) else None
    except (OSError, ValueError, urllib.error.URLError):
        return None


def wait_for_version(config: Config, version: str, timeout: float, alive: AliveFn) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = health(config)
        if answer is not None and answer.get("version") == version:
            return
        if not alive():
            raise UpgradeFailed("the new service exited during start-up (see its log)")
        time.sleep(0.5)
    raise UpgradeFailed(f"the service did not answer /health with version {version} within {timeout:.0f} s")


def backup_store(db_path: Path, old_version: str) -> Path | None:
    """A consistent copy of the store (the service is stopped), made before the new code migrates it."""
    if not db_path.exists():
        return None
    copy = db_path.with_name(f"{db_path.name}.pre-{old_version}-{time.strftime('%Y%m%d%H%M%S')}")
    source, dest = sqlite3.connect(db_path), sqlite3.connect(copy)
    try:
        source.backup(dest)
    finally:
        source.close()
        dest.close()
    return copy


def restore_store(db_path: Path, copy: Path) -> None:
    for suffix in ("-wal", "-shm"):
        db_path.with_name(db_path.name + suffix).unlink(missing_ok=True)
    shutil.copyfile(copy, db_path)


# The whole upgrade.


def upgrade(
    config: Config,
    source: Path,
    layout: VenvLayout,
    *,
    default_log: Path = DEFAULT_LOG,
    health_timeout: float = HEALTH_TIMEOUT_S,
    log: LogFn = click.echo,
) -> str:
    """Upgrade to the cube in `source`; returns the new version. Raises UpgradeFailed."""
    with tempfile.TemporaryDirectory(prefix="cube-upgrade-") as scratch:
        wheel = find_wheel(source, Path(scratch))
        version = wheel_version(wheel)
        log(f"upgrading cube {__version__} -> {version} in {layout.link}")
        new_venv = install_venv(wheel, layout, version, log)

    under_systemd = systemd_manages_cube()
    pid = None if under_systemd else running_daemon_pid(config)
    launch = daemon_launch(pid, default_log) if pid is not None else None
    stop_service(config, under_systemd, log)
    backup = backup_store(config.db_path, __version__)
    if backup is not None:
        log(f"store copied to {backup}")
    previous = point_link(layout, new_venv)

    def start() -> AliveFn:
        if under_systemd:
            _run(["systemctl", "start", UNIT])
            return lambda: subprocess.run(["systemctl", "is-failed", "--quiet", UNIT]).returncode != 0
        assert launch is not None
        started = start_daemon(layout.link, launch)
        return lambda: _alive(started)

    if under_systemd or launch is not None:
        log("starting the new version")
        alive = start()
        try:
            wait_for_version(config, version, health_timeout, alive)
        except UpgradeFailed as failure:
            log(f"{failure.message}; rolling back to {__version__}")
            stop_service(config, under_systemd, log)
            if previous is not None:
                point_link(layout, previous)
            if backup is not None:
                restore_store(config.db_path, backup)
            start()
            shutil.rmtree(new_venv, ignore_errors=True)
            raise
    else:
        log("the service was not running; start it to use the new version (the store migrates at start)")
    keep = {new_venv} | ({previous} if previous is not None else set()) | venvs_in_use(config)
    for removed in prune_versions(layout, keep):
        log(f"removed old venv {removed}")
    log(f"cube {version} is running from {new_venv}")
    return version


def stop_service(config: Config, under_systemd: bool, log: LogFn) -> None:
    """Stop `cube serve`, its sandboxes left running. One whose /health reports its version
    understands SIGUSR2 (a release before supervisors keeps its sandboxes' disks on it); an
    older one would die of that signal: SIGTERM."""
    carries = (health(config) or {}).get("version") is not None
    keeping = ", its sandboxes running on" if carries else ""
    if under_systemd:
        log(f"stopping {UNIT}{keeping}")
        if carries:
            _run(["systemctl", "kill", "--kill-who=main", "--signal=SIGUSR2", UNIT])
            _wait_inactive(STOP_TIMEOUT_S)
        _run(["systemctl", "stop", UNIT])
    elif (pid := running_daemon_pid(config)) is not None:
        log(f"stopping cube serve (pid {pid}){keeping}")
        stop_daemon(pid, signum=signal.SIGUSR2 if carries else signal.SIGTERM)


def _wait_inactive(timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(["systemctl", "is-active", "--quiet", UNIT]).returncode != 0:
            return
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # our child: reap it if it exited
    except ChildProcessError:
        return False
    return waited == 0


def _run(argv: list[str]) -> str:
    # Without the caller's PYTHONPATH/PYTHONHOME: the new venv must see only its own packages (a
    # checkout on PYTHONPATH holding an egg-info made pip skip the wheel as "already installed").
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-3000:]
        raise UpgradeFailed(f"{' '.join(argv[:3])} ... failed (exit {result.returncode}):\n{output}")
    return result.stdout


@click.command("upgrade")
@click.option(
    "--from",
    "source",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="A cube wheel, a directory holding one (plus dependency wheels), or an appliance ISO.",
)
@click.option(
    "--venv",
    type=click.Path(path_type=Path),
    envvar="CUBE_VENV",
    default=DEFAULT_VENV,
    show_default=True,
    help="The venv path the service runs from (becomes a symlink into <venv>s/).",
)
@click.option(
    "--log-file",
    type=click.Path(path_type=Path),
    default=DEFAULT_LOG,
    show_default=True,
    help="Log of a restarted daemon when the old one's log cannot be found (no systemd).",
)
@click.option("--health-timeout", type=float, default=HEALTH_TIMEOUT_S, show_default=True)
@click.pass_obj
def upgrade_command(config: Config, source: Path, venv: Path, log_file: Path, health_timeout: float) -> None:
    """Install a newer cube (wheel or ISO) beside this one, restart on it, roll back on failure."""
    upgrade(
        config,
        source,
        VenvLayout(venv),
        default_log=log_file,
        health_timeout=health_timeout,
    )
