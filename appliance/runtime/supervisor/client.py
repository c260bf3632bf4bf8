"""The service's side of its sandboxes' supervisors: start one, find the ones a previous
service left running, talk to one.

A supervisor is known by its control directory (`<run_dir>/supervisors/<sandbox_id>/`,
root's, 0700) and, in there, the record it wrote (`supervisor.json`: its pid and start
time). `attach` trusts a directory only once a pidfd of that pid names a live process
with that start time (appliance/process_identity.py), and every connection to its socket
only if the peer's pid (SO_PEERCRED) is that same process: never a name, never a pid
alone. The pidfd is kept: the service polls it to learn that the supervisor is gone, and
signals the supervisor through it only.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import trio

import appliance
from appliance.process_identity import ProcessIdentity
from appliance.runtime.supervisor.framing import LineBuffer, receive_line, send_all
from appliance.runtime.supervisor.protocol import (
    CONTROL_SOCKET,
    EXIT_FILE,
    LOG_FILE,
    MAX_REPLY_BYTES,
    MAX_SPEC_BYTES,
    RECORD_FILE,
    GuestExit,
    GuestState,
    LaunchSpec,
    Op,
    ProtocolError,
    Reply,
    Request,
    SupervisorRecord,
    decode_exit,
)
from appliance.runtime.uml.process import spawn

log = logging.getLogger(__name__)

SUPERVISORS_DIR = "supervisors"  # in run_dir
SUPERVISOR_MODULE = "appliance.runtime.supervisor"
LAUNCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
REQUEST_TIMEOUT_S = 10.0
HANDSHAKE_LIMIT_BYTES = 16 << 10
_PEERCRED = struct.Struct("3i")


class SupervisorGone(Exception):
    """No live supervisor answers for this control directory; the message says why."""


def supervisors_dir(run_dir: Path, name: str = SUPERVISORS_DIR) -> Path:
    """Where every supervisor's control directory lives (a runtime's own `name`); root's and 0700."""
    root = run_dir / name
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    return root


def control_dirs(run_dir: Path, name: str = SUPERVISORS_DIR) -> list[Path]:
    root = run_dir / name
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def read_exit(control_dir: Path) -> GuestExit | None:
    """How the guest ended, if its supervisor wrote it down."""
    try:
        return decode_exit((control_dir / EXIT_FILE).read_bytes())
    except (OSError, ProtocolError):
        return None


def log_tail(control_dir: Path, max_bytes: int = 2000) -> str:
    try:
        return (control_dir / LOG_FILE).read_bytes()[-max_bytes:].decode(errors="replace")
    except OSError:
        return ""


def supervisor_command(module: str = SUPERVISOR_MODULE) -> tuple[list[str], dict[str, str]]:
    """How to start a supervisor running this very code: the interpreter of this service's venv
    by its real path (a venv link swapped by `cube upgrade` does not change what an older
    supervisor imports), with this package on its path."""
    prefix = Path(sys.prefix).resolve()
    python = prefix / "bin" / "python3" if sys.prefix != sys.base_prefix else Path(sys.executable)
    package_root = Path(appliance.__file__).resolve().parents[1]
    return [str(python), "-m", module], {
        "PATH": LAUNCH_PATH,
        "PYTHONPATH": str(package_root),
    }


