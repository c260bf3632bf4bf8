"""A sandbox's virtio-balloon backend: the guest's freed memory goes back to the host.

UML keeps guest RAM in a tmpfs file that only grows: a page the guest once
touched stays allocated (and charged to the sandbox's cgroup) after the guest
frees it. With a balloon device the guest reports free pages
(CONFIG_VIRTIO_BALLOON → free page reporting) and the device model punches
them out of that file (appliance/runtime/virtio/balloon). Served over vhost-user
on a socket in the sandbox's vm directory, which the launcher binds into the
guest's mount namespace at the same path; the kernel command line names it
(`virtio_uml.device=<socket>:5`, command.py).

Life cycle, driven by the runtime: `SandboxBalloon.open` listens before the
kernel starts (UML connects while it boots), `serve` runs in the sandbox's
nursery, the `with` block's end closes what is left. The guest controls
everything the backend reads, so whatever a broken or hostile guest makes it
raise ends that sandbox's balloon (logged), never the sandbox or the service:
the guest only loses its reporting.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import TracebackType

import trio

from appliance.runtime.uml.kernel import kernel_config
from appliance.runtime.virtio.balloon.device import VirtioBalloon
from appliance.runtime.virtio.device import DEVICE_ID_BALLOON
from appliance.runtime.virtio.vhost_user.backend import VhostUserBackend

log = logging.getLogger(__name__)

BALLOON_SOCKET = "balloon"  # in the vm directory; shorter than the mconsole client's name
BALLOON_OPTION = "CONFIG_VIRTIO_BALLOON"


def kernel_has_balloon(kernel: Path) -> bool:
    """Built in (a module, as in Debian's linux.uml, is of no use: sandboxes load none)."""
    return kernel_config(kernel).get(BALLOON_OPTION) == "y"


class SandboxBalloon:
    """One sandbox's balloon: listening from `open` on, served by `serve`, closed by the `with`."""

    def __init__(
        self,
        device: VirtioBalloon | None = None,
        backend: VhostUserBackend | None = None,
        listener: trio.socket.SocketType | None = None,
    ) -> None:
        self.device = device  # its metrics say what the guest gave back
        self.backend = backend
        self._listener = listener

    @classmethod
    def open(cls, vm_dir: Path, uid: int, kernel: Path) -> SandboxBalloon:
        """Listen on `<vm_dir>/balloon`, owned by the sandbox uid (UML runs as it and must connect);
        a balloon that does nothing when the kernel has no balloon driver."""
        if not kernel_has_balloon(kernel):
            return cls()
        device = VirtioBalloon()
        backend = VhostUserBackend(device, vm_dir / BALLOON_SOCKET)
        listener = backend.listen()
        try:
            os.chown(backend.socket_path, uid, uid)
        except BaseException:
            listener.close()
            raise
        return cls(device, backend, listener)

    def kernel_argument(self) -> str | None:
        """The kernel command line word that makes virtio_uml connect, or None without a balloon."""
        if self.backend is None:
            return None
        return f"virtio_uml.device={self.backend.socket_path}:{DEVICE_ID_BALLOON}"

    async def serve(self, sandbox_id: str) -> None:
        if self.backend is None or self._listener is None:
            return
        listener, self._listener = self._listener, None  # serve_listener closes it
        try:
            await self.backend.serve_listener(listener)
        except Exception as exc:
            # Anything the guest's messages and rings made the backend raise (malformed
            # messages, rings outside its RAM, bad fds): this guest loses its balloon.
            log.warning("sandbox %s: balloon backend stopped: %r", sandbox_id, exc)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __enter__(self) -> SandboxBalloon:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
