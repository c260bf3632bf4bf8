"""The build steps that need a real sandbox, as the service provides them.

Template builds run in the templates package; booting a guest belongs to the
cubelet and the runtimes. The service hands the build service one object
satisfying `TemplateSandboxes`:

- `boot(manifest)`: an async context manager that boots one sandbox from the
  finished template (its rootfs.ext4, read-only, with a throwaway writable
  layer) and yields the running `Instance` (its `endpoint(port)` is probed
  here). Raises `runtime.base.BootFailed` (with the console tail) if it cannot.
  Leaving the context stops the guest.
- `finalize(manifest, instance)`: the runtime's fast-start artifact from the
  probed guest: a kvm snapshot into `manifest.directory` or uml warm-pool
  instances. `finalize_phase` says which (SNAPSHOTTING or POOLING).
- `published(manifest)`: called once the template is READY and
  visible, so the service can refresh what it serves and warm pools for it.
- `run_command(rootfs, command)`: a Dockerfile RUN: boot a sandbox whose
  root filesystem is the directory `rootfs` (writable, changes must end up in
  that directory when it returns), run `command` through the guest agent and
  stream its output lines to `command.output`; raise `RunFailed` on a non-zero
  exit.
- `run_in(instance, command)`: run `command` in a guest `boot` yielded (a template's
  ready command), output lines to `command.output`; returns its exit status.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from appliance.records import TemplateManifest
from appliance.runtime.base import Instance
from appliance.templates.jobs import Phase


class RunFailed(Exception):
    def __init__(self, exit_code: int, output_tail: str = "") -> None:
        super().__init__(f"command exited with status {exit_code}")
        self.exit_code = exit_code
        self.output_tail = output_tail


@dataclass(frozen=True)
class RunCommand:
    argv: tuple[str, ...]  # exec form; shell-form RUN is already [shell..., "cmd"]
    env: dict[str, str]
    workdir: str
    user: str  # as in the Dockerfile: name, uid, name:group
    output: Callable[[str], None] = field(compare=False)


class TemplateSandboxes(Protocol):
    finalize_phase: Phase  # Phase.SNAPSHOTTING (kvm) or Phase.POOLING (uml)

    def boot(self, manifest: TemplateManifest) -> AbstractAsyncContextManager[Instance]: ...

    async def finalize(self, manifest: TemplateManifest, instance: Instance) -> None: ...

    async def run_command(self, rootfs: Path, command: RunCommand) -> None: ...

    async def run_in(self, instance: Instance, command: RunCommand) -> int: ...

    def published(self, manifest: TemplateManifest) -> None: ...
