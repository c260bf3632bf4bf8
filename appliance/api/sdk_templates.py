"""The E2B SDKs' template builder (`Template().from_...().copy(...).run_cmd(...)`, `Template.build`)
on the control plane, as the SDKs call it (their e2b/template_sync/build_api.py):

  POST   /v3/templates                          {name[:tag], tags, cpuCount, memoryMB, minFreeDiskMb}
                                                -> 202 {templateID, buildID, names, tags, aliases, public}
  GET    /templates/{id}/files/{hash}           -> 201 {present, url}: whether the team has the files of
                                                   a COPY step, and a signed link to PUT them to
  PUT    /template-files/{hash}?team&expires&signature   the tar(.gz) itself (no API key: the
                                                   signature is the credential), sdk_files.py
  POST   /v2/templates/{id}/builds/{buildID}    the base and steps (sdk_steps.py) -> 202
  GET    /templates/{id}/builds/{buildID}/status?logsOffset&limit&level
                                                -> {status: waiting|building|ready|error, logEntries,
                                                    reason: {message, step, logEntries}}
  GET    /templates/{id}/builds/{buildID}/logs?cursor&limit&direction&level -> {logs}

Its names, tags and listing (`/templates/aliases`, `/templates/tags`, `/v2/templates`, PATCH)
are in api/sdk_template_names.py.

The SDKs' templateID is the template's name (its alias, appliance/templates/catalog.py); each
build is a new version of it with its own buildID; `name` alone is its `default` tag.

Tenancy: a build and its files belong to the caller's team; names another team (or a built-in
template) holds are refused (409) as for every build; another team's builds are not found. The
upload link binds the team, the hash and an expiry with an HMAC of a key made at service start.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import trio
from quart import Response, request

from appliance.api.auth import Access, guarded
from appliance.api.bodies import json_response
from appliance.api.errors import ApiError
from appliance.api.services import Services, services
from appliance.api.validation import request_object, string_list
from appliance.runtime.base import ENVD_PORT
from appliance.templates.api import Refused, check_image_allowed
from appliance.templates.builds import TemplateBuilds
from appliance.templates.catalog import (
    DEFAULT_TAG,
    NameTaken,
    check_name_free,
    name_owner,
    split_name_tag,
    validate_name,
    validate_tag,
)
from appliance.templates.jobs import BuildJob, Phase
from appliance.templates.requests import TemplateLimits, TemplateSettings
from appliance.templates.sdk_build import SdkBuildRequest
from appliance.templates.sdk_builds import SdkBuild
from appliance.templates.sdk_files import UploadRefused, Verdict, check_files_hash
from appliance.templates.sdk_steps import SdkTemplate, parse_template
from appliance.tenancy import Principal, current_principal

blueprint = guarded("sdk_templates", __name__, Access.KEY)
# The upload itself carries no API key (the SDKs PUT to the link as to a presigned S3 URL).
uploads_blueprint = guarded("sdk_template_uploads", __name__, Access.PUBLIC)

UPLOAD_PREFIX = "/template-files/"
UPLOAD_LINK_S = 3600
MAX_LOG_ENTRIES = 100
DEFAULT_CPU_COUNT = 1
DEFAULT_MEMORY_MB = 512
DEFAULT_WRITABLE_MB = 1024
LOG_LEVELS = ("debug", "info", "warn", "error")


def _builds() -> TemplateBuilds:
    builds = services().builds
    if builds is None:
        raise ApiError(503, "template builds do not run in this service")
    return builds


def _int(data: dict[str, Any], key: str, default: int) -> int:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{key!r} must be an integer")
    return value


def _query_int(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    try:
        value = default if raw is None else int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be {low}..{high}")
    return value


# Requesting a build.


def _requested_name(data: dict[str, Any]) -> tuple[str, list[str]]:
    """(name, tags) of a build request: `name` (or the deprecated `alias`) with an optional `:tag`."""
    raw = data.get("name") or data.get("alias")
    if not isinstance(raw, str) or not raw:
        raise ApiError(400, "'name' is required: the template's name, optionally with :tag")
    name, tag = split_name_tag(raw)
    # As on E2B: the name alone is its `default` tag; `tags` are more tags for the same build.
    tags = [tag if tag is not None else DEFAULT_TAG, *string_list(data, "tags")]
    try:
        validate_name(name)
        for each in tags:
            validate_tag(each)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from exc
    return name, list(dict.fromkeys(tags))


def _check_name(s: Services, builds: TemplateBuilds, name: str, principal: Principal) -> None:
    """409 for a name another team holds, published or requested (a request reserves it, as on E2B)."""
    try:
        check_name_free(s.config, name, principal.team_id)
    except NameTaken as exc:
        raise ApiError(409, str(exc), error_code="name_taken") from exc
    if any(b.team != principal.team_id for b in builds.sdk_builds.of_template(name)):
        raise ApiError(409, f"the template name {name!r} belongs to another team", error_code="name_taken")


@blueprint.post("/v3/templates")
async def request_build() -> Response:
    s, principal = services(), current_principal()
    builds = _builds()
    data = await request_object(required=True)
    name, tags = _requested_name(data)
    limits = TemplateLimits.from_config(s.config)
    cpu = _int(data, "cpuCount", DEFAULT_CPU_COUNT)
    memory = _int(data, "memoryMB", DEFAULT_MEMORY_MB)
    writable = max(DEFAULT_WRITABLE_MB, _int(data, "minFreeDiskMb", 0))
    try:
        limits.check(TemplateSettings(cpu_count=cpu, memory_mb=memory, writable_layer_mb=writable))
    except ValueError as exc:
        message = str(exc).replace("--cpu", "cpuCount").replace("--memory", "memoryMB")
        raise ApiError(400, message.replace("--writable-layer-size", "minFreeDiskMb")) from exc
    _check_name(s, builds, name, principal)
    build = SdkBuild(str(uuid.uuid4()), name, principal.team_id, tags, cpu, memory, writable)
    builds.sdk_builds.save(build)
    body = {
        "templateID": name,
        "buildID": build.build_id,
        "public": False,
        "names": [name],
        "tags": tags,
        "aliases": [name],
    }
    return json_response(body, 202)


def _owned_name(s: Services, builds: TemplateBuilds, template_id: str, principal: Principal) -> None:
    """404 unless `template_id` names a template the caller may build under (its own or a pending build)."""
    owner = name_owner(s.config, template_id)
    pending = any(principal.owns(b.team) for b in builds.sdk_builds.of_template(template_id))
    if not pending and (owner is None or not principal.owns(owner)):
        raise ApiError(404, f"template '{template_id}' not found")


# Files of COPY steps.


def _signature(key: bytes, team: str, files_hash: str, expires: int) -> str:
    return hmac.new(key, f"{team}\n{files_hash}\n{expires}".encode(), hashlib.sha256).hexdigest()


@blueprint.get("/templates/<template_id>/files/<files_hash>")
async def file_upload_link(template_id: str, files_hash: str) -> Response:
    s, principal = services(), current_principal()
    builds = _builds()
    try:
        check_files_hash(files_hash)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from exc
    _owned_name(s, builds, template_id, principal)
    expires = int(time.time()) + UPLOAD_LINK_S
    signature = _signature(s.upload_key, principal.team_id, files_hash, expires)
    url = (
        f"{request.host_url.rstrip('/')}{UPLOAD_PREFIX}{files_hash}"
        f"?team={quote(principal.team_id, safe='')}&expires={expires}&signature={signature}"
    )
    present = await trio.to_thread.run_sync(builds.uploads.present, principal.team_id, files_hash)
    return json_response({"present": present, "url": url}, 201)


@uploads_blueprint.put(f"{UPLOAD_PREFIX}<files_hash>")
async def upload_files(files_hash: str) -> Response:
    s = services()
    builds = _builds()
    team = request.args.get("team", "")
    try:
        check_files_hash(files_hash)
        expires = int(request.args.get("expires", ""))
    except ValueError:
        raise ApiError(403, "invalid or expired upload link") from None
    expected = _signature(s.upload_key, team, files_hash, expires)
    if not hmac.compare_digest(expected, request.args.get("signature", "")) or expires < time.time():
        raise ApiError(403, "invalid or expired upload link")
    try:
        await builds.uploads.receive(team, files_hash, request.body, request.content_length)
    except UploadRefused as exc:
        raise ApiError(exc.status, exc.message) from exc
    return Response("", status=200)


# Starting a build.


def _visible_build(template_id: str, build_id: str) -> SdkBuild:
    build = _builds().sdk_builds.get(build_id)
    if build is None or build.template != template_id or not current_principal().owns(build.team):
        raise ApiError(404, f"build {build_id} of template '{template_id}' not found")
    return build


async def _check_files(builds: TemplateBuilds, build: SdkBuild, template: SdkTemplate) -> list[str]:
    """Every COPY step's files are uploaded and are what the SDK hashed; returns warnings to log."""
    warnings = []
    js_client = request.headers.get("lang", "").lower() == "js"
    for step in template.steps:
        if step.kind != "COPY" or step.files_hash is None:
            continue
        what = f"step {step.number} ({step.describe()})"
        if not await trio.to_thread.run_sync(builds.uploads.present, build.team, step.files_hash):
            raise ApiError(
                400,
                f"{what}: its files were not uploaded (GET /templates/{build.template}/files/"
                f"{step.files_hash} gives the upload link)",
            )
        verdict = await trio.to_thread.run_sync(
            builds.uploads.verify, build.team, step.files_hash, step.args[0], step.args[1]
        )
        if verdict is Verdict.MATCH:
            continue
        if verdict is Verdict.UNVERIFIABLE and js_client:
            warnings.append(
                f"warning: {what}: filesHash not checked (the JS SDK hashes its filesystem's directory sizes)"
            )
            continue
        await trio.to_thread.run_sync(builds.uploads.discard, build.team, step.files_hash)
        raise ApiError(
            400, f"{what}: the uploaded files do not match filesHash {step.files_hash}; upload them again"
        )
    return warnings


