"""The plain records the layers hand each other, and the `Store` interface that keeps them.

Below every layer that uses them (cubelet, proxy, templates, runtime read them; the
API turns them into E2B bodies; `master/store.py` keeps them in SQLite), so none of
those layers imports another one upwards to read a record.

A built template is `<state_dir>/templates/<template_id>/template.json` (its
`TemplateManifest`): the directory holds `rootfs.ext4` (read-only, shared by every
sandbox of the template) and per-runtime artifacts. The state store mirrors the
manifest so the API can list templates; the file is the source of truth for the cubelet.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from appliance.net.policy import NetworkPolicy
from appliance.tenancy import SYSTEM_TEAM, key_prefix, new_team_id

MANIFEST_NAME = "template.json"
ROOTFS_NAME = "rootfs.ext4"


@dataclass(frozen=True)
class TemplateManifest:
    template_id: str
    directory: Path
    aliases: tuple[str, ...] = ()
    memory_mb: int = 512
    cpu_count: int = 1
    writable_layer_mb: int = 1024  # how much a sandbox may write over the image
    envs: dict[str, str] = field(default_factory=dict)
    start_cmd: tuple[str, ...] = ()  # the image's entrypoint + cmd, started by the guest init
    # A shell command that exits 0 once the start command's service is ready (the SDKs' readyCmd):
    # awaited in every new guest before it is handed over (cubelet/lifecycle.py).
    ready_cmd: str = ""
    workdir: str = "/"
    user: str = "user"  # default user for processes and files
    expose_ports: tuple[int, ...] = (49983, 49999)
    probe_port: int = 49983
    probe_path: str | None = "/health"
    network_defaults: dict[str, object] = field(default_factory=dict)
    source: str = ""  # recipe hash or image digest it was built from
    labels: dict[str, str] = field(default_factory=dict)  # the image's / Dockerfile's LABELs
    created_at: str = ""
    # The team that built it (appliance/tenancy.py); built-in templates, and any from before
    # templates had owners, are the system's: every team may use them, only the admin change them.
    owner: str = SYSTEM_TEAM
    # A filesystem snapshot (appliance/master/snapshots.py): the sandbox it was taken from. Its
    # rootfs is that sandbox's disk at the time; it is never pooled.
    snapshot_of: str = ""
    # The E2B SDKs' buildID of this version (a UUID); "" in manifests from before it: see e2b_build_id.
    build_id: str = ""

    @property
    def rootfs(self) -> Path:
        return self.directory / ROOTFS_NAME

    @property
    def e2b_build_id(self) -> str:
        """The buildID the E2B API reports for this version: its own, else one derived from its id."""
        return self.build_id or str(uuid.uuid5(uuid.NAMESPACE_URL, f"cube-template:{self.template_id}"))

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["directory"] = str(self.directory)
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TemplateManifest:
        data = json.loads(text)
        data["directory"] = Path(data["directory"])
        for key in ("aliases", "start_cmd", "expose_ports"):
            data[key] = tuple(data.get(key, ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / (MANIFEST_NAME + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(self.directory / MANIFEST_NAME)

    @classmethod
    def load(cls, directory: Path) -> TemplateManifest:
        """The template in `directory`: there, whatever directory it was built in (the ISO
        mounts templates built elsewhere; a restored backup may live elsewhere too)."""
        manifest = cls.from_json((directory / MANIFEST_NAME).read_text())
        return dataclasses.replace(manifest, directory=directory)


RUNNING = "running"
PAUSED = "paused"
DEAD = "dead"
LIVE_STATES = (RUNNING, PAUSED)


@dataclass
class SandboxRecord:
    sandbox_id: str
    template_id: str
    alias: str | None
    client_id: str
    state: str
    started_at: float  # unix seconds
    end_at: float  # unix seconds; the E2B timeout deadline
    cpu_count: int
    memory_mb: int
    disk_size_mb: int
    envd_access_token: str
    metadata: dict[str, str] = field(default_factory=dict)
    on_timeout: str = "kill"  # kill | pause
    auto_resume: bool = False
    allow_internet_access: bool = True
    network: dict[str, object] = field(default_factory=dict)  # allowOut / denyOut, as E2B reports them
    console_log: str = ""
    ended_at: float | None = None
    end_reason: str = ""
    team_id: str = SYSTEM_TEAM  # the owner (appliance/tenancy.py)
    # Sent by the SDKs as `e2b-traffic-access-token` to the sandbox's ports other than envd's
    # (the code interpreter's on every call). The guest's code interpreter takes it (or the
    # access token); with `network.allowPublicTraffic: false` at create, the router requires
    # it on every port but envd's (proxy/access.py). None only in records from before it.
    traffic_access_token: str | None = None
    allow_public_traffic: bool = True

    def egress_policy(self) -> NetworkPolicy:
        """The egress policy the sandbox runs with (stored as E2B reports it)."""
        return NetworkPolicy.from_e2b(
            {"allow_internet_access": self.allow_internet_access, "network": self.network}
        )

    def set_egress_policy(self, policy: NetworkPolicy) -> None:
        self.allow_internet_access = policy.allow_internet_access
        self.network = {k: v for k, v in policy.to_e2b().items() if v}


@dataclass(frozen=True)
class ApiKeyRecord:
    key_id: str
    name: str
    prefix: str  # first characters of the key, shown in listings
    created_at: float
    revoked_at: float | None
    last_used_at: float | None
    team_id: str

    @classmethod
    def new(cls, key: str, key_id: str, name: str, team_id: str | None) -> ApiKeyRecord:
        """The record of a key made now, in `team_id`, else in a team of its own."""
        return cls(
            key_id=key_id,
            name=name,
            prefix=key_prefix(key),
            created_at=time.time(),
            revoked_at=None,
            last_used_at=None,
            team_id=team_id or new_team_id(),
        )


@dataclass(frozen=True)
class Event:
    at: float
    sandbox_id: str
    kind: str
    message: str


@dataclass(frozen=True)
class SandboxQuery:
    states: Sequence[str] = LIVE_STATES
    metadata: dict[str, str] = field(default_factory=dict)
    template_id: str | None = None
    started_after: float | None = None
    newest_first: bool = True
    limit: int = 100
    after: tuple[float, str] | None = None  # pagination cursor: (started_at, sandbox_id) of the last item
    team_id: str | None = None  # only this team's sandboxes; None: every team's (the admin's view)


class Store(Protocol):
    def put_sandbox(self, record: SandboxRecord) -> None: ...
    def get_sandbox(self, sandbox_id: str) -> SandboxRecord | None: ...
    def query_sandboxes(self, query: SandboxQuery) -> list[SandboxRecord]: ...
    def count_sandboxes(self, states: Sequence[str], team_id: str) -> int: ...
    def mark_live_sandboxes_dead(self, reason: str) -> list[str]: ...

    def put_template(self, manifest: TemplateManifest) -> None: ...
    def list_templates(self) -> list[TemplateManifest]: ...
    def delete_template(self, template_id: str) -> None: ...

    def create_api_key(self, name: str, team_id: str | None = None) -> tuple[ApiKeyRecord, str]: ...
    def team_exists(self, team_id: str) -> bool: ...
    def list_api_keys(self) -> list[ApiKeyRecord]: ...
    def revoke_api_key(self, key_id: str) -> bool: ...
    def check_api_key(self, key: str) -> ApiKeyRecord | None: ...

    def idempotent_sandbox(self, team_id: str, key: str) -> str | None: ...
    def remember_idempotency_key(self, team_id: str, key: str, sandbox_id: str) -> None: ...

    def add_event(self, sandbox_id: str, kind: str, message: str) -> None: ...
    def events(
        self, sandbox_id: str | None = None, limit: int = 100, team_id: str | None = None
    ) -> list[Event]: ...

    def close(self) -> None: ...
