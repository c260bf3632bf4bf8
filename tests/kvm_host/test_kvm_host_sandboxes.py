"""The kvm runtime serving real sandboxes, driven from outside through the unmodified E2B
SDK (single-port mode, the emulated host's API forwarded to a loopback port).

Every sandbox is a microVM: the guest kernel from image/kernel, the default template's
root image on virtio-blk (copy-on-write), the agent reached over virtio-net. The
template's first kvm boot is snapshotted once its default kernel answers; every later
create restores that snapshot (memory mapped MAP_PRIVATE, vCPU and device state, clock
moved on) and /init gives the clone its own env, access token, time and RNG seed.

Parity with uml (what the uml runtime is tested for with real guests, and where):
| feature (uml test)                                          | kvm here                          |
|-------------------------------------------------------------|-----------------------------------|
| the user's examples, 9/9 (tests/run.sh + shared/acceptance)  | test_the_users_examples_pass      |
| boot → agent → commands, Python (tests/uml)                  | every test                        |
| files, commands, PTY, watch (tests/guest, tests/e2e)         | test_files_commands_pty_watch     |
| bulk files through the router (tests/e2e)                    | test_files_commands_pty_watch (8 MiB) |
| lifecycle: list, get_info, set_timeout, kill (tests/e2e)     | test_lifecycle_timeout_and_kill   |
| E2B timeout kills (tests/api, fake runtime)                  | test_lifecycle_timeout_and_kill   |
| pause/resume keeps memory (tests/uml: mconsole stop/go)      | test_pause_resume_keeps_python_state |
| egress policy on real guests (tests/net)                     | test_egress_policy                |
| a kill leaves no process, netns, file (tests/uml)            | test_kill_leaves_nothing_behind   |
| clones: own RNG, token (n/a: uml boots every guest)          | test_clones_have_their_own_*      |
Not on kvm, and why:
- free page reporting (uml's vhost-user balloon, tests/virtio): the kvm runtime attaches
  no virtio-balloon; a clone's memory is the template's page cache plus what it dirtied.
- Dockerfile RUN steps and template builds (tests/templates, on uml): they boot under kvm
  the same way (a cold boot, no snapshot) but are not driven here: a build pulls an image
  from a registry the emulated host cannot reach (restrict=on).
- carrying sandboxes over a service restart (tests/shipping, uml): kvm boots the kept disk
  cold (`spec.disk`); not exercised here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from e2b import SandboxState
from e2b.sandbox.commands.command_handle import PtySize
from e2b_code_interpreter import Sandbox
from emulated_host import EmulatedHost

SEED_EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "acceptance" / "seed_examples.py"
# Bounds for one SDK call on a software-emulated host (a restore took 3-60 s, a run_code 1-30 s).
REQUEST_TIMEOUT_S = 900
TEMPLATE = "code-interpreter"


def create(**options: object) -> Sandbox:
    options.setdefault("timeout", 3600)
    return Sandbox.create(template=TEMPLATE, request_timeout=REQUEST_TIMEOUT_S, **options)  # type: ignore[arg-type]


def run_code(sandbox: Sandbox, code: str) -> str:
    execution = sandbox.run_code(code, timeout=REQUEST_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S)
    assert execution.error is None, execution.error
    return "".join(execution.logs.stdout)


def console_of(kvm_host: EmulatedHost, sandbox_id: str) -> str:
    return kvm_host.run(f"cat /var/lib/cube/sandboxes/{sandbox_id}/console.log").check().stdout


def test_the_first_create_snapshots_the_template_and_the_next_restore_it(kvm_host_sdk: EmulatedHost) -> None:
    first = create()
    try:
        assert run_code(first, "print(6 * 7)") == "42\n"
        snapshots = kvm_host_sdk.run("ls /var/lib/cube/kvm-snapshots").check().stdout.split()
        assert len(snapshots) == 1 and re.fullmatch(r"code-interpreter-[0-9a-f]{16}", snapshots[0]), snapshots
        started = time.monotonic()
        second = create()
        restore_s = time.monotonic() - started
        try:
            # A restored guest's console shows no boot: its kernel booted in the template's guest.
            assert "Linux version" not in console_of(kvm_host_sdk, second.sandbox_id)
            assert run_code(second, "print('restored')") == "restored\n"
            print(f"create by restore: {restore_s:.1f} s")
        finally:
            second.kill()
    finally:
        first.kill()


def test_clones_have_their_own_randomness_and_access_tokens(kvm_host_sdk: EmulatedHost) -> None:
    """Two clones of one snapshot: the guest kernel's entropy, Python's `random` and numpy's
    generator in the default kernel (running since before the snapshot), and the envd access
    token are each their own; one clone's token opens nothing in the other."""
    draw = (
        "import os, random, uuid, numpy\n"
        "print(os.urandom(16).hex(), random.random(), uuid.uuid4().hex, numpy.random.rand())"
    )
    a, b = create(), create()
    try:
        draws = {name: run_code(sandbox, draw).split() for name, sandbox in (("a", a), ("b", b))}
        for index, what in enumerate(("os.urandom", "random", "uuid4", "numpy.random")):
            assert draws["a"][index] != draws["b"][index], f"{what} repeats across clones: {draws}"
        tokens = {a.sandbox_id: a._envd_access_token, b.sandbox_id: b._envd_access_token}
        assert None not in tokens.values() and len(set(tokens.values())) == 2

        def read_hostname(sandbox_id: str, token: str | None) -> int:
            headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983"}
            if token:
                headers["X-Access-Token"] = token
            response = httpx.get(
                f"{kvm_host_sdk.url}/files",
                params={"path": "/etc/hostname", "username": "user"},
                headers=headers,
                timeout=REQUEST_TIMEOUT_S,
                trust_env=False,
            )
            return response.status_code

        assert read_hostname(b.sandbox_id, tokens[b.sandbox_id]) == 200
        # Without b's own token the router answers as for a sandbox that does not exist
        # (proxy/access.py: 502, so that a sandbox's existence does not leak).
        assert read_hostname(b.sandbox_id, tokens[a.sandbox_id]) == 502
        assert read_hostname(b.sandbox_id, None) == 502
    finally:
        a.kill()
        b.kill()


