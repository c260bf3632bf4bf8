"""The sandbox uid range (`uid_base` + slot) must belong to nobody else on the host.

Sandbox N runs as uid (and gid) uid_base + N, a bare id that owns nothing. If
that range overlapped what /etc/subuid or /etc/subgid delegate to a user (for
rootless containers, say), that user's user namespaces could map the sandbox's
id and, for instance, signal or ptrace its UML processes, or own files the
sandbox's id can reach. The runtime refuses to start on such an overlap.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))


class UidRangeError(RuntimeError):
    """The sandbox uid range overlaps ids delegated to a user (/etc/subuid, /etc/subgid)."""


def delegated_ranges(path: Path) -> list[tuple[str, int, int]]:
    """(owner, first id, count) of each `owner:first:count` line; none if the file is absent."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    ranges = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        try:
            owner, first, count = fields[0], int(fields[1]), int(fields[2])
        except (IndexError, ValueError):
            raise UidRangeError(f"{path}:{number}: not owner:first:count: {line!r}") from None
        ranges.append((owner, first, count))
    return ranges


def check_uid_range(first: int, count: int, files: Iterable[Path] = SUBID_FILES) -> None:
    """Raise UidRangeError if [first, first + count) meets a range delegated in `files`."""
    last = first + count - 1
    for path in files:
        for owner, start, length in delegated_ranges(path):
            if start <= last and first <= start + length - 1:
                delegated = f"{start}..{start + length - 1}"
                raise UidRangeError(
                    f"uid_base {first}: the sandbox ids {first}..{last} overlap {delegated}, "
                    f"which {path} delegates to {owner!r}; set uid_base to a range nobody else uses"
                )
