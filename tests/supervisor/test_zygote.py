"""The supervisor zygote (runtime/supervisor/zygote.py): a forked supervisor is what an exec'd
one is (no socket or pipe of the zygote's or the service's, its own session, its own cgroup leaf),
and a zygote that is gone or refuses leaves launches to exec."""

from __future__ import annotations

import array
import os
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from hostprocs import parent_of

from appliance.runtime.supervisor.client import Zygote
from appliance.runtime.supervisor.protocol import Op

if TYPE_CHECKING:
    from conftest import LaunchFakeGuest

pytestmark = [pytest.mark.root]  # real supervisor processes, cgroup leaves

READY = "echo CUBE-AGENT-READY; echo CUBE-INTERPRETER-READY; exec sleep 600"


def open_files(pid: int) -> set[str]:
    """What the fds of `pid` are (`socket:[123]`, `pipe:[456]`, paths)."""
    targets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            targets.add(os.readlink(fd))
        except FileNotFoundError:
            continue
    return targets


def shared_channels(a: int, b: int) -> set[str]:
    """The sockets and pipes both processes hold (one open file, not one path)."""
    return {t for t in open_files(a) & open_files(b) if t.startswith(("socket:", "pipe:"))}


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


async def test_a_forked_supervisor_is_what_an_exec_d_one_is(launch_fake_guest: LaunchFakeGuest) -> None:
    zygote = Zygote.start()
    try:
        async with launch_fake_guest(READY, None) as exec_d, launch_fake_guest(READY, zygote) as forked:
            for supervisor in (exec_d, forked):
                with trio.fail_after(30):
                    while not (await supervisor.request(Op.STATE)).state.interpreter_ready:  # type: ignore[union-attr]
                        await trio.sleep(0.05)
            assert parent_of(forked.record.pid) == zygote.pid
            # No socket or pipe of the zygote's (its channel, its wakeup pipe), none of the service's.
            assert shared_channels(forked.record.pid, zygote.pid) == set()
            assert shared_channels(forked.record.pid, os.getpid()) == set()
            assert shared_channels(exec_d.record.pid, os.getpid()) == set()
            # Its own session, and its own cgroup leaf (not the zygote's, the service's).
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
