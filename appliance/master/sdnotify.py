"""systemd's readiness and watchdog protocol (sd_notify), without libsystemd.

`cube.service` is Type=notify with WatchdogSec: systemd starts routing users to
the service only after READY=1, and restarts it when the pings stop — which they
do when the Trio loop is wedged, because the pinging task runs on that loop.
Outside systemd (no NOTIFY_SOCKET) every call here does nothing.
"""

from __future__ import annotations

import os
import socket

import trio


def _notify_address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    # A leading "@" names an abstract socket.
    return "\0" + address[1:] if address.startswith("@") else address


def notify(state: str) -> bool:
    """Send one state line (e.g. "READY=1"); False when not under systemd."""
    address = _notify_address()
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(state.encode(), address)
    return True


def watchdog_interval_s() -> float | None:
    """Half the watchdog period systemd asked for, or None when it asked for none."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2


async def ping_watchdog_until(stop: trio.Event, interval_s: float) -> None:
    """Ping every interval until `stop` is set (the service is shutting down)."""
    while not stop.is_set():
        notify("WATCHDOG=1")
        with trio.move_on_after(interval_s):
            await stop.wait()
