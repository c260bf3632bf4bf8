"""`cube tpl build`: run a Dockerfile into a template rootfs, with a layer cache.

Planning is pure: every instruction is evaluated (ARG/ENV expansion, WORKDIR,
USER...) and gets a cache key chained from the previous one — the base image's
digest (or template id) first, then each instruction's expanded text, plus for
COPY/ADD the content of the files it copies and for RUN its full environment.
Only RUN/COPY/ADD change files; after each one the resulting rootfs is kept
under `<cache_dir>/build-steps/<key>`. A build starts from the newest step whose
snapshot exists, so an unchanged Dockerfile and context is served from cache.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from appliance.templates.build_context import context_sources, copy_from_context, ensure_dir, hash_sources
from appliance.templates.catalog import TemplateNotFound, resolve_template
from appliance.templates.dockerfile import (
    DockerfileError,
    Instruction,
    command_words,
    expand,
    parse_dockerfile,
    parse_key_values,
)
from appliance.templates.dockerignore import IgnoreRules
from appliance.templates.guest_setup import DEFAULT_PATH
from appliance.templates.jobs import BuildJob, Phase
from appliance.templates.pull import fetch_and_unpack, open_image
from appliance.templates.registry import insecure_registries
from appliance.templates.registry_auth import Credentials
from appliance.templates.requests import TemplateSettings
from appliance.templates.sandbox_steps import RunCommand, RunFailed
from appliance.templates.step_cache import StepCache, export_template_rootfs

if TYPE_CHECKING:
    from appliance.templates.builds import TemplateBuilds


class StepFailed(Exception):
    def __init__(self, message: str, console_tail: str = "") -> None:
        super().__init__(message)
        self.console_tail = console_tail


FILE_STEPS = frozenset({"RUN", "COPY", "ADD"})


@dataclass(frozen=True)
class DockerfileBuildRequest:
    dockerfile: str  # the Dockerfile's text
    context: Path  # the build context directory
    settings: TemplateSettings
    build_args: dict[str, str] = field(default_factory=dict)
    credentials: Credentials | None = None  # for a FROM image in a private registry


@dataclass(frozen=True)
class ImageState:
    """What the instructions so far define for the image (not its files)."""

    env: dict[str, str] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)  # ARGs in scope with their values
    workdir: str = "/"
    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    exposed_ports: tuple[int, ...] = ()
    shell: tuple[str, ...] = ("/bin/sh", "-c")

    def variables(self) -> dict[str, str]:
        return {**self.args, **self.env}

    def run_env(self) -> dict[str, str]:
        return {"PATH": DEFAULT_PATH, **self.args, **self.env}


@dataclass(frozen=True)
class PlannedStep:
    instruction: Instruction
    state: ImageState  # in effect when the step runs (after it, for metadata steps)
    key: str  # cache key of the image after this step
    sources: tuple[str, ...] = ()  # COPY/ADD: context paths (relative), expanded
    dest: str = ""  # COPY/ADD: absolute guest path, expanded

    @property
    def changes_files(self) -> bool:
        return self.instruction.keyword in FILE_STEPS


@dataclass(frozen=True)
class DockerfileResult:
    cache_key: str
    env: dict[str, str]
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    workdir: str
    user: str
    exposed_ports: tuple[int, ...]


def chain_key(previous: str, *parts: object) -> str:
    hasher = hashlib.sha256(previous.encode())
    hasher.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return hasher.hexdigest()


def base_reference(instructions: list[Instruction], build_args: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The FROM argument, expanded with the ARGs declared before it; and those ARGs' values."""
    pre_from: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = expand(instruction.text, pre_from, instruction.line).split()
            if len(words) == 3 and words[1].lower() == "as":
                words = words[:1]  # a stage name has no meaning with one stage
            if len(words) != 1:
                raise DockerfileError(instruction.line, f"FROM takes one image, got {instruction.text!r}")
            return words[0], pre_from
        name, value = _arg(instruction, pre_from, build_args, {})
        if value is not None:
            pre_from[name] = value
    raise DockerfileError(1, "no FROM instruction")


def _arg(
    instruction: Instruction,
    variables: dict[str, str],
    build_args: dict[str, str],
    global_args: dict[str, str],
) -> tuple[str, str | None]:
    name, equals, default = instruction.text.partition("=")
    name = name.strip()
    if not name or " " in name:
        raise DockerfileError(instruction.line, "ARG takes one NAME[=default]")
    if name in build_args:
        return name, build_args[name]
    if equals:
        return name, expand(default.strip().strip('"'), variables, instruction.line)
    return name, global_args.get(name)


