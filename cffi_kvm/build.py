"""cffi builder for `cffi_kvm._kvm`, compiled against the system's <linux/kvm.h>.

API mode: every struct layout and ioctl number below is checked by the C
compiler against the installed headers, so nothing here hard-codes an offset.
Used two ways: as a setuptools `cffi_modules` entry (``cffi_kvm/build.py:ffibuilder``)
and by `cffi_kvm._load` to build the extension lazily into a cache directory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cffi

MODULE_NAME = "cffi_kvm._kvm"

# ioctl request numbers and constants the VMM uses; each becomes `lib.NAME`.
CONSTANTS = """
KVM_API_VERSION
KVM_GET_API_VERSION KVM_CREATE_VM KVM_GET_MSR_INDEX_LIST KVM_CHECK_EXTENSION
KVM_GET_VCPU_MMAP_SIZE KVM_GET_SUPPORTED_CPUID
KVM_CREATE_VCPU KVM_GET_DIRTY_LOG KVM_SET_USER_MEMORY_REGION KVM_SET_TSS_ADDR
KVM_SET_IDENTITY_MAP_ADDR KVM_CREATE_IRQCHIP KVM_IRQ_LINE KVM_GET_IRQCHIP KVM_SET_IRQCHIP
KVM_CREATE_PIT2 KVM_GET_PIT2 KVM_SET_PIT2 KVM_IRQFD KVM_IOEVENTFD KVM_SET_CLOCK KVM_GET_CLOCK
KVM_SIGNAL_MSI KVM_ENABLE_CAP KVM_SET_GSI_ROUTING
KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_GET_MSRS KVM_SET_MSRS
KVM_GET_FPU KVM_SET_FPU KVM_GET_LAPIC KVM_SET_LAPIC KVM_SET_CPUID2 KVM_GET_CPUID2
KVM_GET_MP_STATE KVM_SET_MP_STATE KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS
KVM_GET_DEBUGREGS KVM_SET_DEBUGREGS KVM_GET_XSAVE KVM_SET_XSAVE KVM_GET_XCRS KVM_SET_XCRS
KVM_KVMCLOCK_CTRL KVM_NMI KVM_INTERRUPT
KVM_CAP_IRQCHIP KVM_CAP_USER_MEMORY KVM_CAP_SET_TSS_ADDR KVM_CAP_EXT_CPUID KVM_CAP_NR_VCPUS
KVM_CAP_MAX_VCPUS KVM_CAP_PIT2 KVM_CAP_IRQFD KVM_CAP_IOEVENTFD KVM_CAP_XSAVE KVM_CAP_XCRS
KVM_CAP_DEBUGREGS KVM_CAP_VCPU_EVENTS KVM_CAP_ADJUST_CLOCK KVM_CAP_IMMEDIATE_EXIT
KVM_CAP_IRQ_ROUTING KVM_CAP_SIGNAL_MSI KVM_CAP_COALESCED_MMIO KVM_CAP_KVMCLOCK_CTRL
KVM_MEM_LOG_DIRTY_PAGES KVM_MEM_READONLY
KVM_EXIT_UNKNOWN KVM_EXIT_EXCEPTION KVM_EXIT_IO KVM_EXIT_HYPERCALL KVM_EXIT_DEBUG KVM_EXIT_HLT
KVM_EXIT_MMIO KVM_EXIT_IRQ_WINDOW_OPEN KVM_EXIT_SHUTDOWN KVM_EXIT_FAIL_ENTRY KVM_EXIT_INTR
KVM_EXIT_NMI KVM_EXIT_INTERNAL_ERROR KVM_EXIT_SYSTEM_EVENT
KVM_EXIT_IO_IN KVM_EXIT_IO_OUT
KVM_IRQFD_FLAG_DEASSIGN KVM_IOEVENTFD_FLAG_DATAMATCH KVM_IOEVENTFD_FLAG_PIO
KVM_IOEVENTFD_FLAG_DEASSIGN
KVM_MP_STATE_RUNNABLE KVM_MP_STATE_UNINITIALIZED KVM_MP_STATE_HALTED
KVM_PIT_SPEAKER_DUMMY
KVM_VCPUEVENT_VALID_NMI_PENDING KVM_VCPUEVENT_VALID_SIPI_VECTOR KVM_VCPUEVENT_VALID_SHADOW
KVM_VCPUEVENT_VALID_SMM
""".split()

CDEF = """
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};
struct kvm_segment {
    uint64_t base; uint32_t limit; uint16_t selector;
    uint8_t type, present, dpl, db, s, l, g, avl, unusable, padding;
};
struct kvm_dtable { uint64_t base; uint16_t limit; uint16_t padding[3]; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    unsigned long long interrupt_bitmap[...];
};
struct kvm_fpu { ...; };
struct kvm_xsave { uint32_t region[1024]; ...; };
struct kvm_xcr { uint32_t xcr; uint32_t reserved; uint64_t value; };
struct kvm_xcrs { uint32_t nr_xcrs; uint32_t flags; struct kvm_xcr xcrs[...]; ...; };
struct kvm_msr_entry { uint32_t index; uint32_t reserved; uint64_t data; };
struct kvm_msrs { uint32_t nmsrs; uint32_t pad; struct kvm_msr_entry entries[]; };
struct kvm_msr_list { uint32_t nmsrs; uint32_t indices[]; };
struct kvm_lapic_state { char regs[...]; };
struct kvm_vcpu_events { uint32_t flags; ...; };
struct kvm_mp_state { uint32_t mp_state; };
struct kvm_debugregs { unsigned long long db[4]; uint64_t dr6; uint64_t dr7; uint64_t flags; ...; };
struct kvm_clock_data { uint64_t clock; uint32_t flags; ...; };
struct kvm_pit_config { uint32_t flags; ...; };
struct kvm_pit_state2 { uint32_t flags; ...; };
struct kvm_irqchip { uint32_t chip_id; uint32_t pad; ...; };
struct kvm_irq_level { uint32_t irq; uint32_t level; };
struct kvm_userspace_memory_region {
    uint32_t slot; uint32_t flags; uint64_t guest_phys_addr; uint64_t memory_size;
    uint64_t userspace_addr;
};
struct kvm_cpuid_entry2 {
    uint32_t function, index, flags, eax, ebx, ecx, edx; ...;
};
struct kvm_cpuid2 { uint32_t nent; uint32_t padding; struct kvm_cpuid_entry2 entries[]; };
struct kvm_irqfd { uint32_t fd; uint32_t gsi; uint32_t flags; uint32_t resamplefd; ...; };
struct kvm_ioeventfd {
    uint64_t datamatch; uint64_t addr; uint32_t len; int32_t fd; uint32_t flags; ...;
};
struct kvm_dirty_log { uint32_t slot; uint32_t padding1; void *dirty_bitmap; ...; };
struct kvm_msi { uint32_t address_lo, address_hi, data, flags; ...; };
struct kvm_enable_cap { uint32_t cap; uint32_t flags; unsigned long long args[4]; ...; };

