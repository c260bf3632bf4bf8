"""Which templates exist: the manifests under config.templates_dir, mirrored into the store.

The manifest files are the source of truth (template builds write them); the
registry rescans them on demand and resolves names: a template id, one of its
aliases, or one of the E2B SDK defaults that name no template in particular.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from appliance.config import Config
from appliance.records import MANIFEST_NAME, Store, TemplateManifest
from appliance.templates.catalog import (
    DEFAULT_TAG,
    SDK_DEFAULT_TEMPLATE_NAMES,
    forget_template,
    resolve_tag,
    split_name_tag,
)
from appliance.tenancy import ADMIN, Principal

log = logging.getLogger(__name__)


class TemplateRegistry:
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self._by_id: dict[str, TemplateManifest] = {}
        # Each manifest as last read, by its file's identity: every create resolves its template
        # (a rescan), and reading and parsing every manifest, then comparing each with the store's
        # copy, cost more than the rest of the rescan. A build or an edit writes the file anew
        # (another inode, mtime or size), so it is read again.
        self._read: dict[Path, tuple[tuple[int, int, int], TemplateManifest]] = {}
        self._mirrored = False  # the store's copy matched the files once (a previous run's may not)

    def refresh(self) -> dict[str, TemplateManifest]:
        found: dict[str, TemplateManifest] = {}
        read = self._read
        self._read = {}
        if self.config.templates_dir.is_dir():
            for manifest_path in sorted(self.config.templates_dir.glob(f"*/{MANIFEST_NAME}")):
                manifest = self._manifest(manifest_path, read.get(manifest_path))
                if manifest is not None:
                    found[manifest.template_id] = manifest
        if not self._mirrored or self._read != read:  # one read anew, or gone: mirror the change
            mirrored = {t.template_id: t for t in self.store.list_templates()}
            for template_id in mirrored.keys() - found.keys():
                self.store.delete_template(template_id)
            for template_id, manifest in found.items():
                if mirrored.get(template_id) != manifest:
                    self.store.put_template(manifest)
            self._mirrored = True
        self._by_id = found
        return dict(found)

    def _manifest(
        self, path: Path, before: tuple[tuple[int, int, int], TemplateManifest] | None
    ) -> TemplateManifest | None:
        """The manifest at `path`, read again only if its file changed; None if unreadable."""
        try:
            stat = path.stat()
            identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if before is not None and before[0] == identity:
                manifest = before[1]
            else:
                manifest = TemplateManifest.load(path.parent)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("skipping unreadable template manifest %s: %s", path, exc)
            return None
        self._read[path] = (identity, manifest)
        return manifest

    def all(self) -> dict[str, TemplateManifest]:
        return dict(self._by_id)

    def visible(self, principal: Principal) -> dict[str, TemplateManifest]:
        """The templates `principal` may see: its team's and the built-in ones (all, for the admin)."""
        return {k: m for k, m in self.refresh().items() if principal.sees(m.owner)}

    def resolve(self, name: str, principal: Principal = ADMIN) -> TemplateManifest | None:
        """A template `principal` may see, by id, alias or `alias:tag`; the SDK default names map to
        config.default_template. Another team's template is not found."""
        visible = self.visible(principal)
        alias, tag = split_name_tag(name)
        if tag is not None:
            tagged = resolve_tag(self.config, alias, tag)
            if tagged is not None or tag != DEFAULT_TAG:
                return visible.get(tagged) if tagged is not None else None
            name = alias  # `<id>:default` of a template without tags: the template itself
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
        forget_template(self.config, template_id)
        self.store.delete_template(template_id)
        self._by_id.pop(template_id, None)
