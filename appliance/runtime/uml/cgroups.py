"""One cgroup leaf per sandbox (`cube/<sandbox_id>`) with its memory, CPU, process and IO limits.

cgroup v2 where its controllers are enabled (a pure v2 host, or the `unified`
hierarchy of a hybrid host when it has them); otherwise v1's separate memory,
cpu and pids hierarchies (hybrid hosts whose v2 hierarchy has no controllers,
like the development machines). The launcher shell writes its own pid into
every `procs_files()` entry before it starts anything else, so every process
of the sandbox is charged and limited from its first page.

IO: a ceiling on the disk that holds the sandboxes' COW files and templates
(`io_limits_for`): v2 `io.max` (and `io.weight`, where the scheduler has one,
lowered for background boots like the CPU weight), or v1 blkio throttling. v1
throttles reads and direct writes; buffered writeback is charged to the
sandbox only under v2. Where neither controller exists, or the directory is on
no block device (tmpfs, overlay), nothing is limited and `IoLimits.unavailable`
says why (the runtime logs it at start).

Hierarchies that only track processes (cgroup v2 mounted at `unified` beside v1's
controllers on hybrid hosts, v1's `name=systemd`) get a leaf too: systemd finds a
unit's processes there, so without it a sandbox would still count as `cube.service`'s
and `systemctl stop/restart` would kill it. With it, sandboxes outlive the service
(systemd/cube.service: KillMode=).

Each sandbox has two leaves: `cube/<sandbox_id>` for its guest (with the limits) and
`cube/<sandbox_id>.supervisor` for its supervisor process (runtime/supervisor), which
is charged apart from the guest and limited in processes only.

Teardown kills whatever is left in the leaves and removes them: nothing of a
sandbox outlives it, whichever way it ended.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "cube"
CPU_PERIOD_US = 100_000
# CPU weight of a background boot (v2 cpu.weight 1..10000, default 100; v1 cpu.shares 2.., default
# 1024): a tenth, so it yields to busy sandboxes without starving while they stay busy.
LOW_CPU_WEIGHT = {2: 10, 1: 102}
NORMAL_CPU_WEIGHT = {2: 100, 1: 1024}
# Each guest address space is a host process under UML: this bounds a fork bomb.
PIDS_MAX = 4096
SUPERVISOR_SUFFIX = ".supervisor"  # the supervisor's leaf: cube/<sandbox_id>.supervisor
SUPERVISOR_PIDS_MAX = 64  # one Python process and Trio's worker threads
_V1_CONTROLLERS = ("memory", "cpu", "pids")
# IO weight (v2 io.weight / io.bfq.weight 1..10000, default 100) of a background boot.
LOW_IO_WEIGHT, NORMAL_IO_WEIGHT = 10, 100
# io.max keys → the v1 blkio files that hold the same limit.
_V1_THROTTLE = {
    "rbps": "blkio.throttle.read_bps_device",
    "wbps": "blkio.throttle.write_bps_device",
    "riops": "blkio.throttle.read_iops_device",
    "wiops": "blkio.throttle.write_iops_device",
}


@dataclass(frozen=True)
class IoLimits:
    """A per-sandbox ceiling on one block device ("MAJ:MIN"); 0 means no limit for that key."""

    device: str | None  # None: nothing to limit (see `unavailable`)
    bps: int = 0  # read and write bytes/s each
    iops: int = 0  # read and write operations/s each
    unavailable: str = ""  # why `device` is None

    def values(self) -> dict[str, int]:
        """io.max's keys with a limit."""
        pairs = {"rbps": self.bps, "wbps": self.bps, "riops": self.iops, "wiops": self.iops}
        return {key: value for key, value in pairs.items() if value > 0}

    def io_max(self) -> str:
        return f"{self.device} " + " ".join(f"{key}={value}" for key, value in self.values().items())


def whole_disk(device: str, sys_block: Path = Path("/sys/dev/block")) -> str:
    """The disk a partition ("MAJ:MIN") belongs to (io.max and blkio take disks only)."""
    node = (sys_block / device).resolve()
    if (node / "partition").exists():
        return (node.parent / "dev").read_text().strip()
    return device


def io_limits_for(path: Path, bps: int, iops: int, root: Path = CGROUP_ROOT) -> IoLimits:
    """The limits sandboxes get for IO to the filesystem holding `path`, or why there are none."""
    if bps <= 0 and iops <= 0:
        return IoLimits(None, unavailable="no IO limit configured (uml_io_bps_max, uml_io_iops_max)")
    v2 = _v2_root(root)
    if not (v2 is not None and "io" in _controllers(v2)) and not (root / "blkio").is_dir():
        return IoLimits(None, unavailable="neither the cgroup v2 io controller nor v1 blkio is available")
    st_dev = os.stat(path).st_dev
    device = f"{os.major(st_dev)}:{os.minor(st_dev)}"
    if not (Path("/sys/dev/block") / device).exists():
        return IoLimits(None, unavailable=f"{path} is on no block device ({device}: tmpfs, overlay, ...)")
    return IoLimits(whole_disk(device), bps, iops)


