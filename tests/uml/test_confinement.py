"""Attacks on the UML confinement (issue #14.17, #14.12 io, uid_base): each boundary, attacked.

- the seccomp allow-list: a process under the very filter the runtime installs makes system
  calls outside the list and is killed (syscall_probe.c, freestanding);
- a kernel with hostfs (Debian's linux.uml) is refused, not warned about;
- uid_base overlapping /etc/subuid or /etc/subgid ranges is refused at start;
- per-sandbox IO limits are set and read back from the kernel;
- a real guest: ASLR on in its UML process, the filter in place, the mconsole client's socket
  where the guest's uid cannot swap it for a link to a host file before the service chowns it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from appliance.config import Config
from appliance.cubelet.envd_client import run_command
from appliance.runtime.base import ENVD_PORT
from appliance.runtime.uml import mconsole
from appliance.runtime.uml.cgroups import create_cgroup, io_limits_for, sweep_empty_leaves
from appliance.runtime.uml.runtime import UmlRuntime
from appliance.runtime.uml.seccomp import compile_filter, filter_fd
from appliance.runtime.uml.uids import UidRangeError, check_uid_range

if TYPE_CHECKING:
    from conftest import Boot

    from appliance.net.service import CubeVS

DEBIAN_UML = Path("/usr/bin/linux.uml")
ADDR_NO_RANDOMIZE = 0x0040000


# ---- the seccomp allow-list -------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe() -> Iterator[Path]:
    """syscall_probe.c built static, in a directory the sandbox uid may read."""
    directory = Path(tempfile.mkdtemp(prefix="cubetest-probe-"))
    try:
        os.chmod(directory, 0o755)
        binary = directory / "syscall_probe"
        source = Path(__file__).with_name("syscall_probe.c")
        subprocess.run(
            ["gcc", "-O1", "-nostdlib", "-static", "-fno-stack-protector", "-o", str(binary), str(source)],
            check=True,
        )
        yield binary
    finally:
        shutil.rmtree(directory)


def confined(probe: Path, uid: int, name: str) -> subprocess.CompletedProcess[str]:
    """Run the probe as the UML kernel runs: the sandbox uid without capabilities, no_new_privs,
    in bwrap's namespaces, under the runtime's seccomp filter."""
    fd = filter_fd(compile_filter())
    try:
        argv = [
            "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs", "--",
            "bwrap", "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup", "--as-pid-1", "--die-with-parent",
            "--ro-bind", str(probe), "/probe", "--dev", "/dev", "--proc", "/proc",
            "--seccomp", str(fd), "/probe", name,
        ]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, pass_fds=(fd,))
    finally:
        os.close(fd)


def killed_by_seccomp(result: subprocess.CompletedProcess[str]) -> bool:
    # bwrap reports a child killed by a signal as 128 + the signal
    return result.returncode in (-signal.SIGSYS, 128 + signal.SIGSYS) and "returned" not in result.stdout


@pytest.mark.parametrize(
    "name",
    ["socket-inet", "unshare-user", "clone-newuser", "ptrace-attach", "keyctl", "personality"],
)
def test_syscalls_outside_the_allow_list_kill_the_process(probe: Path, uml_config: Config, name: str) -> None:
    result = confined(probe, uml_config.uid_base + 60, name)
    assert killed_by_seccomp(result), (result.returncode, result.stdout, result.stderr)


@pytest.mark.parametrize("name", ["getpid", "socket-unix", "uname"])
def test_syscalls_the_kernel_needs_are_allowed(probe: Path, uml_config: Config, name: str) -> None:
    result = confined(probe, uml_config.uid_base + 60, name)
    assert result.returncode == 0 and f"{name} returned" in result.stdout, (result, result.stderr)
    assert f"{name} returned -" not in result.stdout, result.stdout  # not an error either


# ---- the kernel -------------------------------------------------------------------------------


@pytest.mark.skipif(not DEBIAN_UML.exists(), reason="needs Debian's linux.uml (user-mode-linux)")
async def test_kernel_with_hostfs_is_refused(uml_config: Config, cubevs: CubeVS) -> None:
    from dataclasses import replace

    with pytest.raises(RuntimeError, match="CONFIG_HOSTFS=y"):
        UmlRuntime(replace(uml_config, uml_kernel=DEBIAN_UML), cubevs)


# ---- uid_base ---------------------------------------------------------------------------------


def test_uid_ranges_overlapping_subids_are_refused(tmp_path: Path) -> None:
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("# rootless containers\nalice:100000:65536\n")
    subgid.write_text("alice:100000:65536\nbob:165536:65536\n")
    check_uid_range(300_000, 16383, [subuid, subgid])  # clear of both
    check_uid_range(231_072, 1000, [subuid, subgid])  # starts just after bob's
    check_uid_range(165_536, 1000, [subuid])  # bob's only in subgid, which is not asked here
    with pytest.raises(UidRangeError, match=r"200000\.\.216382 overlap 165536\.\.231071.*subgid.*'bob'"):
        check_uid_range(200_000, 16383, [subuid, subgid])
    with pytest.raises(UidRangeError, match="alice"):
        check_uid_range(165_535, 10, [subuid])  # its first id is alice's last
    (tmp_path / "broken").write_text("carol:lots:10\n")
    with pytest.raises(UidRangeError, match="not owner:first:count"):
        check_uid_range(1, 1, [tmp_path / "broken"])
    check_uid_range(200_000, 16383, [tmp_path / "absent"])  # no file: nothing delegated


async def test_runtime_refuses_to_start_on_overlapping_uid_base(
    uml_config: Config, cubevs: CubeVS, tmp_path: Path
) -> None:
    subuid = tmp_path / "subuid"
    subuid.write_text(f"someone:{uml_config.uid_base + 10}:65536\n")
    with pytest.raises(UidRangeError, match="someone"):
        UmlRuntime(uml_config, cubevs, subid_files=[subuid])
    UmlRuntime(uml_config, cubevs, subid_files=[tmp_path / "absent"])


# ---- IO limits --------------------------------------------------------------------------------


def test_io_limits_are_set_and_read_back(uml_config: Config) -> None:
    limits = io_limits_for(Path("/var/tmp"), 64 << 20, 500)
    if limits.device is None:
        pytest.fail(f"no IO limits on this host: {limits.unavailable}")  # the dev hosts have blkio
    cgroup = create_cgroup("cubetest-io-" + os.urandom(3).hex(), 256 << 20, 1, io=limits)
    try:
        held = cgroup.io_limits()
        if cgroup.version == 2:
            assert held == {"io.max": f"{limits.device} rbps={64 << 20} wbps={64 << 20} riops=500 wiops=500"}
        else:
            assert held == {
                "blkio.throttle.read_bps_device": f"{limits.device} {64 << 20}",
                "blkio.throttle.write_bps_device": f"{limits.device} {64 << 20}",
                "blkio.throttle.read_iops_device": f"{limits.device} 500",
                "blkio.throttle.write_iops_device": f"{limits.device} 500",
            }
    finally:
        cgroup.remove()
    assert not any(leaf.exists() for leaf in cgroup.leaves.values())


def test_the_start_sweep_leaves_other_services_empty_leaves_alone() -> None:
    """A service starting sweeps the empty cgroup leaves its own killed run left, never the empty
    leaf another service on this host has just made for a guest that is about to join it."""
    ours, theirs = ("cubetest-sweep-" + os.urandom(3).hex() for _ in range(2))
    made = [create_cgroup(name, 64 << 20, 1) for name in (ours, theirs)]
    try:
        swept = sweep_empty_leaves(lambda sandbox_id: sandbox_id == ours)
        assert all(ours in entry for entry in swept) and any(ours in entry for entry in swept), swept
        assert not any(leaf.exists() for leaf in made[0].leaves.values())
        assert all(leaf.exists() for leaf in made[1].leaves.values())  # not ours: untouched
    finally:
        for cgroup in made:
            cgroup.remove()


def test_io_limits_say_why_not(tmp_path: Path) -> None:
    assert "no IO limit configured" in io_limits_for(tmp_path, 0, 0).unavailable
    on_tmpfs = io_limits_for(Path("/dev/shm"), 1 << 20, 0)
    assert on_tmpfs.device is None and "no block device" in on_tmpfs.unavailable


# ---- a real guest -----------------------------------------------------------------------------


def _uml_pids(uid: int) -> list[int]:
    """The UML kernel's host processes (the kernel and its guest address spaces) of `uid`."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if fields["Name"].strip() == "linux" and fields["Uid"].split()[0] == str(uid):
            pids.append(int(status.parent.name))
    return pids