@dataclass(eq=False)
class SupervisorClient:
    control_dir: Path
    record: SupervisorRecord
    pidfd: int = field(repr=False)

    @property
    def sandbox_id(self) -> str:
        return self.record.sandbox_id

    # Finding one.

    @classmethod
    def attach(cls, control_dir: Path) -> SupervisorClient:
        """The live supervisor of `control_dir`; SupervisorGone (with the reason) otherwise."""
        try:
            record = SupervisorRecord.decode((control_dir / RECORD_FILE).read_bytes())
        except FileNotFoundError:
            raise SupervisorGone("its supervisor never got to run") from None
        except (OSError, ProtocolError) as exc:
            raise SupervisorGone(f"its supervisor's record is unreadable: {exc}") from None
        if record.sandbox_id != control_dir.name:
            raise SupervisorGone(f"its supervisor's record names another sandbox ({record.sandbox_id})")
        pidfd = record.identity.open_pidfd()
        if pidfd is None:
            ended = read_exit(control_dir)
            if ended is not None:
                raise SupervisorGone(f"its guest ended while no service ran: {ended.reason}")
            raise SupervisorGone(f"its supervisor (pid {record.pid}) is gone")
        return cls(control_dir, record, pidfd)

    # Its life.

    def alive(self) -> bool:
        """Not exited yet (a pidfd polls readable once its process has exited)."""
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return not poller.poll(0)

    async def wait_exited(self) -> None:
        """Until the supervisor has exited (reaped here if it is this service's child)."""
        await trio.lowlevel.wait_readable(self.pidfd)
        try:
            os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            pass  # a previous service's: the host's init reaps it

    async def end(self, timeout: float) -> None:
        """Ask the supervisor to kill its guest (answered once all of it is reaped), wait until it
        exits, SIGKILL it if it has not within `timeout`; then let go of it."""
        if self.alive():
            with trio.move_on_after(timeout):
                try:
                    await self.request(Op.KILL, timeout=timeout)
                except (SupervisorGone, ProtocolError) as exc:
                    log.warning("sandbox %s: its supervisor did not kill it: %s", self.sandbox_id, exc)
                await self.wait_exited()
        if self.alive():
            self.kill_hard()
        await self.wait_exited()
        self.close()

    def kill_hard(self) -> None:
        """SIGKILL the supervisor: its guest dies with it (pdeathsig, --die-with-parent)."""
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    # Talking to it.

    async def _connect(self) -> trio.socket.SocketType:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(str(self.control_dir / CONTROL_SOCKET))
            peer_pid, _uid, _gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            if peer_pid != self.record.pid:
                raise SupervisorGone(f"its socket is served by pid {peer_pid}, not the supervisor's")
        except BaseException:
            sock.close()
            raise
        return sock

    async def request(
        self, op: Op, *, max_bytes: int | None = None, slot: int = 0, timeout: float = REQUEST_TIMEOUT_S
    ) -> Reply:
        """One request, one reply; SupervisorGone if it cannot be asked (it is gone)."""
        request = Request(op, slot=slot) if max_bytes is None else Request(op, max_bytes, slot)
        try:
            with trio.fail_after(timeout):
                sock = await self._connect()
                with sock:
                    await send_all(sock, request.encode())
                    line = await receive_line(sock, LineBuffer(MAX_REPLY_BYTES))
        except (OSError, trio.TooSlowError) as exc:
            raise SupervisorGone(f"its supervisor does not answer ({op}): {exc!r}") from exc
        if line is None:
            raise SupervisorGone(f"its supervisor closed the connection without answering ({op})")
        return Reply.decode(line)

    def watch(self) -> Watch:
        return Watch(self)


class Watch:
    """`async with client.watch() as states:` then `await states.next()`: the guest's state now,
    then after each change; None once the supervisor closed the stream (after the state that
    carries the guest's exit, or because it died)."""

    def __init__(self, client: SupervisorClient) -> None:
        self._client = client
        self._sock: trio.socket.SocketType | None = None
        self._lines = LineBuffer(MAX_REPLY_BYTES)

    async def __aenter__(self) -> Watch:
        self._sock = await self._client._connect()
        await send_all(self._sock, Request(Op.WATCH).encode())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._sock is not None:
            self._sock.close()

    async def next(self) -> GuestState | None:
        assert self._sock is not None
        try:
            line = await receive_line(self._sock, self._lines)
        except OSError:
            return None
        if line is None:
            return None
        reply = Reply.decode(line)
        if not reply.ok or reply.state is None:
            raise ProtocolError(f"watch: {reply.error or 'no state'}")
        return reply.state


