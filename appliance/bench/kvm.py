"""`cube bench kvm`: what the kvm runtime costs on this host.

- restore: a 512 MiB guest's snapshot restored the way KvmRuntime restores (its
  shell pool, its device eventfds) until the vCPU runs guest code again (its first
  exit after restore), warm page cache; with and without a shell made ahead;
- clone memory: RSS/PSS/private growth of this process per live clone before the
  guests write anything;
- exit round trip: guest `out` / MMIO store to a userspace device and back;
- virtio-blk throughput: a UML guest's virtio_blk driver doing direct I/O against
  the device model over vhost-user.
All with the host's virtualization kind (PVM here), via bench.report.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path

import click
import trio

from appliance.bench.options import json_dir_option
from appliance.bench.report import Report, percentiles
from appliance.runtime.kvm.machine import Machine, MachineConfig
from appliance.runtime.kvm.pool import ShellPool
from appliance.runtime.kvm.runtime import wire_device_slots
from appliance.runtime.kvm.x86 import enter_long_mode
from appliance.runtime.virtio.blk.device import VirtioBlock
from appliance.runtime.virtio.blk.disk import CowDisk
from appliance.runtime.virtio.device import DEVICE_ID_BLOCK
from appliance.runtime.virtio.vhost_user.backend import VhostUserBackend
from appliance.runtime.virtio.vhost_user.uml_frontend import missing_prerequisite, run_uml
from cffi_kvm import Kvm

MIB = 1 << 20
CODE = 0x10000
REPORT_PORT = 0x90
MMIO_DEVICE = 0xD000_0000

# Hand-assembled so the bench needs no assembler: `out %eax, $0x90` in a loop
# counting in ebx, or one MMIO store per iteration.
#   again: inc %ebx; mov %ebx,%eax; out %eax,$0x90; jmp again
PIO_LOOP = bytes.fromhex("ffc389d8e790ebf8")
#   mov $0xd0000000,%edi; again: inc %ebx; mov %ebx,(%rdi); jmp again
MMIO_LOOP = bytes.fromhex("bf000000d0ffc3891febfa")


class _Reporter:
    """Counts guest reports; stops the machine after `stop_after` of them."""

    def __init__(self) -> None:
        self.machine: Machine | None = None
        self.count = 0
        self.stop_after = 1
        self.first_at = 0.0

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.count += 1
        if self.count == 1:
            self.first_at = time.perf_counter()
        if self.count >= self.stop_after and self.machine is not None:
            self.machine.request_stop()

    def attach(self, machine: Machine) -> None:
        self.machine = machine
        machine.add_pio_device("reporter", self, REPORT_PORT, 4)


def _smaps() -> dict[str, int]:
    values: dict[str, int] = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            match = re.match(r"(\w+):\s+(\d+) kB", line)
            if match:
                values[match.group(1)] = int(match.group(2)) * 1024
    return values


def _template(kvm: Kvm, directory: Path, memory_mb: int) -> None:
    reporter = _Reporter()
    machine = Machine.new(kvm, MachineConfig(memory_size=memory_mb * MIB))
    try:
        reporter.attach(machine)
        # Fill guest RAM, as a booted guest with its page cache would: every page non-zero.
        seed = hashlib.sha256(b"cube").digest() * (MIB // 32)
        for offset in range(1 * MIB, memory_mb * MIB, MIB):
            machine.memory.write(offset, seed)
        machine.memory.write(CODE, PIO_LOOP)
        enter_long_mode(machine.memory, machine.vcpus[0].vcpu, rip=CODE, rsp=0x8000)
        reporter.stop_after = 3
        trio.run(machine.run)
        machine.snapshot(directory)
    finally:
        machine.close()


def bench_restore(snapshot: Path, rounds: int) -> dict[str, list[float]]:
    """Seconds per round, inside one running Trio loop (as in `cube serve`), restoring
    through KvmRuntime's own path: a ShellPool of the template snapshot whose shells get
    the runtime's device eventfds (`wire_device_slots`), dirty-page tracking on.

    - plain ready / plain: a create that finds no shell ready (the pool makes one: VM,
      memory slot of the template's file, irqchip, PIT, vCPU, 4 irqfds, 7 ioeventfds)
      → restore returned / → the vCPU executed guest code (its first exit);
    - pooled: a create that finds a shell made ahead → guest code runs.
    Rounds alternate the two, so both see the same host load. The template's
    state.json is parsed once per pool, as the runtime does.
    """
    samples: dict[str, list[float]] = {"plain ready": [], "plain": [], "pooled": []}

    async def restore_and_run(pool: ShellPool, ready_key: str | None, key: str) -> None:
        reporter = _Reporter()
        started = time.perf_counter()
        machine = await pool.restore(add_devices=reporter.attach, console=lambda data: None)
        if ready_key is not None:
            samples[ready_key].append(time.perf_counter() - started)
        try:
            await machine.run()
        finally:
            await machine.aclose()
        samples[key].append(reporter.first_at - started)

    async def main() -> None:
        no_shells = ShellPool(snapshot, size=0, prepare=wire_device_slots)
        shells = ShellPool(snapshot, prepare=wire_device_slots)
        try:
            for _ in range(rounds):
                await restore_and_run(no_shells, "plain ready", "plain")
                await shells.refill()
                await restore_and_run(shells, None, "pooled")
        finally:
            no_shells.close()
            shells.close()

    trio.run(main)
    return samples


def bench_clone_memory(kvm: Kvm, snapshot: Path, clones: int) -> dict[str, float]:
    before = _smaps()
    machines = []
    try:
        for _ in range(clones):
            reporter = _Reporter()
            machine = Machine.restore(kvm, snapshot, add_devices=reporter.attach)
            machines.append(machine)
            trio.run(machine.run)  # the vCPU ran guest code (reads only: the loop writes no RAM)
        after = _smaps()
    finally:
        for machine in machines:
            machine.close()
    return {
        key: (after.get(key, 0) - before.get(key, 0)) / clones / MIB
        for key in ("Rss", "Pss", "Private_Dirty", "Anonymous")
    }


def bench_exits(kvm: Kvm, loop: bytes, count: int, *, mmio: bool) -> float:
    """Seconds per guest exit handled in userspace."""
    reporter = _Reporter()
    machine = Machine.new(kvm, MachineConfig(memory_size=16 * MIB))
    try:
        reporter.attach(machine)
        if mmio:
            machine.add_mmio_device("mmio-reporter", reporter, MMIO_DEVICE, 0x1000)
        machine.memory.write(CODE, loop)
        enter_long_mode(machine.memory, machine.vcpus[0].vcpu, rip=CODE, rsp=0x8000)
        reporter.stop_after = count
        started = time.perf_counter()
        trio.run(machine.run)
        return (time.perf_counter() - started) / reporter.count
    finally:
        machine.close()


def bench_virtio_blk(size_mb: int) -> dict[str, float] | str:
    """MB/s of a UML guest's direct reads and writes through the virtio-blk model."""
    missing = missing_prerequisite(["virtio_blk"])
    if missing:
        return missing
    # busybox `time -p` prints "real S" (10 ms resolution) on stderr.
    script = f"""
    echo write=$( (time -p dd if=/dev/zero of=/dev/vda bs=1M count={size_mb} oflag=direct) 2>&1 | grep real)
    echo read=$( (time -p dd if=/dev/vda of=/dev/null bs=1M count={size_mb} iflag=direct) 2>&1 | grep real)
    """
    with tempfile.TemporaryDirectory(prefix="cube-bench-blk-") as tmp:
        work = Path(tmp)
        base = work / "base.img"
        with base.open("wb") as f:
            f.truncate(2 * size_mb * MIB)
        disk = CowDisk(work / "overlay.img", base=base)
        backend = VhostUserBackend(VirtioBlock(disk), work / "blk.sock")

        async def main() -> dict[str, float]:
            async with trio.open_nursery() as nursery:
                await nursery.start(backend.serve)
                run = await run_uml(
                    script,
                    devices=[(backend.socket_path, DEVICE_ID_BLOCK)],
                    drivers=["virtio_blk"],
                    timeout=300,
                )
                nursery.cancel_scope.cancel()
            return {f"{kind}_MBps": _dd_rate(run.value(kind), size_mb) for kind in ("write", "read")}

        try:
            return trio.run(main)
        finally:
            disk.close()


TIME_RESOLUTION_S = 0.01


def _dd_rate(line: str, size_mb: int) -> float:
    match = re.search(r"real ([0-9.]+)", line)
    if match is None:
        raise ValueError(f"unexpected time output: {line!r}")
    # `time -p` has 10 ms resolution: a transfer that fast reads as 0.00 (a lower bound then).
    return size_mb * MIB / 1e6 / max(float(match.group(1)), TIME_RESOLUTION_S)


@click.command("kvm")
@click.option("--memory-mb", default=512, show_default=True, help="guest size of the restored snapshot")
@click.option("--rounds", default=20, show_default=True, help="restores to time")
@click.option("--clones", default=10, show_default=True, help="live clones for the memory measurement")
@click.option("--exits", default=2000, show_default=True, help="guest exits to time")
@click.option("--blk-mb", default=128, show_default=True, help="MiB the UML guest writes and reads")
@json_dir_option("kvm.json")
def kvm_command(
    memory_mb: int, rounds: int, clones: int, exits: int, blk_mb: int, json_dir: Path | None
) -> None:
    """Restore latency, clone memory, exit cost and virtio-blk throughput of the kvm runtime."""
    report = Report("kvm")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        report.notes.append("/dev/kvm is not usable here: only the virtio-blk (UML) row was measured")
    else:
        with Kvm() as kvm, tempfile.TemporaryDirectory(prefix="cube-bench-kvm-") as tmp:
            snapshot = Path(tmp) / "template"
            _template(kvm, snapshot, memory_mb)
            restore = bench_restore(snapshot, rounds)
            report.add(
                metric=f"restore {memory_mb} MiB snapshot, no shell ready: VM ready",
                **percentiles(restore["plain ready"]),
            )
            report.add(
                metric=f"restore {memory_mb} MiB snapshot, no shell ready: vCPU running guest code",
                target="p50 < 10 ms",
                **percentiles(restore["plain"]),
            )
            report.add(
                metric=f"restore {memory_mb} MiB snapshot from a pooled shell (KvmRuntime's usual path): "
                "vCPU running",
                target="p50 < 10 ms",
                **percentiles(restore["pooled"]),
            )
            growth = bench_clone_memory(kvm, snapshot, clones)
            report.add(
                metric=f"memory per clone ({clones} live, before guest writes)",
                target="< 5 MiB",
                rss_mib=growth["Rss"],
                pss_mib=growth["Pss"],
                private_dirty_mib=growth["Private_Dirty"],
            )
            for name, loop, mmio in (("port I/O", PIO_LOOP, False), ("MMIO", MMIO_LOOP, True)):
                per_exit = bench_exits(kvm, loop, exits, mmio=mmio)
                report.add(
                    metric=f"{name} exit round trip (userspace device)", mean_us=per_exit * 1e6, n=exits
                )
    blk = bench_virtio_blk(blk_mb)
    if isinstance(blk, str):
        report.notes.append(f"virtio-blk via UML skipped: {blk}")
    else:
        report.add(metric=f"virtio-blk via UML vhost-user ({blk_mb} MiB, O_DIRECT, 1 MiB blocks)", **blk)
    report.show(json_dir)


if __name__ == "__main__":
    kvm_command()
