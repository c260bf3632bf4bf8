"""virtio-balloon device model (virtio 1.x §5.5) that only takes free page reports.

The driver (Linux's virtio_balloon) sees VIRTIO_BALLOON_F_REPORTING and registers
with mm/page_reporting.c: a couple of seconds after free buddy blocks of at least
`page_reporting_order` pile up, it isolates up to 32 of them and posts them as one
buffer of device-writable descriptors (guest-physical address, PAGE_SIZE << order)
on the reporting queue, then waits until the device returns it. The device gives
those pages' storage back to the host — a hole punched in the guest's memory file
(UML: its physmem file on tmpfs, passed in SET_MEM_TABLE) — and returns the
buffer. The guest reuses such a page at will; the host supplies a zero page on
the next touch.

`num_pages` stays 0, so the guest never inflates; inflate/deflate buffers a driver
posts anyway are returned untouched. Punching runs in a worker thread (ctypes
drops the GIL), one buffer at a time, so a large report never stalls the event
loop. Everything the guest wrote is bounded: at most one ring's worth of buffers
waits, ranges must be whole pages inside guest RAM, others are counted and
acknowledged without effect.
"""

from __future__ import annotations

import collections
import os
import struct
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import trio

from appliance.runtime.virtio.balloon.metrics import BalloonMetrics
from appliance.runtime.virtio.device import DEVICE_ID_BALLOON, DeviceState, VirtioDevice, state_from_json
from appliance.runtime.virtio.memory import punch_hole
from appliance.runtime.virtio.queue import QueueError

VIRTIO_BALLOON_F_REPORTING = 1 << 5
# Queues the driver sets up when only REPORTING is negotiated: inflate and deflate
# always, then reporting (statsq and free_page_vq exist only with their features,
# and the transports number the queues that exist consecutively).
INFLATE_QUEUE, DEFLATE_QUEUE, REPORTING_QUEUE = 0, 1, 2
# UML's virtio_uml always makes 256-entry rings; the driver needs ≥ 32 on reporting.
QUEUE_SIZE = 256
PAGE_SIZE = 4096
CONFIG = struct.Struct("<IIII")  # num_pages, actual, free_page_hint_cmd_id, poison_val
ACTUAL_OFFSET = 4


@runtime_checkable
class FileBackedMemory(Protocol):
    """Guest memory whose pages live in files (the vhost-user frontend's memory table)."""

    def file_range(self, gpa: int, length: int) -> tuple[int, int]:
        """(fd, file offset) of guest-physical [gpa, gpa+length); ValueError outside RAM."""
        ...


@dataclass(frozen=True)
class _Report:
    head: int
    ranges: tuple[tuple[int, int], ...]  # guest-physical (address, length)


@dataclass
class BalloonState(DeviceState):
    actual_pages: int
    metrics: BalloonMetrics


class VirtioBalloon(VirtioDevice):
    device_type = DEVICE_ID_BALLOON
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self) -> None:
        super().__init__()
        self.metrics = BalloonMetrics()
        self.actual_pages = 0  # what the driver says it holds (always 0 here)
        self._reports: collections.deque[_Report] = collections.deque()
        self._reports_waiting = trio.Event()

    def available_features(self) -> int:
        return super().available_features() | VIRTIO_BALLOON_F_REPORTING

    def config_space(self) -> bytes:
        return CONFIG.pack(0, self.actual_pages, 0, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        # `actual` is the only field a driver writes.
        if offset == ACTUAL_OFFSET and len(data) == 4:
            self.actual_pages = int.from_bytes(data, "little")
        else:
            super().write_config(offset, data)

    def process_queue(self, index: int) -> None:
        assert self.memory is not None
        if index == REPORTING_QUEUE:
            self._take_reports()
            return
        if index not in (INFLATE_QUEUE, DEFLATE_QUEUE):
            return
        queue = self.queues[index]
        returned = False
        while (chain := queue.pop(self.memory)) is not None:
            queue.add_used(self.memory, chain.head, 0)
            self.metrics.ignored_buffers += 1
            returned = True
        if returned:
            self.interrupt(index)

    def _take_reports(self) -> None:
        """Move posted reports to the release task, at most one ring's worth at a time."""
        assert self.memory is not None
        queue = self.queues[REPORTING_QUEUE]
        for _ in range(queue.state.size - len(self._reports)):
            try:
                chain = queue.pop(self.memory)
            except QueueError:
                self.metrics.rejected_ranges += 1  # a malformed chain: its head is lost to the driver
                continue
            if chain is None:
                break
            ranges = tuple((d.addr, d.length) for d in chain.descriptors)
            self._reports.append(_Report(chain.head, ranges))
        if self._reports:
            self._reports_waiting.set()

    async def run_io(self) -> None:
        while True:
            await self._reports_waiting.wait()
            self._reports_waiting = trio.Event()
            while self._reports and self.memory is not None:
                report = self._reports.popleft()
                if jobs := self._file_ranges(report):
                    # Not abandoned on cancel: the thread closes the fds it was given.
                    released, errors = await trio.to_thread.run_sync(_punch, jobs)
                    self.metrics.released_bytes += released
                    self.metrics.release_errors += errors
                if self.memory is None:
                    break  # reset while punching: the ring is gone
                self.queues[REPORTING_QUEUE].add_used(self.memory, report.head, 0)
                self.metrics.reports += 1
                self.interrupt(REPORTING_QUEUE)
                if not self._reports:
                    self._take_reports()  # reports left in the ring past the bound

    def _file_ranges(self, report: _Report) -> list[tuple[int, int, int]]:
        """(own fd, offset, length) of each whole page range of `report`, on duplicated fds:
        a SET_MEM_TABLE while the thread punches may close the memory's own."""
        memory = self.memory
        jobs: list[tuple[int, int, int]] = []
        for gpa, length in report.ranges:
            self.metrics.reported_bytes += length
            if not isinstance(memory, FileBackedMemory) or length <= 0:
                self.metrics.rejected_ranges += 1
                continue
            try:
                fd, offset = memory.file_range(gpa, length)
            except ValueError:
                self.metrics.rejected_ranges += 1
                continue
            start = -(-offset // PAGE_SIZE) * PAGE_SIZE
            stop = (offset + length) // PAGE_SIZE * PAGE_SIZE
            if stop <= start:
                self.metrics.rejected_ranges += 1
                continue
            jobs.append((os.dup(fd), start, stop - start))
        return jobs

    def reset(self) -> None:
        super().reset()
        self._reports.clear()

    def save(self) -> dict[str, Any]:
        return asdict(BalloonState(self.acked_features, self.actual_pages, self.metrics))

    def restore(self, saved: dict[str, Any]) -> None:
        state = state_from_json(BalloonState, saved)
        self.acked_features, self.actual_pages, self.metrics = (
            state.acked_features,
            state.actual_pages,
            state.metrics,
        )


def _punch(jobs: list[tuple[int, int, int]]) -> tuple[int, int]:
    """Punch every range (in a worker thread); (bytes released, failures). Closes the fds."""
    released = errors = 0
    try:
        for fd, offset, length in jobs:
            try:
                punch_hole(fd, offset, length)
                released += length
            except OSError:
                errors += 1
    finally:
        for fd, _, _ in jobs:
            os.close(fd)
    return released, errors
