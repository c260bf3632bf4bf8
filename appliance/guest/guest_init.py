"""Cube guest init (PID 1) of the default template: /sbin/cube-init (image/rootfs/cube-init) runs `main()`.

Mounts the kernel filesystems, configures lo and the guest's network device
(UML's vector device, vec0: every guest is 169.254.0.2/30 behind gateway 169.254.0.1), starts the guest
agent as root (forked: it runs in this very interpreter) with its output on the
console (the host watches the console log for the agent's ready lines), reaps
orphans, and powers the machine off when the agent dies: a sandbox without its
agent is useless, and a UML `reboot` loops.

Settings come from the kernel command line, which hands unknown `key=value`
words to init as environment variables: cube_hostname, cube_resolver, cube_netdev.
The agent's boot token is a dotted word (`cube.agent_token=`), which the kernel keeps
out of that environment: the agent reads it from /proc/cmdline (options.py).
Written against the standard library only, and without `site` (-S): every
exec and import costs more under UML than on a host. A module, not the init script
itself: the template holds its bytecode, while a script is compiled on every run.
"""

import ctypes
import errno
import fcntl
import gc
import os
import socket
import struct
import sys

GUEST_IP = "169.254.0.2"
NETMASK = "255.255.255.252"
GATEWAY_IP = "169.254.0.1"
AGENT_DIR = "/opt/cube/agent"  # on sys.path already: /sbin/cube-init put it there to import this
AGENT_USER = "user"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
RB_POWER_OFF = 0x4321FEDC
PR_SET_NAME = 15
SIOCSIFADDR, SIOCSIFNETMASK, SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCADDRT = 0x8916, 0x891C, 0x8913, 0x8914, 0x890B
IFF_UP = 1
RTF_UP, RTF_GATEWAY = 0x1, 0x2

libc = ctypes.CDLL(None, use_errno=True)


def log(message: str) -> None:
    print(f"cube-init: {message}", file=sys.stderr, flush=True)


def mount(fstype: str, target: str, flags: int, data: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    if libc.mount(fstype.encode(), target.encode(), fstype.encode(), flags, data.encode() or None) != 0:
        code = ctypes.get_errno()
        if code != errno.EBUSY:  # already there: the kernel mounts devtmpfs itself (DEVTMPFS_MOUNT)
            log(f"mount {fstype} on {target}: {os.strerror(code)}")


def mount_kernel_filesystems() -> None:
    mount("proc", "/proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", "/sys", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("devtmpfs", "/dev", MS_NOSUID, "mode=0755")
    mount("devpts", "/dev/pts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666")
    mount("tmpfs", "/dev/shm", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("tmpfs", "/run", MS_NOSUID | MS_NODEV, "mode=0755")
    mount("tmpfs", "/tmp", MS_NOSUID | MS_NODEV, "mode=1777")
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        if not os.path.lexists(f"/dev/{name}"):
            os.symlink(target, f"/dev/{name}")


def _ifreq_addr(name: bytes, ip: str) -> bytes:
    return struct.pack("16sH2s4s8s", name, socket.AF_INET, b"", socket.inet_aton(ip), b"")


def _sockaddr(ip: str) -> bytes:
    return struct.pack("HH4s8s", socket.AF_INET, 0, socket.inet_aton(ip), b"")


def guest_interface() -> bytes:
    """The device the host named (cube_netdev), else the first one backed by a real device.

    Built-in tunnel drivers add fallback devices (sit0, gretap0, erspan0...) that
    have no `device` link in sysfs; UML's vector device (vec0) has one.
    """
    named = os.environ.get("cube_netdev")
    if named:
        return named.encode()
    for name in sorted(os.listdir("/sys/class/net")):
        if os.path.exists(f"/sys/class/net/{name}/device"):
            return name.encode()
    raise OSError("no network device")


def configure_network() -> None:
    """Addresses and the default route by ioctl: no `ip` exec on the boot path."""
    device = guest_interface()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in (b"lo", device):
            request = struct.pack("16sH22x", name, 0)
            flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, request)[:18])[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", name, flags | IFF_UP))
        fcntl.ioctl(s, SIOCSIFADDR, _ifreq_addr(device, GUEST_IP))
        fcntl.ioctl(s, SIOCSIFNETMASK, _ifreq_addr(device, NETMASK))
        # struct rtentry: pad, dst, gateway, genmask, flags, then fields left zero.
        route = struct.pack(
            "L16s16s16sH",
            0,
            _sockaddr("0.0.0.0"),
            _sockaddr(GATEWAY_IP),
            _sockaddr("0.0.0.0"),
            RTF_UP | RTF_GATEWAY,
        )
        fcntl.ioctl(s, SIOCADDRT, route + bytes(120 - len(route)))


def set_identity() -> None:
    hostname = os.environ.get("cube_hostname", "sandbox")
    socket.sethostname(hostname)
    resolver = os.environ.get("cube_resolver")
    if resolver:
        with open("/etc/resolv.conf", "w") as f:
            f.write(f"nameserver {resolver}\n")


def start_agent() -> int:
    """Fork the agent: the child runs it in this interpreter, already started and importing.

    No `python3` exec: a fresh interpreter (with `site`) costs ~0.4 s under UML. The
    child gets the environment an exec'd agent would have had (sys.path has the agent
    and Debian's packages: see /sbin/cube-init). Its own children (commands, kernels)
    start fresh interpreters from /usr/bin/python3. What this interpreter allocated so far
    is frozen out of the cyclic GC: a collection in the child would otherwise write to
    every object of it, and under UML each page so copied costs a page fault.
    """
    gc.freeze()
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        # Its name in ps/pgrep (the command line stays init's): `pgrep -x cube-agent`.
        libc.prctl(PR_SET_NAME, b"cube-agent", 0, 0, 0)
        os.environ.clear()
        os.environ.update(PATH=PATH, HOME="/root", LANG="C.UTF-8", PYTHONPATH=AGENT_DIR)
        os.chdir("/")
        sys.argv = ["/usr/bin/python3 -m appliance.guest", "--default-user", AGENT_USER]
        sys.executable = "/usr/bin/python3"
        from appliance.guest.__main__ import start
        from appliance.guest.options import AgentOptions, host_boot_token, lazy_default_kernel_wanted

        lazy = lazy_default_kernel_wanted()
        start(AgentOptions(default_user=AGENT_USER, boot_token=host_boot_token(), lazy_default_kernel=lazy))
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # the child must never return into init's code
        log(f"guest agent failed: {exc!r}")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return -1  # unreachable


def reap_until(agent_pid: int) -> int:
    """Reap every child (orphans are reparented to PID 1) until the agent exits; its status."""
    while True:
        pid, status = os.wait()
        if pid == agent_pid:
            return status


def main() -> None:
    gc.disable()  # init keeps what it allocates; the agent turns the GC on once it is ready
    mount_kernel_filesystems()
    try:
        configure_network()
    except OSError as exc:
        log(f"network configuration failed: {exc}")
    set_identity()
    agent_pid = start_agent()
    status = reap_until(agent_pid)
    log(f"guest agent exited (status {status:#x}); powering off")
    os.sync()
    libc.reboot(RB_POWER_OFF)
