"""Memory checkpoints of a running kvm sandbox: full snapshots, and the checkpoint a fork starts from.

A full snapshot is a new template of the caller's team, like a filesystem snapshot
(`master/snapshots.py`: its own directory, manifest and optional alias, `snapshot_of`
naming the source), whose kvm template snapshot (`runtime/kvm/template_snapshots.py`)
is taken from the running sandbox instead of from the template's first boot. So
`Sandbox.create(<snapshot id>)` is an ordinary create of a template: the kvm runtime
finds the template's snapshot in its store and restores it (memory, vCPUs, devices,
clock moved on), and the cubelet's `/init` gives the new sandbox its own access and
traffic tokens, env and clock; its network (netns, tap, MAC) is its own slot's, as for
every clone. Taking one:
1. under the sandbox's `changing` lock (no pause or resume meanwhile), its VMM process
   (runtime/kvm/vmm.py, which holds the machine) stops the vCPUs and device I/O, writes
   the machine (all of RAM, vCPU, irqchip, clock and device state) and the disk overlay
   into the sandbox's directory, and the sandbox continues: the pause lasts as long as
   writing its RAM; the service then moves what the VMM wrote into a staging directory
   of the store, root's, checked file by file (`KvmSandbox.snapshot`);
2. outside the pause, the snapshot gets its own root image: a hard link to the source
   template's (never written once published), restored with the saved overlay over it;
   for a filesystem snapshot (no memory: new sandboxes cold-boot from the image) a copy
   with the overlay folded in. Either way it depends on nothing of its source (it
   survives the source's end, the source template's deletion and a service restart);
3. the staging directory is installed in the store under the new template's key, then
   the template is published.
Everything is plain data under the state directory (`state.json`, `memory`, the
image), deleted with the template (the store prunes snapshots of deleted templates).
A snapshot whose key no longer matches (another VMM, kernel or host CPU) is never
restored: its template then cold-boots from its image, without the memory and without
what the sandbox wrote to its disk (kept in the snapshot's overlay, which only a restore
reads).

The agent of the snapshotted guest was initialised long ago: it accepts only the
source's access token, which is therefore the snapshot's agent token (what the cubelet
sends the clone's `/init` with; that `/init` replaces it with the clone's own).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import shutil
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from appliance.config import Config
from appliance.cubelet import volume_mounts
from appliance.cubelet.sandboxes import LiveSandbox, SandboxNotFound
from appliance.cubelet.state import SandboxState
from appliance.records import ROOTFS_NAME, TemplateManifest
from appliance.runtime.base import BootFailed, Runtime
from appliance.runtime.kvm.base_images import BASE_IMAGES_DIR, link_base, remove_unused
from appliance.templates.catalog import (
    begin_template,
    check_name_free,
    discard_template,
    new_template_id,
    publish_template,
)
from appliance.templates.jobs import utc_now

if TYPE_CHECKING:
    from appliance.runtime.kvm.runtime import KvmRuntime
    from appliance.runtime.kvm.sandbox import KvmSandbox

log = logging.getLogger(__name__)

FORK_MARK = "fork-checkpoint"  # in a fork's checkpoint's template directory (ForkCheckpoints)
# The states of a sandbox that needs its template no more: over for its users (its teardown,
# running on, holds the files it opened), or gone. DETACHED and ADOPTING ones live on.
_GONE = (SandboxState.ENDING, SandboxState.ENDED, SandboxState.FAILED)


class CheckpointRefused(Exception):
    """This sandbox's memory cannot be checkpointed (it runs on a runtime without checkpoints)."""


class CheckpointFailed(Exception):
    """Taking the checkpoint failed (a disk error); nothing was kept."""


def checkpoints_memory(runtime: Runtime) -> bool:
    """Whether sandboxes of `runtime` can have their memory checkpointed: kvm's (its sandboxes of
    templates it cannot serve run on uml, and are refused one by one)."""
    return runtime.name == "kvm"


def _kvm_runtime(runtime: Any) -> KvmRuntime | None:
    """The kvm runtime behind `runtime` (itself, or the kvm side of kvm-with-uml-fallback)."""
    if not checkpoints_memory(runtime):
        return None
    from appliance.runtime.kvm.runtime import KvmRuntime  # imports cffi_kvm: kvm hosts only

    kvm = getattr(runtime, "kvm", runtime)
    return kvm if isinstance(kvm, KvmRuntime) else None


def _kvm_instance(live: LiveSandbox) -> KvmSandbox | None:
    """`live`'s kvm sandbox: its machine is in its VMM process (runtime/kvm/vmm.py), which
    writes the checkpoint on request (`KvmSandbox.snapshot`)."""
    from appliance.runtime.kvm.sandbox import KvmSandbox

    return live.instance if isinstance(live.instance, KvmSandbox) else None


