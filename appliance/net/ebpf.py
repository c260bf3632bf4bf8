"""The egress policy program (ebpf.c): compile once, attach per sandbox, maps as policy.

Compiled with bcc once per service start; its maps are pinned under
/sys/fs/bpf/cube/<tag>/, so programs still attached after the service stops
keep enforcing the last policy, and the next start reuses the same maps.
Everything here blocks (bcc, netlink, bpf syscalls): callers use a thread.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from appliance.net.addressing import Plan
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


class PolicyProgram:
    """The loaded program and its maps."""

    def __init__(self, pin_dir: Path) -> None:
        from bcc import BPF  # optional (python3-bpfcc): without it the service runs unenforced

        ensure_bpf_fs()
        pin_dir.mkdir(parents=True, exist_ok=True)
        self.pin_dir = pin_dir
        text = (
            _PROGRAM.read_text()
            .replace("@PIN", str(pin_dir))
            .replace("@MAX_SANDBOXES", str(MAX_SANDBOXES))
            .replace("@MAX_ENTRIES", str(MAX_ENTRIES))
            .replace("@MAX_BLOCKED", str(MAX_BLOCKED))
        )
        self._bpf = BPF(text=text.encode(), cflags=["-Wno-macro-redefined"])
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
        with IPRoute() as ipr:
            ipr.tc("add", "clsact", ifindex)
            ipr.tc(
                "add-filter",
                "bpf",
                ifindex,
                ":1",
                fd=self._fn.fd,
                name=self._fn.name,
                parent=_TC_INGRESS_PARENT,
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

    def forget_all(self) -> None:
        """Empty every per-sandbox map (at start, after the sweep: no sandbox is live)."""
        for (list_name, _version), trie in self.tries.items():
            if list_name != "blocked":
                trie.clear()
        self.sandboxes.clear()
        self.counters.clear()

    def set_blocked(self, entries: dict[Network, bool]) -> None:
        """Make the blocked tries hold `entries` (network → blocked; False: opened by the
        operator), tightening before loosening so no packet meets a set looser than both."""
        old = self._blocked
        if not old:  # first call of this service: whatever an earlier one left goes
            for version in (4, 6):
                self.tries[("blocked", version)].clear()
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
