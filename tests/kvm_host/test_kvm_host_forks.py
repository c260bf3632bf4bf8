"""Full-memory snapshots and forks of kvm sandboxes (cubelet/checkpoints.py), driven through the
unmodified E2B SDK in the emulated KVM host: what a Python kernel holds in memory and what the
sandbox wrote to its disk are in every sandbox made from the checkpoint; the source keeps its
id and deadline; a snapshot outlives its source."""

from __future__ import annotations

import httpx
import pytest
from e2b import SandboxState
from e2b_code_interpreter import Sandbox
from emulated_host import EmulatedHost
from test_kvm_host_bench import restart_service
from test_kvm_host_sandboxes import REQUEST_TIMEOUT_S, TEMPLATE, create, run_code

from appliance.api.client import ApiClient
from appliance.bench.snapshot import run_snapshot_bench

SETUP = (
    "import os\n"
    "marker = os.urandom(8).hex()\n"
    "survivor = [n * n for n in range(1000)]\n"
    "open('/home/user/kept.txt', 'w').write('written before: ' + marker)\n"
    "print(marker)"
)
BENCH_ROUNDS = 1  # each round is minutes under emulation
CHECK = "print(marker, sum(survivor), open('/home/user/kept.txt').read())"


def read_file_status(kvm_host: EmulatedHost, sandbox_id: str, token: str | None) -> int:
    """The status of envd's GET /files in `sandbox_id` with `token`, through the router."""
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983"}
    if token:
        headers["X-Access-Token"] = token
    response = httpx.get(
        f"{kvm_host.url}/files",
        params={"path": "/home/user/kept.txt", "username": "user"},
        headers=headers,
        timeout=REQUEST_TIMEOUT_S,
        trust_env=False,
    )
    return response.status_code


def test_a_fork_into_three_keeps_the_python_variable_in_each(kvm_host_sdk: EmulatedHost) -> None:
    source = create()
    forks: list[Sandbox] = []
    try:
        marker = run_code(source, SETUP).strip()
        before = source.get_info(request_timeout=REQUEST_TIMEOUT_S)
        results = source.fork(count=3, timeout=3600, request_timeout=REQUEST_TIMEOUT_S)
        forks = [result for result in results if isinstance(result, Sandbox)]
        assert len(results) == 3 and len(forks) == 3, results
        expected = f"{marker} 332833500 written before: {marker}\n"
        ids = {source.sandbox_id}
        for fork in forks:
            assert fork.sandbox_id not in ids
            ids.add(fork.sandbox_id)
            assert run_code(fork, CHECK) == expected
            run_code(fork, "marker = 'changed in ' + str(id(marker))")  # a fork's memory is its own
        # Each fork has its own access token: one's opens nothing in another (the SDK keeps it).
        tokens = {fork._envd_access_token for fork in forks} | {source._envd_access_token}
        assert None not in tokens and len(tokens) == 4
        # The source's token (which the snapshotted agent held) opens nothing in a fork: /init
        # replaced it. The router answers as for a sandbox that does not exist (502).
        for fork in forks:
            assert read_file_status(kvm_host_sdk, fork.sandbox_id, fork._envd_access_token) == 200
            assert read_file_status(kvm_host_sdk, fork.sandbox_id, source._envd_access_token) == 502
        # The source runs on, with its id, deadline and state, untouched by what the forks did.
        after = source.get_info(request_timeout=REQUEST_TIMEOUT_S)
        assert after.sandbox_id == source.sandbox_id and after.state == SandboxState.RUNNING
        assert after.end_at == before.end_at
        assert run_code(source, CHECK) == expected
        # The checkpoint is a snapshot of the caller's, of the source: listed while forks live.
        checkpoints = list(source.list_snapshots().next_items())
        assert len(checkpoints) == 1 and {f.get_info().template_id for f in forks} == {
            checkpoints[0].snapshot_id
        }
        # Deleted (template and memory) with the last fork, not before.
        forks.pop().kill()
        assert [c.snapshot_id for c in source.list_snapshots().next_items()] == [checkpoints[0].snapshot_id]
        while forks:
            forks.pop().kill()
        assert list(source.list_snapshots().next_items()) == []
        store = kvm_host_sdk.run("ls /var/lib/cube/kvm-snapshots").check().stdout
        assert checkpoints[0].snapshot_id not in store
    finally:
        for sandbox in (*forks, source):
            sandbox.kill()
        for checkpoint in Sandbox.list_snapshots(sandbox_id=source.sandbox_id).next_items():
            Sandbox.delete_snapshot(checkpoint.snapshot_id)


