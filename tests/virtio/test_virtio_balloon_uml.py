"""virtio-balloon free page reporting served to real UML guests: freed guest memory leaves the host.

Two levels: a throwaway UML guest (busybox init) whose balloon is served straight
from the test, watching the guest's memory file on the host; and a real sandbox
from the uml runtime (default template), watching its cgroup's memory.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from umlguests import claim, default_template, private_config

from appliance.config import Config
from appliance.cubelet.envd_client import run_command
from appliance.net.service import CubeVS
from appliance.records import TemplateManifest
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


# ---- a hostile frontend: one sandbox must never take the service down -----------------------

# The service side, in its own process so that a SIGBUS (how a mapped memory file that its
# owner truncated used to end the service) is observed instead of ending the test run: two
# sandboxes' balloons served exactly as the runtime serves them (SandboxBalloon.serve).
SERVICE = """
import json, logging, sys
from pathlib import Path
import trio
from appliance.runtime.uml.balloon import SandboxBalloon
from appliance.runtime.virtio.balloon.device import VirtioBalloon
from appliance.runtime.virtio.vhost_user.backend import VhostUserBackend

async def main() -> None:
    balloons = {}
    for name in ("attacker", "victim"):
        backend = VhostUserBackend(VirtioBalloon(), Path(sys.argv[1]) / name)
        balloons[name] = SandboxBalloon(backend.device, backend, backend.listen())
    async with trio.open_nursery() as nursery:
        for name, balloon in balloons.items():
            nursery.start_soon(balloon.serve, name)
        print("listening", flush=True)
        await trio.wrap_file(sys.stdin).read()  # until the test closes our stdin
        nursery.cancel_scope.cancel()
    print(json.dumps({n: b.device.metrics.released_bytes for n, b in balloons.items()}), flush=True)

logging.basicConfig(level=logging.WARNING)
trio.run(main)
"""

# vhost-user requests the frontend below sends (QEMU's docs/interop/vhost-user.rst).
GET_FEATURES, SET_FEATURES, SET_OWNER, SET_MEM_TABLE = 1, 2, 3, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, SET_VRING_KICK, SET_VRING_CALL = 8, 9, 10, 12, 13
RAM_GPA, RAM_SIZE, RAM_USER_ADDR, RING_SIZE = 0x100000, 4 * MIB, 0x7F00_0000_0000, 8


class HostileFrontend:
    """What a UML process under the sandbox's control can do: serve the balloon its own memory
    file over vhost-user, post free page reports, and truncate that file whenever it likes."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.memory = os.memfd_create("frontend-ram")
        os.ftruncate(self.memory, RAM_SIZE)
        os.pwrite(self.memory, b"\xaa" * RAM_SIZE, 0)
        self.kicks = [os.eventfd(0) for _ in range(3)]  # one per queue: a kick names its queue
        self.kick = self.kicks[REPORTING_QUEUE]
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.reports = 0

    def ring(self, queue: int) -> tuple[int, int, int]:
        base = RAM_GPA + 3 * 0x1000 * queue  # desc, avail, used: a page each
        return base, base + 0x1000, base + 0x2000

    async def send(self, request: int, payload: bytes = b"", fd: int | None = None) -> None:
        message = struct.pack("<III", request, 1, len(payload)) + payload
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))] if fd is not None else []
        await self.sock.sendmsg([message], ancillary)

    async def connect(self) -> None:
        await self.sock.connect(str(self.socket_path))
        await self.send(GET_FEATURES)
        reply = await self.sock.recv(12 + 8)
        features = struct.unpack_from("<Q", reply, 12)[0] & ~(1 << 30)  # no protocol features
        await self.send(SET_FEATURES, struct.pack("<Q", features))
        await self.send(SET_OWNER)
        table = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", RAM_GPA, RAM_SIZE, RAM_USER_ADDR, 0)
        await self.send(SET_MEM_TABLE, table, self.memory)
        for queue in range(3):
            desc, avail, used = (a - RAM_GPA + RAM_USER_ADDR for a in self.ring(queue))
            await self.send(SET_VRING_NUM, struct.pack("<II", queue, RING_SIZE))
            await self.send(SET_VRING_BASE, struct.pack("<II", queue, 0))
            await self.send(SET_VRING_ADDR, struct.pack("<IIQQQQ", queue, 0, desc, used, avail, 0))
            await self.send(SET_VRING_CALL, struct.pack("<Q", queue), self.call)
            await self.send(SET_VRING_KICK, struct.pack("<Q", queue), self.kicks[queue])

    def post_report(self, offset: int) -> None:
        """Report RAM [offset, offset + 1 MiB) free on the reporting queue (not kicked yet)."""
        desc, avail, _used = (a - RAM_GPA for a in self.ring(REPORTING_QUEUE))
        slot = self.reports % RING_SIZE
        os.pwrite(
            self.memory, struct.pack("<QIHH", RAM_GPA + offset, MIB, VIRTQ_DESC_F_WRITE, 0), desc + 16 * slot
        )
        os.pwrite(self.memory, struct.pack("<H", slot), avail + 4 + 2 * slot)
        self.reports += 1
        os.pwrite(self.memory, struct.pack("<HH", 0, self.reports), avail)

    def returned(self) -> int:
        _desc, _avail, used = (a - RAM_GPA for a in self.ring(REPORTING_QUEUE))
        return int(struct.unpack("<H", os.pread(self.memory, 2, used + 2))[0])

    async def report(self, offset: int) -> None:
        self.post_report(offset)
        os.eventfd_write(self.kick, 1)
        with trio.fail_after(30):
            while self.returned() != self.reports:
                await trio.sleep(0.01)

    def allocated(self) -> int:
        return os.fstat(self.memory).st_blocks * 512

    def close(self) -> None:
        self.sock.close()
        for fd in (self.memory, *self.kicks, self.call):
            os.close(fd)


async def test_truncated_memory_file_stops_only_that_balloon(tmp_path: Path) -> None:
    service = await trio.lowlevel.open_process(
        [sys.executable, "-c", SERVICE, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    attacker, victim = HostileFrontend(tmp_path / "attacker"), HostileFrontend(tmp_path / "victim")
    try:
        assert service.stdout is not None and service.stdin is not None
        with trio.fail_after(30):
            assert (await service.stdout.receive_some(64)).startswith(b"listening")
        await attacker.connect()
        await victim.connect()
        await attacker.report(MIB)
        assert attacker.allocated() == RAM_SIZE - MIB  # a working balloon until now

        # The attack: a report is waiting, the memory file is cut to nothing, then the kick.
        attacker.post_report(2 * MIB)
        os.ftruncate(attacker.memory, 0)
        os.eventfd_write(attacker.kick, 1)
        with trio.fail_after(30):
            assert await attacker.sock.recv(1) == b""  # the service ended that balloon's session
        assert service.returncode is None, f"the service died (status {service.returncode})"

        # Another sandbox's balloon is served as before.
        await victim.report(MIB)
        await victim.report(2 * MIB)
        assert victim.allocated() == RAM_SIZE - 2 * MIB
        await service.stdin.aclose()
        with trio.fail_after(30):
            await service.wait()
        output = (await service.stdout.receive_some(4096)).decode()
        errors = (await service.stderr.receive_some(65536)).decode() if service.stderr else ""
        assert service.returncode == 0, errors
        assert json.loads(output.strip().splitlines()[-1]) == {"attacker": MIB, "victim": 2 * MIB}
        assert "attacker: balloon backend stopped" in errors and "FrontendMemoryGone" in errors, errors
    finally:
        if service.returncode is None:
            service.kill()
            await service.wait()
        attacker.close()
        victim.close()
