"""The paths of templates (the E2B SDKs' builder, Cube's own builds and caches) and the admin's `/cube/*`."""

from __future__ import annotations

from appliance.api.openapi.common import (
    BOOLEAN,
    INTEGER,
    SANDBOX,
    STRING,
    STRINGS,
    Schema,
    operation,
    path_parameter,
    ref,
)

TEMPLATE = path_parameter("templateID")
BUILD = TEMPLATE + path_parameter("buildID")
LEVEL: Schema = {"type": "string", "enum": ["debug", "info", "warn", "error"]}
PATCH_TEMPLATE = operation(
    "Update a template (public: false only)",
    "200",
    {"type": "object", "properties": {"names": STRINGS}},
    body={"type": "object", "properties": {"public": BOOLEAN}},
    errors=("403", "404"),
)


PATHS: dict[str, Schema] = {
    "/templates": {"get": operation("Templates", "200", {"type": "array", "items": ref("Template")})},
    "/templates/{templateID}": {
        "parameters": TEMPLATE,
        "get": operation("A template", "200", ref("Template")),
        "delete": operation(
            "Delete a template (a name: every version of it)",
            "204",
            query={"force": BOOLEAN},
            errors=("403", "404", "409"),
        ),
        "patch": PATCH_TEMPLATE,
    },
    "/v2/templates": {
        "get": operation("Templates", "200", {"type": "array", "items": ref("Template")}),
    },
    "/v2/templates/{templateID}": {"parameters": TEMPLATE, "patch": PATCH_TEMPLATE},
    "/v3/templates": {
        "post": operation(
            "Request a template build (E2B SDK)",
            "202",
            ref("TemplateRequestResponseV3"),
            body=ref("TemplateBuildRequestV3"),
            errors=("409",),
        )
    },
    "/templates/{templateID}/files/{hash}": {
        "parameters": TEMPLATE + path_parameter("hash"),
        "get": operation(
            "Whether a COPY step's files are uploaded; a link to upload them",
            "201",
            ref("TemplateBuildFileUpload"),
        ),
    },
    "/template-files/{hash}": {
        "parameters": path_parameter("hash"),
        "put": {
            **operation(
                "Upload a COPY step's files (the link from /templates/{templateID}/files/{hash})",
                "200",
                query={"team": STRING, "expires": INTEGER, "signature": STRING},
                errors=("403", "413"),
                public=True,
            ),
            "requestBody": {
                "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}
            },
        },
    },
    "/v2/templates/{templateID}/builds/{buildID}": {
        "parameters": BUILD,
        "post": operation(
            "Start a requested build with its steps (E2B SDK)",
            "202",
            body=ref("TemplateBuildStartV2"),
            errors=("403", "404", "409"),
        ),
    },
    "/templates/{templateID}/builds/{buildID}/status": {
        "parameters": BUILD,
        "get": operation(
            "A build's status and log entries from logsOffset",
            "200",
            ref("TemplateBuildInfo"),
            query={"logsOffset": INTEGER, "limit": INTEGER, "level": LEVEL},
        ),
    },
    "/templates/{templateID}/builds/{buildID}/logs": {
        "parameters": BUILD,
        "get": operation(
            "A build's log entries",
            "200",
            {"type": "object", "properties": {"logs": {"type": "array", "items": ref("BuildLogEntry")}}},
            query={
                "cursor": INTEGER,
                "limit": INTEGER,
                "direction": {"type": "string", "enum": ["forward", "backward"]},
                "level": LEVEL,
                "source": STRING,
            },
        ),
    },
    "/templates/aliases/{alias}": {
        "parameters": path_parameter("alias"),
        "get": operation(
            "Whether a template name exists (403: another team's)",
            "200",
            {"type": "object", "properties": {"templateID": STRING, "public": BOOLEAN}},
            errors=("403", "404"),
        ),
    },
    "/templates/tags": {
        "post": operation(
            "Tag a build of a template",
            "201",
            {"type": "object", "properties": {"tags": STRINGS, "buildID": STRING}},
            body={"type": "object", "properties": {"target": STRING, "tags": STRINGS}},
            errors=("403", "404"),
        ),
        "delete": operation(
            "Remove tags of a template",
            "204",
            body={"type": "object", "properties": {"name": STRING, "tags": STRINGS}},
            errors=("403", "404"),
        ),
    },
    "/templates/{templateID}/tags": {
        "parameters": TEMPLATE,
        "get": operation("A template's tags", "200", {"type": "array", "items": ref("TemplateTag")}),
    },
    "/templates/builds": {
        "post": operation(
            "Build a template from an image",
            "202",
            ref("BuildJob"),
            body={"type": "object", "required": ["image"], "properties": {"image": STRING, "alias": STRING}},
            errors=("403", "409"),
        ),
        "get": operation("Build jobs", "200", {"type": "array"}),
    },
    "/templates/builds/dockerfile": {
        "post": {
            **operation(
                "Build a template from a Dockerfile and a context (a tar, the body)",
                "202",
                ref("BuildJob"),
                query={"options": STRING},
                errors=("403", "409", "413"),
            ),
            "requestBody": {
                "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}
            },
        }
    },
    "/templates/builds/{jobID}": {
        "parameters": path_parameter("jobID"),
        "get": operation("A build job", "200", ref("BuildJob"), query={"log_since": INTEGER}),
    },
    "/templates/build-cache": {
        "get": operation("Build caches (admin)", "200", {"type": "object"}, errors=("403",))
    },
    "/templates/build-cache/prune": {
        "post": operation(
            "Prune the build caches (admin)",
            "200",
            {"type": "object"},
            body={"type": "object", "properties": {"max_size": STRING, "all": BOOLEAN}},
            errors=("403",),
        )
    },
    "/cube/sandboxes": {
        "get": operation(
            "Every team's sandboxes (admin)",
            "200",
            {"type": "array"},
            query={"all": STRING, "limit": INTEGER},
            errors=("403",),
        )
    },
    "/cube/sandboxes/{sandboxID}": {
        "parameters": SANDBOX,
        "get": operation(
            "A sandbox with its events (admin)", "200", {"type": "object"}, errors=("403", "404")
        ),
    },
    "/cube/events": {
        "get": operation(
            "Events (admin)", "200", {"type": "array"}, query={"limit": INTEGER}, errors=("403",)
        )
    },
    "/cube/keys": {
        "post": operation(
            "Create an API key (admin)",
            "201",
            {"type": "object"},
            body={"type": "object", "properties": {"name": STRING, "team": STRING}},
            errors=("403", "404"),
        ),
        "get": operation("API keys (admin)", "200", {"type": "array"}, errors=("403",)),
    },
    "/cube/keys/{keyID}": {
        "parameters": path_parameter("keyID"),
        "delete": operation("Revoke an API key (admin)", "204", errors=("403", "404")),
    },
}
