"""Dockerfile parsing, variable expansion, .dockerignore, cache keys, builds served from the step cache."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from registry_world import Images
from sandbox_doubles import LoopbackSandboxes

from appliance.config import Config
from appliance.templates.builds import TemplateBuilds
from appliance.templates.catalog import resolve_template
from appliance.templates.dockerfile import DockerfileError, expand, parse_dockerfile
from appliance.templates.dockerfile_build import DockerfileBuildRequest, ImageState, plan_steps
from appliance.templates.dockerignore import IgnoreRules
from appliance.templates.jobs import BuildJob, Phase
from appliance.templates.requests import ImageBuildRequest, TemplateSettings


def test_parser_handles_continuations_comments_and_both_forms() -> None:
    instructions = parse_dockerfile(
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=debian\n"
        "FROM ${BASE}\n"
        "RUN apt-get update && \\\n"
        "    # a comment inside a continuation\n"
        "    apt-get install -y curl\n"
        'CMD ["python3", "-m", "http.server"]\n'
        "ENTRYPOINT /bin/run --flag\n"
        "COPY --chown=app:app --chmod=755 a b /dest/\n"
        "run echo lower-case keyword\n"
    )
    assert [i.keyword for i in instructions] == ["ARG", "FROM", "RUN", "CMD", "ENTRYPOINT", "COPY", "RUN"]
    run = instructions[2]
    assert run.text == "apt-get update && apt-get install -y curl" and run.line == 4 and run.exec_form is None
    assert instructions[3].exec_form == ("python3", "-m", "http.server")
    assert instructions[4].exec_form is None
    assert (
        instructions[5].flags == {"chown": "app:app", "chmod": "755"} and instructions[5].text == "a b /dest/"
    )


def test_escape_directive() -> None:
    instructions = parse_dockerfile("# escape=`\nFROM scratch\nRUN dir C:\\ `\n  && echo ok\n")
    assert instructions[1].text == "dir C:\\ && echo ok"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FROM a\nFROM b\n", "multi-stage"),
        ("FROM a\nCOPY --from=x a b\n", "multi-stage"),
        ("FROM a\nHEALTHCHECK NONE\n", "line 2: unsupported instruction HEALTHCHECK"),
        ("RUN true\n", "RUN before FROM"),
        ("# nothing\n", "no FROM"),
        ("FROM a\nCOPY --owner=x a b\n", "unsupported flag"),
    ],
)
def test_parser_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(DockerfileError, match=message):
        parse_dockerfile(text)


def test_variable_expansion() -> None:
    variables = {"A": "1", "EMPTY": ""}
    assert expand("$A ${A} ${A}x", variables) == "1 1 1x"
    assert (
        expand("${MISSING:-def} ${EMPTY:-def} ${EMPTY-def} ${A:+alt} ${MISSING:+alt}", variables)
        == "def def  alt "
    )
    assert expand(r"\$A costs $$", variables) == "$A costs $$"


def test_dockerignore_rules() -> None:
    rules = IgnoreRules.parse("# comment\n*.pyc\nbuild\n!build/keep.txt\n**/secret.txt\n/docs/*.md\n")
    assert rules.ignored("x.pyc") and not rules.ignored("pkg/x.pyc")
    assert rules.ignored("build") and rules.ignored("build/out.o") and not rules.ignored("build/keep.txt")
    assert rules.ignored("secret.txt") and rules.ignored("a/b/secret.txt")
    assert rules.ignored("docs/readme.md") and not rules.ignored("docs/sub/readme.md")
    assert not rules.ignored("app.py")


def _plan(context: Path, dockerfile: str, build_args: dict[str, str] | None = None) -> list[str]:
    steps = plan_steps(parse_dockerfile(dockerfile), ImageState(), "base-key", context, build_args or {}, {})
    return [s.key for s in steps]


def test_cache_keys_follow_instructions_and_inputs(scratch: Path) -> None:
    context = scratch / "context"
    context.mkdir()
    (context / "app.py").write_text("print(1)\n")
    (context / "ignored.log").write_text("noise")
    (context / ".dockerignore").write_text("*.log\n")
    dockerfile = "FROM scratch\nARG V=1\nENV A=$V\nRUN make\nCOPY . /app\nRUN test\n"
    first = _plan(context, dockerfile)
    assert first == _plan(context, dockerfile), "keys are deterministic"
    (context / "ignored.log").write_text("more noise")
    assert _plan(context, dockerfile) == first, ".dockerignore'd files do not change keys"
    (context / "app.py").write_text("print(2)\n")
    changed = _plan(context, dockerfile)
    assert changed[:3] == first[:3] and changed[3] != first[3] and changed[4] != first[4]
    with_arg = _plan(context, dockerfile, {"V": "2"})
    assert with_arg[0] != changed[0] and with_arg[2] != changed[2], "a build arg changes what follows"


def test_copy_of_a_missing_or_ignored_source_fails(scratch: Path) -> None:
    (scratch / "secret.key").write_text("x")
    (scratch / ".dockerignore").write_text("secret.key\n")
    with pytest.raises(DockerfileError, match=r"line 2: COPY source 'secret\.key' not found"):
        _plan(scratch, "FROM scratch\nCOPY secret.key /\n")
    with pytest.raises(DockerfileError, match="outside the build context"):
        _plan(scratch, "FROM scratch\nCOPY ../etc/passwd /\n")


@pytest.fixture
def sandboxes(scratch: Path) -> LoopbackSandboxes:
    return LoopbackSandboxes(scratch)


@pytest.fixture
async def builds(config: Config, sandboxes: LoopbackSandboxes) -> AsyncIterator[TemplateBuilds]:
    service = TemplateBuilds(config, sandboxes)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        yield service
        nursery.cancel_scope.cancel()


async def finished(job: BuildJob) -> BuildJob:
    with trio.fail_after(60):
        while not job.finished:
            await trio.sleep(0.05)
    return job


def make_context(root: Path, version: str = "1.0") -> Path:
    context = root / "context"
    (context / "pkg").mkdir(parents=True, exist_ok=True)
    (context / "app.py").write_text("import pkg\n")
    (context / "pkg" / "setup.py").write_text(f"version = {version!r}\n")
    (context / "run.sh").write_text("#!/bin/sh\n")
    (context / "run.sh").chmod(0o755)
    (context / "notes.log").write_text("not for the image")
    (context / ".dockerignore").write_text("*.log\n")
    return context


DOCKERFILE = """\
ARG TAG=v1
FROM {image}
ARG PIP_FLAGS=--no-cache-dir
ENV APP_HOME=/app \\
    GREETING="hi there"
