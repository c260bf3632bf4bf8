"""HTTP API of template builds (a Quart blueprint the service registers on its app).

  POST /templates/builds                 JSON build request (see requests.py)  -> 202 {job_id, template_id}
  POST /templates/builds/dockerfile      body: tar of the build context (chunked);
                                         ?options=<JSON: build_args, template settings, and either
                                         dockerfile (the text) or dockerfile_path (in the context,
                                         default Dockerfile; a file named .cube-dockerfile is the
                                         CLI's copy of a Dockerfile from outside the context and is
                                         removed from the context after reading)>
                                                                               -> 202 {job_id, template_id}
  GET  /templates/builds                 -> [job, ...] (without logs)
  GET  /templates/builds/<job_id>?log_since=N
                                         -> job: phase, progress, message, reason, console_tail,
                                            template_id, layers, log (from line N), log_start, log_total
  GET  /templates/build-cache            -> {max_bytes, total_bytes, entries: [{kind, name, size_bytes,
                                            last_used, in_use}, ...] least recently used first}
  POST /templates/build-cache/prune      JSON {"max_size": "5G"} (default: the configured cap) or
                                         {"all": true}      -> {removed: [...], freed_bytes, total_bytes,
                                                               kept_in_use}
Errors are E2B-shaped JSON `{"code": <status>, "message", "error_code"}` with a 4xx status.

Tenancy (appliance/tenancy.py): the service serves this blueprint behind an API key. A
build belongs to the caller's team, as does the template it makes; a team lists and
reads only its own jobs (another team's is not found), may not publish under a name
another team or a built-in template holds, and may not build from host paths (`oci:`,
`oci-archive:`, `docker-archive:`, also as a Dockerfile's FROM): those, and the build
caches (shared by every team), are the admin's.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from pathlib import Path

import trio
from quart import Blueprint, Response, jsonify, request

from appliance.templates.build_caches import max_cache_bytes
from appliance.templates.build_context import extract_context, read_context_dockerfile
from appliance.templates.builds import TemplateBuilds
from appliance.templates.catalog import NameTaken, check_name_free
from appliance.templates.dockerfile import DockerfileError, parse_dockerfile
from appliance.templates.dockerfile_build import DockerfileBuildRequest, split_stages, stage_reference
from appliance.templates.jobs import BuildJob
from appliance.templates.reference import InvalidReference, LocalReference, parse_image_reference
from appliance.templates.registry_auth import Credentials
from appliance.templates.requests import (
    ImageBuildRequest,
    TemplateLimits,
    TemplateSettings,
    parse_size_mb,
    public_request,
)
from appliance.tenancy import Principal, current_principal

CONTEXT_UPLOAD_PATH = "/templates/builds/dockerfile"


class Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error(status: int, code: str, message: str) -> tuple[Response, int]:
    return jsonify({"code": status, "message": message, "error_code": code}), status


def check_image_allowed(principal: Principal, image: str) -> None:
    """Host paths as image sources read files of the host: the admin's only. Raises InvalidReference."""
    if isinstance(parse_image_reference(image), LocalReference) and not principal.is_admin:
        raise Refused(403, "forbidden", f"only the admin may build from a host path ({image.split(':')[0]}:)")


def check_dockerfile_allowed(principal: Principal, dockerfile: str, build_args: dict[str, str]) -> None:
    """Every FROM that names an image (not scratch, an earlier stage): see check_image_allowed."""
    stages, _ = split_stages(parse_dockerfile(dockerfile), build_args)
    for stage in stages:
        if stage.base != "scratch" and stage_reference(stages, stage.index, stage.base) is None:
            try:
                check_image_allowed(principal, stage.base)
            except InvalidReference:
                continue  # a template name, or a bad reference the build reports in its job


def check_alias_allowed(builds: TemplateBuilds, principal: Principal, settings: TemplateSettings) -> None:
    if settings.alias is not None:
        try:
            check_name_free(builds.config, settings.alias, principal.team_id)
        except NameTaken as exc:
            raise Refused(409, "name_taken", str(exc)) from exc


def visible_job(builds: TemplateBuilds, job_id: str) -> BuildJob | None:
    job = builds.job(job_id)
    return job if job is not None and current_principal().owns(job.team) else None


