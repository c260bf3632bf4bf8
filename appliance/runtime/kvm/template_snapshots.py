"""Template snapshots: one booted guest per template, saved once, restored by every create.

A snapshot is only valid for the exact inputs that made it: the guest kernel, the
template (its root image), the VMM (the code of the kvm runtime and
its device models, whose saved state the restore reads back), the guest's size and
the host (its kernel release and CPU model: KVM's CPUID and MSRs come from them).
`SnapshotKey` is those inputs; its digest names the snapshot's directory in the
store, and the directory's `key.json` must equal the key, or the snapshot is
refused (never restored) and rebuilt. A snapshot of another key for the same
template is deleted once the new one is in place: running clones keep the old
memory file mapped (the inode lives on while mapped), nothing else reads it.

Only one guest builds a key's snapshot; other creates of the template wait for it
(then restore), and a build that failed says so for the rest of the service's life
(the kvm runtime cannot serve that template version: the service falls back to uml for it).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import platform
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from appliance.records import MANIFEST_NAME, TemplateManifest
from appliance.runtime.base import BootFailed
from appliance.runtime.kvm.snapshot import FORMAT_VERSION, MEMORY_FILE, STATE_FILE

SNAPSHOT_STORE = "kvm-snapshots"  # in the state directory: one snapshot per template (and key)
KEY_FILE = "key.json"
# In the store: a record per template version the kvm runtime cannot serve (the service runs it
# on uml), for `cube doctor`; cleared when the service starts (every version is tried again).
UNSERVABLE_DIR = "unservable"
OVERLAY_NAME = "rootfs.overlay"  # the template guest's disk overlay at the snapshot
# The code whose behaviour and saved state a snapshot depends on.
_VMM_SOURCES = (Path(__file__).parent, Path(__file__).parents[1] / "virtio")
_STAGING_PREFIX = ".staging-"


class TemplateUnservable(BootFailed):
    """The kvm runtime could not boot this template (version) to make its snapshot."""

    def __init__(self, sandbox_id: str, template_id: str, reason: str, console_tail: str = "") -> None:
        why = f"the kvm runtime cannot serve template {template_id}: {reason}"
        super().__init__(sandbox_id, why, console_tail)
        self.template_id = template_id


@functools.cache
def vmm_version() -> str:
    """A digest of the VMM's code (the kvm runtime, the virtio models) and the snapshot format."""
    digest = hashlib.sha256(f"format {FORMAT_VERSION}".encode())
    for root in _VMM_SOURCES:
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in this process."""
    stat = path.stat()
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown"


@dataclass(frozen=True)
class SnapshotKey:
    template_id: str
    template: str  # the root image's size, mtime and inode
    kernel: str  # digest of the guest kernel image
    vmm: str  # vmm_version()
    memory_mb: int
    cpu_count: int
    host: str  # host kernel release and CPU model

    @classmethod
    def of(cls, template: TemplateManifest, kernel: Path, memory_mb: int, cpu_count: int) -> SnapshotKey:
        # What the guest runs is the root image (agent, init, start script included); a rebuilt
        # image is a new file. Env vars and the access token come with /init, after the restore.
        rootfs = template.rootfs.stat()
        return cls(
            template_id=template.template_id,
            template=f"{rootfs.st_size}:{rootfs.st_mtime_ns}:{rootfs.st_ino}",
            kernel=file_digest(kernel),
            vmm=vmm_version(),
            memory_mb=memory_mb,
            cpu_count=cpu_count,
            host=f"{platform.release()} / {_cpu_model()}",
        )

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SnapshotBuild:
    """The right to build one key's snapshot (held by the guest booted to make it)."""

    key: SnapshotKey
    staging: Path  # where the snapshot is written before it is published
    finished: trio.Event
    done: bool = False


