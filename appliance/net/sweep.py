"""Crash recovery: a record per live sandbox network, swept at the next start.

Each sandbox network writes `<run_dir>/net/<sandbox_id>.json` (its Plan) before
it creates anything and deletes it after teardown. After a crash, the records
left are exactly the networks this service owned, so the sweep never touches
namespaces of another service (or another engineer's test) on the same host.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from appliance.net import links
from appliance.net.addressing import Plan

log = logging.getLogger(__name__)


class Records:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, sandbox_id: str) -> Path:
        return self.directory / f"{sandbox_id}.json"

    def write(self, plan: Plan) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self._path(plan.sandbox_id).with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(plan)))
        tmp.rename(self._path(plan.sandbox_id))

    def delete(self, sandbox_id: str) -> None:
        self._path(sandbox_id).unlink(missing_ok=True)

    def stale(self) -> list[Plan]:
        if not self.directory.is_dir():
            return []
        plans = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                plans.append(Plan(**json.loads(path.read_text())))
            except (ValueError, TypeError) as e:
                log.warning("ignoring unreadable network record %s: %s", path, e)
                path.unlink()
        return plans


def sweep(records: Records) -> list[str]:
    """Remove the netns, veth and tap of every recorded network; return their sandbox ids."""
    swept = []
    for plan in records.stale():
        links.remove(plan)
        records.delete(plan.sandbox_id)
        swept.append(plan.sandbox_id)
    if swept:
        log.warning("swept %d sandbox networks left by a previous run: %s", len(swept), ", ".join(swept))
    return swept
