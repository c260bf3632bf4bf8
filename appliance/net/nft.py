"""nftables rules through libnftables, in-process (no `nft` exec per sandbox).

A libnftables context opens its netlink socket in the calling thread's network
namespace, so calling `run()` from a thread inside a sandbox netns programs that
namespace's tables.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from appliance.net.addressing import Plan

_lib = ctypes.CDLL(ctypes.util.find_library("nftables") or "libnftables.so.1", use_errno=True)
_lib.nft_ctx_new.restype = ctypes.c_void_p
_lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
_lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
_lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
_lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
_lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
_lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
_lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
_lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
_lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]


class NftError(RuntimeError):
    pass


def run(commands: str) -> str:
    """Apply an nft script atomically in the calling thread's netns; return its output."""
    ctx = _lib.nft_ctx_new(0)
    if not ctx:
        raise NftError("nft_ctx_new failed")
    try:
        _lib.nft_ctx_buffer_output(ctx)
        _lib.nft_ctx_buffer_error(ctx)
        if _lib.nft_run_cmd_from_buffer(ctx, commands.encode()) != 0:
            error = (_lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
            raise NftError(f"nft failed: {error.strip()}\n--- script ---\n{commands}")
        return (_lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
    finally:
        _lib.nft_ctx_free(ctx)


def sandbox_ruleset(plan: Plan) -> str:
    """NAT inside a sandbox netns (uplink `eth0` to the host, `tap0` to the guest).

    - host → host_ip:ANY (and host_ip6) is forwarded to the guest (the proxy reaches guest ports);
    - guest → gateway:53 goes to the node's resolver (the guest's nameserver is its gateway);
    - everything leaving towards the host carries host_ip/host_ip6 as source, whatever
      the guest wrote (no spoofing; the host-side eBPF checks that too).
    """
    dns = "meta l4proto { tcp, udp } th dport 53"
    return f"""
table ip cube {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "eth0" ip daddr {plan.host_ip} dnat to {plan.guest_ip}
        iifname "tap0" ip daddr {plan.gateway_ip} {dns} dnat to {plan.resolver_ip}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "eth0" snat to {plan.host_ip}
    }}
}}
table ip6 cube {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "eth0" ip6 daddr {plan.host_ip6} dnat to {plan.guest_ip6}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "eth0" snat to {plan.host_ip6}
    }}
}}
"""


def host_ruleset(table: str, host_network: str, host_network6: str, resolver_ip: str, veth_glob: str) -> str:
    """Host netns: masquerade sandbox egress; let only this host open connections to sandboxes.

    With forwarding on, a neighbour that routes host_network via this host could
    otherwise reach guest ports (DNAT) or the resolver without going through the
    proxy; new connections towards them are accepted only from local processes
    and from the sandboxes' own veths (whose traffic the eBPF policy judges).
    """
    return f"""
table ip {table} {{
{_egress_chains("ip", host_network, veth_glob)}
    chain input {{
        type filter hook input priority filter; policy accept;
        ip daddr {resolver_ip} iifname != {{ "lo", "{veth_glob}" }} drop
    }}
}}
table ip6 {table} {{
{_egress_chains("ip6", host_network6, veth_glob)}
}}
"""


def _egress_chains(family: str, network: str, veth_glob: str) -> str:
    """The chains of one address family (`ip`, `ip6`): masquerade what the sandboxes send out; drop new
    connections towards them that did not come from their own veths."""
    return f"""    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        {family} saddr {network} oifname != "{veth_glob}" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        {family} daddr {network} iifname != "{veth_glob}" ct state new drop
    }}"""


def delete_tables(table: str) -> str:
    """Delete the ip and ip6 tables named `table`, whether or not they exist."""
    # `add` first makes the delete idempotent within one atomic transaction.
    return "".join(f"add table {family} {table}\ndelete table {family} {table}\n" for family in ("ip", "ip6"))
