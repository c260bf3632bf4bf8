"""`filesystem.Filesystem`: stat, make/list/move/remove, and directory watches over inotify.

Every OSError maps to a Connect code (`not_found`, `permission_denied`, `already_exists`…):
the SDK's `exists()` and `make_dir()` return values depend on those codes.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import shutil
import stat
import uuid
from datetime import UTC, datetime

import trio

from appliance.guest.connect import CallContext, ConnectError, Message, Router, Send
from appliance.guest.identity import as_user
from appliance.guest.inotify import DirectoryWatch, WatchEvent
from appliance.guest.users import User

METADATA_XATTR_PREFIX = "user.e2b."
WATCHER_EVENT_LIMIT = 10_000

ERRNO_CODES = {
    errno.ENOENT: "not_found",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.EROFS: "permission_denied",
    errno.EEXIST: "already_exists",
    errno.ENOTDIR: "invalid_argument",
    errno.EISDIR: "invalid_argument",
    errno.EINVAL: "invalid_argument",
    errno.ENAMETOOLONG: "invalid_argument",
    errno.ELOOP: "invalid_argument",
    errno.EXDEV: "invalid_argument",
    errno.ENOTEMPTY: "failed_precondition",
    errno.ENOSPC: "resource_exhausted",
    errno.EDQUOT: "resource_exhausted",
}


def connect_error(exc: OSError, path: str) -> ConnectError:
    code = ERRNO_CODES.get(exc.errno or 0, "internal")
    return ConnectError(code, f"{exc.strerror or exc}: {path}")


def resolve_path(path: object, user: User) -> str:
    """Absolute, normalised path; relative paths (and `~`) are relative to the user's home."""
    if not isinstance(path, str) or not path:
        raise ConnectError("invalid_argument", "path is required")
    try:
        path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise ConnectError("invalid_argument", f"path is not valid UTF-8: {exc}") from exc
    if "\0" in path:
        raise ConnectError("invalid_argument", "path contains a NUL byte")
    if path == "~" or path.startswith("~/"):
        path = user.home + path[1:]
    return os.path.normpath(os.path.join(user.home, path))


