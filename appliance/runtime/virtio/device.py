"""The device side of virtio, independent of any transport.

A transport (virtio-mmio for KVM guests, vhost-user for UML) negotiates features,
sets up the queues, then calls `activate` with the guest memory, the queues and a
callback that interrupts the driver; after that it calls `process_queue(i)`
whenever the driver notifies queue i.
"""

from __future__ import annotations

import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, TypeVar

import trio

from appliance.runtime.virtio.memory import GuestMemoryAccess
from appliance.runtime.virtio.queue import Queue

VIRTIO_F_VERSION_1 = 1 << 32

# Device ids (virtio 1.x §5).
DEVICE_ID_NET = 1
DEVICE_ID_BLOCK = 2
DEVICE_ID_RNG = 4
DEVICE_ID_BALLOON = 5
DEVICE_ID_VSOCK = 19

InterruptCallback = Callable[[int], None]  # argument: the queue that has used buffers

State = TypeVar("State")


@dataclass
class DeviceState:
    """What every device saves (Firecracker's VirtioDeviceState): the features the driver acked.

    Each device's own state extends it; `save()` writes it as plain data and `restore()`
    reads back every field (`state_from_json` refuses a missing or an unknown one).
    """

    acked_features: int


def state_from_json(state_type: type[State], saved: Mapping[str, Any]) -> State:
    """A saved state dataclass rebuilt, nested dataclasses and lists of them included.

    The saved fields must be exactly the dataclass's: a snapshot of another version of a
    device is refused, never half restored.
    """
    assert is_dataclass(state_type)
    names = {f.name for f in fields(state_type)}
    if set(saved) != names:
        raise ValueError(f"{state_type.__name__}: saved fields {sorted(saved)} are not {sorted(names)}")
    hints = typing.get_type_hints(state_type)
    return state_type(**{name: _field_from_json(hints[name], saved[name]) for name in names})


def _field_from_json(kind: Any, value: Any) -> Any:
    if isinstance(kind, type) and is_dataclass(kind):
        return state_from_json(kind, value)
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return [_field_from_json(item, v) for v in value]
    return value


class VirtioDevice(ABC):
    device_type: int = 0
    queue_max_sizes: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.acked_features = 0
        self.ignored_config_writes = 0
        # Set by a rate-limited device that left requests in a queue: seconds until the
        # transport should call process_queue again. None = nothing is waiting.
        self.retry_after: float | None = None
        self.memory: GuestMemoryAccess | None = None
        self.queues: list[Queue] = []
        self._interrupt: InterruptCallback | None = None
        self._io_resumed: trio.Event | None = None  # set while host-side I/O is paused

    # ---- negotiation --------------------------------------------------------------

    def available_features(self) -> int:
        return VIRTIO_F_VERSION_1

    def ack_features(self, features: int) -> None:
        self.acked_features = features & self.available_features()

    def config_space(self) -> bytes:
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """Most devices have a read-only config space: count what a driver tried to write."""
        self.ignored_config_writes += 1

    # ---- operation ----------------------------------------------------------------

    def activate(self, memory: GuestMemoryAccess, queues: list[Queue], interrupt: InterruptCallback) -> None:
        self.memory = memory
        self.queues = queues
        self._interrupt = interrupt

    @property
    def active(self) -> bool:
        return self.memory is not None

    def interrupt(self, queue_index: int) -> None:
        assert self._interrupt is not None and self.memory is not None
        if self.queues[queue_index].driver_wants_interrupt(self.memory):
            self._interrupt(queue_index)

    @abstractmethod
    def process_queue(self, index: int) -> None:
        """Handle every chain the driver made available on queue `index`."""

    async def run_io(self) -> None:
        """Host-side I/O while active (a tap to read, sockets to serve), run as a Trio task
        by whoever activated the device. Devices that only answer the driver have none."""
        return

    # ---- pausing ------------------------------------------------------------------

    @property
    def io_paused(self) -> bool:
        return self._io_resumed is not None

    def pause_io(self) -> None:
        """The guest is stopped (a pause, a snapshot): until `resume_io`, nothing from the
        host side (a frame on the tap, data on a socket, a queue notification or retry
        still pending) may write guest memory or interrupt the guest. A pause's diff and a
        snapshot hold guest memory as it was when the vCPUs stopped; a write after that
        would be lost (or half in the snapshot) while the device model kept its effect."""
        if self._io_resumed is None:
            self._io_resumed = trio.Event()

    def resume_io(self) -> None:
        if self._io_resumed is not None:
            resumed, self._io_resumed = self._io_resumed, None
            resumed.set()
            self.catch_up()

    async def wait_io_allowed(self) -> None:
        """Until host-side I/O may touch the guest (at once unless paused)."""
        while self._io_resumed is not None:
            await self._io_resumed.wait()

    def catch_up(self) -> None:  # noqa: B027 (a hook: most devices queue nothing)
        """Deliver what arrived for the guest while its I/O was paused (devices that queue)."""

    def close(self) -> None:  # noqa: B027 (a hook: most devices hold no host fd of their own)
        """Release the device's own host resources (its backing disk or tap is its owner's)."""

    def reset(self) -> None:
        self.acked_features = 0
        self.memory = None
        self.queues = []
        self._interrupt = None

    # ---- persistence --------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        return asdict(DeviceState(self.acked_features))

    def restore(self, saved: dict[str, Any]) -> None:
        self.acked_features = state_from_json(DeviceState, saved).acked_features
