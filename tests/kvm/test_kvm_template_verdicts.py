"""What `cube doctor` reads about the templates kvm cannot serve: the snapshot store records
each one (the service then runs it on uml) until a version of it is snapshotted or the
service starts again. Plain files, no /dev/kvm needed."""

from __future__ import annotations

from pathlib import Path

from appliance.runtime.kvm.template_snapshots import (
    SNAPSHOT_STORE,
    SnapshotBuild,
    SnapshotKey,
    TemplateSnapshots,
    unservable_templates,
)


def key(template_id: str, version: str) -> SnapshotKey:
    return SnapshotKey(template_id, version, "kernel", "vmm", 512, 1, "host")


async def claim(store: TemplateSnapshots, of: SnapshotKey) -> SnapshotBuild:
    build = await store.ready_or_claim(of, "sandbox")
    assert isinstance(build, SnapshotBuild)
    return build


async def test_a_failed_build_or_restore_is_recorded_until_the_template_is_snapshotted(
    tmp_path: Path,
) -> None:
    store = TemplateSnapshots(tmp_path / SNAPSHOT_STORE)
    assert unservable_templates(tmp_path) == {}
    store.abandon(await claim(store, key("broken", "v1")), "its agent never answered")
    store.refuse(key("stale", "v1"), "its snapshot did not restore: bad state")
    interrupted = await claim(store, key("cancelled", "v1"))
    store.abandon(interrupted, None)  # cancelled: tried again next time, nothing to report
    assert unservable_templates(tmp_path) == {
        "broken": "its agent never answered",
        "stale": "its snapshot did not restore: bad state",
    }

    fixed = await claim(store, key("broken", "v2"))  # a new version of the template boots
    fixed.staging.mkdir(parents=True)
    store.publish(fixed)
    assert unservable_templates(tmp_path) == {"stale": "its snapshot did not restore: bad state"}
    # Pruning the snapshots of templates gone (all here: none is installed) keeps the records.
    assert store.prune(tmp_path / "templates") == [store.directory(key("broken", "v2")).name]
    assert unservable_templates(tmp_path) == {"stale": "its snapshot did not restore: bad state"}


def test_a_new_service_tries_every_template_again(tmp_path: Path) -> None:
    store = TemplateSnapshots(tmp_path / SNAPSHOT_STORE)
    store.refuse(key("stale", "v1"), "its snapshot did not restore")
    assert unservable_templates(tmp_path) == {"stale": "its snapshot did not restore"}
    TemplateSnapshots(tmp_path / SNAPSHOT_STORE)  # what the next `cube serve` makes
    assert unservable_templates(tmp_path) == {}


def test_records_that_are_not_ours_are_ignored(tmp_path: Path) -> None:
    records = tmp_path / SNAPSHOT_STORE / "unservable"
    records.mkdir(parents=True)
    (records / "torn.json").write_text('{"template_id": "x"')
    (records / "odd.json").write_text("[]")
    assert unservable_templates(tmp_path) == {}
