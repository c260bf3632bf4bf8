"""The egress policy program (ebpf.c): compile once, attach per sandbox, maps as policy.

Compiled with bcc once per service start; its maps are pinned under
/sys/fs/bpf/cube/<tag>/, so programs still attached after the service stops
keep enforcing the last policy, and the next start reuses the same maps.
Everything here blocks (bcc, netlink, bpf syscalls): callers use a thread.

The compile is clang's: about a second of CPU, the largest single step of a service
start, which is on the way of every sandbox that outlived the previous service. So
`cube serve` starts it first thing when a previous service's maps are pinned
(`compile_ahead`, in a thread: bcc holds no GIL while it compiles), beside its own
imports and start-up, and `PolicyProgram` takes what it made.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from appliance.net.addressing import Addressing, Plan
from appliance.net.policy import Network

BPF_FS = Path("/sys/fs/bpf")
PIN_ROOT = BPF_FS / "cube"
MAX_SANDBOXES = 16384
# Sum over all sandboxes of CIDR entries (lists + DNS-learned addresses). LPM
# tries allocate per entry, so a large ceiling costs nothing until used.
MAX_ENTRIES = 1 << 20
# The always-blocked set: fixed ranges, the operator's openings and this host's addresses.
MAX_BLOCKED = 1 << 16
FLAG_INTERNET = 1

_TC_INGRESS_PARENT = "ffff:fff2"  # clsact ingress: packets arriving from the sandbox netns
# The filter's priority, given so that attaching again replaces it: the one the kernel picks for
# a first filter that names none (what earlier releases attached with).
_FILTER_PRIO = 49152
_PROGRAM = Path(__file__).with_name("ebpf.c")


def ensure_bpf_fs() -> None:
    """Mount bpffs on /sys/fs/bpf if nothing is mounted there yet."""
    with open("/proc/self/mounts") as f:
        if any(line.split()[1] == str(BPF_FS) and line.split()[2] == "bpf" for line in f):
            return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", str(BPF_FS).encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount bpffs on {BPF_FS}: {os.strerror(err)}")


def _addr_u32(address: ipaddress.IPv4Address) -> int:
    # The program compares raw network-order words read from the packet.
    return int.from_bytes(address.packed, "little")


def _addr16(address: ipaddress.IPv6Address) -> ctypes.Array[ctypes.c_uint8]:
    return (ctypes.c_uint8 * 16).from_buffer_copy(address.packed)


def _network(version: int, key: Any) -> Network:
    """The network a trie key stands for (the inverse of `PolicyProgram._key`)."""
    prefixlen = key.prefixlen - 32
    if version == 4:
        return ipaddress.IPv4Network((ipaddress.IPv4Address(int(key.addr).to_bytes(4, "little")), prefixlen))
    return ipaddress.IPv6Network((ipaddress.IPv6Address(bytes(key.addr)), prefixlen))


def pin_dir_of(addressing: Addressing) -> Path:
    """Where the maps of the service of this host network are pinned."""
    return PIN_ROOT / addressing.tag


# Programs being compiled ahead in this process (`compile_ahead`), by pin directory.
_compiling: dict[Path, Future[Any]] = {}
_compiling_lock = threading.Lock()


def _compile(pin_dir: Path) -> Any:
    """The program compiled and loaded by bcc (a `bcc.BPF`), its maps pinned in `pin_dir`:
    opened where a previous service pinned them, made otherwise."""
    from bcc import BPF

    ensure_bpf_fs()
    pin_dir.mkdir(parents=True, exist_ok=True)
    text = (
        _PROGRAM.read_text()
        .replace("@PIN", str(pin_dir))
        .replace("@MAX_SANDBOXES", str(MAX_SANDBOXES))
        .replace("@MAX_ENTRIES", str(MAX_ENTRIES))
        .replace("@MAX_BLOCKED", str(MAX_BLOCKED))
    )
    return BPF(text=text.encode(), cflags=["-Wno-macro-redefined"])


def compile_ahead(pin_dir: Path) -> None:
    """Start compiling the program for `pin_dir` in a thread of its own, for the next
    `PolicyProgram(pin_dir)` of this process to take. Whatever goes wrong there is not
    raised here: that `PolicyProgram` compiles again, and fails or recovers as it would.

    Only where a previous service left its maps pinned (a crash, or a stop that let its
    sandboxes run on: the start that must be quick): opening them makes nothing on the host
    that a start failing before CubeVS would leave behind."""
    if not pin_dir.is_dir():
        return
    future: Future[Any] = Future()
    with _compiling_lock:
        if pin_dir in _compiling:
            return
        _compiling[pin_dir] = future

    def compile_into_future() -> None:
        try:
            future.set_result(_compile(pin_dir))
        except BaseException as exc:  # handed to the taker, who compiles again
            future.set_exception(exc)

    threading.Thread(target=compile_into_future, name="ebpf-compile-ahead", daemon=True).start()


def _take_compiled_ahead(pin_dir: Path) -> Any:
    """What `compile_ahead(pin_dir)` made (waiting for it), or None: none was started, or it
    failed (e.g. maps pinned by an older build: the caller's own compile says so)."""
    with _compiling_lock:
        future = _compiling.pop(pin_dir, None)
    if future is None or future.exception() is not None:
        return None
    return future.result()


class PolicyProgram:
    """The loaded program and its maps."""

    def __init__(self, pin_dir: Path) -> None:
        from bcc import BPF  # optional (python3-bpfcc): without it the service runs unenforced

        self.pin_dir = pin_dir
        ahead = _take_compiled_ahead(pin_dir)
        self._bpf = _compile(pin_dir) if ahead is None else ahead  # (a BPF with no table open is falsy)
        self._fn = self._bpf.load_func(b"cube_egress", BPF.SCHED_CLS)
        self.sandboxes = self._bpf[b"sandboxes"]
        self.counters = self._bpf[b"counters"]
        self.tries = {
            (list_name, version): self._bpf[f"{list_name}_v{version}".encode()]
            for list_name in ("allow", "deny", "blocked")
            for version in (4, 6)
        }
        self._blocked: dict[Network, bool] = {}  # what the blocked tries hold

    def close(self) -> None:
        self._bpf.cleanup()

    # --- attachment -------------------------------------------------------

    def attach(self, ifindex: int) -> None:
        """Attach the program, or put it in the place of the one attached there already (a sandbox
        re-adopted after a restart: its veth kept a previous service's program, in one step)."""
        with IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            ipr.tc(
                "replace-filter",
                "bpf",
                ifindex,
                ":1",
                fd=self._fn.fd,
                name=self._fn.name,
                parent=_TC_INGRESS_PARENT,
                prio=_FILTER_PRIO,
                classid=1,
                direct_action=True,
            )

    def detach(self, ifindex: int) -> None:
        with IPRoute() as ipr:
            try:
                ipr.tc("del", "clsact", ifindex)
            except NetlinkError as e:
                if e.code not in (2, 19, 22):  # no qdisc / no device / nothing attached
                    raise

    # --- per-sandbox state ------------------------------------------------

    def configure(self, ifindex: int, plan: Plan, *, internet: bool) -> None:
        value = self.sandboxes.Leaf(
            _addr_u32(ipaddress.IPv4Address(plan.host_side_ip)),
            _addr_u32(ipaddress.IPv4Address(plan.host_ip)),
            _addr_u32(ipaddress.IPv4Address(plan.resolver_ip)),
            FLAG_INTERNET if internet else 0,
            _addr16(ipaddress.IPv6Address(plan.host_side_ip6)),
            _addr16(ipaddress.IPv6Address(plan.host_ip6)),
        )
        self.sandboxes[self.sandboxes.Key(ifindex)] = value

    def _key(self, list_name: str, ifindex: int, network: Network) -> object:
        trie = self.tries[(list_name, network.version)]
        if network.version == 4:
            return trie.Key(32 + network.prefixlen, ifindex, _addr_u32(network.network_address))
        return trie.Key(32 + network.prefixlen, ifindex, _addr16(network.network_address))

    def add(self, list_name: str, ifindex: int, networks: Iterable[Network], value: int = 1) -> None:
        """Add all or, if the maps are full, none (what was added is taken out again)."""
        added: list[Network] = []
        try:
            for network in networks:
                trie = self.tries[(list_name, network.version)]
                trie[self._key(list_name, ifindex, network)] = trie.Leaf(value)
                added.append(network)
        except Exception:
            self.remove(list_name, ifindex, added)
            raise

    def remove(self, list_name: str, ifindex: int, networks: Iterable[Network]) -> None:
        for network in networks:
            trie = self.tries[(list_name, network.version)]
            try:
                del trie[self._key(list_name, ifindex, network)]
            except KeyError:
                pass

    def forget(self, ifindex: int) -> None:
        """Drop a sandbox's configuration and counters (its list entries are removed by the caller)."""
        for table in (self.sandboxes, self.counters):
            try:
                del table[table.Key(ifindex)]
            except KeyError:
                pass

    def forget_all(self, keep: frozenset[int] = frozenset()) -> dict[int, dict[str, set[Network]]]:
        """Empty the per-sandbox maps (at start, after the sweep) but for the sandboxes on the
        veths `keep` (kept networks of guests that run on, about to be re-adopted); returns what
        the allow and deny lists hold for those, by ifindex and list."""
        held: dict[int, dict[str, set[Network]]] = {i: {"allow": set(), "deny": set()} for i in keep}
        for (list_name, version), trie in self.tries.items():
            if list_name == "blocked":
                continue
            stale = []
            for key in list(trie.keys()):
                if key.ifindex in keep:
                    held[key.ifindex][list_name].add(_network(version, key))
                else:
                    stale.append(key)
            for key in stale:
                del trie[key]
        for table in (self.sandboxes, self.counters):
            for key in [k for k in table.keys() if k.value not in keep]:
                del table[key]
        return held

    def set_blocked(self, entries: dict[Network, bool]) -> None:
        """Make the blocked tries hold `entries` (network → blocked; False: opened by the
        operator), tightening before loosening so no packet meets a set looser than both."""
        old = self._blocked
        if not old:  # first call of this service: start from what an earlier one left (sandboxes
            # that run on are enforced by it all along), never from an empty set
            old = {
                _network(version, key): bool(value.value)
                for version in (4, 6)
                for key, value in self.tries[("blocked", version)].items()
            }
        self.add("blocked", 0, [n for n, b in entries.items() if b and old.get(n) is not True], 1)
        self.remove("blocked", 0, [n for n, b in old.items() if not b and n not in entries])
        self.add("blocked", 0, [n for n, b in entries.items() if not b and old.get(n) is not False], 0)
        self.remove("blocked", 0, [n for n, b in old.items() if b and n not in entries])
        self._blocked = dict(entries)

    def read_counters(self, ifindex: int) -> dict[str, int]:
        try:
            per_cpu = self.counters[self.counters.Key(ifindex)]
        except KeyError:
            per_cpu = []
        totals = dict.fromkeys(("allowed_packets", "allowed_bytes", "dropped_packets", "dropped_bytes"), 0)
        for cpu in per_cpu:
            for name in totals:
                totals[name] += int(getattr(cpu, name))
        return totals