def test_files_commands_pty_watch(kvm_host_sdk: EmulatedHost) -> None:
    sandbox = create()
    try:
        # Files, both ways, through the router into the guest's virtio-blk disk.
        data = os.urandom(8 << 20)
        sandbox.files.write("/home/user/blob", data, request_timeout=REQUEST_TIMEOUT_S)
        assert (
            sandbox.files.read("/home/user/blob", format="bytes", request_timeout=REQUEST_TIMEOUT_S) == data
        )
        listed = sandbox.files.list("/home/user", request_timeout=REQUEST_TIMEOUT_S)
        assert any(entry.name == "blob" and entry.size == len(data) for entry in listed), listed
        # Commands: env, cwd, exit status, a background process and its kill.
        result = sandbox.commands.run(
            'echo "$GREETING from $(pwd)"; exit 3',
            envs={"GREETING": "hello"},
            cwd="/tmp",
            timeout=REQUEST_TIMEOUT_S,
            request_timeout=REQUEST_TIMEOUT_S,
        )
        assert (result.exit_code, result.stdout) == (3, "hello from /tmp\n")
    except Exception as exc:
        if getattr(exc, "exit_code", None) == 3:  # the SDK raises for a non-zero exit
            assert exc.stdout == "hello from /tmp\n"  # type: ignore[attr-defined]
        else:
            sandbox.kill()
            raise
    try:
        background = sandbox.commands.run("sleep 600", background=True, request_timeout=REQUEST_TIMEOUT_S)
        assert "sleep 600" in sandbox.commands.run("ps -eo args", request_timeout=REQUEST_TIMEOUT_S).stdout
        assert background.kill()
        # A terminal: the program sees a tty of the size asked for.
        output = bytearray()
        terminal = sandbox.pty.create(PtySize(rows=33, cols=99), request_timeout=REQUEST_TIMEOUT_S)
        sandbox.pty.send_stdin(terminal.pid, b"stty size; tty; exit\n", request_timeout=REQUEST_TIMEOUT_S)
        terminal.wait(on_pty=lambda chunk: output.extend(chunk))
        text = output.decode(errors="replace")
        assert "33 99" in text and "/dev/pts/" in text, text
        # Watching a directory: what code in the sandbox creates is reported.
        sandbox.files.make_dir("/home/user/watched", request_timeout=REQUEST_TIMEOUT_S)
        handle = sandbox.files.watch_dir("/home/user/watched", request_timeout=REQUEST_TIMEOUT_S)
        run_code(sandbox, "open('/home/user/watched/new.txt', 'w').write('x')")
        deadline = time.monotonic() + 120
        seen: set[tuple[str, str]] = set()
        while ("new.txt", "create") not in seen and time.monotonic() < deadline:
            seen |= {(event.name, event.type.value) for event in handle.get_new_events()}
            time.sleep(1)
        handle.stop()
        assert ("new.txt", "create") in seen, seen
    finally:
        sandbox.kill()


