// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
/*
 * uturn's XDP fast path for UDP ChannelData (RFC 8656 §12).
 *
 * client -> peer: a UDP datagram to a TURN listener whose (client, listener, channel) is in
 *   CHANNELS loses its 4-byte ChannelData header and leaves as relayed address -> peer.
 * peer -> client: a UDP datagram to a relayed address from a peer in RELAYS gains the
 *   ChannelData header and leaves as listener -> client.
 *
 * Everything else, and anything the program is unsure of, is XDP_PASS untouched: the kernel
 * and the io_uring shards handle it exactly as without this program. The maps are written only
 * by the control thread, from the same table changes the shards apply, so permission and
 * channel lifetimes stay in the engine.
 *
 * The UDP checksum is updated incrementally (RFC 1624) from the one the sender computed, so a
 * datagram corrupted on the way in still fails the receiver's check on the way out.
 *
 * Build: clang -O2 -g -target bpf -c turn_router.c -o turn_router.o (scripts/build-xdp.sh).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "turn_router.h"

#define AF_INET 2
#define AF_INET6 10

/* The loader may change max_entries before loading; these are the defaults. */
/* Indexed by UDP destination port (host order): UTURN_PORT_LISTENER / UTURN_PORT_RELAY. One
 * array lookup sorts every UDP datagram, so traffic that is not TURN costs no hash lookup. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u8);
} PORTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct uturn_channel_key);
	__type(value, struct uturn_channel_value);
} CHANNELS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct uturn_relay_key);
	__type(value, struct uturn_relay_value);
} RELAYS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct uturn_channel_stats);
} CHAN_STATS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2 * 65536);
	__type(key, __u32);
	__type(value, struct uturn_nexthop);
} NEXTHOPS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, UTURN_REASON_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} REASONS SEC(".maps");

/* ChannelData lengths above this are left to the stack: it keeps packet offsets provably
 * bounded for the verifier and is above any Ethernet jumbo frame. */
#define CHANNEL_DATA_LEN_MAX 0x3fff
/* The default TTL / hop limit of a Linux socket, which the slow path's relay socket uses. */
#define TTL_DEFAULT 64
#define IP_DF 0x4000
/* How long a FIB answer is reused for a channel's direction. The lookup is about half the
 * program's run time; a route or neighbour change reaches a busy channel within this time. */
#define NEXTHOP_CACHE_NS 1000000000ULL

struct parsed {
	struct uturn_endpoint src;
	struct uturn_endpoint dst;
	__u32 l4_off;      /* offset of the UDP header from data */
	__u32 udp_len;     /* from the UDP header, checked against the IP length */
	__u16 udp_check;   /* as on the wire (memory order) */
	__u8 family;
	__u8 tos;          /* IPv4 TOS / IPv6 traffic class, DSCP and ECN */
	__be16 h_proto;
};

static __always_inline int count(__u32 reason)
{
	__u64 *n = bpf_map_lookup_elem(&REASONS, &reason);
	if (n)
		*n += 1;
	return 0;
}

static __always_inline int pass(__u32 reason)
{
	count(reason);
	return XDP_PASS;
}

/* One's complement sums in memory order (as the kernel's csum_partial): words are loaded as
 * they lie in memory and the folded result is stored back as it is, so no byte swapping is
 * needed; a numeric value v enters as bpf_htons(v). Kept in 64 bits, folded at the end. */
static __always_inline __u64 fold64(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return s;
}

static __always_inline __u16 fold(__u64 s)
{
	return (__u16)fold64(s);
}

/* Adds (or takes out, with neg) an endpoint's address and port. IPv4 addresses are zero beyond
 * their 4 bytes, so summing all 16 bytes is right for both families. */
static __always_inline __u64 sum_endpoint(__u64 s, const struct uturn_endpoint *e, int neg)
{
	const __u32 *a = (const __u32 *)e->addr;
	__u32 m = neg ? 0xffffffff : 0;
	s += a[0] ^ m;
	s += a[1] ^ m;
	s += a[2] ^ m;
	s += a[3] ^ m;
	s += *(const __u16 *)e->port ^ (m & 0xffff);
	return s;
}

