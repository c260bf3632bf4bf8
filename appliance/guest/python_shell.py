"""Runs INSIDE each Python context's process: IPython's InteractiveShell, in-process, behind pipes.

The agent (shell_kernel.py) starts `python3 -c BOOTSTRAP <this file>` as the context's user and
speaks pipe_kernel.py's protocol with it: JSON-line requests on stdin, JSON-line replies on the
descriptor CUBE_REPLY_FD names. No ZMQ, no tornado, no Jupyter session, no threads of a kernel
app: only IPython itself (about 40 % of an ipykernel's start and memory is the rest).

What the SDK sees is what ipykernel gave it: the display hook and display publisher turn
IPython's format dicts into `result` replies (the main one and display_data), tracebacks go out
as `error` (name, value, IPython's plain traceback lines), stdout and stderr are streamed as they
are written, by Python (sys.stdout/sys.stderr) and at the descriptor level (subprocesses, `!cmd`,
C extensions), as ipykernel 6 captures them. SIGINT interrupts the running cell only.

Requests: `{"type": "execute", "id", "code", "env"}` (env: vars for this execution only),
`{"type": "env", "vars"}` (sandbox vars, for good), `{"type": "silent", "code"}` (start-up and
reseed code: no replies). Stdlib and IPython only: the agent's packages are not on this path.
"""

from __future__ import annotations

import base64
import builtins
import codecs
import datetime
import importlib
import io
import json
import os
import signal
import sys
import threading
import types
from typing import Any

REPLY_FD_ENV = "CUBE_REPLY_FD"
# Stream text is sent in batches (ipykernel's flush interval is 0.2 s): a loop of prints is a
# few replies, not thousands, and still arrives while the cell runs.
FLUSH_INTERVAL_S = 0.05
# Written into a captured descriptor's pipe at the end of a cell: everything before it was forwarded.
DRAIN_MARK = b"\x00\x1bcube-drained\x1b\x00"
DRAIN_TIMEOUT_S = 2.0
IMAGE_MIMES = ("image/png", "image/jpeg", "application/pdf")


def _json_default(value: Any) -> Any:
    """What jupyter_client's packer does with values JSON has no type for."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, set | tuple):
        return list(value)
    return str(value)


class Replies:
    """The reply pipe. A SIGINT never lands in the middle of a reply line: while the main thread
    writes one, the interrupt waits (Engine.on_sigint) and is raised once the line is out."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._main = threading.get_ident()
        self.main_sending = False
        self.interrupt_pending = False

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message, default=_json_default) + "\n").encode()
        on_main = threading.get_ident() == self._main
        with self._lock:
            if on_main:
                self.main_sending = True
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
            finally:
                if on_main:
                    self.main_sending = False
        if on_main and self.interrupt_pending:
            self.interrupt_pending = False
            raise KeyboardInterrupt


class OutputStream(io.TextIOBase):
    """sys.stdout / sys.stderr: text buffered and sent as `stdout`/`stderr` replies of the running
    execution, by the flusher thread within FLUSH_INTERVAL_S, or at once on flush()."""

    def __init__(self, name: str, engine: Engine, fd: int) -> None:
        super().__init__()
        self.name = name
        self._engine = engine
        self._fd = fd
        self._parts: list[str] = []
        self._lock = threading.Lock()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fd  # captured too (FdCapture): writes to it arrive as this stream's text

    def write(self, text: str) -> int:  # type: ignore[override]
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if text:
            with self._lock:
                self._parts.append(text)
            self._engine.flush_soon()
        return len(text)

    def take(self) -> str:
        """The text written since the last take."""
        with self._lock:
            text, self._parts = "".join(self._parts), []
        return text

    def flush(self) -> None:
        self._engine.flush_streams()


class FdCapture:
    """What is written to descriptor 1 or 2 (subprocesses, C code) becomes the stream's text: the
    descriptor is a pipe whose reader thread writes into the OutputStream."""

    def __init__(self, fd: int, stream: OutputStream) -> None:
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, fd)  # inheritable: children write into it
        self._write_fd = write_fd  # the engine's own end, for the drain mark (close-on-exec)
        self._read_fd = read_fd
        self._stream = stream
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._drained = threading.Event()
        threading.Thread(target=self._forward, name=f"cube-capture-{fd}", daemon=True).start()

    def _forward(self) -> None:
        carry = b""
        while True:
            chunk = os.read(self._read_fd, 64 * 1024)
            if not chunk:
                return
            data = carry + chunk
            while (mark := data.find(DRAIN_MARK)) >= 0:
                self._write(data[:mark])
                data = data[mark + len(DRAIN_MARK) :]
                self._drained.set()
            keep = _partial_mark_length(data)
            self._write(data[: len(data) - keep])
            carry = data[len(data) - keep :]

    def _write(self, data: bytes) -> None:
        if text := self._decoder.decode(data):
            self._stream.write(text)

    def drain(self) -> None:
        """Return once what was written to the descriptor so far is in the stream."""
        self._drained.clear()
        os.write(self._write_fd, DRAIN_MARK)
        self._drained.wait(DRAIN_TIMEOUT_S)


