"""CubeVS: per-sandbox networks (netns, veth, tap, NAT) and their eBPF egress policy.

Public API::

    async with CubeVS.start(config) as vs:             # once per `cube serve`
        vs.enforced                                     # eBPF policy active?
        async with vs.sandbox_network(sandbox_id, slot, tap_owner_uid, policy) as net:
            net.netns_path, net.tap                     # attach the guest to tap0 inside the netns
            net.host_ip                                 # host → host_ip:PORT reaches the guest's PORT
            await vs.update_policy(sandbox_id, NetworkPolicy.from_e2b(body))   # PolicyError → 400
            vs.counters(sandbox_id)                     # allowed/dropped packets and bytes
    doctor_checks()                                     # [(name, ok, detail)] for `cube doctor`

Per sandbox: netns `cube-<id>`; inside it `tap0` (169.254.0.1/30 and
fdcb:e0::1/126, the guest's gateways; IFF_TAP|IFF_NO_PI|IFF_VNET_HDR as UML's
vector transport opens it, owned by `tap_owner_uid`) and `eth0` (host_ip,
host_ip6), the peer of host-side veth `cube<tag>-<slot>`. nftables in the netns
DNATs host_ip/host_ip6 to the guest (169.254.0.2 / fdcb:e0::2), sends the
gateway's port 53 to the node resolver and SNATs everything towards the host
to host_ip/host_ip6; the host masquerades egress and lets only local processes
open connections to sandboxes. Set-up ≈ 15-20 ms per sandbox on an idle 2-core
host (one thread setns'ed into the netns, libnftables in-process), teardown ≈ 25 ms.

Policy: a bcc-compiled tc program on the host-side veth's ingress with per-sandbox
LPM tries (IPv4 and IPv6, at most `MAX_ENTRIES_PER_LIST` = 8192 entries per list)
keyed by that veth's ifindex, pinned under /sys/fs/bpf/cube/<tag>. Always blocked,
whatever the sandbox's own lists say: other sandboxes, this host's addresses (followed
as they change; the resolver's port 53 excepted), 169.254.0.0/16 (metadata),
loopback, 10/8, 172.16/12, 192.168/16, 100.64/10, multicast, fc00::/7, fe80::/10;
only the operator's `operator_open_networks` takes ranges out of that set.
Domain entries ("pypi.org", "*.example.com") are enforced through the A/AAAA
answers of the node resolver. A sandbox without egress (no internet access, or
0.0.0.0/0 denied) gets only the names its allow list's domains match resolved;
others are REFUSED without reaching the upstream, so DNS is no tunnel out.
The program only judges what a sandbox sends; replies on TCP connections the
host opened to the guest (DNAT) pass, UDP to the guest via DNAT gets no reply.
"""

from appliance.net.doctor import doctor_checks
from appliance.net.policy import MAX_ENTRIES_PER_LIST, NetworkPolicy, PolicyError
from appliance.net.service import CubeVS, NetworkUnenforced, SandboxNetwork

__all__ = [
    "MAX_ENTRIES_PER_LIST",
    "CubeVS",
    "NetworkPolicy",
    "NetworkUnenforced",
    "PolicyError",
    "SandboxNetwork",
    "doctor_checks",
]
