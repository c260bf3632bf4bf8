"""The command line that starts one confined UML guest, and the guest kernel's own command line.

Confinement, outermost first (every step `exec`s the next, so the whole chain
is one host pid until bwrap forks, and it is the child of the sandbox's supervisor,
runtime/supervisor, not of the service):

1. `nsenter --net=<sandbox netns>`: the guest's tap lives there, nothing else.
2. `unshare --mount --propagation private` + a root shell that joins the
   sandbox's cgroup leaves first, then stages what the guest may see on a
   private tmpfs (moved over /tmp): the vm directory, the base image and the kernel
   (bind mounts, so the unprivileged uid needs no access to their real
   parents, e.g. the 0700 state dir) and a /dev/net/tun node owned by the
   sandbox uid (/dev/net/tun itself is root-only), and the root-owned
   directory the mconsole client's sockets live in (mconsole.py).
3. `setpriv`: the sandbox uid, no groups, every capability dropped (bounding
   and inheritable sets too), no_new_privs, SIGKILL when the service dies.
   Address space layout randomization stays on (see launcher_argv).
4. `bwrap`: user/pid/ipc/uts/cgroup namespaces and a root that holds only the
   kernel, its libraries, the read-only base image, the vm directory, a fresh
   /dev and /proc, and a tmpfs for the guest's memory file; then the seccomp
   allow-list (see seccomp.py). The kernel is the namespace's pid 1
   (`--as-pid-1`): no process of bwrap's stays in there without the filter,
   for a kernel that was taken over to attach to. Kernels with hostfs are
   refused (kernel.py: refuse_unsafe_kernel).
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from appliance.guest.options import BOOT_TOKEN_PARAMETER

# Paths inside the confined root.
KERNEL_INSIDE = "/cube/linux"
MEMORY_DIR_INSIDE = "/cube/mem"
# The staging tmpfs the launcher mounts over /tmp in its private mount namespace.
STAGE = "/tmp"
# The memory file is `mem=` plus UML's own small mappings; the rest is headroom.
MEMORY_TMPFS_SLACK_MB = 64
GUEST_INIT = "/sbin/cube-init"
GUEST_NETDEV = "vec0"  # the vector device's name in the guest
PRESET_LOOPS_PER_JIFFY = 7479296  # `lpj=`: see kernel_command_line
LAUNCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
UML_DIR = "uml"  # in the vm directory: UML's uml_dir
UMID = "guest"


def mconsole_socket(vm_dir: Path) -> Path:
    """Where the guest kernel's mconsole listens (`<uml_dir>/<umid>/mconsole`)."""
    return vm_dir / UML_DIR / UMID / "mconsole"


@dataclass(frozen=True)
class LaunchPlan:
    kernel: Path
    base_image: Path
    vm_dir: Path  # owned by the sandbox uid: COW file, uml_dir (the mconsole socket)
    stage_dir: Path  # an empty root-only directory: the launcher's staging mount point
    reply_dir: Path  # root's, 0711: the mconsole client's sockets, which the guest answers
    memory_mb: int
    uid: int
    netns_path: str
    tap: str
    cgroup_procs: tuple[Path, ...]
    seccomp_fd: int
    resolver_ip: str
    hostname: str = "sandbox"
    # `virtio_uml.device=<socket>:5` of the sandbox's balloon (uml/balloon.py), if it has one.
    balloon_argument: str | None = None
    agent_token: str = field(default="", repr=False)  # BootSpec.agent_token
    # `cube.egress_ca=<base64 DER>`: the egress CA's certificate the guest agent installs into the
    # guest's trust stores at its start (net/egress_tls.py); "" for none.
    egress_ca_argument: str = ""

    @property
    def cow_file(self) -> Path:
        return self.vm_dir / "disk.cow"

    @property
    def uml_dir(self) -> Path:
        return self.vm_dir / UML_DIR

    @property
    def umid(self) -> str:
        return UMID

    @property
    def mconsole_socket(self) -> Path:
        return mconsole_socket(self.vm_dir)


# sun_path holds 107 bytes; the mconsole client binds `<reply_dir>/mc-XXXXXXXX`.
MAX_SOCKET_PATH = 107


def check_paths(plan: LaunchPlan) -> None:
    """UML silently runs without mconsole when its socket path is too long: refuse instead."""
    longest = max(len(str(plan.mconsole_socket)), len(str(plan.reply_dir / "mc-00000000")))
    if longest > MAX_SOCKET_PATH:
        raise ValueError(
            f"sandbox directory {plan.vm_dir.parent} is too deep for unix sockets "
            f"({longest} > {MAX_SOCKET_PATH} bytes): use a shorter state_dir"
        )