def _controllers(v2_root: Path) -> set[str]:
    return set((v2_root / "cgroup.controllers").read_text().split())


def _v2_root(root: Path) -> Path | None:
    for candidate in (root, root / "unified"):
        controllers = candidate / "cgroup.controllers"
        if controllers.is_file() and {"memory", "cpu"} <= _controllers(candidate):
            return candidate
    return None


@dataclass(frozen=True)
class SandboxCgroup:
    """The leaf directories of one sandbox (one for v2, one per controller for v1)."""

    version: int
    leaves: dict[str, Path]  # controller (or "unified") → leaf directory

    def procs_files(self) -> list[Path]:
        return [leaf / "cgroup.procs" for leaf in self.leaves.values()]

    def make(self) -> None:
        """Create the leaf directories (and their `cube` parents where missing)."""
        for leaf in self.leaves.values():
            leaf.mkdir(parents=True)

    def memory_usage_bytes(self) -> int:
        if self.version == 2:
            return int((self.leaves["unified"] / "memory.current").read_text())
        return int((self.leaves["memory"] / "memory.usage_in_bytes").read_text())

    def set_low_cpu_weight(self, low: bool) -> None:
        """Least CPU (and IO, where the disk has weights) weight among its siblings (a
        background boot), or the default."""
        weight = (LOW_CPU_WEIGHT if low else NORMAL_CPU_WEIGHT)[self.version]
        if self.version == 2:
            (self.leaves["unified"] / "cpu.weight").write_text(str(weight))
            for name in ("io.weight", "io.bfq.weight"):  # absent unless iocost or BFQ is in use
                if (self.leaves["unified"] / name).exists():
                    (self.leaves["unified"] / name).write_text(
                        str(LOW_IO_WEIGHT if low else NORMAL_IO_WEIGHT)
                    )
        else:
            (self.leaves["cpu"] / "cpu.shares").write_text(str(weight))

    def io_limits(self) -> dict[str, str]:
        """What the kernel holds as this leaf's IO limits: io.max's line, or v1's throttle files."""
        if self.version == 2:
            io_max = self.leaves["unified"] / "io.max"
            return {"io.max": io_max.read_text().strip()} if io_max.exists() else {}
        if "blkio" not in self.leaves:
            return {}
        return {name: (self.leaves["blkio"] / name).read_text().strip() for name in _V1_THROTTLE.values()}

    def pids(self) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files():
            try:
                found.update(int(line) for line in procs.read_text().split())
            except FileNotFoundError:
                pass
        return found

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in the leaf until it is empty (blocking; call from a thread)."""
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {sorted(pids)} survive SIGKILL in {self.leaves}")
            time.sleep(0.005)

    def remove(self) -> None:
        """Kill what is left, then remove the leaves (blocking; call from a thread); leaves that
        are not there are no error."""
        self.kill_all()
        for leaf in self.leaves.values():
            deadline = time.monotonic() + 5.0
            while leaf.exists():
                try:
                    leaf.rmdir()
                except OSError:
                    # Killed tasks leave the cgroup a moment after they are reaped.
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)


def sandbox_of_leaf(name: str) -> str:
    """The sandbox id a leaf is named after (its guest's or its supervisor's)."""
    return name.removesuffix(SUPERVISOR_SUFFIX)


def sweep_empty_leaves(ours: Callable[[str], bool], root: Path = CGROUP_ROOT) -> list[str]:
    """Remove the `cube/<sandbox_id>` leaves (guests' and supervisors') without processes whose
    sandbox `ours` says this service had: what a killed run of it left behind. Only ours: a leaf
    another service on this host has just made is empty too until its guest joins it. The kernel
    refuses to remove a leaf that still has tasks (a sandbox whose supervisor runs on)."""
    removed = []
    for parent in [*root.glob(f"*/{PARENT}"), root / PARENT]:
        if not parent.is_dir():
            continue
        for leaf in parent.iterdir():
            if not (leaf.is_dir() and ours(sandbox_of_leaf(leaf.name))):
                continue
            if not (leaf / "cgroup.procs").read_text().strip():
                try:
                    leaf.rmdir()
                    removed.append(f"{parent.parent.name or '/'}:{leaf.name}")
                except OSError:
                    pass  # gained a task meanwhile
    return removed


def _tracking_leaves(name: str, v2: Path | None, root: Path) -> dict[str, Path]:
    """Leaves in the hierarchies that only track processes: cgroup v2 at `unified` when the
    controllers are v1's, and v1's `name=systemd`."""
    leaves = {}
    if v2 is None and (root / "unified" / "cgroup.procs").is_file():
        leaves["unified"] = root / "unified" / PARENT / name
    if (root / "systemd" / "cgroup.procs").is_file():
        leaves["systemd"] = root / "systemd" / PARENT / name
    return leaves


def _v1_leaves(name: str, with_blkio: bool, root: Path) -> dict[str, Path]:
    leaves = {}
    for controller in [*_V1_CONTROLLERS, *(["blkio"] if with_blkio else [])]:
        hierarchy = root / controller
        if not hierarchy.is_dir():
            raise RuntimeError(f"cgroup v1 controller {controller} is not mounted at {hierarchy}")
        leaves[controller] = hierarchy / PARENT / name
    return leaves


def create_cgroup(
    sandbox_id: str,
    memory_limit_bytes: int,
    cpu_count: int,
    low_cpu_weight: bool = False,
    io: IoLimits | None = None,
    root: Path = CGROUP_ROOT,
) -> SandboxCgroup:
    """Make the sandbox's leaves with its limits (blocking)."""
    cpu_quota = max(1, cpu_count) * CPU_PERIOD_US
    io = io if io is not None and io.device is not None and io.values() else None
    v2 = _v2_root(root)
    if v2 is not None:
        with_io = io is not None and "io" in _controllers(v2)
        parent = v2 / PARENT
        parent.mkdir(exist_ok=True)
        # Controllers must be enabled on the way down for the leaf to have them.
        for directory in (v2, parent):
            (directory / "cgroup.subtree_control").write_text(
                "+memory +cpu +pids" + (" +io" if with_io else "")
            )
        leaf = parent / sandbox_id
        cgroup = SandboxCgroup(2, {"unified": leaf, **_tracking_leaves(sandbox_id, v2, root)})
        try:
            cgroup.make()
            (leaf / "memory.max").write_text(str(memory_limit_bytes))
            if (leaf / "memory.swap.max").exists():  # absent without swap accounting
                (leaf / "memory.swap.max").write_text("0")
            (leaf / "cpu.max").write_text(f"{cpu_quota} {CPU_PERIOD_US}")
            (leaf / "pids.max").write_text(str(PIDS_MAX))
            if with_io and io is not None:
                (leaf / "io.max").write_text(io.io_max())
            if low_cpu_weight:
                cgroup.set_low_cpu_weight(True)
        except BaseException:
            cgroup.remove()
            raise
        return cgroup

    with_blkio = io is not None and (root / "blkio").is_dir()
    leaves = _v1_leaves(sandbox_id, with_blkio, root)
    cgroup = SandboxCgroup(1, {**leaves, **_tracking_leaves(sandbox_id, None, root)})
    try:
        cgroup.make()
        (leaves["memory"] / "memory.limit_in_bytes").write_text(str(memory_limit_bytes))
        (leaves["cpu"] / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
        (leaves["cpu"] / "cpu.cfs_quota_us").write_text(str(cpu_quota))
        (leaves["pids"] / "pids.max").write_text(str(PIDS_MAX))
        if "blkio" in leaves and io is not None:
            for key, value in io.values().items():
                (leaves["blkio"] / _V1_THROTTLE[key]).write_text(f"{io.device} {value}")
        if low_cpu_weight:
            cgroup.set_low_cpu_weight(True)
    except BaseException:
        cgroup.remove()
        raise
    return cgroup


def create_supervisor_cgroup(sandbox_id: str, root: Path = CGROUP_ROOT) -> SandboxCgroup:
    """The leaves of the sandbox's supervisor (blocking): processes limited, nothing else."""
    v2 = _v2_root(root)
    if v2 is not None:  # pids enabled on the way down (a kvm VMM's leaf may be the first one made)
        (v2 / PARENT).mkdir(exist_ok=True)
        for directory in (v2, v2 / PARENT):
            (directory / "cgroup.subtree_control").write_text("+pids")
    cgroup = open_cgroup(sandbox_id + SUPERVISOR_SUFFIX, root)
    try:
        cgroup.make()
        pids = cgroup.leaves["unified" if cgroup.version == 2 else "pids"] / "pids.max"
        pids.write_text(str(SUPERVISOR_PIDS_MAX))
    except BaseException:
        cgroup.remove()
        raise
    return cgroup


def open_cgroup(name: str, root: Path = CGROUP_ROOT) -> SandboxCgroup:
    """The leaves `name` has (or would have) in this host's hierarchies, as `create_cgroup` and
    `create_supervisor_cgroup` make them: what a service that re-adopts a sandbox tears down."""
    v2 = _v2_root(root)
    if v2 is not None:
        return SandboxCgroup(2, {"unified": v2 / PARENT / name, **_tracking_leaves(name, v2, root)})
    with_blkio = (root / "blkio" / PARENT / name).is_dir()
    return SandboxCgroup(1, {**_v1_leaves(name, with_blkio, root), **_tracking_leaves(name, None, root)})
