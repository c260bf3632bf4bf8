"""The OpenAPI 3 description of the control plane, served at `/openapi.json`.

It names every route the app serves (tests/api/test_openapi.py checks that it does):
the E2B routes the SDKs use (PROTOCOL.md §2), the template builds, and `/cube/*`.
"""

from __future__ import annotations

from typing import Any

from appliance import __version__

Schema = dict[str, Any]

STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
BOOLEAN: Schema = {"type": "boolean"}
STRINGS: Schema = {"type": "array", "items": STRING}
STRING_MAP: Schema = {"type": "object", "additionalProperties": STRING}
ERROR_REF = {"$ref": "#/components/schemas/Error"}

SCHEMAS: dict[str, Schema] = {
    "Error": {
        "type": "object",
        "required": ["code", "message"],
        "properties": {"code": INTEGER, "message": STRING, "error_code": STRING},
    },
    "Network": {
        "type": "object",
        "properties": {"allowOut": STRINGS, "denyOut": STRINGS, "allowPublicTraffic": BOOLEAN},
    },
    "NewSandbox": {
        "type": "object",
        "properties": {
            "templateID": STRING,
            "timeout": INTEGER,
            "metadata": STRING_MAP,
            "envVars": STRING_MAP,
            "autoPause": BOOLEAN,
            "autoResume": {"type": "object", "properties": {"enabled": BOOLEAN}},
            "allow_internet_access": BOOLEAN,
            "network": {"$ref": "#/components/schemas/Network"},
        },
    },
    "SnapshotInfo": {
        "type": "object",
        "required": ["snapshotID", "names"],
        "properties": {"snapshotID": STRING, "names": STRINGS},
    },
    "ForkResult": {
        "type": "object",
        "properties": {"sandbox": {"$ref": "#/components/schemas/Sandbox"}, "error": ERROR_REF},
    },
    "Secret": {
        "type": "object",
        "required": ["secretID", "name", "currentVersion", "metadata", "createdAt", "updatedAt"],
        "properties": {
            "secretID": STRING,
            "name": STRING,
            "currentVersion": INTEGER,
            "metadata": STRING_MAP,
            "createdAt": STRING,
            "updatedAt": STRING,
        },
    },
    "Volume": {
        "type": "object",
        "required": ["volumeID", "name"],
        "properties": {"volumeID": STRING, "name": STRING, "token": STRING},
    },
    "VolumeEntry": {
        "type": "object",
        "properties": {
            "name": STRING,
            "type": STRING,
            "path": STRING,
            "size": INTEGER,
            "mode": INTEGER,
            "uid": INTEGER,
            "gid": INTEGER,
            "atime": STRING,
            "mtime": STRING,
            "ctime": STRING,
            "target": STRING,
        },
    },
    "Sandbox": {
        "type": "object",
        "required": ["templateID", "sandboxID", "clientID", "envdVersion"],
        "properties": {
            "templateID": STRING,
            "sandboxID": STRING,
            "clientID": STRING,
            "envdVersion": STRING,
            "alias": {"type": "string", "nullable": True},
            "envdAccessToken": STRING,
            "trafficAccessToken": {"type": "string", "nullable": True},
            "domain": {"type": "string", "nullable": True},
        },
    },
    "ListedSandbox": {
        "type": "object",
        "required": [
            "templateID",
            "sandboxID",
            "clientID",
            "startedAt",
            "endAt",
            "envdVersion",
            "cpuCount",
            "memoryMB",
            "diskSizeMB",
            "state",
        ],
        "properties": {
            "templateID": STRING,
            "sandboxID": STRING,
            "clientID": STRING,
            "startedAt": STRING,
            "endAt": STRING,
            "envdVersion": STRING,
            "cpuCount": INTEGER,
            "memoryMB": INTEGER,
            "diskSizeMB": INTEGER,
            "state": {"type": "string", "enum": ["running", "paused"]},
            "metadata": STRING_MAP,
        },
    },
    "NetworkUpdate": {
        "type": "object",
        "properties": {"allowOut": STRINGS, "denyOut": STRINGS, "allow_internet_access": BOOLEAN},
    },
    "Template": {"type": "object", "required": ["templateID"], "properties": {"templateID": STRING}},
    "BuildJob": {"type": "object", "required": ["job_id"], "properties": {"job_id": STRING}},
}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema) -> Schema:
    return {"content": {"application/json": {"schema": schema}}}


