"""virtio-rng served over vhost-user to Linux's virtio-rng driver (hw_random)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from appliance.runtime.virtio.device import DEVICE_ID_RNG
from appliance.runtime.virtio.rng.device import VirtioRng
from appliance.runtime.virtio.vhost_user.backend import VhostUserBackend
from appliance.runtime.virtio.vhost_user.uml_frontend import missing_prerequisite, run_uml

DRIVERS = ["virtio_rng"]
MISSING = missing_prerequisite(DRIVERS)
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


async def test_linux_reads_dev_hwrng_from_the_device(tmp_path: Path) -> None:
    device = VirtioRng()
    backend = VhostUserBackend(device, tmp_path / "rng.sock")
    script = """
    echo available=$(cat /sys/devices/virtual/misc/hw_random/rng_available)
    # UML's own host-backed hw_random may be the default source: select the virtio one.
    echo virtio_rng.0 > /sys/devices/virtual/misc/hw_random/rng_current
    echo current=$(cat /sys/devices/virtual/misc/hw_random/rng_current)
    echo bytes=$(dd if=/dev/hwrng bs=64 count=16 2>/dev/null | wc -c)
    dd if=/dev/hwrng of=/tmp/sample bs=256 count=1 2>/dev/null
    echo distinct=$(od -An -v -tx1 /tmp/sample | tr ' ' '\\n' | grep . | sort -u | wc -l)
    """
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.serve)
        run = await run_uml(script, devices=[(backend.socket_path, DEVICE_ID_RNG)], drivers=DRIVERS)
        nursery.cancel_scope.cancel()
    assert "virtio_rng.0" in run.value("available").split(), run.console
    assert run.value("current") == "virtio_rng.0"
    assert run.value("bytes") == "1024"
    assert int(run.value("distinct")) > 100  # 256 random bytes: ~160 distinct values
    assert device.metrics.bytes_served >= 1024 + 256
