// CubeVS egress policy: a tc clsact ingress program on each sandbox's host-side
// veth, i.e. it sees every packet a sandbox sends towards the host, after the
// sandbox netns has SNATed it to the sandbox's host_ip. One compiled program
// serves every sandbox; per-sandbox state is keyed by that veth's ifindex.
//
// Order of checks (first match wins):
//   0. ARP, and IPv6 neighbour discovery on the veth itself (hop limit 255,
//      so it cannot be routed anywhere), pass;
//   1. source must be the sandbox's own host_ip/host_ip6 (the netns SNATs everything);
//   2. DNS to the node's resolver (IPv4) is always allowed;
//   3. TCP segments other than a bare SYN to the host-side veth address are
//      replies on connections the host (the proxy) opened to the guest;
//   4. the always-blocked set (other sandboxes, the host, link-local and
//      metadata, loopback, private ranges): no list of the sandbox's own opens
//      it. Its longest matching entry decides: 1 blocked, 0 opened by the
//      operator's config (then the sandbox's lists apply as for any address);
//   5. the sandbox's allow list (allow beats deny and the internet flag);
//   6. the sandbox's deny list;
//   7. allow_internet_access.
// Only uapi structures are used, so any kernel's headers compile it.
// The @-placeholders are filled in by ebpf.py (pin paths and sizes).

#include <uapi/linux/bpf.h>
#include <uapi/linux/icmpv6.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#define FLAG_INTERNET 1
// Ethernet + IPv4 without options + the TCP/UDP header fields we read. Pull
// no more than that: pulling payload into the linear area copies data on every
// (GSO-sized) packet and cost ~20 % throughput when tried.
#define HEADERS_NEEDED (14 + 20 + 20)

struct v4_key {
    u32 prefixlen; // 32 (ifindex) + CIDR prefix length
    u32 ifindex;   // 0 in the always-blocked tries
    u32 addr;      // network byte order
};

struct v6_key {
    u32 prefixlen;
    u32 ifindex;
    u8 addr[16];
};

struct sandbox {
    u32 host_side_ip; // network byte order
    u32 sandbox_ip;
    u32 resolver_ip;
    u32 flags;
    u8 host_side_ip6[16];
    u8 sandbox_ip6[16];
};

struct counters {
    u64 allowed_packets;
    u64 allowed_bytes;
    u64 dropped_packets;
    u64 dropped_bytes;
};

BPF_TABLE_PINNED("hash", u32, struct sandbox, sandboxes, @MAX_SANDBOXES, "@PIN/sandboxes");
BPF_TABLE_PINNED("percpu_hash", u32, struct counters, counters, @MAX_SANDBOXES, "@PIN/counters");
BPF_TABLE_PINNED("lpm_trie", struct v4_key, u8, allow_v4, @MAX_ENTRIES, "@PIN/allow_v4", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct v4_key, u8, deny_v4, @MAX_ENTRIES, "@PIN/deny_v4", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct v4_key, u8, blocked_v4, @MAX_BLOCKED, "@PIN/blocked_v4", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct v6_key, u8, allow_v6, @MAX_ENTRIES, "@PIN/allow_v6", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct v6_key, u8, deny_v6, @MAX_ENTRIES, "@PIN/deny_v6", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct v6_key, u8, blocked_v6, @MAX_BLOCKED, "@PIN/blocked_v6", BPF_F_NO_PREALLOC);

static __always_inline int verdict(struct __sk_buff *skb, u32 ifindex, int allowed) {
    struct counters zero = {};
    struct counters *c = counters.lookup_or_try_init(&ifindex, &zero);
    if (c) {
        if (allowed) {
            c->allowed_packets += 1;
            c->allowed_bytes += skb->len;
        } else {
            c->dropped_packets += 1;
            c->dropped_bytes += skb->len;
        }
    }
    return allowed ? TC_ACT_OK : TC_ACT_SHOT;
}

