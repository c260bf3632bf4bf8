"""The pip `e2b` SDK's start/ready commands and `skip_cache`, against a real `cube serve` whose
runtime is real UML (root only), env vars only; the base image is the loopback registry's test
image (uml_world.py).

- `set_start_cmd(start, ready)`: the start command runs when a sandbox starts and the ready
  command is awaited before `Sandbox.create` answers (on E2B the sandbox resumes from a snapshot
  taken once the ready command succeeded: its process is running). A ready command that never
  succeeds fails the build with a BuildException, and nothing is published.
- `skip_cache`: a normal rebuild reuses a RUN step whose output differs each run; `skip_cache=True`
  on the build, or `.skip_cache()` before the step, runs it again.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
from uml_world import PushedImage

pytestmark = [
    pytest.mark.uml,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="real UML guests need root"),
]

# The start command is slow on purpose: a create that did not await the ready command would answer
# before the server listens (the guest agent answers within seconds of the boot).
START_DELAY_S = 8
START_CMD = (
    f"sleep {START_DELAY_S} && echo $$ > /tmp/start-pid && exec python3 -m http.server 8000 --bind 127.0.0.1"
)
# A cold UML boot plus the start command's delay, on a loaded host: more than the SDK's default 60 s.
CREATE_REQUEST_TIMEOUT_S = 300
FETCH = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/').status)"
# As root: the test image's user has no home (its WORKDIR is /app).
STAMP_RUN = "date +%s%N > /stamp && echo stamp=$(cat /stamp)"
STAMP_LINE = re.compile(r"stamp=(\d+)")


def test_start_command_runs_and_its_ready_command_is_awaited_at_create(
    uml_service: Any, test_image: PushedImage
) -> None:
    from e2b import Sandbox, Template, wait_for_port

    template = Template().from_image(test_image.ref).set_start_cmd(START_CMD, wait_for_port(8000))
    logs: list[Any] = []
    Template.build(template, "sdk-started", on_build_logs=logs.append)
    messages = [entry.message for entry in logs]
    print("build log:", *messages, sep="\n  ")
    assert any("ready command succeeded" in m for m in messages), messages

    sandbox = Sandbox.create("sdk-started", timeout=120, request_timeout=CREATE_REQUEST_TIMEOUT_S)
    try:
        # At once, no waiting: the server the start command started answers when create has returned.
        result = sandbox.commands.run(
            f'python3 -c "{FETCH}"; pid=$(cat /tmp/start-pid); '
            "tr '\\0' ' ' < /proc/$pid/cmdline; echo; stat -c %U /proc/$pid"
        )
        print("sandbox printed:", result.stdout)
        assert result.stdout.splitlines() == [
            "200",
            "python3 -m http.server 8000 --bind 127.0.0.1 ",
            "user",  # as the template's user (E2B's `user` for an image base)
        ]
    finally:
        sandbox.kill()


def test_a_ready_command_that_never_succeeds_fails_the_build(
    uml_service: Any, test_image: PushedImage
) -> None:
    from e2b import Template, wait_for_file
    from e2b.exceptions import BuildException

    template = Template().from_image(test_image.ref).set_start_cmd("sleep infinity", wait_for_file("/never"))
    with pytest.raises(BuildException) as failed:
        Template.build(template, "sdk-never-ready")
    print("BuildException:", failed.value)
    assert "ready command" in str(failed.value) and "/never" in str(failed.value)
    assert not Template.exists("sdk-never-ready")  # nothing half-built is published


def _build_stamp(template: Any, name: str, **options: Any) -> str | None:
    """Builds `template` as `name`; the stamp its RUN step printed, None if the step was cached."""
    from e2b import Template

    logs: list[Any] = []
    Template.build(template, name, on_build_logs=logs.append, **options)
    messages = [entry.message for entry in logs]
    printed = [m.group(1) for m in map(STAMP_LINE.search, messages) if m]
    cached = any(m.endswith("(cached)") and "RUN" in m for m in messages)
    print(f"{name}: printed {printed}, cached={cached}")
    assert len(printed) == (0 if cached else 1), messages
    return printed[0] if printed else None


def _stamp_in(name: str) -> str:
    from e2b import Sandbox

    sandbox = Sandbox.create(name, timeout=120, request_timeout=CREATE_REQUEST_TIMEOUT_S)
    try:
        return sandbox.commands.run("cat /stamp").stdout.strip()
    finally:
        sandbox.kill()


def test_skip_cache_runs_a_cached_step_again(uml_service: Any, test_image: PushedImage) -> None:
    from e2b import Template

    def stamped() -> Any:
        return Template().from_image(test_image.ref).run_cmd(STAMP_RUN, user="root")

    first = _build_stamp(stamped(), "sdk-stamp:v1")
    assert first is not None
    # A normal rebuild reuses the step: no new stamp, the template has the first one.
    assert _build_stamp(stamped(), "sdk-stamp:v2") is None
    assert _stamp_in("sdk-stamp:v2") == first

    # skip_cache=True on the build runs it again.
    forced = _build_stamp(stamped(), "sdk-stamp:v3", skip_cache=True)
    assert forced is not None and forced != first
    assert _stamp_in("sdk-stamp:v3") == forced

    # So does .skip_cache() before the step.
    step_forced = _build_stamp(
        Template().from_image(test_image.ref).skip_cache().run_cmd(STAMP_RUN, user="root"), "sdk-stamp:v4"
    )
    assert step_forced is not None and step_forced not in (first, forced)
