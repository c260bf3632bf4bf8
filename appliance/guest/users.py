"""The Linux users that processes and file operations act as."""

from __future__ import annotations

import base64
import os
import pwd
import stat
from dataclasses import dataclass


class UnknownUser(LookupError):
    """A call named (or the sandbox defaults to) a user this system does not have."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown user {name!r}")
        self.name = name


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str
    shell: str

    def needs_switch(self) -> bool:
        """Whether a child must change identity (lookup_user only names others when we are root)."""
        return self.uid != os.geteuid()

    def groups(self) -> list[int]:
        try:
            return os.getgrouplist(self.name, self.gid)
        except OSError:
            return [self.gid]

    def can_write(self, directory: str) -> bool:
        """Whether this user may create files in `directory` (by its mode bits; ACLs aside)."""
        try:
            st = os.stat(directory)
        except OSError:
            return False
        if self.uid == 0:
            return True
        if st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IWUSR)
        if st.st_gid in self.groups():
            return bool(st.st_mode & stat.S_IWGRP)
        return bool(st.st_mode & stat.S_IWOTH)

    def chown(self, path: str) -> None:
        """Give a file the agent created to this user (a no-op unless the agent is root)."""
        if os.geteuid() == 0 and self.uid != 0:
            try:
                os.lchown(path, self.uid, self.gid)
            except OSError:
                pass


def agent_user() -> User:
    """The agent's own user; HOME from the environment wins, so tests can use a temp home."""
    entry = pwd.getpwuid(os.geteuid())
    return User(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        home=os.environ.get("HOME") or entry.pw_dir,
        shell=entry.pw_shell or "/bin/sh",
    )


def lookup_user(name: str) -> User:
    """The named user; UnknownUser if there is none (never the agent's own user: that is root in a
    guest). The agent's own user stands in for every user when the agent is not root (it could
    not switch anyway)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise UnknownUser(name) from None
    if entry.pw_uid == os.geteuid() or os.geteuid() != 0:
        return agent_user()
    return User(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        home=entry.pw_dir,
        shell=entry.pw_shell or "/bin/sh",
    )


def user_from_basic_auth(header: str | None) -> str | None:
    """`Authorization: Basic base64("<user>:")` names the user (PROTOCOL.md §3.8)."""
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip()).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    name = decoded.split(":", 1)[0]
    return name or None
