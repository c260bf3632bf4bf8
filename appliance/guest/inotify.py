"""inotify through ctypes: directory watches that report envd's filesystem event types."""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
# The events fsnotify (and therefore envd) subscribes to, minus the watched directory's own.
WATCH_MASK = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_ONLYDIR
EVENT_HEADER = struct.Struct("iIII")

# fsnotify's mapping from inotify masks to its operations, in envd's EventType names.
EVENT_TYPES = (
    (IN_CREATE | IN_MOVED_TO, "EVENT_TYPE_CREATE"),
    (IN_MODIFY, "EVENT_TYPE_WRITE"),
    (IN_DELETE, "EVENT_TYPE_REMOVE"),
    (IN_MOVED_FROM, "EVENT_TYPE_RENAME"),
    (IN_ATTRIB, "EVENT_TYPE_CHMOD"),
)

# The process's own symbols include libc's: find_library would run `ldconfig -p` (an exec).
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class WatchEvent:
    name: str  # relative to the watched directory
    type: str
    path: str


class DirectoryWatch:
    """An inotify instance watching one directory, and with `recursive` every directory below it."""

    def __init__(self, root: str, recursive: bool) -> None:
        self.root = root
        self.recursive = recursive
        self._directories: dict[int, str] = {}
        self._fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
        try:
            self._add(root)
            if recursive:
                self._add_tree(root)
        except OSError:
            os.close(self._fd)
            raise

    def _add(self, directory: str) -> None:
        wd = _libc.inotify_add_watch(self._fd, os.fsencode(directory), WATCH_MASK)
        if wd < 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error), directory)
        self._directories[wd] = directory

    def _add_tree(self, top: str) -> list[str]:
        """Watch every directory below `top`; the paths of everything found there."""
        found = []
        for directory, subdirectories, files in os.walk(top):
            for name in subdirectories:
                path = os.path.join(directory, name)
                found.append(path)
                if not os.path.islink(path):
                    try:
                        self._add(path)
                    except OSError:
                        pass  # removed meanwhile, or unreadable: watch what can be watched
            found.extend(os.path.join(directory, name) for name in files)
        return found

    def _watch_new_directory(self, path: str) -> list[WatchEvent]:
        """A directory made under a recursive watch: watched from now on; what was made in it
        before its watch was (`mkdir -p a/b && touch a/b/f` outruns any watcher) is reported
        as created, like the directory itself."""
        try:
            self._add(path)
            found = self._add_tree(path)
        except OSError:
            return []  # gone again
        return [WatchEvent(os.path.relpath(inner, self.root), "EVENT_TYPE_CREATE", inner) for inner in found]

    async def events(self) -> AsyncIterator[WatchEvent]:
        while True:
            await trio.lowlevel.wait_readable(self._fd)
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                continue
            for event in self._parse(data):
                yield event

    def _parse(self, data: bytes) -> list[WatchEvent]:
        events = []
        offset = 0
        while offset + EVENT_HEADER.size <= len(data):
            wd, mask, _cookie, length = EVENT_HEADER.unpack_from(data, offset)
            raw_name = data[offset + EVENT_HEADER.size : offset + EVENT_HEADER.size + length]
            offset += EVENT_HEADER.size + length
            directory = self._directories.get(wd)
            if mask & IN_IGNORED:
                self._directories.pop(wd, None)
                continue
            if directory is None or not raw_name:
                continue
            path = os.path.join(directory, os.fsdecode(raw_name.rstrip(b"\0")))
            for bits, type_name in EVENT_TYPES:
                if mask & bits:
                    events.append(WatchEvent(os.path.relpath(path, self.root), type_name, path))
            if self.recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                events.extend(self._watch_new_directory(path))
        return events

    def close(self) -> None:
        if self._fd >= 0:
            trio.lowlevel.notify_closing(self._fd)
            os.close(self._fd)
            self._fd = -1