async def launch(spec: LaunchSpec, timeout: float) -> SupervisorClient:
    """Start the supervisor for `spec` (its control directory made here) and return once it
    runs its guest's launcher; SupervisorGone with what it said if it does not get there."""
    return await start(Path(spec.control_dir), SUPERVISOR_MODULE, spec.encode(), spec.seccomp_fd, timeout)


async def start(
    control_dir: Path, module: str, spec: bytes, pass_fd: int, timeout: float
) -> SupervisorClient:
    """Start `python -m module` as the supervisor of `control_dir` (made here), `spec` on its
    stdin and `pass_fd` inherited, and return once it said who it is (its last line on stdout
    before it logs to its file); SupervisorGone with what it said if it does not get there."""
    control_dir.mkdir(mode=0o700)
    assert len(spec) <= MAX_SPEC_BYTES
    stdin = os.memfd_create("cube-launch-spec", os.MFD_CLOEXEC)
    try:
        os.write(stdin, spec)
        os.lseek(stdin, 0, os.SEEK_SET)
        argv, env = supervisor_command(module)
        process = spawn(argv, env, pass_fd, stdin=stdin)
    finally:
        os.close(stdin)
    said = bytearray()
    with trio.move_on_after(timeout) as waited:
        async for chunk in process.console:
            said += chunk[: HANDSHAKE_LIMIT_BYTES - len(said)]
    await process.console.aclose()
    last = bytes(said).strip().rsplit(b"\n", 1)[-1]
    try:
        identity = ProcessIdentity.from_json(_json(last))
    except ValueError:
        process_gone = not waited.cancelled_caught
        if not process_gone:
            os.kill(process.pid, signal.SIGKILL)
        await process.wait()
        text = bytes(said).decode(errors="replace")[-2000:] or "nothing"
        what = "did not start in time" if waited.cancelled_caught else "failed to start"
        raise SupervisorGone(f"the supervisor {what}; it said: {text}") from None
    process.release()  # the client reaps it through its own pidfd
    if identity.pid != process.pid:
        raise SupervisorGone(f"the supervisor reported pid {identity.pid}, not {process.pid}")
    return SupervisorClient.attach(control_dir)


def _json(line: bytes) -> object:
    try:
        return json.loads(line)
    except ValueError:
        return None


class GuestEvents:
    """What the service knows of its guest, as its supervisor's watch stream tells it."""

    def __init__(self) -> None:
        self.first_output = trio.Event()
        self.ready = trio.Event()  # its agent answers
        self.interpreter_ready = trio.Event()
        self.interpreter_ready_at: float | None = None  # trio clock, when this service learned it
        self.paused = False
        self.exited = trio.Event()
        self.exit: GuestExit | None = None

    def update(self, state: GuestState) -> None:
        self.paused = state.paused
        for seen, event in (
            (state.first_output, self.first_output),
            (state.agent_ready or state.interpreter_ready, self.ready),
            (state.interpreter_ready, self.interpreter_ready),
        ):
            if seen and not event.is_set():
                if event is self.interpreter_ready:
                    self.interpreter_ready_at = trio.current_time()
                event.set()
        if state.exit is not None:
            self.ended(state.exit)

    def ended(self, exit: GuestExit) -> None:
        if self.exit is None:
            self.exit = exit
            self.exited.set()


async def follow(
    client: SupervisorClient,
    events: GuestEvents,
    console_tail: Callable[[], str],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Feed `events` from the supervisor's watch stream until the guest has ended; started once
    the first state is in. A stream that ends without the guest's exit means the supervisor is
    gone (killed): the guest went with it, and that is its end."""
    started = False
    why = "it closed its socket"
    try:
        async with client.watch() as states:
            while (state := await states.next()) is not None:
                events.update(state)
                if not started:
                    task_status.started()
                    started = True
                if state.exit is not None:
                    return
    except (OSError, SupervisorGone, ProtocolError) as exc:
        why = str(exc) or repr(exc)
    events.ended(GuestExit(None, f"its supervisor (pid {client.record.pid}) is gone: {why}", console_tail()))
    if not started:
        task_status.started()
