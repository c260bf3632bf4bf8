"""The supervisor zygote (`python -m appliance.runtime.supervisor zygote`): one process, started
by the service, that has imported everything a supervisor runs (Trio, server.py and what it
imports) and forks a supervisor per boot, instead of an interpreter started and importing
anew for each (~0.15 CPU-seconds and ~15 MiB each on this host's 2 cores; 56 pooled guests).

The service's side is client.Zygote. The channel is a SOCK_SEQPACKET socketpair on the
zygote's stdin; each request is one message carrying three fds (SCM_RIGHTS): the launch
spec (a memfd), the write end of the pipe the service reads the handshake from, and the
seccomp filter the spec names. The zygote forks; the child is then exactly an exec'd
supervisor (server.run): its own session, stdin /dev/null, stdout+stderr the pipe, the
filter at the spec's fd number, no other fd, default signal dispositions. The reply is the
child's pid and a pidfd of it (taken before the zygote could reap it).

A forked supervisor is an ordinary process of its own: it joins its own cgroup leaf at once,
outlives the zygote (re-parented to the host's init, as an exec'd supervisor is when its
service ends), and is adopted after a service restart by its record (pid + start time), the
same as before. The zygote reaps the supervisors that end while it runs, and exits when the
service closes its end of the socket (the service's exit included).
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import sys
import traceback
from typing import NoReturn

from appliance.runtime.supervisor import server
from appliance.runtime.supervisor.protocol import (
    FORK_REQUEST,
    MAX_FORK_REQUEST_BYTES,
    MAX_SPEC_BYTES,
    LaunchSpec,
)

REQUEST_FDS = 3  # spec memfd, handshake pipe, seccomp filter


def serve(channel: socket.socket) -> None:
    """Fork a supervisor per request on `channel` until the service closes it."""
    wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # a byte on the wakeup pipe per child exit
    signal.set_wakeup_fd(wakeup_write)
    poller = select.poll()
    poller.register(channel, select.POLLIN)
    poller.register(wakeup_read, select.POLLIN)
    gc.freeze()  # what the imports made stays shared with every child (no copy-on-write by the GC)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if wakeup_read in ready:
            _drain(wakeup_read)
            _reap_exited()
        if channel.fileno() in ready:
            try:
                message, fds, _, _ = socket.recv_fds(channel, MAX_FORK_REQUEST_BYTES, REQUEST_FDS)
            except OSError:
                return
            if not message and not fds:
                return  # the service closed its end
            _answer(channel, message, fds)


def _answer(channel: socket.socket, message: bytes, fds: list[int]) -> None:
    try:
        if message != FORK_REQUEST or len(fds) != REQUEST_FDS:
            channel.send(b"error: a request is b'fork' and three fds")
            return
        try:
            pid = os.fork()
        except OSError as exc:
            channel.send(f"error: fork: {exc}".encode())
            return
        if pid == 0:
            _become_supervisor(channel, fds)
        pidfd = os.pidfd_open(pid)  # before any reaping: the pid cannot be another process's yet
    finally:
        for fd in fds:
            os.close(fd)
    try:
        socket.send_fds(channel, [str(pid).encode()], [pidfd])
    finally:
        os.close(pidfd)


def _become_supervisor(channel: socket.socket, fds: list[int]) -> NoReturn:
    """In the forked child: become what an exec'd supervisor is at start, and run."""
    status = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        channel.close()
        spec_fd, pipe_fd, seccomp_fd = fds
        os.setsid()
        os.dup2(pipe_fd, 1)
        os.dup2(pipe_fd, 2)
        spec = LaunchSpec.decode(os.pread(spec_fd, MAX_SPEC_BYTES + 1, 0))
        if spec.seccomp_fd <= 2:
            raise ValueError(f"the spec's seccomp fd {spec.seccomp_fd} is a standard stream's")
        if seccomp_fd != spec.seccomp_fd:
            os.dup2(seccomp_fd, spec.seccomp_fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.closerange(3, spec.seccomp_fd)
        os.closerange(spec.seccomp_fd + 1, os.sysconf("SC_OPEN_MAX"))
        server.run(spec)
        status = 0
    except BaseException:  # the child never returns into the zygote's loop
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _reap_exited() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main() -> None:
    serve(socket.socket(fileno=0))
