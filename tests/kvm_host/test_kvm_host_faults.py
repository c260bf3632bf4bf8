"""Faults of real kvm sandboxes in the emulated KVM host: a guest that panics or powers off
is reported dead with the reason (and its console tail in the service log) while the
others carry on; a guest that stops answering is killed as unresponsive; a template
snapshot made by another VMM is refused and rebuilt; a host out of memory answers 503
and kills nothing; kill -9 of the service leaves every sandbox running with its state
(the next start adopts their VMMs), kill -9 of one VMM ends that sandbox only."""

from __future__ import annotations

import time

import httpx
import pytest
from e2b import ServiceBusyException
from e2b_code_interpreter import Sandbox
from emulated_host import EmulatedHost
from test_kvm_host_sandboxes import REQUEST_TIMEOUT_S, console_of, create, run_code

# As root in the guest: make its PID 1 (cube-init) jump to address 0. Init dies of SIGSEGV,
# which the guest kernel answers with a panic ("Attempted to kill init!").
CRASH_INIT = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_POKEUSER, PTRACE_ATTACH, PTRACE_DETACH, RIP_OFFSET = 6, 16, 17, 16 * 8
assert libc.ptrace(PTRACE_ATTACH, 1, None, None) == 0, ctypes.get_errno()
import os; os.waitpid(1, 0)
libc.ptrace(PTRACE_POKEUSER, 1, RIP_OFFSET, 0)
libc.ptrace(PTRACE_DETACH, 1, None, None)
"""


def journal(kvm_host: EmulatedHost) -> str:
    return kvm_host.run("journalctl -u cube.service -o cat --no-pager").check().stdout


def wait_gone(sandbox: Sandbox, bound_s: float) -> None:
    deadline = time.monotonic() + bound_s
    while sandbox.is_running() and time.monotonic() < deadline:
        time.sleep(5)
    assert not sandbox.is_running()


def test_a_guest_that_panics_or_powers_off_is_reported_dead_and_others_carry_on(
    kvm_host_sdk: EmulatedHost,
) -> None:
    crashing, quitting, bystander = create(), create(), create()
    try:
        crashing.files.write("/tmp/crash.py", CRASH_INIT, request_timeout=REQUEST_TIMEOUT_S)
        crashing.commands.run("python3 /tmp/crash.py", user="root", background=True)
        # The agent gone, init powers the guest off (no ACPI: the runtime reads the console).
        quitting.commands.run("pkill -KILL -x cube-agent", user="root", background=True)
        wait_gone(crashing, 600)
        wait_gone(quitting, 600)
        log = journal(kvm_host_sdk)
        # The service log's line (lifecycle.py): "sandbox <id> is dead: <the runtime's reason>".
        panicked = "guest kernel panic: Attempted to kill init!"
        assert f"sandbox {crashing.sandbox_id} is dead: {panicked}" in log
        assert f"sandbox {quitting.sandbox_id} is dead: the guest powered off" in log
        assert "console tail:" in log
        assert run_code(bystander, "print('still here')") == "still here\n"
    finally:
        for sandbox in (crashing, quitting, bystander):
            if sandbox.is_running():
                sandbox.kill()


def test_a_guest_that_stops_answering_is_killed_as_unresponsive(kvm_host_sdk: EmulatedHost) -> None:
    frozen = create()
    try:
        frozen.commands.run("pkill -STOP -x cube-agent", user="root", background=True)
        # Three failed health probes, each waiting a fifth of guest_agent_timeout_s (600 s here).
        wait_gone(frozen, 1800)
        assert f"sandbox {frozen.sandbox_id} is dead: guest agent unresponsive" in journal(kvm_host_sdk)
    finally:
        if frozen.is_running():
            frozen.kill()


def test_a_snapshot_of_another_vmm_is_refused_and_rebuilt(kvm_host_sdk: EmulatedHost) -> None:
    warm = create()  # the template's snapshot exists from here on
    warm.kill()
    key_file = kvm_host_sdk.run("ls /var/lib/cube/kvm-snapshots/*/key.json").check().stdout.strip()
    kvm_host_sdk.run(
        f"python3 -c \"import json,sys; p='{key_file}'; k=json.load(open(p)); k['vmm']='0'*16; "
        "json.dump(k, open(p, 'w'))\""
    ).check()
    rebuilt = create()
    try:
        # It booted (its console shows the kernel) instead of restoring the refused snapshot...
        assert "Linux version" in console_of(kvm_host_sdk, rebuilt.sandbox_id)
        assert run_code(rebuilt, "print('booted')") == "booted\n"
    finally:
        rebuilt.kill()
    # ...and made a new one, which the next create restores.
    assert '"vmm": "0000000000000000"' not in kvm_host_sdk.run(f"cat {key_file}").check().stdout
    restored = create()
    try:
        assert "Linux version" not in console_of(kvm_host_sdk, restored.sandbox_id)
    finally:
        restored.kill()


# A process holding (touched) all but 400 MiB of the memory the emulated host has available.
HOG = (
    'systemd-run --unit=cubetest-hog python3 -c "import mmap, time; '
    "size = ({available} - 400) << 20; m = mmap.mmap(-1, size); "
    "[m.write(b'x' * (1 << 20)) for _ in range(size >> 20)]; time.sleep(3600)\""
)
MEM_AVAILABLE_MB = "awk '/MemAvailable/ {print int($2 / 1024)}' /proc/meminfo"


def test_a_host_out_of_memory_answers_503_and_kills_nothing(kvm_host_sdk: EmulatedHost) -> None:
    running = create()
    try:
        available_mb = int(kvm_host_sdk.run(MEM_AVAILABLE_MB).check().stdout)
        kvm_host_sdk.run(HOG.format(available=available_mb)).check()
        try:
            deadline = time.monotonic() + 600
            while (
                int(kvm_host_sdk.run("awk '/MemAvailable/ {print int($2/1024)}' /proc/meminfo").stdout) > 600
            ):
                assert time.monotonic() < deadline, "the memory hog did not take the memory"
                time.sleep(5)
            with pytest.raises(ServiceBusyException) as refused:  # the SDK's 503
                create()
            assert "503" in str(refused.value) and "retry later" in str(refused.value), refused.value
            assert run_code(running, "print('alive')") == "alive\n"
        finally:
            kvm_host_sdk.run("systemctl stop cubetest-hog")
        assert kvm_host_sdk.run("dmesg | grep -ci 'killed process'").stdout.strip() == "0"
        again = create()
        again.kill()
    finally:
        running.kill()


def _until_the_api_answers(kvm_host: EmulatedHost, bound_s: float) -> None:
    deadline = time.monotonic() + bound_s
    while True:
        try:
            if httpx.get(f"{kvm_host.url}/health", timeout=30, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the service did not come back"
        time.sleep(5)


def _vmm_pid(kvm_host: EmulatedHost, sandbox_id: str) -> int:
    record = f"/run/cube/vmms/{sandbox_id}/supervisor.json"
    return int(
        kvm_host.run(f"python3 -c \"import json; print(json.load(open('{record}'))['pid'])\"").check().stdout
    )


KEEP_STATE = "kept = 'x' * 3 + str(41 + 1)\nopen('/home/user/kept.txt', 'w').write('on disk')"
SHOW_STATE = "print(kept, open('/home/user/kept.txt').read())"


def test_sandboxes_outlive_a_killed_service_and_one_killed_vmm_ends_only_its_own(
    kvm_host_sdk: EmulatedHost,
) -> None:
    kept, victim = create(), create()
    try:
        for sandbox in (kept, victim):
            run_code(sandbox, KEEP_STATE)
        end_at = kept.get_info(request_timeout=REQUEST_TIMEOUT_S).end_at
        vmms = {s.sandbox_id: _vmm_pid(kvm_host_sdk, s.sandbox_id) for s in (kept, victim)}
        service = kvm_host_sdk.run("systemctl show -p MainPID --value cube.service").check().stdout.strip()
        kvm_host_sdk.run(f"kill -9 {service}").check()  # systemd starts it again (Restart=on-failure)
        _until_the_api_answers(kvm_host_sdk, 900)
        log = journal(kvm_host_sdk)
        assert "sandboxes run on from the previous start" in log
        for sandbox in (kept, victim):
            # The same VMM process, the kernel's variable and the file as they were.
            assert _vmm_pid(kvm_host_sdk, sandbox.sandbox_id) == vmms[sandbox.sandbox_id]
            assert run_code(sandbox, SHOW_STATE) == "xxx42 on disk\n"
        assert kept.get_info(request_timeout=REQUEST_TIMEOUT_S).end_at == end_at  # its deadline kept
        kvm_host_sdk.run(f"kill -9 {vmms[victim.sandbox_id]}").check()
        wait_gone(victim, 600)
        assert (
            f"sandbox {victim.sandbox_id} is dead: its supervisor (pid {vmms[victim.sandbox_id]}) is gone"
            in (journal(kvm_host_sdk))
        )
        assert run_code(kept, SHOW_STATE) == "xxx42 on disk\n"
    finally:
        for sandbox in (kept, victim):
            if sandbox.is_running():
                sandbox.kill()