WORKDIR $APP_HOME
COPY app.py run.sh ./
COPY pkg/ ./pkg/
RUN pip install $PIP_FLAGS ./pkg
USER 1000:1000
EXPOSE 8000
CMD ["python3", "app.py"]
"""


async def dockerfile_build(builds: TemplateBuilds, image: str, context: Path, scratch: Path) -> BuildJob:
    # The API unpacks each upload into its own directory and removes it after the build: do the same.
    upload = Path(
        subprocess.run(
            ["mktemp", "-d", "-p", str(builds.context_root())], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    subprocess.run(["cp", "-a", f"{context}/.", str(upload)], check=True)
    request = DockerfileBuildRequest(
        DOCKERFILE.format(image=image), upload, TemplateSettings(writable_layer_mb=32, probe_port=8000)
    )
    return await finished(builds.submit_dockerfile(request, {"dockerfile": "..."}))


def debugfs(image: Path, command: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", command, str(image)], capture_output=True, text=True, check=True
    ).stdout


async def test_dockerfile_build_then_rebuild_from_cache(
    builds: TemplateBuilds, sandboxes: LoopbackSandboxes, images: Images, config: Config, scratch: Path
) -> None:
    context = make_context(scratch)
    job = await dockerfile_build(builds, images.multiarch, context, scratch)
    assert job.phase == Phase.READY, job.reason
    manifest = resolve_template(config, job.template_id)
    assert manifest.start_cmd == ("python3", "app.py")
    # USER 1000:1000 in an image without accounts: uid 1000 is the `user` account the build adds.
    assert (manifest.workdir, manifest.user, manifest.expose_ports) == ("/app", "user", (8000,))
    assert manifest.envs["GREETING"] == "hi there"
    (run,) = sandboxes.commands
    assert run.argv == ("/bin/sh", "-c", "pip install $PIP_FLAGS ./pkg")
    assert (
        run.env["PIP_FLAGS"] == "--no-cache-dir" and run.env["APP_HOME"] == "/app" and run.workdir == "/app"
    )
    listing = debugfs(manifest.rootfs, "ls /app")
    assert "app.py" in listing and "run.sh" in listing and "pkg" in listing and "notes.log" not in listing
    assert "arch.txt" in debugfs(manifest.rootfs, "ls /")
    assert "Mode:  0755" in debugfs(manifest.rootfs, "stat /app/run.sh")
    assert "ran-1.txt" in debugfs(manifest.rootfs, "ls /")

    again = await dockerfile_build(builds, images.multiarch, context, scratch)
    assert again.phase == Phase.READY, again.reason
    assert len(sandboxes.commands) == 1, "nothing changed: RUN is served from cache"
    assert sum("(cached)" in line for line in again.log) == 3
    assert resolve_template(config, again.template_id).source == manifest.source

    make_context(scratch, version="2.0")
    changed = await dockerfile_build(builds, images.multiarch, context, scratch)
    assert changed.phase == Phase.READY, changed.reason
    assert len(sandboxes.commands) == 2, "the pkg/ COPY changed, so RUN runs again"
    assert sum("(cached)" in line for line in changed.log) == 1
    assert not any(config.cache_dir.joinpath("build-work", "contexts").iterdir())


async def test_failing_run_step_fails_the_build(
    builds: TemplateBuilds, sandboxes: LoopbackSandboxes, images: Images, config: Config, scratch: Path
) -> None:
    sandboxes.failing_command = "pip install"
    job = await dockerfile_build(builds, images.multiarch, make_context(scratch), scratch)
    assert job.phase == Phase.FAILED
    assert "Dockerfile line 9" in job.reason and "exit status 2" in job.reason
    assert job.console_tail == "pip: error: no such package"
    assert not (config.templates_dir / job.template_id).exists()


async def test_from_a_template(builds: TemplateBuilds, images: Images, config: Config, scratch: Path) -> None:
    base = await finished(
        builds.submit_image(
            ImageBuildRequest.from_json(
                {"image": images.multi, "writable_layer_size": "32M", "alias": "base"}
            ),
            {},
        )
    )
    assert base.phase == Phase.READY, base.reason
    context = scratch / "ctx"
    context.mkdir()
    (context / "extra.txt").write_text("added")
    upload = builds.context_root() / "from-template"
    subprocess.run(["cp", "-a", str(context), str(upload)], check=True)
    request = DockerfileBuildRequest(
        "FROM base\nCOPY extra.txt /data/\n", upload, TemplateSettings(writable_layer_mb=32)
    )
    job = await finished(builds.submit_dockerfile(request, {}))
    assert job.phase == Phase.READY, job.reason
    manifest = resolve_template(config, job.template_id)
    assert manifest.start_cmd == ("/usr/bin/tool", "--serve") and manifest.workdir == "/data"
    assert "keep v2" in debugfs(manifest.rootfs, "cat /data/keep.txt")
    assert "added" in debugfs(manifest.rootfs, "cat /data/extra.txt")
    assert "User:  1000" in debugfs(manifest.rootfs, "stat /home/app/owned.txt")
