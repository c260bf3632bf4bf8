"""Faults of the kvm runtime, and what the client sees of them.

- A guest that panics, triple-faults, resets or powers off is reported dead with the reason
  in words (the panic's own message when its console shows one) and its console tail.
- Not enough host memory for a guest's RAM: the create is refused before anything is set up
  (no directory, no network, nothing killed) and the client gets 503 with E2B's error body,
  while the sandboxes already running carry on.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from kvm_guest import assemble, serial_print

from appliance.config import Config
from appliance.records import TemplateManifest
from appliance.runtime.base import BootSpec, HostBusy, Instance
from appliance.runtime.detect import detect_host
from appliance.runtime.kvm.console import SerialConsole
from appliance.runtime.kvm.machine import Machine, MachineConfig
from appliance.runtime.kvm.runtime import KvmRuntime, exit_reason, host_memory_available_mb
from appliance.runtime.kvm.vcpu import VcpuExit
from appliance.runtime.kvm.x86 import enter_long_mode
from appliance.runtime.uml.console import ConsoleLog
from cffi_kvm import Kvm

MIB = 1 << 20

PANIC_TAIL = (
    "[    3.120000] sysrq: Trigger a crash\n"
    "[    3.121000] Kernel panic - not syncing: sysrq triggered crash\n"
    "[    3.122000] CPU: 0 PID: 80 Comm: sh Not tainted 6.1.0 #1\n"
)


def test_exit_reasons_say_what_happened() -> None:
    assert exit_reason(VcpuExit.RESET, PANIC_TAIL) == "guest kernel panic: sysrq triggered crash"
    assert exit_reason(VcpuExit.SHUTDOWN, "") == "the guest shut down (triple fault or shutdown request)"
    assert exit_reason(VcpuExit.RESET, "reboot: Restarting system\n") == "the guest reset itself (reboot)"
    assert (
        exit_reason("KVM could not run the guest: entry failed", "")
        == "KVM could not run the guest: entry failed"
    )


def test_a_guest_bigger_than_the_hosts_free_memory_is_refused_before_anything_is_set_up(
    tmp_path: Path,
) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"never booted")
    config = Config(state_dir=tmp_path / "state", cache_dir=tmp_path / "cache", kvm_guest_kernel=kernel)
    if not detect_host(config).kvm_usable:
        pytest.skip(detect_host(config).reason)
    template = TemplateManifest(template_id="t", directory=config.templates_dir / "t")
    too_big = host_memory_available_mb() + 1024
    spec = BootSpec("sbx", template, slot=1, sandbox_dir=tmp_path / "sbx", memory_mb=too_big, cpu_count=1)
    with pytest.raises(HostBusy) as refused:
        trio.run(KvmRuntime(config, cubevs=None).run, spec)
    assert f"a {too_big} MiB sandbox" in refused.value.reason
    assert not spec.sandbox_dir.exists()


def test_the_client_gets_503_and_the_running_sandboxes_carry_on(
    service_config: Config, start_service: Any, fake_runtime: Any
) -> None:
    class FullAfterOne(type(fake_runtime)):  # type: ignore[misc]
        """Room for one guest: the second create finds the host's memory taken."""

        async def run(self, spec: BootSpec, *, task_status: trio.TaskStatus[Instance]) -> None:
            if self.instances:
                raise HostBusy(spec.sandbox_id, "the host has 100 MiB of memory available")
            await super().run(spec, task_status=task_status)

    service = start_service(service_config, FullAfterOne())
    key = httpx.post(
        f"{service.url}/cube/keys", json={"name": "test"}, headers={"X-API-KEY": service.admin_token}
    ).json()["key"]
    headers = {"X-API-KEY": key}
    first = httpx.post(f"{service.url}/sandboxes", json={"templateID": "base"}, headers=headers, timeout=60)
    assert first.status_code == 201, first.text
    refused = httpx.post(f"{service.url}/sandboxes", json={"templateID": "base"}, headers=headers, timeout=60)
    assert refused.status_code == 503, refused.text
    body = refused.json()
    assert body["code"] == 503 and "retry later" in body["message"] and "100 MiB" in body["message"]
    sandbox_id = first.json()["sandboxID"]
    running = httpx.get(f"{service.url}/sandboxes/{sandbox_id}", headers=headers, timeout=60)
    assert running.status_code == 200 and running.json()["state"] == "running", running.text
    assert os.path.exists(service_config.sandboxes_dir / sandbox_id)


# The kernel's last line: with a power-off method, and without one (the microVM kernel: its
# power-off becomes a halt; seen in the emulated host when cube-init powered off).
@pytest.mark.parametrize("last_line", ["reboot: Power down", "reboot: System halted"])
async def test_a_guest_that_powers_off_stops_its_machine(kvm: Kvm, tmp_path: Path, last_line: str) -> None:
    """Without ACPI a guest kernel's power-off only halts its CPUs, which KVM keeps asleep
    forever; its last console line ends the machine instead, so the runtime reports the
    guest dead at once instead of a hung sandbox."""
    console = SerialConsole(ConsoleLog(tmp_path / "console.log"))
    machine = Machine.new(kvm, MachineConfig(memory_size=16 * MIB), console=console.write)
    console.on_power_down = functools.partial(machine.request_stop, VcpuExit.POWEROFF)
    try:
        code = serial_print(f"[   12.345678] {last_line}\\r\\n", then="cli; hlt; jmp done")
        machine.memory.write(0x10000, assemble(code, origin=0x10000))
        enter_long_mode(machine.memory, machine.vcpus[0].vcpu, rip=0x10000, rsp=0x8000)
        with trio.fail_after(20):
            outcome = await machine.run()
    finally:
        machine.close()
    console.drain()
    assert outcome is VcpuExit.POWEROFF
    assert exit_reason(outcome, console.console.tail()) == "the guest powered off"
    assert last_line in (tmp_path / "console.log").read_text()