/* The words of the UDP checksum that depend on one side's addressing: pseudo-header
 * addresses, ports, and the UDP length twice (pseudo-header and UDP header). */
static __always_inline __u64 add_addressing(__u64 s, const struct uturn_endpoint *src,
					    const struct uturn_endpoint *dst, __u32 udp_len)
{
	s = sum_endpoint(s, src, 0);
	s = sum_endpoint(s, dst, 0);
	return s + 2 * (__u32)bpf_htons(udp_len);
}

static __always_inline __u64 sub_addressing(__u64 s, const struct uturn_endpoint *src,
					    const struct uturn_endpoint *dst, __u32 udp_len)
{
	s = sum_endpoint(s, src, 1);
	s = sum_endpoint(s, dst, 1);
	return s + 2 * (__u32)(0xffff ^ bpf_htons(udp_len));
}

static __always_inline __u16 ipv4_header_sum(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u64 s = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		s += w[i];
	return fold(s);
}

/* Parse Ethernet, IPv4 without options or IPv6 without extension headers, and UDP. Returns
 * -1 after counting the reason when the packet is not a plain UDP datagram. */
static __always_inline int parse(struct xdp_md *ctx, struct parsed *p)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return pass(UTURN_PASS_NOT_IP), -1;
	p->h_proto = eth->h_proto;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		struct udphdr *udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > data_end)
			return pass(UTURN_PASS_MALFORMED), -1;
		if (ip->version != 4 || ip->ihl != 5)
			return pass(ip->version != 4 ? UTURN_PASS_MALFORMED : UTURN_PASS_IP_OPTIONS), -1;
		if (ip->protocol != IPPROTO_UDP)
			return pass(UTURN_PASS_NOT_UDP), -1;
		if (ip->frag_off & bpf_htons(0x3fff))
			return pass(UTURN_PASS_FRAGMENT), -1;
		__u32 tot_len = bpf_ntohs(ip->tot_len);
		__u32 udp_len = bpf_ntohs(udp->len);
		if (tot_len < sizeof(*ip) + sizeof(*udp) || (void *)ip + tot_len > data_end ||
		    udp_len != tot_len - sizeof(*ip))
			return pass(UTURN_PASS_MALFORMED), -1;
		/* The stack would drop a header with a bad checksum; so must we. */
		if (ipv4_header_sum(ip) != 0xffff)
			return pass(UTURN_PASS_MALFORMED), -1;
		__builtin_memset(p, 0, sizeof(*p));
		p->h_proto = eth->h_proto;
		p->family = UTURN_FAMILY_V4;
		p->tos = ip->tos;
		__builtin_memcpy(p->src.addr, &ip->saddr, 4);
		__builtin_memcpy(p->dst.addr, &ip->daddr, 4);
		__builtin_memcpy(p->src.port, &udp->source, 2);
		__builtin_memcpy(p->dst.port, &udp->dest, 2);
		p->src.family = UTURN_FAMILY_V4;
		p->dst.family = UTURN_FAMILY_V4;
		p->l4_off = sizeof(*eth) + sizeof(*ip);
		p->udp_len = udp_len;
		p->udp_check = udp->check;
		return 0;
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		struct udphdr *udp = (void *)(ip6 + 1);
		if ((void *)(udp + 1) > data_end)
			return pass(UTURN_PASS_MALFORMED), -1;
		if (ip6->version != 6)
			return pass(UTURN_PASS_MALFORMED), -1;
		if (ip6->nexthdr != IPPROTO_UDP)
			return pass(UTURN_PASS_NOT_UDP), -1;
		__u32 payload_len = bpf_ntohs(ip6->payload_len);
		__u32 udp_len = bpf_ntohs(udp->len);
		if (payload_len < sizeof(*udp) || (void *)udp + payload_len > data_end ||
		    udp_len != payload_len)
			return pass(UTURN_PASS_MALFORMED), -1;
		if (udp->check == 0)
			return pass(UTURN_PASS_NO_CHECKSUM), -1;
		__builtin_memset(p, 0, sizeof(*p));
		p->h_proto = eth->h_proto;
		p->family = UTURN_FAMILY_V6;
		p->tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
		__builtin_memcpy(p->src.addr, &ip6->saddr, 16);
		__builtin_memcpy(p->dst.addr, &ip6->daddr, 16);
		__builtin_memcpy(p->src.port, &udp->source, 2);
		__builtin_memcpy(p->dst.port, &udp->dest, 2);
		p->src.family = UTURN_FAMILY_V6;
		p->dst.family = UTURN_FAMILY_V6;
		p->l4_off = sizeof(*eth) + sizeof(*ip6);
		p->udp_len = udp_len;
		p->udp_check = udp->check;
		return 0;
	}
	return pass(UTURN_PASS_NOT_IP), -1;
}