def test_a_full_snapshot_outlives_its_source_with_memory_and_files(kvm_host_sdk: EmulatedHost) -> None:
    source = create()
    marker = run_code(source, SETUP).strip()
    snapshot = source.create_snapshot(mode="full", request_timeout=REQUEST_TIMEOUT_S)
    restored = None
    try:
        assert run_code(source, "print('still running')") == "still running\n"
        source.kill()
        restart_service(kvm_host_sdk)  # the snapshot is plain data on disk: it outlives the service
        assert snapshot.snapshot_id in [s.snapshot_id for s in Sandbox.list_snapshots().next_items()]
        restored = Sandbox.create(snapshot.snapshot_id, timeout=3600, request_timeout=REQUEST_TIMEOUT_S)
        assert run_code(restored, CHECK) == f"{marker} 332833500 written before: {marker}\n"
        assert restored._envd_access_token not in (None, source._envd_access_token)
    finally:
        if restored is not None:
            restored.kill()
        source.kill()
        assert Sandbox.delete_snapshot(snapshot.snapshot_id) is True
    with pytest.raises(Exception, match="not found"):
        Sandbox.create(snapshot.snapshot_id, request_timeout=REQUEST_TIMEOUT_S)


def test_a_filesystem_snapshot_on_kvm_keeps_the_files_not_the_memory(kvm_host_sdk: EmulatedHost) -> None:
    """kvm's filesystem mode: the guest syncs, its disk is checkpointed; a sandbox made from it
    cold-boots (its Python kernel is a new one) with the file written before."""
    source = create()
    marker = run_code(source, SETUP).strip()
    snapshot = source.create_snapshot(mode="filesystem", request_timeout=REQUEST_TIMEOUT_S)
    restored = None
    try:
        source.kill()
        restored = Sandbox.create(snapshot.snapshot_id, timeout=3600, request_timeout=REQUEST_TIMEOUT_S)
        check = "print(open('/home/user/kept.txt').read(), 'marker' in globals())"
        assert run_code(restored, check) == f"written before: {marker} False\n"
    finally:
        if restored is not None:
            restored.kill()
        source.kill()
        Sandbox.delete_snapshot(snapshot.snapshot_id)


def test_snapshot_bench_in_full_mode_completes(
    kvm_host_sdk: EmulatedHost, kvm_host_api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cube bench snapshot --mode full` against the emulated host (from outside, as
    test_kvm_host_bench.py runs the SDK benches): every round's sandbox from the memory snapshot
    holds the written file, the fork's sandbox and checkpoint are cleaned up. Its numbers are
    software emulation's (TCG), printed for docs/BENCHMARKS.md, never asserted."""
    # The bench calls the SDK with its default request timeout (60 s): too short under emulation.
    monkeypatch.setattr("e2b.connection_config.REQUEST_TIMEOUT", float(REQUEST_TIMEOUT_S))
    report = run_snapshot_bench(
        ApiClient(kvm_host_sdk.url, kvm_host_api_key),
        TEMPLATE,
        BENCH_ROUNDS,
        8,
        mode="full",
        source_timeout_s=3600,
    )
    report.print_table()
    assert {row["metric"] for row in report.rows} == {
        "create_snapshot (full)",
        "create from snapshot",
        "fork (count=1)",
    }
    assert all(len(samples) == BENCH_ROUNDS for samples in report.samples.values()), report.samples
    assert list(Sandbox.list().next_items()) == []


def test_a_fork_checkpoint_outlives_a_restart_while_its_fork_does(kvm_host_sdk: EmulatedHost) -> None:
    """The checkpoint a fork starts from is kept across a service restart while the (adopted)
    fork lives, and deleted with it; full snapshots of the ISO's template (its image on the boot
    medium's squashfs: no hard link to the data disk) share one copy of that image."""
    source = create()
    snapshots: list[str] = []
    forks: list[Sandbox] = []
    try:
        marker = run_code(source, SETUP).strip()
        for _ in range(2):
            snapshots.append(
                source.create_snapshot(mode="full", request_timeout=REQUEST_TIMEOUT_S).snapshot_id
            )
        links = kvm_host_sdk.run("stat -c '%h %n' /var/lib/cube/kvm-base-images/*.img").check().stdout
        assert len(links.splitlines()) == 1 and links.split()[0] == "3", links  # its name, 2 snapshots
        results = source.fork(count=1, timeout=3600, request_timeout=REQUEST_TIMEOUT_S)
        forks = [result for result in results if isinstance(result, Sandbox)]
        assert len(forks) == 1, results
        (checkpoint,) = {s.snapshot_id for s in source.list_snapshots().next_items()} - set(snapshots)
        restart_service(kvm_host_sdk)
        # Adopted with its template: the checkpoint is still there, the fork runs on.
        assert checkpoint in {s.snapshot_id for s in source.list_snapshots().next_items()}
        assert run_code(forks[0], CHECK) == f"{marker} 332833500 written before: {marker}\n"
        forks.pop().kill()
        assert {s.snapshot_id for s in source.list_snapshots().next_items()} == set(snapshots)
        assert checkpoint not in kvm_host_sdk.run("ls /var/lib/cube/kvm-snapshots").check().stdout
    finally:
        for sandbox in (*forks, source):
            sandbox.kill()
        for snapshot_id in snapshots:
            Sandbox.delete_snapshot(snapshot_id)
