"""Which templates exist: the manifests under config.templates_dir, mirrored into the store.

The manifest files are the source of truth (template builds write them); the
registry rescans them on demand and resolves names: a template id, one of its
aliases, or one of the E2B SDK defaults that name no template in particular.
"""

from __future__ import annotations

import logging
import shutil

from appliance.config import Config
from appliance.records import MANIFEST_NAME, Store, TemplateManifest
from appliance.templates.catalog import SDK_DEFAULT_TEMPLATE_NAMES
from appliance.tenancy import ADMIN, Principal

log = logging.getLogger(__name__)


class TemplateRegistry:
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self._by_id: dict[str, TemplateManifest] = {}

    def refresh(self) -> dict[str, TemplateManifest]:
        found: dict[str, TemplateManifest] = {}
        if self.config.templates_dir.is_dir():
            for manifest_path in sorted(self.config.templates_dir.glob(f"*/{MANIFEST_NAME}")):
                try:
                    manifest = TemplateManifest.load(manifest_path.parent)
                except (OSError, ValueError, TypeError, KeyError) as exc:
                    log.warning("skipping unreadable template manifest %s: %s", manifest_path, exc)
                    continue
                found[manifest.template_id] = manifest
        mirrored = {t.template_id: t for t in self.store.list_templates()}
        for template_id in mirrored.keys() - found.keys():
            self.store.delete_template(template_id)
        for template_id, manifest in found.items():
            if mirrored.get(template_id) != manifest:
                self.store.put_template(manifest)
        self._by_id = found
        return dict(found)

    def all(self) -> dict[str, TemplateManifest]:
        return dict(self._by_id)

    def visible(self, principal: Principal) -> dict[str, TemplateManifest]:
        """The templates `principal` may see: its team's and the built-in ones (all, for the admin)."""
        return {k: m for k, m in self.refresh().items() if principal.sees(m.owner)}

    def resolve(self, name: str, principal: Principal = ADMIN) -> TemplateManifest | None:
        """A template `principal` may see, by id or alias; the SDK default names map to
        config.default_template. Another team's template is not found."""
        visible = self.visible(principal)
        if name in SDK_DEFAULT_TEMPLATE_NAMES and name not in visible:
            name = self.config.default_template
        if name in visible:
            return visible[name]
        for manifest in visible.values():
            if name in manifest.aliases:
                return manifest
        return None

    def delete(self, template_id: str) -> None:
        manifest = self._by_id.get(template_id)
        root = self.config.templates_dir.resolve()
        if manifest is not None and manifest.directory.resolve().is_relative_to(root):
            shutil.rmtree(manifest.directory, ignore_errors=True)
        self.store.delete_template(template_id)
        self._by_id.pop(template_id, None)