def _settings(build: SdkBuild, template: SdkTemplate) -> TemplateSettings:
    return TemplateSettings(
        writable_layer_mb=build.writable_layer_mb,
        probe_port=ENVD_PORT,
        probe_path="/health",
        cpu_count=build.cpu_count,
        memory_mb=build.memory_mb,
        alias=build.template,
        tags=tuple(build.tags),
        ready_cmd=template.ready_cmd,
    )


@blueprint.post("/v2/templates/<template_id>/builds/<build_id>")
async def start_build(template_id: str, build_id: str) -> Response:
    s, principal = services(), current_principal()
    builds = _builds()
    # The body first: an answer before it is read leaves it in the connection the client reuses.
    data = await request_object(required=True)
    build = _visible_build(template_id, build_id)
    if build.job_id:
        raise ApiError(400, f"build {build_id} was started already: request a new one (POST /v3/templates)")
    try:
        template = parse_template(data)
        if template.from_image is not None:
            check_image_allowed(principal, template.from_image)
    except Refused as exc:
        raise ApiError(exc.status, exc.message) from exc
    except ValueError as exc:
        raise ApiError(400, str(exc)) from exc
    warnings = await _check_files(builds, build, template)
    _check_name(s, builds, build.template, principal)
    shown = {"fromImage": template.from_image, "fromTemplate": template.from_template}
    public = {**shown, "name": build.template, "tags": build.tags, "steps": len(template.steps)}
    request_ = SdkBuildRequest(build.build_id, build.team, template, _settings(build, template))
    job = builds.submit_sdk(request_, {k: v for k, v in public.items() if v is not None}, build.team)
    for line in warnings:
        builds.store.log(job, line)
    build.job_id = job.job_id
    builds.sdk_builds.save(build)
    return Response("", status=202)


