"""Templates on disk: lookup by id or alias, versions, publish, delete.

Each build produces a new immutable template directory `<templates_dir>/<id>/`
(a `.building` marker sits in it until the build is READY, and lookups skip
it). An alias names the current version of a template; a rebuild under the
same alias adds a version and moves the alias, while the previous version stays
on disk for the sandboxes still running from it until `collect_superseded`
finds it unused. `aliases.json` records alias -> versions.

Tags (the E2B SDKs' `name:tag`) name versions of an alias: `default` is the alias's current
version (what the name alone resolves to); a build published with other tags only adds those
tags and leaves `default` where it was, unless the name has no version yet. A tagged version is
kept until its tags are removed or moved.
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
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_TAG = "default"
# Path segments of the template API that a template name must not shadow.
RESERVED_NAMES = frozenset({"builds", "aliases", "tags", "build-cache"})
# Names the SDKs send when the user names no template (PROTOCOL.md §2.2): the default template's.
SDK_DEFAULT_TEMPLATE_NAMES = frozenset({"base", "code-interpreter-v1"})


class AliasVersion(TypedDict):
    version: int
    template_id: str
    created_at: str


class TagEntry(TypedDict):
    template_id: str
    created_at: str  # when the tag was put on this version


class AliasEntry(TypedDict, total=False):
    template_id: str  # the current version (its `default` tag)
    versions: list[AliasVersion]  # oldest first; superseded ones until collected
    owner: str  # the team whose builds may move it (absent in records from before teams: the system)
    tags: dict[str, TagEntry]  # tag -> version (absent in records from before tags)


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


def validate_tag(tag: str) -> str:
    if not _TAG_RE.match(tag):
        raise ValueError(f"invalid tag {tag!r}: use 1-128 of A-Z a-z 0-9 . _ - (not starting with . _ -)")
    return tag


def split_name_tag(text: str) -> tuple[str, str | None]:
    """`name:tag` -> (name, tag); a name without a tag -> (name, None)."""
    name, colon, tag = text.rpartition(":")
    return (name, tag) if colon else (text, None)


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
    base, tag = split_name_tag(name)
    if tag is not None:
        tagged = resolve_tag(config, base, tag)
        if tagged is not None and _is_ready(config.templates_dir / tagged):
            manifest = TemplateManifest.load(config.templates_dir / tagged)
    elif _NAME_RE.match(name):
        directory = config.templates_dir / name
        entry = load_aliases(config).get(name)
        if directory.is_dir() and _is_ready(directory):
            manifest = TemplateManifest.load(directory)
        elif entry is not None and _is_ready(config.templates_dir / entry["template_id"]):
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


def publish_template(
    config: Config, manifest: TemplateManifest, alias: str | None, tags: tuple[str, ...] = ()
) -> str | None:
    """Make a finished template visible and point `alias` (or just its `tags`) at it; returns the
    version it superseded as the alias's current one.

    Republishing a template under the alias it already has (a template rebuilt in
    place, like the default one) changes no alias record.
    """
    previous = None
    if alias:
        manifest, previous = _record_version(config, manifest, alias, tags)
    # Writing template.json is what makes the template exist for the control plane.
    manifest.save()
    (manifest.directory / BUILDING_MARKER).unlink(missing_ok=True)
    return previous


def _record_version(
    config: Config, manifest: TemplateManifest, alias: str, tags: tuple[str, ...]
) -> tuple[TemplateManifest, str | None]:
    """`manifest` as a version of `alias` with `tags` (none: the default tag); returns the manifest
    to save (without the alias when it is not the current version) and the superseded version."""
    aliases = load_aliases(config)
    entry = aliases.get(alias)
    if entry is not None and entry["template_id"] == manifest.template_id and not tags:
        return manifest, None
    check_name_free(config, alias, manifest.owner)  # again: another build may have taken it since
    if entry is None:
        entry = aliases[alias] = {"template_id": "", "versions": [], "owner": manifest.owner}
    versions = entry["versions"]
    if all(v["template_id"] != manifest.template_id for v in versions):
        versions.append(
            {
                "version": max((v["version"] for v in versions), default=0) + 1,
                "template_id": manifest.template_id,
                "created_at": utc_now(),
            }
        )
    moves_default = not entry["template_id"] or not tags or DEFAULT_TAG in tags
    previous = entry["template_id"] or None
    for tag in {DEFAULT_TAG, *tags} if moves_default else set(tags):
        entry.setdefault("tags", {})[tag] = {"template_id": manifest.template_id, "created_at": utc_now()}
    if moves_default:
        entry["template_id"] = manifest.template_id
    _save_aliases(config, aliases)
    if not moves_default:
        return replace(manifest, aliases=tuple(a for a in manifest.aliases if a != alias)), None
    if previous == manifest.template_id:
        return manifest, None
    if previous:
        _set_alias(config, previous, alias, False)
    return manifest, previous


def _set_alias(config: Config, template_id: str, alias: str, present: bool) -> None:
    """Add `alias` to (or drop it from) the manifest of a published version."""
    directory = config.templates_dir / template_id
    if _is_ready(directory):
        manifest = TemplateManifest.load(directory)
        others = tuple(a for a in manifest.aliases if a != alias)
        replace(manifest, aliases=(*others, alias) if present else others).save()


def tags_of(entry: AliasEntry) -> dict[str, TagEntry]:
    """An alias's tags; `default` is its current version (records from before tags have only it)."""
    tags = dict(entry.get("tags", {}))
    current = entry["template_id"]
    default = tags.get(DEFAULT_TAG)
    if default is None or default["template_id"] != current:
        created = next((v["created_at"] for v in entry["versions"] if v["template_id"] == current), "")
        tags[DEFAULT_TAG] = {"template_id": current, "created_at": created}
    return tags


