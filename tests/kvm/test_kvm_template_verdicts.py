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


async def test_a_deleted_templates_snapshots_and_records_go_at_once(tmp_path: Path) -> None:
    """`forget` (a template deleted while the service runs): every snapshot of it (each key's, a
    sandbox's memory among them) and its records go now, another template's with a similar name stay."""
    store = TemplateSnapshots(tmp_path / SNAPSHOT_STORE)
    for of in (key("snap", "v1"), key("snap", "v2"), key("snap-2", "v1")):
        build = await claim(store, of)
        build.staging.mkdir(parents=True)
        (build.staging / "memory").write_bytes(b"a sandbox's memory")
        store.install(of, build.staging)
        store.abandon(build, None)
    store.refuse(key("snap", "v3"), "its snapshot did not restore")
    removed = store.forget("snap")
    assert sorted(removed) == sorted(store.directory(key("snap", v)).name for v in ("v1", "v2"))
    assert [d.name for d in store.root.iterdir() if d.name != "unservable"] == [
        store.directory(key("snap-2", "v1")).name
    ]
    assert unservable_templates(tmp_path) == {} and store.unservable == {}
    assert store.forget("snap") == []
