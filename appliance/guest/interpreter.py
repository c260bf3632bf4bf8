"""The code interpreter on port 49999: `POST /execute` (NDJSON stream) and `/contexts` (PROTOCOL.md §4).

Languages are E2B's template's: Python (ipykernel), JavaScript and TypeScript (node_kernel.js),
R (IRkernel), Java (JavaKernel.java on JShell) and Bash (bash_kernel). Only the default Python
kernel starts with the agent; every other kernel starts on its context's first execution, so a
sandbox that never runs R pays nothing for it. Like E2B's, the interpreter lists a default
Python and a default JavaScript context from the start.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from appliance.guest.http import Request, Response
from appliance.guest.kernel import Emit, Kernel, KernelSpec, KernelStartError, start_failure
from appliance.guest.state import AgentState


def _python(spec: KernelSpec) -> Kernel:
    from appliance.guest.shell_kernel import ShellKernel, shell_wanted  # each lazily: start-up time

    if shell_wanted():
        return ShellKernel(spec)
    from appliance.guest.python_kernel import PythonKernel

    return PythonKernel(spec)


def _javascript(spec: KernelSpec) -> Kernel:
    from appliance.guest.node_kernel import NodeKernel

    return NodeKernel(spec)


def _typescript(spec: KernelSpec) -> Kernel:
    from appliance.guest.node_kernel import TypeScriptKernel

    return TypeScriptKernel(spec)


def _r(spec: KernelSpec) -> Kernel:
    from appliance.guest.jupyter_languages import RKernel

    return RKernel(spec)


def _java(spec: KernelSpec) -> Kernel:
    from appliance.guest.java_kernel import JavaKernel

    return JavaKernel(spec)


def _bash(spec: KernelSpec) -> Kernel:
    from appliance.guest.jupyter_languages import BashKernel

    return BashKernel(spec)


KERNELS: dict[str, Callable[[KernelSpec], Kernel]] = {
    "python": _python,
    "javascript": _javascript,
    "typescript": _typescript,
    "r": _r,
    "java": _java,
    "bash": _bash,
}
LANGUAGE_ALIASES = {"python3": "python", "js": "javascript", "ts": "typescript"}
LISTED_DEFAULTS = ("python", "javascript")  # default contexts E2B lists before their first use


def canonical_language(language: str | None) -> str:
    name = (language or "python").strip().lower()
    name = LANGUAGE_ALIASES.get(name, name)
    if name not in KERNELS:
        raise InterpreterError(
            400, f"unsupported language {language!r}; use one of {', '.join(KERNELS)} (or js, ts)"
        )
    return name


def result_text(text: str) -> str:
    """A result's text as E2B's interpreter gives it: a string value without its quotes."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


