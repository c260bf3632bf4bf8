"""Typed wrappers over the KVM ioctls: system (/dev/kvm), VM and vCPU file descriptors.

Every failing ioctl raises `KvmError` carrying the errno and the ioctl's name.
State getters return freshly allocated cdata structs; `struct_bytes` and
`struct_from_bytes` turn them into plain bytes and back for snapshots.
"""

from __future__ import annotations

import errno as errno_codes
import os
from typing import Any

from cffi_kvm._load import load

_module = load()
ffi: Any = _module.ffi
lib: Any = _module.lib

CData = Any  # cffi cdata; cffi ships no type stubs


class KvmError(OSError):
    """A KVM ioctl failed; `.errno` is the kernel's error, `.ioctl` the request's name."""

    def __init__(self, err: int, ioctl: str) -> None:
        super().__init__(err, f"{ioctl}: {os.strerror(err)}")
        self.ioctl = ioctl


def _ioctl(fd: int, name: str, arg: CData) -> int:
    result = int(lib.cube_ioctl(fd, getattr(lib, name), arg))
    if result < 0:
        raise KvmError(-result, name)
    return result


def _ioctl_int(fd: int, name: str, arg: int = 0) -> int:
    result = int(lib.cube_ioctl_int(fd, getattr(lib, name), arg))
    if result < 0:
        raise KvmError(-result, name)
    return result


def struct_bytes(cdata: CData) -> bytes:
    return bytes(ffi.buffer(cdata))


def struct_from_bytes(ctype: str, data: bytes) -> CData:
    """A new `ctype *` holding `data`; sizes must match (a snapshot from other headers fails)."""
    cdata = ffi.new(ctype)
    if ffi.sizeof(cdata[0]) != len(data):
        raise ValueError(
            f"{ctype}: snapshot has {len(data)} bytes, this build expects {ffi.sizeof(cdata[0])}"
        )
    ffi.buffer(cdata)[:] = data
    return cdata


def host_cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """CPUID as the host process sees it (eax, ebx, ecx, edx)."""
    out = ffi.new("uint32_t[4]")
    lib.cube_cpuid(leaf, subleaf, out)
    return int(out[0]), int(out[1]), int(out[2]), int(out[3])


