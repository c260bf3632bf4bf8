"""Starting a child as another user without forking the agent.

CPython starts a child with vfork() (cheap: no copy of the parent's page tables) only when
it changes no identity; with `user=`, `group=` or `extra_groups=` (or a `preexec_fn`) it
falls back to fork(), which copies the page tables of the whole agent. Under User-mode
Linux that copy is the single largest cost of a command: ~110 ms of the ~145 ms it took
to start `/bin/true` as `user` (see docs/BENCHMARKS.md), against ~12 ms for fork+exec
of a small shell.

So a child that must run as another user is started (vfork, as root) through util-linux's
`setpriv`, which sets the supplementary groups, then the gid, then the uid (real, effective
and saved, so it cannot switch back: the kernel clears root's capabilities on that change),
and execs the command in place: the pid, session, process group, environment, cwd and
file descriptors are the command's, exactly as with `user=`.

Only for commands whose exec cannot fail for reasons that only the child would see: an
absolute path to a regular file in a system directory that everyone may execute. Anything
else (a relative name, a script in a home directory) keeps the fork path, so a command that
cannot be executed still fails the start call as before instead of exiting 126/127.
"""

from __future__ import annotations

import os
import stat

from appliance.guest.users import User

SETPRIV = "/usr/bin/setpriv"
# Where root's and everyone's PATH binaries live: writable by root only, searchable by all.
SYSTEM_DIRS = frozenset({"/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"})


def _everyone_may_run(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & stat.S_IXOTH)


def setpriv_argv(user: User, argv: list[str]) -> list[str] | None:
    """`argv` run as `user` through setpriv (started by vfork), or None where the child must
    change identity itself (fork): no setpriv here, or a command outside the system dirs."""
    command = argv[0]
    if not os.path.isabs(command) or os.path.dirname(os.path.normpath(command)) not in SYSTEM_DIRS:
        return None
    if not (_everyone_may_run(command) and _everyone_may_run(SETPRIV)):
        return None
    groups = ",".join(str(group) for group in user.groups())
    group_option = f"--groups={groups}" if groups else "--clear-groups"
    return [SETPRIV, f"--reuid={user.uid}", f"--regid={user.gid}", group_option, "--", *argv]


def identity_options(user: User, argv: list[str]) -> tuple[list[str], dict[str, object]]:
    """The argv and the open_process options that start `argv` as `user`: through setpriv where
    it can, else with CPython's own identity switch (fork); unchanged when no switch is needed."""
    if not user.needs_switch():
        return argv, {}
    wrapped = setpriv_argv(user, argv)
    if wrapped is not None:
        return wrapped, {}
    return argv, {"user": user.uid, "group": user.gid, "extra_groups": user.groups()}