class InterpreterError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Context:
    id: str
    language: str
    cwd: str
    kernel: Kernel | None = None  # None until its first execution
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
        self._starting: set[Kernel] = set()  # kernels not answering yet
        # Set once the boot-time default Python kernel started, or failed to.
        self.default_ready = trio.Event()

    async def start_default(self, *, lazily: bool = False) -> None:
        """The default Python context, started at boot so the first run_code finds it warm, and the
        default JavaScript one, listed but started on first use. `lazily`: Python's too is started
        by its first execution (templates that mostly run commands, see options.py).

        Raises InterpreterError when Python's cannot start; `default_ready` is set either way, and
        the next execution in it tries again.
        """
        for language in LISTED_DEFAULTS:
            self._default_contexts[language] = self._new_context(language, None)
        try:
            if not lazily:
                await self._ensure_kernel(self._default_contexts["python"])
        finally:
            self.default_ready.set()

    async def update_env(self, env_vars: dict[str, str]) -> None:
        # Kernels still starting (e.g. the default one while a cold sandbox gets its /init)
        # keep the variables and apply them when they answer.
        running = (context.kernel for context in self._contexts.values() if context.kernel is not None)
        for kernel in [*self._starting, *running]:
            kernel.update_env(env_vars)

    def _kernel_spec(self, cwd: str) -> KernelSpec:
        user = self._state.user()
        return KernelSpec(
            user=user,
            cwd=cwd,
            env=self._state.environment(user),
            runtime_dir=self._runtime_dir,
            sandbox_env=dict(self._state.env_vars),
        )

    async def _start_kernel(self, language: str, cwd: str) -> Kernel:
        kernel = KERNELS[language](self._kernel_spec(cwd))
        kernel.rng_generation = self._state.rng_generation  # it seeds itself from the OS now
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

    async def _ensure_kernel(self, context: Context) -> Kernel:
        """The context's running kernel: started on first use, restarted after it died."""
        if context.kernel is None or not context.kernel.alive:
            if context.kernel is not None:
                context.kernel.stop()
            context.kernel = None
            context.kernel = await self._start_kernel(context.language, context.cwd)
        return context.kernel

    def _new_context(self, language: str | None, cwd: str | None) -> Context:
        canonical = canonical_language(language)
        user = self._state.user()
        directory = cwd or self._state.workdir(user)
        if not os.path.isabs(directory):
            directory = os.path.join(user.home, directory)
        if not os.path.isdir(directory):
            raise InterpreterError(400, f"cwd {directory!r} is not a directory")
        context = Context(uuid.uuid4().hex, canonical, directory)
        self._contexts[context.id] = context
        return context

    async def _create_context(self, language: str | None, cwd: str | None) -> Context:
        """A new context whose kernel is running (a failure to start is the creator's error)."""
        context = self._new_context(language, cwd)
        try:
            async with context.lock:
                await self._ensure_kernel(context)
        except BaseException:
            del self._contexts[context.id]
            raise
        return context

    async def _default_context(self, language: str) -> Context:
        canonical = canonical_language(language)
        if canonical == "python":
            # A sandbox is handed out before its default kernel answers: wait for it, don't fail.
            await self.default_ready.wait()
        if canonical not in self._default_contexts:
            self._default_contexts[canonical] = self._new_context(canonical, None)
        return self._default_contexts[canonical]

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
        elif not self._state.interpreter_accepted(request.headers):  # every other route (state.py)
            raise InterpreterError(401, "invalid or missing access token")
        elif path == "/execute" and method == "POST":
            await self._execute(await _json_body(request), response)
        elif path == "/contexts" and method == "POST":
            body = await _json_body(request)
            context = await self._create_context(_optional_str(body, "language"), _optional_str(body, "cwd"))
            await response.send_json(200, context.describe())
        elif path == "/contexts" and method == "GET":
            await response.send_json(200, [context.describe() for context in self._contexts.values()])
        elif len(parts) == 2 and parts[0] == "contexts" and method == "DELETE":
            self._remove_context(self._context(parts[1]))
            await response.send(204)
        elif len(parts) == 3 and parts[0] == "contexts" and parts[2] == "restart" and method == "POST":
            await self._restart_context(self._context(parts[1]))
            await response.send(204)
        else:
            raise InterpreterError(404, f"no route for {method} {path}")

    def _remove_context(self, context: Context) -> None:
        del self._contexts[context.id]
        for language, default in list(self._default_contexts.items()):
            if default is context:
                del self._default_contexts[language]
        if context.kernel is not None:
            context.kernel.stop()

    async def _restart_context(self, context: Context) -> None:
        async with context.lock:
            if context.kernel is not None:
                context.kernel.stop()
            await self._ensure_kernel(context)

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
        context_id, language = _optional_str(body, "context_id"), _optional_str(body, "language")
        if context_id and language:
            raise InterpreterError(400, "give either context_id or language, not both")
        context = (
            self._context(context_id) if context_id else await self._default_context(language or "python")
        )

        await response.start(200, [("Content-Type", "application/x-ndjson")])

        async def emit(event: dict[str, object]) -> None:
            if event.get("type") == "result" and isinstance(event.get("text"), str):
                event["text"] = result_text(str(event["text"]))
            # One whole line per write (ASCII-only JSON): the JS SDK decodes each chunk alone.
            await response.write(json.dumps(event).encode() + b"\n")

        async with context.lock:
            await self._run_in(context, code, {str(k): str(v) for k, v in env_vars.items()}, emit, response)
        await emit({"type": "end_of_execution"})
        await response.finish()

    async def _run_in(
        self, context: Context, code: str, env_vars: dict[str, str], emit: Emit, response: Response
    ) -> None:
        """One execution in the context's kernel (started first if need be); the caller holds its lock."""
        try:
            kernel = await self._ensure_kernel(context)
        except InterpreterError as exc:
            await emit({"type": "error", "name": "KernelStartError", "value": str(exc), "traceback": ""})
            return
        if kernel.rng_generation != self._state.rng_generation:
            kernel.reseed()  # running since before this clone's /init
            kernel.rng_generation = self._state.rng_generation
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_when_client_leaves, response, nursery.cancel_scope)
            await kernel.execute(code, env_vars, emit)
            nursery.cancel_scope.cancel()


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
