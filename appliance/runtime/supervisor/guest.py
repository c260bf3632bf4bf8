"""The guest's processes as its supervisor sees them: the launcher chain, its pid-namespace
init, and killing all of it with nothing left unreaped.

The supervisor is a child subreaper (`become_subreaper`): a guest init whose bwrap died
before reaping it (killed in the instant bwrap forks it, or bwrap SIGKILLed) is orphaned
to the supervisor, not to the host's pid 1, and `reap_orphans` reaps it. So no zombie of
the sandbox's uid outlives its supervisor, and that uid can be given to the next sandbox.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from pathlib import Path

import trio

from appliance.runtime.uml.cgroups import SandboxCgroup
from appliance.runtime.uml.process import SpawnedProcess

log = logging.getLogger(__name__)

# Killing the pid-namespace init tears the whole guest down; past this, kill the cgroup's processes.
REAP_TIMEOUT_S = 10.0
REAP_POLL_S = 0.01


class GuestInit:
    """A pidfd on the guest's pid-namespace init (the UML kernel process: `bwrap --as-pid-1`),
    taken once the guest runs.

    When the guest exits on its own, bwrap's outer process (the supervisor's child) exits as
    soon as the init reports the exit status, before the init itself is reaped: it is then an
    orphan of the host's pid 1. A pidfd outlives pid reuse, so polling it (one syscall) tells
    when it is finally reaped, without scanning /proc.
    """

    def __init__(self) -> None:
        self.pidfd: int | None = None

    def watch(self, launcher_pid: int) -> None:
        for pid in children(launcher_pid):
            try:
                self.pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                pass
            return

    def kill(self) -> bool:
        """SIGKILL it (the kernel then kills everything in the namespace); False if not watched."""
        if self.pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return True

    async def wait_reaped(self, timeout: float) -> None:
        if self.pidfd is None:
            return
        with trio.move_on_after(timeout):
            while True:
                try:
                    signal.pidfd_send_signal(self.pidfd, 0)  # succeeds until it is reaped (zombie too)
                except ProcessLookupError:
                    break
                await trio.sleep(REAP_POLL_S)
        os.close(self.pidfd)
        self.pidfd = None


async def kill_and_reap(process: SpawnedProcess, cgroup: SandboxCgroup, guest_init: GuestInit) -> None:
    """Kill the guest and return once every one of its processes is reaped, zombies included.

    The launcher chain ends as bwrap's outer process (the supervisor's child), whose only
    child is the guest's pid-namespace init. SIGKILL to that init makes the kernel kill
    everything in the namespace, and the init's exit waits until all of it is reaped; the
    outer bwrap then reaps the init and exits, and its pidfd (`process.wait()`) fires. So no
    zombie of the sandbox uid outlives this (a uid is reused only after), and nothing polls
    /proc. Killing the whole cgroup at once instead would orphan the init's zombie to the
    host's pid 1. Before bwrap has forked (killed while launching) the chain is one process;
    anything left after a bounded wait is SIGKILLed through the cgroup.
    """
    if process.returncode is None:
        if not guest_init.kill():
            for pid in children(process.pid) or [process.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        with trio.move_on_after(REAP_TIMEOUT_S):
            await process.wait()
    else:
        guest_init.kill()  # the guest exited on its own: its init may still be tearing down
    await guest_init.wait_reaped(REAP_TIMEOUT_S)
    await _kill_cgroup(cgroup, process.pid)
    await process.wait()


async def _kill_cgroup(cgroup: SandboxCgroup, launcher_pid: int) -> None:
    """SIGKILL whatever is left in the guest's leaves until they are empty, reaping those of them
    that are the supervisor's own (orphans: a zombie stays in its cgroup until it is reaped)."""
    with trio.move_on_after(REAP_TIMEOUT_S) as waited:
        while pids := await trio.to_thread.run_sync(cgroup.pids):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    if pid != launcher_pid:  # that one is `SpawnedProcess.wait`'s to reap
                        os.waitpid(pid, os.WNOHANG)
                except (ProcessLookupError, ChildProcessError):
                    pass
            await trio.sleep(REAP_POLL_S)
    if waited.cancelled_caught:
        log.warning("processes %s of the guest survive SIGKILL", sorted(cgroup.pids()))


_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(error)}")


async def reap_orphans(timeout: float = REAP_TIMEOUT_S) -> None:
    """Reap children until none is left (call once the launcher itself is reaped: this reaps any)."""
    with trio.move_on_after(timeout):
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                await trio.sleep(REAP_POLL_S)


def children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return []


async def first_of(*events: trio.Event) -> None:
    """Until any of `events` is set."""
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait, event)
