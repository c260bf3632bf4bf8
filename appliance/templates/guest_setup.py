"""What every image rootfs gets before it becomes a template: the guest agent, an init, DNS.

The kernel starts /sbin/cube-init as PID 1. It mounts the kernel filesystems,
configures the network interface (eth0 under kvm, vec0 with UML's vector
transport; every guest has the same address, see net/addressing.py), starts
the guest agent if the image has python3, then the image's own entrypoint+cmd
(/opt/cube/start, generated here from the image config) with its env, workdir
and user, and reaps orphans for as long as the machine runs.
"""

from __future__ import annotations

import compileall
import importlib
import os
import posixpath
import py_compile
import shlex
import shutil
import stat
import tempfile
from pathlib import Path

import appliance
from appliance.net.addressing import GATEWAY_IP, GUEST_IP, GUEST_PREFIX
from appliance.templates.untrusted_tree import Tree

AGENT_DIR = "/opt/cube/agent"
# The agent's pure-Python dependencies, copied from the host beside it: an image
# with python3 rarely has trio or h11, and PYTHONPATH puts these first only for
# the agent (h2 and its hpack/hyperframe: envd speaks h2c too). (The code
# interpreter's pyzmq/ipykernel are compiled; images that want it bring them, as
# the default template does.)
AGENT_DEPENDENCIES = (
    "trio", "outcome", "sniffio", "sortedcontainers", "attr", "attrs", "idna",
    "h11", "h2", "hpack", "hyperframe",
)  # fmt: skip
INIT_PATH = "/sbin/cube-init"
START_PATH = "/opt/cube/start"
DEFAULT_DNS = ("1.1.1.1", "8.8.8.8")
SANDBOX_USER = "user"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_NETMASK = ".".join(str((0xFFFFFFFF << (32 - GUEST_PREFIX) >> (24 - 8 * i)) & 0xFF) for i in range(4))

# Images differ in what they carry: iproute2, busybox ifconfig/route, or only
# python3 (slim images). The last resort sets the address with ioctls.
PYTHON_NET_SETUP = f"""
import fcntl, socket, struct, sys
iface = sys.argv[1].encode()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
def addr(ip): return struct.pack("16sH2s4s8s", iface, socket.AF_INET, b"", socket.inet_aton(ip), b"")
fcntl.ioctl(s, 0x8916, addr("{GUEST_IP}"))
fcntl.ioctl(s, 0x891C, addr("{_NETMASK}"))
for name in (b"lo", iface):
    flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", name, 0))[:18])[1]
    fcntl.ioctl(s, 0x8914, struct.pack("16sH", name, flags | 1))
route = struct.pack("L16s16s16sH", 0, struct.pack("HH4s8s", socket.AF_INET, 0, bytes(4), b""),
    struct.pack("HH4s8s", socket.AF_INET, 0, socket.inet_aton("{GATEWAY_IP}"), b""),
    struct.pack("HH4s8s", socket.AF_INET, 0, bytes(4), b""), 0x3)
fcntl.ioctl(s, 0x890B, route + bytes(80))
""".strip()