/* Route src -> dst: the channel direction's cached answer while it is fresh and the packet
 * is no longer than one the FIB accepted, else a FIB lookup. Returns 0 and fills fib's
 * ifindex and MAC addresses on success, else the reason to pass; the packet is not touched,
 * so the caller can still pass it on. */
static __always_inline int route(struct xdp_md *ctx, struct bpf_fib_lookup *fib,
				 const struct uturn_endpoint *src,
				 const struct uturn_endpoint *dst, __u8 tos, __u32 ip_len,
				 __u32 nexthop_index)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	struct uturn_nexthop *nh = bpf_map_lookup_elem(&NEXTHOPS, &nexthop_index);
	__u64 now = bpf_ktime_get_ns();
	if (nh && now < nh->expires_ns && nh->in_ifindex == ctx->ingress_ifindex &&
	    ip_len <= nh->len_ok) {
		fib->ifindex = nh->ifindex;
		__builtin_memcpy(fib->dmac, nh->dmac, ETH_ALEN);
		__builtin_memcpy(fib->smac, nh->smac, ETH_ALEN);
		return 0;
	}
	fib->l4_protocol = IPPROTO_UDP;
	__builtin_memcpy(&fib->sport, src->port, 2);
	__builtin_memcpy(&fib->dport, dst->port, 2);
	fib->tot_len = ip_len;
	fib->ifindex = ctx->ingress_ifindex;
	if (src->family == UTURN_FAMILY_V4) {
		fib->family = AF_INET;
		fib->tos = tos;
		__builtin_memcpy(&fib->ipv4_src, src->addr, 4);
		__builtin_memcpy(&fib->ipv4_dst, dst->addr, 4);
	} else {
		fib->family = AF_INET6;
		__builtin_memcpy(fib->ipv6_src, src->addr, 16);
		__builtin_memcpy(fib->ipv6_dst, dst->addr, 16);
	}
	/* An output lookup, as for a datagram this host sends from its relayed address. The
	 * kernel takes ifindex as the output interface, so a peer routed out of another interface
	 * is not found and the stack relays it instead. The kernel answers FWD_DISABLED unless
	 * forwarding is on for the interface, whatever the flags (README: "XDP fast path"). */
	long rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), BPF_FIB_LOOKUP_OUTPUT);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (nh) {
			nh->expires_ns = now + NEXTHOP_CACHE_NS;
			nh->ifindex = fib->ifindex;
			nh->in_ifindex = ctx->ingress_ifindex;
			nh->len_ok = ip_len;
			__builtin_memcpy(nh->dmac, fib->dmac, ETH_ALEN);
			__builtin_memcpy(nh->smac, fib->smac, ETH_ALEN);
		}
		return 0;
	}
	return rc == BPF_FIB_LKUP_RET_FWD_DISABLED ? UTURN_PASS_FORWARDING_OFF : UTURN_PASS_FIB;
}

