"""virtio-vsock served over vhost-user to Linux's vsock driver: echo both ways through
Firecracker-style Unix sockets (guest→host `<uds>_<port>`, host→guest `CONNECT <port>`)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import trio

from appliance.runtime.virtio.device import DEVICE_ID_VSOCK
from appliance.runtime.virtio.vhost_user.backend import VhostUserBackend
from appliance.runtime.virtio.vhost_user.uml_frontend import GuestRun, missing_prerequisite, run_uml
from appliance.runtime.virtio.vsock.device import VirtioVsock

GUEST_CID = 3
MIB = 1 << 20
DRIVERS = ["vmw_vsock_virtio_transport"]
MISSING = missing_prerequisite(DRIVERS)
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


@pytest.fixture
def vsock_cat(tmp_path: Path) -> bytes:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the guest's vsock tool")
    binary = tmp_path / "vsock_cat"
    source = Path(__file__).with_name("vsock_cat.c")
    subprocess.run(["gcc", "-static", "-O2", "-o", binary, source], check=True, capture_output=True)
    return binary.read_bytes()


async def _echo_server(listener: trio.SocketListener) -> None:
    stream = await listener.accept()
    async with stream:
        async for data in stream:
            await stream.send_all(data)


async def run_vsock_guest(backend: VhostUserBackend, script: str, vsock_cat: bytes) -> GuestRun:
    """A UML guest with the vsock device and vsock_cat, running `script`."""
    return await run_uml(
        script,
        devices=[(backend.socket_path, DEVICE_ID_VSOCK)],
        drivers=DRIVERS,
        extra_files={"bin/vsock_cat": vsock_cat},
    )


async def test_guest_connects_to_a_host_unix_socket(tmp_path: Path, vsock_cat: bytes) -> None:
    uds = tmp_path / "v.sock"
    device = VirtioVsock(GUEST_CID, uds)
    backend = VhostUserBackend(device, tmp_path / "vsock-backend.sock")
    script = """
    echo cid=$(cat /sys/class/vsock/vsock/local_cid 2>/dev/null || echo unknown)
    dd if=/dev/urandom of=/tmp/sent bs=64K count=32 2>/dev/null
    /bin/vsock_cat connect 2 5000 < /tmp/sent > /tmp/back; echo rc=$?
    echo sent=$(sha256sum /tmp/sent | cut -d' ' -f1)
    echo back=$(sha256sum /tmp/back | cut -d' ' -f1)
    /bin/vsock_cat connect 2 5001 < /tmp/sent; echo refused=$?
    """
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(f"{uds}_5000")
    sock.listen(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_echo_server, trio.SocketListener(sock))
        await nursery.start(backend.serve)
        run = await run_vsock_guest(backend, script, vsock_cat)
        nursery.cancel_scope.cancel()
    assert run.value("rc") == "0", run.console
    assert run.value("sent") == run.value("back")
    assert run.value("refused") != "0"  # nothing listens on <uds>_5001: the guest gets a reset
    assert device.metrics.connections_from_guest == 1 and device.metrics.connect_failures == 1
    assert device.metrics.tx_bytes == device.metrics.rx_bytes == 2 * MIB


async def test_host_connects_to_a_guest_port(tmp_path: Path, vsock_cat: bytes) -> None:
    uds = tmp_path / "v.sock"
    device = VirtioVsock(GUEST_CID, uds)
    backend = VhostUserBackend(device, tmp_path / "vsock-backend.sock")
    payload = os.urandom(MIB)
    script = "/bin/vsock_cat echo 6000; echo echo_rc=$?"
    received = bytearray()

    async def host_side() -> None:
        with trio.fail_after(60):
            while True:  # the guest listens once it has booted
                stream = await trio.open_unix_socket(str(uds)) if uds.exists() else None
                if stream is not None:
                    await stream.send_all(b"CONNECT 6000\n")
                    line = await stream.receive_some(64)
                    if line.startswith(b"OK "):
                        break
                    await stream.aclose()
                await trio.sleep(0.2)
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    await stream.send_all(payload)
                    await stream.send_eof()

                nursery.start_soon(send)
                async for data in stream:
                    received.extend(data)
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        await nursery.start(backend.serve)
        nursery.start_soon(host_side)
        run = await run_vsock_guest(backend, script, vsock_cat)
        nursery.cancel_scope.cancel()
    assert run.value("echo_rc") == "0", run.console
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert device.metrics.connections_from_host >= 1  # attempts before the guest listened were reset
