"""The E2B SDKs' builds: what `POST /v3/templates` asked for under a buildID, and the build job
that runs it once `POST /v2/templates/{id}/builds/{buildID}` starts it.

A build is requested first (name, tags, cpu, memory), its files are uploaded, then it is started
with the step list. Each record is `<state_dir>/sdk-builds/<buildID>.json`; requests that were
never started are dropped a day later (the SDK starts a build right after requesting it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.templates.jobs import utc_now

log = logging.getLogger(__name__)

UNSTARTED_KEPT_S = 24 * 3600


@dataclass
class SdkBuild:
    build_id: str  # a UUID
    template: str  # the template's name: the SDKs' templateID
    team: str
    tags: list[str]  # what the build is published under (catalog.py)
    cpu_count: int
    memory_mb: int
    writable_layer_mb: int
    created_at: str = field(default_factory=utc_now)
    requested_at: float = field(default_factory=time.time)
    job_id: str = ""  # the build job, once started


class SdkBuilds:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.builds: dict[str, SdkBuild] = {}

    def load(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        known = {f.name for f in dataclasses.fields(SdkBuild)}
        for path in sorted(self.directory.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                build = SdkBuild(**{k: v for k, v in data.items() if k in known})
            except (ValueError, TypeError) as exc:
                log.warning("ignored unreadable SDK build record %s: %s", path, exc)
                continue
            if not build.job_id and time.time() - build.requested_at > UNSTARTED_KEPT_S:
                path.unlink(missing_ok=True)
                continue
            self.builds[build.build_id] = build

    def save(self, build: SdkBuild) -> None:
        self.builds[build.build_id] = build
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{build.build_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(build)))
        tmp.replace(path)

    def get(self, build_id: str) -> SdkBuild | None:
        return self.builds.get(build_id)

    def of_template(self, template: str) -> list[SdkBuild]:
        return [b for b in self.builds.values() if b.template == template]
