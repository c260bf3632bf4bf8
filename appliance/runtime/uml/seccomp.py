"""The seccomp allow-list every UML process runs under, compiled with libseccomp (ctypes).

bwrap installs it (`--seccomp FD`) after building the sandbox's namespaces and
right before exec'ing the kernel, so it covers the UML kernel and every host
process it forks for guest address spaces. Guest system calls never reach it
(UML intercepts them with PTRACE_SYSEMU, which skips the host's seccomp check);
it bounds what a guest that took over the UML process itself could ask the
host, the way Firecracker's jailer bounds its VMM: anything not listed kills
the process (SIGSYS), and the sandbox ends as a crashed guest.

The list is what Debian's 6.1 UML, as the runtime runs it (vector network on a
tap, ubd disk, mconsole, virtio over vhost-user), was seen to call during boot,
commands, Python, network traffic, pause/resume, balloon reports and shutdown
(counted per system call on the host with a raw_syscalls tracepoint), plus the
libc variants and error paths of the same calls (exit of a thread, abort's
tgkill, restarted sleeps). Some calls are allowed only with arguments UML uses:
sockets of AF_UNIX only, clone without namespace flags (clone3, whose flags a
filter cannot read, gets ENOSYS so libc falls back to clone), and ptrace only
for the requests UML makes of its own children (PTRACE_TRACEME, never ATTACH or
SEIZE). Other architectures' system calls kill too (libseccomp's default for them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
AF_UNIX = 1

ALLOWED_SYSCALLS = (
    # memory
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "modify_ldt", "arch_prctl",
    # files: the memory file, COW disk, uml_dir, /dev/net/tun, consoles
    "read", "write", "readv", "writev", "pread64", "pwrite64", "lseek", "openat", "close",
    "fcntl", "ioctl", "newfstatat", "fstat", "statfs", "access", "faccessat2", "getdents64",
    "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "readlink", "readlinkat", "chdir", "getcwd",
    "fsync", "fdatasync", "fallocate", "ftruncate", "dup", "dup2", "dup3", "pipe2",
    # sockets (socket and socketpair: AF_UNIX only, below): mconsole, virtio over vhost-user
    "bind", "connect", "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg",
    "getsockopt", "setsockopt",
    # waiting, timers, signals
    "poll", "ppoll", "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
    "eventfd2", "timer_create", "timer_settime", "timer_gettime", "timer_delete",
    "clock_gettime", "clock_nanosleep", "nanosleep", "gettimeofday", "restart_syscall",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigsuspend", "sigaltstack",
    "kill", "tgkill", "tkill", "futex", "sched_yield", "sched_getaffinity",
    # processes: one host process per guest address space, traced by the kernel process
    "wait4", "waitid", "exit", "exit_group", "execve", "setsid",
    "getpid", "getppid", "gettid", "getuid", "geteuid", "getgid", "getegid",
    # libc start-up
    "set_tid_address", "set_robust_list", "rseq", "prlimit64", "getrandom", "uname",
)  # fmt: skip
CLONE_NAMESPACE_FLAGS = (
    0x00000080  # CLONE_NEWTIME
    | 0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)
# What the kernel process asks of the children it traces (arch/um/os-Linux, arch/x86/um).
PTRACE_REQUESTS = {
    "PTRACE_TRACEME": 0,
    "PTRACE_PEEKUSER": 3,
    "PTRACE_POKEUSER": 6,
    "PTRACE_CONT": 7,
    "PTRACE_KILL": 8,
    "PTRACE_SINGLESTEP": 9,
    "PTRACE_GETREGS": 12,
    "PTRACE_SETREGS": 13,
    "PTRACE_GETFPREGS": 14,
    "PTRACE_SETFPREGS": 15,
    "PTRACE_OLDSETOPTIONS": 21,
    "PTRACE_SYSCALL": 24,
    "PTRACE_GET_THREAD_AREA": 25,
    "PTRACE_SET_THREAD_AREA": 26,
    "PTRACE_ARCH_PRCTL": 30,
    "PTRACE_SYSEMU": 31,
    "PTRACE_SYSEMU_SINGLESTEP": 32,
    "PTRACE_SETOPTIONS": 0x4200,
    "PTRACE_GETSIGINFO": 0x4202,
    "PTRACE_GETREGSET": 0x4204,
    "PTRACE_SETREGSET": 0x4205,
}


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
    """The allow-list as a classic BPF program (what `bwrap --seccomp` reads)."""
    lib = _libseccomp()
    ctx = lib.seccomp_init(SCMP_ACT_KILL_PROCESS)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:

        def add(name: str, action: int, *conditions: _ArgCmp) -> None:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                raise OSError(errno.ENOSYS, f"seccomp: no system call {name} on this architecture")
            array = (_ArgCmp * len(conditions))(*conditions) if conditions else None
            rc = lib.seccomp_rule_add_array(ctx, action, number, len(conditions), array)
            if rc < 0:
                raise OSError(-rc, f"seccomp rule for {name}: {os.strerror(-rc)}")

        for name in ALLOWED_SYSCALLS:
            add(name, SCMP_ACT_ALLOW)
        for name in ("socket", "socketpair"):
            add(name, SCMP_ACT_ALLOW, _ArgCmp(0, SCMP_CMP_EQ, AF_UNIX, 0))
        add("clone", SCMP_ACT_ALLOW, _ArgCmp(0, SCMP_CMP_MASKED_EQ, CLONE_NAMESPACE_FLAGS, 0))
        add("clone3", _act_errno(errno.ENOSYS))
        for request in PTRACE_REQUESTS.values():
            add("ptrace", SCMP_ACT_ALLOW, _ArgCmp(0, SCMP_CMP_EQ, request, 0))

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
