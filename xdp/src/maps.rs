//! The map layouts the program and the loader share, as fixed-size byte arrays in network
//! order. `bpf/turn_router.h` is the C side; `tests::layout_matches_the_c_header` checks that
//! every size and offset written here is the one the header states.

use std::net::{IpAddr, SocketAddr};

/// `struct uturn_endpoint`: 16 address bytes (IPv4 in the first 4), port, family, zero.
pub(crate) const ENDPOINT_LEN: usize = 20;
/// `struct uturn_channel_key`: client, listener, channel, 2 zero bytes.
pub(crate) const CHANNEL_KEY_LEN: usize = 44;
/// `struct uturn_channel_value`: relayed, peer, slot (native order).
pub(crate) const CHANNEL_VALUE_LEN: usize = 44;
/// `struct uturn_relay_key`: relayed, peer.
pub(crate) const RELAY_KEY_LEN: usize = 40;
/// `struct uturn_relay_value`: listener, client, channel, 2 zero bytes, slot (native order).
pub(crate) const RELAY_VALUE_LEN: usize = 48;
/// `struct uturn_channel_stats`: four `u64` per CPU.
pub(crate) const CHANNEL_STATS_WORDS: usize = 4;
/// `struct uturn_nexthop`: 32 bytes per CPU, only ever zeroed from here.
pub(crate) const NEXTHOP_WORDS: usize = 4;

const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

/// Offsets inside the structs, named as in the C header.
pub(crate) const OFF_ENDPOINT_PORT: usize = 16;
pub(crate) const OFF_ENDPOINT_FAMILY: usize = 18;
pub(crate) const OFF_KEY_LISTENER: usize = 20;
pub(crate) const OFF_KEY_CHANNEL: usize = 40;
pub(crate) const OFF_VALUE_PEER: usize = 20;
pub(crate) const OFF_VALUE_SLOT: usize = 40;
pub(crate) const OFF_RELAY_KEY_PEER: usize = 20;
pub(crate) const OFF_RELAY_VALUE_CLIENT: usize = 20;
pub(crate) const OFF_RELAY_VALUE_CHANNEL: usize = 40;
pub(crate) const OFF_RELAY_VALUE_SLOT: usize = 44;

/// An address as the program sees it on the wire. IPv4-mapped IPv6 addresses become IPv4,
/// because a dual-stack socket reports IPv4 clients that way while the packet is IPv4.
pub(crate) fn endpoint(addr: SocketAddr) -> [u8; ENDPOINT_LEN] {
    let mut out = [0u8; ENDPOINT_LEN];
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) => {
            out[..4].copy_from_slice(&ip.octets());
            out[OFF_ENDPOINT_FAMILY] = FAMILY_V4;
        }
        IpAddr::V6(ip) => {
            out[..16].copy_from_slice(&ip.octets());
            out[OFF_ENDPOINT_FAMILY] = FAMILY_V6;
        }
    }
    out[OFF_ENDPOINT_PORT..OFF_ENDPOINT_PORT + 2].copy_from_slice(&addr.port().to_be_bytes());
    out
}

pub(crate) fn channel_key(
    client: SocketAddr,
    listener: SocketAddr,
    channel: u16,
) -> [u8; CHANNEL_KEY_LEN] {
    let mut out = [0u8; CHANNEL_KEY_LEN];
    out[..ENDPOINT_LEN].copy_from_slice(&endpoint(client));
    out[OFF_KEY_LISTENER..OFF_KEY_LISTENER + ENDPOINT_LEN].copy_from_slice(&endpoint(listener));
    out[OFF_KEY_CHANNEL..OFF_KEY_CHANNEL + 2].copy_from_slice(&channel.to_be_bytes());
    out
}

pub(crate) fn channel_value(
    relayed: SocketAddr,
    peer: SocketAddr,
    slot: u32,
) -> [u8; CHANNEL_VALUE_LEN] {
    let mut out = [0u8; CHANNEL_VALUE_LEN];
    out[..ENDPOINT_LEN].copy_from_slice(&endpoint(relayed));
    out[OFF_VALUE_PEER..OFF_VALUE_PEER + ENDPOINT_LEN].copy_from_slice(&endpoint(peer));
    out[OFF_VALUE_SLOT..OFF_VALUE_SLOT + 4].copy_from_slice(&slot.to_ne_bytes());
    out
}

pub(crate) fn relay_key(relayed: SocketAddr, peer: SocketAddr) -> [u8; RELAY_KEY_LEN] {
    let mut out = [0u8; RELAY_KEY_LEN];
    out[..ENDPOINT_LEN].copy_from_slice(&endpoint(relayed));
    out[OFF_RELAY_KEY_PEER..OFF_RELAY_KEY_PEER + ENDPOINT_LEN].copy_from_slice(&endpoint(peer));
    out
}

