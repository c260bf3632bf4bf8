"""Hand the guest's free memory back to the host once the sandbox has started.

A UML host keeps guest RAM in a tmpfs file, and a page the guest once touched
stays allocated there until the guest reports it free over the virtio-balloon
device (free page reporting; host side: appliance/runtime/virtio/balloon). Two
things make much more of a freshly started guest reportable:

- the page cache boot filled (Python modules read once by init, the agent and
  the default kernel): clean, so one write to drop_caches frees it; whatever is
  used again is read again from the (host-cached) disk image;
- the reporting order: the kernel reports only free blocks of at least
  2^order pages. Its default on UML is the pageblock order, 10 (4 MiB blocks),
  which little of a booted guest's free memory forms; on 6.1 the driver's
  registration overwrites the `page_reporting.page_reporting_order=` boot
  parameter, so it is set here, at run time.

The kernel then reports what was freed about two seconds later. Nothing is
done without a balloon device (nothing would take the pages), nor outside a
sandbox: tests run the agent as a host process, and a host may have a balloon
of its own whose page cache is not ours to drop.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

BALLOON_DRIVER = Path("/sys/bus/virtio/drivers/virtio_balloon")
KERNEL_COMMAND_LINE = Path("/proc/cmdline")
# A word the host's runtime puts on every sandbox kernel's command line (runtime/uml/command.py).
SANDBOX_WORD = "cube_hostname="
REPORTING_ORDER_PARAMETER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
# 2^5 pages = 128 KiB blocks: fine enough to catch a booted guest's scattered free
# memory, coarse enough that a report (32 blocks per round trip) is worth its cost.
REPORTING_ORDER = 5


def in_sandbox(command_line: Path = KERNEL_COMMAND_LINE) -> bool:
    try:
        return any(word.startswith(SANDBOX_WORD) for word in command_line.read_text().split())
    except OSError:
        return False


def balloon_present(driver: Path = BALLOON_DRIVER) -> bool:
    return any(driver.glob("virtio*"))


def release_free_memory() -> bool:
    """Lower the reporting order and drop the clean page cache; False when not done."""
    if not (in_sandbox() and balloon_present()):
        return False
    try:
        REPORTING_ORDER_PARAMETER.write_text(f"{REPORTING_ORDER}\n")
        DROP_CACHES.write_text("1\n")
    except OSError as exc:  # not root, or a kernel without page reporting: nothing to give back
        print(f"cube-agent: guest memory not released: {exc}", file=sys.stderr, flush=True)
        return False
    return True


async def release_boot_memory() -> None:
    """release_free_memory in a worker thread: dropping the cache takes a few ms of kernel time."""
    await trio.to_thread.run_sync(release_free_memory)
