"""Template build jobs: phase, progress, reason, log; persisted as JSON under `<state_dir>/template-builds`.

The API and `tpl watch` read the in-memory job; the file makes the history
survive a restart. A job that was running when the service stopped is marked
FAILED on the next start: nothing resumes a half-built template.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from appliance.tenancy import SYSTEM_TEAM

log = logging.getLogger(__name__)

LOG_LINES_KEPT = 500
_SAVE_INTERVAL_S = 1.0


class BuildStepFailed(Exception):
    """A build failed in one of its steps: `step` is the E2B SDKs' name for it ("base", "1", "2"...,
    "finalize"; "" for none), `console_tail` the output that shows why (a RUN's, the guest's console)."""

    def __init__(self, message: str, console_tail: str = "", step: str = "") -> None:
        super().__init__(message)
        self.console_tail = console_tail
        self.step = step


class Phase(StrEnum):
    QUEUED = "QUEUED"
    PULLING = "PULLING"
    UNPACKING = "UNPACKING"
    BUILDING = "BUILDING"
    BOOTING = "BOOTING"
    PROBING = "PROBING"
    SNAPSHOTTING = "SNAPSHOTTING"  # kvm: the booted guest is snapshotted
    POOLING = "POOLING"  # uml: warm instances are started
    READY = "READY"
    FAILED = "FAILED"


TERMINAL_PHASES = (Phase.READY, Phase.FAILED)

# Where each phase starts on the job's 0..100 progress bar.
PHASE_PROGRESS = {
    Phase.QUEUED: 0.0,
    Phase.PULLING: 0.0,
    Phase.UNPACKING: 45.0,
    Phase.BUILDING: 60.0,
    Phase.BOOTING: 70.0,
    Phase.PROBING: 80.0,
    Phase.SNAPSHOTTING: 90.0,
    Phase.POOLING: 90.0,
    Phase.READY: 100.0,
    Phase.FAILED: 100.0,
}


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_job_id() -> str:
    return "job-" + secrets.token_hex(8)


@dataclass
class BuildJob:
    job_id: str
    kind: str  # "image" | "dockerfile"
    request: dict[str, Any]  # what was asked, secrets removed
    template_id: str
    phase: Phase = Phase.QUEUED
    progress: float = 0.0
    message: str = ""
    reason: str = ""
    console_tail: str = ""
    layers: list[dict[str, Any]] = field(default_factory=list)  # digest, size, done, cached
    log: list[str] = field(default_factory=list)  # the last LOG_LINES_KEPT lines
    log_total: int = 0  # lines ever logged: `log[0]` is line number log_total - len(log)
    # When each line of `log` was logged (epoch seconds; shorter in jobs from before it).
    log_times: list[float] = field(default_factory=list)
    created_at: str = field(default_factory=utc_now)
    updated_at: str = field(default_factory=utc_now)
    # The team that asked (appliance/tenancy.py): only it (and the admin) sees the job, and the
    # template belongs to it. Jobs recorded before teams existed are the system's (admin-only).
    team: str = SYSTEM_TEAM
    # Which step failed, for the E2B SDK's BuildException: a step's number ("1" is the first after
    # the base), "base" or "finalize"; "" when the build did not fail or names no step.
    failed_step: str = ""

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL_PHASES

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def view(self, log_since: int = 0) -> dict[str, object]:
        """The API shape: everything but older log lines than `log_since`."""
        data = self.to_dict()
        del data["log_times"]
        first = self.log_total - len(self.log)
        data["log"] = self.log[max(0, log_since - first) :]
        data["log_start"] = max(first, min(log_since, self.log_total))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> BuildJob:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["phase"] = Phase(str(values.get("phase", Phase.FAILED)))
        return cls(**values)  # type: ignore[arg-type]


class JobStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.jobs: dict[str, BuildJob] = {}
        self._saved_at: dict[str, float] = {}

    def load(self) -> None:
        """Read every job; fail the ones a previous service run left unfinished."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.directory.glob("job-*.json")):
            try:
                job = BuildJob.from_dict(json.loads(path.read_text()))
            except (ValueError, TypeError) as exc:
                path.rename(path.with_suffix(".corrupt"))
                log.warning("ignored unreadable job file %s: %s", path, exc)
                continue
            self.jobs[job.job_id] = job
            if not job.finished:
                self.fail(job, "the service stopped while this build was running; start it again")

    def add(self, job: BuildJob) -> None:
        self.jobs[job.job_id] = job
        self.save(job, force=True)

    def save(self, job: BuildJob, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._saved_at.get(job.job_id, 0.0) < _SAVE_INTERVAL_S:
            return
        self._saved_at[job.job_id] = now
        job.updated_at = utc_now()
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f"{job.job_id}.json.tmp"
        tmp.write_text(json.dumps(job.to_dict(), indent=1))
        tmp.replace(self.directory / f"{job.job_id}.json")

    def set_phase(self, job: BuildJob, phase: Phase, message: str = "") -> None:
        job.phase = phase
        job.progress = max(job.progress, PHASE_PROGRESS[phase])
        job.message = message or phase.value.lower()
        self.log(job, f"{phase.value}: {job.message}")
        self.save(job, force=True)

    def set_progress(self, job: BuildJob, progress: float, message: str | None = None) -> None:
        job.progress = round(min(100.0, max(job.progress, progress)), 1)
        if message is not None:
            job.message = message
        self.save(job)

    def log(self, job: BuildJob, line: str) -> None:
        job.log.append(line)
        job.log_times.append(time.time())
        job.log_total += 1
        del job.log[:-LOG_LINES_KEPT]
        del job.log_times[:-LOG_LINES_KEPT]
        self.save(job)

    def fail(self, job: BuildJob, reason: str, console_tail: str = "", step: str = "") -> None:
        job.reason = reason
        job.console_tail = console_tail
        job.failed_step = step
        self.set_phase(job, Phase.FAILED, reason)

    def get(self, job_id: str) -> BuildJob | None:
        return self.jobs.get(job_id)
