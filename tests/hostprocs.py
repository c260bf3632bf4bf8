"""What the sandbox teardown tests look for on the host (shared by tests/uml and tests/net), and
the processes below one (tests/guest: an agent's kernels)."""

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


def parent_of(pid: int) -> int:
    """The parent pid of a live process."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def descendants(pid: int) -> list[tuple[int, str, str]]:
    """(pid, start time, command line) of every live process below `pid` (zombies left out): the
    start time tells a process from a later one that got its pid."""
    children: dict[int, list[tuple[int, str, str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append((int(entry.name), fields[19], command))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child[0])
    return found


def sandbox_leftovers(sandbox_ids: set[str], uid_base: int, slots: int) -> dict[str, list[str]]:
    """What is left on the host of these sandboxes: their network namespaces, their cgroup leaves
    (a guest's, and its supervisor's: the supervisor is alive while its leaf has it), processes
    of the sandbox uids [uid_base, uid_base + slots)."""
    from appliance.runtime.uml.cgroups import CGROUP_ROOT, SUPERVISOR_SUFFIX

    names = sandbox_ids | {i + SUPERVISOR_SUFFIX for i in sandbox_ids}
    leaves = [*CGROUP_ROOT.glob("*/cube/*"), *CGROUP_ROOT.glob("cube/*")]
    netns = Path("/run/netns")
    return {
        "netns": sorted(n.name for n in netns.iterdir() if n.name.removeprefix("cube-") in sandbox_ids)
        if netns.is_dir()
        else [],
        "cgroups": sorted(str(leaf) for leaf in leaves if leaf.name in names),
        "processes": processes_of_uid_range(uid_base, slots),
    }
