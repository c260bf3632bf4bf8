"""The paths of sandboxes and what hangs off them: E2B's `/sandboxes`, snapshots, secrets, volumes;
and the public `/health`, `/openapi.json`."""

from __future__ import annotations

from typing import Any

from appliance.api.openapi.common import (
    BOOLEAN,
    INTEGER,
    SANDBOX,
    STRING,
    STRING_MAP,
    UNIX_SECONDS,
    Schema,
    operation,
    path_parameter,
    ref,
)

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
VOLUME = path_parameter("volumeID")


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
    return {**operation(summary, status, response, query=query, **kwargs), "security": [{"VolumeToken": []}]}


LOG_QUERY = {"start": INTEGER, "limit": INTEGER}
CREATE = operation(
    "Create a sandbox", "201", ref("Sandbox"), body=ref("NewSandbox"), errors=("404", "429", "503")
)
CONNECT = operation("Connect to (or resume) a sandbox", "200", ref("Sandbox"), body=TIMEOUT_BODY)
LOGS = operation("The sandbox's console log", "200", {"type": "object"}, query=LOG_QUERY)

PATHS: dict[str, Schema] = {
    "/health": {"get": operation("Service health", "200", {"type": "object"}, errors=(), public=True)},
    "/openapi.json": {"get": operation("This document", "200", {"type": "object"}, errors=(), public=True)},
    "/v2/sandboxes": {
        "post": CREATE,
        "get": operation(
            "List sandboxes", "200", {"type": "array", "items": ref("ListedSandbox")}, query=LIST_QUERY
        ),
    },
    "/sandboxes": {
        "post": CREATE,
        "get": operation(
            "List sandboxes (v1)", "200", {"type": "array"}, query={"state": STRING, "metadata": STRING}
        ),
    },
    "/v2/sandboxes/{sandboxID}/connect": {"parameters": SANDBOX, "post": CONNECT},
    "/sandboxes/{sandboxID}/connect": {"parameters": SANDBOX, "post": CONNECT},
    "/sandboxes/{sandboxID}/resume": {
        "parameters": SANDBOX,
        "post": operation(
            "Resume a paused sandbox", "201", ref("Sandbox"), body=TIMEOUT_BODY, errors=("404", "409")
        ),
    },
    "/sandboxes/{sandboxID}": {
        "parameters": SANDBOX,
        "get": operation("A sandbox", "200", {"type": "object"}),
        "delete": operation("Kill a sandbox", "204"),
    },
    "/sandboxes/{sandboxID}/timeout": {
        "parameters": SANDBOX,
        "post": operation("Set the timeout", "204", body=TIMEOUT_BODY),
    },
    "/sandboxes/{sandboxID}/refreshes": {
        "parameters": SANDBOX,
        "post": operation(
            "Extend the timeout", "204", body={"type": "object", "properties": {"duration": INTEGER}}
        ),
    },
    "/sandboxes/{sandboxID}/pause": {
        "parameters": SANDBOX,
        "post": operation("Pause a sandbox", "204", body={"type": "object"}, errors=("404", "409")),
    },
    "/sandboxes/{sandboxID}/network": {
        "parameters": SANDBOX,
        "put": operation("Replace the egress policy", "204", body=ref("NetworkUpdate")),
    },
    "/sandboxes/{sandboxID}/metrics": {
        "parameters": SANDBOX,
        "get": operation(
            "Metrics in a time range",
            "200",
            {"type": "array"},
            query={"start": UNIX_SECONDS, "end": UNIX_SECONDS},
        ),
    },
    "/sandboxes/metrics": {
        "get": operation(
            "Metrics of several sandboxes", "200", {"type": "object"}, query={"sandbox_ids": STRING}
        )
    },
    "/sandboxes/{sandboxID}/logs": {"parameters": SANDBOX, "get": LOGS},
    "/v2/sandboxes/{sandboxID}/logs": {"parameters": SANDBOX, "get": LOGS},
    "/sandboxes/{sandboxID}/snapshots": {
        "parameters": SANDBOX,
        "post": operation(
            "Snapshot a sandbox (a template of the caller's team)",
            "201",
            ref("SnapshotInfo"),
            body={"type": "object", "properties": {"name": STRING, "memory": BOOLEAN}},
            errors=("404", "409"),
        ),
    },
    "/snapshots": {
        "get": operation(
            "The caller's snapshots",
            "200",
            {"type": "array", "items": ref("SnapshotInfo")},
            query={"sandboxID": STRING, "name": STRING, "limit": INTEGER, "nextToken": STRING},
        )
    },
    "/sandboxes/{sandboxID}/fork": {
        "parameters": SANDBOX,
        "post": operation(
            "Fork a sandbox: one result per requested fork",
            "201",
            {"type": "array", "items": ref("ForkResult")},
            body={"type": "object", "properties": {"timeout": INTEGER, "count": INTEGER}},
        ),
    },
    "/secrets": {
        "get": operation(
            "The team's secrets (never their values)",
            "200",
            {"type": "array", "items": ref("Secret")},
            query={"limit": INTEGER, "nextToken": STRING},
        ),
        "post": operation(
            "Create a secret",
            "201",
            ref("Secret"),
            body=SECRET_BODY,
            errors=("409",),
        ),
    },
    "/secrets/{secretID}": {
        "parameters": path_parameter("secretID"),
        "get": operation("A secret (never its value)", "200", ref("Secret")),
        "post": operation("A new version of a secret", "200", ref("Secret"), body=SECRET_BODY),
        "delete": operation("Delete a secret", "204"),
    },
    "/volumes": {
        "get": operation("The team's volumes", "200", {"type": "array", "items": ref("Volume")}),
        "post": operation(
            "Create a volume",
            "201",
            ref("Volume"),
            body={"type": "object", "required": ["name"], "properties": {"name": STRING}},
            errors=("409",),
        ),
    },
    "/volumes/{volumeID}": {
        "parameters": VOLUME,
        "get": operation("A volume and its content token", "200", ref("Volume")),
        "delete": operation("Destroy a volume", "204"),
    },
    "/volumecontent/{volumeID}/path": {
        "parameters": VOLUME,
        "get": content_operation("An entry's stat", "200", ref("VolumeEntry")),
        "patch": content_operation(
            "Change an entry's owner or mode",
            "200",
            ref("VolumeEntry"),
            body={"type": "object", "properties": {"uid": INTEGER, "gid": INTEGER, "mode": INTEGER}},
        ),
        "delete": content_operation("Delete an entry", "204"),
    },
    "/volumecontent/{volumeID}/dir": {
        "parameters": VOLUME,
        "get": content_operation(
            "A directory listing", "200", {"type": "array", "items": ref("VolumeEntry")}
        ),
        "post": content_operation("Make a directory", "201", ref("VolumeEntry"), errors=("404", "409")),
    },
    "/volumecontent/{volumeID}/file": {
        "parameters": VOLUME,
        "get": content_operation("A file's content", "200"),
        "put": {
            **content_operation("Write a file (the body)", "201", ref("VolumeEntry"), errors=("404", "409")),
            "requestBody": {
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
            },
        },
    },
}
