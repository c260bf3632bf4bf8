"""Volumes mounted into sandboxes (`volume_mounts` on create): one writer at a time, copied in at
the claim, copied back out before the guest stops.

A volume is a file tree on the host (`<state_dir>/volumes/<id>/data`, master/volumes.py). A
guest without 9p, NFS or FUSE can only share it as a block device, so at the claim:

1. the volume is taken for this sandbox: `mount.json` created with O_EXCL in the volume's
   directory (a second mount while the holder lives is refused: `VolumeBusy`, 409; a holder that
   is no sandbox of this node any more, after a crash of the service, is stale and replaced);
2. an ext4 image of the tree (`mke2fs -d`, sized by the volume's cap) is hot-plugged into the
   guest (the runtime's `attach_disk`: uml's mconsole `config ubdN=`; kvm's empty virtio-blk
   volume slot, given the image and a config-change interrupt, runtime/kvm/volumes.py) and
   mounted at the path as root by the guest agent, its root owned by the sandbox's user.

When the sandbox ends (kill, timeout, health), before its guest is stopped, the guest agent
streams a tar of the mount point (frozen with fsfreeze, so no writer changes it meanwhile) to
the host; the host takes it apart into a fresh tree with no-follow operations only
(`templates/untrusted_tree.Tree`: directories, regular files, symlinks kept as links, hardlinks
inside the tree; devices and fifos dropped; setuid bits dropped; the cap enforced) and swaps it in
for the volume's `data`. The host never mounts the guest-written image (a crafted filesystem is
kernel attack surface) and never follows a link of the guest's. A guest that dies first (crash,
kill by the host) leaves the volume as it was at the claim: its writes since are lost.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

import trio

from appliance.cubelet.envd_client import GuestAgent
from appliance.cubelet.volume_unpack import DATA_DIR, unpack_volume

log = logging.getLogger(__name__)

VOLUMES_DIR = "volumes"  # in the state dir
MOUNT_FILE = "mount.json"  # the sandbox holding the volume, while one does
OUTGOING_FILE = "outgoing.tar"  # the guest's tar while it streams in
SYNC_TIMEOUT_S = 300.0  # the guest's tar of one volume, streamed and unpacked
MOUNT_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 5.0  # a guest that does not answer /health by then is not asked for its volumes
# ext4 without a journal (the image is never reused after the guest) loses ~3% to metadata.
IMAGE_OVERHEAD_BYTES = 4 << 20
# What the host accepts of a guest's tar: the data (at most the image's size) and headers.
STREAM_SLACK_BYTES = 16 << 20
ROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}

# Run as root in the guest: wait (bounded) for the hot-plugged device to be there with its size
# (a kvm volume slot is there from the boot, 0 bytes until its driver read the new capacity),
# mount it, give its root to the sandbox's user. $1 device, $2 mount point, $3 user.
MOUNT_SCRIPT = """
set -e
i=0
size=/sys/class/block/${1##*/}/size
until [ -b "$1" ] && [ "$(cat "$size" 2>/dev/null || echo 0)" != 0 ]; do
  i=$((i+1)); [ "$i" -le 200 ] || { echo "device $1 did not appear" >&2; exit 3; }
  sleep 0.05
done
mkdir -p -- "$2"
mount -t ext4 -o nosuid,nodev,noatime -- "$1" "$2"
chown -- "$3": "$2"
"""
# Run as root in the guest at the end: freeze the mount (writers wait; reads go on), tar it to
# stdout. $1 mount point: if nothing is mounted there (the sandbox was carried over a restart
# without its mounts), an empty directory must not replace the volume. tar's status 1 ("file
# changed as we read it") still wrote an archive.
SYNC_SCRIPT = """
mountpoint -q -- "$1" || { echo "$1 is not mounted" >&2; exit 3; }
sync
fsfreeze -f "$1" 2>/dev/null
exec tar -C "$1" --sparse --numeric-owner -cf - .
"""


class VolumeMountError(Exception):
    """A mount the request asked for cannot be made; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class VolumeBusy(VolumeMountError):
    def __init__(self, volume_id: str, holder: str) -> None:
        super().__init__(
            409, f"volume {volume_id} is mounted in sandbox {holder}; a volume has one sandbox at a time"
        )


@runtime_checkable
class DiskHotplug(Protocol):
    """An instance that takes a new disk while it runs (`UmlInstance.attach_disk`,
    `KvmSandbox.attach_disk`). ValueError: no such slot (more volumes than the runtime takes)."""

    async def attach_disk(
        self, slot: int, size_bytes: int, fill: Callable[[int], Awaitable[None]]
    ) -> str: ...


@dataclass(frozen=True)
class VolumeMount:
    volume_id: str
    path: str  # absolute, normalised, inside the guest (api/volumes.py checks it)


@dataclass(frozen=True)
class MountRecord:
    """`mount.json`: which sandbox holds the volume, where, and whether the guest mounted it."""

    sandbox_id: str
    path: str
    mounted: bool = False


def _read_record(directory: Path) -> MountRecord | None:
    """The volume's `mount.json`: None if it has none, an empty (stale) record if unreadable."""
    try:
        return MountRecord(**json.loads((directory / MOUNT_FILE).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return MountRecord(sandbox_id="", path="")


def held_by(state_dir: Path, sandbox_id: str) -> list[tuple[str, MountRecord]]:
    """The volumes `sandbox_id` holds, by volume id (from the volumes' own files under `state_dir`)."""
    root = state_dir / VOLUMES_DIR
    if not root.is_dir():
        return []
    held = []
    for entry in sorted(root.iterdir()):
        record = _read_record(entry)
        if record is not None and record.sandbox_id == sandbox_id:
            held.append((entry.name, record))
    return held


class VolumeMounts:
    def __init__(self, state_dir: Path, cap_bytes: int, holder_alive: Callable[[str], bool]) -> None:
        self.root = state_dir / VOLUMES_DIR
        self.cap_bytes = cap_bytes
        self._holder_alive = holder_alive  # the sandbox is on this node still (ending counts)
        self._saving: dict[str, trio.Event] = {}  # sandboxes whose volumes are being copied back

    def begin_saving(self, sandbox_id: str) -> None:
        """`sandbox_id` ends and its volumes are about to be copied back (`wait_saved` waits for it)."""
        self._saving.setdefault(sandbox_id, trio.Event())

    async def wait_saved(self, sandbox_id: str) -> None:
        """Until the volumes of the ending `sandbox_id` are back in place (at once if it has none),
        so a kill's answer means the volume holds the sandbox's files."""
        event = self._saving.get(sandbox_id)
        if event is not None:
            await event.wait()

    def _dir(self, volume_id: str) -> Path:
        return self.root / volume_id

    def _read(self, volume_id: str) -> MountRecord | None:
        return _read_record(self._dir(volume_id))

    def _write(self, volume_id: str, record: MountRecord, *, exclusive: bool) -> None:
        path = self._dir(volume_id) / MOUNT_FILE
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_EXCL if exclusive else os.O_TRUNC)
        with os.fdopen(os.open(path, flags, 0o600), "w") as f:
            json.dump(record.__dict__, f)

    def holder(self, volume_id: str) -> str | None:
        """The live sandbox the volume is mounted in, if any."""
        record = self._read(volume_id)
        if record is None or not record.sandbox_id or not self._holder_alive(record.sandbox_id):
            return None
        return record.sandbox_id

    def held_by(self, sandbox_id: str) -> list[tuple[str, MountRecord]]:
        """The volumes `sandbox_id` holds (found in the volumes' own files: they outlive a restart)."""
        return held_by(self.root.parent, sandbox_id)

    def _claim(self, mount: VolumeMount, sandbox_id: str) -> None:
        for _ in range(2):
            try:
                self._write(mount.volume_id, MountRecord(sandbox_id, mount.path), exclusive=True)
                return
            except FileExistsError:
                holder = self.holder(mount.volume_id)
                if holder is not None:
                    raise VolumeBusy(mount.volume_id, holder) from None
                log.warning("volume %s: its mount by a sandbox that is gone is released", mount.volume_id)
                (self._dir(mount.volume_id) / MOUNT_FILE).unlink(missing_ok=True)
            except FileNotFoundError:
                raise VolumeMountError(404, f"volume {mount.volume_id} not found") from None
        raise VolumeBusy(mount.volume_id, "another")

    def release(self, volume_id: str, sandbox_id: str) -> None:
        record = self._read(volume_id)
        if record is not None and record.sandbox_id == sandbox_id:
            (self._dir(volume_id) / MOUNT_FILE).unlink(missing_ok=True)

    # At the claim.

    async def attach(
        self,
        sandbox_id: str,
        instance: object,
        agent: GuestAgent | None,
        mounts: list[VolumeMount],
        user: str,
    ) -> None:
        """Mount `mounts` in the guest (before it becomes the user's sandbox). VolumeMountError:
        refused or failed (the caller ends the guest); nothing stays claimed then."""
        if not isinstance(instance, DiskHotplug) or agent is None:
            raise VolumeMountError(400, "volume mounts need the kvm or uml runtime on this appliance")
        claimed: list[VolumeMount] = []
        try:
            for mount in mounts:
                self._claim(mount, sandbox_id)
                claimed.append(mount)
            for slot, mount in enumerate(mounts, start=1):
                started = trio.current_time()
                await self._mount(instance, agent, slot, mount, user)
                took = trio.current_time() - started
                log.info(
                    "volume %s mounted at %s in %s (%.2f s)", mount.volume_id, mount.path, sandbox_id, took
                )
                self._write(
                    mount.volume_id, MountRecord(sandbox_id, mount.path, mounted=True), exclusive=False
                )
        except BaseException:
            for mount in claimed:
                self.release(mount.volume_id, sandbox_id)
            raise

    async def _mount(
        self, instance: DiskHotplug, agent: GuestAgent, slot: int, mount: VolumeMount, user: str
    ) -> None:
        data = self._dir(mount.volume_id) / DATA_DIR
        try:
            device = await instance.attach_disk(slot, self.cap_bytes + IMAGE_OVERHEAD_BYTES, _mke2fs(data))
            with trio.fail_after(MOUNT_TIMEOUT_S):
                argv = ["/bin/sh", "-c", MOUNT_SCRIPT, "mount", device, mount.path, user]
                code = await agent.run(argv, "root", ROOT_ENV, "/")
        except VolumeMountError:
            raise
        except ValueError as exc:
            raise VolumeMountError(400, f"cannot mount volume {mount.volume_id}: {exc}") from exc
        except Exception as exc:
            raise VolumeMountError(500, f"cannot mount volume {mount.volume_id}: {exc}") from exc
        if code != 0:
            raise VolumeMountError(500, f"the guest could not mount volume {mount.volume_id} (exit {code})")

    # At the end.

    async def sync_out(self, sandbox_id: str, agent: GuestAgent | None) -> None:
        """Bring the files of every volume `sandbox_id` holds back from its (still running) guest,
        then release them. A guest that cannot answer loses its writes; the volume keeps its
        files from before the mount."""
        try:
            await self._sync_all(sandbox_id, agent)
        finally:
            event = self._saving.pop(sandbox_id, None)
            if event is not None:
                event.set()

    async def _sync_all(self, sandbox_id: str, agent: GuestAgent | None) -> None:
        held = self.held_by(sandbox_id)
        # A guest that does not answer (it crashed, or hangs) is not waited for: its writes are lost.
        answers = agent is not None and bool(held) and await agent.healthy(HEALTH_TIMEOUT_S)
        for volume_id, record in held:
            try:
                if not (record.mounted and answers and agent is not None):
                    raise VolumeMountError(500, "its guest does not answer")
                with trio.fail_after(SYNC_TIMEOUT_S):
                    await self._sync_one(volume_id, record.path, agent)
            except Exception as exc:  # whatever the guest did, the node goes on
                log.warning(
                    "volume %s: the files of sandbox %s could not be brought back (%s); it keeps "
                    "its files from before the mount",
                    volume_id,
                    sandbox_id,
                    exc,
                )
            finally:
                self.release(volume_id, sandbox_id)

    async def _sync_one(self, volume_id: str, path: str, agent: GuestAgent) -> None:
        directory = self._dir(volume_id)
        limit = 2 * (self.cap_bytes + IMAGE_OVERHEAD_BYTES) + STREAM_SLACK_BYTES
        archive = directory / OUTGOING_FILE
        with _BoundedFile(archive, limit) as out:
            code = await agent.run(
                ["/bin/sh", "-c", SYNC_SCRIPT, "sync", path], "root", ROOT_ENV, "/", stdout=out.write
            )
        try:
            if code not in (0, 1):
                raise VolumeMountError(500, f"the guest's tar of {path} failed (exit {code})")
            skipped = await trio.to_thread.run_sync(unpack_volume, archive, directory, self.cap_bytes)
        finally:
            archive.unlink(missing_ok=True)
        if skipped:
            log.warning("volume %s: left out of it (over its cap or not a file): %s", volume_id, skipped[:20])


def _mke2fs(data: Path) -> Callable[[int], Awaitable[None]]:
    """A filler of an image fd: an ext4 filesystem holding the tree `data` (the host's own files:
    no guest writes to it while it is claimed; mke2fs copies links as links)."""

    async def fill(fd: int) -> None:
        argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0"]
        argv += ["-E", "root_owner=0:0", "-d", str(data), f"/proc/self/fd/{fd}"]
        result = await trio.run_process(
            argv, pass_fds=(fd,), capture_stdout=True, capture_stderr=True, check=False
        )
        if result.returncode != 0:
            message = result.stderr.decode(errors="replace").strip()[-300:]
            raise VolumeMountError(500, f"cannot make the volume's disk image: {message}")

    return fill


class _BoundedFile:
    """A new root-only file that refuses to grow past `limit` bytes (a guest's endless stream)."""

    def __init__(self, path: Path, limit: int) -> None:
        path.unlink(missing_ok=True)
        self._file: IO[bytes] = os.fdopen(
            os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "wb"
        )
        self._left = limit

    def write(self, chunk: bytes) -> None:
        self._left -= len(chunk)
        if self._left < 0:
            raise VolumeMountError(507, "the guest's tar of the volume is larger than the volume can be")
        self._file.write(chunk)

    def __enter__(self) -> _BoundedFile:
        return self

    def __exit__(self, *_: object) -> None:
        self._file.close()
