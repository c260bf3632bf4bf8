"""A real Linux guest on the VMM: kernel → /init over virtio-blk, serial console, reset.

Needs hardware virtualization (VMX/SVM) or PVM with a PVM guest kernel, and a built
microVM kernel (image/kernel/build.py); elsewhere it is skipped with the reason."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import pytest
import trio

from appliance.config import load_config
from appliance.runtime.detect import detect_host
from appliance.runtime.kvm.boot import load_linux, prepare_boot_vcpu
from appliance.runtime.kvm.machine import Machine, MachineConfig
from appliance.runtime.kvm.runtime import KERNEL_CMDLINE, find_guest_kernel
from appliance.runtime.kvm.vcpu import VcpuExit
from appliance.runtime.virtio.blk.device import VirtioBlock
from appliance.runtime.virtio.blk.disk import CowDisk
from appliance.runtime.virtio.mmio import MMIO_SIZE, MmioTransport, cmdline_device
from appliance.runtime.virtio.vhost_user.uml_frontend import BUSYBOX, build_initramfs
from cffi_kvm import Kvm

MIB = 1 << 20


def _why_not() -> str | None:
    config = load_config()
    host = detect_host(config)
    if host.kvm not in ("VMX", "SVM") and not (host.kvm == "PVM" and host.pvm_guest_kernel):
        return f"a Linux guest cannot boot under this host's KVM ({host.kvm}): {host.reason}"
    if find_guest_kernel(config) is None:
        return "no microVM guest kernel: run image/kernel/build.py or set kvm_guest_kernel"
    if not BUSYBOX.exists():
        return "no static busybox for the initramfs (install busybox-static)"
    return None


WHY_NOT = _why_not()


@pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")
async def test_linux_boots_to_init_and_reads_virtio_blk(tmp_path: Path) -> None:
    kernel = find_guest_kernel(load_config())
    assert kernel is not None
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MIB))
    initrd = tmp_path / "initrd"
    script = "echo disk=$(dd if=/dev/vda bs=1M count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
    initrd.write_bytes(gzip.decompress(build_initramfs(script)))
    disk = CowDisk(tmp_path / "overlay", base=image)
    with Kvm() as kvm:
        machine = Machine.new(kvm, MachineConfig(memory_size=256 * MIB))
        try:
            irq_fd = machine.irq_eventfd(5)
            transport = MmioTransport(VirtioBlock(disk), machine.memory, lambda: os.eventfd_write(irq_fd, 1))
            machine.add_mmio_device("virtio-blk", transport, 0xD000_0000, MMIO_SIZE)
            cmdline = KERNEL_CMDLINE.replace("root=/dev/vda rw init=/sbin/cube-init", "rdinit=/init")
            entry = load_linux(machine.memory, kernel, f"{cmdline} {cmdline_device(0xD000_0000, 5)}", initrd)
            prepare_boot_vcpu(machine.memory, machine.vcpus[0].vcpu, entry)
            with trio.fail_after(60):
                outcome = await machine.run()
        finally:
            machine.close()
            disk.close()
    console = machine.console_output.decode(errors="replace")
    assert outcome is VcpuExit.RESET, console[-2000:]  # `reboot -f` with reboot=k → i8042 reset
    assert f"disk={hashlib.sha256(image.read_bytes()).hexdigest()}" in console
