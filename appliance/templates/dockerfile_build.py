"""`cube tpl build`: run a Dockerfile into a template rootfs, with a layer cache.

Planning is pure: every instruction is evaluated (ARG/ENV expansion, WORKDIR,
USER...) and gets a cache key chained from the previous one — the base's key
first (an image digest, a template id, or the final key of an earlier stage),
then each instruction's expanded text, plus for COPY/ADD the content of what it
copies (context files, a downloaded URL, or the source stage's key for
`COPY --from`) and for RUN its full environment. Only RUN/COPY/ADD change
files; after each one the resulting rootfs is kept under
`<cache_dir>/build-steps/<key>`. A stage starts from the newest step whose
snapshot exists, so an unchanged Dockerfile and context is served from cache.

Multi-stage: every `FROM` starts a stage; only the last is the template. The
other stages are built lazily, the first time the last stage needs their files
(`FROM <stage>` or `COPY --from=<stage>` not served from cache), each in its own
directory under the job's scratch space.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from appliance.config import Config
from appliance.records import TemplateManifest
from appliance.templates.build_context import (
    context_sources,
    copy_from_context,
    copy_from_stage,
    copy_url_download,
    ensure_dir,
    hash_sources,
    ignore_rules,
)
from appliance.templates.catalog import TemplateNotFound, resolve_template
from appliance.templates.dockerfile import (
    IGNORED,
    DockerfileError,
    Instruction,
    command_words,
    expand,
    parse_dockerfile,
    parse_key_values,
)
from appliance.templates.dockerignore import IgnoreRules
from appliance.templates.fetch import FetchFailed, fetch_to_file
from appliance.templates.guest_setup import DEFAULT_PATH
from appliance.templates.jobs import BuildJob, BuildStepFailed, JobStore, Phase
from appliance.templates.layer_cache import LayerCache
from appliance.templates.limits import BuildLimits, SizeBudget
from appliance.templates.pull import fetch_and_unpack, open_image
from appliance.templates.registry import insecure_registries
from appliance.templates.registry_auth import Credentials
from appliance.templates.requests import BuiltRootfs, TemplateSettings, redact_urls
from appliance.templates.sandbox_steps import RunCommand, RunFailed, TemplateSandboxes
from appliance.templates.step_cache import StepCache, copy_tree, export_template_rootfs
from appliance.templates.untrusted_tree import Tree


class BuildTools(Protocol):
    """What a Dockerfile build uses of the template builder (`builds.TemplateBuilds`)."""

    config: Config
    store: JobStore
    limits: BuildLimits
    layer_cache: LayerCache
    sandboxes: TemplateSandboxes


class StepFailed(BuildStepFailed):
    """A Dockerfile instruction failed (no SDK step name)."""


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
    labels: dict[str, str] = field(default_factory=dict)
    volumes: tuple[str, ...] = ()

    def variables(self) -> dict[str, str]:
        return {**self.args, **self.env}

    def run_env(self) -> dict[str, str]:
        return {"PATH": DEFAULT_PATH, **self.args, **self.env}


@dataclass(frozen=True)
class PlannedStep:
    instruction: Instruction
    state: ImageState  # in effect when the step runs (after it, for metadata steps)
    key: str  # cache key of the image after this step
    sources: tuple[str, ...] = ()  # COPY/ADD: context paths (relative), URLs, or stage paths; expanded
    dest: str = ""  # COPY/ADD: absolute guest path, expanded
    from_stage: int | None = None  # COPY --from: the index of the source stage
    warning: str = ""  # logged when the step is reached (instructions a template ignores)

    @property
    def changes_files(self) -> bool:
        return self.instruction.keyword in FILE_STEPS

    @property
    def label(self) -> str:
        return str(self.instruction)

    @property
    def downloads(self) -> bool:
        return self.instruction.keyword == "ADD" and bool(self.sources) and is_url(self.sources[0])


@dataclass(frozen=True)
class Stage:
    index: int
    name: str  # the `AS` name, lower-cased; "" without one
    base: str  # the FROM argument, expanded with the ARGs declared before the first FROM
    body: tuple[Instruction, ...]  # the instructions after its FROM


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def chain_key(previous: str, *parts: object) -> str:
    hasher = hashlib.sha256(previous.encode())
    hasher.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return hasher.hexdigest()


def split_stages(
    instructions: list[Instruction], build_args: dict[str, str]
) -> tuple[list[Stage], dict[str, str]]:
    """The stages (one per FROM) and the values of the ARGs declared before the first FROM."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    body: list[Instruction] = []
    current: tuple[str, str] | None = None
    names: set[str] = set()

    def close() -> None:
        if current is not None:
            stages.append(Stage(len(stages), current[1], current[0], tuple(body)))

    for instruction in instructions:
        if instruction.keyword == "FROM":
            close()
            body = []
            words = expand(instruction.text, global_args, instruction.line).split()
            name = ""
            if len(words) == 3 and words[1].lower() == "as":
                name = words[2].lower()
                if name in names or name.isdigit():
                    raise DockerfileError(
                        instruction.line, f"stage name {words[2]!r} is used twice or a number"
                    )
                names.add(name)
            elif len(words) != 1:
                raise DockerfileError(
                    instruction.line, f"FROM takes an image and `AS name`, got {instruction.text!r}"
                )
            current = (words[0], name)
        elif current is None:
            arg_name, value = _arg(instruction, global_args, build_args, {})
            if value is not None:
                global_args[arg_name] = value
        else:
            body.append(instruction)
    close()
    if not stages:
        raise DockerfileError(1, "no FROM instruction")
    return stages, global_args


