"""virtio-balloon free page reporting served to real UML guests: freed guest memory leaves the host.

Two levels: a throwaway UML guest (busybox init) whose balloon is served straight
from the test, watching the guest's memory file on the host; and a real sandbox
from the uml runtime (default template), watching its cgroup's memory.
"""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from umlguests import claim, default_template, private_config

from appliance.config import Config
from appliance.cubelet.envd_client import run_command
from appliance.net.service import CubeVS
from appliance.runtime.base import BootSpec
from appliance.runtime.uml.balloon import kernel_has_balloon
from appliance.runtime.uml.instance import UmlInstance
from appliance.runtime.uml.runtime import UmlRuntime
from appliance.runtime.virtio.balloon.device import REPORTING_QUEUE, VirtioBalloon
from appliance.runtime.virtio.device import DEVICE_ID_BALLOON
from appliance.runtime.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Queue
from appliance.runtime.virtio.vhost_user.backend import VhostUserBackend
from appliance.runtime.virtio.vhost_user.memory import FrontendMemory
from appliance.runtime.virtio.vhost_user.uml_frontend import missing_prerequisite, run_uml
from appliance.templates.manifest import TemplateManifest

DRIVERS = ["virtio_balloon"]
MISSING = missing_prerequisite(DRIVERS)
MIB = 1 << 20
FILLED_MIB = 200
# What must come back of FILLED_MIB: the guest reports free blocks of its reporting order
# and up, so a few MiB next to pages still in use may stay.
RETURNED_AT_LEAST_MIB = 150
# A running sandbox's guest takes some freed pages again at once (its agent, page cache,
# Python kernel), so less of the same fill is measurably given back by its cgroup.
SANDBOX_RETURNED_AT_LEAST_MIB = 100
SAMPLE_INTERVAL_S = 0.25
RELEASE_WAIT_S = 90.0  # reporting starts ~2 s after the frees; generous for a loaded host
TEST_HOST_NETWORK = "10.233.0.0/24"  # apart from tests/uml, tests/kvm and the benches
TEST_UID_BASE = 315_000


