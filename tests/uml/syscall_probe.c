/* A process under the UML seccomp filter that makes one system call and says what it got.
 *
 *   syscall_probe NAME    e.g. "getpid", "socket-inet", "unshare-user"
 *
 * Freestanding (-nostdlib -static): no libc start-up, so the only system calls
 * it makes are the one probed, write(2) to report and exit_group(2). Prints
 * "NAME returned N" (N < 0: -errno) and exits 0; a filter that kills the
 * process prints nothing and the caller sees SIGSYS.
 */
#include <asm/unistd.h>

#define AF_INET 2
#define AF_UNIX 1
#define SOCK_STREAM 1
#define CLONE_NEWUSER 0x10000000
#define PTRACE_ATTACH 16
#define KEYCTL_GET_KEYRING_ID 0
#define KEY_SPEC_SESSION_KEYRING -3

static long sys6(long n, long a, long b, long c, long d, long e, long f) {
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

static int same(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return *a == *b;
}

static void say(const char *name, long value) {
    char buf[128], digits[24];
    int n = 0, d = 0;
    unsigned long v = value < 0 ? -value : value;
    while (*name && n < 64) buf[n++] = *name++;
    for (const char *s = " returned "; *s; s++) buf[n++] = *s;
    if (value < 0) buf[n++] = '-';
    do digits[d++] = '0' + v % 10; while ((v /= 10) && d < 20);
    while (d) buf[n++] = digits[--d];
    buf[n++] = '\n';
    sys6(__NR_write, 1, (long)buf, n, 0, 0, 0);
}

static long probe(const char *name) {
    if (same(name, "getpid")) return sys6(__NR_getpid, 0, 0, 0, 0, 0, 0);
    if (same(name, "socket-unix")) return sys6(__NR_socket, AF_UNIX, SOCK_STREAM, 0, 0, 0, 0);
    if (same(name, "socket-inet")) return sys6(__NR_socket, AF_INET, SOCK_STREAM, 0, 0, 0, 0);
    if (same(name, "unshare-user")) return sys6(__NR_unshare, CLONE_NEWUSER, 0, 0, 0, 0, 0);
    if (same(name, "clone-newuser")) return sys6(__NR_clone, CLONE_NEWUSER | 17 /* SIGCHLD */, 0, 0, 0, 0, 0);
    if (same(name, "ptrace-attach")) return sys6(__NR_ptrace, PTRACE_ATTACH, 1, 0, 0, 0, 0);
    if (same(name, "keyctl"))
        return sys6(__NR_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0, 0, 0, 0);
    if (same(name, "personality")) return sys6(__NR_personality, 0x0040000 /* ADDR_NO_RANDOMIZE */, 0, 0, 0, 0, 0);
    if (same(name, "uname")) {
        static char utsname[6 * 65];
        return sys6(__NR_uname, (long)utsname, 0, 0, 0, 0, 0);
    }
    return -22; /* -EINVAL: not a probe this program knows */
}

void __attribute__((noreturn)) start(long *stack) {
    const char *name = (const char *)stack[2]; /* argc, argv[0], argv[1] */
    long value = name ? probe(name) : -22;
    if (value == 0 && name && same(name, "clone-newuser")) sys6(__NR_exit, 0, 0, 0, 0, 0, 0); /* the child */
    say(name ? name : "(none)", value);
    sys6(__NR_exit_group, 0, 0, 0, 0, 0, 0);
    __builtin_unreachable();
}

__asm__(".global _start\n_start:\n mov %rsp, %rdi\n and $-16, %rsp\n call start\n");
