"""A template from the E2B SDKs' step list (sdk_steps.py) on the build engine: a base, then the
steps through the step cache (`dockerfile_build.realize_steps`), RUN in a temporary guest.

The base:
- `fromTemplate`: a template the team may use (id, alias or `alias:tag`), with its env, workdir,
  user and start command.
- `fromImage`: an image from a registry. Docker Hub names (`python:3`, `e2bdev/base`) are pulled
  from `docker_hub_mirror` when the operator set one (`docker_hub_mirror = "host:port"`, listed in
  `insecure_registries` if it is plain HTTP), else from Docker Hub. E2B's own base images and the
  images of the SDK's `from_*_image()` helpers (`E2B_BASE_IMAGES`) that no registry the appliance
  reaches has are built from the appliance's default template instead, saying so in the build log.
  An image base gets E2B's account `user`; without its own USER and WORKDIR the steps run as
  `user` in /home/user, as on E2B.

Steps as E2B runs them:
- RUN: `/bin/bash -c` (else `/bin/sh -c`) as the step's user, else the USER in effect.
- COPY: the uploaded files (sdk_files.py) under the source's base (see `copy_source_base`): a
  directory's contents go into the destination, a file to the destination (into it when it ends
  with `/` or is a directory); relative destinations are under the WORKDIR; owned by the given
  owner, else the USER in effect; `mode` on everything copied. All through untrusted_tree.
- ENV, WORKDIR, USER: the image state. Before each RUN and COPY, and at the end, the USER in effect
  gets an account if the image has none (`adduser -D`, as E2B's USER does) and the WORKDIR is made
  (owned by that user when new).

The start command (`startCmd`) runs at every boot of the template as its user, with its env, in
its workdir; an image's own ENTRYPOINT/CMD is not run (as on E2B), a base template's start command
is kept unless the SDK gives another. The ready command (`readyCmd`) must succeed in the build's
guest (else the build fails), and is awaited in every new guest before it becomes a sandbox
(cubelet/lifecycle.py), so the start command's service answers once `Sandbox.create` returns.
"""

from __future__ import annotations

import posixpath
import stat
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import httpx
import trio

from appliance.config import Config
from appliance.templates.build_context import CopyRules, copy_entry
from appliance.templates.catalog import TemplateNotFound, resolve_template
from appliance.templates.dockerfile_build import (
    Base,
    BuildTools,
    ImageState,
    Materialize,
    open_image_base,
    realize_steps,
    template_base,
)
from appliance.templates.guest_setup import SANDBOX_USER, ensure_account, lookup_ids
from appliance.templates.jobs import BuildJob, BuildStepFailed
from appliance.templates.manifests import ManifestError
from appliance.templates.reference import DOCKER_HUB, RegistryReference, parse_image_reference
from appliance.templates.registry import RegistryError
from appliance.templates.registry_auth import RegistryAuthError
from appliance.templates.requests import BuiltRootfs, TemplateSettings
from appliance.templates.sandbox_steps import RunCommand, RunFailed
from appliance.templates.sdk_files import UploadedFiles
from appliance.templates.sdk_steps import PlannedSdkStep, SdkTemplate, copy_source_base, plan_steps
from appliance.templates.step_cache import StepCache
from appliance.templates.untrusted_tree import Tree

# Docker Hub repositories of E2B's base images and of the SDK's from_*_image() helpers whose
# images the appliance's default template stands in for (Debian with python3, pip and nodejs).
E2B_BASE_IMAGES = frozenset(
    {
        "e2bdev/base",
        "e2bdev/code-interpreter",
        "library/python",
        "library/node",
        "library/debian",
        "library/ubuntu",
    }
)
SDK_HOME = f"/home/{SANDBOX_USER}"
# What may go wrong finding an image in a registry (the fallback to a built-in template covers these).
_IMAGE_ERRORS = (RegistryError, RegistryAuthError, ManifestError, httpx.HTTPError, OSError, ValueError)


class SdkBuildTools(BuildTools, Protocol):
    """What an SDK build uses of the template builder (`builds.TemplateBuilds`)."""

    uploads: UploadedFiles


class SdkStepFailed(BuildStepFailed):
    """A failed step of an SDK build, named as the SDKs name it ("base", "1", "2"...)."""

    def __init__(self, message: str, step: str, output: str = "") -> None:
        super().__init__(message, output, step)


