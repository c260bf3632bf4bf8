"""Sandboxes carried over a restart onto new code (`cube upgrade`): their disks and ids are kept.

Guests are the service's children, so they cannot outlive it; what a user keeps
is the sandbox: its id, access token, settings and every file on its disk. When
`cube serve` is asked to stop for an upgrade (SIGUSR2 instead of SIGTERM), each
running or paused sandbox is, before the usual shutdown kills it:

1. synced: `sync` runs in the guest through its agent, so the guest's page cache
   is on its disk;
2. frozen (paused), so nothing writes the disk any more;
3. its copy-on-write disk hard-linked into `<state>/carried/<id>/` next to its
   record: the shutdown deletes the sandbox directory, the link keeps the data.

At the next start, before the service reports ready, `restore_carried` boots each
one again with the same id on that disk (`Cubelet.restore`) and removes the
carried entry. Processes and memory do not survive: it is a reboot of the
sandbox, like a cloud VM's host maintenance. Sandboxes whose runtime keeps no COW
disk file (or whose template is gone) end as with any other stop, and say why.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import httpx
import trio

from appliance.cubelet.cubelet import Cubelet, SandboxStartFailed
from appliance.cubelet.envd_client import EnvdError, start_process
from appliance.master.templates import TemplateRegistry
from appliance.records import LIVE_STATES, PAUSED, SandboxQuery, SandboxRecord, Store
from appliance.runtime.base import ENVD_PORT
from appliance.runtime.uml.runtime import COW_FILE, VM_DIR

log = logging.getLogger(__name__)

CARRIED_DIR = "carried"
RECORD_FILE = "record.json"
SYNC_TIMEOUT_S = 60.0


def carried_dir(state_dir: Path) -> Path:
    return state_dir / CARRIED_DIR


async def carry_over(cubelet: Cubelet, store: Store, state_dir: Path) -> list[str]:
    """Keep the disk and record of every live sandbox for `restore_carried`; returns their ids."""
    kept: list[str] = []
    for record in store.query_sandboxes(SandboxQuery(states=LIVE_STATES, limit=1 << 30)):
        live = cubelet.live(record.sandbox_id)
        if live is None or live.instance is None or live.record is None:
            continue
        disk = live.spec.sandbox_dir / VM_DIR / COW_FILE
        if not disk.is_file():
            store.add_event(record.sandbox_id, "carry-over", "not kept: its runtime has no disk file")
            continue
        try:
            if live.record.state == PAUSED:
                await live.instance.resume()
            await sync_guest(live.instance.endpoint(ENVD_PORT), live.envd_headers())
            await live.instance.pause()
        except (OSError, httpx.HTTPError, EnvdError) as exc:
            log.warning("sandbox %s not carried over: %r", record.sandbox_id, exc)
            store.add_event(record.sandbox_id, "carry-over", f"not kept: syncing its disk failed: {exc}")
            continue
        entry = carried_dir(state_dir) / record.sandbox_id
        entry.mkdir(parents=True, exist_ok=True)
        os.link(disk, entry / COW_FILE)
        (entry / RECORD_FILE).write_text(json.dumps(live.record.__dict__))
        store.add_event(record.sandbox_id, "carry-over", "disk kept for the restart")
        kept.append(record.sandbox_id)
    return kept


async def sync_guest(endpoint: tuple[str, int], headers: dict[str, str]) -> None:
    """`sync` in the guest (through its agent): its page cache written to its disk."""
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
