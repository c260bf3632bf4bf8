"""The per-sandbox supervisor as a real process, with `sh -c script` for a guest: what it
reports, how it ends its guest, how it ends itself, and its control socket under attack."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from appliance.process_identity import ProcessIdentity
from appliance.runtime.supervisor.client import SupervisorClient, SupervisorGone
from appliance.runtime.supervisor.control import MAX_CONNECTIONS, REQUEST_READ_TIMEOUT_S
from appliance.runtime.supervisor.protocol import (
    CONTROL_SOCKET,
    EXIT_FILE,
    MAX_REQUEST_BYTES,
    RECORD_FILE,
    GuestState,
    Op,
    Reply,
    SupervisorRecord,
    decode_exit,
)

if TYPE_CHECKING:
    from conftest import FakeGuest

READY = "echo CUBE-AGENT-READY; echo CUBE-INTERPRETER-READY; "
NOBODY = 65534


async def state_of(supervisor: SupervisorClient) -> GuestState:
    reply = await supervisor.request(Op.STATE)
    assert reply.ok and reply.state is not None, reply
    return reply.state


async def until_ready(supervisor: SupervisorClient) -> GuestState:
    with trio.fail_after(30):
        while not (state := await state_of(supervisor)).interpreter_ready:
            await trio.sleep(0.05)
    return state


async def test_reports_the_guest_answers_console_and_metrics_and_kills_it(fake_guest: FakeGuest) -> None:
    async with fake_guest(READY + "echo 'last words'; exec sleep 600") as supervisor:
        state = await until_ready(supervisor)
        assert (state.first_output, state.agent_ready, state.paused, state.exit) == (True, True, False, None)
        console = await supervisor.request(Op.CONSOLE, max_bytes=10)
        assert console.ok and console.console == "ast words\n"
        metrics = await supervisor.request(Op.METRICS)
        assert metrics.ok and metrics.metrics is not None
        assert metrics.metrics["console_bytes"] > 0 and metrics.metrics["uptime_s"] > 0
        assert metrics.metrics["memory_bytes"] > 0  # the guest's cgroup is charged
        watched: list[GuestState] = []
        async with supervisor.watch() as states:
            watched.append(await states.next())  # type: ignore[arg-type]
            killed = await supervisor.request(Op.KILL)
            while (state_or_end := await states.next()) is not None:
                watched.append(state_or_end)
        assert killed.ok and killed.state is not None and killed.state.exit is not None
        assert killed.state.exit.reason == "killed by its owner"
        assert "last words" in killed.state.exit.console_tail
        assert watched[0].exit is None and watched[-1].exit == killed.state.exit
        with trio.fail_after(30):
            await supervisor.wait_exited()
        exit_record = decode_exit((supervisor.control_dir / EXIT_FILE).read_bytes())
        assert exit_record == killed.state.exit  # for a service that was not there to hear it
        assert not (supervisor.control_dir / CONTROL_SOCKET).exists()


async def test_a_guest_that_exits_ends_its_supervisor_with_its_status(fake_guest: FakeGuest) -> None:
    async with fake_guest("echo CUBE-AGENT-READY; sleep 0.5; echo bye; exit 3") as supervisor:
        with trio.fail_after(30):
            await supervisor.wait_exited()
        ended = decode_exit((supervisor.control_dir / EXIT_FILE).read_bytes())
        assert ended.status == 3 and ended.reason == "UML exited with status 3"
        assert ended.console_tail.endswith("bye\n")
        with pytest.raises(SupervisorGone, match="its guest ended while no service ran"):
            SupervisorClient.attach(supervisor.control_dir)


async def test_sigterm_ends_the_guest_then_the_supervisor(fake_guest: FakeGuest) -> None:
    async with fake_guest(READY + "exec sleep 600") as supervisor:
        await until_ready(supervisor)
        os.kill(supervisor.record.pid, signal.SIGTERM)
        with trio.fail_after(30):
            await supervisor.wait_exited()
        assert decode_exit((supervisor.control_dir / EXIT_FILE).read_bytes()).reason == "killed by its owner"


async def test_orphans_of_the_guest_are_its_supervisor_s_and_reaped(fake_guest: FakeGuest) -> None:
    """A process of the guest whose parent died goes to the supervisor (a subreaper), not to the
    host's pid 1, and is reaped there when the guest is killed: no zombie of a sandbox outlives it."""
    async with fake_guest(READY + "(sleep 601 & echo orphan=$!); exec sleep 600") as supervisor:
        await until_ready(supervisor)
        with trio.fail_after(30):
            while "orphan=" not in (tail := (await supervisor.request(Op.CONSOLE)).console or ""):
                await trio.sleep(0.05)
        orphan = int(tail.split("orphan=")[1].split()[0])
        status = Path(f"/proc/{orphan}/status").read_text()
        assert f"\nPPid:\t{supervisor.record.pid}\n" in status
        await supervisor.request(Op.KILL)
        with trio.fail_after(30):
            await supervisor.wait_exited()
        assert not Path(f"/proc/{orphan}").exists()


