"""The cubelet's side of template builds: `TemplateSandboxes` (see appliance.templates.sandbox_steps).

- `boot(manifest)`: a temporary guest of this node's runtime from the template's
  rootfs.ext4 (the runtime gives it a throwaway writable layer), killed on exit.
- `finalize`: the runtime's `finalize_template`: nothing for kvm, whose runtime
  snapshots a published template's first boot into its snapshot store (SNAPSHOTTING);
  uml has no snapshot, its fast start is the warm pool, which the cubelet fills once
  the template is published (POOLING;
  `published` wakes it).
- `run_in`: a command through envd in a guest `boot` started (a template's ready command).
- `run_command` (Dockerfile RUN): the step's rootfs directory, with the guest agent
  added to a hardlinked copy, becomes a scratch ext4; a temporary guest boots from
  it; `guest_diff.py` records the filesystem, the command runs through envd's
  `process.Process/Start` as the step's user with its env and workdir (output
  streamed line by line), then `guest_diff.py` streams back what changed as an OCI
  layer, which the image unpacker applies to the directory.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from appliance.config import Config
from appliance.cubelet.cubelet import Cubelet, SandboxStartFailed
from appliance.cubelet.envd_client import EnvdError, start_process
from appliance.errors import first_leaf
from appliance.records import TemplateManifest
from appliance.runtime.base import ENVD_PORT, BootFailed, GuestFailure, Instance
from appliance.templates import guest_diff
from appliance.templates.ext4 import build_ext4
from appliance.templates.guest_setup import AGENT_DIR, account_name, prepare_rootfs
from appliance.templates.jobs import Phase
from appliance.templates.sandbox_steps import RunCommand, RunFailed
from appliance.templates.unpack import apply_layer

log = logging.getLogger(__name__)

RUN_WRITABLE_MB = 4096  # sparse: costs host disk only as the command writes
RUN_MEMORY_MB = 1024
OUTPUT_TAIL_LINES = 40
_STATE_FILE = "/run/cube-run-before.json"  # /run is a tmpfs in the guest: not part of the image
_DIFF_SOURCE = Path(guest_diff.__file__).read_text()


def _as_boot_failed(exc: SandboxStartFailed) -> BootFailed:
    cause = first_leaf(exc.__cause__ or exc)
    if isinstance(cause, BootFailed):
        return cause
    tail = cause.console_tail if isinstance(cause, GuestFailure) else ""
    return BootFailed("template-build", str(exc), tail)


class CubeletTemplateSandboxes:
    def __init__(
        self, config: Config, cubelet: Cubelet, on_published: Callable[[], object] | None = None
    ) -> None:
        self.config = config
        self.cubelet = cubelet
        self.finalize_phase = Phase.SNAPSHOTTING if cubelet.runtime.snapshots_templates else Phase.POOLING
        self._on_published = on_published

    # Template builds.

    @asynccontextmanager
    async def boot(self, manifest: TemplateManifest) -> AsyncIterator[Instance]:
        try:
            guest = self.cubelet.temporary_guest(manifest)
            instance = await guest.__aenter__()
        except SandboxStartFailed as exc:
            raise _as_boot_failed(exc) from exc
        try:
            yield instance
        finally:
            with trio.CancelScope(shield=True):
                await guest.__aexit__(None, None, None)

    async def finalize(self, manifest: TemplateManifest, instance: Instance) -> None:
        await self.cubelet.runtime.finalize_template(manifest, instance)

    async def run_in(self, instance: Instance, command: RunCommand) -> int:
        """A command in a template's booted guest (never claimed: its agent takes the boot token)."""
        host, port = instance.endpoint(ENVD_PORT)
        headers = {"X-Access-Token": instance.agent_token}
        lines = _Lines(command.output)
        timeout = httpx.Timeout(30.0, read=None)
        async with httpx.AsyncClient(headers=headers, timeout=timeout, trust_env=False) as http:
            code = await start_process(
                http,
                f"http://{host}:{port}",
                command.user or "root",
                list(command.argv),
                command.env,
                command.workdir,
                lines.feed,
                lines.feed,
            )
        lines.close()
        return code

    def published(self, manifest: TemplateManifest) -> None:
        if self._on_published is not None:
            self._on_published()
        self.cubelet.wake_pools()

    # Dockerfile RUN.

    async def run_command(self, rootfs: Path, command: RunCommand) -> None:
        # Under the build service's work root, which it empties when it starts (a crashed run's leftovers).
        work = self.config.cache_dir / "build-work" / "run-guests" / secrets.token_hex(6)
        try:
            manifest = await self._guest_image(rootfs, work)
            async with self.boot(manifest) as instance:
                host, port = instance.endpoint(ENVD_PORT)
                base = f"http://{host}:{port}"
                excluded = [AGENT_DIR]
                # Never claimed (/init): the guest's agent takes its boot token for the guest's whole life.
                headers = {"X-Access-Token": instance.agent_token}
                timeout = httpx.Timeout(30.0, read=None)
                async with httpx.AsyncClient(headers=headers, timeout=timeout, trust_env=False) as http:
                    await self._checked(http, base, ["snapshot", _STATE_FILE, *excluded])
                    await self._user_command(http, base, rootfs, command)
                    layer = work / "changes.tar"
                    with layer.open("wb") as out:
                        code = await start_process(
                            http,
                            base,
                            "root",
                            _python_argv(["diff", _STATE_FILE, *excluded]),
                            {},
                            "/",
                            stdout=out.write,
                            stderr=lambda data: None,
                        )
                    if code != 0:
                        raise EnvdError(f"reading the RUN step's changes failed (exit status {code})")
            await trio.to_thread.run_sync(apply_layer, rootfs, layer, None, "RUN step changes")
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(lambda: shutil.rmtree(work, ignore_errors=True))

    async def _guest_image(self, rootfs: Path, work: Path) -> TemplateManifest:
        """rootfs.ext4 in `work` from `rootfs` plus the guest agent, leaving `rootfs` untouched."""
        tree = work / "tree"
        work.mkdir(parents=True)
        result = await trio.run_process(
            ["cp", "-al", f"{rootfs}/.", str(tree)], capture_stderr=True, check=False
        )
        if result.returncode != 0:
            raise OSError(
                f"copying the step's rootfs failed: {result.stderr.decode(errors='replace')[-300:]}"
            )
        # prepare_rootfs never writes into an existing file (it renames new ones over them), so the
        # hardlinked step rootfs stays as it was.
        await trio.to_thread.run_sync(prepare_rootfs, tree, (), {}, "/", "root", ())
        manifest = TemplateManifest(
            template_id="run-" + work.name,
            directory=work,
            memory_mb=RUN_MEMORY_MB,
            writable_layer_mb=RUN_WRITABLE_MB,
            user="root",
            workdir="/",
            probe_port=ENVD_PORT,
        )
        await build_ext4(tree, manifest.rootfs, RUN_WRITABLE_MB << 20)
        await trio.to_thread.run_sync(shutil.rmtree, tree)
        return manifest

    async def _checked(self, http: httpx.AsyncClient, base: str, args: list[str]) -> None:
        errors = bytearray()
        code = await start_process(
            http, base, "root", _python_argv(args), {}, "/", errors.extend, errors.extend
        )
        if code != 0:
            detail = errors.decode(errors="replace").strip()[-500:]
            raise EnvdError(f"recording the rootfs before the RUN step failed (exit status {code}): {detail}")

    async def _user_command(
        self, http: httpx.AsyncClient, base: str, rootfs: Path, command: RunCommand
    ) -> None:
        user = await trio.to_thread.run_sync(account_name, rootfs, command.user or "root")
        lines = _Lines(command.output)
        code = await start_process(
            http, base, user, list(command.argv), command.env, command.workdir, lines.feed, lines.feed
        )
        lines.close()
        if code != 0:
            raise RunFailed(code, "\n".join(lines.tail))


def _python_argv(args: list[str]) -> list[str]:
    return ["/bin/sh", "-c", 'exec python3 -c "$@"', "sh", _DIFF_SOURCE, *args]


class _Lines:
    """Splits streamed output into lines for the job log; keeps the last ones for a failure."""

    def __init__(self, output: Callable[[str], None]) -> None:
        self.output = output
        self.pending = b""
        self.tail: list[str] = []

    def feed(self, data: bytes) -> None:
        self.pending += data
        *complete, self.pending = self.pending.split(b"\n")
        for line in complete:
            self._emit(line)

    def close(self) -> None:
        if self.pending:
            self._emit(self.pending)
            self.pending = b""

    def _emit(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip("\r")
        self.output(line)
        self.tail = [*self.tail[-(OUTPUT_TAIL_LINES - 1) :], line]
