"""Dockerfile parsing, variable expansion, .dockerignore, cache keys, builds served from the step cache."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_world import Images, LoopbackHttpServer, QuietHandler
from sandbox_doubles import LoopbackSandboxes
from served_builds import finished

from appliance.config import Config
from appliance.templates.builds import TemplateBuilds
from appliance.templates.catalog import resolve_template
from appliance.templates.dockerfile import DockerfileError, command_words, expand, parse_dockerfile
from appliance.templates.dockerfile_build import (
    DockerfileBuildRequest,
    ImageState,
    PlanInputs,
    PlannedStep,
    needed_stages,
    plan_steps,
    split_stages,
)
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
        ("FROM a\nONBUILD RUN make\n", "line 2: ONBUILD triggers are not supported"),
        ("FROM a\nFROBNICATE x\n", "line 2: unsupported instruction FROBNICATE"),
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


def _plan_stage(
    context: Path, dockerfile: str, build_args: dict[str, str] | None = None
) -> list[PlannedStep]:
    """The last stage's plan, with earlier stages known by name and a made-up key."""
    stages, global_args = split_stages(parse_dockerfile(dockerfile), build_args or {})
    known = {s.name or str(s.index): (s.index, f"stage-key-{s.index}") for s in stages[:-1]}
    inputs = PlanInputs(context, build_args or {}, global_args, known)
    return plan_steps(stages[-1].body, ImageState(), "base-key", inputs)


def _plan(context: Path, dockerfile: str, build_args: dict[str, str] | None = None) -> list[str]:
    return [s.key for s in _plan_stage(context, dockerfile, build_args)]


def test_stages_global_args_and_copy_from(scratch: Path) -> None:
    dockerfile = (
        "ARG BASE=img:1\nARG UNUSED\nFROM $BASE AS Build\nRUN make\nFROM scratch AS other\n"
        'FROM ${BASE}-slim\nARG BASE\nCOPY --from=build /out/app /usr/bin/\nLABEL a=1 b="two words"\n'
        "MAINTAINER me\nHEALTHCHECK --interval=5s CMD curl -f localhost\nSTOPSIGNAL SIGINT\nVOLUME /data\n"
        'SHELL ["/bin/bash", "-eu", "-c"]\nRUN echo $0\n'
    )
    stages, global_args = split_stages(parse_dockerfile(dockerfile), {})
    assert [(s.name, s.base) for s in stages] == [
        ("build", "img:1"),
        ("other", "scratch"),
        ("", "img:1-slim"),
    ]
    assert global_args == {"BASE": "img:1"}
    assert needed_stages(stages, global_args) == {0, 2}, "stage `other` is never built"
    steps = _plan_stage(scratch, dockerfile)
    assert steps[0].state.args == {"BASE": "img:1"}, "ARG BASE in a stage takes the global value"
    copy = steps[1]
    assert (copy.from_stage, copy.sources, copy.dest) == (0, ("/out/app",), "/usr/bin/")
    assert command_words(steps[-1].instruction, steps[-1].state.shell) == (
        "/bin/bash",
        "-eu",
        "-c",
        "echo $0",
    )
    final = steps[-1].state
    assert final.labels == {"a": "1", "b": "two words", "maintainer": "me"}
    assert final.volumes == ("/data",)
    warnings = [s.warning for s in steps if s.warning]
    assert [w.split()[0] for w in warnings] == ["HEALTHCHECK", "STOPSIGNAL", "VOLUME"]
    assert "--probe" in warnings[0]
    with pytest.raises(DockerfileError, match=r"line 3: COPY --from=nope: no earlier stage"):
        _plan(scratch, "FROM a AS x\nFROM b\nCOPY --from=nope /a /b\n")
    with pytest.raises(DockerfileError, match="used twice"):
        split_stages(parse_dockerfile("FROM a AS x\nFROM b AS x\n"), {})


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


@pytest.mark.root
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


@pytest.mark.root
async def test_failing_run_step_fails_the_build(
    builds: TemplateBuilds, sandboxes: LoopbackSandboxes, images: Images, config: Config, scratch: Path
) -> None:
    sandboxes.failing_command = "pip install"
    job = await dockerfile_build(builds, images.multiarch, make_context(scratch), scratch)
    assert job.phase == Phase.FAILED
    assert "Dockerfile line 9" in job.reason and "exit status 2" in job.reason
    assert job.console_tail == "pip: error: no such package"
    assert not (config.templates_dir / job.template_id).exists()


@pytest.mark.root
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
    # The base template's files come over exactly: device nodes, xattrs, hardlinks, setuid bits.
    device = debugfs(manifest.rootfs, "stat /dev/cube0")
    assert "Type: character special" in device and "Device major/minor number: 01:03" in device
    assert "user.cube" in debugfs(manifest.rootfs, "ea_list /data/xattr.txt")
    assert "Links: 2" in debugfs(manifest.rootfs, "stat /data/link")
    assert "Mode:  04755" in debugfs(manifest.rootfs, "stat /usr/bin/tool")
    assert "lost+found" not in debugfs(manifest.rootfs, "ls /data")


