"""Volumes mounted into kvm sandboxes (runtime/kvm/volumes.py: an empty virtio-blk volume slot
every guest boots with, given the volume's image at the claim) through the unmodified E2B SDKs in
the emulated KVM host; and the JS SDK's fork on kvm (tests/js/fork.mjs).

A volume written by one kvm sandbox is read by the next, a guest restored from the template
snapshot taking it as a cold-booted one does; a sandbox holding a volume is not memory-checkpointed
(a fork's entries and a full snapshot are refused with E2B's shapes, one writer per volume) and
runs on. A fork's checkpoint is gone once the fork request is over and its forks are killed.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from e2b import Volume
from e2b_code_interpreter import Sandbox
from emulated_host import EmulatedHost
from test_kvm_host_sandboxes import REQUEST_TIMEOUT_S, TEMPLATE, console_of, create, run_code

T = REQUEST_TIMEOUT_S


def run(sandbox: Sandbox, command: str) -> str:
    return sandbox.commands.run(command, timeout=T, request_timeout=T).stdout


def test_a_volume_written_by_one_kvm_sandbox_is_read_by_the_next(
    kvm_host_sdk: EmulatedHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("E2B_VOLUME_API_URL", kvm_host_sdk.url)
    volume = Volume.create(f"kvm-work-{os.urandom(3).hex()}")
    try:
        volume.write_file("/seed.txt", "from the content API")
        first = create(volume_mounts={"/mnt/data": volume})
        try:
            assert run(first, "cat /mnt/data/seed.txt") == "from the content API"
            # The volume is volume slot 1's disk, vdb (named by its serial), owned by the user.
            assert run(first, "cat /sys/block/vdb/serial") == "cube-volume-1"
            assert run(first, "stat -c %U /mnt/data").strip() == "user"
            first.files.write("/mnt/data/out/result.txt", "written in kvm sandbox 1", request_timeout=T)
            # One writer per volume: no memory checkpoint of it (each fork's error, a full
            # snapshot's 409 naming what works); it runs on, its volume mounted.
            results = first.fork(count=2, timeout=600, request_timeout=T)
            assert len(results) == 2 and all(isinstance(r, Exception) for r in results), results
            assert all("volume" in str(r) and "409" in str(r) for r in results), results
            with pytest.raises(Exception, match="filesystem") as refused:
                first.create_snapshot(mode="full", request_timeout=T)
            assert "volume" in str(refused.value)
            assert run(first, "cat /mnt/data/out/result.txt") == "written in kvm sandbox 1"
        finally:
            first.kill()
        assert volume.read_file("/out/result.txt") == "written in kvm sandbox 1"
        assert list(Sandbox.list_snapshots(sandbox_id=first.sandbox_id).next_items()) == []

        second = create(volume_mounts={"/home/user/vol": volume.name})
        try:
            # Restored from the template snapshot (no boot on its console): the slot was empty
            # in the snapshot, the image came at the claim.
            assert "Linux version" not in console_of(kvm_host_sdk, second.sandbox_id)
            assert (
                second.files.read("/home/user/vol/out/result.txt", request_timeout=T)
                == "written in kvm sandbox 1"
            )
            seed = run_code(second, "print(open('/home/user/vol/seed.txt').read())")
            assert seed == "from the content API\n"
            second.files.write("/home/user/vol/second.txt", "and kvm sandbox 2", request_timeout=T)
        finally:
            second.kill()
        assert volume.read_file("/second.txt") == "and kvm sandbox 2"
    finally:
        Volume.destroy(volume.volume_id)


def test_the_js_sdk_forks_a_kvm_sandbox_into_three(kvm_host_sdk: EmulatedHost, js_sdk_dir: Path) -> None:
    env = {**os.environ, "CUBE_TEMPLATE": TEMPLATE}
    env.pop("E2B_DEBUG", None)
    result = subprocess.run(
        ["node", "fork.mjs"], cwd=js_sdk_dir, env=env, capture_output=True, text=True, timeout=3600
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["errors"] == [] and len(seen["forks"]) == 3, seen
    marker = seen["marker"]
    assert len(marker) == 16
    ids = {seen["source"]} | {fork["id"] for fork in seen["forks"]}
    assert len(ids) == 4
    for fork in seen["forks"]:
        assert fork["saw"] == marker and fork["isSandbox"] is True, fork
    assert seen["sourceAfter"] == marker  # what each fork changed is its own
    assert seen["checkpoints"] == []  # deleted with its last fork