def test_pause_resume_keeps_python_state(kvm_host_sdk: EmulatedHost) -> None:
    """A pause writes the clone's diff (the pages it changed since the template) and gives
    its memory back; resume copies it back: a variable of the running kernel survives."""
    sandbox = create()
    try:
        run_code(sandbox, "survivor = [n * n for n in range(1000)]\nimport os\nmarker = os.urandom(8).hex()")
        marker = run_code(sandbox, "print(marker)").strip()
        assert sandbox.pause(request_timeout=REQUEST_TIMEOUT_S) is True
        assert sandbox.get_info(request_timeout=REQUEST_TIMEOUT_S).state == SandboxState.PAUSED
        paused_dir = f"/var/lib/cube/sandboxes/{sandbox.sandbox_id}/kvm-paused"
        assert kvm_host_sdk.run(f"test -s {paused_dir}/memory").status == 0, "no diff snapshot written"
        resumed = Sandbox.connect(sandbox.sandbox_id, timeout=3600, request_timeout=REQUEST_TIMEOUT_S)
        assert resumed.get_info(request_timeout=REQUEST_TIMEOUT_S).state == SandboxState.RUNNING
        assert run_code(resumed, "print(marker, sum(survivor))") == f"{marker} 332833500\n"
        assert kvm_host_sdk.run(f"test -e {paused_dir}").status != 0
    finally:
        sandbox.kill()


def test_lifecycle_timeout_and_kill(kvm_host_sdk: EmulatedHost) -> None:
    from e2b import SandboxQuery

    tagged = create(metadata={"suite": "kvm-host"})
    short = create(timeout=60)
    try:
        listed = Sandbox.list(query=SandboxQuery(metadata={"suite": "kvm-host"})).next_items()
        assert [s.sandbox_id for s in listed] == [tagged.sandbox_id]
        before = tagged.get_info()
        tagged.set_timeout(7200)
        assert (tagged.get_info().end_at - before.end_at).total_seconds() > 3000
        # The E2B timeout ends the other one by itself (bounded wait: it is the behaviour).
        deadline = time.monotonic() + 600
        while short.is_running() and time.monotonic() < deadline:
            time.sleep(5)
        assert not short.is_running()
        assert tagged.kill()
        assert not tagged.is_running()
        assert Sandbox.list(query=SandboxQuery(metadata={"suite": "kvm-host"})).next_items() == []
    finally:
        for sandbox in (tagged, short):
            if sandbox.is_running():
                sandbox.kill()


def _vmm_state(kvm_host: EmulatedHost) -> dict[str, object]:
    """Sandbox VMM processes (by their control directories), what of a machine the service
    process itself holds (KVM fds, vCPU or device threads: none, the VMMs hold them),
    sandbox netns, sandbox directories."""
    script = r"""
pid=$(systemctl show -p MainPID --value cube.service)
echo "vmms $(ls /run/cube/vmms 2>/dev/null | wc -l)"
echo "threads $(grep -l -E 'run_loop|run_io' /proc/$pid/task/*/comm 2>/dev/null | wc -l)"
echo "fds $(ls -l /proc/$pid/fd | grep -c -E 'kvm|tun')"
echo "netns $(ls /run/netns 2>/dev/null | grep -c '^cube-')"
echo "dirs $(ls /var/lib/cube/sandboxes | wc -l)"
"""
    out = kvm_host.run(script).check().stdout
    return {key: int(value) for key, value in (line.split() for line in out.splitlines())}


def _settled_vmm_state(kvm_host: EmulatedHost) -> dict[str, object]:
    """`_vmm_state` once no sandbox is being torn down (a kill answers before its teardown has
    removed everything: an earlier test's kill may still be running): one VMM, netns and
    directory for each sandbox the API lists."""
    deadline = time.monotonic() + 300
    while True:
        live = len(Sandbox.list().next_items())
        state = _vmm_state(kvm_host)
        if state["vmms"] == state["netns"] == state["dirs"] == live or time.monotonic() > deadline:
            return state
        time.sleep(5)