def snapshot_manifest(
    live: LiveSandbox, directory: Path, team_id: str, name: str | None, *, kind: str
) -> TemplateManifest:
    """The manifest of a snapshot of `live` (a new template of `team_id`'s in `directory`, under
    `name` if given): its source template's settings, marked as a snapshot of `live`."""
    return dataclasses.replace(
        live.template,
        template_id=directory.name,
        directory=directory,
        aliases=(name,) if name else (),
        source=f"{kind} of sandbox {live.sandbox_id} (template {live.template.template_id})",
        created_at=utc_now(),
        owner=team_id,
        snapshot_of=live.sandbox_id,
    )


def checkpointable(runtime: Runtime, live: LiveSandbox) -> bool:
    """Whether `live` itself can be checkpointed: a sandbox of the kvm runtime."""
    return _kvm_runtime(runtime) is not None and _kvm_instance(live) is not None


async def take_memory_snapshot(
    config: Config,
    runtime: Runtime,
    live: LiveSandbox,
    team_id: str,
    name: str | None,
    *,
    memory: bool = True,
    template_id: str | None = None,
    fork: bool = False,
) -> TemplateManifest:
    """A new template of `team_id`'s (`template_id`, else a new id) holding `live`'s memory, devices
    and disk, published under `name` if given; without `memory`, only its disk (a filesystem
    snapshot: new sandboxes cold-boot from it). `fork`: marked as a fork's checkpoint (deleted once
    no fork needs it: `ForkCheckpoints`). Raises CheckpointRefused, NameTaken, SandboxNotFound (it
    ended meanwhile) or CheckpointFailed."""
    kvm, instance = _kvm_runtime(runtime), _kvm_instance(live)
    if kvm is None or instance is None:  # checkpointable() is False
        raise CheckpointRefused(f"sandbox {live.sandbox_id} does not run on the kvm runtime")
    if memory:
        refuse_with_volumes(config, live.sandbox_id)
    if name:
        check_name_free(config, name, team_id)
    try:
        kernel = kvm.guest_kernel(live.sandbox_id)
    except BootFailed as exc:
        raise CheckpointFailed(exc.reason) from exc
    template_id = template_id or new_template_id()
    directory = begin_template(config, template_id)
    staging = kvm.snapshots.staging_directory(template_id)
    installed: Path | None = None
    kind = "memory" if memory else "filesystem"
    try:
        paused_s = await _checkpoint(live, instance, staging)
        token = live.agent.access_token if live.agent is not None else None
        own_disk = functools.partial(_own_disk, fold=not memory, shared=config.state_dir / BASE_IMAGES_DIR)
        await trio.to_thread.run_sync(own_disk, live.template.rootfs, staging, directory / ROOTFS_NAME, token)
        manifest = snapshot_manifest(live, directory, team_id, name, kind=f"{kind} snapshot")
        if memory:
            from appliance.runtime.kvm.template_snapshots import SnapshotKey

            key = await trio.to_thread.run_sync(
                SnapshotKey.of, manifest, kernel, live.spec.memory_mb, live.spec.cpu_count
            )
            installed = kvm.snapshots.install(key, staging)
        if fork:
            (directory / FORK_MARK).touch()
        publish_template(config, manifest, name)
    except BaseException:
        discard_template(config, template_id)
        shutil.rmtree(staging, ignore_errors=True)
        if installed is not None:
            shutil.rmtree(installed, ignore_errors=True)
        raise
    if not memory:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "%s snapshot %s taken of sandbox %s (paused %.2f s)", kind, template_id, live.sandbox_id, paused_s
    )
    return manifest


def refuse_with_volumes(config: Config, sandbox_id: str) -> None:
    """CheckpointRefused if `sandbox_id` holds a volume. A volume has one sandbox writing it at a
    time (cubelet/volume_mounts.py); a memory checkpoint holds the guest's mounted filesystem
    (its page cache, its journal's state) but not the volume's disk, so each sandbox made from it
    would be a second writer of the volume, or one whose mount has no disk. E2B documents nothing
    for volumes in forks or snapshots: refused, saying what works (a filesystem snapshot)."""
    held = volume_mounts.held_by(config.state_dir, sandbox_id)
    if held:
        where = ", ".join(f"{volume_id} at {record.path}" for volume_id, record in held)
        raise CheckpointRefused(
            f"sandbox {sandbox_id} has volumes mounted ({where}), and a volume is written by one "
            "sandbox at a time"
        )


async def _checkpoint(live: LiveSandbox, instance: KvmSandbox, staging: Path) -> float:
    """The whole machine and its disk overlay written into `staging` while the vCPUs are stopped;
    `live` is left as it was found, running or paused. Returns how long it was stopped."""
    from appliance.runtime.kvm.sandbox import GuestControlFailed

    async with live.changing:
        if live.state not in (SandboxState.RUNNING, SandboxState.PAUSED):
            raise SandboxNotFound(live.sandbox_id)
        running = live.state is SandboxState.RUNNING
        try:
            if not running:
                await instance.resume()  # a paused clone's diff is on disk: its memory is whole again
            stopped_at = trio.current_time()
            try:
                await instance.snapshot(staging)
            finally:
                if not running:
                    with trio.CancelScope(shield=True):
                        await instance.pause()
        except (OSError, GuestControlFailed) as exc:  # the host's disk, or the VMM ended meanwhile
            raise CheckpointFailed(f"writing the sandbox's memory and disk failed: {exc}") from exc
        return trio.current_time() - stopped_at


