"""Starting the launcher chain (and a sandbox's supervisor) from the Trio thread itself, and
waiting for it with a pidfd.

Why not `trio.lowlevel.open_process`: it forks from a worker thread, and
PR_SET_PDEATHSIG (which makes guests die with the service) fires when the
parent *thread* exits — Trio retires idle worker threads after seconds, which
SIGKILLed healthy guests. `os.posix_spawn` (vfork-based in glibc, so about a
millisecond even from a large process) from the Trio thread makes that thread,
which lives as long as the service, the parent.
"""

from __future__ import annotations

import os
import select
import signal

import trio


class SpawnedProcess:
    """A child process: its console pipe and its exit, awaitable from Trio."""

    def __init__(self, pid: int, console: trio.lowlevel.FdStream) -> None:
        self.pid = pid
        self.console = console
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)
        self._lock = trio.Lock()  # one waiter on the pidfd at a time

    async def wait(self) -> int:
        """Wait for the exit, reap it, return the status (negative: killed by that signal)."""
        async with self._lock:
            if self.returncode is None:
                await trio.lowlevel.wait_readable(self._pidfd)
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
                os.close(self._pidfd)
        return self.returncode

    def end(self, timeout: float) -> None:
        """Blocking, for a process told to exit: wait at most `timeout` for it, SIGKILL it past
        that, reap it, close its console."""
        if self.returncode is None:
            if not select.select([self._pidfd], [], [], timeout)[0]:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
            os.close(self._pidfd)
        self.console.close()

    def release(self) -> None:
        """Stop watching a process that runs on (its new owner reaps it: runtime/supervisor)."""
        if self.returncode is None:
            os.close(self._pidfd)


def spawn(argv: list[str], env: dict[str, str], pass_fd: int, stdin: int | None = None) -> SpawnedProcess:
    """Start `argv` with stdin from `stdin` (else /dev/null), stdout+stderr into a pipe, and
    `pass_fd` inherited."""
    read_end, write_end = os.pipe()  # both close-on-exec
    try:
        # posix_spawn, unlike subprocess, keeps every inheritable fd: close the
        # ones some library left inheritable, so the guest gets none of them.
        strays = [
            (os.POSIX_SPAWN_CLOSE, fd)
            for fd in _open_fds()
            if fd > 2 and fd not in (pass_fd, stdin) and _inheritable(fd)
        ]
        os.set_inheritable(pass_fd, True)
        pid = os.posix_spawnp(
            argv[0],
            argv,
            env,
            file_actions=[
                *strays,
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)
                if stdin is None
                else (os.POSIX_SPAWN_DUP2, stdin, 0),
                (os.POSIX_SPAWN_DUP2, write_end, 1),
                (os.POSIX_SPAWN_DUP2, write_end, 2),
            ],
            setsid=True,  # no terminal signals from the service's session
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
        os.set_inheritable(pass_fd, False)
    return SpawnedProcess(pid, trio.lowlevel.FdStream(read_end))


def _open_fds() -> list[int]:
    return [int(name) for name in os.listdir("/proc/self/fd")]


def _inheritable(fd: int) -> bool:
    try:
        return os.get_inheritable(fd)
    except OSError:
        return False  # the fd listing /proc/self/fd itself, closed by now