INIT_SCRIPT_TEMPLATE = f"""#!/bin/sh
# Cube guest init for templates built from OCI images (PID 1).
export PATH={DEFAULT_PATH}
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /dev/shm 2>/dev/null
mount -t tmpfs tmpfs /run 2>/dev/null
# The runtime passes these on the kernel command line (as the default template's init reads them).
hostname "${{cube_hostname:-sandbox}}" 2>/dev/null
[ -n "$cube_resolver" ] && echo "nameserver $cube_resolver" > /etc/resolv.conf
# The device the runtime names (UML: vec0), else the first backed by a real device: built-in
# tunnel drivers add fallback devices (erspan0, gre0, sit0...) that have no `device` link.
iface="${{cube_netdev:-}}"
if [ -z "$iface" ]; then
  iface=eth0
  for dev in /sys/class/net/*; do
    if [ -e "$dev/device" ]; then iface="${{dev##*/}}"; break; fi
  done
fi
if command -v ip >/dev/null 2>&1; then
  ip link set lo up
  ip addr add {GUEST_IP}/{GUEST_PREFIX} dev "$iface"
  ip link set "$iface" up
  ip route add default via {GATEWAY_IP}
elif command -v ifconfig >/dev/null 2>&1 && command -v route >/dev/null 2>&1; then
  ifconfig lo up
  ifconfig "$iface" {GUEST_IP} netmask {_NETMASK} up
  route add default gw {GATEWAY_IP}
elif command -v python3 >/dev/null 2>&1; then
  python3 -c '{PYTHON_NET_SETUP}' "$iface"
else
  echo "cube-init: no ip, ifconfig or python3 in the image: $iface left unconfigured" >&2
fi
if command -v python3 >/dev/null 2>&1; then
  # The code interpreter (port 49999) only where the image has ipykernel: elsewhere the port is the image's.
  interpreter=--no-interpreter
  python3 -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("ipykernel") is None)' \\
    2>/dev/null && interpreter=
  HOME=/root LANG=C.UTF-8 PYTHONPATH={AGENT_DIR} python3 -m appliance.guest --default-user @DEFAULT_USER@ \\
    $interpreter &
else
  echo "cube-init: no python3 in the image: the guest agent does not run" >&2
fi
[ -x {START_PATH} ] && {START_PATH} &
# PID 1 must keep running and reap the orphans reparented to it.
while :; do wait; sleep 1; done
"""


def init_script(default_user: str) -> str:
    return INIT_SCRIPT_TEMPLATE.replace("@DEFAULT_USER@", shlex.quote(default_user))


def _records(tree: Tree, path: str) -> list[list[str]]:
    """The colon-separated lines of /etc/passwd or /etc/group (a regular file inside the tree)."""
    text = tree.read_text(path)
    return [line.split(":") for line in text.splitlines()] if text else []


def account_name(rootfs: Path, user_spec: str) -> str:
    """The passwd name for an image USER (`1000:1000` -> `app`): the guest agent looks users up by name."""
    with Tree.open(rootfs) as tree:
        return _account_name(tree, user_spec)


def _account_name(tree: Tree, user_spec: str) -> str:
    uid, _, _ = lookup_ids(tree, user_spec or "root")
    for fields in _records(tree, "/etc/passwd"):
        if len(fields) >= 3 and fields[2] == str(uid):
            return fields[0]
    return "root" if uid == 0 else str(uid)


def _with_line(text: str | None, line: str) -> bytes:
    body = text or ""
    if body and not body.endswith("\n"):
        body += "\n"
    return (body + line + "\n").encode()


def ensure_sandbox_user(tree: Tree) -> None:
    """E2B clients run commands as `user` by default: give images without one such an account.

    The account files get new inodes (renamed over the old ones), never written in place: they may
    be hardlinks into a tree shared with a cached build step."""
    users = _records(tree, "/etc/passwd")
    if any(fields[0] == SANDBOX_USER for fields in users):
        return
    groups = _records(tree, "/etc/group")
    taken = {f[2] for f in users if len(f) > 2} | {f[2] for f in groups if len(f) > 2}
    number = next(n for n in range(1000, 65534) if str(n) not in taken)
    passwd_text = tree.read_text("/etc/passwd") if users else "root:x:0:0:root:/root:/bin/sh\n"
    group_text = tree.read_text("/etc/group") if users else "root:x:0:\n"
    tree.makedirs("/etc")
    tree.replace_file(
        "/etc/passwd",
        _with_line(passwd_text, f"{SANDBOX_USER}:x:{number}:{number}::/home/{SANDBOX_USER}:/bin/sh"),
    )
    tree.replace_file("/etc/group", _with_line(group_text, f"{SANDBOX_USER}:x:{number}:"))
    home = f"/home/{SANDBOX_USER}"
    tree.makedirs("/home")
    tree.mkdir(home)
    tree.chown(home, number, number, follow=True)
    tree.chmod(home, 0o755, follow=True)


