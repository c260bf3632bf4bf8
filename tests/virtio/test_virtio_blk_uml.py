"""virtio-blk served over vhost-user to a real Linux driver (UML's virtio_uml + virtio_blk)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trio

from appliance.runtime.virtio.blk.device import VirtioBlock
from appliance.runtime.virtio.blk.disk import CowDisk
from appliance.runtime.virtio.device import DEVICE_ID_BLOCK
from appliance.runtime.virtio.rate_limiter import RateLimiter, TokenBucket
from appliance.runtime.virtio.vhost_user.backend import VhostUserBackend
from appliance.runtime.virtio.vhost_user.uml_frontend import missing_prerequisite, run_uml

MIB = 1 << 20
DRIVERS = ["virtio_blk"]
MISSING = missing_prerequisite(DRIVERS)
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


@pytest.fixture
def base_image(tmp_path: Path) -> Path:
    """A 16 MiB template image with a recognisable pattern in its first MiB."""
    image = tmp_path / "base.img"
    with image.open("wb") as f:
        f.write(bytes(range(256)) * (MIB // 256))
        f.truncate(16 * MIB)
    image.chmod(0o444)
    return image


async def test_linux_reads_and_writes_through_the_cow_overlay(tmp_path: Path, base_image: Path) -> None:
    base_digest = hashlib.sha256(base_image.read_bytes()).hexdigest()
    disk = CowDisk(tmp_path / "overlay.img", base=base_image)
    device = VirtioBlock(disk, disk_id="cubetest-disk")
    backend = VhostUserBackend(device, tmp_path / "blk.sock")
    script = """
    echo size=$(cat /sys/block/vda/size)
    echo base=$(dd if=/dev/vda bs=1M count=1 2>/dev/null | sha256sum | cut -d' ' -f1)
    dd if=/dev/urandom of=/tmp/data bs=1M count=4 2>/dev/null
    echo written=$(sha256sum /tmp/data | cut -d' ' -f1)
    dd if=/tmp/data of=/dev/vda bs=1M seek=8 conv=fsync 2>/dev/null
    echo 3 > /proc/sys/vm/drop_caches
    echo readback=$(dd if=/dev/vda bs=1M skip=8 count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    printf 'ABC' | dd of=/dev/vda bs=1 seek=1000 conv=notrunc,fsync 2>/dev/null
    echo serial=$(cat /sys/block/vda/serial)
    echo discard_max=$(cat /sys/block/vda/queue/discard_max_bytes)
    """
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.serve)
        run = await run_uml(script, devices=[(backend.socket_path, DEVICE_ID_BLOCK)], drivers=DRIVERS)
        nursery.cancel_scope.cancel()
    try:
        assert run.value("size") == str(16 * MIB // 512), run.console
        assert run.value("base") == hashlib.sha256(bytes(range(256)) * (MIB // 256)).hexdigest()
        assert run.value("readback") == run.value("written")
        # The host sees the guest's writes through the disk model, the base image never changes.
        assert hashlib.sha256(disk.read(8 * MIB, 4 * MIB)).hexdigest() == run.value("written")
        partial = disk.read(0, 4096)
        expected = bytearray(bytes(range(256)) * 16)
        expected[1000:1003] = b"ABC"
        assert partial == bytes(expected)  # the partial write copied the rest of its block up
        assert hashlib.sha256(base_image.read_bytes()).hexdigest() == base_digest
        assert device.metrics.write_bytes >= 4 * MIB and device.metrics.read_count > 0
        assert device.metrics.flush_count > 0
        assert run.value("serial") == "cubetest-disk"
        assert int(run.value("discard_max")) > 0
    finally:
        disk.close()


async def test_discard_gives_blocks_back_to_the_template(tmp_path: Path, base_image: Path) -> None:
    disk = CowDisk(tmp_path / "overlay.img", base=base_image)
    device = VirtioBlock(disk)
    backend = VhostUserBackend(device, tmp_path / "blk.sock")
    script = """
    dd if=/dev/zero of=/dev/vda bs=1M count=2 conv=fsync 2>/dev/null
    echo zeroed=$(dd if=/dev/vda bs=1M count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    blkdiscard -o 0 -l 2097152 /dev/vda
    echo discarded=$?
    """
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.serve)
            run = await run_uml(script, devices=[(backend.socket_path, DEVICE_ID_BLOCK)], drivers=DRIVERS)
            nursery.cancel_scope.cancel()
        assert run.value("zeroed") == hashlib.sha256(bytes(MIB)).hexdigest()
        assert run.value("discarded") == "0"
        assert device.metrics.discard_count >= 1
        # Discarded blocks read as the template again and hold no overlay space.
        assert disk.read(0, MIB) == bytes(range(256)) * (MIB // 256)
        assert disk.overlay_bytes() == 0
    finally:
        disk.close()


async def test_rate_limiter_throttles_the_guest(tmp_path: Path, base_image: Path) -> None:
    disk = CowDisk(tmp_path / "overlay.img", base=base_image)
    limiter = RateLimiter(bandwidth=TokenBucket(size=MIB, refill_per_second=4 * MIB))
    device = VirtioBlock(disk, rate_limiter=limiter)
    backend = VhostUserBackend(device, tmp_path / "blk.sock")
    # 8 MiB at 4 MiB/s after a 1 MiB burst: at least ~1.7 s.
    script = """
    echo took=$( (time -p dd if=/dev/zero of=/dev/vda bs=1M count=8 oflag=direct) 2>&1 | grep real)
    """
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.serve)
            run = await run_uml(script, devices=[(backend.socket_path, DEVICE_ID_BLOCK)], drivers=DRIVERS)
            nursery.cancel_scope.cancel()
        seconds = float(run.value("took").split()[1])
        assert seconds >= 1.5, run.console
        assert device.metrics.throttled_events > 0
        assert device.metrics.write_bytes == 8 * MIB
    finally:
        disk.close()
