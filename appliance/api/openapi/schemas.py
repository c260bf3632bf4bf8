"""The document's component schemas: the bodies the routes take and answer with."""

from __future__ import annotations

from appliance.api.openapi.common import BOOLEAN, ERROR_REF, INTEGER, STRING, STRING_MAP, STRINGS, Schema

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
    # The E2B SDKs' template builder (api/sdk_templates.py).
    "TemplateBuildRequestV3": {
        "type": "object",
        "properties": {
            "name": STRING,
            "alias": STRING,
            "tags": STRINGS,
            "cpuCount": INTEGER,
            "memoryMB": INTEGER,
            "minFreeDiskMb": INTEGER,
        },
    },
    "TemplateRequestResponseV3": {
        "type": "object",
        "required": ["templateID", "buildID", "public", "names", "tags", "aliases"],
        "properties": {
            "templateID": STRING,
            "buildID": STRING,
            "public": BOOLEAN,
            "names": STRINGS,
            "tags": STRINGS,
            "aliases": STRINGS,
        },
    },
    "TemplateBuildFileUpload": {
        "type": "object",
        "required": ["present"],
        "properties": {"present": BOOLEAN, "url": STRING},
    },
    "TemplateStep": {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {"type": "string", "enum": ["RUN", "COPY", "ENV", "WORKDIR", "USER"]},
            "args": STRINGS,
            "filesHash": STRING,
            "force": BOOLEAN,
        },
    },
    "TemplateBuildStartV2": {
        "type": "object",
        "properties": {
            "fromImage": STRING,
            "fromTemplate": STRING,
            "fromImageRegistry": {"type": "object"},
            "force": BOOLEAN,
            "steps": {"type": "array", "items": {"$ref": "#/components/schemas/TemplateStep"}},
            "startCmd": STRING,
            "readyCmd": STRING,
        },
    },
    "BuildLogEntry": {
        "type": "object",
        "required": ["timestamp", "message", "level"],
        "properties": {
            "timestamp": STRING,
            "message": STRING,
            "level": {"type": "string", "enum": ["debug", "info", "warn", "error"]},
        },
    },
    "TemplateBuildInfo": {
        "type": "object",
        "required": ["templateID", "buildID", "status", "logs", "logEntries"],
        "properties": {
            "templateID": STRING,
            "buildID": STRING,
            "status": {"type": "string", "enum": ["building", "waiting", "ready", "error"]},
            "logs": STRINGS,
            "logEntries": {"type": "array", "items": {"$ref": "#/components/schemas/BuildLogEntry"}},
            "reason": {"type": "object"},
        },
    },
    "TemplateTag": {
        "type": "object",
        "required": ["tag", "buildID", "createdAt"],
        "properties": {"tag": STRING, "buildID": STRING, "createdAt": STRING},
    },
}