def _name_of_user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _name_of_group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def rfc3339(ns: int) -> str:
    seconds, nanos = divmod(ns, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{moment}.{nanos:09d}Z" if nanos else f"{moment}Z"


def read_metadata(path: str) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    metadata = {}
    for name in names:
        if name.startswith(METADATA_XATTR_PREFIX):
            try:
                value = os.getxattr(path, name, follow_symlinks=False)
            except OSError:
                continue
            metadata[name[len(METADATA_XATTR_PREFIX) :]] = value.decode("utf-8", "replace")
    return metadata


def entry_type(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "FILE_TYPE_SYMLINK"
    if stat.S_ISDIR(mode):
        return "FILE_TYPE_DIRECTORY"
    return "FILE_TYPE_FILE"


def entry_info(path: str) -> Message:
    """EntryInfo of a path, not following a final symlink. A link is reported as envd does: the
    type and mode of what it resolves to, and that resolved path as `symlinkTarget` (a dangling
    link: type symlink, and the path it would resolve to)."""
    info = os.lstat(path)
    kind = info.st_mode
    if stat.S_ISLNK(info.st_mode):
        try:
            kind = os.stat(path).st_mode
        except OSError:
            pass  # dangling (or unreadable on the way): it stays a symlink
    entry: Message = {
        "name": os.path.basename(path) or path,
        "type": entry_type(kind),
        "path": path,
        "size": info.st_size,
        "mode": stat.S_IMODE(kind),
        "permissions": stat.filemode(info.st_mode),
        "owner": _name_of_user(info.st_uid),
        "group": _name_of_group(info.st_gid),
        "modifiedTime": rfc3339(info.st_mtime_ns),
    }
    if stat.S_ISLNK(info.st_mode):
        entry["isSymlink"] = True
        entry["symlinkTarget"] = os.path.realpath(path)
    metadata = read_metadata(path)
    if metadata:
        entry["metadata"] = metadata
    return entry


def make_directories(path: str) -> bool:
    """mkdir -p (call it as the user: see identity.py); False if the directory already existed."""
    missing = []
    current = path
    while not os.path.lexists(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    if not missing:
        if not os.path.isdir(path):
            raise FileExistsError(errno.EEXIST, "a file exists at the path", path)
        return False
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            continue
    return True


def list_directory(root: str, depth: int) -> list[Message]:
    entries: list[Message] = []

    def walk(directory: str, level: int) -> None:
        with os.scandir(directory) as children:
            for child in sorted(children, key=lambda c: c.name):
                try:
                    entries.append(entry_info(child.path))
                except FileNotFoundError:
                    continue  # removed while listing
                if level < depth and child.is_dir(follow_symlinks=False):
                    try:
                        walk(child.path, level + 1)
                    except PermissionError:
                        continue

    walk(root, 1)
    return entries


def remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _stat(path: str) -> Message:
    try:
        return entry_info(path)
    except NotADirectoryError as exc:
        # A file where a directory was expected: the path does not exist (`exists()` is False).
        raise ConnectError("not_found", f"{exc.strerror}: {path}") from exc
    except OSError as exc:
        raise connect_error(exc, path) from exc


def _make_dir(path: str) -> Message:
    try:
        if not make_directories(path):
            raise ConnectError("already_exists", f"directory already exists: {path}")
        return entry_info(path)
    except OSError as exc:
        raise connect_error(exc, path) from exc


def _move(source: str, destination: str) -> Message:
    try:
        os.lstat(source)
        make_directories(os.path.dirname(destination))
        os.rename(source, destination)
        return entry_info(destination)
    except OSError as exc:
        raise connect_error(exc, source) from exc


def _existing_directory(path: str) -> None:
    if not os.path.isdir(path):
        os.lstat(path)  # not_found for a missing path, invalid_argument for a file
        raise ConnectError("invalid_argument", f"path is not a directory: {path}")


def _list_dir(path: str, depth: int) -> list[Message]:
    try:
        _existing_directory(path)
        return list_directory(path, depth)
    except OSError as exc:
        raise connect_error(exc, path) from exc


def _remove(path: str) -> None:
    """envd's os.RemoveAll: a path that is not there is already removed."""
    try:
        remove_path(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise connect_error(exc, path) from exc


def _open_watch(path: str, recursive: bool) -> DirectoryWatch:
    try:
        _existing_directory(path)
        return DirectoryWatch(path, recursive)
    except OSError as exc:
        raise connect_error(exc, path) from exc


class Watcher:
    """A CreateWatcher watch: events collected in the background until polled or removed."""

    def __init__(self, watch: DirectoryWatch, include_entry: bool) -> None:
        self.watch = watch
        self.include_entry = include_entry
        self.events: list[Message] = []
        self.cancel_scope = trio.CancelScope()

    async def collect(self) -> None:
        with self.cancel_scope:
            try:
                async for event in self.watch.events():
                    if len(self.events) < WATCHER_EVENT_LIMIT:
                        self.events.append(event_message(event, self.include_entry))
            finally:
                self.watch.close()


def event_message(event: WatchEvent, include_entry: bool) -> Message:
    message: Message = {"name": event.name, "type": event.type}
    if include_entry and event.type != "EVENT_TYPE_REMOVE":
        try:
            message["entry"] = entry_info(event.path)
        except OSError:
            pass
    return message


class FilesystemService:
    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._watchers: dict[str, Watcher] = {}

    def register(self, router: Router) -> None:
        prefix = "/filesystem.Filesystem/"
        router.unary[prefix + "Stat"] = self.stat
        router.unary[prefix + "MakeDir"] = self.make_dir
        router.unary[prefix + "Move"] = self.move
        router.unary[prefix + "ListDir"] = self.list_dir
        router.unary[prefix + "Remove"] = self.remove
        router.unary[prefix + "CreateWatcher"] = self.create_watcher
        router.unary[prefix + "GetWatcherEvents"] = self.get_watcher_events
        router.unary[prefix + "RemoveWatcher"] = self.remove_watcher
        router.server_streams[prefix + "WatchDir"] = (self.watch_dir, {"keepalive": {}})

    async def stat(self, context: CallContext, message: Message) -> Message:
        path = resolve_path(message.get("path"), context.user)
        return {"entry": await as_user(context.user, _stat, path)}

    async def make_dir(self, context: CallContext, message: Message) -> Message:
        path = resolve_path(message.get("path"), context.user)
        return {"entry": await as_user(context.user, _make_dir, path)}

    async def move(self, context: CallContext, message: Message) -> Message:
        source = resolve_path(message.get("source"), context.user)
        destination = resolve_path(message.get("destination"), context.user)
        return {"entry": await as_user(context.user, _move, source, destination)}

    async def list_dir(self, context: CallContext, message: Message) -> Message:
        path = resolve_path(message.get("path"), context.user)
        depth = int(message.get("depth") or 1)  # type: ignore[call-overload]
        return {"entries": await as_user(context.user, _list_dir, path, depth, thread=True)}

    async def remove(self, context: CallContext, message: Message) -> Message:
        path = resolve_path(message.get("path"), context.user)
        await as_user(context.user, _remove, path, thread=True)
        return {}

    async def _open_watch(self, message: Message, user: User) -> DirectoryWatch:
        path = resolve_path(message.get("path"), user)
        return await as_user(user, _open_watch, path, bool(message.get("recursive")))

    async def watch_dir(self, context: CallContext, message: Message, send: Send) -> None:
        watch = await self._open_watch(message, context.user)
        include_entry = bool(message.get("includeEntry") or message.get("include_entry"))
        try:
            await send({"start": {}})
            async for event in watch.events():
                await send({"filesystem": event_message(event, include_entry)})
        finally:
            watch.close()

    async def create_watcher(self, context: CallContext, message: Message) -> Message:
        watch = await self._open_watch(message, context.user)
        include_entry = bool(message.get("includeEntry") or message.get("include_entry"))
        watcher = Watcher(watch, include_entry)
        watcher_id = uuid.uuid4().hex
        self._watchers[watcher_id] = watcher
        self._nursery.start_soon(watcher.collect)
        return {"watcherId": watcher_id}

    def _watcher(self, message: Message) -> tuple[str, Watcher]:
        watcher_id = message.get("watcherId") or message.get("watcher_id")
        watcher = self._watchers.get(watcher_id) if isinstance(watcher_id, str) else None
        if watcher is None:
            raise ConnectError("not_found", f"watcher {watcher_id} not found")
        return watcher_id, watcher  # type: ignore[return-value]

    async def get_watcher_events(self, context: CallContext, message: Message) -> Message:
        _watcher_id, watcher = self._watcher(message)
        events, watcher.events = watcher.events, []
        return {"events": events}

    async def remove_watcher(self, context: CallContext, message: Message) -> Message:
        watcher_id, watcher = self._watcher(message)
        del self._watchers[watcher_id]
        watcher.cancel_scope.cancel()
        return {}
