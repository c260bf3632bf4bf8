"""virtio-blk device model (virtio 1.x §5.2): read, write, flush, get-id, discard, write-zeroes."""

from __future__ import annotations

import struct
from dataclasses import asdict, astuple, dataclass
from typing import Any

from appliance.runtime.virtio.blk.disk import Disk
from appliance.runtime.virtio.blk.metrics import BlockMetrics
from appliance.runtime.virtio.device import (
    DEVICE_ID_BLOCK,
    VIRTIO_F_VERSION_1,
    DeviceState,
    VirtioDevice,
    state_from_json,
)
from appliance.runtime.virtio.queue import DescriptorChain, QueueError, read_chain_bytes
from appliance.runtime.virtio.rate_limiter import RateLimiter

SECTOR = 512
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2  # header and status take a descriptor each
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment

VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13

S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

ID_BYTES = 20


@dataclass(frozen=True)
class BlockConfig:
    """virtio-blk's config space (virtio 1.x §5.2.4, struct virtio_blk_config), little-endian."""

    capacity: int  # in 512-byte sectors
    size_max: int = 0  # not offered
    seg_max: int = 0
    cylinders: int = 0  # geometry: not offered
    heads: int = 0
    sectors: int = 0
    blk_size: int = 0
    physical_block_exp: int = 0  # topology: not offered
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    writeback: int = 0
    unused0: int = 0
    num_queues: int = 0
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0

    LAYOUT = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")

    def pack(self) -> bytes:
        return self.LAYOUT.pack(*astuple(self))


@dataclass
class BlockState(DeviceState):
    size: int  # bytes: the disk the guest's driver was shown
    read_only: bool
    metrics: BlockMetrics


class VirtioBlock(VirtioDevice):
    device_type = DEVICE_ID_BLOCK
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(
        self,
        disk: Disk,
        *,
        read_only: bool = False,
        disk_id: str = "cube",
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        super().__init__()
        self.disk = disk
        self.read_only = read_only
        self.disk_id = disk_id.encode()[:ID_BYTES]
        self.rate_limiter = rate_limiter
        self.metrics = BlockMetrics()
        self._plugged: Disk | None = None  # a disk plugged in later is the device's to close

    def plug(self, disk: Disk) -> None:
        """Serve `disk` from now on in place of the empty one the slot was made with (a volume,
        runtime/kvm/volumes.py); the transport then tells the driver its config changed. Only
        into an empty slot: a disk the guest has seen is never swapped under it."""
        if self.disk.size != 0:
            raise ValueError("this slot holds a disk already")
        self.disk, self._plugged = disk, disk

    def close(self) -> None:
        if self._plugged is not None:
            self._plugged.close()
            self._plugged = None

    def available_features(self) -> int:
        features = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
        if self.read_only:
            return features | VIRTIO_BLK_F_RO
        return features | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES

    def config_space(self) -> bytes:
        return BlockConfig(
            capacity=self.disk.size // SECTOR,
            seg_max=SEG_MAX,
            blk_size=SECTOR,
            num_queues=1,
            max_discard_sectors=MAX_DISCARD_SECTORS,
            max_discard_seg=1,
            discard_sector_alignment=8,  # 4 KiB: the overlay's block
            max_write_zeroes_sectors=MAX_DISCARD_SECTORS,
            max_write_zeroes_seg=1,
        ).pack()

    def process_queue(self, index: int) -> None:
        assert self.memory is not None
        queue = self.queues[index]
        self.retry_after = None
        served = False
        while (chain := queue.pop(self.memory)) is not None:
            if self.rate_limiter is not None:
                cost = sum(d.length for d in chain.descriptors)
                if not self.rate_limiter.consume(cost):
                    # Put the chain back: it is served when the bucket refills.
                    queue.state.next_avail = (queue.state.next_avail - 1) & 0xFFFF
                    self.retry_after = self.rate_limiter.wait_time(cost)
                    self.metrics.throttled_events += 1
                    break
            written = self._serve(chain)
            queue.add_used(self.memory, chain.head, written)
            served = True
        if served:
            self.interrupt(index)

    def _serve(self, chain: DescriptorChain) -> int:
        """Execute one request; returns the bytes written into the chain (data + status)."""
        assert self.memory is not None
        memory = self.memory
        readable, writable = chain.readable(), chain.writable()
        if not writable or writable[-1].length < 1:
            self.metrics.invalid_requests += 1
            return 0
        status_addr = writable[-1].addr + writable[-1].length - 1
        # Data-in buffers: every writable byte but the status byte.
        data_in = [*writable[:-1]]
        if writable[-1].length > 1:
            last = writable[-1]
            data_in.append(type(last)(last.addr, last.length - 1, last.flags))
        try:
            request = read_chain_bytes(memory, readable)
            if len(request) < 16:
                raise QueueError("virtio-blk request shorter than its header")
            kind, _reserved, sector = struct.unpack_from("<IIQ", request)
            payload = memoryview(request)[16:]
            status, written = self._execute(kind, sector * SECTOR, payload, data_in)
        except (OSError, ValueError, QueueError):
            self.metrics.io_errors += 1
            status, written = S_IOERR, 0
        memory.write(status_addr, bytes([status]))
        return written + 1

    def _execute(self, kind: int, offset: int, payload: memoryview, data_in: list[Any]) -> tuple[int, int]:
        assert self.memory is not None
        memory, disk, m = self.memory, self.disk, self.metrics
        if kind == T_IN:
            position = offset
            for d in data_in:
                memory.write(d.addr, disk.read(position, d.length))
                position += d.length
            m.read_count += 1
            m.read_bytes += position - offset
            return S_OK, position - offset
        if kind == T_OUT:
            if self.read_only:
                return S_IOERR, 0
            disk.write(offset, payload)
            m.write_count += 1
            m.write_bytes += len(payload)
            return S_OK, 0
        if kind == T_FLUSH:
            disk.flush()
            m.flush_count += 1
            return S_OK, 0
        if kind == T_GET_ID:
            ident = self.disk_id.ljust(ID_BYTES, b"\0")
            position = 0
            for d in data_in:
                piece = ident[position : position + d.length]
                memory.write(d.addr, piece)
                position += len(piece)
            return S_OK, position
        if kind in (T_DISCARD, T_WRITE_ZEROES) and not self.read_only:
            for start in range(0, len(payload) - 15, 16):
                sector, count, _flags = struct.unpack_from("<QII", payload, start)
                if kind == T_DISCARD:
                    disk.discard(sector * SECTOR, count * SECTOR)
                    m.discard_count += 1
                else:
                    disk.write_zeroes(sector * SECTOR, count * SECTOR)
            return S_OK, 0
        m.invalid_requests += 1
        return S_UNSUPP, 0

    def save(self) -> dict[str, Any]:
        # The overlay file is part of the snapshot (the runtime copies it for every clone),
        # so it is flushed; the device state names what the guest's driver was shown.
        self.disk.flush()
        return asdict(BlockState(self.acked_features, self.disk.size, self.read_only, self.metrics))

    def restore(self, saved: dict[str, Any]) -> None:
        state = state_from_json(BlockState, saved)
        # The restored guest's page cache and driver know that disk: a clone's disk must be
        # the same size and mode, never another disk under the same name.
        if (state.size, state.read_only) != (self.disk.size, self.read_only):
            raise ValueError(
                f"snapshot's disk was {state.size} bytes (read-only {state.read_only}), "
                f"this one is {self.disk.size} (read-only {self.read_only})"
            )
        self.acked_features, self.metrics = state.acked_features, state.metrics