/* The shared run page: only the exit payloads the VMM handles are named. */
struct kvm_run_io { uint8_t direction; uint8_t size; uint16_t port; uint32_t count; uint64_t data_offset; };
struct kvm_run_mmio { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; };
struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint64_t cr8;
    uint64_t apic_base;
    ...;
};
struct kvm_run_io *cube_run_io(struct kvm_run *run);
struct kvm_run_mmio *cube_run_mmio(struct kvm_run *run);
uint64_t cube_run_fail_entry_reason(struct kvm_run *run);
uint32_t cube_run_internal_suberror(struct kvm_run *run);
uint32_t cube_run_system_event_type(struct kvm_run *run);
uint64_t cube_run_hw_exit_reason(struct kvm_run *run);

/* ioctl without varargs; returns the result or -errno (no thread-local errno races). */
long cube_ioctl(int fd, unsigned long request, void *arg);
long cube_ioctl_int(int fd, unsigned long request, unsigned long arg);

/* Memory. */
#define PROT_NONE ...
#define PROT_READ ...
#define PROT_WRITE ...
#define MAP_SHARED ...
#define MAP_PRIVATE ...
#define MAP_ANONYMOUS ...
#define MAP_NORESERVE ...
#define MAP_POPULATE ...
#define MADV_DONTNEED ...
#define MADV_MERGEABLE ...
void *cube_mmap(size_t length, int prot, int flags, int fd, int64_t offset);  /* NULL + errno */
int munmap(void *addr, size_t length);
int mprotect(void *addr, size_t length, int prot);
int madvise(void *addr, size_t length, int advice);

