"""Build jobs end to end (registry -> ext4 -> boot -> probe -> READY), failures, persistence, versions."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_world import PASSWORD, USER, Images
from sandbox_doubles import CONSOLE_TEXT, LoopbackSandboxes
from served_builds import finished

from appliance.config import Config
from appliance.records import TemplateManifest
from appliance.templates.builds import TemplateBuilds
from appliance.templates.catalog import (
    TemplateInUse,
    TemplateNotFound,
    collect_superseded,
    delete_template,
    list_templates,
    load_aliases,
    publish_template,
    resolve_template,
    template_versions,
)
from appliance.templates.jobs import BuildJob, JobStore, Phase
from appliance.templates.requests import ImageBuildRequest, public_request


def submit(builds: TemplateBuilds, **request: object) -> BuildJob:
    request.setdefault("writable_layer_size", "64M")
    return builds.submit_image(ImageBuildRequest.from_json(request), public_request(request))


def debugfs(image: Path, command: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", command, str(image)], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.root
async def test_image_build_reaches_ready_with_a_complete_template(
    builds: TemplateBuilds, sandboxes: LoopbackSandboxes, images: Images, config: Config
) -> None:
    job = await finished(
        submit(
            builds,
            image=images.multi,
            expose_ports=[8080, 49983],
            probe_port=8080,
            probe_path="/health",
            env=["EXTRA=1"],
            alias="multi",
        )
    )
    assert job.phase == Phase.READY, job.reason
    phases = [line.split(":")[0] for line in job.log if line.split(":")[0] in Phase.__members__]
    assert phases == ["PULLING", "UNPACKING", "BUILDING", "BOOTING", "PROBING", "POOLING", "READY"]
    assert job.progress == 100.0
    manifest = resolve_template(config, "multi")
    assert manifest.template_id == job.template_id
    assert manifest.start_cmd == ("/usr/bin/tool", "--serve")
    assert manifest.envs["GREETING"] == "hello world" and manifest.envs["EXTRA"] == "1"
    assert (manifest.workdir, manifest.user) == ("/data", "app")
    assert (manifest.expose_ports, manifest.probe_port, manifest.probe_path) == (
        (8080, 49983),
        8080,
        "/health",
    )
    assert manifest.writable_layer_mb == 64 and manifest.aliases == ("multi",)
    assert sandboxes.finalized == [job.template_id]
    # The image itself: a clean ext4 holding the unpacked layers, the agent and the init.
    subprocess.run(["e2fsck", "-fn", str(manifest.rootfs)], check=True, capture_output=True)
    assert "keep v2" in debugfs(manifest.rootfs, "cat /data/keep.txt")
    assert (
        "File not found"
        in subprocess.run(
            ["debugfs", "-R", "stat /data/gone.txt", str(manifest.rootfs)], capture_output=True, text=True
        ).stderr
    )
    assert "User:  1000" in debugfs(manifest.rootfs, "stat /home/app/owned.txt")
    init = debugfs(manifest.rootfs, "cat /sbin/cube-init")
    assert "169.254.0.2" in init and "python3 -m appliance.guest" in init
    start = debugfs(manifest.rootfs, "cat /opt/cube/start")
    assert "export GREETING='hello world'" in start and "cd /data" in start and "--reuid=1000" in start
    assert "__main__.py" in debugfs(manifest.rootfs, "ls /opt/cube/agent/appliance/guest")
    assert not (config.cache_dir / "build-work" / job.job_id).exists()


def assert_no_trace(config: Config, job: BuildJob, alias: str) -> None:
    """A failed build leaves no template directory, catalog entry, alias or work files."""
    assert not (config.templates_dir / job.template_id).exists()
    assert list_templates(config) == []
    assert alias not in load_aliases(config)
    with pytest.raises(TemplateNotFound):
        resolve_template(config, alias)
    assert not (config.cache_dir / "build-work" / job.job_id).exists()
    leftovers = [p.name for p in config.templates_dir.iterdir()] if config.templates_dir.is_dir() else []
    assert [name for name in leftovers if name != "lost+found" and not name.endswith(".json")] == []


@pytest.mark.parametrize(
    ("which", "reason"),
    [
        ("corrupt", r"downloaded content has digest sha256:\w+, expected sha256:"),
        ("arm64", r"linux/amd64 only"),
        ("arm64_list", r"linux/amd64"),
        ("unknown", r"not found"),
        ("wrong_password", r"wrong username or password"),
    ],
)
async def test_bad_inputs_fail_clearly_and_leave_no_template(
    builds: TemplateBuilds, images: Images, config: Config, which: str, reason: str
) -> None:
    request: dict[str, object] = {
        "corrupt": {"image": images.corrupt},
        "arm64": {"image": images.arm64},
        "arm64_list": {"image": images.arm64_list},
        "unknown": {"image": images.multi.replace("multi:v1", "missing:v1")},
        "wrong_password": {
            "image": images.private,
            "registry_username": USER,
            "registry_password": "not-the-password",
        },
    }[which]
    job = await finished(submit(builds, alias="bad", **request))
    assert job.phase == Phase.FAILED
    assert re.search(reason, job.reason), job.reason
    assert_no_trace(config, job, "bad")
    assert "not-the-password" not in str(job.to_dict())


@pytest.fixture
def small_templates_disk(config: Config) -> Iterator[Path]:
    """The templates directory on a real 8 MiB tmpfs: too small for any rootfs.ext4."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    config.templates_dir.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "cube-test-small", str(config.templates_dir)], check=True
    )
    yield config.templates_dir
    subprocess.run(["umount", str(config.templates_dir)], check=True)


