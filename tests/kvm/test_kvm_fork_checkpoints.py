"""The checkpoints forks start from (cubelet/checkpoints.ForkCheckpoints): deleted, template and
memory, once no fork request and no sandbox of this node needs them; kept while one does, and a
new service (a restart) deletes what a crash left and keeps what its adopted forks use. Also: a
sandbox holding a volume is never memory-checkpointed (one writer per volume). Real kvm runtime
store and template directories on disk; the sandboxes are their table's entries (id, template,
state), which is all a sweep reads of them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.config import Config
from appliance.cubelet.checkpoints import (
    FORK_MARK,
    CheckpointRefused,
    ForkCheckpoints,
    refuse_with_volumes,
)
from appliance.cubelet.state import SandboxState
from appliance.cubelet.volume_mounts import MOUNT_FILE, VOLUMES_DIR
from appliance.records import MANIFEST_NAME, TemplateManifest
from appliance.runtime.kvm.runtime import KvmRuntime
from appliance.runtime.kvm.template_snapshots import SNAPSHOT_STORE


@dataclass
class Guest:
    """A sandbox table entry as the sweep sees it."""

    sandbox_id: str
    template: TemplateManifest
    state: SandboxState


def make_template(config: Config, template_id: str, *, fork: bool) -> TemplateManifest:
    """A published template (manifest, image) with a memory snapshot in the kvm store."""
    directory = config.templates_dir / template_id
    directory.mkdir(parents=True)
    manifest = TemplateManifest(template_id=template_id, directory=directory, snapshot_of="sbx-source")
    (directory / MANIFEST_NAME).write_text(manifest.to_json())
    (directory / "rootfs.ext4").write_bytes(b"image")
    if fork:
        (directory / FORK_MARK).touch()
    memory = config.state_dir / SNAPSHOT_STORE / f"{template_id}-0123456789abcdef"
    memory.mkdir(parents=True)
    (memory / "memory").write_bytes(b"all of its RAM")
    return manifest


def exists(config: Config, template_id: str) -> tuple[bool, bool]:
    """(template directory, memory snapshot) still there."""
    memory = config.state_dir / SNAPSHOT_STORE / f"{template_id}-0123456789abcdef"
    return (config.templates_dir / template_id).exists(), memory.exists()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(state_dir=tmp_path / "state", run_dir=tmp_path / "run")


def test_a_checkpoint_lives_while_a_fork_of_it_does_then_goes_with_its_memory(config: Config) -> None:
    checkpoint = make_template(config, "fork-a", fork=True)
    other_fork = make_template(config, "fork-a-longer-name", fork=True)  # never matched by prefix
    make_template(config, "user-snapshot", fork=False)  # the user's: never swept
    runtime = KvmRuntime(config, None)
    guests = [
        Guest("sbx-1", checkpoint, SandboxState.RUNNING),
        Guest("sbx-2", checkpoint, SandboxState.PAUSED),  # a paused fork's memory is a diff over it
        Guest("sbx-3", other_fork, SandboxState.RUNNING),
    ]
    forks = ForkCheckpoints(config, runtime, lambda: guests)  # type: ignore[arg-type,return-value]
    assert forks.sweep() == []
    guests[0].state = SandboxState.ENDED
    forks.guest_changed(guests[0], SandboxState.ENDING)  # type: ignore[arg-type]
    assert exists(config, "fork-a") == (True, True)  # sbx-2 still needs it
    guests[1].state = SandboxState.ENDING  # killed: over for its user, its teardown running on
    forks.guest_changed(guests[1], SandboxState.PAUSED)  # type: ignore[arg-type]
    assert exists(config, "fork-a") == (False, False)
    assert exists(config, "fork-a-longer-name") == (True, True)
    assert exists(config, "user-snapshot") == (True, True)
    guests[2].state = SandboxState.FAILED
    forks.guest_changed(guests[2], SandboxState.BOOTING)  # type: ignore[arg-type]
    assert exists(config, "fork-a-longer-name") == (False, False)
    assert exists(config, "user-snapshot") == (True, True)


def test_a_restarted_service_deletes_what_a_crash_left_and_keeps_what_adopted_forks_use(
    config: Config,
) -> None:
    make_template(config, "fork-orphan", fork=True)  # its request died with the service
    adopted = make_template(config, "fork-adopted", fork=True)
    # The next service: adopted forks are in its table, no fork request is under way.
    runtime = KvmRuntime(config, None)
    guests = [
        Guest("sbx-kept", adopted, SandboxState.DETACHED),  # left running by the last service
        Guest("sbx-ended", make_template(config, "fork-ended", fork=True), SandboxState.ENDED),
    ]
    forks = ForkCheckpoints(config, runtime, lambda: guests)  # type: ignore[arg-type,return-value]
    assert forks.sweep() == ["fork-ended", "fork-orphan"]
    assert exists(config, "fork-orphan") == (False, False)
    assert exists(config, "fork-adopted") == (True, True)
    # A template directory half deleted (its manifest gone, the mark left) goes at the next sweep.
    (config.templates_dir / "fork-adopted" / MANIFEST_NAME).unlink()
    guests.clear()
    assert forks.sweep() == ["fork-adopted"] and exists(config, "fork-adopted") == (False, False)


def test_a_sandbox_holding_a_volume_is_never_memory_checkpointed(config: Config) -> None:
    refuse_with_volumes(config, "sbx-free")  # nothing mounted: allowed
    volume = config.state_dir / VOLUMES_DIR / "vol-1"
    volume.mkdir(parents=True)
    (volume / MOUNT_FILE).write_text(json.dumps({"sandbox_id": "sbx-writer", "path": "/mnt/data"}))
    with pytest.raises(CheckpointRefused, match=r"vol-1 at /mnt/data.*one sandbox at a time"):
        refuse_with_volumes(config, "sbx-writer")
    refuse_with_volumes(config, "sbx-free")
