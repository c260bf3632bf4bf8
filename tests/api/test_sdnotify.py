"""systemd readiness/watchdog: what cube.service (Type=notify, WatchdogSec) relies on."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from appliance.master import sdnotify


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def _received(sock: socket.socket) -> list[bytes]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096))
        except BlockingIOError:
            return messages


def test_ready_reaches_systemd(notify_socket: socket.socket) -> None:
    assert sdnotify.notify("READY=1")
    assert _received(notify_socket) == [b"READY=1"]


def test_no_systemd_means_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.notify("READY=1")


def test_watchdog_interval_is_half_the_period(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert sdnotify.watchdog_interval_s() is None


async def test_watchdog_pings_until_stopped(notify_socket: socket.socket) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sdnotify.ping_watchdog_until, stop, 0.01)
        await trio.sleep(0.1)
        stop.set()
    pings = _received(notify_socket)
    assert len(pings) >= 3 and set(pings) == {b"WATCHDOG=1"}
