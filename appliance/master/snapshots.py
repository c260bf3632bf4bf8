"""Snapshots of a sandbox: team-owned, immutable templates made from its disk.

A filesystem snapshot is a template like any other (`templates/catalog.py`: its own
directory under the templates dir, a manifest, an optional alias that a later
snapshot under the same name moves), so `Sandbox.create(<snapshot id>)` resolves
it like a template and `DELETE /templates/<id>` deletes it. What marks it is
`TemplateManifest.snapshot_of` (the source sandbox): listed by `/snapshots`, never
pooled. It does not depend on its source: its rootfs is a whole image, so it
survives the source's end, the source template's deletion and a service restart.

Taking one (`take_filesystem_snapshot`), under the sandbox's `changing` lock (no
pause or resume meanwhile):
1. `sync` in the guest, so its page cache is on its disk;
2. the guest frozen while its COW file is copied (sparse: only what it wrote), then
   thawed: the pause lasts as long as that copy;
3. the copy laid over a copy of the sandbox's template image (`runtime/uml/cow.py`),
   outside the pause.
The image is crash-consistent at the freeze (ext4 replays its journal at the next
boot). New sandboxes cold-boot from it: processes and memory are not kept.

A memory ("full") snapshot needs a runtime that can checkpoint a guest's memory
(`memory_checkpoints`: kvm, `cubelet/checkpoints.py`; uml cannot).
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import trio

from appliance.config import Config
from appliance.cubelet.checkpoints import (
    CheckpointFailed,
    CheckpointRefused,
    checkpointable,
    checkpoints_memory,
    snapshot_manifest,
    take_memory_snapshot,
)
from appliance.cubelet.cubelet import LiveSandbox, SandboxNotFound
from appliance.cubelet.envd_client import EnvdError
from appliance.cubelet.state import SandboxState
from appliance.master.carryover import sync_guest
from appliance.records import ROOTFS_NAME, TemplateManifest
from appliance.runtime.base import ENVD_PORT, Runtime
from appliance.runtime.uml.cow import CowError, merge_into_image, sparse_copy
from appliance.runtime.uml.runtime import COW_FILE, VM_DIR
from appliance.templates.catalog import (
    begin_template,
    check_name_free,
    discard_template,
    new_template_id,
    publish_template,
)

log = logging.getLogger(__name__)

FULL = "full"
FILESYSTEM = "filesystem"
FROZEN_COPY = "frozen.cow"  # in the snapshot's directory while it is made


class SnapshotRefused(Exception):
    """This snapshot cannot be taken here (a mode the runtime lacks); the message says what works."""


class SnapshotFailed(Exception):
    """Taking the snapshot failed (the guest did not sync, a disk error); nothing was kept."""


def memory_checkpoints(runtime: Runtime) -> bool:
    """Whether `runtime` can snapshot a running guest's memory (fork, mode="full"): kvm, from
    its snapshot/restore machinery (`cubelet/checkpoints.py`). UML cannot (a UML guest is a
    tree of host processes; there is no checkpoint of its memory and host-side state to
    restore from)."""
    return checkpoints_memory(runtime)


def refusal(runtime: Runtime, what: str) -> str:
    """Why `what` (a memory snapshot, a fork) is not possible on `runtime`, and what works instead."""
    return (
        f"{what} needs a memory checkpoint of the sandbox, which the {runtime.name} runtime of this "
        f"appliance cannot take; a filesystem snapshot works: "
        f'sandbox.create_snapshot(mode="filesystem"), then Sandbox.create(<snapshot id>) '
        f"(new sandboxes cold-boot from the disk, without the running processes)"
    )


def default_mode(runtime: Runtime, live: LiveSandbox) -> str:
    """The mode of a snapshot whose request names none: E2B's default (full) where `live`'s
    memory can be checkpointed (a kvm sandbox), else filesystem (uml, and a kvm host's
    sandboxes of templates that run on uml)."""
    return FULL if memory_checkpoints(runtime) and checkpointable(runtime, live) else FILESYSTEM


async def filesystem_snapshot(
    config: Config, runtime: Runtime, live: LiveSandbox, team_id: str, name: str | None
) -> TemplateManifest:
    """A filesystem snapshot of `live` on its runtime: uml's COW file, or kvm's checkpoint
    without its memory (`cubelet/checkpoints.py`: the disk overlay written while the vCPUs
    are stopped, folded into a copy of the template image), after a `sync` in the guest
    (a paused guest is crash-consistent as it is). Raises as `take_filesystem_snapshot`."""
    if memory_checkpoints(runtime) and not (live.spec.sandbox_dir / VM_DIR / COW_FILE).is_file():
        if live.state is SandboxState.RUNNING and live.instance is not None:
            try:
                await sync_guest(live.instance.endpoint(ENVD_PORT), live.envd_headers())
            except (OSError, httpx.HTTPError, EnvdError) as exc:
                raise SnapshotFailed(f"the guest did not sync its disk: {exc}") from exc
        try:
            return await take_memory_snapshot(config, runtime, live, team_id, name, memory=False)
        except CheckpointRefused as exc:
            raise SnapshotRefused(str(exc)) from exc
        except CheckpointFailed as exc:
            raise SnapshotFailed(str(exc)) from exc
    return await take_filesystem_snapshot(config, live, team_id, name)


async def take_filesystem_snapshot(
    config: Config, live: LiveSandbox, team_id: str, name: str | None
) -> TemplateManifest:
    """A new template of `team_id`'s from `live`'s disk, published under `name` if given.

    Raises SnapshotRefused (no COW disk: a runtime without one), NameTaken, SandboxNotFound
    (it ended meanwhile) or SnapshotFailed.
    """
    cow = live.spec.sandbox_dir / VM_DIR / COW_FILE
    if live.instance is None or not cow.is_file():
        raise SnapshotRefused(
            "filesystem snapshots need a runtime that keeps the sandbox's disk as a COW file (uml)"
        )
    if name:
        check_name_free(config, name, team_id)
    template_id = new_template_id()
    directory = begin_template(config, template_id)
    try:
        frozen = directory / FROZEN_COPY
        frozen_s = await _copy_while_frozen(live, cow, frozen)
        try:
            await trio.to_thread.run_sync(
                merge_into_image, frozen, live.template.rootfs, directory / ROOTFS_NAME
            )
        except (OSError, CowError) as exc:
            raise SnapshotFailed(f"merging the sandbox's disk failed: {exc}") from exc
        frozen.unlink()
        manifest = snapshot_manifest(live, directory, team_id, name, kind="snapshot")
        publish_template(config, manifest, name)
    except BaseException:
        discard_template(config, template_id)
        raise
    log.info("snapshot %s taken of sandbox %s (frozen %.2f s)", template_id, live.sandbox_id, frozen_s)
    return manifest


async def _copy_while_frozen(live: LiveSandbox, cow: Path, target: Path) -> float:
    """`cow` copied to `target` while the guest is frozen, after a `sync` in it (a paused guest
    is thawed for that `sync`, or what its page cache holds would be missing); it is left as
    it was found, running or paused. Returns how long the copy froze it."""
    instance = live.instance
    assert instance is not None
    async with live.changing:
        if live.state not in (SandboxState.RUNNING, SandboxState.PAUSED):
            raise SandboxNotFound(live.sandbox_id)
        running = live.state is SandboxState.RUNNING
        if not running:
            await instance.resume()
        try:
            await sync_guest(instance.endpoint(ENVD_PORT), live.envd_headers())
        except (OSError, httpx.HTTPError, EnvdError) as exc:
            if not running:
                with trio.CancelScope(shield=True):
                    await instance.pause()
            raise SnapshotFailed(f"the guest did not sync its disk: {exc}") from exc
        await instance.pause()
        frozen_at = trio.current_time()
        try:
            await trio.to_thread.run_sync(sparse_copy, cow, target)
        except OSError as exc:
            raise SnapshotFailed(f"copying the sandbox's disk failed: {exc}") from exc
        finally:
            if running:
                with trio.CancelScope(shield=True):
                    await instance.resume()
        return trio.current_time() - frozen_at