/* Write Ethernet, IP and UDP headers at data for a datagram src -> dst with udp_len bytes of
 * UDP (header included). Returns -1 when the packet is too short (cannot happen after a
 * successful adjust; the verifier needs the check). */
static __always_inline int write_headers(struct xdp_md *ctx, const struct bpf_fib_lookup *fib,
					 const struct parsed *p,
					 const struct uturn_endpoint *src,
					 const struct uturn_endpoint *dst, __u32 udp_len,
					 __u16 udp_check)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return -1;
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	eth->h_proto = p->h_proto;
	if (p->family == UTURN_FAMILY_V4) {
		struct iphdr *ip = (void *)(eth + 1);
		struct udphdr *udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > data_end)
			return -1;
		ip->version = 4;
		ip->ihl = 5;
		ip->tos = p->tos;
		ip->tot_len = bpf_htons(udp_len + sizeof(*ip));
		ip->id = 0;
		ip->frag_off = bpf_htons(IP_DF);
		ip->ttl = TTL_DEFAULT;
		ip->protocol = IPPROTO_UDP;
		ip->check = 0;
		__builtin_memcpy(&ip->saddr, src->addr, 4);
		__builtin_memcpy(&ip->daddr, dst->addr, 4);
		ip->check = 0xffff ^ ipv4_header_sum(ip);
		__builtin_memcpy(&udp->source, src->port, 2);
		__builtin_memcpy(&udp->dest, dst->port, 2);
		udp->len = bpf_htons(udp_len);
		udp->check = udp_check;
	} else {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		struct udphdr *udp = (void *)(ip6 + 1);
		if ((void *)(udp + 1) > data_end)
			return -1;
		__u8 *w = (__u8 *)ip6;
		w[0] = 0x60 | (p->tos >> 4);
		w[1] = (p->tos & 0x0f) << 4;
		w[2] = 0;
		w[3] = 0;
		ip6->payload_len = bpf_htons(udp_len);
		ip6->nexthdr = IPPROTO_UDP;
		ip6->hop_limit = TTL_DEFAULT;
		__builtin_memcpy(&ip6->saddr, src->addr, 16);
		__builtin_memcpy(&ip6->daddr, dst->addr, 16);
		__builtin_memcpy(&udp->source, src->port, 2);
		__builtin_memcpy(&udp->dest, dst->port, 2);
		udp->len = bpf_htons(udp_len);
		udp->check = udp_check;
	}
	return 0;
}

static __always_inline __u16 finish_udp_check(__u16 old, __u64 s)
{
	/* IPv4 without a checksum stays without one (RFC 768); IPv6 never gets here with 0. */
	if (old == 0)
		return 0;
	__u16 c = 0xffff ^ fold(s);
	return c == 0 ? 0xffff : c;
}

static __always_inline int transmit(struct xdp_md *ctx, const struct bpf_fib_lookup *fib,
				    __u32 tx_reason)
{
	if (fib->ifindex == ctx->ingress_ifindex) {
		count(tx_reason);
		return XDP_TX;
	}
	/* The REDIRECT reason follows the TX one in the enum. */
	count(tx_reason + 1);
	return bpf_redirect(fib->ifindex, 0);
}

static __always_inline int hdr_len_of(const struct parsed *p)
{
	return p->family == UTURN_FAMILY_V4
		       ? sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr)
		       : sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + sizeof(struct udphdr);
}

