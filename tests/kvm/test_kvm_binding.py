"""The cffi binding itself: errors carry the ioctl and errno; struct sizes match the kernel's."""

from __future__ import annotations

import errno

import pytest

from cffi_kvm import Kvm, KvmError, ffi, struct_bytes, struct_from_bytes


def test_failing_ioctl_raises_with_its_name_and_errno(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    try:
        with pytest.raises(KvmError) as failure:
            # Not page aligned: KVM rejects it.
            vm.set_user_memory_region(0, 0x123, 4096, 0x1000)
        assert failure.value.ioctl == "KVM_SET_USER_MEMORY_REGION"
        assert failure.value.errno == errno.EINVAL
        assert "KVM_SET_USER_MEMORY_REGION" in str(failure.value)
    finally:
        vm.close()


def test_supported_cpuid_and_state_structs_round_trip(kvm: Kvm) -> None:
    cpuid = kvm.supported_cpuid()
    functions = {cpuid.entries[i].function for i in range(cpuid.nent)}
    assert {0, 1, 0x80000000} <= functions
    vm = kvm.create_vm()
    try:
        vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        try:
            regs = vcpu.get_regs()
            regs.rax = 0x1234
            copy = struct_from_bytes("struct kvm_regs *", struct_bytes(regs))
            vcpu.set_regs(copy)
            assert vcpu.get_regs().rax == 0x1234
            assert ffi.sizeof("struct kvm_lapic_state") == 1024
            with pytest.raises(ValueError):
                struct_from_bytes("struct kvm_regs *", b"short")
        finally:
            vcpu.close()
    finally:
        vm.close()
