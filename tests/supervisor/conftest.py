"""Fixtures for the supervisor's tests (root only).

- `fake_guest`: `async with fake_guest(script) as supervisor:` a real supervisor process
  (started through the runtime's `launch`, once exec'd and once forked by a zygote of its
  own: each test runs with both) whose guest is `sh -c script` instead of a UML
  kernel, shaped like one: a launcher whose one child is the guest's "init" (as bwrap's is
  the kernel), in a cgroup leaf of its own as a guest would be; its console log and control
  directory under a short private directory. At exit the supervisor is ended the way the
  runtime ends it and nothing of it may be left: process, guest, leaves, directories.
(`private_service`, a private `cube serve` process with real guests, is in tests/conftest.py.)
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio
from hostprocs import parent_of

from appliance.runtime.supervisor.client import SupervisorClient, Zygote, launch, supervisors_dir
from appliance.runtime.supervisor.protocol import LaunchSpec
from appliance.runtime.uml.cgroups import SUPERVISOR_SUFFIX, create_cgroup, create_supervisor_cgroup

FakeGuest = Callable[..., AbstractAsyncContextManager[SupervisorClient]]
LaunchFakeGuest = Callable[[str, "Zygote | None"], AbstractAsyncContextManager[SupervisorClient]]
FAKE_GUEST_UID = 65534  # what the fake guest's launcher would run as (it stays root: no setpriv)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("supervisors need root (cgroups, other users' sockets)")
    work = Path(tempfile.mkdtemp(prefix="cubesup-", dir="/tmp"))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(params=["exec", "zygote"])
def fake_guest(launch_fake_guest: LaunchFakeGuest, request: pytest.FixtureRequest) -> FakeGuest:
    @asynccontextmanager
    async def started(script: str) -> AsyncIterator[SupervisorClient]:
        with zygote_if(request.param == "zygote") as zygote:
            async with launch_fake_guest(script, zygote) as supervisor:
                if zygote is not None:  # forked by it, not exec'd after all
                    assert parent_of(supervisor.record.pid) == zygote.pid
                yield supervisor

    return started


@pytest.fixture
def launch_fake_guest(short_dir: Path) -> LaunchFakeGuest:
    """`fake_guest`'s launch, by `zygote` if one is given."""

    @asynccontextmanager
    async def launched(script: str, zygote: Zygote | None) -> AsyncIterator[SupervisorClient]:
        sandbox_id = "cubetest-sup-" + secrets.token_hex(4)
        guest_cgroup = create_cgroup(sandbox_id, 256 << 20, 1)
        supervisor_cgroup = create_supervisor_cgroup(sandbox_id)
        control_dir = supervisors_dir(short_dir / "run") / sandbox_id
        joins = "".join(f"echo $$ > {shlex.quote(str(p))}\n" for p in guest_cgroup.procs_files())
        placeholder_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)  # where the seccomp filter goes
        try:
            spec = LaunchSpec(
                sandbox_id=sandbox_id,
                control_dir=str(control_dir),
                argv=["sh", "-c", joins + 'sh -c "$0" & wait $!', script],
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                seccomp_fd=placeholder_fd,
                console_log=str(short_dir / f"{sandbox_id}.console.log"),
                console_limit=1 << 20,
                uid=FAKE_GUEST_UID,
                vm_dir=str(short_dir),
                mconsole_socket=str(short_dir / "no-mconsole"),
                reply_dir=str(short_dir),
                balloon=False,
                cgroup_version=guest_cgroup.version,
                guest_cgroup={k: str(v) for k, v in guest_cgroup.leaves.items()},
                supervisor_cgroup=[str(p) for p in supervisor_cgroup.procs_files()],
                guest={"slot": 0, "template_id": "none", "memory_mb": 1, "cpu_count": 1},
            )
            supervisor = await launch(spec, 60, zygote)
        finally:
            os.close(placeholder_fd)
        try:
            yield supervisor
        finally:
            with trio.CancelScope(shield=True):
                pid = supervisor.record.pid
                if supervisor.pidfd >= 0:
                    await supervisor.end(timeout=30)
                leftovers = guest_cgroup.pids() | supervisor_cgroup.pids()
                guest_cgroup.remove()
                supervisor_cgroup.remove()
                shutil.rmtree(control_dir, ignore_errors=True)
            assert leftovers == set(), f"processes left in {sandbox_id}{SUPERVISOR_SUFFIX}'s leaves"
            assert not Path(f"/proc/{pid}").exists(), "the supervisor is still there (or a zombie)"

    return launched


@contextmanager
def zygote_if(wanted: bool) -> Iterator[Zygote | None]:
    if not wanted:
        yield None
        return
    zygote = Zygote.start()
    try:
        yield zygote
    finally:
        zygote.close()