/* A do-nothing handler for the signal that kicks a vCPU thread out of KVM_RUN. */
int cube_install_kick_handler(int signo);
int cube_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4]);
"""

SOURCE = r"""
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <cpuid.h>
#include <linux/kvm.h>

struct kvm_run_io { uint8_t direction; uint8_t size; uint16_t port; uint32_t count; uint64_t data_offset; };
struct kvm_run_mmio { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; };
_Static_assert(sizeof(struct kvm_run_io) == sizeof(((struct kvm_run *)0)->io), "kvm_run.io layout");
_Static_assert(sizeof(struct kvm_run_mmio) == sizeof(((struct kvm_run *)0)->mmio), "kvm_run.mmio layout");

static struct kvm_run_io *cube_run_io(struct kvm_run *run) { return (struct kvm_run_io *)&run->io; }
static struct kvm_run_mmio *cube_run_mmio(struct kvm_run *run) { return (struct kvm_run_mmio *)&run->mmio; }
static uint64_t cube_run_fail_entry_reason(struct kvm_run *run) {
    return run->fail_entry.hardware_entry_failure_reason;
}
static uint32_t cube_run_internal_suberror(struct kvm_run *run) { return run->internal.suberror; }
static uint32_t cube_run_system_event_type(struct kvm_run *run) { return run->system_event.type; }
static uint64_t cube_run_hw_exit_reason(struct kvm_run *run) { return run->hw.hardware_exit_reason; }

static long cube_ioctl(int fd, unsigned long request, void *arg) {
    long r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}
static long cube_ioctl_int(int fd, unsigned long request, unsigned long arg) {
    long r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}
static void *cube_mmap(size_t length, int prot, int flags, int fd, int64_t offset) {
    void *p = mmap(NULL, length, prot, flags, fd, (off_t)offset);
    return p == MAP_FAILED ? NULL : p;
}
static void cube_kick(int signo) { (void)signo; }
static int cube_install_kick_handler(int signo) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = cube_kick;  /* no SA_RESTART: KVM_RUN must return -EINTR */
    sigemptyset(&sa.sa_mask);
    return sigaction(signo, &sa, NULL) < 0 ? -errno : 0;
}
static int cube_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4]) {
    __cpuid_count(leaf, subleaf, out[0], out[1], out[2], out[3]);
    return 0;
}
"""


def make_builder(module_name: str = MODULE_NAME) -> cffi.FFI:
    builder = cffi.FFI()
    builder.cdef(CDEF + "".join(f"#define {name} ...\n" for name in CONSTANTS))
    builder.set_source(module_name, SOURCE)
    return builder


def source_fingerprint() -> str:
    """Changes whenever the binding or the installed kernel headers change."""
    digest = hashlib.sha256((CDEF + SOURCE + " ".join(CONSTANTS)).encode())
    for header in ("/usr/include/linux/kvm.h", "/usr/include/x86_64-linux-gnu/asm/kvm.h"):
        path = Path(header)
        if path.exists():
            digest.update(path.read_bytes())
    digest.update(cffi.__version__.encode())
    return digest.hexdigest()[:16]


ffibuilder = make_builder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