def stage_reference(stages: list[Stage], before: int, name: str) -> int | None:
    """The index of an earlier stage called `name` (its AS name or its number), else None."""
    for stage in stages[:before]:
        if name.lower() == stage.name or name == str(stage.index):
            return stage.index
    return None


def needed_stages(stages: list[Stage], global_args: dict[str, str]) -> set[int]:
    """The last stage and every stage it takes files from, directly or not."""
    needed: set[int] = set()
    pending = [len(stages) - 1]
    while pending:
        index = pending.pop()
        if index in needed:
            continue
        needed.add(index)
        stage = stages[index]
        names = [stage.base] + [
            expand(i.flags["from"], global_args, i.line) for i in stage.body if "from" in i.flags
        ]
        pending += [r for n in names if (r := stage_reference(stages, index, n)) is not None]
    return needed


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


@dataclass(frozen=True)
class PlanInputs:
    """What planning a stage needs besides its instructions."""

    context: Path
    build_args: dict[str, str] = field(default_factory=dict)
    global_args: dict[str, str] = field(default_factory=dict)
    stage_keys: dict[str, tuple[int, str]] = field(default_factory=dict)  # stage name/number -> (index, key)
    url_digests: dict[str, str] = field(default_factory=dict)  # ADD URLs downloaded so far


def plan_steps(
    body: tuple[Instruction, ...] | list[Instruction], base: ImageState, base_key: str, inputs: PlanInputs
) -> list[PlannedStep]:
    """Evaluate a stage's instructions (those after its FROM); blocking (hashes the context)."""
    with Tree.open(inputs.context) as context:
        return _plan_steps(body, base, base_key, inputs, context)


def _plan_steps(
    body: tuple[Instruction, ...] | list[Instruction],
    base: ImageState,
    base_key: str,
    inputs: PlanInputs,
    context: Tree,
) -> list[PlannedStep]:
    ignore = ignore_rules(context)
    state, key = base, base_key
    steps: list[PlannedStep] = []
    cmd_set_here = False
    for ins in body:
        keyword = ins.keyword
        if keyword == "FROM":
            raise DockerfileError(ins.line, "FROM inside a stage's instructions")
        if keyword == "RUN":
            argv = command_words(ins, state.shell)
            key = chain_key(key, "RUN", argv, state.run_env(), state.workdir, state.user)
            step = PlannedStep(ins, state, key)
        elif keyword in ("COPY", "ADD"):
            step = _plan_copy(ins, state, key, inputs, context, ignore)
        else:
            state, warning = _evaluate(ins, state, inputs, cmd_set_here)
            cmd_set_here = cmd_set_here or keyword == "CMD"
            step = PlannedStep(ins, state, chain_key(key, keyword, str(ins), state), warning=warning)
        key = step.key
        steps.append(step)
    return steps