@pytest.fixture
def file_server() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A loopback HTTP server for ADD <url>: serves `files` (path -> bytes), 404 for the rest."""
    files: dict[str, bytes] = {}

    class Handler(QuietHandler):
        def do_GET(self) -> None:  # http.server's naming
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    server = LoopbackHttpServer(Handler)
    yield f"http://{server.host}", files
    server.close()


MULTI_STAGE = """\
ARG BUILD_IMAGE={build_image}
FROM ${{BUILD_IMAGE}} AS build
RUN make artifact
FROM scratch AS unused
RUN never runs
FROM {final_image}
LABEL org.example.team=templates version="2 beta"
COPY --from=build /ran-1.txt /dev/cube0 /data/xattr.txt /data/original /data/link /artifacts/
ADD {url}/files/tool.sh /usr/local/bin/
ADD bundle.tar /opt/bundle/
VOLUME /var/lib/app
HEALTHCHECK --interval=5s CMD true
"""


async def multi_stage_build(builds: TemplateBuilds, images: Images, context: Path, url: str) -> BuildJob:
    upload = builds.context_root() / f"upload-{len(builds.jobs())}"
    subprocess.run(["cp", "-a", str(context), str(upload)], check=True)
    dockerfile = MULTI_STAGE.format(build_image=images.multi, final_image=images.multiarch, url=url)
    request = DockerfileBuildRequest(dockerfile, upload, TemplateSettings(writable_layer_mb=32))
    return await finished(builds.submit_dockerfile(request, {}))


# The file server is on loopback, which ADD <url> refuses unless the operator allows it.
@pytest.mark.parametrize("config_extra", [{"build_fetch_allow": "127.0.0.1/32"}])
@pytest.mark.root
async def test_multi_stage_build_with_add_url_and_tar(
    builds: TemplateBuilds,
    sandboxes: LoopbackSandboxes,
    images: Images,
    config: Config,
    scratch: Path,
    file_server: tuple[str, dict[str, bytes]],
) -> None:
    url, files = file_server
    files["/files/tool.sh"] = b"#!/bin/sh\necho downloaded\n"
    context = scratch / "ctx"
    (context / "bundle").mkdir(parents=True)
    (context / "bundle" / "inside.txt").write_text("from the tar")
    subprocess.run(
        ["tar", "-czf", str(context / "bundle.tar"), "-C", str(context / "bundle"), "."], check=True
    )

    job = await multi_stage_build(builds, images, context, url)
    assert job.phase == Phase.READY, job.reason
    assert [c.argv for c in sandboxes.commands] == [("/bin/sh", "-c", "make artifact")], (
        "stage unused is skipped"
    )
    manifest = resolve_template(config, job.template_id)
    assert manifest.labels == {"org.example.team": "templates", "version": "2 beta"}
    image = manifest.rootfs
    assert "make artifact" in debugfs(image, "cat /artifacts/ran-1.txt")
    device = debugfs(image, "stat /artifacts/cube0")
    assert "Type: character special" in device and "Device major/minor number: 01:03" in device
    assert "user.cube" in debugfs(image, "ea_list /artifacts/xattr.txt"), "COPY --from keeps xattrs"
    original, link = (debugfs(image, f"stat /artifacts/{n}") for n in ("original", "link"))
    assert "Links: 2" in original and original.split()[1] == link.split()[1], "hardlinks stay one inode"
    assert "echo downloaded" in debugfs(image, "cat /usr/local/bin/tool.sh")
    assert "Mode:  0600" in debugfs(image, "stat /usr/local/bin/tool.sh"), "ADD <url> files are 0600"
    assert "from the tar" in debugfs(image, "cat /opt/bundle/inside.txt"), "ADD unpacks local archives"
    assert "Type: directory" in debugfs(image, "stat /var/lib/app")
    assert any(line.startswith("warning: HEALTHCHECK ignored") for line in job.log), job.log

    again = await multi_stage_build(builds, images, context, url)
    assert again.phase == Phase.READY, again.reason
    assert len(sandboxes.commands) == 1, "served from cache: the build stage is not even built"
    assert sum("(cached)" in line for line in again.log) == 3
    assert not any("stage build" in line for line in again.log)

    files["/files/tool.sh"] = b"#!/bin/sh\necho changed\n"
    changed = await multi_stage_build(builds, images, context, url)
    assert changed.phase == Phase.READY, changed.reason
    assert "echo changed" in debugfs(
        resolve_template(config, changed.template_id).rootfs, "cat /usr/local/bin/tool.sh"
    )
    assert sum("(cached)" in line for line in changed.log) == 1, "new URL content: ADD and what follows rerun"

    del files["/files/tool.sh"]
    missing = await multi_stage_build(builds, images, context, url)
    assert missing.phase == Phase.FAILED
    assert re.search(
        r"ADD http://127\.0\.0\.1:\d+/files/tool\.sh: the server answered HTTP 404", missing.reason
    )
    assert not (config.templates_dir / missing.template_id).exists()
