"""The build caches' size cap: least recently used first, never what a running build uses;
`cube tpl cache list|prune` against a served build service."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import trio
from registry_world import Images
from served_builds import Served, run_cli

from appliance.cli.templates import cache
from appliance.config import Config
from appliance.templates.build_caches import BuildCaches
from appliance.templates.layer_cache import LayerCache
from appliance.templates.requests import ImageBuildRequest
from appliance.templates.step_cache import StepCache

MIB = 1 << 20


def _entry(path: Path, mtime: float, size: int = MIB, directory: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        (path / "usr").mkdir(parents=True)
        (path / "usr" / "data").write_bytes(os.urandom(size))
        (path / "usr" / "same").hardlink_to(path / "usr" / "data")  # counted once
    else:
        path.write_bytes(os.urandom(size))
    os.utime(path, (mtime, mtime))


def test_lru_eviction_under_a_cap_spares_running_builds(scratch: Path) -> None:
    cache_dir = scratch / "cache"
    layers, steps = cache_dir / "layers" / "sha256", cache_dir / "build-steps"
    now = time.time()
    _entry(layers / ("a" * 64), now - 500)
    _entry(layers / ("b" * 64 + ".partial"), now - 600)
    _entry(steps / "step-old", now - 400, directory=True)
    _entry(layers / ("c" * 64), now - 300)
    _entry(steps / "step-new", now - 200, directory=True)
    running: dict[str, float | None] = {"since": None}
    caches = BuildCaches(cache_dir, lambda: running["since"])

    entries = caches.entries()
    assert [e.name for e in entries] == [
        "sha256:" + "b" * 64 + ".partial",
        "sha256:" + "a" * 64,
        "step-old",
        "sha256:" + "c" * 64,
        "step-new",
    ]
    step_new = next(e for e in entries if e.name == "step-new")
    assert MIB <= step_new.size_bytes < 2 * MIB, "a hardlinked file counts once"
    total = sum(e.size_bytes for e in entries)

    # A hit makes an entry the most recently used.
    assert StepCache(steps).has("step-old")
    assert LayerCache(cache_dir / "layers").has("sha256:" + "a" * 64)
    assert {e.name for e in caches.entries()[-2:]} == {"step-old", "sha256:" + "a" * 64}

    removed, kept = caches.prune(total - 1)
    assert [e.name for e in removed] == ["sha256:" + "b" * 64 + ".partial"], "least recently used first"
    assert not (layers / ("b" * 64 + ".partial")).exists()

    # A build that started 250 s ago may use step-new, step-old and a (used since): they stay.
    running["since"] = now - 250
    assert {e.name for e in caches.entries() if e.in_use} == {"step-new", "step-old", "sha256:" + "a" * 64}
    removed, kept = caches.prune(0)
    assert [e.name for e in removed] == ["sha256:" + "c" * 64]
    assert sorted(e.name for e in kept) == ["sha256:" + "a" * 64, "step-new", "step-old"]
    _entry(layers / ("d" * 64 + ".partial"), now - 900)
    assert next(e for e in caches.entries() if e.name.startswith("sha256:d")).in_use, "downloads in flight"

    running["since"] = None
    removed, kept = caches.prune(0)
    assert len(removed) == 4 and kept == []
    assert list(steps.iterdir()) == [] and list(layers.iterdir()) == []


async def _wait_for(served: Served, job_id: str, phases: tuple[str, ...]) -> None:
    with trio.fail_after(60):
        while (job := served.builds.job(job_id)) is None or job.phase.value not in phases:
            await trio.sleep(0.05)


@pytest.mark.root
async def test_cache_list_and_prune_commands(served: Served, config: Config, images: Images) -> None:
    first = served.builds.submit_image(
        ImageBuildRequest.from_json({"image": images.multi, "writable_layer_size": "32M"}), {}
    )
    await _wait_for(served, first.job_id, ("READY",))
    listed = await trio.to_thread.run_sync(run_cli, served, config, cache, ["list", "--json"])
    assert listed.exit_code == 0, listed.output
    data = json.loads(listed.output)
    assert sorted(e["name"] for e in data["entries"]) == sorted(images.multi_layer_digests)
    assert data["max_bytes"] == 20 << 30 and data["total_bytes"] > 0
    table = await trio.to_thread.run_sync(run_cli, served, config, cache, ["list"])
    assert table.output.splitlines()[0].split() == ["KIND", "NAME", "SIZE", "LAST_USED", "IN_USE"]
    assert "total " in table.output and "of 20.0 GiB allowed" in table.output

    # A second build stays in PROBING (its guest never answers) while the cache is pruned.
    await trio.sleep(0.2)
    served.builds.sandboxes.answer_probe = False  # type: ignore[attr-defined]
    second = served.builds.submit_image(
        ImageBuildRequest.from_json(
            {"image": images.multiarch, "writable_layer_size": "32M", "probe_timeout_s": 30, "probe_port": 9}
        ),
        {},
    )
    await _wait_for(served, second.job_id, ("PROBING",))
    pruned = await trio.to_thread.run_sync(run_cli, served, config, cache, ["prune", "--all", "--json"])
    assert pruned.exit_code == 0, pruned.output
    result = json.loads(pruned.output)
    assert sorted(e["name"] for e in result["removed"]) == sorted(images.multi_layer_digests)
    assert result["kept_in_use"] == 1 and result["freed_bytes"] > 0, "the running build's layer stays"
    remaining = json.loads(
        (await trio.to_thread.run_sync(run_cli, served, config, cache, ["list", "--json"])).output
    )
    assert [e["in_use"] for e in remaining["entries"]] == [True]
    text = await trio.to_thread.run_sync(run_cli, served, config, cache, ["prune", "--max-size", "1G"])
    assert text.exit_code == 0 and "(none)" in text.output and "1 entries in use" in text.output
