"""The agent's main task: both servers, the default kernel, and the ready line for the host."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass

import trio

from appliance.guest.connect import Router
from appliance.guest.envd import EnvdApp
from appliance.guest.filesystem_service import FilesystemService
from appliance.guest.http import serve
from appliance.guest.process_service import ProcessService
from appliance.guest.state import AgentState

READY_LINE = "CUBE-AGENT-READY"


@dataclass(frozen=True)
class AgentOptions:
    host: str = "0.0.0.0"
    envd_port: int = 49983
    interpreter_port: int = 49999
    default_user: str = "user"
    interpreter: bool = True


def log(message: str) -> None:
    print(f"cube-agent: {message}", file=sys.stderr, flush=True)


async def _no_kernels(env_vars: dict[str, str]) -> None:
    """With --no-interpreter, /init has no kernels to update."""


async def run_agent(options: AgentOptions) -> None:
    state = AgentState(default_user=options.default_user)
    runtime_dir = tempfile.mkdtemp(prefix="cube-agent-")
    # Kernels running as the default user must reach their own (private) directories inside.
    os.chmod(runtime_dir, 0o711)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            router = Router()
            ProcessService(state, nursery).register(router)
            FilesystemService(nursery).register(router)
            interpreter = None
            if options.interpreter:
                from appliance.guest.interpreter import Interpreter  # lazy: start-up time

                interpreter = Interpreter(state, nursery, runtime_dir)
                # The kernel boots while the servers start: it is the slowest part.
                nursery.start_soon(_start_default_kernel, interpreter)
            envd = EnvdApp(state, router, interpreter.update_env if interpreter else _no_kernels)
            await nursery.start(serve, envd.handle, options.host, options.envd_port)
            if interpreter is not None:
                await nursery.start(serve, interpreter.handle, options.host, options.interpreter_port)
                await interpreter.default_ready.wait()
            print(READY_LINE, flush=True)
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


async def _start_default_kernel(interpreter: object) -> None:
    from appliance.guest.interpreter import Interpreter, InterpreterError

    assert isinstance(interpreter, Interpreter)
    try:
        await interpreter.start_default()
    except InterpreterError as exc:
        log(f"the default Python kernel did not start, so the agent is not ready: {exc}")


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log(f"stopping on {signal.Signals(signum).name}")
            scope.cancel()
            return
