"""Templates on disk: lookup by id or alias, versions, publish, delete.

Each build produces a new immutable template directory `<templates_dir>/<id>/`
(a `.building` marker sits in it until the build is READY, and lookups skip
it). An alias names the current version of a template; a rebuild under the
same alias adds a version and moves the alias, while the previous version stays
on disk for the sandboxes still running from it until `collect_superseded`
finds it unused. `aliases.json` records alias -> versions.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypedDict

from appliance.config import Config
from appliance.records import MANIFEST_NAME, TemplateManifest
from appliance.templates.jobs import utc_now
from appliance.tenancy import SYSTEM_TEAM, team_sees

BUILDING_MARKER = ".building"
ALIASES_FILE = "aliases.json"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# Path segments of the build API that a template name must not shadow.
RESERVED_NAMES = frozenset({"builds", "aliases"})
# Names the SDKs send when the user names no template (PROTOCOL.md §2.2): the default template's.
SDK_DEFAULT_TEMPLATE_NAMES = frozenset({"base", "code-interpreter-v1"})


class AliasVersion(TypedDict):
    version: int
    template_id: str
    created_at: str


class AliasEntry(TypedDict, total=False):
    template_id: str  # the current version
    versions: list[AliasVersion]  # oldest first; superseded ones until collected
    owner: str  # the team whose builds may move it (absent in records from before teams: the system)


class TemplateNotFound(LookupError):
    pass


class TemplateInUse(Exception):
    pass


class NameTaken(ValueError):
    """The template name (id or alias) belongs to another team, or is a built-in template's."""


def name_owner(config: Config, name: str) -> str | None:
    """Who holds a template name: the owner of the template with that id or alias (the system for
    the default template's names), or None while it is free."""
    if name in SDK_DEFAULT_TEMPLATE_NAMES or name == config.default_template:
        return SYSTEM_TEAM
    entry = load_aliases(config).get(name)
    if entry is not None:
        return entry.get("owner", SYSTEM_TEAM)
    for manifest in list_templates(config):
        if name == manifest.template_id or name in manifest.aliases:
            return manifest.owner
    return None


def check_name_free(config: Config, name: str, owner: str) -> None:
    """Raises NameTaken unless `name` is free or already `owner`'s (a rebuild moves its alias)."""
    holder = name_owner(config, name)
    if holder is not None and holder != owner:
        whose = "a built-in template" if holder == SYSTEM_TEAM else "another team"
        raise NameTaken(f"the template name {name!r} belongs to {whose}")


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name) or name in RESERVED_NAMES:
        raise ValueError(
            f"invalid template name {name!r}: use 1-63 of a-z 0-9 . _ - "
            f"(not {', '.join(sorted(RESERVED_NAMES))})"
        )
    return name


def new_template_id() -> str:
    return "tpl-" + secrets.token_hex(6)


def _aliases_path(config: Config) -> Path:
    return config.templates_dir / ALIASES_FILE


def load_aliases(config: Config) -> dict[str, AliasEntry]:
    path = _aliases_path(config)
    return json.loads(path.read_text()) if path.exists() else {}


def _save_aliases(config: Config, aliases: dict[str, AliasEntry]) -> None:
    path = _aliases_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(aliases, indent=1, sort_keys=True))
    tmp.replace(path)


def _is_ready(directory: Path) -> bool:
    return (directory / MANIFEST_NAME).is_file() and not (directory / BUILDING_MARKER).exists()


def list_templates(config: Config) -> list[TemplateManifest]:
    """Every ready template (all versions), oldest first."""
    if not config.templates_dir.is_dir():
        return []
    found = [TemplateManifest.load(d) for d in config.templates_dir.iterdir() if d.is_dir() and _is_ready(d)]
    return sorted(found, key=lambda m: (m.created_at, m.template_id))


def resolve_template(config: Config, name: str, team_id: str = SYSTEM_TEAM) -> TemplateManifest:
    """A template by id, or the current version of an alias, that `team_id` may use."""
    manifest = None
    if _NAME_RE.match(name):
        directory = config.templates_dir / name
        entry = load_aliases(config).get(name)
        if directory.is_dir() and _is_ready(directory):
            manifest = TemplateManifest.load(directory)
        elif entry is not None:
            manifest = TemplateManifest.load(config.templates_dir / entry["template_id"])
    if manifest is None or not team_sees(team_id, manifest.owner):
        raise TemplateNotFound(f"template {name!r} not found")
    return manifest


