"""Which process a pid names, for processes that outlive the one that started them.

A pid alone is reused once its process is reaped; a pid with its start time is not (the
kernel's start time in clock ticks since boot, /proc/<pid>/stat field 22). `open_pidfd`
takes a pidfd first and checks the start time after: a pidfd names one process for good,
so once the check has passed, signals and exit polls through it reach that process and no
other, whatever happens to the pid meanwhile. Names (comm, cmdline) are never looked at:
any process may take any name.

Shared below every layer (like `errors.py`): CubeVS records the owner of a sandbox network
with it, the uml runtime finds its supervisors by it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot; ProcessLookupError if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(pid) from None
    # comm (field 2) may hold spaces and parentheses: the fields after it follow the last ")".
    return int(stat[stat.rindex(")") + 2 :].split()[19])


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity:
        return cls(pid, start_time(pid))

    @classmethod
    def current(cls) -> ProcessIdentity:
        return cls.of(os.getpid())

    def open_pidfd(self) -> int | None:
        """A pidfd of this very process (close it), or None when it is gone (a zombie counts as
        gone: it runs nothing any more) or the pid names another process now."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return None
        try:
            if start_time(self.pid) == self.start_time and not _is_zombie(self.pid):
                return pidfd
        except ProcessLookupError:
            pass
        os.close(pidfd)
        return None

    def alive(self) -> bool:
        pidfd = self.open_pidfd()
        if pidfd is None:
            return False
        os.close(pidfd)
        return True

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start_time": self.start_time}

    @classmethod
    def from_json(cls, data: object) -> ProcessIdentity:
        """ValueError unless `data` is what `to_json` made."""
        if not isinstance(data, dict):
            raise ValueError(f"not a process identity: {data!r}")
        pid, started = data.get("pid"), data.get("start_time")
        if not (isinstance(pid, int) and pid > 0 and isinstance(started, int) and started >= 0):
            raise ValueError(f"not a process identity: {data!r}")
        return cls(pid, started)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True  # reaped meanwhile
    return stat[stat.rindex(")") + 2 :].split()[0] in ("Z", "X")