def _responses(status: str, schema: Schema | None = None, *errors: str) -> Schema:
    ok: Schema = {"description": "success"}
    if schema is not None:
        ok.update(_json(schema))
    found: Schema = {status: ok}
    for error in ("400", "401", *errors):
        found[error] = {"description": "error", **_json(ERROR_REF)}
    return found


def _operation(
    summary: str,
    status: str,
    response: Schema | None = None,
    *,
    body: Schema | None = None,
    query: dict[str, Schema] | None = None,
    errors: tuple[str, ...] = ("404",),
    public: bool = False,
) -> Schema:
    operation: Schema = {"summary": summary, "responses": _responses(status, response, *errors)}
    if body is not None:
        operation["requestBody"] = {"required": False, **_json(body)}
    if query:
        operation["parameters"] = [
            {"name": name, "in": "query", "required": False, "schema": schema}
            for name, schema in query.items()
        ]
    if public:
        operation["security"] = []
    return operation


def _path_parameter(name: str) -> list[Schema]:
    return [{"name": name, "in": "path", "required": True, "schema": STRING}]


SANDBOX = _path_parameter("sandboxID")
TIMEOUT_BODY: Schema = {"type": "object", "properties": {"timeout": INTEGER}}
LIST_QUERY = {
    "state": STRING,
    "metadata": STRING,
    "template": STRING,
    "startedAfter": STRING,
    "order": {"type": "string", "enum": ["asc", "desc"]},
    "limit": INTEGER,
    "nextToken": STRING,
}
SECRET_BODY: Schema = {
    "type": "object",
    "required": ["value"],
    "properties": {"name": STRING, "value": STRING, "metadata": STRING_MAP},
}
VOLUME = _path_parameter("volumeID")


def content_operation(summary: str, status: str, response: Schema | None = None, **kwargs: Any) -> Schema:
    """A `/volumecontent` operation: the volume's bearer token, not an API key."""
    query = {
        "path": STRING,
        "uid": INTEGER,
        "gid": INTEGER,
        "mode": INTEGER,
        "force": BOOLEAN,
        "depth": INTEGER,
    }
    return {**_operation(summary, status, response, query=query, **kwargs), "security": [{"VolumeToken": []}]}


LOG_QUERY = {"start": INTEGER, "limit": INTEGER}
CREATE = _operation(
    "Create a sandbox", "201", _ref("Sandbox"), body=_ref("NewSandbox"), errors=("404", "429", "503")
)
CONNECT = _operation("Connect to (or resume) a sandbox", "200", _ref("Sandbox"), body=TIMEOUT_BODY)
LOGS = _operation("The sandbox's console log", "200", {"type": "object"}, query=LOG_QUERY)

