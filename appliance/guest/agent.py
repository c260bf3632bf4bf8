"""The agent's main task: both servers, the default kernel, and the ready lines for the host.

Two console lines, in this order, each alone on its line:
- `CUBE-AGENT-READY`: envd listens (commands, files, /init work) and so does the code
  interpreter's port, whose executions wait for the default kernel.
- `CUBE-INTERPRETER-READY`: the default Python kernel answers (or, with
  --no-interpreter, once the host's first /health probe was answered: there is nothing
  more to start).
  Printed also when that kernel failed to start: the host's wait is over, and the
  next execution retries it and reports the error.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from appliance.guest import INTERPRETER_READY_LINE, READY_LINE, http2, lazy_imports
from appliance.guest.connect import Router
from appliance.guest.envd import EnvdApp
from appliance.guest.http import Request, Response
from appliance.guest.http_server import serve
from appliance.guest.memory import release_boot_memory
from appliance.guest.options import AgentOptions
from appliance.guest.state import AgentState
from appliance.guest.users import UnknownUser

if TYPE_CHECKING:
    from appliance.guest.interpreter import Interpreter

# How long the rest of start-up (the default kernel first) waits for the host's first /health
# probe (which follows the ready line at once); an agent nobody probes goes on after this anyway.
FIRST_HEALTH_WAIT_S = 1.0


def log(message: str) -> None:
    print(f"cube-agent: {message}", file=sys.stderr, flush=True)


def _uptime() -> str:
    """Seconds since the (guest) kernel booted: where the boot time goes, in the console log."""
    try:
        with open("/proc/uptime") as f:
            return f"{float(f.read().split()[0]):.2f} s"
    except (OSError, ValueError, IndexError):
        return "unknown"


class LazyInterpreter:
    """The code interpreter's port, listening from the start; its modules load after the ready
    line (start-up time), and requests that come earlier wait for them."""

    def __init__(self) -> None:
        self.interpreter: Interpreter | None = None
        self.created = trio.Event()

    def create(self, state: AgentState, nursery: trio.Nursery, runtime_dir: str) -> Interpreter:
        from appliance.guest.interpreter import Interpreter

        self.interpreter = Interpreter(state, nursery, runtime_dir)
        self.created.set()
        return self.interpreter

    async def handle(self, request: Request, response: Response) -> None:
        await self.created.wait()
        assert self.interpreter is not None
        await self.interpreter.handle(request, response)

    async def update_env(self, env_vars: dict[str, str]) -> None:
        """Kernels started later read the sandbox env vars from the state; only running ones need them."""
        if self.interpreter is not None:
            await self.interpreter.update_env(env_vars)


def _lazy_services(state: AgentState, nursery: trio.Nursery) -> dict[str, Callable[[Router], None]]:
    def process(router: Router) -> None:
        from appliance.guest.process_service import ProcessService

        ProcessService(state, nursery).register(router)

    def filesystem(router: Router) -> None:
        from appliance.guest.filesystem_service import FilesystemService

        FilesystemService(nursery).register(router)

    return {"/process.Process/": process, "/filesystem.Filesystem/": filesystem}


async def run_agent(options: AgentOptions) -> None:
    state = AgentState(default_user=options.default_user, boot_token=options.boot_token)
    if options.boot_token is None:
        log("no boot token (cube.agent_token= on the kernel command line): every call but /health is refused")
    runtime_dir: str | None = None  # the kernels' connection files; made after start-up
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            router = Router(lazy_services=_lazy_services(state, nursery))
            interpreter = LazyInterpreter() if options.interpreter else None
            envd = EnvdApp(state, router, interpreter.update_env if interpreter else _no_kernels)
            await nursery.start(serve, envd.handle, options.host, options.envd_port)
            if interpreter is not None:
                await nursery.start(serve, interpreter.handle, options.host, options.interpreter_port)
            print(READY_LINE, flush=True)
            log(f"envd ready (system uptime {_uptime()})")
            # Nothing else until the host has its answer: on a guest's one vCPU, any work
            # now (the default kernel above all) would delay the answer to its first /health
            # probe, which follows the ready line at once.
            with trio.move_on_after(FIRST_HEALTH_WAIT_S):
                await envd.health_answered.wait()
            _finish_start_up()
            if interpreter is not None:
                runtime_dir = tempfile.mkdtemp(prefix="cube-agent-")
                # Kernels running as the default user must reach their own (private) directories inside.
                os.chmod(runtime_dir, 0o711)
                started = interpreter.create(state, nursery, runtime_dir)
                nursery.start_soon(_start_default_kernel, started, options.lazy_default_kernel)
                # Executions wait for it (default_ready).
                await started.default_ready.wait()
            print(INTERPRETER_READY_LINE, flush=True)
            log(f"interpreter ready (system uptime {_uptime()})")
            await release_boot_memory()
    finally:
        if runtime_dir is not None:
            shutil.rmtree(runtime_dir, ignore_errors=True)


def _finish_start_up() -> None:
    """What start-up left for later (see __main__.start): the modules it deferred, which
    served requests need; then the cyclic GC, with what start-up made (modules, classes: all
    kept for good) frozen out of its collections."""
    lazy_imports.preload()
    http2.available()  # says on stderr if h2c cannot be served
    gc.freeze()
    gc.enable()


async def _no_kernels(env_vars: dict[str, str]) -> None:
    """With --no-interpreter, /init has no kernels to update."""


async def _start_default_kernel(interpreter: Interpreter, lazily: bool) -> None:
    from appliance.guest.interpreter import InterpreterError

    try:
        await interpreter.start_default(lazily=lazily)
    except (InterpreterError, UnknownUser) as exc:
        log(f"the default Python kernel did not start (the next execution retries): {exc}")


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log(f"stopping on {signal.Signals(signum).name}")
            scope.cancel()
            return