def plan_steps(
    instructions: list[Instruction],
    base: ImageState,
    base_key: str,
    context: Path,
    build_args: dict[str, str],
    global_args: dict[str, str],
) -> list[PlannedStep]:
    """Evaluate every instruction after FROM; blocking (hashes the context)."""
    ignore = IgnoreRules.load(context)
    state, key = base, base_key
    steps: list[PlannedStep] = []
    cmd_set_here = False
    after_from = False
    for ins in instructions:
        if ins.keyword == "FROM":
            after_from = True
            continue
        if not after_from:
            continue
        variables = state.variables()
        keyword = ins.keyword
        if keyword == "RUN":
            argv = command_words(ins, state.shell)
            key = chain_key(key, "RUN", argv, state.run_env(), state.workdir, state.user)
            steps.append(PlannedStep(ins, state, key))
            continue
        if keyword in ("COPY", "ADD"):
            words = (
                list(ins.exec_form)
                if ins.exec_form is not None
                else expand(ins.text, variables, ins.line).split()
            )
            if len(words) < 2:
                raise DockerfileError(ins.line, f"{keyword} needs a source and a destination")
            if keyword == "ADD" and any("://" in w for w in words[:-1]):
                raise DockerfileError(ins.line, "ADD from a URL is not supported; use RUN with curl or wget")
            sources = tuple(
                s for pattern in words[:-1] for s in context_sources(context, pattern, ignore, ins.line)
            )
            dest = posixpath.join(state.workdir, words[-1])
            if words[-1].endswith("/") and not dest.endswith("/"):
                dest += "/"
            flags = {k: expand(v, variables, ins.line) for k, v in ins.flags.items()}
            key = chain_key(key, keyword, sources, dest, flags, hash_sources(context, sources, ignore))
            steps.append(PlannedStep(replace(ins, flags=flags), state, key, sources, dest))
            continue
        if keyword == "ENV":
            env = dict(state.env)
            for name, value in parse_key_values(expand(ins.text, variables, ins.line), ins.line, "ENV"):
                env[name] = value
            state = replace(state, env=env)
        elif keyword == "ARG":
            arg_name, arg_value = _arg(ins, variables, build_args, global_args)
            state = replace(state, args={**state.args, arg_name: arg_value or ""})
        elif keyword == "WORKDIR":
            state = replace(
                state,
                workdir=posixpath.normpath(
                    posixpath.join(state.workdir, expand(ins.text, variables, ins.line))
                ),
            )
        elif keyword == "USER":
            state = replace(state, user=expand(ins.text, variables, ins.line).strip())
        elif keyword == "EXPOSE":
            ports = set(state.exposed_ports)
            for spec in expand(ins.text, variables, ins.line).split():
                number, _, protocol = spec.partition("/")
                if not number.isdigit() or protocol not in ("", "tcp", "udp"):
                    raise DockerfileError(ins.line, f"EXPOSE: bad port {spec!r}")
                if protocol != "udp":
                    ports.add(int(number))
            state = replace(state, exposed_ports=tuple(sorted(ports)))
        elif keyword == "CMD":
            state = replace(state, cmd=command_words(ins, state.shell))
            cmd_set_here = True
        elif keyword == "ENTRYPOINT":
            # As in Docker: a new ENTRYPOINT drops the CMD inherited from the base.
            state = replace(
                state, entrypoint=command_words(ins, state.shell), cmd=state.cmd if cmd_set_here else ()
            )
        elif keyword == "SHELL":
            if ins.exec_form is None or not ins.exec_form:
                raise DockerfileError(ins.line, 'SHELL needs the JSON form, e.g. SHELL ["/bin/bash", "-c"]')
            state = replace(state, shell=ins.exec_form)
        # LABEL: accepted; a template has nowhere to keep labels.
        key = chain_key(key, keyword, str(ins), state)
        steps.append(PlannedStep(ins, state, key))
    return steps


Materialize = Callable[[Path], Awaitable[None]]


