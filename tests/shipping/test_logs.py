"""Logs do not grow without bound: sandbox consoles are capped by the runtime's writer,
the daemon's own log is rotated by the logrotate config the installer installs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import trio

from appliance.runtime.uml.console import LOG_LIMIT_BYTES, READY_LINE, ConsoleLog

LOGROTATE_CONF = Path(__file__).resolve().parents[2] / "installer" / "logrotate.conf"


async def test_console_log_stops_at_its_cap_and_the_guest_is_still_drained(tmp_path: Path) -> None:
    """A chatty guest writes past the cap through a real pipe: the file stops at the cap,
    the pipe keeps being read (the guest never blocks) and a ready line after the cap is seen."""
    console = ConsoleLog(tmp_path / "console.log")
    read_end, write_end = os.pipe()
    chunk = b"x" * 65536
    total = LOG_LIMIT_BYTES + (1 << 20)

    async def guest() -> None:
        with open(write_end, "wb", buffering=0) as pipe:
            for _ in range(total // len(chunk)):
                await trio.to_thread.run_sync(pipe.write, chunk)
            await trio.to_thread.run_sync(pipe.write, READY_LINE + b"\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(console.pump, trio.lowlevel.FdStream(read_end))
        nursery.start_soon(guest)
    assert console.finished.is_set() and console.ready.is_set()
    assert (tmp_path / "console.log").stat().st_size == LOG_LIMIT_BYTES
    assert console.tail().endswith(READY_LINE.decode() + "\n")


def test_logrotate_config_rotates_the_daemon_log_in_place(tmp_path: Path) -> None:
    """copytruncate: the daemon keeps appending to the same open file, from its start again."""
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    config = tmp_path / "cube.logrotate"
    config.write_text(LOGROTATE_CONF.read_text().replace("/var/log/cube/", f"{log_dir}/"))
    log = log_dir / "cube.log"
    with log.open("ab", buffering=0) as daemon:  # how install.sh starts it: >>cube.log
        daemon.write(b"before\n" * (8 << 20))  # 56 MiB: over the 50M size limit
        subprocess.run([logrotate, "-s", str(tmp_path / "state"), str(config)], check=True)
        daemon.write(b"after\n")
    assert log.read_bytes() == b"after\n"
    rotated = log_dir / "cube.log.1"
    assert rotated.stat().st_size == 56 << 20

    # Under the limit: left alone.
    subprocess.run([logrotate, "-s", str(tmp_path / "state"), str(config)], check=True)
    assert log.read_bytes() == b"after\n"