static __always_inline int check_v4(struct sandbox *sb, u32 ifindex, void *data, void *end) {
    struct iphdr *ip = data + sizeof(struct ethhdr);
    if ((void *)(ip + 1) > end)
        return 0;
    if (ip->saddr != sb->sandbox_ip)
        return 0;
    u32 dst = ip->daddr;
    int has_ports = 0, bare_syn = 0;
    u16 dport = 0;
    if ((ip->frag_off & htons(0x1FFF)) == 0) {
        void *l4 = (void *)ip + ((ip->ihl & 0xF) * 4);
        if (ip->protocol == IPPROTO_TCP) {
            struct tcphdr *th = l4;
            if ((void *)(th + 1) > end)
                return 0;
            has_ports = 1;
            dport = th->dest;
            bare_syn = th->syn && !th->ack;
        } else if (ip->protocol == IPPROTO_UDP) {
            struct udphdr *uh = l4;
            if ((void *)(uh + 1) > end)
                return 0;
            has_ports = 1;
            dport = uh->dest;
        }
    }
    if (dst == sb->resolver_ip && has_ports && dport == htons(53))
        return 1;
    if (dst == sb->host_side_ip && ip->protocol == IPPROTO_TCP && has_ports && !bare_syn)
        return 1;
    struct v4_key key = {.prefixlen = 64, .ifindex = 0, .addr = dst};
    u8 *blocked = blocked_v4.lookup(&key);
    if (blocked && *blocked)
        return 0;
    key.ifindex = ifindex;
    if (allow_v4.lookup(&key))
        return 1;
    if (deny_v4.lookup(&key))
        return 0;
    return sb->flags & FLAG_INTERNET;
}

static __always_inline int same_ip6(const u8 *a, const u8 *b) {
    const u64 *x = (const u64 *)a, *y = (const u64 *)b;
    return x[0] == y[0] && x[1] == y[1];
}

static __always_inline int check_v6(struct sandbox *sb, u32 ifindex, void *data, void *end) {
    struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
    if ((void *)(ip6 + 1) > end)
        return 0;
    int has_ports = 0, bare_syn = 0;
    if (ip6->nexthdr == IPPROTO_ICMPV6) {
        struct icmp6hdr *icmp = (void *)(ip6 + 1);
        if ((void *)(icmp + 1) > end)
            return 0;
        if (ip6->hop_limit == 255 && icmp->icmp6_type >= 133 && icmp->icmp6_type <= 137)
            return 1; // neighbour/router discovery between the netns and the host
    } else if (ip6->nexthdr == IPPROTO_TCP) {
        struct tcphdr *th = (void *)(ip6 + 1);
        if ((void *)(th + 1) > end)
            return 0;
        has_ports = 1;
        bare_syn = th->syn && !th->ack;
    }
    u8 saddr[16], daddr[16];
    __builtin_memcpy(saddr, ip6->saddr.s6_addr, 16);
    __builtin_memcpy(daddr, ip6->daddr.s6_addr, 16);
    if (!same_ip6(saddr, sb->sandbox_ip6))
        return 0;
    if (same_ip6(daddr, sb->host_side_ip6) && ip6->nexthdr == IPPROTO_TCP && has_ports && !bare_syn)
        return 1;
    struct v6_key key = {.prefixlen = 160, .ifindex = 0};
    __builtin_memcpy(key.addr, daddr, 16);
    u8 *blocked = blocked_v6.lookup(&key);
    if (blocked && *blocked)
        return 0;
    key.ifindex = ifindex;
    if (allow_v6.lookup(&key))
        return 1;
    if (deny_v6.lookup(&key))
        return 0;
    return sb->flags & FLAG_INTERNET;
}

int cube_egress(struct __sk_buff *skb) {
    u32 ifindex = skb->ifindex;
    struct sandbox *sb = sandboxes.lookup(&ifindex);
    if (!sb)
        return TC_ACT_SHOT; // attached but not configured: fail closed

    u32 linear = skb->data_end - skb->data;
    if (linear < HEADERS_NEEDED && skb->len > linear)
        bpf_skb_pull_data(skb, skb->len < HEADERS_NEEDED ? skb->len : HEADERS_NEEDED);
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return verdict(skb, ifindex, 0);
    if (eth->h_proto == htons(ETH_P_ARP))
        return TC_ACT_OK;
    if (eth->h_proto == htons(ETH_P_IP))
        return verdict(skb, ifindex, check_v4(sb, ifindex, data, end));
    if (eth->h_proto == htons(ETH_P_IPV6))
        return verdict(skb, ifindex, check_v6(sb, ifindex, data, end));
    return verdict(skb, ifindex, 0);
}