/* Not inlined: the two directions' stack frames would add up past 512 bytes. */
static __noinline int to_peer(struct xdp_md *ctx, struct parsed *p)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 hdr_len = hdr_len_of(p);
	__u8 *cd = data + hdr_len;

	if ((void *)(cd + 4) > data_end)
		return pass(UTURN_PASS_NOT_CHANNEL_DATA);
	/* 0x40-0x7F: RFC 8656 channels and RFC 5766's wider range (the engine decides which it
	 * binds; an unbound number is not in the map). */
	if ((cd[0] & 0xc0) != 0x40)
		return pass(UTURN_PASS_NOT_CHANNEL_DATA);

	struct uturn_channel_key key;
	__builtin_memset(&key, 0, sizeof(key));
	key.client = p->src;
	key.listener = p->dst;
	key.channel[0] = cd[0];
	key.channel[1] = cd[1];
	struct uturn_channel_value *v = bpf_map_lookup_elem(&CHANNELS, &key);
	if (!v)
		return pass(UTURN_PASS_UNKNOWN_CHANNEL);
	if (v->peer.family != p->family || v->relayed.family != p->family)
		return pass(UTURN_PASS_CROSS_FAMILY);

	/* RFC 8656 §12.5: over UDP the datagram may be longer than the length field says (the
	 * rest is padding, not forwarded); shorter is an error the slow path counts. */
	__u32 len = ((__u32)cd[2] << 8) | cd[3];
	__u32 payload = p->udp_len - sizeof(struct udphdr);
	if (len + 4 > payload || len > CHANNEL_DATA_LEN_MAX)
		return pass(UTURN_PASS_BAD_LENGTH);
	__u32 padding = payload - 4 - len;
	if (padding > 3)
		return pass(UTURN_PASS_BAD_LENGTH);

	struct uturn_endpoint relayed = v->relayed;
	struct uturn_endpoint peer = v->peer;
	__u32 slot;
	__builtin_memcpy(&slot, v->slot, 4);

	__u32 ip_hdr = hdr_len - sizeof(struct ethhdr) - sizeof(struct udphdr);
	__u32 udp_len_new = sizeof(struct udphdr) + len;
	struct bpf_fib_lookup fib;
	int why = route(ctx, &fib, &relayed, &peer, p->tos,
			p->family == UTURN_FAMILY_V4 ? ip_hdr + udp_len_new : udp_len_new,
			slot * 2);
	if (why)
		return pass(why);

	/* Checksum: take out the old addressing, the ChannelData header and the padding bytes;
	 * put in the new addressing. The data keeps its 2-byte alignment (it moves by 4). */
	__u64 s = 0xffff ^ (__u32)p->udp_check;
	s = sub_addressing(s, &p->src, &p->dst, p->udp_len);
	__u32 cd_word;
	__builtin_memcpy(&cd_word, cd, 4);
	s += 0xffffffff ^ cd_word;
	__u8 *pad = cd + 4 + (len & CHANNEL_DATA_LEN_MAX);
#pragma unroll
	for (int i = 0; i < 3; i++) {
		if (i < padding) {
			if ((void *)(pad + i + 1) > data_end)
				return pass(UTURN_PASS_MALFORMED);
			__u32 b = pad[i];
			/* Offset from the UDP header start is 8 + 4 + len + i; in memory order a
			 * byte at an even offset is the low byte of its word. */
			s += 0xffff ^ (((len + i) & 1) ? (b << 8) : b);
		}
	}
	s = add_addressing(s, &relayed, &peer, udp_len_new);
	__u16 check = finish_udp_check(p->udp_check, s);

	/* Nothing is changed before this point; from here on a failure drops. */
	__u32 frame_len = (__u32)(data_end - data);
	__u32 keep = hdr_len + 4 + len;
	if (frame_len > keep && bpf_xdp_adjust_tail(ctx, -(int)(frame_len - keep)))
		return count(UTURN_DROP_ADJUST), XDP_DROP;
	if (bpf_xdp_adjust_head(ctx, 4))
		return count(UTURN_DROP_ADJUST), XDP_DROP;
	if (write_headers(ctx, &fib, p, &relayed, &peer, udp_len_new, check) < 0)
		return count(UTURN_DROP_ADJUST), XDP_DROP;

	struct uturn_channel_stats *st = bpf_map_lookup_elem(&CHAN_STATS, &slot);
	if (st) {
		st->to_peer_packets += 1;
		st->to_peer_bytes += len;
	}
	return transmit(ctx, &fib, UTURN_TX_TO_PEER);
}

