"""cffi binding to <linux/kvm.h>: ioctls, structs and constants, with typed wrappers.

from cffi_kvm import Kvm
with Kvm() as kvm:
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
"""

from cffi_kvm.kvm import CData, Kvm, KvmError, Vcpu, Vm, ffi, host_cpuid, lib, struct_bytes, struct_from_bytes

__all__ = [
    "CData",
    "Kvm",
    "KvmError",
    "Vcpu",
    "Vm",
    "ffi",
    "host_cpuid",
    "lib",
    "struct_bytes",
    "struct_from_bytes",
]