def lookup_ids(tree: Tree, user_spec: str) -> tuple[int, int, str]:
    """(uid, gid, home) for an image's USER (`name`, `uid`, `name:group`, `uid:gid`)."""
    user, _, group = user_spec.partition(":")
    uid, gid, home = None, None, "/"
    for fields in _records(tree, "/etc/passwd"):
        if len(fields) >= 6 and (fields[0] == user or fields[2] == user):
            uid, gid, home = int(fields[2]), int(fields[3]), fields[5] or "/"
            break
    if uid is None and user == "root":  # images without /etc/passwd (scratch, distroless)
        uid, gid, home = 0, 0, "/root"
    if uid is None:
        if not user.isdigit():
            raise ValueError(f"user {user!r} does not exist in the image's /etc/passwd")
        uid = int(user)
    if group:
        gid = None
        for fields in _records(tree, "/etc/group"):
            if len(fields) >= 3 and (fields[0] == group or fields[2] == group):
                gid = int(fields[2])
                break
        if gid is None:
            if not group.isdigit():
                raise ValueError(f"group {group!r} does not exist in the image's /etc/group")
            gid = int(group)
    return uid, gid if gid is not None else uid, home


def start_script(
    tree: Tree, start_cmd: tuple[str, ...], envs: dict[str, str], workdir: str, user: str
) -> str:
    uid, gid, home = lookup_ids(tree, user or "root")
    exports = {"PATH": DEFAULT_PATH, "HOME": home, **envs}
    lines = ["#!/bin/sh", "# The image's entrypoint + cmd, as its config says to run it."]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in exports.items()]
    lines.append(f"cd {shlex.quote(workdir or '/')} || exit 1")
    argv = " ".join(shlex.quote(arg) for arg in start_cmd)
    if uid == 0:
        lines.append(f"exec {argv}")
    else:
        # Whichever way to drop privileges the image offers.
        lines += [
            "if command -v setpriv >/dev/null 2>&1; then",
            f"  exec setpriv --reuid={uid} --regid={gid} --clear-groups -- {argv}",
            "elif command -v python3 >/dev/null 2>&1; then",
            "  exec python3 -c 'import os, sys; os.setgroups([]); os.setgid(int(sys.argv[1])); "
            "os.setuid(int(sys.argv[2])); os.execvp(sys.argv[3], sys.argv[3:])' "
            f"{gid} {uid} {argv}",
            "else",
            f"  exec chroot --userspec={uid}:{gid} / {argv}",
            "fi",
        ]
    return "\n".join(lines) + "\n"


def _write(tree: Tree, guest_path: str, text: str, mode: int) -> None:
    tree.makedirs(posixpath.dirname(guest_path))
    tree.write_bytes(guest_path, text.encode(), mode)


