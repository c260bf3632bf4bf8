"""The template registry's rescan (every create resolves its template through it): a manifest
is read again only when its file changed, and the store's mirror follows every change."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from appliance.config import Config
from appliance.master.store import SqliteStore
from appliance.master.templates import TemplateRegistry
from appliance.records import TemplateManifest


def manifest(config: Config, template_id: str, aliases: tuple[str, ...] = ()) -> TemplateManifest:
    return TemplateManifest(
        template_id=template_id,
        directory=config.templates_dir / template_id,
        aliases=aliases,
        memory_mb=256,
        created_at="2026-01-01T00:00:00Z",
    )


def test_manifests_are_read_again_only_when_changed_and_mirrored(
    service_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteStore(service_config.db_path)
    reads: list[Path] = []
    load = TemplateManifest.load
    monkeypatch.setattr(TemplateManifest, "load", lambda d: reads.append(d) or load(d))
    try:
        registry = TemplateRegistry(service_config, store)
        first = manifest(service_config, "one", ("uno",))
        first.save()
        assert set(registry.refresh()) == {"code-interpreter", "one"}
        reads.clear()
        for _ in range(3):
            assert registry.resolve("uno") is not None
        assert reads == []  # nothing changed: nothing read
        changed = dataclasses.replace(first, aliases=("eins",))
        changed.save()
        assert registry.resolve("eins") == changed and registry.resolve("uno") is None
        assert reads == [first.directory]
        assert {t.template_id: t for t in store.list_templates()}["one"] == changed
        shutil.rmtree(first.directory)
        assert set(registry.refresh()) == {"code-interpreter"}
        assert [t.template_id for t in store.list_templates()] == ["code-interpreter"]
    finally:
        store.close()


def test_a_store_mirror_of_a_previous_run_is_corrected_at_the_first_rescan(service_config: Config) -> None:
    store = SqliteStore(service_config.db_path)
    try:
        store.put_template(manifest(service_config, "deleted-while-stopped"))
        assert set(TemplateRegistry(service_config, store).refresh()) == {"code-interpreter"}
        assert [t.template_id for t in store.list_templates()] == ["code-interpreter"]
    finally:
        store.close()
