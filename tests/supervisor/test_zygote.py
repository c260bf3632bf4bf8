"""The supervisor zygote (runtime/supervisor/zygote.py): a forked supervisor is what an exec'd
one is (no fd of the zygote's or of another request's, its own session, its own cgroup leaf),
and a zygote that is gone or refuses leaves launches to exec."""

from __future__ import annotations

import array
import os
import re
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from appliance.runtime.supervisor.client import SupervisorClient, Zygote
from appliance.runtime.supervisor.protocol import Op

if TYPE_CHECKING:
    from conftest import LaunchFakeGuest

READY = "echo CUBE-AGENT-READY; echo CUBE-INTERPRETER-READY; exec sleep 600"


def open_files(supervisor: SupervisorClient) -> list[str]:
    """What each fd of `supervisor` is, inode numbers and its sandbox id left out."""
    kinds = []
    for fd in sorted(Path(f"/proc/{supervisor.record.pid}/fd").iterdir(), key=lambda p: int(p.name)):
        try:
            target = os.readlink(fd).replace(supervisor.sandbox_id, "<sandbox>")
            kinds.append(re.sub(r":\[\d+\]$", "", target))
        except FileNotFoundError:
            continue
    return sorted(kinds)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


async def test_a_forked_supervisor_holds_what_an_exec_d_one_does(launch_fake_guest: LaunchFakeGuest) -> None:
    zygote = Zygote.start()
    try:
        async with launch_fake_guest(READY, None) as exec_d, launch_fake_guest(READY, zygote) as forked:
            for supervisor in (exec_d, forked):
                with trio.fail_after(30):
                    while not (await supervisor.request(Op.STATE)).state.interpreter_ready:  # type: ignore[union-attr]
                        await trio.sleep(0.05)
            assert parent_of(forked.record.pid) == zygote.pid
            # The same fds (none of the zygote's channel, none of the other request's) ...
            assert open_files(forked) == open_files(exec_d)
            # ... its own session, and its own cgroup leaf (not the zygote's, the service's).
            assert os.getsid(forked.record.pid) == forked.record.pid
            own = Path(f"/proc/{forked.record.pid}/cgroup").read_text()
            assert own != Path(f"/proc/{zygote.pid}/cgroup").read_text()
            assert forked.sandbox_id in own
            # Default signal dispositions, as exec leaves them (the zygote catches SIGCHLD).
            assert status_of(forked.record.pid)["SigCgt"] == status_of(exec_d.record.pid)["SigCgt"]
    finally:
        zygote.close()
    assert not Path(f"/proc/{zygote.pid}").exists()


async def test_launches_are_exec_d_once_the_zygote_is_gone(launch_fake_guest: LaunchFakeGuest) -> None:
    zygote = Zygote.start()
    try:
        os.kill(zygote.pid, signal.SIGKILL)
        async with launch_fake_guest(READY, zygote) as supervisor:
            assert not zygote.running
            assert parent_of(supervisor.record.pid) == os.getpid()  # exec'd by this process
    finally:
        zygote.close()


async def test_a_malformed_request_is_refused_and_the_zygote_serves_on(
    launch_fake_guest: LaunchFakeGuest,
) -> None:
    zygote = Zygote.start()
    try:
        channel = zygote._channel  # the service's end: what a confused caller could send on it
        await channel.send(b"fork")  # no fds
        reply = await channel.recv(64)
        assert reply.startswith(b"error:")
        r, w = os.pipe()
        try:
            fds = array.array("i", [r, w, r])
            await channel.sendmsg([b"exec /bin/sh"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        finally:
            os.close(r)
            os.close(w)
        assert (await channel.recv(64)).startswith(b"error:")
        async with launch_fake_guest(READY, zygote) as supervisor:
            assert zygote.running
            assert parent_of(supervisor.record.pid) == zygote.pid
    finally:
        zygote.close()


@pytest.fixture(autouse=True)
def _root_only(short_dir: Path) -> None:
    """(short_dir skips without root.)"""