@dataclass(frozen=True)
class SdkBuildRequest:
    build_id: str  # the SDKs' buildID (a UUID), also the template version's
    team: str
    template: SdkTemplate
    settings: TemplateSettings  # alias, tags, cpu, memory, ready command


def mirrored(config: Config, image: str) -> str:
    """`image` as pulled: a Docker Hub name from `docker_hub_mirror` when the operator set one."""
    mirror = config.extra.get("docker_hub_mirror", "").strip()
    reference = parse_image_reference(image)
    if not mirror or not isinstance(reference, RegistryReference) or reference.registry != DOCKER_HUB:
        return image
    return str(replace(reference, registry=mirror))


def e2b_base_image(image: str) -> bool:
    try:
        reference = parse_image_reference(image)
    except ValueError:
        return False
    return (
        isinstance(reference, RegistryReference)
        and reference.registry == DOCKER_HUB
        and reference.repository in E2B_BASE_IMAGES
    )


class SdkRun:
    def __init__(self, builds: SdkBuildTools, job: BuildJob, request: SdkBuildRequest, work: Path) -> None:
        self.builds = builds
        self.job = job
        self.request = request
        self.work = work
        self.cache = StepCache(builds.config.cache_dir / "build-steps")

    def log(self, line: str) -> None:
        self.builds.store.log(self.job, line)

    async def build(self, rootfs: Path) -> BuiltRootfs:
        template = self.request.template
        async with AsyncExitStack() as exits:
            base_key, base_state, materialize, from_image = await self._base(exits)
            steps = plan_steps(template.steps, base_state, base_key, self.request.build_id, template.force)

            async def materialize_base(tree_root: Path) -> None:
                await materialize(tree_root)
                if from_image:  # what E2B's image bases get: the `user` account
                    await trio.to_thread.run_sync(_prepare, tree_root, SANDBOX_USER, "/")

            await realize_steps(
                self.builds.store, self.job, self.cache, steps, rootfs, materialize_base, self._file_step
            )
        final = steps[-1].state if steps else base_state
        await trio.to_thread.run_sync(_prepare, rootfs, final.user or "root", final.workdir)
        start_cmd = base_state.entrypoint + base_state.cmd if not from_image else ()
        if template.start_cmd:
            start_cmd = (await self._shell(rootfs)) + (template.start_cmd,)
        key = steps[-1].key if steps else base_key
        return BuiltRootfs(
            key, final.env, start_cmd, final.workdir, final.user, final.exposed_ports, final.labels
        )

    async def _base(self, exits: AsyncExitStack) -> tuple[str, ImageState, Materialize, bool]:
        """(cache key, image state, materialize, whether it is an image) of the template's base."""
        template, config, team = self.request.template, self.builds.config, self.request.team
        if template.from_template is not None:
            try:
                found = resolve_template(config, template.from_template, team)
            except TemplateNotFound as exc:
                raise SdkStepFailed(f"fromTemplate: {exc}", "base") from exc
            return (*template_base(self.builds, self.job, found), False)
        image = template.from_image or ""
        pulled = mirrored(config, image)
        try:
            base: Base = await exits.enter_async_context(
                open_image_base(self.builds, self.job, pulled, self.work / "base", template.credentials)
            )
        except _IMAGE_ERRORS as exc:
            if not e2b_base_image(image):
                raise SdkStepFailed(f"fromImage {image}: {exc}", "base") from exc
            return (*self._built_in_instead(image, pulled, exc), False)
        key, state, materialize = base
        user = state.user or SANDBOX_USER
        workdir = (
            state.workdir if state.workdir not in ("", "/") else SDK_HOME if user == SANDBOX_USER else "/"
        )
        # The image's ENTRYPOINT and CMD are not the template's start command (as on E2B).
        return key, replace(state, user=user, workdir=workdir, entrypoint=(), cmd=()), materialize, True

    def _built_in_instead(self, image: str, pulled: str, error: Exception) -> Base:
        name = self.builds.config.default_template
        try:
            found = resolve_template(self.builds.config, name, self.request.team)
        except TemplateNotFound as exc:
            raise SdkStepFailed(
                f"fromImage {image}: {error}; this appliance has no default template {name!r} to build "
                "from instead",
                "base",
            ) from exc
        where = "the Docker Hub mirror" if pulled != image else "Docker Hub"
        self.log(
            f"warning: {image} could not be pulled from {where} ({error}). It is one of E2B's base images: "
            f"building from this appliance's built-in template {name!r} (its default template) instead. "
            "To use the image itself, make it available in a registry the appliance reaches "
            "(docker_hub_mirror in the config file)."
        )
        return template_base(self.builds, self.job, found)

    async def _file_step(self, rootfs: Path, planned: PlannedSdkStep) -> None:
        step = planned.step
        state = planned.state
        try:
            await trio.to_thread.run_sync(_prepare, rootfs, state.user or "root", state.workdir)
            if step.kind == "RUN":
                await self._run(rootfs, planned)
            else:
                assert step.files_hash is not None
                files = self.builds.uploads.files(self.request.team, step.files_hash)
                await trio.to_thread.run_sync(copy_upload, rootfs, files, step.args, state)
        except RunFailed as exc:
            raise SdkStepFailed(
                f"step {step.number} ({step.describe()}) failed with exit status {exc.exit_code}",
                str(step.number),
                exc.output_tail,
            ) from exc
        except (OSError, ValueError) as exc:
            raise SdkStepFailed(f"step {step.number} ({step.describe()}): {exc}", str(step.number)) from exc

    async def _run(self, rootfs: Path, planned: PlannedSdkStep) -> None:
        state = planned.state
        command = RunCommand(
            (*await self._shell(rootfs), planned.step.args[0]),
            state.run_env(),
            state.workdir,
            planned.run_user,
            output=self.log,
        )
        await self.builds.sandboxes.run_command(rootfs, command)

    async def _shell(self, rootfs: Path) -> tuple[str, ...]:
        return await trio.to_thread.run_sync(_shell_of, rootfs)