def _plan_copy(
    ins: Instruction, state: ImageState, key: str, inputs: PlanInputs, context: Tree, ignore: IgnoreRules
) -> PlannedStep:
    """COPY or ADD: its sources and destination, keyed on the content it copies."""
    variables = state.variables()
    words = (
        list(ins.exec_form) if ins.exec_form is not None else expand(ins.text, variables, ins.line).split()
    )
    if len(words) < 2:
        raise DockerfileError(ins.line, f"{ins.keyword} needs a source and a destination")
    dest = posixpath.join(state.workdir, words[-1])
    if words[-1].endswith("/") and not dest.endswith("/"):
        dest += "/"
    flags = {k: expand(v, variables, ins.line) for k, v in ins.flags.items()}
    from_stage = None
    urls = [w for w in words[:-1] if "://" in w]
    if "from" in flags:
        found = inputs.stage_keys.get(flags["from"].lower())
        if found is None:
            raise DockerfileError(
                ins.line,
                f"COPY --from={flags['from']}: no earlier stage has that name or number "
                "(copying from another image: add a stage `FROM <image> AS <name>`)",
            )
        from_stage, stage_key = found
        sources = tuple(posixpath.normpath("/" + w.lstrip("/")) for w in words[:-1])
        content: object = stage_key
    elif urls:
        if len(words) != 2 or not all(is_url(u) for u in urls):
            raise DockerfileError(ins.line, "ADD takes one http(s) URL and a destination")
        sources = (urls[0],)
        content = inputs.url_digests.get(urls[0], "not downloaded yet")
    else:
        sources = tuple(
            s for pattern in words[:-1] for s in context_sources(context, pattern, ignore, ins.line)
        )
        content = hash_sources(context, sources, ignore)
    key = chain_key(key, ins.keyword, sources, dest, flags, content)
    return PlannedStep(replace(ins, flags=flags), state, key, sources, dest, from_stage)


def _evaluate(
    ins: Instruction, state: ImageState, inputs: PlanInputs, cmd_set_here: bool
) -> tuple[ImageState, str]:
    """An instruction that changes no files: the image state after it, and what to log about it."""
    keyword = ins.keyword
    if keyword in IGNORED:
        return state, f"{keyword} ignored: {IGNORED[keyword]}"
    if keyword == "ARG":
        arg_name, arg_value = _arg(ins, state.variables(), inputs.build_args, inputs.global_args)
        return replace(state, args={**state.args, arg_name: arg_value or ""}), ""
    if keyword == "CMD":
        return replace(state, cmd=command_words(ins, state.shell)), ""
    if keyword == "ENTRYPOINT":
        # As in Docker: a new ENTRYPOINT drops the CMD inherited from the base.
        cmd = state.cmd if cmd_set_here else ()
        return replace(state, entrypoint=command_words(ins, state.shell), cmd=cmd), ""
    if keyword == "VOLUME":
        return _volume(ins, state)
    evaluate = _STATE_CHANGES.get(keyword)
    return (evaluate(ins, state) if evaluate else state), ""


def _expanded(ins: Instruction, state: ImageState) -> str:
    return expand(ins.text, state.variables(), ins.line)


def _env(ins: Instruction, state: ImageState) -> ImageState:
    env = dict(state.env)
    for name, value in parse_key_values(_expanded(ins, state), ins.line, "ENV"):
        env[name] = value
    return replace(state, env=env)


def _label(ins: Instruction, state: ImageState) -> ImageState:
    pairs = parse_key_values(_expanded(ins, state), ins.line, "LABEL")
    return replace(state, labels={**state.labels, **dict(pairs)})


def _maintainer(ins: Instruction, state: ImageState) -> ImageState:
    return replace(state, labels={**state.labels, "maintainer": ins.text})


def _workdir(ins: Instruction, state: ImageState) -> ImageState:
    return replace(state, workdir=posixpath.normpath(posixpath.join(state.workdir, _expanded(ins, state))))


def _user(ins: Instruction, state: ImageState) -> ImageState:
    return replace(state, user=_expanded(ins, state).strip())


