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
