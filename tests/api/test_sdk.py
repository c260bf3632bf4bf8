"""The unmodified E2B Python SDK against `cube serve` (runtime double), env vars only."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest
from e2b import Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import SandboxException

if TYPE_CHECKING:
    from conftest import FakeRuntime, ServiceHarness


def test_create_get_info_list_set_timeout_kill(sdk_env: ServiceHarness, fake_runtime: FakeRuntime) -> None:
    sandbox = Sandbox.create(template="code-interpreter", metadata={"owner": "alice"}, envs={"FOO": "bar"})
    info = sandbox.get_info()
    assert info.sandbox_id == sandbox.sandbox_id
    assert info.template_id == "code-interpreter"
    assert info.metadata == {"owner": "alice"}
    assert info.state == SandboxState.RUNNING
    # Default timeout is 300 s.
    assert 295 <= (info.end_at - info.started_at).total_seconds() <= 301

    # The guest agent got the env vars and the access token the SDK will send to envd.
    init = fake_runtime.instances[sandbox.sandbox_id].app.init_calls[-1]
    assert init["envVars"] == {"TEMPLATE_VAR": "1", "FOO": "bar"}
    assert init["accessToken"] == sandbox._envd_access_token

    listed = Sandbox.list(query=SandboxQuery(metadata={"owner": "alice"})).next_items()
    assert [s.sandbox_id for s in listed] == [sandbox.sandbox_id]
    assert Sandbox.list(query=SandboxQuery(metadata={"owner": "bob"})).next_items() == []

    sandbox.set_timeout(30)
    info = sandbox.get_info()
    assert (
        25
        <= (info.end_at - info.started_at).total_seconds() - (time.time() - info.started_at.timestamp())
        <= 31
    )

    assert sandbox.is_running()  # envd /health through the header-routed proxy
    sandbox.kill()
    assert not sandbox.is_running()
    assert Sandbox.list().next_items() == []
    assert Sandbox.kill(sandbox.sandbox_id) is False


def test_sdk_default_template_names_map_to_default(sdk_env: ServiceHarness) -> None:
    sandbox = Sandbox.create()  # the SDK sends templateID "base"
    try:
        assert sandbox.get_info().template_id == "code-interpreter"
    finally:
        sandbox.kill()
    from e2b_code_interpreter import Sandbox as CodeInterpreterSandbox

    ci = CodeInterpreterSandbox.create()  # sends "code-interpreter-v1"
    try:
        assert ci.get_info().template_id == "code-interpreter"
    finally:
        ci.kill()


def test_list_pagination_and_state_filter(sdk_env: ServiceHarness) -> None:
    sandboxes = [Sandbox.create(metadata={"batch": "p"}) for _ in range(3)]
    try:
        paginator = Sandbox.list(query=SandboxQuery(metadata={"batch": "p"}), limit=2)
        first = paginator.next_items()
        assert len(first) == 2 and paginator.has_next
        second = paginator.next_items()
        assert len(second) == 1 and not paginator.has_next
        assert {s.sandbox_id for s in first + second} == {s.sandbox_id for s in sandboxes}

        sandboxes[0].pause()
        paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
        assert [s.sandbox_id for s in paused] == [sandboxes[0].sandbox_id]
        running = Sandbox.list(query=SandboxQuery(state=[SandboxState.RUNNING])).next_items()
        assert {s.sandbox_id for s in running} == {s.sandbox_id for s in sandboxes[1:]}
    finally:
        for sandbox in sandboxes:
            sandbox.kill()


def test_pause_then_connect_resumes(sdk_env: ServiceHarness, fake_runtime: FakeRuntime) -> None:
    sandbox = Sandbox.create()
    try:
        assert sandbox.pause() is True
        assert sandbox.get_info().state == SandboxState.PAUSED
        assert fake_runtime.instances[sandbox.sandbox_id].paused_count == 1
        assert Sandbox.pause(sandbox.sandbox_id) is False  # 409: already paused
        assert not sandbox.is_running()  # the proxy answers 502 "... was not found running"

        resumed = Sandbox.connect(sandbox.sandbox_id)
        # The handle connect gives holds the tokens create gave: envd and the ports accept them.
        assert resumed._envd_access_token == sandbox._envd_access_token is not None
        assert resumed.traffic_access_token == sandbox.traffic_access_token is not None
        assert resumed.get_info().state == SandboxState.RUNNING
        assert resumed.is_running()
        # Connecting to a running sandbox is fine too (200).
        again = Sandbox.connect(sandbox.sandbox_id, timeout=600)
        assert again.get_info().end_at.timestamp() > time.time() + 590
    finally:
        sandbox.kill()


def test_metrics(sdk_env: ServiceHarness) -> None:
    sandbox = Sandbox.create()
    try:
        metrics = sandbox.get_metrics()
        assert len(metrics) >= 1  # one per 5 s sampling interval so far
        assert metrics[0].mem_used == 1234  # envd's own view wins over the host's
        assert metrics[0].cpu_used_pct == 12.5
        assert metrics[0].mem_total == 4321
    finally:
        sandbox.kill()


def test_unknown_sandbox_raises_not_found(sdk_env: ServiceHarness) -> None:
    from e2b.exceptions import NotFoundException

    with pytest.raises(NotFoundException):
        Sandbox.get_info("doesnotexist")
    with pytest.raises(NotFoundException):
        Sandbox.set_timeout("doesnotexist", 10)
    with pytest.raises(NotFoundException):
        Sandbox.connect("doesnotexist")


def test_unknown_template_is_a_clean_error(sdk_env: ServiceHarness) -> None:
    with pytest.raises(SandboxException, match="not found"):
        Sandbox.create(template="no-such-template")
    assert Sandbox.list().next_items() == []


def test_short_timeout_kills_the_sandbox(sdk_env: ServiceHarness, fake_runtime: FakeRuntime) -> None:
    sandbox = Sandbox.create(timeout=1)
    assert sandbox.is_running()
    deadline = time.time() + 10
    while sandbox.sandbox_id in fake_runtime.instances and time.time() < deadline:
        time.sleep(0.1)
    assert sandbox.sandbox_id not in fake_runtime.instances
    assert not sandbox.is_running()
    assert Sandbox.list().next_items() == []