static __noinline int to_client(struct xdp_md *ctx, struct parsed *p,
				     struct uturn_relay_value *v)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 hdr_len = hdr_len_of(p);

	if (v->client.family != p->family || v->listener.family != p->family)
		return pass(UTURN_PASS_CROSS_FAMILY);
	__u32 len = p->udp_len - sizeof(struct udphdr);
	if (len > CHANNEL_DATA_LEN_MAX)
		return pass(UTURN_PASS_BAD_LENGTH);

	struct uturn_endpoint listener = v->listener;
	struct uturn_endpoint client = v->client;
	__u8 cd[4] __attribute__((aligned(4))) = { v->channel[0], v->channel[1], len >> 8,
						     len & 0xff };
	__u32 slot;
	__builtin_memcpy(&slot, v->slot, 4);

	__u32 ip_hdr = hdr_len - sizeof(struct ethhdr) - sizeof(struct udphdr);
	__u32 udp_len_new = sizeof(struct udphdr) + 4 + len;
	struct bpf_fib_lookup fib;
	int why = route(ctx, &fib, &listener, &client, p->tos,
			p->family == UTURN_FAMILY_V4 ? ip_hdr + udp_len_new : udp_len_new,
			slot * 2 + 1);
	if (why)
		return pass(why);

	__u64 s = 0xffff ^ (__u32)p->udp_check;
	s = sub_addressing(s, &p->src, &p->dst, p->udp_len);
	s += *(const __u32 *)cd;
	s = add_addressing(s, &listener, &client, udp_len_new);
	__u16 check = finish_udp_check(p->udp_check, s);

	__u32 frame_len = (__u32)(data_end - data);
	__u32 keep = hdr_len + len;
	if (frame_len > keep && bpf_xdp_adjust_tail(ctx, -(int)(frame_len - keep)))
		return count(UTURN_DROP_ADJUST), XDP_DROP;
	if (bpf_xdp_adjust_head(ctx, -4))
		return count(UTURN_DROP_ADJUST), XDP_DROP;
	if (write_headers(ctx, &fib, p, &listener, &client, udp_len_new, check) < 0)
		return count(UTURN_DROP_ADJUST), XDP_DROP;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	__u8 *out = data + hdr_len;
	if ((void *)(out + 4) > data_end)
		return count(UTURN_DROP_ADJUST), XDP_DROP;
	__builtin_memcpy(out, cd, 4);

	struct uturn_channel_stats *st = bpf_map_lookup_elem(&CHAN_STATS, &slot);
	if (st) {
		st->to_client_packets += 1;
		st->to_client_bytes += len;
	}
	return transmit(ctx, &fib, UTURN_TX_TO_CLIENT);
}

SEC("xdp")
int uturn_router(struct xdp_md *ctx)
{
	struct parsed p;

	if (parse(ctx, &p) < 0)
		return XDP_PASS;
	__u32 port = ((__u32)p.dst.port[0] << 8) | p.dst.port[1];
	__u8 *flags = bpf_map_lookup_elem(&PORTS, &port);
	__u8 f = flags ? *flags : 0;
	/* The channel key holds the listener's address, so a datagram to another address on a
	 * listener port misses there. A port that is both (another IP's relay port) is taken as a
	 * listener's: its peer datagrams go to the stack, which relays them. */
	if (f & UTURN_PORT_LISTENER)
		return to_peer(ctx, &p);
	if (!(f & UTURN_PORT_RELAY))
		return pass(UTURN_PASS_NOT_OURS);

	struct uturn_relay_key rk;
	rk.relayed = p.dst;
	rk.peer = p.src;
	struct uturn_relay_value *rv = bpf_map_lookup_elem(&RELAYS, &rk);
	if (rv)
		return to_client(ctx, &p, rv);
	return pass(UTURN_PASS_NOT_OURS);
}

/* For the far end of a veth pair in tests and benchmarks: veth delivers frames sent with
 * XDP_TX or a redirect only to a peer that runs XDP (or has NAPI/GRO on). */
SEC("xdp")
int uturn_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