async def receive_context(archive: Path, limit: int) -> None:
    """The request body (a tar, usually chunked) into `archive`, refused past `limit` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise Refused(413, "too_large", f"the build context is larger than {limit >> 20} MiB")
    received = 0
    async with await trio.open_file(archive, "wb") as out:
        async for chunk in request.body:
            received += len(chunk)
            if received > limit:
                raise Refused(413, "too_large", f"the build context is larger than {limit >> 20} MiB")
            await out.write(chunk)


def require_admin() -> None:
    """The build caches hold every team's layers and steps: the admin's to see and prune."""
    if not current_principal().is_admin:
        raise Refused(
            403, "forbidden", "the build caches are shared by every team: this call needs the admin token"
        )


def create_blueprint(builds: TemplateBuilds) -> Blueprint:
    blueprint = Blueprint("template_builds", __name__)

    @blueprint.errorhandler(Refused)
    async def _refused(refused: Refused) -> tuple[Response, int]:
        return error(refused.status, refused.code, refused.message)

    _add_submit_routes(blueprint, builds)
    _add_read_routes(blueprint, builds)
    return blueprint


def _add_submit_routes(blueprint: Blueprint, builds: TemplateBuilds) -> None:
    @blueprint.post("/templates/builds")
    async def submit_image_build() -> tuple[Response, int]:
        principal = current_principal()
        data = await request.get_json(force=True, silent=True)
        if not isinstance(data, dict):
            return error(400, "invalid_request", "the body must be a JSON object")
        try:
            build = ImageBuildRequest.from_json(data, TemplateLimits.from_config(builds.config))
            check_image_allowed(principal, build.image)
        except (ValueError, TypeError, InvalidReference) as exc:
            return error(400, "invalid_request", str(exc))
        check_alias_allowed(builds, principal, build.settings)
        job = builds.submit_image(build, public_request(data), principal.team_id)
        return jsonify({"job_id": job.job_id, "template_id": job.template_id}), 202

    @blueprint.post(CONTEXT_UPLOAD_PATH)
    async def submit_dockerfile_build() -> tuple[Response, int]:
        principal = current_principal()
        try:
            options = json.loads(request.args.get("options", "{}"))
            if not isinstance(options, dict):
                raise ValueError("options must be a JSON object")
            settings = TemplateSettings.from_json(options, TemplateLimits.from_config(builds.config))
            build_args = {str(k): str(v) for k, v in (options.get("build_args") or {}).items()}
            username, password = options.get("registry_username"), options.get("registry_password")
            credentials = Credentials(str(username), str(password)) if username and password else None
        except (ValueError, TypeError, DockerfileError) as exc:
            return error(400, "invalid_request", str(exc))
        check_alias_allowed(builds, principal, settings)
        context = Path(tempfile.mkdtemp(prefix="context-", dir=builds.context_root()))
        archive = context.with_suffix(".tar")
        try:
            await receive_context(archive, builds.limits.context_bytes)
            await trio.to_thread.run_sync(extract_context, archive, context, builds.limits.context_bytes)
            dockerfile = str(options.get("dockerfile") or "") or read_context_dockerfile(
                context, str(options.get("dockerfile_path") or "Dockerfile")
            )
            check_dockerfile_allowed(principal, dockerfile, build_args)
        except DockerfileError as exc:
            shutil.rmtree(context, ignore_errors=True)
            return error(400, "invalid_request", str(exc))
        except (OSError, ValueError, tarfile.TarError) as exc:
            shutil.rmtree(context, ignore_errors=True)
            return error(400, "invalid_context", f"cannot read the build context: {exc}")
        except BaseException:
            shutil.rmtree(context, ignore_errors=True)
            raise
        finally:
            archive.unlink(missing_ok=True)
        build = DockerfileBuildRequest(dockerfile, context, settings, build_args, credentials)
        job = builds.submit_dockerfile(build, public_request(options), principal.team_id)
        return jsonify({"job_id": job.job_id, "template_id": job.template_id}), 202


def _add_read_routes(blueprint: Blueprint, builds: TemplateBuilds) -> None:
    @blueprint.get("/templates/builds")
    async def list_builds() -> Response:
        principal = current_principal()
        jobs = [job for job in builds.jobs() if principal.owns(job.team)]
        return jsonify([{k: v for k, v in job.to_dict().items() if k != "log"} for job in jobs])

    @blueprint.get("/templates/builds/<job_id>")
    async def get_build(job_id: str) -> Response | tuple[Response, int]:
        job = visible_job(builds, job_id)
        if job is None:
            return error(404, "not_found", f"no build job {job_id}")
        try:
            since = int(request.args.get("log_since", "0"))
        except ValueError:
            return error(400, "invalid_request", "log_since must be an integer")
        return jsonify(job.view(since))

    @blueprint.get("/templates/build-cache")
    async def list_build_cache() -> Response:
        require_admin()
        entries = await trio.to_thread.run_sync(builds.caches.entries)
        return jsonify(
            {
                "max_bytes": max_cache_bytes(builds.config),
                "total_bytes": sum(e.size_bytes for e in entries),
                "entries": [e.to_dict() for e in entries],
            }
        )

    @blueprint.post("/templates/build-cache/prune")
    async def prune_build_cache() -> Response | tuple[Response, int]:
        require_admin()
        data = await request.get_json(force=True, silent=True) or {}
        if not isinstance(data, dict):
            return error(400, "invalid_request", "the body must be a JSON object")
        try:
            limit = 0 if data.get("all") else max_cache_bytes(builds.config)
            if data.get("max_size") is not None and not data.get("all"):
                limit = parse_size_mb(str(data["max_size"])) << 20
        except ValueError as exc:
            return error(400, "invalid_request", str(exc))
        removed, kept = await trio.to_thread.run_sync(builds.caches.prune, limit)
        return jsonify(
            {
                "removed": [e.to_dict() for e in removed],
                "freed_bytes": sum(e.size_bytes for e in removed),
                "total_bytes": sum(e.size_bytes for e in kept),
                "kept_in_use": sum(e.in_use for e in kept),
            }
        )