class Kvm:
    """The /dev/kvm system file descriptor."""

    def __init__(self, path: str = "/dev/kvm", *, fd: int | None = None) -> None:
        """/dev/kvm opened here, or the descriptor `fd` of it (taken over: closed with this)."""
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC) if fd is None else fd
        version = _ioctl_int(self.fd, "KVM_GET_API_VERSION")
        if version != lib.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError(errno_codes.EINVAL, f"KVM_GET_API_VERSION (got {version})")

    @classmethod
    def from_fd(cls, fd: int) -> Kvm:
        return cls(fd=fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_extension(self, cap: str) -> int:
        return _ioctl_int(self.fd, "KVM_CHECK_EXTENSION", getattr(lib, cap))

    def vcpu_mmap_size(self) -> int:
        return _ioctl_int(self.fd, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self, max_entries: int = 256) -> CData:
        """`struct kvm_cpuid2 *` with the CPUID leaves this KVM can offer a guest."""
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
        cpuid.nent = max_entries
        _ioctl(self.fd, "KVM_GET_SUPPORTED_CPUID", cpuid)
        return cpuid

    def msr_index_list(self) -> list[int]:
        probe = ffi.new("struct kvm_msr_list *", {"nmsrs": 0, "indices": 0})
        try:
            _ioctl(self.fd, "KVM_GET_MSR_INDEX_LIST", probe)
        except KvmError as e:
            if e.errno != errno_codes.E2BIG:
                raise
        count = probe.nmsrs
        msr_list = ffi.new("struct kvm_msr_list *", {"nmsrs": count, "indices": count})
        msr_list.nmsrs = count
        _ioctl(self.fd, "KVM_GET_MSR_INDEX_LIST", msr_list)
        return [int(msr_list.indices[i]) for i in range(msr_list.nmsrs)]

    def create_vm(self) -> Vm:
        return Vm(self, _ioctl_int(self.fd, "KVM_CREATE_VM"))


class Vm:
    """A VM file descriptor: memory slots, in-kernel irqchip/PIT, eventfds, vCPUs."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, host_addr: int, flags: int = 0
    ) -> None:
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {
                "slot": slot,
                "flags": flags,
                "guest_phys_addr": guest_phys_addr,
                "memory_size": size,
                "userspace_addr": host_addr,
            },
        )
        _ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", region)

    def set_tss_addr(self, addr: int) -> None:
        _ioctl_int(self.fd, "KVM_SET_TSS_ADDR", addr)

    def set_identity_map_addr(self, addr: int) -> None:
        _ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", ffi.new("uint64_t *", addr))

    def create_irqchip(self) -> None:
        _ioctl_int(self.fd, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        _ioctl(
            self.fd,
            "KVM_CREATE_PIT2",
            ffi.new("struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY}),
        )

    def irq_line(self, irq: int, level: bool) -> None:
        _ioctl(self.fd, "KVM_IRQ_LINE", ffi.new("struct kvm_irq_level *", {"irq": irq, "level": int(level)}))

    def irqfd(self, eventfd: int, gsi: int, *, deassign: bool = False) -> None:
        flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        _ioctl(
            self.fd, "KVM_IRQFD", ffi.new("struct kvm_irqfd *", {"fd": eventfd, "gsi": gsi, "flags": flags})
        )

    def ioeventfd(
        self,
        eventfd: int,
        addr: int,
        length: int,
        *,
        pio: bool = False,
        datamatch: int | None = None,
        deassign: bool = False,
    ) -> None:
        flags = (lib.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (
            lib.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0
        )
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        request = ffi.new(
            "struct kvm_ioeventfd *",
            {"datamatch": datamatch or 0, "addr": addr, "len": length, "fd": eventfd, "flags": flags},
        )
        _ioctl(self.fd, "KVM_IOEVENTFD", request)

    def signal_msi(self, address: int, data: int) -> int:
        msi = ffi.new(
            "struct kvm_msi *",
            {"address_lo": address & 0xFFFFFFFF, "address_hi": address >> 32, "data": data},
        )
        return _ioctl(self.fd, "KVM_SIGNAL_MSI", msi)

    def get_irqchip(self, chip_id: int) -> CData:
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        _ioctl(self.fd, "KVM_GET_IRQCHIP", chip)
        return chip

    def set_irqchip(self, chip: CData) -> None:
        _ioctl(self.fd, "KVM_SET_IRQCHIP", chip)

    def get_pit2(self) -> CData:
        pit = ffi.new("struct kvm_pit_state2 *")
        _ioctl(self.fd, "KVM_GET_PIT2", pit)
        return pit

    def set_pit2(self, pit: CData) -> None:
        _ioctl(self.fd, "KVM_SET_PIT2", pit)

    def get_clock(self) -> CData:
        clock = ffi.new("struct kvm_clock_data *")
        _ioctl(self.fd, "KVM_GET_CLOCK", clock)
        return clock

    def set_clock(self, clock: CData) -> None:
        _ioctl(self.fd, "KVM_SET_CLOCK", clock)

    def get_dirty_log(self, slot: int, pages: int) -> bytes:
        """Bitmap (one bit per page, little-endian 64-bit words) of pages written since the last call."""
        bitmap = ffi.new("uint64_t[]", (pages + 63) // 64)
        _ioctl(
            self.fd,
            "KVM_GET_DIRTY_LOG",
            ffi.new("struct kvm_dirty_log *", {"slot": slot, "dirty_bitmap": bitmap}),
        )
        return bytes(ffi.buffer(bitmap))

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = _ioctl_int(self.fd, "KVM_CREATE_VCPU", vcpu_id)
        return Vcpu(self, vcpu_id, fd)


class Vcpu:
    """A vCPU file descriptor plus its mmapped `struct kvm_run`."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self._run_size = vm.kvm.vcpu_mmap_size()
        address = lib.cube_mmap(self._run_size, lib.PROT_READ | lib.PROT_WRITE, lib.MAP_SHARED, fd, 0)
        if address == ffi.NULL:
            err = ffi.errno
            os.close(fd)
            raise KvmError(err, "mmap(kvm_run)")
        self._run_page = address
        self.run_state: CData = ffi.cast("struct kvm_run *", address)

    def close(self) -> None:
        if self.fd >= 0:
            lib.munmap(self._run_page, self._run_size)
            os.close(self.fd)
            self.fd = -1

    def run(self) -> bool:
        """One KVM_RUN (the GIL is released while the guest runs).

        Returns False when interrupted (EINTR from the kick signal, or immediate_exit
        was set), True when the guest exited and `run_state.exit_reason` says why.
        """
        result = int(lib.cube_ioctl_int(self.fd, lib.KVM_RUN, 0))
        if result == -errno_codes.EINTR or result == -errno_codes.EAGAIN:
            return False
        if result < 0:
            raise KvmError(-result, "KVM_RUN")
        return True

    def io_data(self) -> CData:
        """`uint8_t *` to the port-I/O data KVM placed inside the run page."""
        io = lib.cube_run_io(self.run_state)
        return ffi.cast("uint8_t *", self.run_state) + io.data_offset

    def _get(self, name: str, ctype: str) -> CData:
        cdata = ffi.new(ctype)
        _ioctl(self.fd, name, cdata)
        return cdata

    def get_regs(self) -> CData:
        return self._get("KVM_GET_REGS", "struct kvm_regs *")

    def set_regs(self, regs: CData) -> None:
        _ioctl(self.fd, "KVM_SET_REGS", regs)

    def get_sregs(self) -> CData:
        return self._get("KVM_GET_SREGS", "struct kvm_sregs *")

    def set_sregs(self, sregs: CData) -> None:
        _ioctl(self.fd, "KVM_SET_SREGS", sregs)

    def get_fpu(self) -> CData:
        return self._get("KVM_GET_FPU", "struct kvm_fpu *")

    def set_fpu(self, fpu: CData) -> None:
        _ioctl(self.fd, "KVM_SET_FPU", fpu)

    def get_xsave(self) -> CData:
        return self._get("KVM_GET_XSAVE", "struct kvm_xsave *")

    def set_xsave(self, xsave: CData) -> None:
        _ioctl(self.fd, "KVM_SET_XSAVE", xsave)

    def get_xcrs(self) -> CData:
        return self._get("KVM_GET_XCRS", "struct kvm_xcrs *")

    def set_xcrs(self, xcrs: CData) -> None:
        _ioctl(self.fd, "KVM_SET_XCRS", xcrs)

    def get_lapic(self) -> CData:
        return self._get("KVM_GET_LAPIC", "struct kvm_lapic_state *")

    def set_lapic(self, lapic: CData) -> None:
        _ioctl(self.fd, "KVM_SET_LAPIC", lapic)

    def get_vcpu_events(self) -> CData:
        return self._get("KVM_GET_VCPU_EVENTS", "struct kvm_vcpu_events *")

    def set_vcpu_events(self, events: CData) -> None:
        _ioctl(self.fd, "KVM_SET_VCPU_EVENTS", events)

    def get_mp_state(self) -> int:
        return int(self._get("KVM_GET_MP_STATE", "struct kvm_mp_state *").mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        _ioctl(self.fd, "KVM_SET_MP_STATE", ffi.new("struct kvm_mp_state *", {"mp_state": mp_state}))

    def get_debugregs(self) -> CData:
        return self._get("KVM_GET_DEBUGREGS", "struct kvm_debugregs *")

    def set_debugregs(self, debugregs: CData) -> None:
        _ioctl(self.fd, "KVM_SET_DEBUGREGS", debugregs)

    def set_cpuid2(self, cpuid: CData) -> None:
        _ioctl(self.fd, "KVM_SET_CPUID2", cpuid)

    def get_msrs(self, indices: list[int]) -> list[tuple[int, int]]:
        """(index, value) for each MSR KVM could read, in order; stops at the first it cannot."""
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        msrs.nmsrs = len(indices)
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        read = _ioctl(self.fd, "KVM_GET_MSRS", msrs)
        return [(int(msrs.entries[i].index), int(msrs.entries[i].data)) for i in range(read)]

    def set_msrs(self, entries: list[tuple[int, int]]) -> int:
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(entries), "entries": len(entries)})
        msrs.nmsrs = len(entries)
        for i, (index, value) in enumerate(entries):
            msrs.entries[i].index = index
            msrs.entries[i].data = value
        return _ioctl(self.fd, "KVM_SET_MSRS", msrs)

    def kvmclock_ctrl(self) -> None:
        _ioctl_int(self.fd, "KVM_KVMCLOCK_CTRL")