def resolve_tag(config: Config, alias: str, tag: str) -> str | None:
    """The version (template id) `alias:tag` names, None if there is none."""
    entry = load_aliases(config).get(alias)
    found = tags_of(entry).get(tag) if entry is not None else None
    return found["template_id"] if found is not None else None


def alias_of(config: Config, template_id: str) -> str | None:
    """The alias a template version belongs to (as its current version, or tagged), if any."""
    for name, entry in load_aliases(config).items():
        if template_id == entry["template_id"] or any(
            v["template_id"] == template_id for v in entry["versions"]
        ):
            return name
    return None


def assign_tags(config: Config, alias: str, template_id: str, tags: tuple[str, ...]) -> None:
    """Put `tags` on the version `template_id` of `alias` (`default` makes it the current one)."""
    aliases = load_aliases(config)
    entry = aliases.get(alias)
    if entry is None or all(v["template_id"] != template_id for v in entry["versions"]):
        raise TemplateNotFound(f"no version {template_id} of template {alias!r}")
    for tag in tags:
        found: TagEntry = {"template_id": template_id, "created_at": utc_now()}
        entry.setdefault("tags", {})[validate_tag(tag)] = found
    previous = entry["template_id"]
    if DEFAULT_TAG in tags and previous != template_id:
        entry["template_id"] = template_id
    _save_aliases(config, aliases)
    if entry["template_id"] != previous:
        _set_alias(config, previous, alias, False)
        _set_alias(config, template_id, alias, True)


def remove_tags(config: Config, alias: str, tags: tuple[str, ...]) -> None:
    """Take `tags` off `alias`. Raises TemplateNotFound for a tag it does not have, ValueError for
    `default` (the name alone must name a version: delete the template, or move `default`)."""
    aliases = load_aliases(config)
    entry = aliases.get(alias)
    if entry is None:
        raise TemplateNotFound(f"template {alias!r} not found")
    if DEFAULT_TAG in tags:
        raise ValueError(
            f"the {DEFAULT_TAG!r} tag names what {alias!r} alone means: assign it to another build "
            "instead, or delete the template"
        )
    present = entry.get("tags", {})
    missing = [t for t in tags if t not in present]
    if missing:
        raise TemplateNotFound(f"template {alias!r} has no tag {missing[0]!r}")
    for tag in tags:
        del present[tag]
    _save_aliases(config, aliases)


def delete_alias(config: Config, alias: str) -> list[str]:
    """Delete a template name with every version of it; returns the ids of the versions deleted.
    The caller has made sure no sandbox runs from them (open files keep working until they exit)."""
    aliases = load_aliases(config)
    entry = aliases.pop(alias, None)
    if entry is None:
        return []
    ids = list(dict.fromkeys([entry["template_id"], *(v["template_id"] for v in entry["versions"])]))
    _save_aliases(config, aliases)
    for template_id in ids:
        if template_id:
            shutil.rmtree(config.templates_dir / template_id, ignore_errors=True)
    return [t for t in ids if t]


def forget_template(config: Config, template_id: str) -> None:
    """Drop a deleted template from the alias records (an alias whose current version goes, goes too)."""
    aliases = load_aliases(config)
    for name in list(aliases):
        entry = aliases[name]
        if entry["template_id"] == template_id:
            del aliases[name]
        else:
            entry["versions"] = [v for v in entry["versions"] if v["template_id"] != template_id]
            tags = entry.get("tags", {})
            for tag in [t for t, found in tags.items() if found["template_id"] == template_id]:
                del tags[tag]
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
    forget_template(config, manifest.template_id)
    shutil.rmtree(manifest.directory)
    return manifest.template_id


def collect_superseded(config: Config, sandboxes_using: Callable[[str], int]) -> list[str]:
    """Delete old alias versions that no tag names and no sandbox uses any more; returns their ids."""
    aliases = load_aliases(config)
    deleted = []
    for entry in aliases.values():
        tagged = {found["template_id"] for found in tags_of(entry).values()}
        for version in list(entry["versions"]):
            template_id = version["template_id"]
            if template_id not in tagged and not sandboxes_using(template_id):
                shutil.rmtree(config.templates_dir / template_id, ignore_errors=True)
                entry["versions"].remove(version)
                deleted.append(template_id)
    if deleted:
        _save_aliases(config, aliases)
    return deleted