def _agent_bundle(directory: Path, dependencies: tuple[str, ...]) -> None:
    """The agent (appliance/__init__.py and appliance/guest) and the host's copies of the pure-Python
    `dependencies` in the (host) directory `directory`, compiled."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    package = Path(appliance.__file__).parent
    shutil.copytree(package / "guest", directory / "appliance" / "guest", ignore=skip)
    shutil.copy2(package / "__init__.py", directory / "appliance" / "__init__.py")
    for name in dependencies:
        module = importlib.import_module(name)
        shutil.copytree(Path(str(module.__file__)).parent, directory / name, ignore=skip)
    compileall.compile_dir(
        directory,
        ddir=AGENT_DIR,  # the paths tracebacks show: the guest's
        quiet=2,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )


def copy_host_tree(source: Path, tree: Tree, dest: str) -> None:
    """The host directory `source` (trusted: ours) into the directory `dest` of the tree."""
    for directory, dirnames, filenames in os.walk(source):
        relative = os.path.relpath(directory, source)
        base = posixpath.normpath(posixpath.join(dest, relative))
        tree.makedirs(base)
        for name in filenames:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                tree.write_from(posixpath.join(base, name), f, os.fstat(f.fileno()).st_mode & 0o777)
        dirnames.sort()


def copy_agent(rootfs: Path, dependencies: tuple[str, ...]) -> None:
    """The guest agent (appliance/__init__.py and appliance/guest) into AGENT_DIR of the tree, with
    the host's copies of the pure-Python `dependencies` beside it; whatever was there goes.

    Compiled by this (the host's) Python too, for guests whose python3 is the same version:
    otherwise every sandbox would compile the agent as it starts (seconds under UML), into
    its own copy-on-write disk. Other versions ignore these files (their cache tag differs).
    Compiled on the host side first, then copied in: nothing but untrusted_tree writes into the tree.
    """
    with tempfile.TemporaryDirectory(prefix="cube-agent-") as bundle, Tree.open(rootfs) as tree:
        _agent_bundle(Path(bundle), dependencies)
        tree.remove(AGENT_DIR)
        copy_host_tree(Path(bundle), tree, AGENT_DIR)


def install_file(rootfs: Path, guest_path: str, source: Path, mode: int) -> None:
    """The host file `source` at `guest_path` in the tree (replacing whatever is there)."""
    with Tree.open(rootfs) as tree, source.open("rb") as f:
        tree.makedirs(posixpath.dirname(guest_path))
        tree.write_from(guest_path, f, mode)


def compile_in_image_argv(rootfs: Path) -> list[str]:
    """The command that compiles the agent with the image's own python3, whatever its version (in
    a chroot: only for images whose binaries are trusted, like the default template's Debian).

    Unchecked hash-based: valid whatever the files' times become (a timestamp-based .pyc
    whose source looks newer is compiled again, and SOURCE_DATE_EPOCH in the environment
    would make them checked: the source read and hashed on every import)."""
    return [
        "chroot", str(rootfs), "python3", "-m", "compileall", "-q", "-j0",
        "--invalidation-mode", "unchecked-hash", AGENT_DIR,
    ]  # fmt: skip


def prepare_rootfs(
    rootfs: Path,
    start_cmd: tuple[str, ...],
    envs: dict[str, str],
    workdir: str,
    user: str,
    dns: tuple[str, ...],
) -> str:
    """Inject agent, init and start script; make the mount points, accounts and resolv.conf the init
    expects. Returns the account name the agent uses by default (the image's USER, else root)."""
    copy_agent(rootfs, AGENT_DEPENDENCIES)
    with Tree.open(rootfs) as tree:
        for mount_point in ("proc", "sys", "dev", "run", "tmp"):
            tree.mkdir(mount_point)
        tree.chmod("tmp", 0o1777, follow=True)
        ensure_sandbox_user(tree)
        default_user = _account_name(tree, user)
        _write(tree, INIT_PATH, init_script(default_user), 0o755)
        if start_cmd:
            _write(tree, START_PATH, start_script(tree, start_cmd, envs, workdir, user), 0o755)
        resolv = tree.lstat("/etc/resolv.conf")
        has_own = (
            resolv is not None
            and stat.S_ISREG(resolv.st_mode)
            and "nameserver" in (tree.read_text("/etc/resolv.conf") or "")
        )
        if dns or not has_own:
            text = "".join(f"nameserver {s}\n" for s in dns or DEFAULT_DNS)
            _write(tree, "/etc/resolv.conf", text, 0o644)
        if "localhost" not in (tree.read_text("/etc/hosts") or ""):
            _write(tree, "/etc/hosts", "127.0.0.1 localhost sandbox\n::1 localhost\n", 0o644)
    return default_user