async def build_dockerfile_rootfs(
    builds: TemplateBuilds, job: BuildJob, request: DockerfileBuildRequest, rootfs: Path, work: Path
) -> DockerfileResult:
    store = builds.store
    instructions = parse_dockerfile(request.dockerfile)
    base_name, global_args = base_reference(instructions, request.build_args)
    store.set_phase(job, Phase.PULLING, f"resolving FROM {base_name}")
    cache = StepCache(builds.config.cache_dir / "build-steps")
    async with _open_base(builds, job, base_name, request, work) as (base_key, base_state, materialize):
        steps = await trio.to_thread.run_sync(
            plan_steps, instructions, base_state, base_key, request.context, request.build_args, global_args
        )
        cached_upto = -1
        for index in range(len(steps) - 1, -1, -1):
            if steps[index].changes_files and cache.has(steps[index].key):
                cached_upto = index
                break
        if cached_upto < 0:
            await materialize(rootfs)
        else:
            store.set_phase(job, Phase.UNPACKING, f"restoring cached step {cached_upto + 1}")
            await cache.restore(steps[cached_upto].key, rootfs)
    store.set_phase(job, Phase.BUILDING, f"running {sum(s.changes_files for s in steps)} file steps")
    for index, step in enumerate(steps):
        label = f"step {index + 1}/{len(steps)}: {step.instruction}"
        if index <= cached_upto and step.changes_files:
            store.log(job, f"{label} (cached)")
            continue
        store.log(job, label)
        if not step.changes_files:
            continue
        if step.instruction.keyword == "RUN":
            await _run(builds, job, rootfs, step)
        else:
            await trio.to_thread.run_sync(
                copy_from_context,
                rootfs,
                request.context,
                step.instruction.keyword,
                step.sources,
                step.dest,
                step.instruction.flags,
            )
        await cache.save(step.key, rootfs)
    final = steps[-1].state if steps else base_state
    await trio.to_thread.run_sync(ensure_dir, rootfs, final.workdir)
    return DockerfileResult(
        steps[-1].key if steps else base_key,
        final.env,
        final.entrypoint,
        final.cmd,
        final.workdir,
        final.user,
        final.exposed_ports,
    )


async def _run(builds: TemplateBuilds, job: BuildJob, rootfs: Path, step: PlannedStep) -> None:
    state = step.state
    await trio.to_thread.run_sync(ensure_dir, rootfs, state.workdir)
    command = RunCommand(
        command_words(step.instruction, state.shell),
        state.run_env(),
        state.workdir,
        state.user or "root",
        output=lambda line: builds.store.log(job, line),
    )
    try:
        await builds.sandboxes.run_command(rootfs, command)
    except RunFailed as exc:
        raise StepFailed(
            f"{step.instruction} (Dockerfile line {step.instruction.line}) failed with exit status "
            f"{exc.exit_code}",
            exc.output_tail,
        ) from exc


@asynccontextmanager
async def _open_base(
    builds: TemplateBuilds, job: BuildJob, name: str, request: DockerfileBuildRequest, work: Path
) -> AsyncIterator[tuple[str, ImageState, Materialize]]:
    """FROM: `scratch`, a template (id or alias; recipes come in as their built template) or an image.

    Yields the base's cache key, its image state and how to put its files into a rootfs.
    """
    if name == "scratch":

        async def empty(rootfs: Path) -> None:
            return None

        yield chain_key("scratch"), ImageState(), empty
        return
    try:
        template = resolve_template(builds.config, name)
    except TemplateNotFound:
        template = None
    if template is not None:
        state = ImageState(
            env=dict(template.envs),
            workdir=template.workdir,
            user=template.user,
            cmd=template.start_cmd,
            exposed_ports=template.expose_ports,
        )

        async def export(rootfs: Path) -> None:
            builds.store.set_phase(job, Phase.UNPACKING, f"reading template {template.template_id}")
            await export_template_rootfs(template.rootfs, rootfs)

        yield chain_key(f"template:{template.template_id}:{template.created_at}"), state, export
        return
    async with open_image(
        name, work, builds.layer_cache, request.credentials, insecure_registries(builds.config)
    ) as source:
        image = await source.resolve()
        config = image.config
        state = ImageState(
            env=config.env_dict(),
            workdir=config.workdir or "/",
            user=config.user,
            entrypoint=config.entrypoint,
            cmd=config.cmd,
            exposed_ports=config.exposed_ports,
        )

        async def pull(rootfs: Path) -> None:
            await fetch_and_unpack(builds.store, job, source, image, rootfs)

        yield chain_key(f"image:{image.digest}"), state, pull
