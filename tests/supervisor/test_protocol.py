"""The supervisor's control protocol as data: what is accepted, what is refused and why."""

from __future__ import annotations

import json

import pytest

from appliance.process_identity import ProcessIdentity
from appliance.runtime.supervisor import protocol
from appliance.runtime.supervisor.framing import LineBuffer


def test_requests_round_trip_and_console_tails_are_capped() -> None:
    for op in protocol.Op:
        assert protocol.Request.decode(protocol.Request(op).encode()) == protocol.Request(op)
    asked = json.dumps({"op": "console", "max_bytes": 10**9}).encode()
    assert protocol.Request.decode(asked).max_bytes == protocol.CONSOLE_TAIL_MAX_BYTES


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"op": "reboot"}', "unknown op"),
        (b'{"op": "state", "max_bytes": -1}', "non-negative"),
        (b'{"op": "state", "max_bytes": true}', "non-negative"),
        (b'{"op": "state", "exec": "sh"}', "unknown request fields"),
        (b'{"op": "state", "pad": "' + b"x" * protocol.MAX_REQUEST_BYTES + b'"}', "limit"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_malformed_requests_are_refused_with_the_reason(line: bytes, why: str) -> None:
    with pytest.raises(protocol.ProtocolError, match=why):
        protocol.Request.decode(line)


def test_replies_and_states_round_trip() -> None:
    state = protocol.GuestState(
        "sb1", first_output=True, agent_ready=True, exit=protocol.GuestExit(-9, "killed", "tail")
    )
    for reply in (
        protocol.Reply(ok=True, state=state),
        protocol.Reply(ok=True, console="last words"),
        protocol.Reply(ok=True, metrics={"memory_bytes": 1.0}),
        protocol.Reply.failed("nope"),
    ):
        assert protocol.Reply.decode(reply.encode()) == reply
    assert protocol.decode_exit(protocol.encode_exit(protocol.GuestExit(None, "gone"))) == protocol.GuestExit(
        None, "gone", ""
    )


@pytest.mark.parametrize(
    "data",
    [
        {"ok": "yes"},
        {"ok": True, "state": {"sandbox_id": 5}},
        {"ok": True, "state": {"sandbox_id": "a", "paused": "no"}},
        {"ok": True, "state": {"sandbox_id": "a", "exit": {"status": "x", "reason": "r"}}},
        {"ok": True, "metrics": {"m": "1"}},
        {"error": "no ok field"},
    ],
)
def test_replies_of_the_wrong_shape_are_refused(data: dict[str, object]) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.Reply.decode(json.dumps(data).encode())


def test_a_newer_writer_s_extra_fields_are_ignored_missing_optional_ones_defaulted() -> None:
    record = protocol.SupervisorRecord("sb1", 123, 456, "/venv", 1.5, {"slot": 3})
    data = json.loads(record.encode())
    data["added_in_a_later_release"] = [1, 2]
    del data["protocol"]
    loaded = protocol.SupervisorRecord.decode(json.dumps(data).encode())
    assert loaded == record and loaded.identity == ProcessIdentity(123, 456)


def test_launch_specs_round_trip() -> None:
    spec = protocol.LaunchSpec(
        sandbox_id="sb1",
        control_dir="/run/cube/supervisors/sb1",
        argv=["nsenter", "--", "x"],
        env={"PATH": "/bin"},
        seccomp_fd=7,
        console_log="/s/console.log",
        console_limit=1 << 20,
        uid=200001,
        vm_dir="/s/vm",
        mconsole_socket="/s/vm/uml/guest/mconsole",
        reply_dir="/s/reply",
        balloon=True,
        cgroup_version=2,
        guest_cgroup={"unified": "/sys/fs/cgroup/cube/sb1"},
        supervisor_cgroup=["/sys/fs/cgroup/cube/sb1.supervisor/cgroup.procs"],
        guest={"slot": 1, "template_id": "t"},
    )
    assert protocol.LaunchSpec.decode(spec.encode()) == spec


def test_framing_makes_lines_of_chunks_however_they_are_cut() -> None:
    lines = LineBuffer(limit=64)
    received = []
    for chunk in (b'{"op":', b' "state"}\n{"op": "wa', b'tch"}\n{"op"'):
        lines.feed(chunk)
        while (line := lines.next_line()) is not None:
            received.append(protocol.Request.decode(line).op)
    assert received == [protocol.Op.STATE, protocol.Op.WATCH] and lines.pending == len(b'{"op"')


@pytest.mark.parametrize("data", [b"x" * 65, b"x" * 65 + b"\n", b"ok\n" + b"y" * 65])
def test_framing_refuses_a_line_over_its_limit_whole_or_not(data: bytes) -> None:
    lines = LineBuffer(limit=64)
    lines.feed(data)
    with pytest.raises(protocol.ProtocolError, match="over 64 bytes"):
        while lines.next_line() is not None:
            pass


def test_vmm_specs_round_trip_and_malformed_ones_are_refused() -> None:
    from appliance.runtime.kvm.vmm import VmmSpec

    spec = VmmSpec(
        sandbox_id="sb1",
        control_dir="/run/cube/vmms/sb1",
        sandbox_dir="/var/lib/cube/sandboxes/sb1",
        uid=200001,
        memory_mb=512,
        cpu_count=1,
        disk_id="base",
        rootfs="/var/lib/cube/templates/base/rootfs.img",
        mac="02cbe0000001",
        handover_fd=5,
        supervisor_cgroup=["/sys/fs/cgroup/cube/sb1.supervisor/cgroup.procs"],
        agent_token="secret",
        guest={"slot": 1},
    )
    assert VmmSpec.decode(spec.encode()) == spec
    assert "secret" not in repr(spec)  # the boot token is never logged
    for bad, why in (
        ({"uid": "0"}, "uid"),
        ({"supervisor_cgroup": "x"}, "list"),
        ({"handover_fd": None}, "fd"),
    ):
        data = {**json.loads(spec.encode()), **bad}
        with pytest.raises(protocol.ProtocolError, match=why):
            VmmSpec.decode(json.dumps(data).encode())


def test_capability_sets_are_read_from_proc_status() -> None:
    from appliance.runtime.kvm.vmm import capabilities

    status = "Name:\tpython3\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t0\nUid:\t0\n"
    assert capabilities(status) == {"CapInh": 0, "CapPrm": 0x1FFFFFFFFFF, "CapEff": 0}