PATHS: dict[str, Schema] = {
    "/health": {"get": _operation("Service health", "200", {"type": "object"}, errors=(), public=True)},
    "/openapi.json": {"get": _operation("This document", "200", {"type": "object"}, errors=(), public=True)},
    "/v2/sandboxes": {
        "post": CREATE,
        "get": _operation(
            "List sandboxes", "200", {"type": "array", "items": _ref("ListedSandbox")}, query=LIST_QUERY
        ),
    },
    "/sandboxes": {
        "post": CREATE,
        "get": _operation(
            "List sandboxes (v1)", "200", {"type": "array"}, query={"state": STRING, "metadata": STRING}
        ),
    },
    "/v2/sandboxes/{sandboxID}/connect": {"parameters": SANDBOX, "post": CONNECT},
    "/sandboxes/{sandboxID}/connect": {"parameters": SANDBOX, "post": CONNECT},
    "/sandboxes/{sandboxID}/resume": {
        "parameters": SANDBOX,
        "post": _operation(
            "Resume a paused sandbox", "201", _ref("Sandbox"), body=TIMEOUT_BODY, errors=("404", "409")
        ),
    },
    "/sandboxes/{sandboxID}": {
        "parameters": SANDBOX,
        "get": _operation("A sandbox", "200", {"type": "object"}),
        "delete": _operation("Kill a sandbox", "204"),
    },
    "/sandboxes/{sandboxID}/timeout": {
        "parameters": SANDBOX,
        "post": _operation("Set the timeout", "204", body=TIMEOUT_BODY),
    },
    "/sandboxes/{sandboxID}/refreshes": {
        "parameters": SANDBOX,
        "post": _operation(
            "Extend the timeout", "204", body={"type": "object", "properties": {"duration": INTEGER}}
        ),
    },
    "/sandboxes/{sandboxID}/pause": {
        "parameters": SANDBOX,
        "post": _operation("Pause a sandbox", "204", body={"type": "object"}, errors=("404", "409")),
    },
    "/sandboxes/{sandboxID}/network": {
        "parameters": SANDBOX,
        "put": _operation("Replace the egress policy", "204", body=_ref("NetworkUpdate")),
    },
    "/sandboxes/{sandboxID}/metrics": {
        "parameters": SANDBOX,
        "get": _operation("Metrics", "200", {"type": "array"}, query={"start": INTEGER, "end": INTEGER}),
    },
    "/sandboxes/metrics": {
        "get": _operation(
            "Metrics of several sandboxes", "200", {"type": "object"}, query={"sandbox_ids": STRING}
        )
    },
    "/sandboxes/{sandboxID}/logs": {"parameters": SANDBOX, "get": LOGS},
    "/v2/sandboxes/{sandboxID}/logs": {"parameters": SANDBOX, "get": LOGS},
    "/sandboxes/{sandboxID}/snapshots": {
        "parameters": SANDBOX,
        "post": _operation(
            "Snapshot a sandbox (a template of the caller's team)",
            "201",
            _ref("SnapshotInfo"),
            body={"type": "object", "properties": {"name": STRING, "memory": BOOLEAN}},
            errors=("404", "409"),
        ),
    },
    "/snapshots": {
        "get": _operation(
            "The caller's snapshots",
            "200",
            {"type": "array", "items": _ref("SnapshotInfo")},
            query={"sandboxID": STRING, "name": STRING, "limit": INTEGER, "nextToken": STRING},
        )
    },
    "/sandboxes/{sandboxID}/fork": {
        "parameters": SANDBOX,
        "post": _operation(
            "Fork a sandbox: one result per requested fork",
            "201",
            {"type": "array", "items": _ref("ForkResult")},
            body={"type": "object", "properties": {"timeout": INTEGER, "count": INTEGER}},
        ),
    },
    "/secrets": {
        "get": _operation(
            "The team's secrets (never their values)",
            "200",
            {"type": "array", "items": _ref("Secret")},
            query={"limit": INTEGER, "nextToken": STRING},
        ),
        "post": _operation(
            "Create a secret",
            "201",
            _ref("Secret"),
            body=SECRET_BODY,
            errors=("409",),
        ),
    },
    "/secrets/{secretID}": {
        "parameters": _path_parameter("secretID"),
        "get": _operation("A secret (never its value)", "200", _ref("Secret")),
        "post": _operation("A new version of a secret", "200", _ref("Secret"), body=SECRET_BODY),
        "delete": _operation("Delete a secret", "204"),
    },
    "/volumes": {
        "get": _operation("The team's volumes", "200", {"type": "array", "items": _ref("Volume")}),
        "post": _operation(
            "Create a volume",
            "201",
            _ref("Volume"),
            body={"type": "object", "required": ["name"], "properties": {"name": STRING}},
            errors=("409",),
        ),
    },
    "/volumes/{volumeID}": {
        "parameters": VOLUME,
        "get": _operation("A volume and its content token", "200", _ref("Volume")),
        "delete": _operation("Destroy a volume", "204"),
    },
    "/volumecontent/{volumeID}/path": {
        "parameters": VOLUME,
        "get": content_operation("An entry's stat", "200", _ref("VolumeEntry")),
        "patch": content_operation(
            "Change an entry's owner or mode",
            "200",
            _ref("VolumeEntry"),
            body={"type": "object", "properties": {"uid": INTEGER, "gid": INTEGER, "mode": INTEGER}},
        ),
        "delete": content_operation("Delete an entry", "204"),
    },
    "/volumecontent/{volumeID}/dir": {
        "parameters": VOLUME,
        "get": content_operation(
            "A directory listing", "200", {"type": "array", "items": _ref("VolumeEntry")}
        ),
        "post": content_operation("Make a directory", "201", _ref("VolumeEntry"), errors=("404", "409")),
    },
    "/volumecontent/{volumeID}/file": {
        "parameters": VOLUME,
        "get": content_operation("A file's content", "200"),
        "put": {
            **content_operation("Write a file (the body)", "201", _ref("VolumeEntry"), errors=("404", "409")),
            "requestBody": {
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
            },
        },
    },
    "/templates": {"get": _operation("Templates", "200", {"type": "array", "items": _ref("Template")})},
    "/templates/{templateID}": {
        "parameters": _path_parameter("templateID"),
        "get": _operation("A template", "200", _ref("Template")),
        "delete": _operation(
            "Delete a template", "204", query={"force": BOOLEAN}, errors=("403", "404", "409")
        ),
    },
    "/templates/builds": {
        "post": _operation(
            "Build a template from an image",
            "202",
            _ref("BuildJob"),
            body={"type": "object", "required": ["image"], "properties": {"image": STRING, "alias": STRING}},
            errors=("403", "409"),
        ),
        "get": _operation("Build jobs", "200", {"type": "array"}),
    },
    "/templates/builds/dockerfile": {
        "post": {
            **_operation(
                "Build a template from a Dockerfile and a context (a tar, the body)",
                "202",
                _ref("BuildJob"),
                query={"options": STRING},
                errors=("403", "409", "413"),
            ),
            "requestBody": {
                "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}
            },
        }
    },
    "/templates/builds/{jobID}": {
        "parameters": _path_parameter("jobID"),
        "get": _operation("A build job", "200", _ref("BuildJob"), query={"log_since": INTEGER}),
    },
    "/templates/build-cache": {
        "get": _operation("Build caches (admin)", "200", {"type": "object"}, errors=("403",))
    },
    "/templates/build-cache/prune": {
        "post": _operation(
            "Prune the build caches (admin)",
            "200",
            {"type": "object"},
            body={"type": "object", "properties": {"max_size": STRING, "all": BOOLEAN}},
            errors=("403",),
        )
    },
    "/cube/sandboxes": {
        "get": _operation(
            "Every team's sandboxes (admin)",
            "200",
            {"type": "array"},
            query={"all": STRING, "limit": INTEGER},
            errors=("403",),
        )
    },
    "/cube/sandboxes/{sandboxID}": {
        "parameters": SANDBOX,
        "get": _operation(
            "A sandbox with its events (admin)", "200", {"type": "object"}, errors=("403", "404")
        ),
    },
    "/cube/events": {
        "get": _operation(
            "Events (admin)", "200", {"type": "array"}, query={"limit": INTEGER}, errors=("403",)
        )
    },
    "/cube/keys": {
        "post": _operation(
            "Create an API key (admin)",
            "201",
            {"type": "object"},
            body={"type": "object", "properties": {"name": STRING, "team": STRING}},
            errors=("403", "404"),
        ),
        "get": _operation("API keys (admin)", "200", {"type": "array"}, errors=("403",)),
    },
    "/cube/keys/{keyID}": {
        "parameters": _path_parameter("keyID"),
        "delete": _operation("Revoke an API key (admin)", "204", errors=("403", "404")),
    },
}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "Cube appliance control plane (E2B-compatible)", "version": __version__},
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-KEY"},
                "VolumeToken": {"type": "http", "scheme": "bearer"},
            },
        },
        "security": [{"ApiKey": []}],
        "paths": PATHS,
    }
