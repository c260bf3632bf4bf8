"""The per-sandbox supervisor process (`python -m appliance.runtime.supervisor`): the
containerd-shim idea for one UML guest.

The uml runtime starts one per sandbox, in its own session and its own cgroup leaf
(outside the service's: a `systemctl restart` does not kill it). It owns its guest for
as long as the guest runs, whether the service that started it lives or not:

- the launcher chain (runtime/uml/command.py) is its child, so `setpriv --pdeathsig=KILL`
  and `bwrap --die-with-parent` tie the guest's life to this process, not to the service;
- the guest's virtio-balloon backend (runtime/uml/balloon.py) runs here;
- the console is pumped into the console log (capped) and its ready lines noticed here;
- pause and resume (mconsole) go through here, so the paused flag is the guest's truth;
- the control socket (`control.sock`, protocol.py) in its root-only control directory
  answers root only (SO_PEERCRED, on top of the directory's 0700).

Start: the `LaunchSpec` on stdin; join its cgroup leaf; listen; open the balloon; spawn
the chain; write `supervisor.json`; then one line `{"pid":..,"start_time":..}` on stdout
(what the runtime waits for) and from then on log to `supervisor.log`.

End: when the guest exits, on `kill`, or on SIGTERM: the guest is killed and reaped
(guest.kill_and_reap), its end written to `exit.json` and sent to watchers, the socket
removed, and the process exits. It never removes the guest's network, cgroup leaves or
files: that is the service's teardown (or the next start's, for a guest that ended while
no service ran), which waits for this process to be gone first.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import trio

from appliance.process_identity import ProcessIdentity
from appliance.runtime.supervisor.control import ControlServer, open_listener
from appliance.runtime.supervisor.guest import (
    GuestInit,
    become_subreaper,
    first_of,
    kill_and_reap,
    reap_orphans,
)
from appliance.runtime.supervisor.protocol import (
    CONTROL_SOCKET,
    EXIT_FILE,
    LOG_FILE,
    MAX_SPEC_BYTES,
    RECORD_FILE,
    GuestExit,
    GuestState,
    LaunchSpec,
    Reply,
    SupervisorRecord,
    encode_exit,
)
from appliance.runtime.uml.balloon import SandboxBalloon
from appliance.runtime.uml.cgroups import SandboxCgroup
from appliance.runtime.uml.console import ConsoleLog
from appliance.runtime.uml.mconsole import Mconsole, MconsoleError
from appliance.runtime.uml.process import SpawnedProcess, spawn

log = logging.getLogger("cube.supervisor")

CONSOLE_DRAIN_S = 0.5
PANIC_LINE_WAIT_S = 0.2


class Supervisor(ControlServer):
    def __init__(self, spec: LaunchSpec) -> None:
        super().__init__()
        self.spec = spec
        self.control_dir = Path(spec.control_dir)
        self.console = ConsoleLog(Path(spec.console_log), spec.console_limit)
        self.cgroup = SandboxCgroup(spec.cgroup_version, {k: Path(v) for k, v in spec.guest_cgroup.items()})
        vm_dir = Path(spec.vm_dir)
        self.mconsole = Mconsole(Path(spec.mconsole_socket), vm_dir, Path(spec.reply_dir), spec.uid)
        self.guest_init = GuestInit()
        self.paused = False
        self.exit: GuestExit | None = None
        self.started = time.monotonic()
        self._pausing = trio.Lock()

    # The guest's state.

    def state(self) -> GuestState:
        return GuestState(
            sandbox_id=self.spec.sandbox_id,
            first_output=self.console.first_output.is_set(),
            agent_ready=self.console.ready.is_set(),
            interpreter_ready=self.console.interpreter_ready.is_set(),
            paused=self.paused,
            exit=self.exit,
        )

    # The whole life.

    async def run(
        self, process: SpawnedProcess, balloon: SandboxBalloon, listener: trio.socket.SocketType
    ) -> None:
        exited = trio.Event()

        async def watch_exit() -> None:
            await process.wait()
            exited.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.console.pump, process.console)
            nursery.start_soon(watch_exit)
            nursery.start_soon(balloon.serve, self.spec.sandbox_id)
            # The kernel runs once it prints: bwrap has forked its init, whose pidfd is taken.
            watch_init = functools.partial(self.guest_init.watch, process.pid)
            nursery.start_soon(self.announce_console, self.console, exited, watch_init)
            nursery.start_soon(self.serve_control, listener)
            nursery.start_soon(self._kill_on_sigterm)
            nursery.start_soon(self._kill_on_panic)
            await first_of(exited, self.kill_requested)
            killed = not exited.is_set()
            with trio.CancelScope(shield=True):
                await kill_and_reap(process, self.cgroup, self.guest_init)
                await reap_orphans()
                with trio.move_on_after(CONSOLE_DRAIN_S):
                    await self.console.finished.wait()
            reason = self.kill_reason if killed else f"UML exited with status {process.returncode}"
            self.exit = GuestExit(process.returncode, reason, self.console.tail())
            write_atomically(self.control_dir / EXIT_FILE, encode_exit(self.exit))
            self.ended.set()
            self._notify()
            await self.drain_connections()
            nursery.cancel_scope.cancel()
        await process.console.aclose()

    async def _kill_on_panic(self) -> None:
        """A panicked UML kernel prints why and stops, without exiting: that is its end."""
        await self.console.panicked.wait()
        await trio.sleep(PANIC_LINE_WAIT_S)  # the rest of the panic line
        if not self.kill_requested.is_set():
            self.kill_reason = self.console.panic_message()
            self.kill_requested.set()

    async def _kill_on_sigterm(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                log.warning("SIGTERM: killing the guest")
                self.kill_requested.set()

    def console_tail(self, max_bytes: int) -> str:
        return self.console.tail(max_bytes)

    async def pause_or_resume(self, pause: bool) -> Reply:
        async with self._pausing:
            if self.exit is not None or self.kill_requested.is_set():
                return Reply(ok=False, error="the guest has ended", state=self.state())
            try:
                await self.mconsole.request("stop" if pause else "go")
            except (MconsoleError, OSError, trio.TooSlowError) as exc:
                return Reply(ok=False, error=f"mconsole: {exc!r}", state=self.state())
            self.paused = pause
            self._notify()
            return Reply(ok=True, state=self.state())

    def metrics(self) -> dict[str, float]:
        try:
            memory = self.cgroup.memory_usage_bytes()
        except (OSError, KeyError, ValueError):  # torn down, or no memory leaf
            memory = 0
        return {
            "memory_bytes": memory,
            "console_bytes": self.console.written,
            "uptime_s": time.monotonic() - self.started,
            "paused": float(self.paused),
        }


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def write_supervisor_record(control_dir: Path, sandbox_id: str, guest: dict[str, Any]) -> ProcessIdentity:
    """This process's record (`supervisor.json`: who it is, for a later service to trust it), and
    its identity (what it then says on stdout)."""
    me = ProcessIdentity.current()
    record = SupervisorRecord(
        sandbox_id=sandbox_id,
        pid=me.pid,
        start_time=me.start_time,
        venv=sys.prefix,
        started_unix=time.time(),
        guest=guest,
    )
    write_atomically(control_dir / RECORD_FILE, record.encode())
    return me


def join_cgroup(procs_files: list[str]) -> None:
    for procs in procs_files:
        Path(procs).write_text(str(os.getpid()))


def open_log(control_dir: Path) -> int:
    return os.open(control_dir / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def log_from_now_on(fd: int) -> None:
    """stdout and stderr into the log `fd` (the service's pipe is closed by that)."""
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


async def supervise(spec: LaunchSpec) -> None:
    control_dir = Path(spec.control_dir)
    listener = open_listener(str(control_dir / CONTROL_SOCKET))
    supervisor = Supervisor(spec)
    with listener, SandboxBalloon.open(Path(spec.vm_dir), spec.uid, spec.balloon) as balloon:
        try:
            process = spawn(spec.argv, spec.env, spec.seccomp_fd)
        finally:
            os.close(spec.seccomp_fd)
        me = write_supervisor_record(control_dir, spec.sandbox_id, spec.guest)
        sys.stdout.write(json.dumps(me.to_json()) + "\n")
        sys.stdout.flush()
        log_from_now_on(open_log(control_dir))
        await supervisor.run(process, balloon, listener)
    (control_dir / CONTROL_SOCKET).unlink(missing_ok=True)


def main() -> None:
    """`python -m appliance.runtime.supervisor`: the spec on stdin, the handshake on stdout."""
    spec = LaunchSpec.decode(sys.stdin.buffer.read(MAX_SPEC_BYTES + 1))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    run(spec)


def run(spec: LaunchSpec) -> None:
    """The supervisor's whole life, once stdin is /dev/null and stdout+stderr the service's pipe
    (an exec'd supervisor's, or one forked by the zygote: zygote.py)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    join_cgroup(spec.supervisor_cgroup)  # before anything is spawned: every child is charged there
    become_subreaper()
    trio.run(supervise, spec)
