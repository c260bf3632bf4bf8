"""Sandboxes outlive the control process: a private `cube serve` process with real UML
guests, killed and restarted for real (appliance/bench/private.py), driven by the
unmodified E2B SDK.

- kill -9 of the service with N live sandboxes holding state (a Python variable in the
  interpreter, a background process, a written file): after the restart all N answer
  with that state, deadlines kept; the same across a SIGTERM (systemd's stop/restart);
  N is CUBE_TEST_RESTART_N (default 20);
- kill -9 of one supervisor, the service running or not: that sandbox is reported ended
  with the reason, nothing of it is left, the others are unaffected;
- a guest kernel panic: only that sandbox ends;
- ten restarts in a row (kill -9 and SIGTERM) under a bounded create/delete load: no
  netns, veth, process, cgroup leaf or file is left once the sandboxes are deleted.

Traffic goes only to the private service on loopback and, through it, to the sandboxes'
addresses in namespaces it made; the guests' DNS upstream is the host's, never asked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hostprocs import processes_of_uid_range, sandbox_leftovers

from appliance.bench.private import PrivateService
from appliance.net.addressing import Addressing
from appliance.process_identity import ProcessIdentity
from appliance.runtime.supervisor.client import SUPERVISORS_DIR
from appliance.runtime.supervisor.protocol import RECORD_FILE, SupervisorRecord

pytestmark = [pytest.mark.uml, pytest.mark.slow]

N = int(os.environ.get("CUBE_TEST_RESTART_N", "20"))
PARALLEL_CREATES = 4
SANDBOX_TIMEOUT_S = 1800
ENDED_WAIT_S = 60.0  # a dead supervisor is noticed at once; a loaded host takes its time tearing down


@pytest.fixture
def service(
    private_service: Callable[..., PrivateService], monkeypatch: pytest.MonkeyPatch
) -> PrivateService:
    started = private_service()
    started.start()
    started.wait_ready()
    key = started.create_key("faults")
    for name, value in (("E2B_API_URL", started.url), ("E2B_SANDBOX_URL", started.url), ("E2B_API_KEY", key)):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    return started


def restart(service: PrivateService, signum: int) -> None:
    service.stop(signum)  # SIGKILL: waits for the process, nothing else happens
    service.start()
    service.wait_ready()


def with_state(i: int) -> str:
    """A sandbox holding state three ways; its id."""
    from e2b_code_interpreter import Sandbox

    sandbox = Sandbox.create(timeout=SANDBOX_TIMEOUT_S)
    assert sandbox.run_code(f"kept = {i} * 7").error is None
    sandbox.commands.run(f"nohup sleep {86400 + i} >/dev/null 2>&1 &")
    sandbox.files.write("/home/user/kept.txt", f"written by {i}")
    return str(sandbox.sandbox_id)


def assert_state(sandbox_id: str, i: int) -> None:
    from e2b_code_interpreter import Sandbox

    sandbox = Sandbox.connect(sandbox_id)
    assert sandbox.run_code("print(kept)").logs.stdout == [f"{i * 7}\n"], sandbox_id
    assert sandbox.commands.run(f"pgrep -x -f 'sleep {86400 + i}'").exit_code == 0, sandbox_id
    assert sandbox.files.read("/home/user/kept.txt") == f"written by {i}", sandbox_id


def end_ats(service: PrivateService, sandbox_ids: list[str]) -> dict[str, str]:
    with service.admin() as admin:
        return {i: admin.get(f"/sandboxes/{i}").json()["endAt"] for i in sandbox_ids}


def test_sandboxes_with_state_outlive_kill_9_and_sigterm_of_the_service(service: PrivateService) -> None:
    with ThreadPoolExecutor(PARALLEL_CREATES) as pool:
        sandboxes = list(pool.map(with_state, range(N)))
    deadlines = end_ats(service, sandboxes)
    supervisors = {i: supervisor_of(service, i) for i in sandboxes}

    restart(service, signal.SIGKILL)
    assert end_ats(service, sandboxes) == deadlines  # before anything extends them
    assert {i: supervisor_of(service, i) for i in sandboxes} == supervisors  # the same processes
    with ThreadPoolExecutor(PARALLEL_CREATES) as pool:
        list(pool.map(assert_state, sandboxes, range(N)))

    restart(service, signal.SIGTERM)
    with ThreadPoolExecutor(PARALLEL_CREATES) as pool:
        list(pool.map(assert_state, sandboxes, range(N)))
    with service.admin() as admin:
        events = [e["kind"] for e in admin.get(f"/cube/sandboxes/{sandboxes[0]}").json()["events"]]
    assert events.count("adopted") == 2, events


def supervisor_record(service: PrivateService, sandbox_id: str) -> SupervisorRecord:
    return SupervisorRecord.decode(
        (service.run_dir / SUPERVISORS_DIR / sandbox_id / RECORD_FILE).read_bytes()
    )


def supervisor_of(service: PrivateService, sandbox_id: str) -> ProcessIdentity:
    return supervisor_record(service, sandbox_id).identity


def ended_reason(service: PrivateService, sandbox_id: str) -> str:
    """The reason the service gives for a sandbox that has ended (waits until it has)."""
    deadline = time.monotonic() + ENDED_WAIT_S
    with service.admin() as admin:
        while time.monotonic() < deadline:
            detail = admin.get(f"/cube/sandboxes/{sandbox_id}").json()
            if detail["state"] == "dead":
                gone = admin.get(f"/sandboxes/{sandbox_id}")
                assert gone.status_code == 404 and detail["endReason"] in gone.json()["message"]
                return str(detail["endReason"])
            time.sleep(0.2)
    raise AssertionError(f"sandbox {sandbox_id} is still {detail['state']}")


def test_a_killed_supervisor_ends_its_sandbox_only_with_or_without_the_service(
    service: PrivateService,
) -> None:
    with ThreadPoolExecutor(3) as pool:
        live, killed_running, killed_down = pool.map(with_state, range(3))
    victim = supervisor_record(service, killed_running)
    os.kill(victim.pid, signal.SIGKILL)
    reason = ended_reason(service, killed_running)
    assert f"its supervisor (pid {victim.pid}) is gone" in reason, reason
    wait_for_nothing_of(service, killed_running, victim.guest["slot"])

    service.stop(signal.SIGTERM)  # the sandboxes run on ...
    victim = supervisor_record(service, killed_down)
    os.kill(victim.pid, signal.SIGKILL)  # ... but this one's supervisor dies while no service runs
    service.start()
    service.wait_ready()
    reason = ended_reason(service, killed_down)
    assert reason.startswith("service restarted: ") and f"(pid {victim.pid}) is gone" in reason, reason
    wait_for_nothing_of(service, killed_down, victim.guest["slot"])
    assert_state(live, 0)


def test_a_guest_kernel_panic_ends_that_sandbox_only(service: PrivateService) -> None:
    from e2b_code_interpreter import Sandbox

    with ThreadPoolExecutor(2) as pool:
        survivor, crashing = pool.map(with_state, range(2))
    slot = supervisor_record(service, crashing).guest["slot"]
    with pytest.raises(Exception):  # noqa: B017 (the guest dies under the call: any transport error)
        Sandbox.connect(crashing).commands.run("echo c > /proc/sysrq-trigger", user="root", timeout=30)
    reason = ended_reason(service, crashing)
    assert reason == "guest exited: Kernel panic - not syncing: sysrq triggered crash", reason
    wait_for_nothing_of(service, crashing, slot)
    assert_state(survivor, 0)


def footprint(service: PrivateService, sandbox_ids: set[str]) -> dict[str, list[str]]:
    """Everything of these sandboxes on the host: namespaces (with their taps), host-side veths,
    processes of the sandbox uids, cgroup leaves, files."""
    veth_prefix = Addressing(service.settings.host_network).veth_prefix
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    files = [service.state_dir / "sandboxes", service.run_dir / SUPERVISORS_DIR, service.run_dir / "net"]
    slots = Addressing(service.settings.host_network).max_slots
    return {
        **sandbox_leftovers(sandbox_ids, service.settings.uid_base, slots),
        "veths": sorted(
            w for line in links.splitlines() for w in line.split()[1:2] if w.startswith(veth_prefix)
        ),
        "files": sorted(
            str(p) for d in files if d.is_dir() for p in d.iterdir() if p.name.split(".")[0] in sandbox_ids
        ),
    }


def wait_for_nothing_of(service: PrivateService, sandbox_id: str, slot: int) -> None:
    """Until nothing of the sandbox is left (its own namespace, processes, leaves, files)."""
    deadline = time.monotonic() + ENDED_WAIT_S
    while True:
        left = footprint(service, {sandbox_id})
        left["veths"] = []  # the other sandboxes' (its own went with its namespace)
        left["processes"] = processes_of_uid_range(service.settings.uid_base + slot, 1)
        if not any(left.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not any(left.values()), left


class CreateDeleteLoad:
    """Creates, uses and deletes sandboxes in a loop until stopped, whatever the service is
    doing (refusals and broken connections while it restarts are expected and counted)."""

    def __init__(self, service: PrivateService, key: str) -> None:
        self.service = service
        self.key = key
        self.done = threading.Event()
        self.created: set[str] = set()
        self.cycles = 0
        self.errors = 0

    def run(self) -> None:
        headers = {"X-API-KEY": self.key}
        with httpx.Client(base_url=self.service.url, headers=headers, timeout=120, trust_env=False) as client:
            while not self.done.is_set():
                try:
                    made = client.post("/sandboxes", json={"templateID": "code-interpreter", "timeout": 600})
                    if made.status_code != 201:
                        raise httpx.HTTPError(f"create answered {made.status_code}")
                    sandbox_id = made.json()["sandboxID"]
                    self.created.add(sandbox_id)
                    client.delete(f"/sandboxes/{sandbox_id}")
                    self.cycles += 1
                except (httpx.HTTPError, ValueError):
                    self.errors += 1
                    time.sleep(0.5)


def all_sandbox_ids(service: PrivateService) -> set[str]:
    with service.admin() as admin:
        return {s["sandboxID"] for s in admin.get("/cube/sandboxes", params={"all": "1"}).json()}


def test_ten_restarts_under_create_delete_load_leak_nothing(service: PrivateService) -> None:
    before = footprint(service, set())
    kept = with_state(0)  # one that lives through all ten
    load = CreateDeleteLoad(service, os.environ["E2B_API_KEY"])
    worker = threading.Thread(target=load.run)
    worker.start()
    try:
        for round_ in range(10):
            time.sleep(3)  # creates and deletes in flight
            restart(service, signal.SIGKILL if round_ % 2 == 0 else signal.SIGTERM)
    finally:
        load.done.set()
        worker.join()
    assert load.cycles > 0, f"no create/delete cycle completed ({load.errors} errors)"
    assert_state(kept, 0)
    with service.admin() as admin:
        for sandbox in admin.get("/cube/sandboxes").json():  # what the load left mid-cycle, and `kept`
            admin.delete(f"/sandboxes/{sandbox['sandboxID']}")
    ids = all_sandbox_ids(service) | load.created
    deadline = time.monotonic() + ENDED_WAIT_S
    while (after := footprint(service, ids)) != before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert after == before, {k: (before[k], after[k]) for k in after if after[k] != before[k]}


def pooled_guests(service: PrivateService) -> set[str]:
    """The guests the service has that are no user's sandbox (its warm pool: pool_size > 0)."""
    supervisors = service.run_dir / SUPERVISORS_DIR
    guests = {p.parent.name for p in supervisors.glob(f"*/{RECORD_FILE}")} if supervisors.is_dir() else set()
    with service.admin() as admin:
        return guests - {s["sandboxID"] for s in admin.get("/cube/sandboxes").json()}


def test_pooled_guests_of_a_killed_service_are_ended_and_the_pool_refills(
    private_service: Callable[..., PrivateService],
) -> None:
    """Nobody's sandboxes yet: ended at the restart (cleanly), not taken over."""
    service = private_service(pool_size=1)
    service.start()
    service.wait_ready()
    deadline = time.monotonic() + ENDED_WAIT_S * 3
    while not (before := pooled_guests(service)) and time.monotonic() < deadline:
        time.sleep(0.5)
    (pooled,) = before
    slot = supervisor_record(service, pooled).guest["slot"]
    restart(service, signal.SIGKILL)
    wait_for_nothing_of(service, pooled, slot)
    with service.admin() as admin:
        assert admin.get(f"/cube/sandboxes/{pooled}").status_code == 404  # it never was a sandbox
    deadline = time.monotonic() + ENDED_WAIT_S * 3
    while not (after := pooled_guests(service)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(after) == 1 and pooled not in after
