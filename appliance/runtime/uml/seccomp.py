"""The seccomp deny-list every UML process runs under, compiled with libseccomp (ctypes).

bwrap installs it (`--seccomp FD`) after building the sandbox's namespaces and
before exec'ing the kernel, so it covers the UML kernel and every host process
it forks for guest address spaces. Guest system calls never reach it (UML
intercepts them with PTRACE_SYSEMU, which skips the host's seccomp check); it
limits what a guest that took over the UML process itself could ask the host.

Denied: mounting and namespace changes, module and kexec loading, bpf, keyrings,
io_uring, perf, userfaultfd, handle-based opens, clock setting, swap, reboot,
clone with namespace flags (and clone3, whose flags live in memory a filter
cannot read: ENOSYS makes libc fall back to clone). `ptrace` stays allowed: UML
traces its own children. Other architectures' system calls kill the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7

DENIED_SYSCALLS = (
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr", "unshare", "setns", "bpf", "keyctl", "add_key",
    "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff",
    "acct", "quotactl", "syslog", "perf_event_open", "userfaultfd", "open_by_handle_at",
    "name_to_handle_at", "fanotify_init", "lookup_dcookie", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "iopl", "ioperm", "vhangup", "nfsservctl", "uselib",
)  # fmt: skip
CLONE_NAMESPACE_FLAGS = (
    0x00000080,  # CLONE_NEWTIME
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)


class _ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


def _act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


def _libseccomp() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_release.argtypes = (ctypes.c_void_p,)
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_rule_add_array.argtypes = (
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    )
    lib.seccomp_export_bpf.argtypes = (ctypes.c_void_p, ctypes.c_int)
    return lib


def compile_filter() -> bytes:
    """The deny-list as a classic BPF program (what `bwrap --seccomp` reads)."""
    lib = _libseccomp()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:

        def add(name: str, action: int, *conditions: _ArgCmp) -> None:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                return  # not a system call on this architecture
            array = (_ArgCmp * len(conditions))(*conditions) if conditions else None
            rc = lib.seccomp_rule_add_array(ctx, action, number, len(conditions), array)
            if rc < 0:
                raise OSError(-rc, f"seccomp rule for {name}: {os.strerror(-rc)}")

        for name in DENIED_SYSCALLS:
            add(name, _act_errno(errno.EPERM))
        add("clone3", _act_errno(errno.ENOSYS))
        for flag in CLONE_NAMESPACE_FLAGS:
            add("clone", _act_errno(errno.EPERM), _ArgCmp(0, SCMP_CMP_MASKED_EQ, flag, flag))

        fd = os.memfd_create("cube-uml-seccomp-export", 0)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise OSError(-rc, f"seccomp_export_bpf: {os.strerror(-rc)}")
            return os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def filter_fd(program: bytes) -> int:
    """A fresh readable fd holding `program` (bwrap consumes one per sandbox); close-on-exec."""
    fd = os.memfd_create("cube-uml-seccomp")
    os.write(fd, program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