async def test_pause_without_an_mconsole_fails_and_the_guest_runs_on(fake_guest: FakeGuest) -> None:
    async with fake_guest(READY + "exec sleep 600") as supervisor:
        await until_ready(supervisor)
        paused = await supervisor.request(Op.PAUSE)
        assert not paused.ok and "mconsole" in paused.error
        state = await state_of(supervisor)
        assert not state.paused and state.exit is None


# The control socket is a boundary: root only, bounded requests, nothing changes on bad input.


def _as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-S",
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1] if len(sys.argv) > 1 else {path!r})
except OSError as e:
    print("refused", e.errno)
    raise SystemExit(0)
try:
    s.sendall(b'{{"op": "state"}}\\n')
except BrokenPipeError:
    pass  # refused before the request: the refusal is still there to read
print("answer", s.recv(65536).decode())
"""


async def test_other_users_cannot_reach_the_socket(fake_guest: FakeGuest) -> None:
    async with fake_guest(READY + "exec sleep 600") as supervisor:
        path = supervisor.control_dir / CONTROL_SOCKET
        assert os.stat(supervisor.control_dir).st_mode & 0o777 == 0o700
        assert os.stat(supervisor.control_dir.parent).st_mode & 0o777 == 0o700
        assert os.stat(path).st_mode & 0o777 == 0o600
        tried = _as_nobody(CONNECT.format(path=str(path)))
        assert tried.stdout.split() == ["refused", "13"], tried  # EACCES: the directory
        assert (await state_of(supervisor)).exit is None


async def test_a_non_root_peer_is_refused_even_through_an_opened_socket(fake_guest: FakeGuest) -> None:
    """Directory modes are one wall; the supervisor checks who is calling (SO_PEERCRED) too."""
    async with fake_guest(READY + "exec sleep 600") as supervisor:
        path = supervisor.control_dir / CONTROL_SOCKET
        for opened in (*reversed(supervisor.control_dir.parents[:3]), supervisor.control_dir):
            os.chmod(opened, 0o755)  # /tmp/cubesup-*, its run/, supervisors/ and the control directory
        os.chmod(path, 0o777)
        tried = _as_nobody(CONNECT.format(path=str(path)))
        assert tried.stdout.startswith("answer "), tried
        answer = Reply.decode(tried.stdout.removeprefix("answer ").strip().encode())
        assert not answer.ok and answer.error == "permission denied: root only", tried
        assert answer.state is None  # nothing about the guest leaks
        assert (await state_of(supervisor)).exit is None


async def _raw(path: Path, data: bytes, *, close_write: bool = True) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REQUEST_READ_TIMEOUT_S * 4)
        await trio.to_thread.run_sync(sock.connect, str(path))
        if data:
            sock.sendall(data)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        return await trio.to_thread.run_sync(sock.recv, 65536)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"not json\n", "not JSON"),
        (b'{"op": "exec", "cmd": "sh"}\n', "unknown op"),
        (b'{"op": "kill", "really": true}\n', "unknown request fields"),
        (b"x" * (MAX_REQUEST_BYTES + 1), "over"),
        (b'{"op": "state"}', "before its newline"),
    ],
)
async def test_bad_requests_are_answered_with_the_reason_and_change_nothing(
    fake_guest: FakeGuest, data: bytes, why: str
) -> None:
    async with fake_guest(READY + "exec sleep 600") as supervisor:
        await until_ready(supervisor)
        answer = Reply.decode((await _raw(supervisor.control_dir / CONTROL_SOCKET, data)).strip())
        assert not answer.ok and why in answer.error and answer.state is None
        state = await state_of(supervisor)
        assert state.exit is None and not state.paused


async def test_a_silent_client_is_dropped_and_a_crowd_is_refused(fake_guest: FakeGuest) -> None:
    async with fake_guest(READY + "exec sleep 600") as supervisor:
        await until_ready(supervisor)
        path = supervisor.control_dir / CONTROL_SOCKET
        silent = await _raw(path, b"", close_write=False)  # says nothing: answered, then closed
        assert b"too slow" in silent
        async with AsyncExitStack() as crowd:  # watchers hold their slots until they leave
            for _ in range(MAX_CONNECTIONS):
                states = await crowd.enter_async_context(supervisor.watch())
                assert await states.next() is not None
            refused = Reply.decode((await _raw(path, b'{"op": "state"}\n')).strip())
            assert not refused.ok and refused.error == "too many connections"
        with trio.fail_after(30):
            while not (answer := await supervisor.request(Op.STATE)).ok:  # until the crowd's slots are back
                await trio.sleep(0.1)
        assert answer.state is not None and answer.state.exit is None


async def test_only_the_recorded_process_is_trusted(fake_guest: FakeGuest, short_dir: Path) -> None:
    """A record is believed only for the very process it names (pid and start time), and a
    socket only if that process serves it."""
    async with fake_guest(READY + "exec sleep 600") as supervisor:
        record = supervisor.record
        elsewhere = short_dir / "run" / "supervisors" / record.sandbox_id.replace("sup", "fak")
        elsewhere.mkdir(mode=0o700)
        recycled = SupervisorRecord(elsewhere.name, record.pid, record.start_time + 1, "/", 0.0)
        (elsewhere / RECORD_FILE).write_bytes(recycled.encode())
        with pytest.raises(SupervisorGone, match=f"its supervisor \\(pid {record.pid}\\) is gone"):
            SupervisorClient.attach(elsewhere)  # a reused pid: the start time differs
        me = ProcessIdentity.current()  # a live process, but not the one serving the socket
        impostor = SupervisorRecord(elsewhere.name, me.pid, me.start_time, "/", 0.0)
        (elsewhere / RECORD_FILE).write_bytes(impostor.encode())
        os.symlink(supervisor.control_dir / CONTROL_SOCKET, elsewhere / CONTROL_SOCKET)
        client = SupervisorClient.attach(elsewhere)
        try:
            with pytest.raises(SupervisorGone, match=f"served by pid {record.pid}"):
                await client.request(Op.STATE)
        finally:
            client.close()


async def test_watchers_that_go_away_free_their_slot(fake_guest: FakeGuest) -> None:
    """A service killed while watching its guest must not leave the next one locked out."""
    async with fake_guest(READY + "exec sleep 600") as supervisor:
        await until_ready(supervisor)
        for _ in range(MAX_CONNECTIONS * 2):
            async with supervisor.watch() as states:
                assert await states.next() is not None
        with trio.fail_after(30):
            while not (answer := await supervisor.request(Op.STATE)).ok:
                await trio.sleep(0.05)  # the last watchers' ends are being noticed
        assert answer.state is not None and answer.state.exit is None


async def test_a_watcher_that_leaves_with_states_unread_does_not_end_the_supervisor(
    fake_guest: FakeGuest,
) -> None:
    """A service that dies with states it never read resets its connection (ECONNRESET at the
    supervisor's next read): that ends the watch, not the supervisor and its guest."""
    async with fake_guest("read _ < /dev/null; sleep 1; " + READY + "exec sleep 600") as supervisor:
        async with supervisor.watch() as states:
            first = await states.next()
            assert first is not None and not first.interpreter_ready
            await until_ready(supervisor)  # the watcher's own copies of the changes stay unread
        await trio.sleep(0.5)  # the supervisor reads the reset
        assert (await state_of(supervisor)).interpreter_ready


async def test_more_connections_at_once_than_slots_all_reach_the_supervisor(fake_guest: FakeGuest) -> None:
    """Connections beyond the listen backlog must wait, not half-connect: trio takes a unix
    socket's EAGAIN (backlog full) for a connect in progress and hands back an unconnected socket."""
    async with fake_guest(READY + "exec sleep 600") as supervisor:
        await until_ready(supervisor)

        async def ask() -> None:
            assert (await state_of(supervisor)).interpreter_ready

        async with trio.open_nursery() as nursery:
            for _ in range(MAX_CONNECTIONS * 6):
                nursery.start_soon(ask)


async def test_a_panicked_kernel_is_ended_with_its_panic_line(fake_guest: FakeGuest) -> None:
    """A panicked UML kernel stops without exiting; its supervisor ends it and says why."""
    script = READY + "echo 'Kernel panic - not syncing: Attempted to kill init!'; exec sleep 600"
    async with fake_guest(script) as supervisor:
        with trio.fail_after(30):
            await supervisor.wait_exited()
        ended = decode_exit((supervisor.control_dir / EXIT_FILE).read_bytes())
        assert ended.reason == "Kernel panic - not syncing: Attempted to kill init!"


async def test_a_package_in_the_service_s_working_directory_is_never_imported(
    fake_guest: FakeGuest, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m` puts the working directory first on the path: an `appliance` package planted
    where the service runs (its checkout, or a directory others can write) must not become the
    root supervisor's code."""
    planted = short_dir / "cwd" / "appliance"
    planted.mkdir(parents=True)
    marker = short_dir / "planted-code-ran"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(9)\n")
    monkeypatch.chdir(planted.parent)
    async with fake_guest(READY + "exec sleep 600") as supervisor:
        await until_ready(supervisor)
    assert not marker.exists()
