"""Device state saved as plain data is read back in full (the Firecracker persist way).

Every device's `save()` is a dataclass written as JSON-able data; `restore()` rebuilds that
dataclass and applies every field, and refuses state with a field missing or unknown (a
snapshot of another device version), never half restoring it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.runtime.virtio.balloon.device import VirtioBalloon
from appliance.runtime.virtio.blk.device import VirtioBlock
from appliance.runtime.virtio.blk.disk import CowDisk
from appliance.runtime.virtio.device import VirtioDevice
from appliance.runtime.virtio.mmio import MmioTransport
from appliance.runtime.virtio.net.device import VirtioNet
from appliance.runtime.virtio.rng.device import VirtioRng
from appliance.runtime.virtio.vsock.device import VirtioVsock

MIB = 1 << 20


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[Callable[[int], CowDisk]]:
    made: list[CowDisk] = []

    def make(size: int) -> CowDisk:
        disk = CowDisk(tmp_path / f"overlay-{len(made)}", size=size)
        made.append(disk)
        return disk

    yield make
    for disk in made:
        disk.close()


def device_pairs(tmp_path: Path, disks: Callable[[int], CowDisk]) -> list[tuple[VirtioDevice, VirtioDevice]]:
    """(source, fresh twin) per device type, the source's fields set away from their defaults."""
    block = VirtioBlock(disks(8 * MIB))
    block.metrics.read_count, block.metrics.write_bytes = 7, 4096
    net = VirtioNet(-1, bytes.fromhex("06aa00000001"))
    net.metrics.rx_bytes = 1500
    vsock = VirtioVsock(3, tmp_path / "a.sock")
    vsock.metrics.rx_bytes = 2
    rng = VirtioRng()
    rng.metrics.bytes_served = 64
    balloon = VirtioBalloon()
    balloon.actual_pages = 12
    pairs: list[tuple[VirtioDevice, VirtioDevice]] = [
        (block, VirtioBlock(disks(8 * MIB))),
        (net, VirtioNet(-1, bytes.fromhex("06aa000000ff"))),
        (vsock, VirtioVsock(7, tmp_path / "b.sock")),
        (rng, VirtioRng()),
        (balloon, VirtioBalloon()),
    ]
    for source, _ in pairs:
        source.acked_features = source.available_features()
    return pairs


def test_every_device_reads_back_every_field_it_saved(
    tmp_path: Path, disks: Callable[[int], CowDisk]
) -> None:
    for source, twin in device_pairs(tmp_path, disks):
        saved = json.loads(json.dumps(source.save()))  # what a snapshot's state.json holds
        twin.restore(saved)
        assert twin.save() == saved, type(source).__name__
        assert twin.acked_features == source.available_features()
    net_source, net_twin = device_pairs(tmp_path, disks)[1]
    net_twin.restore(net_source.save())
    # The guest's driver read the snapshotted device's MAC: the restored device shows that one.
    assert net_twin.config_space()[:6] == bytes.fromhex("06aa00000001")


@pytest.mark.parametrize("change", ["missing", "unknown"])
def test_state_of_another_device_version_is_refused_not_half_restored(
    tmp_path: Path, disks: Callable[[int], CowDisk], change: str
) -> None:
    for source, twin in device_pairs(tmp_path, disks):
        saved = source.save()
        if change == "missing":
            del saved["metrics" if "metrics" in saved else "acked_features"]
        else:
            saved["added_in_another_version"] = 1
        with pytest.raises(ValueError, match="saved fields"):
            twin.restore(saved)
        assert twin.acked_features == 0, type(source).__name__  # nothing applied


def test_a_block_device_restores_only_onto_a_disk_like_the_snapshots(disks: Callable[[int], CowDisk]) -> None:
    source = VirtioBlock(disks(8 * MIB))
    with pytest.raises(ValueError, match="snapshot's disk was"):
        VirtioBlock(disks(16 * MIB)).restore(source.save())
    with pytest.raises(ValueError, match="read-only"):
        VirtioBlock(disks(8 * MIB), read_only=True).restore(source.save())


def test_the_transport_reads_back_its_registers_queues_and_device(
    tmp_path: Path, disks: Callable[[int], CowDisk]
) -> None:
    source = MmioTransport(VirtioRng(), memory=None, raise_irq=lambda: None)  # type: ignore[arg-type]
    source.queue_sel, source.interrupt_status, source.config_generation = 0, 1, 3
    source.queues[0].state.size, source.queues[0].state.next_avail = 64, 9
    saved = json.loads(json.dumps(source.save()))
    twin = MmioTransport(VirtioRng(), memory=None, raise_irq=lambda: None)  # type: ignore[arg-type]
    twin.restore(saved)
    assert twin.save() == saved
    assert twin.queues[0].state.next_avail == 9
    del saved["queues"][0]["next_used"]
    with pytest.raises(ValueError, match="QueueState"):
        MmioTransport(VirtioRng(), memory=None, raise_irq=lambda: None).restore(saved)  # type: ignore[arg-type]
