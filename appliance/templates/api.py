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
Errors are JSON `{"code", "message"}` with a 4xx status.
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
from appliance.templates.dockerfile import DockerfileError, parse_dockerfile
from appliance.templates.dockerfile_build import DockerfileBuildRequest
from appliance.templates.reference import InvalidReference, parse_image_reference
from appliance.templates.registry_auth import Credentials
from appliance.templates.requests import ImageBuildRequest, TemplateSettings, parse_size_mb, public_request


def error(status: int, code: str, message: str) -> tuple[Response, int]:
    return jsonify({"code": code, "message": message}), status


def create_blueprint(builds: TemplateBuilds) -> Blueprint:
    blueprint = Blueprint("template_builds", __name__)

    @blueprint.post("/templates/builds")
    async def submit_image_build() -> tuple[Response, int]:
        data = await request.get_json(force=True, silent=True)
        if not isinstance(data, dict):
            return error(400, "invalid_request", "the body must be a JSON object")
        try:
            build = ImageBuildRequest.from_json(data)
            parse_image_reference(build.image)
        except (ValueError, TypeError, InvalidReference) as exc:
            return error(400, "invalid_request", str(exc))
        job = builds.submit_image(build, public_request(data))
        return jsonify({"job_id": job.job_id, "template_id": job.template_id}), 202

    @blueprint.post("/templates/builds/dockerfile")
    async def submit_dockerfile_build() -> tuple[Response, int]:
        try:
            options = json.loads(request.args.get("options", "{}"))
            if not isinstance(options, dict):
                raise ValueError("options must be a JSON object")
            settings = TemplateSettings.from_json(options)
            build_args = {str(k): str(v) for k, v in (options.get("build_args") or {}).items()}
            username, password = options.get("registry_username"), options.get("registry_password")
            credentials = Credentials(str(username), str(password)) if username and password else None
        except (ValueError, TypeError, DockerfileError) as exc:
            return error(400, "invalid_request", str(exc))
        context = Path(tempfile.mkdtemp(prefix="context-", dir=builds.context_root()))
        try:
            archive = context.with_suffix(".tar")
            async with await trio.open_file(archive, "wb") as out:
                async for chunk in request.body:
                    await out.write(chunk)
            await trio.to_thread.run_sync(extract_context, archive, context)
            archive.unlink()
            dockerfile = str(options.get("dockerfile") or "") or read_context_dockerfile(
                context, str(options.get("dockerfile_path") or "Dockerfile")
            )
            parse_dockerfile(dockerfile)
        except DockerfileError as exc:
            shutil.rmtree(context, ignore_errors=True)
            return error(400, "invalid_request", str(exc))
        except (OSError, ValueError, tarfile.TarError) as exc:
            shutil.rmtree(context, ignore_errors=True)
            return error(400, "invalid_context", f"cannot read the build context: {exc}")
        build = DockerfileBuildRequest(dockerfile, context, settings, build_args, credentials)
        job = builds.submit_dockerfile(build, public_request(options))
        return jsonify({"job_id": job.job_id, "template_id": job.template_id}), 202

    @blueprint.get("/templates/builds")
    async def list_builds() -> Response:
        return jsonify([{k: v for k, v in job.to_dict().items() if k != "log"} for job in builds.jobs()])

    @blueprint.get("/templates/builds/<job_id>")
    async def get_build(job_id: str) -> Response | tuple[Response, int]:
        job = builds.job(job_id)
        if job is None:
            return error(404, "not_found", f"no build job {job_id}")
        try:
            since = int(request.args.get("log_since", "0"))
        except ValueError:
            return error(400, "invalid_request", "log_since must be an integer")
        return jsonify(job.view(since))

    @blueprint.get("/templates/build-cache")
    async def list_build_cache() -> Response:
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

    return blueprint
