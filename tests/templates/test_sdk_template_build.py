"""The unmodified E2B Python SDK's template builder (`Template().from_image(...)...`, `Template.build`)
against a real `cube serve` whose runtime is real UML (root only), env vars only.

The base image is the loopback registry's test image (test_e2e_real_sandbox.py makes and pushes
it); the SDK uploads its COPY files to the service, the RUN step runs in a temporary UML guest,
and a sandbox from the built template shows the files, env, working directory and user.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from uml_world import PushedImage

# The real-UML service and the pushed test image: uml_world.py (fixtures in conftest.py).
pytestmark = [
    pytest.mark.uml,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="real UML guests need root"),
]


def app_context(root: Path) -> Path:
    app = root / "app"
    (app / "sub").mkdir(parents=True)
    (app / "hello.txt").write_text("hello from the context\n")
    (app / "sub" / "tool.sh").write_text("#!/bin/sh\necho tool ran\n")
    (app / "sub" / "tool.sh").chmod(0o755)
    return root


def sdk_template(context: Path, image: str) -> Any:
    from e2b import Template

    return (
        Template(file_context_path=context)
        .from_image(image)
        .copy("app/", "/home/user/app")
        .run_cmd("cat /home/user/app/hello.txt > /home/user/copied.txt && id -un > /home/user/who.txt")
        .set_envs({"SDK_GREETING": "from the sdk"})
        .set_workdir("/home/user/app")
    )


def test_sdk_builds_a_template_and_a_sandbox_runs_in_it(
    uml_service: Any, test_image: PushedImage, tmp_path: Path
) -> None:
    from e2b import Sandbox, Template

    context = app_context(tmp_path)
    logs: list[Any] = []
    started = time.monotonic()
    built = Template.build(
        sdk_template(context, test_image.ref),
        "sdk-app:v1",
        cpu_count=1,
        memory_mb=512,
        on_build_logs=logs.append,
    )
    first_s = time.monotonic() - started
    messages = [entry.message for entry in logs]
    print(f"first build {first_s:.1f}s, {len(logs)} log entries:", *messages, sep="\n  ")
    assert built.name == "sdk-app" or built.template_id == "sdk-app"
    assert any("COPY app/ /home/user/app" in m for m in messages), messages
    assert Template.exists("sdk-app")

    sandbox = Sandbox.create("sdk-app:v1", timeout=120)
    try:
        result = sandbox.commands.run(
            "pwd; cat hello.txt; echo $SDK_GREETING; cat ../copied.txt ../who.txt; sub/tool.sh; "
            "stat -c %U hello.txt"
        )
        print("sandbox printed:", result.stdout)
        assert result.stdout.splitlines() == [
            "/home/user/app",
            "hello from the context",
            "from the sdk",
            "hello from the context",
            "user",
            "tool ran",
            "user",
        ]
    finally:
        sandbox.kill()

    # Unchanged steps are not run again: the rebuild restores the cached RUN step.
    logs.clear()
    started = time.monotonic()
    Template.build(sdk_template(context, test_image.ref), "sdk-app:v2", on_build_logs=logs.append)
    print(f"cached rebuild {time.monotonic() - started:.1f}s")
    assert any(entry.message.endswith("(cached)") and "RUN" in entry.message for entry in logs), [
        entry.message for entry in logs
    ]
    assert sorted(Template.get_tags("sdk-app"), key=lambda t: t.tag)


def test_a_failing_step_fails_the_build_with_its_output(
    uml_service: Any, test_image: PushedImage, tmp_path: Path
) -> None:
    from e2b import Template
    from e2b.exceptions import BuildException

    template = Template().from_image(test_image.ref).run_cmd("echo the-step-output; exit 3")
    with pytest.raises(BuildException) as failed:
        Template.build(template, "sdk-broken")
    print("BuildException:", failed.value)
    assert "the-step-output" in str(failed.value)
    assert "exit status 3" in str(failed.value)
    assert not Template.exists("sdk-broken")  # nothing half-built is published


def test_js_sdk_builds_a_template_and_a_sandbox_runs_in_it(
    uml_service: Any, test_image: PushedImage, tmp_path: Path, js_sdk_dir: Path
) -> None:
    """The same with the npm `e2b` SDK (tests/js/template_build.mjs), and a failing build."""
    context = app_context(tmp_path)
    result = subprocess.run(
        ["node", "template_build.mjs", str(context), test_image.ref, "js-app:v1"],
        cwd=js_sdk_dir,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    observed = json.loads(result.stdout.strip().splitlines()[-1])
    print("the JS SDK observed:", json.dumps(observed, indent=1))
    assert any("COPY app/ /home/user/app" in line for line in observed["logs"]), observed["logs"]
    assert observed["stdout"].splitlines() == [
        "/home/user/app",
        "hello from the context",
        "from the js sdk",
        "hello from the context",
        "user",
        "tool ran",
        "user",
    ]
    assert observed["exists"] is True and observed["brokenExists"] is False
    assert observed["failure"]["type"] == "BuildError", observed["failure"]
    assert "js-step-output" in observed["failure"]["message"], observed["failure"]
