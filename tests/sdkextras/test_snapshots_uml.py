"""Filesystem snapshots of real UML sandboxes through the unmodified E2B SDK (root only; the
template this host's installer built, read-only through a symlink, as tests/guest does).

A `cube serve` of the test's own (uml runtime, guest DNS going nowhere): a sandbox writes a file,
is snapshotted, writes another, is killed; the service restarts; a sandbox created from the
snapshot has the first file and not the second. Another team sees and reaches none of it. A
deleted snapshot leaves no pool, no guest and no files, and creating from it is E2B's 404.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import umlguests
from e2b import Sandbox
from e2b.exceptions import SandboxException

pytestmark = [
    pytest.mark.uml,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="real UML guests need root"),
]


@pytest.fixture
def uml_service(start_service: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[umlguests.UmlService]:
    with umlguests.uml_service(start_service, monkeypatch, pool_size=1) as service:
        yield service


def test_a_filesystem_snapshot_outlives_its_sandbox_and_a_restart(uml_service: umlguests.UmlService) -> None:
    alice, bob = uml_service.key("alice"), uml_service.key("bob")
    source = Sandbox.create(timeout=600, api_key=alice)
    source.files.write("/home/user/kept.txt", "written before the snapshot")
    snapshot = source.create_snapshot("alice-snap")  # no mode: filesystem, what uml can take
    source.files.write("/home/user/later.txt", "written after the snapshot")
    assert source.commands.run("cat /home/user/kept.txt").stdout == "written before the snapshot"

    listed = Sandbox.list_snapshots(api_key=alice).next_items()
    assert [s.snapshot_id for s in listed] == [snapshot.snapshot_id]  # before the paused one
    assert "alice-snap" in listed[0].names
    mine = Sandbox.list_snapshots(sandbox_id=source.sandbox_id, api_key=alice).next_items()
    assert [s.snapshot_id for s in mine] == [snapshot.snapshot_id]

    # A paused sandbox: thawed for its `sync`, snapshotted, left paused.
    assert source.pause()
    paused = Sandbox.create_snapshot(source.sandbox_id, api_key=alice)
    assert Sandbox.get_info(source.sandbox_id, api_key=alice).state.value == "paused"
    source.connect()

    with pytest.raises(SandboxException) as caught:
        source.create_snapshot(mode="full")
    assert "409" in str(caught.value) and "uml runtime" in str(caught.value)
    assert 'mode="filesystem"' in str(caught.value)
    forks = source.fork(count=2)
    assert len(forks) == 2 and all(isinstance(f, SandboxException) for f in forks)
    assert all("uml runtime" in str(f) and "create_snapshot" in str(f) for f in forks)

    # Another team: not listed, cannot boot it or delete it (E2B's 404, as for no such snapshot).
    assert Sandbox.list_snapshots(api_key=bob).next_items() == []
    for name in (snapshot.snapshot_id, "alice-snap"):
        with pytest.raises(SandboxException) as caught:
            Sandbox.create(name, api_key=bob)
        assert "not found" in str(caught.value)
        assert Sandbox.delete_snapshot(name, api_key=bob) is False

    source.kill()
    uml_service.harness.stop()
    uml_service.start()

    restored = Sandbox.create(snapshot.snapshot_id, timeout=600, api_key=alice)
    assert restored.files.read("/home/user/kept.txt") == "written before the snapshot"
    assert not restored.files.exists("/home/user/later.txt")
    assert restored.get_info().template_id == snapshot.snapshot_id
    restored.kill()
    by_name = Sandbox.create("alice-snap", timeout=600, api_key=alice)
    assert by_name.files.read("/home/user/kept.txt") == "written before the snapshot"
    by_name.kill()
    from_paused = Sandbox.create(paused.snapshot_id, timeout=600, api_key=alice)
    assert from_paused.files.read("/home/user/later.txt") == "written after the snapshot"
    from_paused.kill()
    assert Sandbox.delete_snapshot(paused.snapshot_id, api_key=alice) is True

    assert Sandbox.delete_snapshot(snapshot.snapshot_id, api_key=alice) is True
    assert Sandbox.list_snapshots(api_key=alice).next_items() == []
    assert not (uml_service.config.templates_dir / snapshot.snapshot_id).exists()
    # Nothing is kept warm or cached for a snapshot nobody can create from (a pool of one per
    # template here: none ever formed for a snapshot, and none is left).
    cubelet, in_service = uml_service.harness.running.cubelet, uml_service.harness.run_sync_in_service
    for deleted in (snapshot.snapshot_id, paused.snapshot_id, "alice-snap"):
        with pytest.raises(SandboxException) as caught:
            Sandbox.create(deleted, api_key=alice)
        assert str(caught.value).startswith("404:") and "not found" in str(caught.value)
        assert in_service(cubelet.pool_state, deleted) == {"target": 0, "ready": 0, "booting": 0}
        assert deleted not in in_service(lambda: list(cubelet.pools._pools))
        assert in_service(cubelet.live_count, deleted) == 0