# Build status and logs.


@dataclass(frozen=True)
class LogEntry:
    number: int  # the line's number in the job's log: what logsOffset counts
    at: float  # epoch seconds
    line: str

    @property
    def level(self) -> str:
        if self.line.startswith("warning:"):
            return "warn"
        if self.line.startswith(f"{Phase.FAILED.value}:"):
            return "error"
        return "info"

    def body(self) -> dict[str, object]:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.at)) + f".{int(self.at % 1 * 1000):03d}Z"
        return {"timestamp": stamp, "level": self.level, "message": self.line}


def _log_entries(job: BuildJob | None, build: SdkBuild, min_level: int = 0) -> list[LogEntry]:
    """The job's kept log lines at `min_level` or above."""
    if job is None:
        return []
    first = job.log_total - len(job.log)
    untimed = len(job.log) - len(job.log_times)  # lines logged before times were kept
    entries = [
        LogEntry(first + i, job.log_times[i - untimed] if i >= untimed else build.requested_at, line)
        for i, line in enumerate(job.log)
    ]
    return [e for e in entries if LOG_LEVELS.index(e.level) >= min_level]


def _status(job: BuildJob | None) -> str:
    if job is None or job.phase is Phase.QUEUED:
        return "waiting"
    return {Phase.READY: "ready", Phase.FAILED: "error"}.get(job.phase, "building")