@pytest.mark.root
async def test_disk_too_small_fails_clearly_and_leaves_no_template(
    builds: TemplateBuilds, images: Images, config: Config, small_templates_disk: Path
) -> None:
    job = await finished(submit(builds, image=images.multi, alias="bad"))
    assert job.phase == Phase.FAILED
    assert re.search(
        r"not enough disk space in .*: the image needs about \d+ MiB, \d+ MiB are free", job.reason
    )
    assert_no_trace(config, job, "bad")


@pytest.mark.root
async def test_private_image_builds_with_credentials(builds: TemplateBuilds, images: Images) -> None:
    job = await finished(
        submit(builds, image=images.private, registry_username=USER, registry_password=PASSWORD)
    )
    assert job.phase == Phase.READY, job.reason
    assert job.request["registry_password"] == "***"


@pytest.mark.root
async def test_probe_that_never_answers_fails_with_the_console_tail(
    builds: TemplateBuilds, sandboxes: LoopbackSandboxes, images: Images, config: Config
) -> None:
    sandboxes.answer_probe = False
    job = await finished(
        submit(builds, image=images.multiarch, probe_port=49999, probe_timeout_s=1.0, probe_period_s=0.2)
    )
    assert job.phase == Phase.FAILED
    assert "did not succeed within 1s" in job.reason
    assert job.console_tail == CONSOLE_TEXT
    assert not (config.templates_dir / job.template_id).exists()


@pytest.mark.root
async def test_boot_failure_reports_reason_and_console(
    builds: TemplateBuilds, sandboxes: LoopbackSandboxes, images: Images, config: Config
) -> None:
    sandboxes.boot_error = "kernel panic - not syncing"
    job = await finished(submit(builds, image=images.multiarch))
    assert job.phase == Phase.FAILED
    assert job.reason == "the template's sandbox did not boot: kernel panic - not syncing"
    assert job.console_tail == CONSOLE_TEXT
    assert not (config.templates_dir / job.template_id).exists()


@pytest.mark.root
async def test_job_history_survives_a_restart(builds: TemplateBuilds, images: Images, config: Config) -> None:
    done = await finished(submit(builds, image=images.multiarch))
    store = JobStore(config.state_dir / "template-builds")
    interrupted = BuildJob(
        job_id="job-interrupted", kind="image", request={}, template_id="tpl-x", phase=Phase.UNPACKING
    )
    store.add(interrupted)
    reloaded = JobStore(config.state_dir / "template-builds")
    reloaded.load()
    assert reloaded.jobs[done.job_id].phase == Phase.READY
    assert reloaded.jobs[done.job_id].template_id == done.template_id
    assert reloaded.jobs["job-interrupted"].phase == Phase.FAILED
    assert "service stopped" in reloaded.jobs["job-interrupted"].reason


@pytest.mark.root
async def test_rebuild_under_an_alias_keeps_the_old_version_until_unused(
    builds: TemplateBuilds, images: Images, config: Config
) -> None:
    first = await finished(submit(builds, image=images.multiarch, alias="arch"))
    second = await finished(submit(builds, image=images.multiarch, alias="arch"))
    assert first.phase == second.phase == Phase.READY
    assert resolve_template(config, "arch").template_id == second.template_id
    assert [v["template_id"] for v in template_versions(config, "arch")] == [
        first.template_id,
        second.template_id,
    ]
    assert resolve_template(config, first.template_id).aliases == ()
    running = {first.template_id: 1}
    assert collect_superseded(config, lambda t: running.get(t, 0)) == []
    running.clear()
    assert collect_superseded(config, lambda t: running.get(t, 0)) == [first.template_id]
    assert not (config.templates_dir / first.template_id).exists()
    with pytest.raises(TemplateInUse, match="1 running sandbox"):
        delete_template(config, "arch", lambda t: 1)
    assert delete_template(config, "arch", lambda t: 1, force=True) == second.template_id
    assert list_templates(config) == []


def test_republishing_in_place_keeps_one_version(config: Config) -> None:
    directory = config.templates_dir / "fixed"
    directory.mkdir(parents=True)
    manifest = TemplateManifest(template_id="fixed", directory=directory, aliases=("fx",))
    assert publish_template(config, manifest, "fx") is None
    assert publish_template(config, manifest, "fx") is None
    assert [v["template_id"] for v in template_versions(config, "fx")] == ["fixed"]
    assert resolve_template(config, "fx").aliases == ("fx",)
