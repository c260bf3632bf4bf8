"""Volumes (E2B's `/volumes` with an API key, `/volumecontent/{id}/...` with the volume's token).

The SDK's `Volume` sends content calls to `E2B_VOLUME_API_URL` (or `api.<domain>`) with
`Authorization: Bearer <volume token>`: the token of that volume and no other, so the
content routes are public to the key check and check the token themselves. A wrong
token and an unknown volume get the same 404. Every path is resolved inside the volume
(`master/volumes.py`); a `..` segment is refused (400) rather than clamped.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
import stat
from typing import Any

import trio
from quart import Response, request

from appliance.api import validation as v
from appliance.api.auth import Access, guarded
from appliance.api.bodies import json_response, no_content
from appliance.api.errors import ApiError
from appliance.api.services import services
from appliance.cubelet.volume_mounts import VolumeMount
from appliance.master.volumes import VolumeNameTaken, VolumeRecord, VolumeStore
from appliance.templates.untrusted_tree import Tree, split_path
from appliance.tenancy import current_principal

blueprint = guarded("volumes", __name__, Access.KEY)
content = guarded("volume_content", __name__, Access.PUBLIC)

_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
MAX_DEPTH = 16
# Where volumes may be mounted in a sandbox: strictly below one of these (never over the system's
# own directories), in plain path components.
MOUNT_ROOTS = ("/mnt", "/data", "/workspace", "/home", "/volumes", "/srv", "/opt")
MAX_MOUNTS = 4
_MOUNT_PART_RE = re.compile(r"^[a-zA-Z0-9._-]{1,64}$")


def _store() -> VolumeStore:
    store = services().volumes
    if store is None:
        raise ApiError(503, "volumes are not available on this service")
    return store


def volume_body(record: VolumeRecord, *, token: bool) -> dict[str, object]:
    body: dict[str, object] = {"volumeID": record.volume_id, "name": record.name}
    if token:
        body["token"] = record.token
    return body


def _not_found(volume_id: str) -> ApiError:
    return ApiError(404, f"volume {volume_id} not found")


@blueprint.get("/volumes")
async def list_volumes() -> Response:
    return json_response([volume_body(r, token=False) for r in _store().list(current_principal().team_id)])


@blueprint.post("/volumes")
async def create_volume() -> Response:
    data = await v.request_object(required=True)
    name = data.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ApiError(400, "'name' must be 1-128 of a-z A-Z 0-9 _ -")
    try:
        record = _store().create(current_principal().team_id, name)
    except VolumeNameTaken as exc:
        raise ApiError(409, str(exc)) from exc
    return json_response(volume_body(record, token=True), status=201)


@blueprint.get("/volumes/<volume_id>")
async def get_volume(volume_id: str) -> Response:
    record = _store().get(current_principal().team_id, volume_id)
    if record is None:
        raise _not_found(volume_id)
    return json_response(volume_body(record, token=True))


@blueprint.delete("/volumes/<volume_id>")
async def delete_volume(volume_id: str) -> Response:
    record = _store().get(current_principal().team_id, volume_id)
    if record is not None:
        _refuse_if_mounted(record)
    if not await trio.to_thread.run_sync(_store().delete, current_principal().team_id, volume_id):
        raise _not_found(volume_id)
    return no_content()


# Mounts into sandboxes (`volumeMounts` on create; cubelet/volume_mounts.py mounts them).


def _refuse_if_mounted(record: VolumeRecord) -> None:
    holder = services().cubelet.volume_mounts.holder(record.volume_id)
    if holder is not None:
        raise ApiError(
            409,
            f"volume {record.volume_id} is mounted in sandbox {holder}: its files come back when that "
            "sandbox ends; change or destroy it then",
        )


def mount_path(path: object) -> str:
    """A sandbox path a volume may be mounted at: absolute, plain, strictly below a MOUNT_ROOTS entry."""
    if not isinstance(path, str) or not path.startswith("/") or len(path) > 255:
        raise ApiError(400, f"volume mount path {path!r} must be an absolute path")
    parts = path.rstrip("/").split("/")[1:]
    if not all(_MOUNT_PART_RE.match(p) and p not in (".", "..") for p in parts):
        raise ApiError(400, f"volume mount path {path!r} must be plain names joined by '/' (no '..')")
    clean = "/" + "/".join(parts)
    if len(parts) < 2 or not any(clean.startswith(root + "/") for root in MOUNT_ROOTS):
        raise ApiError(400, f"volume mount path {path!r} must be below one of {', '.join(MOUNT_ROOTS)}")
    return clean


def volume_mounts(value: object, team_id: str) -> tuple[VolumeMount, ...]:
    """The SDK's `volumeMounts` ([{name, path}]) as the team's volumes and checked paths."""
    if value is None or value == []:
        return ()
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ApiError(400, "'volumeMounts' must be a list of {name, path}")
    if len(value) > MAX_MOUNTS:
        raise ApiError(400, f"at most {MAX_MOUNTS} volumes can be mounted in a sandbox")
    by_name = {r.name: r for r in _store().list(team_id)}
    mounts: list[VolumeMount] = []
    for item in value:
        name, path = item.get("name"), mount_path(item.get("path"))
        record = by_name.get(name) if isinstance(name, str) else None
        if record is None:
            raise ApiError(404, f"volume {name!r} not found")
        for other in mounts:
            if other.volume_id == record.volume_id:
                raise ApiError(400, f"volume {name!r} is mounted twice")
            if (path + "/").startswith(other.path + "/") or (other.path + "/").startswith(path + "/"):
                raise ApiError(400, f"volume mount paths {other.path} and {path} overlap")
        _refuse_if_mounted(record)
        mounts.append(VolumeMount(record.volume_id, path))
    return tuple(mounts)


def mounts_body(sandbox_id: str, team_id: str) -> list[dict[str, str]]:
    """The sandbox's volume mounts as the SDKs read them in its info (`volumeMounts`)."""
    store = services().volumes
    if store is None:
        return []
    mounts = []
    for volume_id, mount in services().cubelet.volume_mounts.held_by(sandbox_id):
        record = store.get(team_id, volume_id)
        if record is not None:
            mounts.append({"name": record.name, "path": mount.path})
    return mounts


