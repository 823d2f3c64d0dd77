/* SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only */
/*
 * The map layouts shared by turn_router.c and the uturn-xdp loader (xdp/src/maps.rs).
 * Every field is a byte array in network order, so the layout has no padding and no
 * endianness question; maps.rs has a unit test that checks the sizes and offsets below.
 */
#ifndef UTURN_TURN_ROUTER_H
#define UTURN_TURN_ROUTER_H

#define UTURN_FAMILY_V4 4
#define UTURN_FAMILY_V6 6

/* An IP address and UDP port. IPv4: addr[0..4], addr[4..16] zero. size 20, aligned to 4 so
 * the program can sum it as 32-bit words. */
struct __attribute__((aligned(4))) uturn_endpoint {
	__u8 addr[16];  /* offset 0 */
	__u8 port[2];   /* offset 16, network order */
	__u8 family;    /* offset 18, UTURN_FAMILY_V4 / _V6 */
	__u8 pad;       /* offset 19, zero */
};

/* PORTS value bits, indexed by UDP destination port in host order. */
#define UTURN_PORT_LISTENER 1  /* a TURN UDP listener's port */
#define UTURN_PORT_RELAY 2     /* the port of a relayed address with a channel */

/* CHANNELS key (client -> peer). size 44 */
struct uturn_channel_key {
	struct uturn_endpoint client;   /* offset 0 */
	struct uturn_endpoint listener; /* offset 20 */
	__u8 channel[2];                /* offset 40, network order */
	__u8 pad[2];                    /* offset 42, zero */
};

/* CHANNELS value. size 44 */
struct uturn_channel_value {
	struct uturn_endpoint relayed;  /* offset 0 */
	struct uturn_endpoint peer;     /* offset 20 */
	__u8 slot[4];                   /* offset 40, host order: index into CHAN_STATS */
};

/* RELAYS key (peer -> client). size 40 */
struct uturn_relay_key {
	struct uturn_endpoint relayed;  /* offset 0 */
	struct uturn_endpoint peer;     /* offset 20 */
};

/* RELAYS value. size 48 */
struct uturn_relay_value {
	struct uturn_endpoint listener; /* offset 0 */
	struct uturn_endpoint client;   /* offset 20 */
	__u8 channel[2];                /* offset 40, network order */
	__u8 pad[2];                    /* offset 42, zero */
	__u8 slot[4];                   /* offset 44, host order */
};

/* CHAN_STATS value (per CPU, indexed by slot). size 32 */
struct uturn_channel_stats {
	__u64 to_peer_packets;   /* offset 0 */
	__u64 to_peer_bytes;     /* offset 8: ChannelData payload bytes (header and padding excluded) */
	__u64 to_client_packets; /* offset 16 */
	__u64 to_client_bytes;   /* offset 24: peer payload bytes */
};

/* NEXTHOPS value (per CPU, index 2 * slot + direction, 0 to peer, 1 to client): the last
 * successful FIB answer for a channel's direction, reused until expires_ns. The loader zeroes
 * both when it gives the slot to a channel. size 32 */
struct uturn_nexthop {
	__u64 expires_ns;  /* offset 0: bpf_ktime_get_ns() deadline; 0 = empty */
	__u32 ifindex;     /* offset 8: output interface */
	__u32 in_ifindex;  /* offset 12: the ingress interface the answer was for */
	__u32 len_ok;      /* offset 16: the largest IP length the FIB accepted (MTU) */
	__u8 dmac[6];      /* offset 20 */
	__u8 smac[6];      /* offset 26 */
};

/* REASONS index (per CPU __u64). Keep in step with `Reason` in xdp/src/maps.rs. */
enum uturn_reason {
	UTURN_TX_TO_PEER = 0,        /* forwarded client -> peer with XDP_TX */
	UTURN_REDIRECT_TO_PEER,      /* forwarded client -> peer with bpf_redirect */
	UTURN_TX_TO_CLIENT,          /* forwarded peer -> client with XDP_TX */
	UTURN_REDIRECT_TO_CLIENT,    /* forwarded peer -> client with bpf_redirect */
	UTURN_PASS_NOT_IP,           /* not IPv4/IPv6 over Ethernet (VLAN tags included) */
	UTURN_PASS_NOT_UDP,          /* not UDP, or an IPv6 extension header */
	UTURN_PASS_IP_OPTIONS,       /* IPv4 with ihl != 5 */
	UTURN_PASS_FRAGMENT,         /* IPv4 MF or fragment offset */
	UTURN_PASS_MALFORMED,        /* lengths or IPv4 header checksum inconsistent */
	UTURN_PASS_NOT_OURS,         /* UDP to neither a listener's nor a relayed address's port, or a (relayed, peer) without a channel */
	UTURN_PASS_NOT_CHANNEL_DATA, /* to a listener, first byte not 0x40-0x7F (STUN...) */
	UTURN_PASS_UNKNOWN_CHANNEL,  /* ChannelData on no channel of this 5-tuple */
	UTURN_PASS_BAD_LENGTH,       /* ChannelData length beyond the datagram, padding > 3, > 16383 */
	UTURN_PASS_CROSS_FAMILY,     /* client and peer families differ */
	UTURN_PASS_NO_CHECKSUM,      /* IPv6 UDP with checksum 0 (invalid) */
	UTURN_PASS_FORWARDING_OFF,   /* the kernel's FIB lookup needs forwarding on the interface */
	UTURN_PASS_FIB,              /* no route, no neighbour, or MTU: the stack decides */
	UTURN_DROP_ADJUST,           /* head/tail adjust failed after the packet was changed */
	UTURN_REASON_COUNT,
};

#endif