def kernel_command_line(plan: LaunchPlan) -> list[str]:
    return [
        f"mem={plan.memory_mb}M",
        # Copy-on-write over the shared read-only image; UML creates the sparse COW file.
        f"ubd0={plan.cow_file},{plan.base_image}",
        "root=/dev/ubda",
        "rw",
        f"init={GUEST_INIT}",
        f"uml_dir={plan.uml_dir}",
        f"umid={plan.umid}",
        # Console output to fd 1 (the service's pipe into the console log), no input.
        "con=null",
        "con0=null,fd:1",
        "ssl=null",
        # The vector driver turns TSO on for the tap (TUNSETOFFLOAD), so the host
        # hands it GSO frames of up to 64 KiB; gro=1 sizes its receive buffers for
        # them. Without it those frames are truncated and dropped, and host→guest
        # TCP crawls at ~35 KiB/s on retransmissions.
        f"{GUEST_NETDEV}:transport=tap,ifname={plan.tap},gro=1",
        "quiet",
        # Templates' root filesystems are ext4 (templates/ext4.py): no probing of other types.
        "rootfstype=ext4",
        # A preset delay-loop rate skips its calibration (~80 ms of every boot). UML's loop only
        # times udelay(), which the sandbox's drivers barely use; the value is this host's measure.
        f"lpj={PRESET_LOOPS_PER_JIFFY}",
        # Unknown key=value words become the init's environment.
        f"cube_hostname={plan.hostname}",
        f"cube_resolver={plan.resolver_ip}",
        f"cube_netdev={GUEST_NETDEV}",
        *([plan.balloon_argument] if plan.balloon_argument else []),
        *([plan.egress_ca_argument] if plan.egress_ca_argument else []),
        # The agent's boot token: a dotted word never reaches init's environment; with `quiet`
        # the kernel does not print its command line to the console log (which users read).
        # The UML process's argv is readable by the host's local users (docs/SECURITY.md).
        f"{BOOT_TOKEN_PARAMETER}={plan.agent_token}",
    ]


@functools.cache
def kernel_libraries(kernel: Path) -> tuple[str, ...]:
    """The shared objects (and loader) the kernel binary needs, as `ldd` names them."""
    out = subprocess.run(["ldd", str(kernel)], capture_output=True, text=True, check=False).stdout
    if "not a dynamic executable" in out or not out:
        return ()
    return tuple(sorted(set(re.findall(r"(/\S+) \(0x", out))))


def _stage_script(plan: LaunchPlan) -> str:
    q = shlex.quote
    stage = q(str(plan.stage_dir))
    join_cgroups = "".join(f"echo $$ > {q(str(p))}\n" for p in plan.cgroup_procs)
    # Built at stage_dir, where no source can be hidden under it, then moved over
    # /tmp, where the sandbox uid can reach it (sources may live under /tmp too).
    return (
        "set -e\n" + join_cgroups + f"mount -t tmpfs -o mode=0711,size=64k cube-uml-stage {stage}\n"
        f"mkdir {stage}/vm {stage}/reply\n"
        f"touch {stage}/base {stage}/linux\n"
        f"mount --bind {q(str(plan.vm_dir))} {stage}/vm\n"
        f"mount --bind {q(str(plan.reply_dir))} {stage}/reply\n"
        f"mount --bind {q(str(plan.base_image))} {stage}/base\n"
        f"mount --bind {q(str(plan.kernel))} {stage}/linux\n"
        f"mknod -m 600 {stage}/tun c 10 200\n"
        f"chown {plan.uid}:{plan.uid} {stage}/tun\n"
        f"mount --move {stage} {STAGE}\n"
        'exec "$@"\n'
    )


def launcher_argv(plan: LaunchPlan) -> list[str]:
    setpriv = [
        "setpriv",
        f"--reuid={plan.uid}",
        f"--regid={plan.uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--pdeathsig=KILL",
        "--",
    ]
    # Address space layout randomization stays on: libraries, stack, vDSO and heap of the kernel
    # process land at random places (its own code and guest memory are fixed: UML is not
    # position-independent). The price: UML counts the gap between its binary and the
    # randomized heap start as physical memory and initializes page structs for it, 64 bytes
    # per 4 KiB of gap. The gap is up to 32 MiB on host kernels before 6.9 (< 0.5 MiB of page
    # structs) and up to 1 GiB since (< 16 MiB, inside HOST_OVERHEAD_MB); MemTotal in the
    # guest varies by as much.
    bwrap = [
        "bwrap",
        "--die-with-parent",
        "--new-session",
        "--as-pid-1",
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup",
        "--hostname",
        "cube-uml",
        "--ro-bind",
        f"{STAGE}/linux",
        KERNEL_INSIDE,
    ]
    for library in kernel_libraries(plan.kernel):
        bwrap += ["--ro-bind", library, library]
    memory_bytes = (plan.memory_mb + MEMORY_TMPFS_SLACK_MB) << 20
    bwrap += [
        "--ro-bind", f"{STAGE}/base", str(plan.base_image),
        "--bind", f"{STAGE}/vm", str(plan.vm_dir),
        "--ro-bind", f"{STAGE}/reply", str(plan.reply_dir),
        "--dev", "/dev",
        "--dev-bind", f"{STAGE}/tun", "/dev/net/tun",
        "--proc", "/proc",
        "--size", str(memory_bytes), "--tmpfs", MEMORY_DIR_INSIDE,
        "--chdir", MEMORY_DIR_INSIDE,
        "--seccomp", str(plan.seccomp_fd),
        KERNEL_INSIDE,
        *kernel_command_line(plan),
    ]  # fmt: skip
    return [
        "nsenter",
        f"--net={plan.netns_path}",
        "--",
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        _stage_script(plan),
        "cube-uml-launch",
        *setpriv,
        *bwrap,
    ]


def launcher_environment() -> dict[str, str]:
    """The whole environment of the chain: UML puts its memory file in $TMPDIR."""
    return {"PATH": LAUNCH_PATH, "TMPDIR": MEMORY_DIR_INSIDE}
