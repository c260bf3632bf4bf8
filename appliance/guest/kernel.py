"""What the code interpreter needs from a language kernel, and how kernel processes are spawned."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from appliance.guest.spawn import identity_options
from appliance.guest.users import User

# One NDJSON object of the /execute stream (PROTOCOL.md §4.1).
Emit = Callable[[dict[str, object]], Awaitable[None]]
KERNEL_START_TIMEOUT_S = 120.0
# How long a cell interrupted because its client left may take to wind down (keeping the
# kernel's state) before the context takes the next request or the kernel is restarted instead.
INTERRUPT_GRACE_S = 5.0


class KernelStartError(Exception):
    pass


def start_failure(exc: BaseException) -> KernelStartError | None:
    """The KernelStartError that `exc` amounts to, also when a nursery wrapped it in a group
    (a deadline while starting counts as one); None if `exc` is anything else."""
    if isinstance(exc, KernelStartError):
        return exc
    if isinstance(exc, trio.TooSlowError):
        return KernelStartError("the kernel did not answer in time")
    if isinstance(exc, BaseExceptionGroup):
        failures, rest = exc.split((KernelStartError, trio.TooSlowError))
        if failures is not None and rest is None:
            return start_failure(failures.exceptions[0])  # a nested group: split again
    return None


@dataclass(frozen=True)
class KernelSpec:
    """Where and as whom a kernel runs."""

    user: User
    cwd: str
    env: dict[str, str]  # the kernel process's whole environment
    runtime_dir: str  # a private directory for connection files and sockets
    sandbox_env: dict[str, str] = field(default_factory=dict)  # of it, the sandbox's own (/init) vars


def output_event(stream: str, text: str) -> dict[str, object]:
    return {"type": stream, "text": text, "timestamp": time.time_ns()}


def died_event(language: str) -> dict[str, object]:
    return {
        "type": "error",
        "name": "DeadKernelError",
        "value": f"The {language} kernel died during execution; it is restarted on the next call.",
        "traceback": "",
    }


async def discard_event(event: dict[str, object]) -> None:
    """Where an interrupted cell's last events go: its client is gone."""


async def spawn_kernel_process(argv: list[str], spec: KernelSpec, **streams: object) -> trio.Process:
    """Start a kernel in its own session as the spec's user, so it and its children can be killed together."""
    options: dict[str, object] = {
        "cwd": spec.cwd,
        "env": spec.env,
        "start_new_session": True,
        "stdin": subprocess.DEVNULL,
        "stdout": subprocess.DEVNULL,
        **streams,
    }
    spawn_argv, identity = identity_options(spec.user, argv)
    try:
        return await trio.lowlevel.open_process(spawn_argv, **options, **identity)  # type: ignore[call-overload]
    except OSError as exc:
        raise KernelStartError(f"cannot start {argv[0]}: {exc}") from exc


def kill_process_group(process: trio.Process) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


Reply = TypeVar("Reply")


class Kernel(Generic[Reply]):
    """A language kernel process; `run` owns it for its whole life (started → died or stopped).

    Both kernels route replies the same way: each request waits on its own channel, keyed by
    the request's id; a None on it means the kernel died.
    """

    language = ""

    def __init__(self, spec: KernelSpec) -> None:
        self.spec = spec
        self.alive = False
        self.cancel_scope = trio.CancelScope()
        self.rng_generation = 0  # the agent state's rng_generation its generators were seeded at
        self._waiters: dict[object, trio.MemorySendChannel[Reply | None]] = {}

    def _wait_for(self, request_id: object) -> trio.MemoryReceiveChannel[Reply | None]:
        """The replies to one request (unbounded: the router must never block on a slow reader)."""
        send_channel, receive_channel = trio.open_memory_channel[Reply | None](math.inf)
        self._waiters[request_id] = send_channel
        return receive_channel

    def _stop_waiting(self, request_id: object) -> None:
        del self._waiters[request_id]

    def _deliver(self, request_id: object, reply: Reply) -> None:
        channel = self._waiters.get(request_id)
        if channel is not None:
            channel.send_nowait(reply)

    def _notify_died(self) -> None:
        for channel in self._waiters.values():
            channel.send_nowait(None)

    async def _reap(self, process: trio.Process | None) -> None:
        """The end of `run`: waiters learn the kernel is gone, and its whole process group goes."""
        self.alive = False
        self._notify_died()
        if process is not None:
            kill_process_group(process)
            with trio.CancelScope(shield=True):
                await process.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError

    async def execute(self, code: str, env_vars: dict[str, str], emit: Emit) -> None:
        raise NotImplementedError

    def update_env(self, env_vars: dict[str, str]) -> None:
        """Apply sandbox env vars to the running kernel, ordered before any later execution."""
        raise NotImplementedError

    def reseed(self) -> None:
        """Fresh seeds for the kernel's own random generators before its next execution: a
        kernel that was running when a snapshot was taken is running in every clone of it,
        with the same generator state. Kernels that hold none keep this no-op."""

    def stop(self) -> None:
        self.alive = False  # at once: the next execution must not pick this kernel
        self.cancel_scope.cancel()