def _expose(ins: Instruction, state: ImageState) -> ImageState:
    ports = set(state.exposed_ports)
    for spec in _expanded(ins, state).split():
        number, _, protocol = spec.partition("/")
        if not number.isdigit() or protocol not in ("", "tcp", "udp"):
            raise DockerfileError(ins.line, f"EXPOSE: bad port {spec!r}")
        if protocol != "udp":
            ports.add(int(number))
    return replace(state, exposed_ports=tuple(sorted(ports)))


def _shell(ins: Instruction, state: ImageState) -> ImageState:
    if not ins.exec_form:
        raise DockerfileError(ins.line, 'SHELL needs the JSON form, e.g. SHELL ["/bin/bash", "-c"]')
    return replace(state, shell=ins.exec_form)


def _volume(ins: Instruction, state: ImageState) -> tuple[ImageState, str]:
    paths = ins.exec_form if ins.exec_form is not None else _expanded(ins, state).split()
    volumes = tuple(posixpath.normpath(posixpath.join(state.workdir, v)) for v in paths)
    warning = (
        f"VOLUME {' '.join(volumes)}: made as directories of the rootfs; a sandbox's disk is one "
        "filesystem that lives and dies with it"
    )
    return replace(state, volumes=tuple(dict.fromkeys(state.volumes + volumes))), warning


# The instructions that only change the image's metadata, each from the state before it.
_STATE_CHANGES: dict[str, Callable[[Instruction, ImageState], ImageState]] = {
    "ENV": _env,
    "LABEL": _label,
    "MAINTAINER": _maintainer,
    "WORKDIR": _workdir,
    "USER": _user,
    "EXPOSE": _expose,
    "SHELL": _shell,
}


Materialize = Callable[[Path], Awaitable[None]]


@dataclass
class StagePlan:
    stage: Stage
    base_key: str
    base_state: ImageState
    materialize: Materialize  # puts the base's files into an empty rootfs
    steps: list[PlannedStep]

    @property
    def final_key(self) -> str:
        return self.steps[-1].key if self.steps else self.base_key

    @property
    def final_state(self) -> ImageState:
        return self.steps[-1].state if self.steps else self.base_state


