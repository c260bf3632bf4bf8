"""Stand-ins for the service's sandbox steps: a "guest" whose probe port is a real HTTP server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio

from appliance.records import TemplateManifest
from appliance.runtime.base import BootFailed
from appliance.templates.jobs import Phase
from appliance.templates.sandbox_steps import RunCommand, RunFailed

CONSOLE_TEXT = "Linux version 6.1 (uml)\ncube-init: starting the image's entrypoint\n"


class LoopbackGuest:
    def __init__(self, port: int, console_log: Path) -> None:
        self.sandbox_id = "template-probe"
        self.console_log = console_log
        self.agent_token = "loopback-boot-token"
        self.port = port

    def endpoint(self, port: int) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def pause(self) -> None:
        return None

    async def resume(self) -> None:
        return None

    def memory_usage_bytes(self) -> int:
        return 0


async def _answer_http(stream: trio.SocketStream) -> None:
    await stream.receive_some(65536)
    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    await stream.aclose()


class LoopbackSandboxes:
    """boot(): checks the image exists and serves HTTP 200 on a loopback port (or nothing, or fails).

    run_command(): instead of running a program, records it and writes /ran-<n>.txt into the rootfs
    with the argv, env and workdir it got, so tests see what a RUN step was given.
    """

    finalize_phase = Phase.POOLING

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.answer_probe = True
        self.boot_error: str | None = None
        self.failing_command: str | None = None
        self.booted: list[TemplateManifest] = []
        self.finalized: list[str] = []
        self.commands: list[RunCommand] = []
        self.rootfs_paths: list[Path] = []  # where each RUN step's tree was

    @asynccontextmanager
    async def boot(self, manifest: TemplateManifest) -> AsyncIterator[LoopbackGuest]:
        assert manifest.rootfs.is_file()
        self.booted.append(manifest)
        console = self.directory / f"console-{manifest.template_id}.log"
        console.write_text(CONSOLE_TEXT)
        if self.boot_error:
            raise BootFailed("template-probe", self.boot_error, CONSOLE_TEXT)
        if not self.answer_probe:
            with trio.socket.socket() as unused:  # a port nothing listens on
                await unused.bind(("127.0.0.1", 0))
                port = unused.getsockname()[1]
            yield LoopbackGuest(port, console)
            return
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, _answer_http, 0, host="127.0.0.1"))
            yield LoopbackGuest(listeners[0].socket.getsockname()[1], console)
            nursery.cancel_scope.cancel()

    async def finalize(self, manifest: TemplateManifest, instance: object) -> None:
        self.finalized.append(manifest.template_id)

    async def run_in(self, instance: object, command: RunCommand) -> int:
        """A ready command: recorded; exits 1 while it names `failing_command`, else 0."""
        self.commands.append(command)
        command.output(f"ready check {' '.join(command.argv)}")
        return 1 if self.failing_command and self.failing_command in " ".join(command.argv) else 0

    def published(self, manifest: TemplateManifest) -> None:
        pass  # no registry or pools to tell

    async def run_command(self, rootfs: Path, command: RunCommand) -> None:
        self.commands.append(command)
        self.rootfs_paths.append(rootfs)
        command.output(f"running {' '.join(command.argv)}")
        if self.failing_command and self.failing_command in " ".join(command.argv):
            raise RunFailed(2, "pip: error: no such package")
        record = rootfs / f"ran-{len(self.commands)}.txt"
        record.write_text(
            f"{command.argv!r}\n{command.workdir}\n{command.user}\n{sorted(command.env.items())!r}\n"
        )
