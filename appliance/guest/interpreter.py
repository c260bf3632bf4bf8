"""The code interpreter on port 49999: `POST /execute` (NDJSON stream) and `/contexts` (PROTOCOL.md §4)."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field

import trio

from appliance.guest.http import Request, Response
from appliance.guest.kernel import Kernel, KernelSpec, KernelStartError, start_failure
from appliance.guest.state import AgentState

LANGUAGE_ALIASES = {"python": "python", "python3": "python", "javascript": "javascript", "js": "javascript"}


class InterpreterError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Context:
    id: str
    language: str
    cwd: str
    kernel: Kernel
    lock: trio.Lock = field(default_factory=trio.Lock)

    def describe(self) -> dict[str, str]:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}


class Interpreter:
    def __init__(self, state: AgentState, nursery: trio.Nursery, runtime_dir: str) -> None:
        self._state = state
        self._nursery = nursery
        self._runtime_dir = runtime_dir
        self._contexts: dict[str, Context] = {}
        self._default_contexts: dict[str, Context] = {}
        self._starting: set[Kernel] = set()  # kernels whose process is not answering yet
        # Set once the boot-time default Python kernel started, or failed to.
        self.default_ready = trio.Event()

    async def start_default(self) -> None:
        """The default Python context, started at boot so the first run_code finds it warm.

        Raises InterpreterError when it cannot start; `default_ready` is set either way, and
        the next execution without a context tries again.
        """
        try:
            self._default_contexts["python"] = await self._create_context("python", None)
        finally:
            self.default_ready.set()

    async def update_env(self, env_vars: dict[str, str]) -> None:
        # Kernels still starting (e.g. the default one while a cold sandbox gets its /init)
        # keep the variables and apply them when they answer.
        for kernel in [*self._starting, *(context.kernel for context in self._contexts.values())]:
            kernel.update_env(env_vars)

    def _new_kernel(self, language: str, cwd: str) -> Kernel:
        user = self._state.user()
        spec = KernelSpec(
            user=user, cwd=cwd, env=self._state.environment(user), runtime_dir=self._runtime_dir
        )
        kernel: Kernel
        if language == "python":
            from appliance.guest.python_kernel import PythonKernel  # lazy: start-up time

            kernel = PythonKernel(spec)
        else:
            from appliance.guest.node_kernel import NodeKernel

            kernel = NodeKernel(spec)
        kernel.rng_generation = self._state.rng_generation  # it seeds itself from the OS now
        return kernel

    async def _start_kernel(self, language: str, cwd: str) -> Kernel:
        kernel = self._new_kernel(language, cwd)
        self._starting.add(kernel)
        try:
            await self._nursery.start(kernel.run)
        except (KernelStartError, BaseExceptionGroup) as exc:
            failure = start_failure(exc)
            if failure is None:
                raise
            raise InterpreterError(500, f"cannot start the {language} kernel: {failure}") from None
        finally:
            self._starting.discard(kernel)
        return kernel

    async def _create_context(self, language: str | None, cwd: str | None) -> Context:
        canonical = LANGUAGE_ALIASES.get((language or "python").lower())
        if canonical is None:
            raise InterpreterError(400, f"unsupported language {language!r}; use python or javascript")
        user = self._state.user()
        directory = cwd or self._state.workdir(user)
        if not os.path.isabs(directory):
            directory = os.path.join(user.home, directory)
        if not os.path.isdir(directory):
            raise InterpreterError(400, f"cwd {directory!r} is not a directory")
        kernel = await self._start_kernel(canonical, directory)
        context = Context(uuid.uuid4().hex, canonical, directory, kernel)
        self._contexts[context.id] = context
        return context

    async def _default_context(self, language: str) -> Context:
        canonical = LANGUAGE_ALIASES.get(language.lower())
        if canonical is None:
            raise InterpreterError(400, f"unsupported language {language!r}; use python or javascript")
        if canonical == "python":
            # A sandbox is handed out before its default kernel answers: wait for it, don't fail.
            await self.default_ready.wait()
        if canonical not in self._default_contexts:
            self._default_contexts[canonical] = await self._create_context(canonical, None)
        return self._default_contexts[canonical]

    async def _restart(self, context: Context) -> None:
        context.kernel.stop()
        context.kernel = await self._start_kernel(context.language, context.cwd)

    async def handle(self, request: Request, response: Response) -> None:
        try:
            await self._route(request, response)
        except InterpreterError as exc:
            await response.send_json(exc.status, {"code": exc.status, "message": str(exc)})

    async def _route(self, request: Request, response: Response) -> None:
        path, method = request.path.rstrip("/") or "/", request.method
        parts = path.strip("/").split("/")
        if path == "/health" and method == "GET":
            if self.default_ready.is_set():
                await response.send_json(200, {"status": "ok"})
            else:
                await response.send_json(503, {"status": "starting"})
        elif path == "/execute" and method == "POST":
            if not self._state.token_accepted(request.headers):
                raise InterpreterError(401, "invalid access token")
            await self._execute(await _json_body(request), response)
        elif path == "/contexts" and method == "POST":
            body = await _json_body(request)
            context = await self._create_context(_optional_str(body, "language"), _optional_str(body, "cwd"))
            await response.send_json(200, context.describe())
        elif path == "/contexts" and method == "GET":
            await response.send_json(200, [context.describe() for context in self._contexts.values()])
        elif len(parts) == 2 and parts[0] == "contexts" and method == "DELETE":
            context = self._context(parts[1])
            del self._contexts[context.id]
            for language, default in list(self._default_contexts.items()):
                if default is context:
                    del self._default_contexts[language]
            context.kernel.stop()
            await response.send(204)
        elif len(parts) == 3 and parts[0] == "contexts" and parts[2] == "restart" and method == "POST":
            context = self._context(parts[1])
            async with context.lock:
                await self._restart(context)
            await response.send(204)
        else:
            raise InterpreterError(404, f"no route for {method} {path}")

    def _context(self, context_id: str) -> Context:
        context = self._contexts.get(context_id)
        if context is None:
            raise InterpreterError(404, f"context {context_id} not found")
        return context

    async def _execute(self, body: dict[str, object], response: Response) -> None:
        code = body.get("code")
        if not isinstance(code, str):
            raise InterpreterError(400, "code must be a string")
        env_vars = body.get("env_vars") or {}
        if not isinstance(env_vars, dict):
            raise InterpreterError(400, "env_vars must be an object")
        context_id = _optional_str(body, "context_id")
        if context_id:
            context = self._context(context_id)
        else:
            context = await self._default_context(_optional_str(body, "language") or "python")

        await response.start(200, [("Content-Type", "application/x-ndjson")])

        async def emit(event: dict[str, object]) -> None:
            # One whole line per write (ASCII-only JSON): the JS SDK decodes each chunk alone.
            await response.write(json.dumps(event).encode() + b"\n")

        async with context.lock:
            if not context.kernel.alive:
                try:
                    await self._restart(context)
                except InterpreterError as exc:
                    error: dict[str, object] = {
                        "type": "error",
                        "name": "KernelStartError",
                        "value": str(exc),
                        "traceback": "",
                    }
                    await emit(error)
            if context.kernel.alive:
                if context.kernel.rng_generation != self._state.rng_generation:
                    context.kernel.reseed()  # running since before this clone's /init
                    context.kernel.rng_generation = self._state.rng_generation
                env = {str(k): str(v) for k, v in env_vars.items()}
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_cancel_when_client_leaves, response, nursery.cancel_scope)
                    await context.kernel.execute(code, env, emit)
                    nursery.cancel_scope.cancel()
        await emit({"type": "end_of_execution"})
        await response.finish()


async def _cancel_when_client_leaves(response: Response, scope: trio.CancelScope) -> None:
    """A client that gave up (the SDK's run_code timeout) must not leave its cell running:
    cancelling the execution interrupts the kernel, and the context is free again."""
    await response.client_gone()
    scope.cancel()


async def _json_body(request: Request) -> dict[str, object]:
    raw = await request.read_body()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise InterpreterError(400, f"invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise InterpreterError(400, "the body must be a JSON object")
    return body


def _optional_str(body: dict[str, object], key: str) -> str | None:
    value = body.get(key)
    return value if isinstance(value, str) and value else None