def _partial_mark_length(data: bytes) -> int:
    """How many bytes at the end of `data` could be the start of a drain mark cut by a read."""
    for length in range(min(len(DRAIN_MARK) - 1, len(data)), 0, -1):
        if DRAIN_MARK.startswith(data[-length:]):
            return length
    return 0


class Engine:
    def __init__(self, replies: Replies) -> None:
        self.replies = replies
        self.execution_id: str | None = None  # replies of output go to the running execution
        self.executing = False
        self._wake = threading.Event()
        self._flush_lock = threading.Lock()
        self._main = threading.get_ident()
        self.stdout = OutputStream("stdout", self, 1)
        self.stderr = OutputStream("stderr", self, 2)
        self.captures: list[FdCapture] = []
        self.shell: Any = None

    # Output.

    def send_for_execution(self, message: dict[str, Any]) -> None:
        execution_id = self.execution_id
        if execution_id is not None:  # output between executions has no one to go to
            self.replies.send({**message, "id": execution_id})

    def flush_soon(self) -> None:
        self._wake.set()

    def flush_streams(self) -> None:
        # One flush at a time, taking and sending together: text the flusher thread took is out
        # before the main thread's flush returns, so nothing follows an execution's `done`.
        with self._flush_lock:
            for stream in (self.stdout, self.stderr):
                if text := stream.take():
                    self.send_for_execution({"type": stream.name, "text": text})

    def flush_output(self) -> None:
        """Everything written so far, by Python or to the descriptors, sent before what follows."""
        if threading.get_ident() == self._main:
            for capture in self.captures:
                capture.drain()
        self.flush_streams()

    def _flusher(self) -> None:
        while True:
            self._wake.wait()
            threading.Event().wait(FLUSH_INTERVAL_S)
            self._wake.clear()
            self.flush_streams()

    def on_sigint(self, signum: int, frame: Any) -> None:
        if not self.executing:
            return  # an interrupt that came after its cell ended
        if self.replies.main_sending:
            self.replies.interrupt_pending = True
            return
        raise KeyboardInterrupt

    # Set-up.

    def start(self) -> None:
        for fd, stream in ((1, self.stdout), (2, self.stderr)):
            self.captures.append(FdCapture(fd, stream))
        sys.stdout, sys.stderr = self.stdout, self.stderr
        threading.Thread(target=self._flusher, name="cube-flusher", daemon=True).start()
        self.shell = make_shell(self)
        signal.signal(signal.SIGINT, self.on_sigint)

    # Requests.

    def execute(self, request: dict[str, Any]) -> None:
        saved = _apply_env(request.get("env") or {})
        self.execution_id = str(request["id"])
        try:
            self.executing = True
            try:
                self.shell.run_cell(str(request["code"]), store_history=True, silent=False)
            finally:
                self.executing = False
            self.flush_output()
            self.replies.send({"type": "done", "id": self.execution_id, "execution_count": self.count()})
        finally:
            self.execution_id = None
            _restore_env(saved)

    def count(self) -> int:
        # The number of this execution: IPython counts up after each stored cell.
        return int(self.shell.execution_count) - 1

    def run_silently(self, code: str) -> None:
        self.executing = True
        try:
            self.shell.run_cell(code, store_history=False, silent=True)
        except KeyboardInterrupt:
            pass
        finally:
            self.executing = False

    def serve(self, requests: io.BufferedReader) -> None:
        self.replies.send({"type": "ready"})
        for line in requests:
            request = json.loads(line)
            kind = request.get("type")
            if kind == "execute":
                self.execute(request)
            elif kind == "env":
                os.environ.update({str(k): str(v) for k, v in request.get("vars", {}).items()})
            elif kind == "silent":
                self.run_silently(str(request.get("code", "")))


def _apply_env(env: dict[str, Any]) -> dict[str, str | None]:
    saved = {str(key): os.environ.get(str(key)) for key in env}
    os.environ.update({str(key): str(value) for key, value in env.items()})
    return saved


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def make_shell(engine: Engine) -> Any:
    """The context's shell, configured as the ipykernel was (python_kernel.py's KERNEL_OPTIONS):
    no history database, plain tracebacks, untruncated reprs; input() raises, as there."""
    shell: Any = reply_shell_class(engine).instance(colors="NoColor", history_length=0)
    shell.history_manager.enabled = False
    shell.display_formatter.formatters["text/plain"].max_seq_length = 0
    builtins.input = _no_input  # type: ignore[assignment]
    return shell