def _own_disk(
    base: Path, staging: Path, image: Path, agent_token: str | None, *, fold: bool, shared: Path
) -> None:
    """The snapshot's own root image and its agent token (the token the snapshotted agent accepts:
    the source's access token). `fold` (a filesystem snapshot, which new sandboxes cold-boot
    from): a copy of `base` with the overlay folded in. Otherwise (a memory snapshot, restored
    over its overlay) a hard link to `base`: template images are never written once published
    (a rebuild is a new file), so the link keeps exactly the base the overlay was written
    over, and a snapshot or fork costs its overlay, not a copy of the image; where `base` is
    on another filesystem (the appliance ISO's squashfs), a link to the one copy of it in
    `shared` (runtime/kvm/base_images.py)."""
    from appliance.runtime.kvm.instance import save_agent_token
    from appliance.runtime.kvm.template_snapshots import OVERLAY_NAME
    from appliance.runtime.sparse import fold_overlay, sparse_copy

    try:
        if fold:
            sparse_copy(base, image)
            fold_overlay(staging / OVERLAY_NAME, image)
        else:
            link_base(base, image, shared)
        save_agent_token(staging, agent_token or "")
    except OSError as exc:
        raise CheckpointFailed(f"making the snapshot's disk failed: {exc}") from exc


class ForkCheckpoints:
    """The checkpoints forks start from, each deleted once no fork needs it any more.

    A fork's checkpoint is a team snapshot (`take_memory_snapshot(fork=True)`, marked by
    FORK_MARK in its template directory) that the fork request creates its sandboxes from. A
    fork needs it for as long as it lives, not only for its restore: it is the fork's template
    (a service restart adopts a sandbox only with its template, and a snapshot or fork of the
    fork starts from the template's image), and a paused fork's memory is a diff over the
    checkpoint's. So the checkpoint is deleted (template directory, then its memory in the kvm
    store) by `sweep` once its fork request is over (`taken`, in memory: no create from it is
    under way) and no sandbox of this node is of it: when the request ends, when a sandbox of
    it ends (is killed: a fork's VMM keeps the files it opened until it stops), and at start,
    once the previous service's sandboxes are adopted. The marker and the sandboxes are on
    disk, so a restart deletes what a crash left (a checkpoint whose request died with the
    service, its forks never made or gone) and keeps what adopted forks use. Until then it
    is listed like any snapshot, and `DELETE` of it is refused while forks live.
    """

    def __init__(
        self, config: Config, runtime: Runtime, live_templates: Callable[[], Iterable[LiveSandbox]]
    ) -> None:
        self.config = config
        self.runtime = runtime
        self._sandboxes = live_templates
        self._requests: set[str] = set()  # checkpoints whose fork request is under way

    @contextlib.asynccontextmanager
    async def taken(self, live: LiveSandbox, team_id: str) -> AsyncIterator[TemplateManifest]:
        """A checkpoint of `live` for one fork request (which creates its forks inside); it is
        swept when the request is over. Raises as `take_memory_snapshot`."""
        template_id = new_template_id()
        self._requests.add(template_id)
        try:
            yield await take_memory_snapshot(
                self.config, self.runtime, live, team_id, None, template_id=template_id, fork=True
            )
        finally:
            self._requests.discard(template_id)
            self.sweep()

    def guest_changed(self, live: LiveSandbox, _old: SandboxState) -> None:
        """A sandbox's transition (the cubelet's hook): one of a checkpoint that ended may free it."""
        if live.state in _GONE and (live.template.directory / FORK_MARK).exists():
            self.sweep()

    def sweep(self) -> list[str]:
        """Delete every fork checkpoint no request and no sandbox of this node needs; their ids."""
        root = self.config.templates_dir
        if not root.is_dir():
            return []
        needed = self._requests | {
            live.template.template_id for live in self._sandboxes() if live.state not in _GONE
        }
        deleted = []
        kvm = _kvm_runtime(self.runtime)
        for mark in sorted(root.glob(f"*/{FORK_MARK}")):
            template_id = mark.parent.name
            if template_id in needed:
                continue
            discard_template(self.config, template_id)  # first: a crash then leaves a store entry
            if kvm is not None:  # of no template, which the next start prunes
                kvm.snapshots.remove(template_id)
            deleted.append(template_id)
        if deleted:
            store = self.config.state_dir / BASE_IMAGES_DIR
            if store.is_dir():  # a base image's copy their images were the last links to
                remove_unused(store)
            log.info("fork checkpoints no fork needs any more, deleted: %s", ", ".join(deleted))
        return deleted
