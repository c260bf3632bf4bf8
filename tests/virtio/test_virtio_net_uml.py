"""virtio-net served over vhost-user to Linux's virtio_net, on a tap in a netns the test
creates: ping, and TCP both ways (with checksum/TSO offloads through the vnet header)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from appliance.runtime.virtio.device import DEVICE_ID_NET
from appliance.runtime.virtio.net.device import VirtioNet
from appliance.runtime.virtio.net.tap import open_tap
from appliance.runtime.virtio.vhost_user.backend import VhostUserBackend
from appliance.runtime.virtio.vhost_user.uml_frontend import missing_prerequisite, run_uml

TAP = "cubetest-kvm-0"
HOST_IP = "10.213.250.1"
GUEST_IP = "10.213.250.2"
MIB = 1 << 20
DRIVERS = ["virtio_net"]
MISSING = missing_prerequisite(DRIVERS)
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

# Receives one upload on port 9000 and records its length and sha256.
UPLOAD_SERVER = """
import hashlib, socket, sys
server = socket.create_server((sys.argv[1], 9000))
connection, _ = server.accept()
digest, total = hashlib.sha256(), 0
while data := connection.recv(1 << 16):
    digest.update(data)
    total += len(data)
open(sys.argv[2], "w").write(f"{total} {digest.hexdigest()}")
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def tap_in_netns(tmp_path: Path) -> Iterator[tuple[int, str]]:
    if os.geteuid() != 0:
        pytest.skip("creating a netns and a tap needs root")
    namespace = f"cubetest-kvm-net-{os.getpid()}"
    _ip("netns", "add", namespace)
    fd = -1
    try:
        fd = open_tap(TAP)
        _ip("link", "set", TAP, "netns", namespace)
        _ip("-n", namespace, "addr", "add", f"{HOST_IP}/24", "dev", TAP)
        _ip("-n", namespace, "link", "set", TAP, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        yield fd, namespace
    finally:
        if fd >= 0:
            os.close(fd)
        _ip("netns", "del", namespace)


async def test_ping_and_tcp_both_ways(tmp_path: Path, tap_in_netns: tuple[int, str]) -> None:
    fd, namespace = tap_in_netns
    blob = os.urandom(4 * MIB)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "blob").write_bytes(blob)
    device = VirtioNet(fd, bytes.fromhex("02cbe0000002"))
    backend = VhostUserBackend(device, tmp_path / "net.sock")
    in_netns = ["ip", "netns", "exec", namespace, sys.executable]
    script = f"""
    ip link set eth0 up
    ip addr add {GUEST_IP}/24 dev eth0
    echo mac=$(cat /sys/class/net/eth0/address)
    ping -c 3 -W 2 {HOST_IP} >/dev/null; echo ping=$?
    wget -q -O /tmp/blob http://{HOST_IP}:8080/blob; echo download=$(sha256sum /tmp/blob | cut -d' ' -f1)
    dd if=/dev/urandom of=/tmp/up bs=1M count=4 2>/dev/null
    echo upload=$(sha256sum /tmp/up | cut -d' ' -f1)
    nc -w 5 {HOST_IP} 9000 < /tmp/up
    """
    try:
        async with trio.open_nursery() as nursery:
            web = await nursery.start(
                trio.run_process,
                [
                    *in_netns,
                    "-m",
                    "http.server",
                    "--bind",
                    HOST_IP,
                    "--directory",
                    str(tmp_path / "www"),
                    "8080",
                ],
            )
            del web
            nursery.start_soon(
                trio.run_process, [*in_netns, "-c", UPLOAD_SERVER, HOST_IP, str(tmp_path / "upload.txt")]
            )
            await nursery.start(backend.serve)
            await trio.sleep(0.5)  # the servers are listening well before UML boots; this covers slow starts
            run = await run_uml(
                script,
                devices=[(backend.socket_path, DEVICE_ID_NET)],
                drivers=DRIVERS,
                timeout=90,
            )
            nursery.cancel_scope.cancel()
    finally:
        device.close()
    assert run.value("mac") == "02:cb:e0:00:00:02", run.console
    assert run.value("ping") == "0"
    assert run.value("download") == hashlib.sha256(blob).hexdigest()
    size, digest = (tmp_path / "upload.txt").read_text().split()
    assert (int(size), digest) == (4 * MIB, run.value("upload"))
    assert device.metrics.rx_bytes >= 4 * MIB and device.metrics.tx_bytes >= 4 * MIB
