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

import array
import contextlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
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
    FORK_REQUEST,
    LOG_FILE,
    MAX_FORK_REQUEST_BYTES,
    MAX_REPLY_BYTES,
    MAX_SPEC_BYTES,
    RECORD_FILE,
    ZYGOTE_ARGUMENT,
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
from appliance.runtime.uml.cgroups import SandboxCgroup
from appliance.runtime.uml.process import SpawnedProcess, spawn

log = logging.getLogger(__name__)

SUPERVISORS_DIR = "supervisors"  # in run_dir
SUPERVISOR_MODULE = "appliance.runtime.supervisor"
LAUNCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
REQUEST_TIMEOUT_S = 10.0
ZYGOTE_REPLY_TIMEOUT_S = 10.0  # a fork and a pidfd: milliseconds, unless the host is frozen
ZYGOTE_EXIT_TIMEOUT_S = 5.0
REAPED_TIMEOUT_S = 5.0
REAPED_POLL_S = 0.01
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


async def tear_down(
    supervisor: SupervisorClient | None,
    cgroups: Iterable[SandboxCgroup | None],
    control_dir: Path,
    kill_timeout: float,
    log_tail_as: str | None = None,
) -> None:
    """A guest's end, shielded, for every runtime with supervisors: end its supervisor (which kills
    and reaps the guest), then remove its cgroup leaves (killing anything left) and its control
    directory. `log_tail_as` ("its VMM"): log what the supervisor wrote to its log (nothing
    unless it failed) under that name first."""
    with trio.CancelScope(shield=True):
        if supervisor is not None:
            await supervisor.end(kill_timeout)
        if log_tail_as is not None and (said := log_tail(control_dir).strip()):
            log.warning("sandbox %s: %s logged: %s", control_dir.name, log_tail_as, said)
        for cgroup in cgroups:
            if cgroup is not None:
                await trio.to_thread.run_sync(cgroup.remove)
        await trio.to_thread.run_sync(shutil.rmtree, control_dir, True)