class DockerfileRun:
    """One Dockerfile build: the stages' plans, lazily realized stage directories, downloads."""

    def __init__(
        self, builds: BuildTools, job: BuildJob, request: DockerfileBuildRequest, work: Path
    ) -> None:
        self.builds = builds
        self.job = job
        self.request = request
        self.work = work
        self.cache = StepCache(builds.config.cache_dir / "build-steps")
        self.plans: dict[int, StagePlan] = {}
        self.stage_roots: dict[int, Path] = {}
        self.downloads: dict[str, Path] = {}  # URL -> downloaded file
        self.stage_count = 0

    async def plan(self, exits: AsyncExitStack, stages: list[Stage], global_args: dict[str, str]) -> None:
        self.stage_count = len(stages)
        needed = needed_stages(stages, global_args)
        stage_keys: dict[str, tuple[int, str]] = {}
        for stage in stages:
            if stage.index in needed:
                base_key, base_state, materialize = await exits.enter_async_context(
                    self._open_base(stage, stages)
                )
                inputs = PlanInputs(
                    self.request.context, self.request.build_args, global_args, dict(stage_keys), {}
                )
                steps = await trio.to_thread.run_sync(plan_steps, stage.body, base_state, base_key, inputs)
                urls = [s.sources[0] for s in steps if s.downloads]
                if urls:
                    # ADD <url> keys on the content: download, then plan again with the digests.
                    digests = {url: await self._download(url) for url in urls}
                    inputs = replace(inputs, url_digests=digests)
                    steps = await trio.to_thread.run_sync(
                        plan_steps, stage.body, base_state, base_key, inputs
                    )
                plan = StagePlan(stage, base_key, base_state, materialize, steps)
                self.plans[stage.index] = plan
                stage_keys[str(stage.index)] = (stage.index, plan.final_key)
                if stage.name:
                    stage_keys[stage.name] = (stage.index, plan.final_key)

    async def _download(self, url: str) -> str:
        """ADD <url>: the file into the job's scratch space (see fetch.py); returns its sha256."""
        shown = redact_urls(url)
        self.builds.store.log(self.job, f"downloading {shown}")
        directory = self.work / "downloads"
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / f"{len(self.downloads)}"
        try:
            digest = await fetch_to_file(url, target, self.builds.limits)
        except FetchFailed as exc:
            raise StepFailed(f"ADD {shown}: {exc}") from exc
        self.downloads[url] = target
        return digest

    async def realize(self, plan: StagePlan, rootfs: Path) -> None:
        """Build `plan`'s stage into the empty directory `rootfs`, from the step cache where it can."""
        prefix = f"stage {plan.stage.name or plan.stage.index} " if self.stage_count > 1 else ""
        await realize_steps(
            self.builds.store,
            self.job,
            self.cache,
            plan.steps,
            rootfs,
            plan.materialize,
            self._file_step,
            prefix,
        )

    async def _file_step(self, rootfs: Path, step: PlannedStep) -> None:
        """RUN, COPY or ADD."""
        flags = step.instruction.flags
        if step.instruction.keyword == "RUN":
            await self._run(rootfs, step)
        elif step.from_stage is not None:
            source_root = await self.stage_root(step.from_stage)
            await trio.to_thread.run_sync(
                copy_from_stage,
                rootfs,
                source_root,
                step.sources,
                step.dest,
                flags,
                step.instruction.line,
            )
        elif step.downloads:
            url = step.sources[0]
            name = posixpath.basename(urllib.parse.urlsplit(url).path) or "index.html"
            await trio.to_thread.run_sync(
                copy_url_download, rootfs, self.downloads[url], name, step.dest, flags
            )
        else:
            await trio.to_thread.run_sync(
                copy_from_context,
                rootfs,
                self.request.context,
                step.instruction.keyword,
                step.sources,
                step.dest,
                flags,
                SizeBudget(self.builds.limits.unpacked_bytes, "an ADD'ed archive", "build_unpacked_max_size"),
            )

    async def stage_root(self, index: int) -> Path:
        """An earlier stage's files, built the first time they are asked for."""
        if index not in self.stage_roots:
            root = self.work / "stages" / str(index)
            root.mkdir(parents=True)
            await self.realize(self.plans[index], root)
            self.stage_roots[index] = root
        return self.stage_roots[index]

    async def _run(self, rootfs: Path, step: PlannedStep) -> None:
        state = step.state
        await trio.to_thread.run_sync(ensure_dir, rootfs, state.workdir)
        command = RunCommand(
            command_words(step.instruction, state.shell),
            state.run_env(),
            state.workdir,
            state.user or "root",
            output=lambda line: self.builds.store.log(self.job, line),
        )
        try:
            await self.builds.sandboxes.run_command(rootfs, command)
        except RunFailed as exc:
            shown = redact_urls(str(step.instruction))
            raise StepFailed(
                f"{shown} (Dockerfile line {step.instruction.line}) failed with exit status {exc.exit_code}",
                exc.output_tail,
            ) from exc

    @asynccontextmanager
    async def _open_base(self, stage: Stage, stages: list[Stage]) -> AsyncIterator[Base]:
        """FROM: `scratch`, an earlier stage, a template (id or alias) or an image."""
        name = stage.base
        if name == "scratch":

            async def empty(rootfs: Path) -> None:
                return None

            yield chain_key("scratch"), ImageState(), empty
            return
        earlier = stage_reference(stages, stage.index, name)
        if earlier is not None:
            plan = self.plans[earlier]

            async def from_stage(rootfs: Path) -> None:
                await copy_tree(await self.stage_root(earlier), rootfs)

            # ARGs do not carry over from one stage to the next; everything else does.
            yield plan.final_key, replace(plan.final_state, args={}), from_stage
            return
        try:
            template = resolve_template(self.builds.config, name, self.job.team)
        except TemplateNotFound:
            template = None
        if template is not None:
            yield template_base(self.builds, self.job, template)
            return
        work = self.work / "bases" / str(stage.index)
        async with open_image_base(self.builds, self.job, name, work, self.request.credentials) as base:
            yield base


# A base: its cache key, its image state, and how to put its files into an empty rootfs.
Base = tuple[str, ImageState, Materialize]


