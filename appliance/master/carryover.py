"""Sandboxes carried over a restart by a release from before supervisors: their disks and ids.

Since supervisors (runtime/supervisor), a sandbox simply runs on across a restart or
`cube upgrade`, processes and memory intact, and the next start takes it over
(cubelet: adoption). A release from before them could not keep its guests: asked to
stop for an upgrade (SIGUSR2), it synced, froze and hard-linked each sandbox's
copy-on-write disk into `<state>/carried/<id>/` next to its record. So that an upgrade
from such a release loses no sandbox, the first start of this one still boots each
carried sandbox again with the same id on that disk (`Cubelet.restore`), before it
reports ready, and removes the carried entry. Processes and memory did not survive
those: it is a reboot of the sandbox. One whose template is gone ends, saying why.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import httpx
import trio

from appliance.cubelet.cubelet import Cubelet, SandboxStartFailed
from appliance.cubelet.envd_client import EnvdError, start_process
from appliance.master.templates import TemplateRegistry
from appliance.records import SandboxRecord, Store
from appliance.runtime.uml.runtime import COW_FILE

log = logging.getLogger(__name__)

CARRIED_DIR = "carried"
RECORD_FILE = "record.json"
SYNC_TIMEOUT_S = 60.0


def carried_dir(state_dir: Path) -> Path:
    return state_dir / CARRIED_DIR


async def sync_guest(endpoint: tuple[str, int], headers: dict[str, str]) -> None:
    """`sync` in the guest (through its agent): its page cache written to its disk (snapshots)."""
    host, port = endpoint
    async with httpx.AsyncClient(headers=headers, timeout=SYNC_TIMEOUT_S, trust_env=False) as http:
        code = await start_process(
            http, f"http://{host}:{port}", "root", ["/bin/sync"], {}, "/", _drop, _drop
        )
    if code != 0:
        raise EnvdError(f"sync exited with status {code}")


def _drop(_: bytes) -> None:
    pass


async def restore_carried(
    cubelet: Cubelet, registry: TemplateRegistry, store: Store, state_dir: Path
) -> list[str]:
    """Boot every carried sandbox again (same id, its disk); returns the ids that came back."""
    root = carried_dir(state_dir)
    if not root.is_dir():
        return []
    restored: list[str] = []
    async with trio.open_nursery() as nursery:
        for entry in sorted(root.iterdir()):
            nursery.start_soon(_restore_one, cubelet, registry, store, entry, restored)
    shutil.rmtree(root, ignore_errors=True)
    return restored


async def _restore_one(
    cubelet: Cubelet, registry: TemplateRegistry, store: Store, entry: Path, restored: list[str]
) -> None:
    try:
        record = SandboxRecord(**json.loads((entry / RECORD_FILE).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        log.warning("carried sandbox %s unreadable: %r", entry.name, exc)
        return
    template = registry.resolve(record.template_id)
    if template is None:
        store.add_event(
            record.sandbox_id, "carry-over", f"not restored: template {record.template_id} is gone"
        )
        return
    try:
        await cubelet.restore(record, template, entry / COW_FILE)
    except SandboxStartFailed as exc:
        log.warning("carried sandbox %s did not come back: %s", record.sandbox_id, exc)
        store.add_event(record.sandbox_id, "carry-over", f"not restored: {exc}")
        return
    restored.append(record.sandbox_id)
