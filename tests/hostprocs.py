"""What the sandbox teardown tests look for on the host (shared by tests/uml and tests/net)."""

from __future__ import annotations

from pathlib import Path


def processes_of_uid(uid: int) -> list[str]:
    """Pids of every host process (zombies too) whose real, effective, saved or fs uid is `uid`."""
    return processes_of_uid_range(uid, 1)


def processes_of_uid_range(first: int, count: int) -> list[str]:
    """Pids of every host process (zombies too) with a real, effective, saved or fs uid in
    [first, first + count)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue  # exited while we looked
        uid_line = next((line for line in text.splitlines() if line.startswith("Uid:")), "")
        if any(first <= int(uid) < first + count for uid in uid_line.split()[1:]):
            found.append(status.parent.name)
    return found