pub(crate) fn relay_value(
    listener: SocketAddr,
    client: SocketAddr,
    channel: u16,
    slot: u32,
) -> [u8; RELAY_VALUE_LEN] {
    let mut out = [0u8; RELAY_VALUE_LEN];
    out[..ENDPOINT_LEN].copy_from_slice(&endpoint(listener));
    out[OFF_RELAY_VALUE_CLIENT..OFF_RELAY_VALUE_CLIENT + ENDPOINT_LEN]
        .copy_from_slice(&endpoint(client));
    out[OFF_RELAY_VALUE_CHANNEL..OFF_RELAY_VALUE_CHANNEL + 2]
        .copy_from_slice(&channel.to_be_bytes());
    out[OFF_RELAY_VALUE_SLOT..OFF_RELAY_VALUE_SLOT + 4].copy_from_slice(&slot.to_ne_bytes());
    out
}

/// Why the program passed, dropped or forwarded a packet: the index into its per-CPU
/// `REASONS` array, in the order of `enum uturn_reason` in `bpf/turn_router.h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Forwarded client → peer with XDP_TX (out of the interface it came in on).
    TxToPeer,
    /// Forwarded client → peer with a redirect to another interface.
    RedirectToPeer,
    /// Forwarded peer → client with XDP_TX.
    TxToClient,
    /// Forwarded peer → client with a redirect.
    RedirectToClient,
    /// Passed: not IPv4/IPv6 over Ethernet (VLAN-tagged frames included).
    PassNotIp,
    /// Passed: not UDP, or an IPv6 extension header.
    PassNotUdp,
    /// Passed: IPv4 header with options.
    PassIpOptions,
    /// Passed: an IPv4 fragment.
    PassFragment,
    /// Passed: lengths or the IPv4 header checksum do not add up.
    PassMalformed,
    /// Passed: UDP to neither a listener nor a relayed address with a channel to that peer.
    PassNotOurs,
    /// Passed: to a listener but not ChannelData (STUN, Send indications...).
    PassNotChannelData,
    /// Passed: ChannelData on a channel this client has not bound.
    PassUnknownChannel,
    /// Passed: the ChannelData length field exceeds the datagram, or too much padding.
    PassBadLength,
    /// Passed: the client's and the peer's address families differ.
    PassCrossFamily,
    /// Passed: IPv6 UDP without a checksum.
    PassNoChecksum,
    /// Passed: forwarding is off on the interface, and the kernel's FIB lookup (which gives
    /// the next hop's MAC address) refuses to answer without it.
    PassForwardingOff,
    /// Passed: the FIB had no route, neighbour or MTU for the rewritten packet.
    PassFib,
    /// Dropped: adjusting the packet failed after it had been changed.
    DropAdjust,
}

impl Reason {
    /// Every reason, in map index order.
    pub const ALL: [Self; 18] = [
        Self::TxToPeer,
        Self::RedirectToPeer,
        Self::TxToClient,
        Self::RedirectToClient,
        Self::PassNotIp,
        Self::PassNotUdp,
        Self::PassIpOptions,
        Self::PassFragment,
        Self::PassMalformed,
        Self::PassNotOurs,
        Self::PassNotChannelData,
        Self::PassUnknownChannel,
        Self::PassBadLength,
        Self::PassCrossFamily,
        Self::PassNoChecksum,
        Self::PassForwardingOff,
        Self::PassFib,
        Self::DropAdjust,
    ];