# Content.


def _volume(volume_id: str) -> VolumeRecord:
    """The volume the request's bearer token opens. Routes with a body read it before calling
    this: an error answered over an unread body left the keep-alive connection stuck (the
    client's next request on it got no answer)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    record = _store().by_token(volume_id, token.strip()) if scheme.lower() == "bearer" else None
    if record is None:
        raise _not_found(volume_id)
    return record


def _path() -> str:
    path = request.args.get("path")
    if path is None or path == "" or "\0" in path:
        raise ApiError(400, "'path' is required")
    if ".." in path.split("/"):
        raise ApiError(400, f"path {path!r} leaves the volume ('..')")
    return "/" + "/".join(split_path(path))


def _uint(name: str, default: int | None = None) -> int | None:
    text = request.args.get(name)
    if text is None or text == "":
        return default
    if not text.isdigit() or int(text) >= 1 << 32:
        raise ApiError(400, f"'{name}' must be an unsigned 32-bit integer")
    return int(text)


def _time(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat().replace("+00:00", "Z")


def entry_body(tree: Tree, path: str, info: os.stat_result) -> dict[str, object]:
    kind = (
        "directory"
        if stat.S_ISDIR(info.st_mode)
        else "file"
        if stat.S_ISREG(info.st_mode)
        else "symlink"
        if stat.S_ISLNK(info.st_mode)
        else "unknown"
    )
    body: dict[str, object] = {
        "name": path.rstrip("/").rpartition("/")[2] or "/",
        "type": kind,
        "path": path,
        "size": info.st_size,
        "mode": stat.S_IMODE(info.st_mode),
        "uid": info.st_uid,
        "gid": info.st_gid,
        "atime": _time(info.st_atime),
        "mtime": _time(info.st_mtime),
        "ctime": _time(info.st_ctime),
    }
    if kind == "symlink":
        body["target"] = tree.readlink(path)
    return body


async def _in_tree(record: VolumeRecord, fn: Any, *args: Any) -> Any:
    """`fn(tree, *args)` in a thread, on the volume's tree; a missing entry is the SDK's 404."""

    def run() -> Any:
        with _store().tree(record) as tree:
            return fn(tree, *args)

    try:
        return await trio.to_thread.run_sync(run)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # ELOOP: a link loops in the volume
            raise ApiError(404, "path not found") from exc
        raise ApiError(400, f"cannot do that in the volume: {exc.strerror}") from exc


def _stat(tree: Tree, path: str) -> dict[str, object]:
    info = tree.lstat(path)
    if info is None:
        raise FileNotFoundError(2, "no such entry", path)
    return entry_body(tree, path, info)


def _listing(tree: Tree, path: str, depth: int) -> list[dict[str, object]]:
    if not tree.is_dir(path, follow=False):
        raise NotADirectoryError(20, "not a directory", path)
    entries = []
    for name in tree.listdir(path):
        child = path.rstrip("/") + "/" + name
        entries.append(_stat(tree, child))
        if depth > 1 and tree.is_dir(child, follow=False):
            entries += _listing(tree, child, depth - 1)
    return entries


@content.get("/volumecontent/<volume_id>/path")
async def stat_path(volume_id: str) -> Response:
    record, path = _volume(volume_id), _path()
    return json_response(await _in_tree(record, _stat, path))


@content.patch("/volumecontent/<volume_id>/path")
async def update_path(volume_id: str) -> Response:
    data = await v.request_object(required=True)  # read first: see `_volume`
    record, path = _volume(volume_id), _path()
    _refuse_if_mounted(record)
    for key in ("uid", "gid", "mode"):
        value = data.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 32
        ):
            raise ApiError(400, f"'{key}' must be an unsigned 32-bit integer")

    def update(tree: Tree) -> dict[str, object]:
        before = _stat(tree, path)
        if data.get("mode") is not None:
            tree.chmod(path, int(data["mode"]) & 0o7777)
        if data.get("uid") is not None or data.get("gid") is not None:
            tree.chown(path, int(data.get("uid", before["uid"])), int(data.get("gid", before["gid"])))
        return _stat(tree, path)

    return json_response(await _in_tree(record, update))


@content.delete("/volumecontent/<volume_id>/path")
async def delete_path(volume_id: str) -> Response:
    record, path = _volume(volume_id), _path()
    if path == "/":
        raise ApiError(400, "the volume's root cannot be deleted (destroy the volume)")
    _refuse_if_mounted(record)

    def remove(tree: Tree) -> None:
        _stat(tree, path)
        tree.remove(path)

    await _in_tree(record, remove)
    return no_content()


@content.get("/volumecontent/<volume_id>/dir")
async def list_dir(volume_id: str) -> Response:
    record, path = _volume(volume_id), _path()
    depth = _uint("depth", 1) or 1
    return json_response(await _in_tree(record, _listing, path, min(depth, MAX_DEPTH)))


@content.post("/volumecontent/<volume_id>/dir")
async def make_dir(volume_id: str) -> Response:
    record, path = _volume(volume_id), _path()
    _refuse_if_mounted(record)
    uid, gid, mode = _uint("uid", 0), _uint("gid", 0), _uint("mode", 0o755)
    force = request.args.get("force", "false").lower() == "true"

    def make(tree: Tree) -> dict[str, object]:
        if tree.lstat(path) is not None:
            raise ApiError(409, f"{path} already exists")
        if force:
            tree.makedirs(path, (mode or 0o755) & 0o7777, uid or 0, gid or 0)
        else:
            with tree.parent(path) as (parent, name):
                os.mkdir(name, 0o700, dir_fd=parent)
            tree.chmod(path, (mode or 0o755) & 0o7777)
            tree.chown(path, uid or 0, gid or 0)
        return _stat(tree, path)

    return json_response(await _in_tree(record, make), status=201)


@content.get("/volumecontent/<volume_id>/file")
async def read_file(volume_id: str) -> Response:
    record, path = _volume(volume_id), _path()

    def read(tree: Tree) -> bytes:
        if not stat.S_ISREG((tree.lstat(path) or os.stat_result((0,) * 10)).st_mode):
            raise FileNotFoundError(2, "no such file", path)
        with tree.reader(path, follow=False) as f:
            return f.read()

    data = await _in_tree(record, read)
    return Response(data, status=200, content_type="application/octet-stream")


@content.put("/volumecontent/<volume_id>/file")
async def write_file(volume_id: str) -> Response:
    data = await request.get_data()  # read first: see `_volume`
    assert isinstance(data, bytes)
    record, path = _volume(volume_id), _path()
    _refuse_if_mounted(record)
    uid, gid, mode = _uint("uid", 0), _uint("gid", 0), _uint("mode", 0o644)
    force = request.args.get("force", "true").lower() != "false"
    store = _store()

    def write(tree: Tree) -> dict[str, object]:
        existing = tree.lstat(path)
        if existing is not None and (stat.S_ISDIR(existing.st_mode) or not force):
            raise ApiError(409, f"{path} already exists")
        if store.usage(record) + len(data) > store.max_bytes:
            raise ApiError(400, f"the volume would pass its cap of {store.max_bytes >> 20} MiB")
        tree.write_bytes(path, data, (mode or 0o644) & 0o7777)
        tree.chown(path, uid or 0, gid or 0)
        return _stat(tree, path)

    return json_response(await _in_tree(record, write), status=201)
