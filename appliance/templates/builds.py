"""The template build service: runs build jobs from image references and Dockerfiles.

The service starts it in its nursery (`await nursery.start(builds.run)`); the
API blueprint submits jobs and reads them. Each job builds into a fresh
template directory that stays marked unfinished (invisible to lookups) until
READY and is removed on failure, so a failed build leaves no partial template.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import trio

from appliance.config import Config
from appliance.errors import first_leaf
from appliance.records import TemplateManifest
from appliance.runtime.base import BootFailed, Instance, read_console_tail
from appliance.templates.build_caches import BuildCaches, max_cache_bytes, private_dir
from appliance.templates.catalog import (
    begin_template,
    discard_template,
    new_template_id,
    publish_template,
    remove_unfinished,
)
from appliance.templates.dockerfile_build import DockerfileBuildRequest, build_dockerfile_rootfs
from appliance.templates.ext4 import build_ext4
from appliance.templates.guest_setup import DEFAULT_PATH, prepare_rootfs
from appliance.templates.jobs import (
    PHASE_PROGRESS,
    BuildJob,
    BuildStepFailed,
    JobStore,
    Phase,
    new_job_id,
    utc_now,
)
from appliance.templates.layer_cache import LayerCache
from appliance.templates.limits import BuildLimits
from appliance.templates.probe import ProbeFailed, wait_until_ready
from appliance.templates.pull import pull_image
from appliance.templates.registry import insecure_registries
from appliance.templates.requests import BuiltRootfs, ImageBuildRequest, TemplateSettings
from appliance.templates.sandbox_steps import RunCommand, TemplateSandboxes
from appliance.templates.sdk_build import SdkBuildRequest, build_sdk_rootfs
from appliance.templates.sdk_builds import SdkBuilds
from appliance.templates.sdk_files import UploadedFiles
from appliance.templates.sdk_steps import StepRefused
from appliance.tenancy import SYSTEM_TEAM

log = logging.getLogger(__name__)

# Fills the empty rootfs directory (second argument) using the job's scratch
# directory (third) and returns the manifest of the template to finish.
RootfsBuilder = Callable[[BuildJob, Path, Path], Awaitable[TemplateManifest]]
# Builds are disk- and CPU-heavy; on a small host they queue rather than compete.
PARALLEL_BUILDS = 1
READY_OUTPUT_LINES = 40  # of a ready command's last run, in the failure


class ReadyCommandFailed(BuildStepFailed):
    def __init__(self, message: str, output: str) -> None:
        super().__init__(message, output, "finalize")  # the SDKs' name for what runs after the last step


class TemplateBuilds:
    def __init__(self, config: Config, sandboxes: TemplateSandboxes) -> None:
        self.config = config
        self.sandboxes = sandboxes
        self.store = JobStore(config.state_dir / "template-builds")
        self.layer_cache = LayerCache(config.cache_dir / "layers")
        self.caches = BuildCaches(config.cache_dir, self.running_since)
        self.limits = BuildLimits.from_config(config)
        # What the E2B SDKs upload for their COPY steps (sdk_files.py).
        self.uploads = UploadedFiles(config.cache_dir / "sdk-files", self.limits)
        self.sdk_builds = SdkBuilds(config.state_dir / "sdk-builds")
        self._running: dict[str, float] = {}  # job id -> when it started (epoch)
        self._limiter = trio.CapacityLimiter(PARALLEL_BUILDS)
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.store.load()
        self.sdk_builds.load()
        for template_id in remove_unfinished(self.config):
            log.info("removed unfinished template %s", template_id)
        await trio.to_thread.run_sync(lambda: shutil.rmtree(self._work_root(), ignore_errors=True))
        for directory in (self.layer_cache.root, self.caches.steps_dir, self.uploads.root, self._work_root()):
            private_dir(directory)  # also tightens the modes of caches older versions left open
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def _work_root(self) -> Path:
        return private_dir(self.config.cache_dir / "build-work")

    def context_root(self) -> Path:
        """Where uploaded Dockerfile build contexts are unpacked (removed when their job ends)."""
        path = self._work_root() / "contexts"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def running_since(self) -> float | None:
        """When the oldest running build started: cache entries used since then are kept."""
        return min(self._running.values(), default=None)

    async def enforce_cache_cap(self) -> None:
        removed, _ = await trio.to_thread.run_sync(self.caches.prune, max_cache_bytes(self.config))
        if removed:
            log.info(
                "evicted %d build cache entries (%d MiB)",
                len(removed),
                sum(e.size_bytes for e in removed) >> 20,
            )

    def jobs(self) -> list[BuildJob]:
        return sorted(self.store.jobs.values(), key=lambda j: j.created_at)

    def job(self, job_id: str) -> BuildJob | None:
        return self.store.get(job_id)

    def _start(
        self,
        kind: str,
        request: dict[str, object],
        settings: TemplateSettings,
        build: RootfsBuilder,
        team: str,
    ) -> BuildJob:
        if self._nursery is None:
            raise RuntimeError("the template build service is not running")
        job = BuildJob(
            job_id=new_job_id(), kind=kind, request=request, template_id=new_template_id(), team=team
        )
        self.store.add(job)
        self._nursery.start_soon(self._run_job, job, settings, build)
        return job

    def submit_image(
        self, request: ImageBuildRequest, public: dict[str, object], team: str = SYSTEM_TEAM
    ) -> BuildJob:
        async def build(job: BuildJob, rootfs: Path, work: Path) -> TemplateManifest:
            image = await pull_image(
                self.store,
                job,
                request.image,
                rootfs,
                work,
                self.layer_cache,
                request.credentials,
                insecure_registries(self.config),
                self.limits,
            )
            config = image.config
            built = BuiltRootfs(
                image.digest,
                config.env_dict(),
                request.settings.start_cmd(config.entrypoint, config.cmd),
                config.workdir,
                config.user,
                config.exposed_ports,
                config.labels,
            )
            return self._manifest(job, request.settings, built)

        return self._start("image", public, request.settings, build, team)

    def submit_dockerfile(
        self, request: DockerfileBuildRequest, public: dict[str, object], team: str = SYSTEM_TEAM
    ) -> BuildJob:
        async def build(job: BuildJob, rootfs: Path, work: Path) -> TemplateManifest:
            try:
                built = await build_dockerfile_rootfs(self, job, request, rootfs, work)
            finally:
                await trio.to_thread.run_sync(lambda: shutil.rmtree(request.context, ignore_errors=True))
            return self._manifest(job, request.settings, built)

        return self._start("dockerfile", public, request.settings, build, team)

    def submit_sdk(
        self, request: SdkBuildRequest, public: dict[str, object], team: str = SYSTEM_TEAM
    ) -> BuildJob:
        """A build from the E2B SDKs' step list (sdk_build.py)."""

        async def build(job: BuildJob, rootfs: Path, work: Path) -> TemplateManifest:
            built = await build_sdk_rootfs(self, job, request, rootfs, work)
            return self._manifest(job, request.settings, built, build_id=request.build_id)

        return self._start("sdk", public, request.settings, build, team)

    def _manifest(
        self, job: BuildJob, settings: TemplateSettings, built: BuiltRootfs, build_id: str = ""
    ) -> TemplateManifest:
        image_ports = built.exposed_ports
        return TemplateManifest(
            template_id=job.template_id,
            directory=self.config.templates_dir / job.template_id,
            aliases=(settings.alias,) if settings.alias else (),
            memory_mb=settings.memory_mb,
            cpu_count=settings.cpu_count,
            writable_layer_mb=settings.writable_layer_mb,
            envs={**built.env, **settings.envs},
            start_cmd=built.start_cmd,
            ready_cmd=settings.ready_cmd or "",
            workdir=built.workdir or "/",
            user=built.user or "root",
            expose_ports=settings.ports(image_ports),
            probe_port=settings.probe(image_ports),
            probe_path=settings.probe_path,
            network_defaults=settings.network_defaults,
            source=built.cache_key,
            labels=built.labels,
            created_at=utc_now(),
            owner=job.team,
            build_id=build_id or str(uuid.uuid4()),
        )

    async def _run_job(self, job: BuildJob, settings: TemplateSettings, build: RootfsBuilder) -> None:
        work = self._work_root() / job.job_id
        failure: tuple[str, str, str] | None = None  # (reason, console tail, failed step)
        cancelled = False
        # A little early: file times come from the kernel's coarse clock, which may lag time.time().
        self._running[job.job_id] = time.time() - 0.05
        try:
            async with self._limiter:
                rootfs = work / "rootfs"
                rootfs.mkdir(parents=True)
                begin_template(self.config, job.template_id)
                manifest = await build(job, rootfs, work)
                manifest = await self._write_image(job, settings, rootfs, manifest)
                # The unpacked tree is in rootfs.ext4 now: give its disk space back before booting.
                await trio.to_thread.run_sync(shutil.rmtree, work)
                await self._boot_and_publish(job, settings, manifest)
        except Exception as error:  # every failure becomes the job's reason; nothing above sees it
            failure = _failure(first_leaf(error))
        except BaseException:
            failure, cancelled = ("the build was cancelled (service shutting down)", "", ""), True
            raise
        finally:
            # Clean up first: whoever sees FAILED finds nothing of the build left.
            with trio.CancelScope(shield=True):
                if failure is not None:
                    discard_template(self.config, job.template_id)
                await trio.to_thread.run_sync(lambda: shutil.rmtree(work, ignore_errors=True))
                if failure is not None:
                    self.store.fail(job, *failure)
                del self._running[job.job_id]
            if not cancelled:  # the cap waits for the next build rather than delay a shutdown
                try:
                    await self.enforce_cache_cap()
                except OSError as exc:
                    log.warning("could not prune the build caches: %s", exc)

    async def _write_image(
        self, job: BuildJob, settings: TemplateSettings, rootfs: Path, manifest: TemplateManifest
    ) -> TemplateManifest:
        """BUILDING: guest agent, init and start script into the tree, then rootfs.ext4 from it."""
        self.store.set_phase(job, Phase.BUILDING, "injecting the guest agent and writing rootfs.ext4")
        default_user = await trio.to_thread.run_sync(
            prepare_rootfs,
            rootfs,
            manifest.start_cmd,
            manifest.envs,
            manifest.workdir,
            manifest.user,
            settings.dns,
        )
        size = await build_ext4(rootfs, manifest.rootfs, manifest.writable_layer_mb << 20)
        self.store.log(job, f"rootfs.ext4: {size >> 20} MiB ({manifest.writable_layer_mb} MiB writable)")
        # Processes and files default to the image's USER, by the account name the agent looks up.
        return replace(manifest, user=default_user)

    async def _boot_and_publish(
        self, job: BuildJob, settings: TemplateSettings, manifest: TemplateManifest
    ) -> None:
        """BOOTING -> PROBING -> SNAPSHOTTING/POOLING -> READY."""
        self.store.set_phase(job, Phase.BOOTING, "booting a sandbox from the template")
        async with self.sandboxes.boot(manifest) as instance:
            target = f"{manifest.probe_path or 'TCP'} on port {manifest.probe_port}"
            self.store.set_phase(job, Phase.PROBING, f"probing {target}")
            try:
                took = await wait_until_ready(
                    instance.endpoint(manifest.probe_port),
                    manifest.probe_path,
                    settings.probe_timeout_s,
                    settings.probe_period_s,
                )
            except ProbeFailed as exc:
                exc.console_tail = read_console_tail(instance.console_log)
                raise
            self.store.log(job, f"probe answered after {took:.1f}s")
            if settings.ready_cmd:
                await self._wait_for_ready_command(job, settings, manifest, instance)
            self.store.set_phase(job, self.sandboxes.finalize_phase)
            await self.sandboxes.finalize(manifest, instance)
        superseded = publish_template(self.config, manifest, settings.alias, settings.tags)
        self.sandboxes.published(manifest)  # the service's registry and warm pools pick it up now
        if superseded:
            self.store.log(job, f"alias {settings.alias} moved from {superseded} to {manifest.template_id}")
        job.progress = PHASE_PROGRESS[Phase.READY]
        self.store.set_phase(job, Phase.READY, f"template {manifest.template_id} is ready")

    async def _wait_for_ready_command(
        self, job: BuildJob, settings: TemplateSettings, manifest: TemplateManifest, instance: Instance
    ) -> None:
        """Run the ready command in the booted template (its start command running) until it exits 0."""
        assert settings.ready_cmd is not None
        output: list[str] = []
        command = RunCommand(
            ("/bin/sh", "-c", settings.ready_cmd),
            {"PATH": DEFAULT_PATH, **manifest.envs},
            manifest.workdir,
            manifest.user,
            output=output.append,
        )
        self.store.log(job, f"waiting for the ready command: {settings.ready_cmd}")
        started = trio.current_time()
        code = None
        with trio.move_on_after(settings.probe_timeout_s):
            while True:
                output.clear()
                code = await self.sandboxes.run_in(instance, command)
                if code == 0:
                    self.store.log(job, f"ready command succeeded after {trio.current_time() - started:.1f}s")
                    return
                await trio.sleep(settings.probe_period_s)
        shown = "\n".join(output[-READY_OUTPUT_LINES:])
        raise ReadyCommandFailed(
            f"the ready command {settings.ready_cmd!r} did not succeed within {settings.probe_timeout_s:g}s "
            f"(last exit status {code})",
            shown,
        )


def _failure(leaf: BaseException) -> tuple[str, str, str]:
    """(reason, console tail or the failing command's output, failed step) of a failed build."""
    if isinstance(leaf, BootFailed):
        return f"the template's sandbox did not boot: {leaf.reason}", leaf.console_tail, "finalize"
    reason = str(leaf) or type(leaf).__name__
    if isinstance(leaf, BuildStepFailed):
        return reason, leaf.console_tail, leaf.step
    if isinstance(leaf, StepRefused):  # a step its build could not plan
        return reason, "", str(leaf.step)
    return reason, "", ""
