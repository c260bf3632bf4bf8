"""Restore shells made ahead of time, so creating a sandbox from a template snapshot
costs only applying its state.

A shell is a Machine for the snapshot with nothing applied yet: VM, the memory file
mapped MAP_PRIVATE into a memory slot with dirty-page tracking, in-kernel irqchip and
PIT, vCPUs with their CPUID, and whatever `prepare` adds (the runtime's device
eventfds). Creating those is most of a restore (the memory slot and the PIT wait
on the kernel: milliseconds on a loaded PVM host; `cube bench kvm` shows both paths);
applying vCPU, irqchip, clock and device state takes ~0.5 ms. Shells hold file descriptors, mappings and
the PIT's kernel thread, no threads of ours; `close()` releases them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from appliance.runtime.kvm.machine import Machine
from appliance.runtime.kvm.snapshot import STATE_FILE, MachineState, read_state
from cffi_kvm import Kvm


class ShellPool:
    """Up to `size` ready shells of the snapshot in `directory`, refilled on demand."""

    def __init__(
        self, directory: Path, *, size: int = 2, prepare: Callable[[Machine], None] | None = None
    ) -> None:
        self.directory = directory
        self.size = size
        self._prepare = prepare
        # The snapshot a shell was made for: a re-taken snapshot makes a new pool.
        self.version = (directory / STATE_FILE).stat().st_mtime_ns
        self.state: MachineState = read_state(directory)
        self._kvm = Kvm()
        self._ready: list[Machine] = []
        self._filling = False
        self._closed = False

    @property
    def ready(self) -> int:
        return len(self._ready)

    async def _new_shell(self) -> Machine:
        # Shielded: a cancellation arriving while the worker thread builds the shell would
        # otherwise drop the finished shell on the floor (its VM and mappings never closed).
        with trio.CancelScope(shield=True):
            shell = await trio.to_thread.run_sync(self._make_shell)
        return shell

    def _make_shell(self) -> Machine:
        shell = Machine.prepare_restore(self._kvm, self.directory, self.state, track_dirty_pages=True)
        try:
            if self._prepare is not None:
                self._prepare(shell)
        except BaseException:
            shell.close()
            raise
        return shell

    async def refill(self, target: int | None = None) -> None:
        """Make shells (in a worker thread, one at a time) until `target` (at most `size`,
        default `size`) are ready; returns at once if another refill is running."""
        wanted = self.size if target is None else min(target, self.size)
        if self._filling:
            return
        self._filling = True
        try:
            while len(self._ready) < wanted and not self._closed:
                shell = await self._new_shell()
                if self._closed:
                    shell.close()
                    return
                self._ready.append(shell)
        finally:
            self._filling = False

    async def restore(
        self, *, add_devices: Callable[[Machine], None], console: Callable[[bytes], object]
    ) -> Machine:
        """A machine continuing where the snapshot stopped: a ready shell if there is one,
        else a new one; `add_devices` re-creates the snapshot's devices (same names)."""
        if self._ready:
            machine = self._ready.pop()
        else:
            machine = await self._new_shell()
        try:
            machine.set_console(console)
            add_devices(machine)
            machine.apply_state(self.state)
        except BaseException:
            machine.close()
            raise
        return machine

    def close(self) -> None:
        self._closed = True
        while self._ready:
            self._ready.pop().close()
        self._kvm.close()
