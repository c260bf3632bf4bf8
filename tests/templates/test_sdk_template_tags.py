"""The pip `e2b` SDK's template calls around a build, against `cube serve` with the runtime double:
`build_in_background` + `get_build_status`, `exists`, tags (`get_tags`, `assign_tags`,
`remove_tags`), and a sandbox from `name:tag`. The builds have no RUN or COPY step, so no guest
runs a command; the built template boots in the double. Root: the base template's ext4 is
loop-mounted to read it (step_cache.export_template_rootfs) and files get their owners.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from appliance.config import Config
from appliance.templates.ext4 import build_ext4

if TYPE_CHECKING:
    from conftest import ServiceHarness

DEAD_MIRROR = "127.0.0.1:9"
pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="loop mounts need root")]


@pytest.fixture
def service_config(service_config: Config, tmp_path: Path) -> Config:
    """The double's default template with a real (tiny) rootfs to build from."""
    tree = tmp_path / "base-tree"
    for directory in ("etc", "tmp", "home/user", "usr/bin"):
        (tree / directory).mkdir(parents=True)
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    (tree / "etc/group").write_text("root:x:0:\nuser:x:1000:\n")
    image = service_config.templates_dir / "code-interpreter" / "rootfs.ext4"
    trio.run(build_ext4, tree, image, 16 << 20)
    # Docker Hub names go to a loopback port nothing serves (never to Docker Hub itself).
    return dataclasses.replace(service_config, extra={"docker_hub_mirror": DEAD_MIRROR})


def build_and_wait(template: Any, name: str, **options: Any) -> Any:
    from e2b import Template

    info = Template.build_in_background(template, name, **options)
    status = Template.get_build_status(info)
    for _ in range(600):  # the double boots at once; this bounds a hung build
        if status.status.value in ("ready", "error"):
            break
        time.sleep(0.1)
        status = Template.get_build_status(info)
    assert status.status.value == "ready", status
    return info


def test_background_builds_tags_and_sandboxes_by_tag(sdk_env: ServiceHarness) -> None:
    from e2b import Sandbox, Template
    from e2b.exceptions import TemplateException

    assert not Template.exists("tagged")
    first = build_and_wait(Template().from_template("code-interpreter").set_envs({"V": "1"}), "tagged:v1")
    assert Template.exists("tagged")
    second = build_and_wait(
        Template().from_template("code-interpreter").set_envs({"V": "2"}), "tagged", tags=["v2"]
    )
    assert first.build_id != second.build_id
    tags = {t.tag: t.build_id for t in Template.get_tags("tagged")}
    # The first build made the name; the second moved `default` (the name alone) and added v2.
    assert tags == {"v1": first.build_id, "v2": second.build_id, "default": second.build_id}

    assigned = Template.assign_tags("tagged:v1", ["stable"])
    assert assigned.build_id == first.build_id and assigned.tags == ["stable"]
    Template.remove_tags("tagged", ["v2"])
    tags = {t.tag: t.build_id for t in Template.get_tags("tagged")}
    assert tags == {"v1": first.build_id, "stable": first.build_id, "default": second.build_id}
    with pytest.raises(TemplateException):
        Template.remove_tags("tagged", ["no-such-tag"])

    for name, expected in (("tagged:stable", "1"), ("tagged", "2")):
        sandbox = Sandbox.create(name)
        try:
            init = sdk_env.runtime.instances[sandbox.sandbox_id].app.init_calls[-1]
            assert init["envVars"].get("V") == expected, (name, init["envVars"])
        finally:
            sandbox.kill()


def test_e2b_base_images_no_registry_has_build_from_the_default_template(sdk_env: ServiceHarness) -> None:
    from e2b import Sandbox, Template

    logs: list[Any] = []
    template = Template().from_base_image().set_envs({"ON_BASE": "yes"})
    Template.build(template, "on-e2b-base", on_build_logs=logs.append)
    warnings = [e.message for e in logs if e.level == "warn"]
    assert any("e2bdev/base" in w and "built-in template 'code-interpreter'" in w for w in warnings), [
        e.message for e in logs
    ]
    sandbox = Sandbox.create("on-e2b-base")
    try:
        init = sdk_env.runtime.instances[sandbox.sandbox_id].app.init_calls[-1]
        assert init["envVars"]["ON_BASE"] == "yes"
    finally:
        sandbox.kill()

    # Any other image that cannot be pulled fails the build at its base.
    from e2b.exceptions import BuildException

    with pytest.raises(BuildException) as failed:
        Template.build(Template().from_image("someone/else:1"), "not-e2b-base")
    assert DEAD_MIRROR in str(failed.value) or "someone/else" in str(failed.value)