def _min_level() -> int:
    level = request.args.get("level")
    if level is None:
        return 0
    if level not in LOG_LEVELS:
        raise ApiError(400, f"level must be one of {', '.join(LOG_LEVELS)}")
    return LOG_LEVELS.index(level)


@blueprint.get("/templates/<template_id>/builds/<build_id>/status")
async def build_status(template_id: str, build_id: str) -> Response:
    build = _visible_build(template_id, build_id)
    offset = _query_int("logsOffset", 0, 0, 1 << 62)
    limit = _query_int("limit", MAX_LOG_ENTRIES, 0, MAX_LOG_ENTRIES)
    job = _builds().job(build.job_id) if build.job_id else None
    shown = [e for e in _log_entries(job, build) if e.number >= offset][:limit]
    level = _min_level()
    body: dict[str, object] = {
        "templateID": template_id,
        "buildID": build_id,
        "status": _status(job),
        "logs": [],
        "logEntries": [e.body() for e in shown if LOG_LEVELS.index(e.level) >= level],
    }
    if job is not None and job.phase is Phase.FAILED:
        output = f"\n{job.console_tail.rstrip()}" if job.console_tail.strip() else ""
        reason: dict[str, object] = {
            "message": job.reason + output,
            "logEntries": [e.body() for e in _log_entries(job, build)[-20:]],
        }
        if job.failed_step:
            reason["step"] = job.failed_step
        body["reason"] = reason
    return json_response(body)


@blueprint.get("/templates/<template_id>/builds/<build_id>/logs")
async def build_logs(template_id: str, build_id: str) -> Response:
    build = _visible_build(template_id, build_id)
    limit = _query_int("limit", MAX_LOG_ENTRIES, 0, MAX_LOG_ENTRIES)
    direction = request.args.get("direction", "forward")
    if direction not in ("forward", "backward"):
        raise ApiError(400, "direction must be forward or backward")
    job = _builds().job(build.job_id) if build.job_id else None
    entries = _log_entries(job, build, _min_level())
    if "cursor" in request.args:  # milliseconds since the epoch
        cursor = _query_int("cursor", 0, 0, 1 << 62) / 1000
        entries = [e for e in entries if (e.at >= cursor if direction == "forward" else e.at <= cursor)]
    if direction == "backward":
        entries.reverse()
    return json_response({"logs": [e.body() for e in entries[:limit]]})
