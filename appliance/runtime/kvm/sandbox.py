"""A running kvm sandbox as the cubelet and the proxy see it: reached over its network, changed
through its VMM process (runtime/kvm/vmm.py), which owns the machine."""

from __future__ import annotations

import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from appliance.runtime.base import MemoryFootprint
from appliance.runtime.kvm.vmm import SNAPSHOT_OUT
from appliance.runtime.kvm.volumes import guest_device, make_image
from appliance.runtime.supervisor.client import GuestEvents, SupervisorClient, SupervisorGone
from appliance.runtime.supervisor.protocol import Op, ProtocolError

# Pause writes a clone's diff and snapshot writes all of its RAM: seconds on a busy host.
CONTROL_TIMEOUT_S = 120.0
METRICS_INTERVAL_S = 2.0


class GuestControlFailed(RuntimeError):
    """The VMM could not pause, resume or snapshot the guest; the text says why."""


@dataclass
class KvmSandbox:
    sandbox_id: str
    console_log: Path
    agent_token: str = field(repr=False)  # "" for a guest adopted after a restart (claimed long ago)
    host_ip: str
    sandbox_dir: Path
    vmm: SupervisorClient
    events: GuestEvents
    # A clone's template snapshot memory file (its page cache is shared by every clone), or "".
    shared_key: str = ""
    uid: int = 0  # the sandbox's (its VMM's and its directory's)
    detached: bool = False  # set by `detach`: the task's cancel leaves the guest running
    _metrics: dict[str, float] = field(default_factory=dict)

    def endpoint(self, port: int) -> tuple[str, int]:
        return self.host_ip, port

    async def wait_fully_ready(self) -> None:
        await self.events.interpreter_ready.wait()

    def fully_ready(self) -> bool:
        return self.events.interpreter_ready.is_set()

    def detach(self) -> None:
        self.detached = True

    async def pause(self) -> None:
        """Stop the vCPUs; a clone's diff goes to disk and its pages back to the host."""
        await self._control(Op.PAUSE)

    async def resume(self) -> None:
        await self._control(Op.RESUME)

    async def snapshot(self, directory: Path) -> None:
        """The whole machine (vCPUs, devices, all of RAM) and its disk overlay into `directory`
        (which must not exist), the guest running on: written by the VMM into the sandbox's own
        directory (the only one it may write), then moved here and made root's."""
        await self._control(Op.SNAPSHOT)
        await trio.to_thread.run_sync(_take_over, self.sandbox_dir / SNAPSHOT_OUT, directory)

    async def attach_disk(self, slot: int, size_bytes: int, fill: Callable[[int], Awaitable[None]]) -> str:
        """A new disk image of `size_bytes` in volume slot `slot` (`fill(fd)` writes its
        filesystem), plugged into the running guest (runtime/kvm/volumes.py); the guest's device
        path. ValueError (no such slot), OSError or GuestControlFailed (the VMM refused it)."""
        await make_image(self.sandbox_dir, self.uid, slot, size_bytes, fill)
        await self._control(Op.ATTACH_DISK, slot=slot)
        return guest_device(slot)

    async def _control(self, op: Op, *, slot: int = 0) -> None:
        try:
            reply = await self.vmm.request(op, slot=slot, timeout=CONTROL_TIMEOUT_S)
        except SupervisorGone as exc:
            raise GuestControlFailed(f"{op}: {exc}") from exc
        if not reply.ok:
            raise GuestControlFailed(f"{op}: {reply.error}")

    async def follow_metrics(self) -> None:
        """Keep the VMM's memory figures fresh (what `memory_footprint` answers at once)."""
        while True:
            try:
                reply = await self.vmm.request(Op.METRICS)
            except (SupervisorGone, ProtocolError):
                reply = None
            if reply is not None and reply.metrics is not None:
                self._metrics = reply.metrics
            await trio.sleep(METRICS_INTERVAL_S)

    def memory_usage_bytes(self) -> int:
        return int(self._metrics.get("memory_bytes", 0))

    def memory_footprint(self) -> MemoryFootprint | None:
        """What the guest's RAM holds, as its VMM last measured it (None until it has: the
        budget then charges the template's whole memory_mb)."""
        if "private_bytes" not in self._metrics:
            return None
        shared = int(self._metrics.get("shared_bytes", 0))
        return MemoryFootprint(int(self._metrics["private_bytes"]), self.shared_key, shared)


def _take_over(written: Path, directory: Path) -> None:
    """Make the VMM's snapshot `directory`, root's, checked: the VMM runs as the sandbox uid and
    may have been taken over by its guest, so nothing it wrote is trusted to be what it should.
    Moved first (a rename: it no longer is in the sandbox's directory), made root's and 0700
    (a descriptor the VMM kept on it can add nothing), then every entry must be a regular
    file: a symlink or anything else there is refused, never followed."""
    os.rename(written, directory)
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:  # ELOOP: a symlink; ENOTDIR
        os.unlink(directory)
        raise GuestControlFailed(f"the VMM's snapshot is not a directory: {exc}") from exc
    try:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    for entry in os.scandir(directory):
        if not entry.is_file(follow_symlinks=False):
            shutil.rmtree(directory, ignore_errors=True)
            raise GuestControlFailed(f"the VMM's snapshot holds {entry.name}, which is not a regular file")
        os.chown(entry.path, 0, 0, follow_symlinks=False)
