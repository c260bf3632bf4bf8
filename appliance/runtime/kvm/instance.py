"""A running kvm sandbox as the cubelet and the proxy see it: pause/resume, snapshot, memory."""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import trio

from appliance.runtime.base import MemoryFootprint
from appliance.runtime.kvm.machine import Machine
from appliance.runtime.kvm.snapshot import MEMORY_FILE
from appliance.runtime.kvm.template_snapshots import OVERLAY_NAME
from appliance.runtime.kvm.vcpu import VcpuExit
from appliance.runtime.sparse import sparse_copy
from appliance.runtime.uml.console import ConsoleLog
from appliance.runtime.virtio.device import VirtioDevice

# In the sandbox's directory while it is paused: the pause's diff snapshot.
PAUSED_SNAPSHOT_DIR = "kvm-paused"
# Beside a template snapshot: the boot token its guest's agent holds, and so every clone's.
AGENT_TOKEN_FILE = "agent-token"


def save_agent_token(directory: Path, token: str) -> None:
    fd = os.open(
        directory / AGENT_TOKEN_FILE,
        os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
    )
    with os.fdopen(fd, "w") as f:
        f.write(token)


def snapshot_agent_token(directory: Path) -> str:
    """The boot token a template snapshot's agent holds. The clones of one snapshot all hold it
    (it is in their memory and on their /proc/cmdline): safe only because /init kills it, and
    the cubelet sends /init before anything else. "" if unknown."""
    try:
        return (directory / AGENT_TOKEN_FILE).read_text().strip()
    except OSError:
        return ""


@dataclass
class KvmInstance:
    sandbox_id: str
    console_log: Path
    host_ip: str
    machine: Machine
    disk_overlay: Path
    # The guest's console (its agent's ready lines); None for a bare machine (tests).
    console: ConsoleLog | None = None
    # Restored from a template snapshot taken once the default kernel answered.
    restored: bool = False
    # Its virtio devices: stopped with the vCPUs (host-side I/O must not write guest memory
    # while a pause's diff or a snapshot holds it).
    devices: list[VirtioDevice] = field(default_factory=list)
    agent_token: str = field(default="", repr=False)  # see Instance.agent_token
    _run_scope: trio.CancelScope | None = None
    _resumed: trio.Event | None = None
    _paused: trio.Event | None = None
    _swapped_out: tuple[Path, list[tuple[int, int]]] | None = None  # while paused: the diff

    def endpoint(self, port: int) -> tuple[str, int]:
        return self.host_ip, port

    async def wait_fully_ready(self) -> None:
        """Until the guest agent's default Python kernel answers (a clone's did before its snapshot)."""
        if not self.restored and self.console is not None:
            await self.console.interpreter_ready.wait()

    def fully_ready(self) -> bool:
        return self.restored or self.console is None or self.console.interpreter_ready.is_set()

    async def pause(self) -> None:
        """Stop the vCPUs. A guest restored from a snapshot also writes what it changed
        since (a diff: the pages dirtied since the template snapshot, its vCPU and device
        state) into PAUSED_SNAPSHOT_DIR and gives those pages back to the host: its RAM
        is the template's page cache again until resume copies the diff back."""
        if self._resumed is not None:
            return
        await self._stop_vcpus()
        memory = self.machine.memory
        if memory.track_dirty and memory.backing_file is not None:
            directory = self.disk_overlay.parent / PAUSED_SNAPSHOT_DIR
            write = functools.partial(self.machine.snapshot, directory, incremental=True)
            info = await trio.to_thread.run_sync(write)
            memory.discard_private_pages()
            self._swapped_out = (directory, info.state.diff_runs)

    async def resume(self) -> None:
        if self._swapped_out is not None:
            directory, runs = self._swapped_out
            memory = self.machine.memory
            await trio.to_thread.run_sync(memory.apply_diff, directory / MEMORY_FILE, runs)
            self._swapped_out = None
            await trio.to_thread.run_sync(shutil.rmtree, directory)
        self._continue_vcpus()

    async def _stop_vcpus(self) -> None:
        for device in self.devices:
            device.pause_io()
        self._resumed, self._paused = trio.Event(), trio.Event()
        if self._run_scope is not None:
            self._run_scope.cancel()  # kicks the vCPUs out of KVM_RUN; threads are joined
        await self._paused.wait()

    def _continue_vcpus(self) -> None:
        if self._resumed is not None:
            resumed, self._resumed = self._resumed, None
            resumed.set()
        for device in self.devices:
            device.resume_io()

    async def snapshot(self, directory: Path) -> None:
        """Stop, write the whole machine (vCPUs, devices, all of RAM) and the disk overlay,
        continue: a template snapshot, which every later sandbox of the template restores."""
        await self._stop_vcpus()
        try:
            await trio.to_thread.run_sync(self.machine.snapshot, directory)  # flushes the disk
            await trio.to_thread.run_sync(sparse_copy, self.disk_overlay, directory / OVERLAY_NAME)
            save_agent_token(directory, self.agent_token)
        finally:
            self._continue_vcpus()

    def memory_usage_bytes(self) -> int:
        return self.machine.memory.resident_bytes()

    def memory_footprint(self) -> MemoryFootprint:
        """A clone's private copies apart from its template snapshot's page cache (shared by
        every clone); a paused clone's diff is on disk, not in memory."""
        return self.machine.memory.footprint()

    async def run_until_exit(self) -> VcpuExit:
        """Run the vCPUs; a pause stops them (nothing runs) until resume."""
        while True:
            self._run_scope = trio.CancelScope()
            with self._run_scope:
                outcome = await self.machine.run()
            if not self._run_scope.cancelled_caught:
                return outcome
            assert self._paused is not None and self._resumed is not None
            self._paused.set()
            await self._resumed.wait()