class TemplateSnapshots:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._building: dict[SnapshotKey, SnapshotBuild] = {}
        self.unservable: dict[SnapshotKey, str] = {}  # why a key's snapshot could not be built
        if root.exists():  # a build interrupted by a crash or a restart leaves its staging dir
            for leftover in root.glob(_STAGING_PREFIX + "*"):
                shutil.rmtree(leftover, ignore_errors=True)
        shutil.rmtree(root / UNSERVABLE_DIR, ignore_errors=True)  # the last service's verdicts

    def remove(self, template_id: str) -> None:
        """Delete the snapshots of `template_id` (a template deleted while the service runs)."""
        if self.root.is_dir():
            for directory in self.root.glob(f"{glob.escape(template_id)}-*"):
                if re.fullmatch(re.escape(template_id) + r"-[0-9a-f]{16}", directory.name):
                    shutil.rmtree(directory, ignore_errors=True)

    def prune(self, templates_dir: Path) -> list[str]:
        """Delete the snapshots of templates that no longer exist (or never got published)."""
        removed = []
        if self.root.is_dir():
            for directory in self.root.iterdir():
                if directory.name == UNSERVABLE_DIR:
                    continue
                template_id = directory.name[: -len("-0123456789abcdef")]
                if not (templates_dir / template_id / MANIFEST_NAME).is_file():
                    shutil.rmtree(directory, ignore_errors=True)
                    removed.append(directory.name)
        return removed

    def directory(self, key: SnapshotKey) -> Path:
        return self.root / f"{key.template_id}-{key.digest}"

    def valid(self, key: SnapshotKey) -> Path | None:
        """The key's snapshot directory if it holds a complete snapshot made for exactly `key`."""
        directory = self.directory(key)
        try:
            recorded = json.loads((directory / KEY_FILE).read_text())
        except (OSError, ValueError):
            return None
        if recorded != asdict(key):
            return None
        if not all((directory / name).is_file() for name in (STATE_FILE, MEMORY_FILE, OVERLAY_NAME)):
            return None
        return directory

    async def ready_or_claim(self, key: SnapshotKey, sandbox_id: str) -> Path | SnapshotBuild:
        """The valid snapshot for `key`, or (when there is none and nobody builds it) the build,
        which the caller must `publish` or `abandon`. Waits while another guest builds it;
        TemplateUnservable if a build of `key` failed."""
        while True:
            directory = await trio.to_thread.run_sync(self.valid, key)
            if directory is not None:
                return directory
            why = self.unservable.get(key)
            if why is not None:
                raise TemplateUnservable(sandbox_id, key.template_id, why)
            build = self._building.get(key)
            if build is None:
                break
            await build.finished.wait()
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f"{_STAGING_PREFIX}{key.template_id}-{key.digest}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        build = self._building[key] = SnapshotBuild(key, staging, trio.Event())
        return build

    def staging_directory(self, template_id: str) -> Path:
        """A fresh directory to write a snapshot of `template_id` into before `install` (deleted
        with every other staging leftover when the next service starts)."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f"{_STAGING_PREFIX}{template_id}-{os.getpid()}-{os.urandom(4).hex()}"
        staging.mkdir(mode=0o700)  # a sandbox's memory: its secrets (tokens, env) are in it
        return staging

    def install(self, key: SnapshotKey, staging: Path) -> Path:
        """Stamp `staging` (a complete snapshot) with its key and move it into place (atomically):
        a template's first boot publishes its snapshot so, and a sandbox's memory snapshot, which
        is a new template whose snapshot is taken from the running sandbox (cubelet/checkpoints.py)."""
        (staging / KEY_FILE).write_text(json.dumps(asdict(key), sort_keys=True))
        target = self.directory(key)
        shutil.rmtree(target, ignore_errors=True)  # refused (stale or partial) content of this key
        os.replace(staging, target)
        return target

    def publish(self, build: SnapshotBuild) -> Path:
        """Install the build's snapshot; the template's snapshots of other keys, and any record
        that an older version of it could not be served, are deleted."""
        target = self.install(build.key, build.staging)
        self._delete_of(build.key.template_id, keep=target)
        self._finish(build)
        return target

    def forget(self, template_id: str) -> list[str]:
        """A deleted template: its snapshots (every key) and the records of its versions kvm could
        not serve are deleted; returns the snapshot directories removed."""
        for key in [key for key in self.unservable if key.template_id == template_id]:
            del self.unservable[key]
        return self._delete_of(template_id)

    def _delete_of(self, template_id: str, keep: Path | None = None) -> list[str]:
        """Delete the snapshots of `template_id` but `keep`, and its unservable records."""
        of_template = re.compile(re.escape(template_id) + r"-[0-9a-f]{16}")
        removed = []
        for other in self.root.iterdir() if self.root.is_dir() else ():
            if other != keep and of_template.fullmatch(other.name):
                shutil.rmtree(other, ignore_errors=True)
                removed.append(other.name)
        for record in (self.root / UNSERVABLE_DIR).glob("*.json"):  # an older version's verdict
            if of_template.fullmatch(record.stem):
                record.unlink(missing_ok=True)
        return removed

    def abandon(self, build: SnapshotBuild, reason: str | None) -> None:
        """The build ended without a snapshot; `reason` marks the template unservable (None: the
        build was only interrupted, e.g. cancelled: the next create tries again)."""
        if build.done:
            return
        shutil.rmtree(build.staging, ignore_errors=True)
        if reason is not None:
            self._mark_unservable(build.key, reason)
        self._finish(build)

    def refuse(self, key: SnapshotKey, reason: str) -> None:
        """A snapshot of `key` that could not be restored: deleted, and its template version
        unservable until the service restarts (then rebuilt)."""
        shutil.rmtree(self.directory(key), ignore_errors=True)
        self._mark_unservable(key, reason)

    def _mark_unservable(self, key: SnapshotKey, reason: str) -> None:
        self.unservable[key] = reason
        records = self.root / UNSERVABLE_DIR
        records.mkdir(mode=0o700, parents=True, exist_ok=True)
        record = {"template_id": key.template_id, "reason": reason}
        (records / f"{key.template_id}-{key.digest}.json").write_text(json.dumps(record))

    def _finish(self, build: SnapshotBuild) -> None:
        build.done = True
        self._building.pop(build.key, None)
        build.finished.set()


def unservable_templates(state_dir: Path) -> dict[str, str]:
    """The templates the running service's kvm runtime cannot serve (it runs them on uml), and
    why: what its snapshot store recorded since the service started (`cube doctor`)."""
    found = {}
    for path in sorted((state_dir / SNAPSHOT_STORE / UNSERVABLE_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            found[str(record["template_id"])] = str(record["reason"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found