def guest_memory_file_bytes(marker: str) -> int | None:
    """Allocated bytes of the (deleted) memory file of the UML process whose command line has
    `marker`: what the host really spends on the guest's RAM."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/dev/shm/") and target.endswith("(deleted)"):
                    return os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return None


async def test_reports_outside_guest_ram_or_not_page_sized_release_nothing() -> None:
    """A driver's report, written into a real memory file the way the frontend shares it: only
    the whole pages inside guest RAM are punched out; the rest is counted and acknowledged."""
    ram_gpa, ram_size, user_addr = 0x100000, 4 * MIB, 0x7F00_0000_0000
    desc, avail, used = ram_gpa, ram_gpa + 0x1000, ram_gpa + 0x2000  # the rings, in the first page
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, ram_size)
    os.pwrite(fd, b"\xaa" * ram_size, 0)
    table = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", ram_gpa, ram_size, user_addr, 0)
    memory = FrontendMemory.from_table(table, [os.dup(fd)])
    ranges = [
        (ram_gpa + MIB, MIB),  # whole pages inside RAM: released
        (0x1000, 0x1000),  # below RAM
        (ram_gpa + ram_size - 0x1000, 0x2000),  # runs past the end of RAM
        (ram_gpa + 3 * MIB + 100, 100),  # no whole page in it
    ]
    for i, (addr, length) in enumerate(ranges):
        flags = VIRTQ_DESC_F_WRITE | (VIRTQ_DESC_F_NEXT if i + 1 < len(ranges) else 0)
        memory.write(desc + 16 * i, struct.pack("<QIHH", addr, length, flags, i + 1))
    memory.write(avail, struct.pack("<HHH", 0, 1, 0))  # flags, idx 1, ring[0] = head 0
    memory.write(used, struct.pack("<HH", 0, 0))
    queues = [Queue(8) for _ in range(3)]
    state = queues[REPORTING_QUEUE].state
    state.desc_table, state.avail_ring, state.used_ring, state.ready = desc, avail, used, True
    interrupts: list[int] = []
    device = VirtioBalloon()
    try:
        async with trio.open_nursery() as nursery:
            device.activate(memory, queues, interrupts.append)
            nursery.start_soon(device.run_io)
            device.process_queue(REPORTING_QUEUE)
            with trio.fail_after(30):
                while memory.read_int(used + 2, 2) != 1:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert interrupts == [REPORTING_QUEUE]
        assert struct.unpack("<II", memory.read(used + 4, 8)) == (0, 0)  # head 0, nothing written
        assert device.metrics.released_bytes == MIB and device.metrics.rejected_ranges == 3, device.metrics
        assert os.fstat(fd).st_blocks * 512 == ram_size - MIB
        assert os.pread(fd, MIB, MIB) == bytes(MIB)  # the released range reads as zeroes
        assert os.pread(fd, MIB, 0)[0x3000:] == b"\xaa" * (MIB - 0x3000)  # the rest is untouched
        assert os.pread(fd, 2 * MIB, 2 * MIB) == b"\xaa" * (2 * MIB)
    finally:
        device.reset()
        memory.close()
        os.close(fd)


@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
async def test_freed_guest_memory_leaves_the_memory_file(tmp_path: Path) -> None:
    device = VirtioBalloon()
    backend = VhostUserBackend(device, tmp_path / "balloon.sock")
    script = f"""
    echo drivers=$(ls /sys/bus/virtio/drivers/virtio_balloon | grep -c virtio)
    dd if=/dev/zero of=/tmp/big bs=1M count={FILLED_MIB} 2>/dev/null
    echo filled=$(du -m /tmp/big | cut -f1)
    sleep 4
    rm /tmp/big
    sleep 15
    # Pages the host punched out come back as fresh memory that holds what is written.
    dd if=/dev/zero bs=1M count=64 2>/dev/null | tr '\\0' x > /tmp/after
    echo after_size=$(wc -c < /tmp/after)
    echo after_other_bytes=$(tr -d x < /tmp/after | wc -c)
    """
    samples: list[int] = []

    async def sample() -> None:
        while True:
            size = guest_memory_file_bytes(str(backend.socket_path))
            if size is not None:
                samples.append(size)
            await trio.sleep(SAMPLE_INTERVAL_S)

    async with trio.open_nursery() as nursery:
        await nursery.start(backend.serve)
        nursery.start_soon(sample)
        run = await run_uml(
            script,
            devices=[(backend.socket_path, DEVICE_ID_BALLOON)],
            drivers=DRIVERS,
            memory_mb=512,
            timeout=180,
        )
        nursery.cancel_scope.cancel()

    assert run.value("drivers") == "1", run.console
    assert run.value("filled") == str(FILLED_MIB)
    assert run.value("after_size") == str(64 * MIB)
    assert run.value("after_other_bytes") == "0"
    peak_at = samples.index(max(samples))
    peak, released = samples[peak_at], min(samples[peak_at:])
    assert peak >= FILLED_MIB * MIB, [s // MIB for s in samples]
    assert peak - released >= RETURNED_AT_LEAST_MIB * MIB, [s // MIB for s in samples]
    assert device.metrics.released_bytes >= RETURNED_AT_LEAST_MIB * MIB, device.metrics
    assert device.metrics.reports > 0 and device.metrics.rejected_ranges == 0, device.metrics


# ---- a real sandbox of the uml runtime ---------------------------------------------------------


@pytest.fixture(scope="module")
def template() -> TemplateManifest:
    return default_template()


@pytest.fixture
def sandbox_config() -> Iterator[Config]:
    with private_config("cubetest-balloon-", TEST_HOST_NETWORK, TEST_UID_BASE) as config:
        yield config


@pytest.fixture
async def runtime(sandbox_config: Config) -> AsyncIterator[UmlRuntime]:
    async with CubeVS.start(sandbox_config, dns_upstreams=["127.0.0.1:9"]) as cubevs:
        runtime = UmlRuntime(sandbox_config, cubevs)
        if not kernel_has_balloon(runtime.kernel):
            pytest.skip(f"{runtime.kernel} has no virtio-balloon: run `cube image build-uml-kernel`")
        yield runtime


@pytest.mark.uml
@pytest.mark.slow
async def test_sandbox_gives_freed_memory_back(
    runtime: UmlRuntime, sandbox_config: Config, template: TemplateManifest
) -> None:
    sandbox_id = "cubetest-balloon-" + secrets.token_hex(4)
    spec = BootSpec.for_template(sandbox_config, template, sandbox_id, 0)
    async with trio.open_nursery() as nursery:
        instance = await nursery.start(runtime.run, spec)
        assert isinstance(instance, UmlInstance)
        await claim(instance)  # opens its agent to run_command
        host = instance.host_ip

        filled = await run_command(host, f"dd if=/dev/zero of=/dev/shm/big bs=1M count={FILLED_MIB}")
        assert filled.exit_code == 0, filled
        peak = instance.memory_usage_bytes()
        removed = await run_command(host, "rm /dev/shm/big")
        assert removed.exit_code == 0, removed
        usage = [peak]
        with trio.move_on_after(RELEASE_WAIT_S):
            while peak - usage[-1] < SANDBOX_RETURNED_AT_LEAST_MIB * MIB:
                await trio.sleep(SAMPLE_INTERVAL_S)
                usage.append(instance.memory_usage_bytes())
        assert peak - usage[-1] >= SANDBOX_RETURNED_AT_LEAST_MIB * MIB, [u // MIB for u in usage]

        # Still a working sandbox, on memory the host gave back and the guest takes again.
        again = await run_command(
            host, "head -c 100000000 /dev/zero | tr '\\0' x | tr -d x | wc -c; echo alive"
        )
        assert again.exit_code == 0 and again.stdout.split() == ["0", "alive"], again
        nursery.cancel_scope.cancel()
    assert not spec.sandbox_dir.exists()