    /// A static label for metrics.
    pub const fn label(self) -> &'static str {
        match self {
            Self::TxToPeer => "tx_to_peer",
            Self::RedirectToPeer => "redirect_to_peer",
            Self::TxToClient => "tx_to_client",
            Self::RedirectToClient => "redirect_to_client",
            Self::PassNotIp => "pass_not_ip",
            Self::PassNotUdp => "pass_not_udp",
            Self::PassIpOptions => "pass_ip_options",
            Self::PassFragment => "pass_fragment",
            Self::PassMalformed => "pass_malformed",
            Self::PassNotOurs => "pass_not_ours",
            Self::PassNotChannelData => "pass_not_channel_data",
            Self::PassUnknownChannel => "pass_unknown_channel",
            Self::PassBadLength => "pass_bad_length",
            Self::PassCrossFamily => "pass_cross_family",
            Self::PassNoChecksum => "pass_no_checksum",
            Self::PassForwardingOff => "pass_forwarding_off",
            Self::PassFib => "pass_fib",
            Self::DropAdjust => "drop_adjust",
        }
    }

    /// Whether the packet was forwarded by the program (the fast path was taken).
    pub const fn is_forwarded(self) -> bool {
        matches!(
            self,
            Self::TxToPeer | Self::RedirectToPeer | Self::TxToClient | Self::RedirectToClient
        )
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = include_str!("../bpf/turn_router.h");

    /// The `offset N` comments of one C struct, in order, and its `size N`.
    fn c_layout(name: &str) -> (usize, Vec<usize>) {
        let start = HEADER
            .find(&format!("struct {name} {{"))
            .or_else(|| HEADER.find(&format!("{name} {{")))
            .unwrap_or_else(|| panic!("struct {name} in turn_router.h"));
        let comment_start = HEADER[..start]
            .rfind("/*")
            .expect("a comment before the struct");
        let size = HEADER[comment_start..start]
            .split("size ")
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("size comment for {name}"));
        let end = start + HEADER[start..].find("};").expect("end of struct");
        let offsets = HEADER[start..end]
            .split("/* offset ")
            .skip(1)
            .map(|s| {
                s.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("offset number")
            })
            .collect();
        (size, offsets)
    }

    #[test]
    fn layout_matches_the_c_header() {
        assert_eq!(
            c_layout("uturn_endpoint"),
            (
                ENDPOINT_LEN,
                vec![0, OFF_ENDPOINT_PORT, OFF_ENDPOINT_FAMILY, 19]
            )
        );
        assert_eq!(
            c_layout("uturn_channel_key"),
            (
                CHANNEL_KEY_LEN,
                vec![0, OFF_KEY_LISTENER, OFF_KEY_CHANNEL, 42]
            )
        );
        assert_eq!(
            c_layout("uturn_channel_value"),
            (CHANNEL_VALUE_LEN, vec![0, OFF_VALUE_PEER, OFF_VALUE_SLOT])
        );
        assert_eq!(
            c_layout("uturn_relay_key"),
            (RELAY_KEY_LEN, vec![0, OFF_RELAY_KEY_PEER])
        );
        assert_eq!(
            c_layout("uturn_relay_value"),
            (
                RELAY_VALUE_LEN,
                vec![
                    0,
                    OFF_RELAY_VALUE_CLIENT,
                    OFF_RELAY_VALUE_CHANNEL,
                    42,
                    OFF_RELAY_VALUE_SLOT
                ]
            )
        );
        assert_eq!(
            c_layout("uturn_nexthop"),
            (NEXTHOP_WORDS * 8, vec![0, 8, 12, 16, 20, 26])
        );
        assert_eq!(
            c_layout("uturn_channel_stats"),
            (CHANNEL_STATS_WORDS * 8, vec![0, 8, 16, 24])
        );
    }

    #[test]
    fn reasons_are_in_the_order_of_the_c_enum() {
        let start = HEADER.find("enum uturn_reason {").expect("enum in header");
        let end = start + HEADER[start..].find("};").expect("end of enum");
        let names: Vec<&str> = HEADER[start..end]
            .lines()
            .skip(1)
            .filter_map(|l| l.trim().strip_prefix("UTURN_"))
            .map(|l| l.split([',', ' ']).next().unwrap_or(""))
            .collect();
        let expected: Vec<String> = Reason::ALL
            .iter()
            .map(|r| r.label().to_ascii_uppercase())
            .collect();
        assert_eq!(names.last(), Some(&"REASON_COUNT"));
        assert_eq!(
            names[..names.len() - 1],
            expected.iter().map(String::as_str).collect::<Vec<_>>()[..]
        );
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn an_ipv4_mapped_client_is_keyed_as_the_ipv4_packet_it_sends() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:5000".parse().unwrap();
        let plain: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        assert_eq!(endpoint(mapped), endpoint(plain));
        assert_eq!(endpoint(plain)[..4], [10, 0, 0, 1]);
        assert_eq!(endpoint(plain)[4..16], [0; 12]);
        assert_eq!(endpoint(plain)[16..], [0x13, 0x88, 4, 0]);
    }

    #[test]
    fn channel_numbers_are_in_network_order_and_slots_in_native_order() {
        let a: SocketAddr = "[2001:db8::1]:3478".parse().unwrap();
        let key = channel_key(a, a, 0x4001);
        assert_eq!(key[OFF_KEY_CHANNEL..], [0x40, 0x01, 0, 0]);
        assert_eq!(endpoint(a)[OFF_ENDPOINT_FAMILY], FAMILY_V6);
        let value = relay_value(a, a, 0x4001, 7);
        assert_eq!(
            value[OFF_RELAY_VALUE_CHANNEL..OFF_RELAY_VALUE_CHANNEL + 2],
            [0x40, 0x01]
        );
        assert_eq!(value[OFF_RELAY_VALUE_SLOT..], 7u32.to_ne_bytes());
    }
}