@pytest.mark.uml
@pytest.mark.slow
async def test_confined_guest(
    boot: Boot, uml_config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = tmp_path / "host-file"
    canary.write_text("root's")
    real_chown = os.chown
    raced: list[subprocess.CompletedProcess[str]] = []
    kernel_pid = 0

    def chown_after_the_guest_moved(path: object, uid: int, gid: int, **kwargs: object) -> None:
        """The guest's uid wins the race: between the client's bind and chown it replaces the
        socket with a link to a host file, working in the UML process's own mount namespace
        (through /proc/<kernel>/root) as that process could."""
        directory = kwargs.get("dir_fd")
        name = str(path)
        target = os.path.join(os.readlink(f"/proc/self/fd/{directory}"), name) if directory else name
        seen_by_guest = f"/proc/{kernel_pid}/root{target}"
        attempt = subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
             "sh", "-c", f"rm -f {seen_by_guest} && ln -s {canary} {seen_by_guest}"],
            capture_output=True, text=True,
        )  # fmt: skip
        raced.append(attempt)
        real_chown(path, uid, gid, **kwargs)  # type: ignore[arg-type]

    async with boot(slot=5) as (instance, _spec):
        uid = uml_config.uid_base + 5
        host, _ = instance.endpoint(ENVD_PORT)
        pids = _uml_pids(uid)
        assert pids, "no UML process of the sandbox uid"
        kernel_pid = min(
            pids, key=lambda pid: Path(f"/proc/{pid}/stat").read_text().split()[21]
        )  # started first
        assert Path(f"/proc/{kernel_pid}/root{uml_config.state_dir}").is_dir()  # its view of the sandbox
        for pid in pids:
            status = Path(f"/proc/{pid}/status").read_text()
            assert "\nSeccomp:\t2\n" in status and "\nNoNewPrivs:\t1\n" in status, status
            assert "\nCapEff:\t0000000000000000\n" in status, status
            personality = int(Path(f"/proc/{pid}/personality").read_text(), 16)
            assert not personality & ADDR_NO_RANDOMIZE, f"pid {pid}: ASLR is off ({personality:#x})"
        # The IO ceiling is on the sandbox's cgroup (the UML processes are in it).
        assert instance.cgroup.io_limits(), "no IO limits on the sandbox's cgroup"

        monkeypatch.setattr(mconsole.os, "chown", chown_after_the_guest_moved)
        assert "Linux" in await instance.mconsole.request("version")
        assert raced and raced[0].returncode != 0 and "rm:" in raced[0].stderr, raced
        assert canary.stat().st_uid == 0 and canary.read_text() == "root's"
        # The guest still works after all of it.
        result = await run_command(host, "echo alive")
        assert result.stdout == "alive\n", result
    with trio.fail_after(10):
        while _uml_pids(uid):
            await trio.sleep(0.05)