def supervisor_command(module: str = SUPERVISOR_MODULE) -> tuple[list[str], dict[str, str]]:
    """How to start a supervisor running this very code: the interpreter of this service's venv
    by its real path (a venv link swapped by `cube upgrade` does not change what an older
    supervisor imports), with this package on its path, and only there: `-P`, or `-m` would put
    the service's working directory first on the path (another checkout's `appliance` there,
    or anyone's who can write to that directory, would run as root in every supervisor)."""
    prefix = Path(sys.prefix).resolve()
    python = prefix / "bin" / "python3" if sys.prefix != sys.base_prefix else Path(sys.executable)
    package_root = Path(appliance.__file__).resolve().parents[1]
    return [str(python), "-P", "-m", module], {
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
        """Until the supervisor has exited and is reaped: here if it is this service's child, else
        by its parent (the zygote that forked it, or the host's init for a previous service's),
        waited for up to REAPED_TIMEOUT_S."""
        await trio.lowlevel.wait_readable(self.pidfd)
        try:
            os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
            return
        except ChildProcessError:
            pass
        with trio.move_on_after(REAPED_TIMEOUT_S):
            while True:
                try:
                    signal.pidfd_send_signal(self.pidfd, 0)  # succeeds until it is reaped
                except ProcessLookupError:
                    return
                await trio.sleep(REAPED_POLL_S)

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


async def launch(spec: LaunchSpec, timeout: float, zygote: Zygote | None = None) -> SupervisorClient:
    """Start the supervisor for `spec` (its control directory made here) and return once it
    runs its guest's launcher; SupervisorGone with what it said if it does not get there.
    Forked by `zygote` if it is given and answers, else exec'd."""
    control_dir = Path(spec.control_dir)
    control_dir.mkdir(mode=0o700)
    with _spec_memfd(spec.encode()) as spec_fd:
        if zygote is not None and zygote.running:
            try:
                return await zygote.fork(control_dir, spec_fd, spec.seccomp_fd, timeout)
            except ZygoteGone as exc:
                log.warning("the supervisor zygote is gone (%s): starting the supervisor by exec", exc)
        return await _exec(control_dir, SUPERVISOR_MODULE, spec_fd, spec.seccomp_fd, timeout)


async def start(
    control_dir: Path, module: str, spec: bytes, pass_fd: int, timeout: float
) -> SupervisorClient:
    """Start `python -m module` as the supervisor of `control_dir` (made here), `spec` on its
    stdin and `pass_fd` inherited, and return once it said who it is (its last line on stdout
    before it logs to its file); SupervisorGone with what it said if it does not get there."""
    control_dir.mkdir(mode=0o700)
    with _spec_memfd(spec) as spec_fd:
        return await _exec(control_dir, module, spec_fd, pass_fd, timeout)


@contextlib.contextmanager
def _spec_memfd(spec: bytes) -> Iterator[int]:
    assert len(spec) <= MAX_SPEC_BYTES
    fd = os.memfd_create("cube-launch-spec", os.MFD_CLOEXEC)
    try:
        os.write(fd, spec)
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


async def _exec(
    control_dir: Path, module: str, spec_fd: int, pass_fd: int, timeout: float
) -> SupervisorClient:
    argv, env = supervisor_command(module)
    process = spawn(argv, env, pass_fd, stdin=spec_fd)
    said, timed_out = await _handshake(process.console, timeout)
    identity = _identity(said)
    if identity is None:
        if timed_out:
            os.kill(process.pid, signal.SIGKILL)
        await process.wait()
        raise _failed_to_start(said, timed_out)
    process.release()  # the client reaps it through its own pidfd
    if identity.pid != process.pid:
        raise SupervisorGone(f"the supervisor reported pid {identity.pid}, not {process.pid}")
    return SupervisorClient.attach(control_dir)


async def _handshake(console: trio.lowlevel.FdStream, timeout: float) -> tuple[bytes, bool]:
    """What a starting supervisor said until it closed its end (it logs to its file from then
    on), and whether it timed out first."""
    said = bytearray()
    with trio.move_on_after(timeout) as waited:
        async for chunk in console:
            said += chunk[: HANDSHAKE_LIMIT_BYTES - len(said)]
    await console.aclose()
    return bytes(said), waited.cancelled_caught


def _identity(said: bytes) -> ProcessIdentity | None:
    """Who the supervisor said it is: its last line."""
    try:
        return ProcessIdentity.from_json(_json(said.strip().rsplit(b"\n", 1)[-1]))
    except ValueError:
        return None


def _failed_to_start(said: bytes, timed_out: bool) -> SupervisorGone:
    text = said.decode(errors="replace")[-2000:] or "nothing"
    what = "did not start in time" if timed_out else "failed to start"
    return SupervisorGone(f"the supervisor {what}; it said: {text}")


class ZygoteGone(Exception):
    """The zygote did not answer a fork request (nothing was started)."""


class Zygote:
    """The service's supervisor zygote (zygote.py): started once, forks a supervisor per boot.

    Requests go one at a time (a lock: each reply is the answer to the request before it);
    one that is not answered in full marks the zygote gone, and launches exec from then on."""

    def __init__(self, process: SpawnedProcess, channel: trio.socket.SocketType) -> None:
        self._process = process
        self._channel = channel
        self._lock = trio.Lock()
        self.running = True

    @classmethod
    def start(cls) -> Zygote:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv, env = supervisor_command()
            process = spawn([*argv, ZYGOTE_ARGUMENT], env, theirs.fileno(), stdin=theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(process, trio.socket.from_stdlib_socket(ours))

    async def fork(self, control_dir: Path, spec_fd: int, pass_fd: int, timeout: float) -> SupervisorClient:
        """A supervisor forked for the spec in `spec_fd`, `pass_fd` at the spec's fd number."""
        read_end, write_end = os.pipe()
        try:
            pid, pidfd = await self._request([spec_fd, write_end, pass_fd])
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        try:
            said, timed_out = await _handshake(trio.lowlevel.FdStream(read_end), timeout)
            identity = _identity(said)
            if identity is None:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                await trio.lowlevel.wait_readable(pidfd)  # the zygote reaps it
                raise _failed_to_start(said, timed_out)
        finally:
            os.close(pidfd)
        if identity.pid != pid:
            raise SupervisorGone(f"the supervisor reported pid {identity.pid}, not {pid}")
        return SupervisorClient.attach(control_dir)

    async def _request(self, fds: list[int]) -> tuple[int, int]:
        async with self._lock:
            if not self.running:
                raise ZygoteGone("it ended")
            # Shielded: a request cancelled between its send and its reply would leave that
            # reply for the next request.
            with trio.CancelScope(shield=True), trio.move_on_after(ZYGOTE_REPLY_TIMEOUT_S):
                try:
                    await self._channel.sendmsg(
                        [FORK_REQUEST], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    )
                    message, ancillary, _, _ = await self._channel.recvmsg(
                        MAX_FORK_REQUEST_BYTES, socket.CMSG_SPACE(_FD_BYTES)
                    )
                except OSError as exc:
                    self.running = False
                    raise ZygoteGone(f"{exc!r}; it said: {self._said()}") from exc
                try:
                    return _fork_reply(message, ancillary)
                except ZygoteGone as exc:
                    self.running = message.startswith(b"error:")  # it refused this one; else it is gone
                    raise ZygoteGone(f"{exc}; it said: {self._said()}") from exc
            self.running = False
            raise ZygoteGone(f"no answer within {ZYGOTE_REPLY_TIMEOUT_S:.0f} s")

    def _said(self) -> str:
        """What the zygote wrote to its stdout/stderr (a traceback, if it died of one)."""
        try:
            return os.read(self._process.console.fileno(), HANDSHAKE_LIMIT_BYTES).decode(errors="replace")
        except OSError:
            return "nothing"

    @property
    def pid(self) -> int:
        return self._process.pid

    def close(self) -> None:
        """Close its channel (it exits on that) and reap it."""
        self.running = False
        self._channel.close()
        self._process.end(ZYGOTE_EXIT_TIMEOUT_S)


_FD_BYTES = array.array("i").itemsize


def _fork_reply(message: bytes, ancillary: list[tuple[int, int, bytes]]) -> tuple[int, int]:
    """(pid, pidfd) out of the zygote's reply; ZygoteGone if it is not one."""
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % _FD_BYTES])
    if len(fds) == 1 and message.isdigit():
        return int(message), fds[0]
    for fd in fds:
        os.close(fd)
    raise ZygoteGone((message or b"it closed its channel").decode(errors="replace"))


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
