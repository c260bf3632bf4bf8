"""The kvm VMM process's boundaries: what it keeps of root once it dropped it (nothing: it
cannot open /dev/kvm, become root again or gain anything by execve), and what the service
takes of what it wrote (a snapshot: regular files only, never a link it planted)."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import pytest
import trio
from kvm_guest import assemble

from appliance.process_identity import ProcessIdentity
from appliance.runtime.kvm.console import SerialConsole
from appliance.runtime.kvm.instance import KvmInstance
from appliance.runtime.kvm.machine import Machine, MachineConfig
from appliance.runtime.kvm.sandbox import GuestControlFailed, _take_over
from appliance.runtime.kvm.vmm import (
    CAPABILITY_FIELDS,
    Built,
    Vmm,
    VmmSpec,
    boot_cmdline,
    capabilities,
    drop_privileges,
)
from appliance.runtime.kvm.x86 import enter_long_mode
from appliance.runtime.supervisor.client import SupervisorClient
from appliance.runtime.supervisor.control import open_listener
from appliance.runtime.supervisor.protocol import CONTROL_SOCKET, RECORD_FILE, SupervisorRecord
from appliance.runtime.uml.console import ConsoleLog
from cffi_kvm import Kvm

MIB = 1 << 20

SANDBOX_UID = 2_000_000_000 - 7  # far from config.uid_base's range: nobody else's


def _dropped_child_report() -> dict[str, object]:
    """Fork; the child (one thread) drops to SANDBOX_UID and tries to get root back."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        try:
            os.close(read_end)
            drop_privileges(SANDBOX_UID)
            report: dict[str, object] = {
                "status": Path("/proc/self/status").read_text(),
                "ids": [os.getresuid(), os.getresgid(), os.getgroups()],
            }
            for attempt, action in (
                ("open_kvm", lambda: os.close(os.open("/dev/kvm", os.O_RDWR))),
                ("setuid_0", lambda: os.setuid(0)),
                ("read_shadow", lambda: Path("/etc/shadow").read_bytes()),
            ):
                try:
                    action()
                    report[attempt] = "succeeded"
                except PermissionError:
                    report[attempt] = "refused"
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.mark.root
def test_a_dropped_vmm_keeps_nothing_of_root() -> None:
    report = _dropped_child_report()
    status = str(report["status"])
    assert all(value == 0 for value in capabilities(status).values()), capabilities(status)
    assert set(capabilities(status)) == set(CAPABILITY_FIELDS)
    assert "NoNewPrivs:\t1" in status
    uid = SANDBOX_UID
    assert report["ids"] == [[uid, uid, uid], [uid, uid, uid], []]
    assert report["open_kvm"] == report["setuid_0"] == report["read_shadow"] == "refused"


def test_privileges_are_dropped_only_by_a_process_with_one_thread_and_never_to_root() -> None:
    """Checked before anything changes: a thread made before the drop would keep the bounding
    set and no_new_privs (both per thread)."""
    before = os.getresuid(), os.getresgid()
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    helper.start()
    try:
        with pytest.raises(RuntimeError, match="threads"):
            drop_privileges(SANDBOX_UID)
    finally:
        stop.set()
        helper.join()
    if len(os.listdir("/proc/self/task")) == 1:
        with pytest.raises(ValueError, match="uid 0"):
            drop_privileges(0)
    assert (os.getresuid(), os.getresgid()) == before  # nothing changed for this process


@pytest.mark.root
def test_a_snapshot_is_taken_over_as_regular_files_only(tmp_path: Path) -> None:
    written = tmp_path / "sandbox" / "snapshot"
    written.mkdir(parents=True)
    (written / "state.json").write_text("{}")
    os.chown(written, SANDBOX_UID, SANDBOX_UID)
    os.chown(written / "state.json", SANDBOX_UID, SANDBOX_UID)
    target = tmp_path / "store" / "taken"
    target.parent.mkdir()
    _take_over(written, target)
    assert not written.exists()
    assert (target / "state.json").read_text() == "{}"
    for path in (target, target / "state.json"):
        assert (path.stat().st_uid, path.stat().st_gid) == (0, 0)
    assert target.stat().st_mode & 0o777 == 0o700


