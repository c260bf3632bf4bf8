"""The JSON the control plane answers with: E2B's models in camelCase (PROTOCOL.md §2), admin views."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TypeVar

from quart import Response

from appliance.cubelet.cubelet import ENVD_VERSION, Cubelet, rfc3339
from appliance.records import Event, SandboxRecord, TemplateManifest
from appliance.tenancy import SYSTEM_TEAM


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(data), status=status, content_type="application/json", headers=headers)


def no_content() -> Response:
    return Response("", status=204)


Item = TypeVar("Item")


def id_page(
    found: Sequence[Item],
    id_of: Callable[[Item], str],
    body: Callable[[Item], object],
    limit: int,
    after: str,
) -> Response:
    """One page of `found` (in its order): at most `limit` items after the one whose id is `after`
    (the previous page's X-Next-Token; none if that id is gone), and the header naming the page's
    last item when more follow."""
    if after:
        ids = [id_of(item) for item in found]
        found = found[ids.index(after) + 1 :] if after in ids else []
    page = found[:limit]
    response = json_response([body(item) for item in page])
    if len(found) > limit:
        response.headers["X-Next-Token"] = id_of(page[-1])
    return response


def created_body(record: SandboxRecord) -> dict[str, object]:
    return {
        "templateID": record.template_id,
        "sandboxID": record.sandbox_id,
        "clientID": record.client_id,
        "envdVersion": ENVD_VERSION,
        "alias": record.alias,
        "envdAccessToken": record.envd_access_token,
        "trafficAccessToken": record.traffic_access_token,
        "domain": None,
    }


def listed_body(record: SandboxRecord) -> dict[str, object]:
    return {
        "templateID": record.template_id,
        "alias": record.alias,
        "sandboxID": record.sandbox_id,
        "clientID": record.client_id,
        "startedAt": rfc3339(record.started_at),
        "endAt": rfc3339(record.end_at),
        "envdVersion": ENVD_VERSION,
        "cpuCount": record.cpu_count,
        "memoryMB": record.memory_mb,
        "diskSizeMB": record.disk_size_mb,
        "state": record.state,
        "metadata": record.metadata,
    }


def network_body(record: SandboxRecord) -> dict[str, object]:
    network = dict(record.network)
    if not record.allow_public_traffic:
        network["allowPublicTraffic"] = False
    return network


def detail_body(record: SandboxRecord) -> dict[str, object]:
    return {
        **listed_body(record),
        "envdAccessToken": record.envd_access_token,
        "trafficAccessToken": record.traffic_access_token,
        "domain": None,
        "allowInternetAccess": record.allow_internet_access,
        "network": network_body(record),
        "lifecycle": {"autoResume": record.auto_resume, "onTimeout": record.on_timeout},
    }


def admin_sandbox_body(record: SandboxRecord) -> dict[str, object]:
    body = listed_body(record)
    body.pop("envdVersion")
    body.update(
        {
            "teamID": record.team_id,
            "endedAt": rfc3339(record.ended_at) if record.ended_at else None,
            "endReason": record.end_reason,
            "consoleLog": record.console_log,
        }
    )
    return body


def event_body(event: Event) -> dict[str, object]:
    return {
        "at": rfc3339(event.at),
        "sandboxID": event.sandbox_id,
        "kind": event.kind,
        "message": event.message,
    }


def template_body(manifest: TemplateManifest, cubelet: Cubelet) -> dict[str, object]:
    created = manifest.created_at or rfc3339(
        manifest.directory.stat().st_mtime if manifest.directory.exists() else 0
    )
    return {
        "templateID": manifest.template_id,
        "buildID": manifest.e2b_build_id,
        "cpuCount": manifest.cpu_count,
        "memoryMB": manifest.memory_mb,
        "diskSizeMB": manifest.writable_layer_mb,
        "public": manifest.owner == SYSTEM_TEAM,  # built in: every team may use it
        "aliases": list(manifest.aliases),
        "names": [manifest.template_id, *manifest.aliases],
        "createdAt": created,
        "updatedAt": created,
        "createdBy": None,
        "lastSpawnedAt": None,
        "spawnCount": 0,
        "buildCount": 1,
        "buildStatus": "ready",
        "envdVersion": ENVD_VERSION,
        "runningSandboxes": cubelet.live_count(manifest.template_id),
        "warmInstances": cubelet.pooled_count(manifest.template_id),
        "warmPool": cubelet.pool_state(manifest.template_id, manifest),  # target / ready / booting
    }


def template_detail_body(manifest: TemplateManifest, cubelet: Cubelet) -> dict[str, object]:
    body = template_body(manifest, cubelet)
    body["builds"] = [
        {
            "buildID": body["buildID"],
            "status": "ready",
            "createdAt": body["createdAt"],
            "updatedAt": body["updatedAt"],
            "cpuCount": body["cpuCount"],
            "memoryMB": body["memoryMB"],
            "diskSizeMB": body["diskSizeMB"],
            "envdVersion": ENVD_VERSION,
        }
    ]
    return body