def reply_display_classes(engine: Engine) -> tuple[Any, Any]:
    """The display hook (a cell's value) and publisher (display()) that send `result` replies."""
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher

    class ReplyDisplayHook(DisplayHook):  # type: ignore[misc]
        def start_displayhook(self) -> None:
            self.data: dict[str, Any] = {}

        def write_output_prompt(self) -> None:
            pass

        def write_format_data(self, format_dict: dict[str, Any], md_dict: Any = None) -> None:
            self.data = format_dict

        def finish_displayhook(self) -> None:
            engine.flush_output()
            if self.data:
                engine.send_for_execution(_result(self.data, True))
            self.data = {}

    class ReplyDisplayPublisher(DisplayPublisher):  # type: ignore[misc]
        def publish(
            self,
            data: Any,
            metadata: Any = None,
            source: Any = None,
            *,
            transient: Any = None,
            update: Any = False,
            **kwargs: Any,
        ) -> None:
            if update:
                return  # update_display(): ipykernel's update_display_data is no result for E2B
            engine.flush_output()
            engine.send_for_execution(_result(data, False))

        def clear_output(self, wait: bool = False) -> None:
            pass  # E2B's results are a list: nothing to clear

    return ReplyDisplayHook, ReplyDisplayPublisher


def reply_shell_class(engine: Engine) -> Any:
    """An InteractiveShell whose results and tracebacks become replies, as ipykernel's
    ZMQInteractiveShell publishes them (execute_result, display_data, error)."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets import Type

    display_hook, display_publisher = reply_display_classes(engine)

    class ReplyShell(InteractiveShell):  # type: ignore[misc]
        displayhook_class = Type(display_hook)
        display_pub_class = Type(display_publisher)

        def _showtraceback(self, etype: Any, evalue: Any, stb: list[str]) -> None:
            engine.flush_output()
            error = {
                "type": "error",
                "name": etype.__name__,
                "value": str(evalue),
                "traceback": "\n".join(stb),
            }
            engine.send_for_execution(error)

        def enable_gui(self, gui: Any = None) -> None:
            pass  # `%matplotlib inline` and friends: there is no GUI loop to start

        def init_environment(self) -> None:
            # As ipykernel's shell: no pager can work here, and `ls` colours.
            os.environ.update({"TERM": "xterm-color", "CLICOLOR": "1", "PAGER": "cat", "GIT_PAGER": "cat"})

        def init_virtualenv(self) -> None:
            pass  # as ipykernel's shell: the interpreter's own environment, no detection

    return ReplyShell


def _no_input(prompt: str = "") -> str:
    from IPython.core.error import StdinNotImplementedError

    raise StdinNotImplementedError("raw_input was called, but this frontend does not support input requests.")


def _result(data: dict[str, Any], is_main_result: bool) -> dict[str, Any]:
    encoded = {mime: _encoded(mime, value) for mime, value in data.items()}
    return {"type": "result", "is_main_result": is_main_result, "data": encoded}


class LazyModule(types.ModuleType):
    """Stands in for a module until one of its names is used, then imports the real one.

    `import IPython` imports IPython.terminal.embed for its `embed` function, and with it the
    terminal shell and prompt_toolkit: ~40 % of IPython's import time and ~5 MiB that a shell
    without a terminal never uses. User code that imports the module still gets the real one.
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # the import system's own probes (__path__, __spec__...)
            raise AttributeError(name)
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), name)


def defer_terminal_embed() -> None:
    stand_in = LazyModule("IPython.terminal.embed")

    def embed(**kwargs: Any) -> Any:
        return stand_in.__getattr__("embed")(**kwargs)

    stand_in.embed = embed  # type: ignore[attr-defined]
    sys.modules.setdefault(stand_in.__name__, stand_in)


def _encoded(mime: str, value: Any) -> Any:
    """Binary images as base64 text, as ipykernel's encode_images sends them."""
    if mime in IMAGE_MIMES and isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return value


def main() -> None:
    reply_fd = int(os.environ.pop(REPLY_FD_ENV))
    os.set_inheritable(reply_fd, False)  # user code's subprocesses get no reply pipe
    # Requests come on stdin: the engine keeps it, and user code's stdin is /dev/null (input()
    # raises, as ipykernel's does without a frontend that answers input requests).
    requests = os.fdopen(os.dup(0), "rb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdin = open(0, closefd=False)  # the process's stdin (/dev/null), for its life
    defer_terminal_embed()
    engine = Engine(Replies(reply_fd))
    engine.start()
    engine.serve(requests)


if __name__ == "__cube_shell__":
    main()