@pytest.mark.root
def test_a_link_planted_in_a_snapshot_is_refused_never_followed(tmp_path: Path) -> None:
    """A VMM taken over by its guest plants a symlink (to a file of root's) in its snapshot,
    or makes the snapshot itself a symlink: the service refuses it, changes nothing it points
    at and keeps nothing of it."""
    victim = tmp_path / "roots-file"
    victim.write_text("root's")
    os.chmod(victim, 0o600)
    written = tmp_path / "sandbox" / "snapshot"
    written.mkdir(parents=True)
    (written / "memory").symlink_to(victim)
    target = tmp_path / "taken"
    with pytest.raises(GuestControlFailed, match="not a regular file"):
        _take_over(written, target)
    assert not target.exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chown(elsewhere, SANDBOX_UID, SANDBOX_UID)
    written.parent.joinpath("snapshot").symlink_to(elsewhere)
    with pytest.raises(GuestControlFailed, match="not a directory"):
        _take_over(written, target)
    assert not target.exists() and not target.is_symlink()
    assert elsewhere.stat().st_uid == SANDBOX_UID and elsewhere.stat().st_mode & 0o777 != 0o700
    assert victim.read_text() == "root's" and victim.stat().st_uid == 0


async def test_a_cold_boots_ready_lines_reach_the_vmms_watchers(kvm: Kvm, tmp_path: Path) -> None:
    """The service hands out a cold-booted guest (and snapshots its template) once the VMM's
    watch stream says its agent and its default kernel are ready: the console's ready lines
    must reach the watchers as they come, not only with the next pause or the guest's end."""
    machine = Machine.new(kvm, MachineConfig(memory_size=16 * MIB))
    machine.memory.write(0x10000, assemble("again:\npause\njmp again", origin=0x10000))
    enter_long_mode(machine.memory, machine.vcpus[0].vcpu, rip=0x10000, rsp=0x8000)
    control_dir = tmp_path / "sbx"
    control_dir.mkdir()
    serial = SerialConsole(ConsoleLog(tmp_path / "console.log"))
    instance = KvmInstance(
        "sbx", serial.console.path, "", machine, tmp_path / "overlay", console=serial.console
    )
    spec = VmmSpec("sbx", str(control_dir), str(tmp_path), 1, 16, 1, "t", "", "00", -1, [])
    vmm = Vmm(spec, Built(instance, [], []), serial, os.open(tmp_path / "exit", os.O_WRONLY | os.O_CREAT))
    me = ProcessIdentity.current()
    record = SupervisorRecord("sbx", me.pid, me.start_time, "", 0.0)
    (control_dir / RECORD_FILE).write_bytes(record.encode())
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vmm.run, open_listener(str(control_dir / CONTROL_SOCKET)))
            async with SupervisorClient.attach(control_dir).watch() as states:
                with trio.fail_after(30):
                    first = await states.next()
                    assert first is not None and not first.agent_ready
                    serial.console.feed(b"booting\nCUBE-AGENT-READY\n")
                    while (state := await states.next()) is not None and not state.agent_ready:
                        pass
                    assert state is not None and not state.interpreter_ready
                    serial.console.feed(b"CUBE-INTERPRETER-READY\n")
                    while (state := await states.next()) is not None and not state.interpreter_ready:
                        pass
                    assert state is not None and state.exit is None
            vmm.kill_requested.set()
    finally:
        os.close(vmm.exit_fd)
        machine.close()


def test_a_cold_boot_hands_the_guest_the_egress_ca_word_only_when_there_is_one() -> None:
    """The egress proxy's CA certificate reaches a cold-booted guest's agent on its kernel
    command line (net/egress_tls.py), as on uml; a host without one adds nothing."""
    spec = VmmSpec("sbx", "/c", "/s", 1, 16, 1, "t", "", "00", -1, [], resolver_ip="169.254.0.1")
    with_ca = dataclasses.replace(spec, egress_ca_argument="cube.egress_ca=QUJD")
    assert "cube.egress_ca=QUJD" in boot_cmdline(with_ca, []).split()
    assert "cube.egress_ca" not in boot_cmdline(spec, [])