def _shell_of(rootfs: Path) -> tuple[str, ...]:
    """How E2B runs commands (bash), where the image has bash."""
    with Tree.open(rootfs) as tree:
        bash = tree.stat("/bin/bash")
    return ("/bin/bash", "-c") if bash is not None and stat.S_ISREG(bash.st_mode) else ("/bin/sh", "-c")


def _prepare(rootfs: Path, user: str, workdir: str) -> None:
    """The USER in effect has an account and the WORKDIR exists (new directories are the user's)."""
    with Tree.open(rootfs) as tree:
        name = user.partition(":")[0]
        if name != "root" and not name.isdigit():
            ensure_account(tree, name)
        uid, gid, _ = lookup_ids(tree, user)
        tree.makedirs(workdir, 0o755, uid, gid)


def copy_upload(rootfs: Path, files: Path, args: tuple[str, ...], state: ImageState) -> None:
    """COPY [src, dest, owner?, mode?] from the unpacked upload `files` (see the module doc)."""
    src, dest = args[0], args[1]
    owner = (args[2] if len(args) > 2 else "") or state.user or "root"
    mode = int(args[3], 8) if len(args) > 3 and args[3] else None
    base = copy_source_base(src)
    target = posixpath.join(state.workdir, dest)
    with Tree.open(files) as upload, Tree.open(rootfs) as root:
        info = upload.lstat(base)
        if info is None or upload.crosses_symlink(posixpath.dirname(base) or "."):
            raise ValueError(f"the uploaded files have no {base!r} (upload them again: force_upload=True)")
        uid, gid, _ = lookup_ids(root, owner)
        rules = CopyRules(owner=(uid, gid), chmod=mode)
        if stat.S_ISDIR(info.st_mode):
            root.makedirs(target, 0o755, uid, gid)
            for name in upload.listdir(base):
                copy_entry(
                    upload, posixpath.join(base, name), root, posixpath.join(target, name), rules, True
                )
            return
        if dest.endswith("/") or root.is_dir(target):
            target = posixpath.join(target, posixpath.basename(base))
        root.makedirs(posixpath.dirname(target.rstrip("/")) or "/")
        copy_entry(upload, base, root, target, rules, recursive=False)


async def build_sdk_rootfs(
    builds: SdkBuildTools, job: BuildJob, request: SdkBuildRequest, rootfs: Path, work: Path
) -> BuiltRootfs:
    return await SdkRun(builds, job, request, work).build(rootfs)