def test_kill_leaves_nothing_behind(kvm_host_sdk: EmulatedHost) -> None:
    """Each kvm sandbox's machine is its VMM process's: the service holds no thread or KVM fd
    of it; after a kill no VMM, netns or directory of it is left."""
    before = _settled_vmm_state(kvm_host_sdk)
    sandbox = create()
    run_code(sandbox, "print(1)")
    during = _vmm_state(kvm_host_sdk)
    assert during["vmms"] == before["vmms"] + 1, (before, during)
    assert during["threads"] == before["threads"] and during["fds"] == before["fds"], (before, during)
    assert during["netns"] == before["netns"] + 1 and during["dirs"] == before["dirs"] + 1
    assert sandbox.kill()
    deadline = time.monotonic() + 300  # the teardown runs on after the kill answered
    while _vmm_state(kvm_host_sdk) != before and time.monotonic() < deadline:
        time.sleep(5)
    assert _vmm_state(kvm_host_sdk) == before


WORLD = r"""
set -e
ip netns add cubetest-world
ip link add cubetest-w0 type veth peer name w1 netns cubetest-world
ip addr add 198.51.100.1/24 dev cubetest-w0 && ip link set cubetest-w0 up
ip -n cubetest-world addr add 198.51.100.2/24 dev w1
ip -n cubetest-world link set w1 up && ip -n cubetest-world link set lo up
ip -n cubetest-world route add default via 198.51.100.1
systemd-run --unit=cubetest-world-http \
  ip netns exec cubetest-world python3 -m http.server --bind 198.51.100.2 8080
"""
WORLD_DOWN = "systemctl stop cubetest-world-http; ip link del cubetest-w0; ip netns del cubetest-world"
REACH = (
    "import socket\ns = socket.socket()\ns.settimeout(15)\n"
    "try:\n    s.connect(({!r}, {}))\n    print('open')\nexcept OSError as e:\n    print('blocked', e)\n"
)


def test_egress_policy(kvm_host_sdk: EmulatedHost) -> None:
    """CubeVS's eBPF policy on kvm sandboxes. The "internet" is a namespace this test made
    inside the emulated host (198.51.100.2:8080); nothing leaves the emulated host."""
    kvm_host_sdk.run(WORLD).check()
    sandboxes: list[Sandbox] = []
    try:
        default = create()
        offline = create(allow_internet_access=False)
        denied = create(network={"deny_out": ["198.51.100.0/24"]})
        sandboxes += [default, offline, denied]

        def reach(sandbox: Sandbox, ip: str, port: int) -> str:
            return run_code(sandbox, REACH.format(ip, port)).split()[0]

        assert reach(default, "198.51.100.2", 8080) == "open"
        assert reach(offline, "198.51.100.2", 8080) == "blocked"
        assert reach(denied, "198.51.100.2", 8080) == "blocked"
        # The host itself (its LAN address, where the API listens) is never reachable.
        assert reach(default, "10.0.2.15", 3000) == "blocked"
    finally:
        for sandbox in sandboxes:
            sandbox.kill()
        kvm_host_sdk.run(WORLD_DOWN)


def test_the_users_examples_pass(kvm_host_sdk: EmulatedHost) -> None:
    if not SEED_EXAMPLES.is_file():
        pytest.skip(f"{SEED_EXAMPLES} is not in this checkout's workspace")
    env = {**os.environ, "CUBE_TEMPLATE_ID": TEMPLATE}
    done = subprocess.run(
        [sys.executable, str(SEED_EXAMPLES)], env=env, capture_output=True, text=True, timeout=3600
    )
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 0 and "9 passed, 0 failed" in done.stdout, done.stdout[-2000:]


def test_tests_kvm_pass_inside(kvm_host: EmulatedHost) -> None:
    """tests/kvm (the VMM with real Linux guests: a boot to /init over virtio-blk, the template
    snapshot and its clones, besides the small-payload tests) run inside the emulated host
    against this checkout, where a Linux guest can boot and nothing is skipped for it."""
    command = (
        "cd /mnt/cubesrc && PYTHONPATH=/mnt/cubesrc:/mnt/cubepytest PYTHONDONTWRITEBYTECODE=1 "
        "CUBE_KVM_BOOT_TIMEOUT_S=3600 CUBE_GUEST_AGENT_TIMEOUT_S=600 CUBE_BUSYBOX=/mnt/cubepytest/busybox "
        "/opt/cube/venv/bin/python -m pytest -p no:cacheprovider -q -rs tests/kvm"
    )
    result = kvm_host.run(command, timeout=4 * 3600)
    print(result.stdout[-6000:], result.stderr[-2000:])
    assert result.status == 0, result.stdout[-4000:]
    assert "test_kvm_linux" not in "".join(line for line in result.stdout.splitlines() if "SKIP" in line)
