"""The appliance the README's first command started, driven like a user would.

`tests/run.sh` installs and starts the service, then exports CUBE_API_URL and
CUBE_API_KEY_FILE for these tests. They use real UML sandboxes through the
unmodified E2B SDK, for what the per-module suites cannot see: a sandbox that
lives through the cubelet's health probes, and bulk transfers through the
router into a guest.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b_code_interpreter import Sandbox

# Three failed probes kill a sandbox (cubelet: HEALTH_INTERVAL_S=5, 3 failures).
HEALTH_PROBE_ROUNDS_S = 18


def _service_env() -> dict[str, str] | None:
    url = os.environ.get("CUBE_API_URL")
    key_file = os.environ.get("CUBE_API_KEY_FILE")
    if not url or not key_file or not Path(key_file).is_file():
        return None
    return {"E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": Path(key_file).read_text().strip()}


pytestmark = pytest.mark.skipif(
    _service_env() is None,
    reason="needs the running appliance: run through tests/run.sh (sets CUBE_API_URL, CUBE_API_KEY_FILE)",
)


@pytest.fixture
def sandbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandbox]:
    for name, value in (_service_env() or {}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    created = Sandbox.create(template="code-interpreter", timeout=300)
    try:
        yield created
    finally:
        created.kill()


def test_sandbox_outlives_health_probes(sandbox: Sandbox) -> None:
    # The cubelet probes envd /health; once /init set the access token the probe
    # must carry it, or the healthy sandbox is killed as "unresponsive".
    time.sleep(HEALTH_PROBE_ROUNDS_S)
    assert sandbox.is_running()
    assert sandbox.get_info().state.value == "running"
    assert sandbox.commands.run("echo alive").stdout == "alive\n"
    assert sandbox.run_code("print(6 * 7)").logs.stdout == ["42\n"]


@pytest.mark.parametrize("size", [1 << 20, 32 << 20])
def test_bulk_files_round_trip_through_the_router(sandbox: Sandbox, size: int) -> None:
    data = os.urandom(size)
    sandbox.files.write("/tmp/blob", data)
    assert sandbox.commands.run("stat -c %s /tmp/blob").stdout.strip() == str(size)
    digest = sandbox.commands.run("sha256sum /tmp/blob").stdout.split()[0]
    assert digest == hashlib.sha256(data).hexdigest()
    assert sandbox.files.read("/tmp/blob", format="bytes") == data


def test_sdk_lifecycle_on_real_sandboxes(sandbox: Sandbox) -> None:
    # create (fixture) → list with a metadata filter → get_info → set_timeout → kill,
    # all through the unmodified SDK against a real guest.
    from e2b import SandboxQuery, SandboxState

    tagged = Sandbox.create(template="code-interpreter", metadata={"suite": "e2e-lifecycle"}, timeout=120)
    try:
        listed = Sandbox.list(query=SandboxQuery(metadata={"suite": "e2e-lifecycle"})).next_items()
        assert [s.sandbox_id for s in listed] == [tagged.sandbox_id]
        before = tagged.get_info()
        assert before.state == SandboxState.RUNNING and before.metadata == {"suite": "e2e-lifecycle"}
        tagged.set_timeout(600)
        after = tagged.get_info()
        assert (after.end_at - before.end_at).total_seconds() > 400
        assert tagged.commands.run("echo ok").stdout == "ok\n"
    finally:
        assert tagged.kill()
    assert not tagged.is_running()
    remaining = Sandbox.list(query=SandboxQuery(metadata={"suite": "e2e-lifecycle"})).next_items()
    assert remaining == []
    assert sandbox.is_running()  # killing one sandbox leaves the others alone
