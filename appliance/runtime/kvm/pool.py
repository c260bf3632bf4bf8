"""Restore shells made ahead of time, so creating a sandbox from a template snapshot
costs only applying its state.

A shell is a Machine for the snapshot with nothing applied yet: VM, in-kernel irqchip
and PIT, the memory file mapped MAP_PRIVATE into a memory slot with dirty-page
tracking, vCPUs with their CPUID. Creating those is most of a restore (on PVM
KVM_SET_USER_MEMORY_REGION of 512 MiB and KVM_CREATE_PIT2 take ~10 ms together);
applying vCPU, irqchip, clock and device state takes ~1 ms. Shells hold file
descriptors and mappings only (no threads); `close()` releases them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import trio

from appliance.runtime.kvm.machine import Machine
from appliance.runtime.kvm.snapshot import STATE_FILE, MachineState, read_state
from cffi_kvm import Kvm


class ShellPool:
    """Up to `size` ready shells of the snapshot in `directory`, refilled on demand."""

    def __init__(self, directory: Path, *, size: int = 1) -> None:
        self.directory = directory
        self.size = size
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
        make = functools.partial(
            Machine.prepare_restore, self._kvm, self.directory, self.state, track_dirty_pages=True
        )
        with trio.CancelScope(shield=True):
            shell = await trio.to_thread.run_sync(make)
        return shell

    async def refill(self) -> None:
        """Make shells (in a worker thread, one at a time) until `size` are ready."""
        if self._filling:
            return
        self._filling = True
        try:
            while len(self._ready) < self.size and not self._closed:
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