def template_versions(config: Config, alias: str) -> list[AliasVersion]:
    entry = load_aliases(config).get(alias)
    if entry is None:
        raise TemplateNotFound(f"no template alias {alias!r}")
    return list(entry["versions"])


def begin_template(config: Config, template_id: str) -> Path:
    """The new template's directory, marked as unfinished."""
    directory = config.templates_dir / template_id
    directory.mkdir(parents=True)
    (directory / BUILDING_MARKER).touch()
    return directory


def discard_template(config: Config, template_id: str) -> None:
    shutil.rmtree(config.templates_dir / template_id, ignore_errors=True)


def remove_unfinished(config: Config) -> list[str]:
    """At service start: directories of builds that never finished."""
    if not config.templates_dir.is_dir():
        return []
    removed = []
    for directory in config.templates_dir.iterdir():
        if directory.is_dir() and (directory / BUILDING_MARKER).exists():
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory.name)
    return removed


def publish_template(config: Config, manifest: TemplateManifest, alias: str | None) -> str | None:
    """Make a finished template visible and point `alias` at it; returns the version it superseded.

    Republishing a template under the alias it already has (a template rebuilt in
    place, like the default one) changes no alias record.
    """
    previous = None
    current = load_aliases(config).get(alias or "")
    if alias and (current is None or current["template_id"] != manifest.template_id):
        check_name_free(config, alias, manifest.owner)  # again: another build may have taken it since
        aliases = load_aliases(config)
        entry = aliases.setdefault(alias, {"template_id": "", "versions": [], "owner": manifest.owner})
        versions = entry["versions"]
        previous = entry["template_id"] or None
        versions.append(
            {
                "version": max((v["version"] for v in versions), default=0) + 1,
                "template_id": manifest.template_id,
                "created_at": utc_now(),
            }
        )
        entry["template_id"] = manifest.template_id
        _save_aliases(config, aliases)
        if previous and _is_ready(config.templates_dir / previous):
            old = TemplateManifest.load(config.templates_dir / previous)
            replace(old, aliases=tuple(a for a in old.aliases if a != alias)).save()
    # Writing template.json is what makes the template exist for the control plane.
    manifest.save()
    (manifest.directory / BUILDING_MARKER).unlink(missing_ok=True)
    return previous


def _forget(config: Config, template_id: str) -> None:
    """Drop a deleted template from the alias records (an alias whose current version goes, goes too)."""
    aliases = load_aliases(config)
    for name in list(aliases):
        entry = aliases[name]
        if entry["template_id"] == template_id:
            del aliases[name]
        else:
            entry["versions"] = [v for v in entry["versions"] if v["template_id"] != template_id]
    _save_aliases(config, aliases)


def delete_template(
    config: Config, name: str, sandboxes_using: Callable[[str], int], force: bool = False
) -> str:
    """Delete a template (by id or alias); refuses while sandboxes run from it unless `force`.

    With `force` the caller is expected to have killed those sandboxes (their
    open files keep working until they exit either way). Returns the id deleted.
    """
    manifest = resolve_template(config, name)
    running = sandboxes_using(manifest.template_id)
    if running and not force:
        raise TemplateInUse(
            f"template {manifest.template_id} has {running} running sandbox(es); kill them or use --force"
        )
    _forget(config, manifest.template_id)
    shutil.rmtree(manifest.directory)
    return manifest.template_id


def collect_superseded(config: Config, sandboxes_using: Callable[[str], int]) -> list[str]:
    """Delete old alias versions that no sandbox uses any more; returns their ids."""
    aliases = load_aliases(config)
    deleted = []
    for entry in aliases.values():
        for version in list(entry["versions"]):
            template_id = version["template_id"]
            if template_id != entry["template_id"] and not sandboxes_using(template_id):
                shutil.rmtree(config.templates_dir / template_id, ignore_errors=True)
                entry["versions"].remove(version)
                deleted.append(template_id)
    if deleted:
        _save_aliases(config, aliases)
    return deleted
