"""Crash recovery: a record per live sandbox network, swept at the next start.

Each sandbox network writes `<run_dir>/net/<sandbox_id>.json` (its Plan) before
it creates anything and deletes it after teardown. After a crash, the records
left are exactly the networks this service owned, so the sweep never touches
namespaces of another service (or another engineer's test) on the same host.

A network whose guest outlives the service (its supervisor, runtime/supervisor)
names that process as its owner in the record (`Records.set_owner`: pid and start
time, appliance/process_identity.py). The sweep keeps the networks whose owner
still runs, for the next service to re-adopt, and removes the rest: no network is
left without a live owner.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from appliance.net import links
from appliance.net.addressing import Plan
from appliance.process_identity import ProcessIdentity

log = logging.getLogger(__name__)

_OWNER = "owner"


class Records:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, sandbox_id: str) -> Path:
        return self.directory / f"{sandbox_id}.json"

    def write(self, plan: Plan, owner: ProcessIdentity | None = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        record: dict[str, object] = dict(dataclasses.asdict(plan))
        if owner is not None:
            record[_OWNER] = owner.to_json()
        tmp = self._path(plan.sandbox_id).with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.rename(self._path(plan.sandbox_id))

    def delete(self, sandbox_id: str) -> None:
        self._path(sandbox_id).unlink(missing_ok=True)

    def stale(self) -> list[tuple[Plan, ProcessIdentity | None]]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                owner = ProcessIdentity.from_json(record.pop(_OWNER)) if _OWNER in record else None
                found.append((Plan(**record), owner))
            except (ValueError, TypeError, AttributeError) as e:
                log.warning("ignoring unreadable network record %s: %s", path, e)
                path.unlink()
        return found


def sweep(records: Records) -> dict[str, Plan]:
    """Remove the netns, veth and tap of every recorded network without a live owner; return
    the plans of those whose owner runs on (kept, by sandbox id)."""
    swept = []
    kept: dict[str, Plan] = {}
    for plan, owner in records.stale():
        if owner is not None and owner.alive():
            kept[plan.sandbox_id] = plan
            continue
        links.remove(plan)
        records.delete(plan.sandbox_id)
        swept.append(plan.sandbox_id)
    if swept:
        log.warning("swept %d sandbox networks left by a previous run: %s", len(swept), ", ".join(swept))
    if kept:
        log.info("kept %d sandbox networks whose guests run on: %s", len(kept), ", ".join(kept))
    return kept