def template_base(builds: BuildTools, job: BuildJob, template: TemplateManifest) -> Base:
    """A template as a base: its files from its image, its env, workdir, user and start command."""
    state = ImageState(
        env=dict(template.envs),
        workdir=template.workdir,
        user=template.user,
        cmd=template.start_cmd,
        exposed_ports=template.expose_ports,
        labels=dict(template.labels),
    )

    async def export(rootfs: Path) -> None:
        builds.store.set_phase(job, Phase.UNPACKING, f"reading template {template.template_id}")
        await export_template_rootfs(template.rootfs, rootfs)

    return chain_key(f"template:{template.template_id}:{template.created_at}"), state, export


@asynccontextmanager
async def open_image_base(
    builds: BuildTools, job: BuildJob, name: str, work: Path, credentials: Credentials | None
) -> AsyncIterator[Base]:
    """An image as a base, resolved in its registry (or archive) while the context is open; its
    layers are fetched when materialized. `work` is made here. Raises the sources' errors."""
    builds.store.set_phase(job, Phase.PULLING, f"resolving {name}")
    work.mkdir(parents=True)
    async with open_image(
        name,
        work,
        builds.layer_cache,
        credentials,
        insecure_registries(builds.config),
        builds.limits,
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
            labels=dict(config.labels),
        )

        async def pull(rootfs: Path) -> None:
            await fetch_and_unpack(builds.store, job, source, image, rootfs, builds.limits)

        yield chain_key(f"image:{image.digest}"), state, pull


class CachedStep(Protocol):
    """A build step as `realize_steps` runs it."""

    @property
    def key(self) -> str: ...  # the image's cache key after the step

    @property
    def changes_files(self) -> bool: ...  # run (and snapshotted) rather than only evaluated

    @property
    def label(self) -> str: ...  # what the build log calls it

    @property
    def warning(self) -> str: ...  # logged when the step is reached, "" for none


Step = TypeVar("Step", bound=CachedStep)


async def realize_steps(
    store: JobStore,
    job: BuildJob,
    cache: StepCache,
    steps: Sequence[Step],
    rootfs: Path,
    materialize: Materialize,
    file_step: Callable[[Path, Step], Awaitable[None]],
    prefix: str = "",
) -> None:
    """Build `steps` into the empty directory `rootfs`: from the newest file step whose snapshot is
    in the cache (else from the base, `materialize`), then every file step after it with
    `file_step`, each snapshotted as it finishes."""
    cached_upto = -1
    for index in range(len(steps) - 1, -1, -1):
        if steps[index].changes_files and cache.has(steps[index].key):
            cached_upto = index
            break
    if cached_upto < 0:
        await materialize(rootfs)
    else:
        store.set_phase(job, Phase.UNPACKING, f"{prefix}restoring cached step {cached_upto + 1}")
        await cache.restore(steps[cached_upto].key, rootfs)
    store.set_phase(job, Phase.BUILDING, f"{prefix}running {sum(s.changes_files for s in steps)} file steps")
    for index, step in enumerate(steps):
        label = redact_urls(f"{prefix}step {index + 1}/{len(steps)}: {step.label}")
        if index <= cached_upto and step.changes_files:
            store.log(job, f"{label} (cached)")
            continue
        store.log(job, label)
        if step.warning:
            store.log(job, f"warning: {step.warning}")
        if step.changes_files:
            await file_step(rootfs, step)
            await cache.save(step.key, rootfs)


async def build_dockerfile_rootfs(
    builds: BuildTools, job: BuildJob, request: DockerfileBuildRequest, rootfs: Path, work: Path
) -> BuiltRootfs:
    stages, global_args = split_stages(parse_dockerfile(request.dockerfile), request.build_args)
    builds.store.set_phase(job, Phase.PULLING, f"resolving FROM {stages[-1].base}")
    run = DockerfileRun(builds, job, request, work)
    async with AsyncExitStack() as exits:
        await run.plan(exits, stages, global_args)
        final = run.plans[stages[-1].index]
        await run.realize(final, rootfs)
    state = final.final_state
    for directory in (state.workdir, *state.volumes):
        await trio.to_thread.run_sync(ensure_dir, rootfs, directory)
    return BuiltRootfs(
        final.final_key,
        state.env,
        request.settings.start_cmd(state.entrypoint, state.cmd),
        state.workdir,
        state.user,
        state.exposed_ports,
        state.labels,
    )
