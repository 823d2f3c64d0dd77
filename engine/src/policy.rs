//! Peer address policy: which peers a client may open permissions and channels to.
//!
//! RFC 8656 §21.5 warns that a TURN server can be used to reach hosts the operator did not
//! mean to expose; coturn has been used that way (CVE-2020-26262: `0.0.0.0` and `[::]` reached
//! loopback services; CVE-2026-27624: `::ffff:127.0.0.1` did too). The verdict for a peer
//! comes from four tiers, in this order:
//!
//! 1. **Own addresses** (checked first): a peer that is exactly the relayed transport address
//!    of a live allocation of this server is allowed, whatever tiers 2 to 4 say, so relay to
//!    relay works (a browser and the conferencing back end allocating on the same uturn, or
//!    two peers of one page on a relay IP of 127.0.0.1). Every other port of a relay IP (bound
//!    or advertised) is refused ([`PeerDenied::OwnAddress`]), inside the relay range too:
//!    ports there that no allocation holds belong to other programs on the host (the relay
//!    range overlaps the kernel's ephemeral ports). A peer equal to one of uturn's listening
//!    addresses is refused on every path (no loops). `allow_loopback` still opens a loopback
//!    relay IP's other ports (labs and tests), never the listeners.
//! 2. **Always denied** (no list opens them; `allow_loopback` opens loopback only, for labs
//!    and tests): loopback 127.0.0.0/8 and ::1, unspecified 0.0.0.0 and ::, "this network"
//!    0.0.0.0/8, link-local 169.254.0.0/16 (169.254.169.254 is the cloud metadata service)
//!    and fe80::/10, multicast 224.0.0.0/4 and ff00::/8, broadcast 255.255.255.255 and the
//!    reserved 240.0.0.0/4.
//! 3. **Configured lists**: `allowed_peers` wins over `denied_peers` and over the default deny
//!    of tier 4, never over tier 2.
//! 4. **Denied by default**: private ranges 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, shared
//!    address space 100.64.0.0/10 (RFC 6598) and unique local fc00::/7 — the networks behind
//!    the relay. Everything else is allowed.
//!
//! IPv6 forms that embed an IPv4 address (IPv4-mapped `::ffff:0:0/96`, IPv4-compatible
//! `::/96`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`, Teredo `2001::/32`) are judged as the IPv4
//! address they carry, so they cannot bypass the list. CreatePermission, ChannelBind (403,
//! counted) and, on the data path, the shards re-check tier 1 per packet (a permission is by
//! IP, so a permission for a relay IP must not open its other ports); a reload revokes the
//! permissions and channels the new policy refuses.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// Why a peer address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PeerDenied {
    /// 127.0.0.0/8 or ::1.
    Loopback,
    /// 0.0.0.0 or ::.
    Unspecified,
    /// 0.0.0.0/8, "this network" (RFC 1122 §3.2.1.3).
    ThisNetwork,
    /// 224.0.0.0/4 or ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
    /// 169.254.0.0/16 or fe80::/10.
    LinkLocal,
    /// 240.0.0.0/4, reserved (RFC 1112 §4).
    Reserved,
    /// 10/8, 172.16/12, 192.168/16, 100.64/10 or fc00::/7, not in `allowed_peers`.
    Private,
    /// In `denied_peers` and not in `allowed_peers`.
    Configured,
    /// One of uturn's relay IPs on a port that is not the relayed address of a live
    /// allocation, or one of its listening addresses.
    OwnAddress,
}

impl PeerDenied {
    /// A static label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Unspecified => "unspecified",
            Self::ThisNetwork => "this_network",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::LinkLocal => "link_local",
            Self::Reserved => "reserved",
            Self::Private => "private",
            Self::Configured => "configured",
            Self::OwnAddress => "own_address",
        }
    }
}

impl fmt::Display for PeerDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An IP network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`; a bare address is a /32 or
/// /128). Host bits are ignored. An [`ipnet::IpNet`], with the bare-address form the config
/// accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr(ipnet::IpNet);

/// A CIDR string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an address or ADDRESS/PREFIX network")]
pub struct CidrError(pub String);

impl Cidr {
    /// The network `addr/prefix`; `None` when the prefix is longer than the address.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        ipnet::IpNet::new(addr, prefix).ok().map(Self)
    }

    /// Whether `ip` lies in the network (an IPv4 network never contains an IPv6 address; the
    /// policy compares embedded IPv4 addresses itself).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = || CidrError(s.to_owned());
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((addr, prefix)) => {
                let addr: IpAddr = addr.parse().map_err(|_| error())?;
                let prefix: u8 = prefix.parse().map_err(|_| error())?;
                (addr, prefix)
            }
            None => {
                let addr: IpAddr = s.trim().parse().map_err(|_| error())?;
                (addr, if addr.is_ipv4() { 32 } else { 128 })
            }
        };
        Self::new(addr, prefix).ok_or_else(error)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// uturn's own addresses, which the policy treats apart (tier 1 of the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnAddresses {
    /// The relay IPs: `relay.relay_ips` and the public IPs `relay.external_ips` maps them to
    /// (a datagram to the public address comes back to the host through the NAT).
    pub relay_ips: Vec<IpAddr>,
    /// The listeners' bound addresses (known once the data plane runs; the shell adds a
    /// wildcard one's port on each interface address). A wildcard one (`0.0.0.0:3478`) also
    /// stands for its port on the relay IPs, the specific listener IPs and loopback.
    pub listeners: Vec<SocketAddr>,
    /// The relayed transport addresses (bound and advertised) of the live allocations; the
    /// engine keeps it with [`OwnAddresses::relay_live`] and [`OwnAddresses::relay_gone`].
    pub relayed: HashSet<SocketAddr>,
}

impl OwnAddresses {
    fn is_relay_ip(&self, ip: IpAddr) -> bool {
        self.relay_ips.contains(&ip)
    }

    /// Whether `peer` (canonical: no IPv4-mapped form) is one of the listening addresses.
    fn is_listener(&self, peer: SocketAddr) -> bool {
        let ip = peer.ip();
        let host = || {
            self.is_relay_ip(ip) || is_loopback(ip) || self.listeners.iter().any(|l| l.ip() == ip)
        };
        self.listeners.iter().any(|listener| {
            listener.port() == peer.port()
                && (listener.ip() == ip
                    || (listener.ip().is_unspecified()
                        && listener.is_ipv4() == peer.is_ipv4()
                        && host()))
        })
    }

    /// An allocation now holds `addr` (its bound or its advertised relayed address).
    pub fn relay_live(&mut self, addr: SocketAddr) {
        self.relayed.insert(canonical(addr));
    }

    /// The allocation that held `addr` is gone.
    pub fn relay_gone(&mut self, addr: SocketAddr) {
        self.relayed.remove(&canonical(addr));
    }
}

/// The peer policy (see the module doc for the tiers).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerPolicy {
    /// Let loopback peers through (labs and tests).
    pub allow_loopback: bool,
    /// `peers.allowed_peers`: opens private ranges and `denied_peers` entries.
    pub allowed: Vec<Cidr>,
    /// `peers.denied_peers`: refuses more networks.
    pub denied: Vec<Cidr>,
    /// uturn's own relay and listening addresses.
    pub own: OwnAddresses,
}

impl PeerPolicy {
    /// Builds the policy from the configuration (`[peers]`, the relay IPs and their external
    /// mappings). The listening addresses are added with [`PeerPolicy::with_listeners`], the
    /// live relayed addresses by the engine.
    pub fn from_config(config: &crate::config::EngineConfig) -> Self {
        let peers = &config.peers;
        let mut relay_ips = config.relay.relay_ips.clone();
        // An invalid mapping is refused by `EngineConfig::validate` before anything runs.
        for (_, public) in config.external_mappings().unwrap_or_default() {
            if !relay_ips.contains(&public) {
                relay_ips.push(public);
            }
        }
        Self {
            allow_loopback: peers.allow_loopback,
            allowed: peers.allowed_peers.clone(),
            denied: peers.denied_peers.clone(),
            own: OwnAddresses {
                relay_ips,
                listeners: Vec::new(),
                relayed: HashSet::new(),
            },
        }
    }

    /// The same policy, knowing uturn's listening addresses.
    pub fn with_listeners(mut self, listeners: &[SocketAddr]) -> Self {
        self.own.listeners = listeners.to_vec();
        self
    }

    /// The verdict for a peer transport address (ChannelBind, Send indication).
    pub fn check(&self, peer: SocketAddr) -> Result<(), PeerDenied> {
        let own = canonical(peer);
        if self.own.is_listener(own) {
            return Err(PeerDenied::OwnAddress);
        }
        if self.own.is_relay_ip(own.ip()) {
            // Only the form uturn advertises is admitted; an IPv4-mapped spelling of it is
            // refused like every other own address (nothing legitimate needs it).
            if own == peer && self.own.relayed.contains(&peer) {
                return Ok(());
            }
            if !(self.allow_loopback && is_loopback(own.ip())) {
                return Err(PeerDenied::OwnAddress);
            }
        }
        self.check_ip(peer.ip())
    }

    /// The verdict for a peer IP (CreatePermission: RFC 8656 §9, permissions are by IP only).
    /// One of uturn's relay IPs is admitted here (relay to relay needs it); the shards then
    /// let through only its ports that are live relayed addresses.
    pub fn check_permission(&self, ip: IpAddr) -> Result<(), PeerDenied> {
        if self.own.is_relay_ip(ip) {
            return Ok(());
        }
        self.check_ip(ip)
    }

    /// Tiers 2 to 4 for an IP address, whatever its port.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), PeerDenied> {
        // Every IPv4 address the peer stands for: itself, or those an IPv6 form embeds.
        let embedded = match ip {
            IpAddr::V4(v4) => [Some(v4), None],
            IpAddr::V6(v6) => embedded_ipv4(v6),
        };
        match ip {
            IpAddr::V4(_) => {}
            IpAddr::V6(v6) => {
                if embedded[0].is_none() {
                    self.always_denied_v6(v6)?;
                }
            }
        }
        for v4 in embedded.into_iter().flatten() {
            self.always_denied_v4(v4)?;
        }
        let candidates =
            || std::iter::once(ip).chain(embedded.into_iter().flatten().map(IpAddr::V4));
        let listed = |list: &[Cidr]| candidates().any(|c| list.iter().any(|net| net.contains(c)));
        if listed(&self.allowed) {
            return Ok(());
        }
        if listed(&self.denied) {
            return Err(PeerDenied::Configured);
        }
        let private = match ip {
            IpAddr::V6(v6) if embedded[0].is_none() => v6.segments()[0] & 0xfe00 == 0xfc00,
            _ => embedded.into_iter().flatten().any(is_private_v4),
        };
        if private {
            return Err(PeerDenied::Private);
        }
        Ok(())
    }

    fn always_denied_v4(&self, ip: Ipv4Addr) -> Result<(), PeerDenied> {
        let octets = ip.octets();
        if ip.is_unspecified() {
            Err(PeerDenied::Unspecified)
        } else if octets[0] == 0 {
            Err(PeerDenied::ThisNetwork)
        } else if ip.is_loopback() {
            if self.allow_loopback {
                Ok(())
            } else {
                Err(PeerDenied::Loopback)
            }
        } else if ip.is_broadcast() {
            Err(PeerDenied::Broadcast)
        } else if ip.is_multicast() {
            Err(PeerDenied::Multicast)
        } else if ip.is_link_local() {
            Err(PeerDenied::LinkLocal)
        } else if octets[0] >= 240 {
            Err(PeerDenied::Reserved)
        } else {
            Ok(())
        }
    }

    fn always_denied_v6(&self, ip: Ipv6Addr) -> Result<(), PeerDenied> {
        let first = ip.segments()[0];
        if ip.is_unspecified() {
            Err(PeerDenied::Unspecified)
        } else if ip.is_loopback() {
            if self.allow_loopback {
                Ok(())
            } else {
                Err(PeerDenied::Loopback)
            }
        } else if ip.is_multicast() {
            Err(PeerDenied::Multicast)
        } else if first & 0xffc0 == 0xfe80 {
            Err(PeerDenied::LinkLocal)
        } else {
            Ok(())
        }
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// `addr` with an IPv4-mapped IPv6 address turned into the IPv4 address, as the shards see it
/// (a relay socket of either family reaches the same IPv4 socket through it).
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// 10/8, 172.16/12, 192.168/16 (RFC 1918) and 100.64/10 (RFC 6598).
fn is_private_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_private() || (a == 100 && (b & 0xc0) == 64)
}

/// The IPv4 addresses an IPv6 address stands for, if it embeds any: IPv4-mapped
/// `::ffff:0:0/96`, IPv4-compatible `::/96` (except `::` and `::1`, which are IPv6's own),
/// NAT64 `64:ff9b::/96` (RFC 6052), 6to4 `2002::/16` (RFC 3056, address in bits 16-48) and
/// Teredo `2001::/32` (RFC 4380: the server in bits 32-63, the client's address inverted in the
/// last 32 bits; both are checked).
fn embedded_ipv4(ip: Ipv6Addr) -> [Option<Ipv4Addr>; 2] {
    let s = ip.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from_bits((u32::from(hi) << 16) | u32::from(lo));
    let low = v4(s[6], s[7]);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => [Some(low), None],
        [0, 0, 0, 0, 0, 0, 0, 0] | [0, 0, 0, 0, 0, 0, 0, 1] => [None, None],
        [0, 0, 0, 0, 0, 0, _, _] => [Some(low), None],
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => [Some(low), None],
        [0x2002, a, b, ..] => [Some(v4(a, b)), None],
        [0x2001, 0, a, b, _, _, c, d] => [Some(v4(!c, !d)), Some(v4(a, b))],
        _ => [None, None],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PeerPolicy {
        PeerPolicy {
            own: OwnAddresses {
                relay_ips: vec![
                    "203.0.113.5".parse().unwrap(),
                    "2001:db8::5".parse().unwrap(),
                ],
                listeners: vec!["203.0.113.5:3478".parse().unwrap()],
                relayed: HashSet::new(),
            },
            ..PeerPolicy::default()
        }
    }

    fn verdict(policy: &PeerPolicy, ip: &str) -> Result<(), PeerDenied> {
        policy.check_ip(ip.parse().unwrap())
    }

    /// Tier 2 of the module doc, with every IPv6 embedding of the IPv4 ranges.
    #[test]
    fn the_default_policy_refuses_every_known_bypass_with_its_reason() {
        let cases = [
            ("0.0.0.0", PeerDenied::Unspecified),
            ("0.1.2.3", PeerDenied::ThisNetwork),
            ("::", PeerDenied::Unspecified),
            ("::1", PeerDenied::Loopback),
            ("127.0.0.1", PeerDenied::Loopback),
            ("127.255.0.9", PeerDenied::Loopback),
            ("::ffff:127.0.0.1", PeerDenied::Loopback),
            ("::127.0.0.1", PeerDenied::Loopback),
            ("64:ff9b::7f00:1", PeerDenied::Loopback),
            ("2002:7f00:1::", PeerDenied::Loopback),
            // Teredo: client 127.0.0.1 inverted is 80ff:fffe.
            ("2001:0:c633:6401::80ff:fffe", PeerDenied::Loopback),
            // Teredo whose server is the metadata service.
            ("2001:0:a9fe:a9fe::3cb8:9bf8", PeerDenied::LinkLocal),
            ("169.254.169.254", PeerDenied::LinkLocal),
            ("::ffff:169.254.169.254", PeerDenied::LinkLocal),
            ("64:ff9b::a9fe:a9fe", PeerDenied::LinkLocal),
            ("2002:a9fe:a9fe::1", PeerDenied::LinkLocal),
            ("fe80::1", PeerDenied::LinkLocal),
            ("febf::1", PeerDenied::LinkLocal),
            ("224.0.0.1", PeerDenied::Multicast),
            ("239.1.2.3", PeerDenied::Multicast),
            ("ff02::1", PeerDenied::Multicast),
            ("::ffff:224.0.0.251", PeerDenied::Multicast),
            ("255.255.255.255", PeerDenied::Broadcast),
            ("::ffff:255.255.255.255", PeerDenied::Broadcast),
            ("240.0.0.1", PeerDenied::Reserved),
            ("64:ff9b::f000:1", PeerDenied::Reserved),
            ("::ffff:0.0.0.0", PeerDenied::Unspecified),
            ("10.1.2.3", PeerDenied::Private),
            ("172.16.0.1", PeerDenied::Private),
            ("172.31.255.254", PeerDenied::Private),
            ("192.168.1.1", PeerDenied::Private),
            ("100.64.0.1", PeerDenied::Private),
            ("100.127.255.254", PeerDenied::Private),
            ("fc00::1", PeerDenied::Private),
            ("fd12:3456::1", PeerDenied::Private),
            ("::ffff:10.0.0.1", PeerDenied::Private),
            ("2002:c0a8:101::1", PeerDenied::Private),
        ];
        for (ip, reason) in cases {
            assert_eq!(verdict(&policy(), ip), Err(reason), "{ip}");
        }
    }

    #[test]
    fn ordinary_unicast_peers_are_allowed() {
        for ip in [
            "198.51.100.7",
            "172.32.0.1",
            "100.128.0.1",
            "2001:db8::1",
            "::ffff:198.51.100.7",
            "fec0::1",
            "2002:c633:6407::1",
        ] {
            assert_eq!(verdict(&policy(), ip), Ok(()), "{ip}");
        }
    }

    #[test]
    fn allow_loopback_admits_loopback_in_every_form_but_nothing_else() {
        let policy = PeerPolicy {
            allow_loopback: true,
            ..policy()
        };
        for ip in ["127.0.0.1", "::1", "::ffff:127.0.0.1", "64:ff9b::7f00:1"] {
            assert_eq!(verdict(&policy, ip), Ok(()), "{ip}");
        }
        assert_eq!(verdict(&policy, "0.0.0.0"), Err(PeerDenied::Unspecified));
        assert_eq!(
            verdict(&policy, "169.254.169.254"),
            Err(PeerDenied::LinkLocal)
        );
        assert_eq!(verdict(&policy, "10.0.0.1"), Err(PeerDenied::Private));
    }

    #[test]
    fn an_allow_list_opens_private_ranges_and_denied_entries_but_never_the_always_denied_set() {
        let policy = PeerPolicy {
            allowed: [
                "10.0.0.0/8",
                "fd00::/8",
                "0.0.0.0/0",
                "::/0",
                "198.51.100.9",
            ]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect(),
            denied: ["198.51.100.0/24", "2001:db8:bad::/48"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect(),
            ..policy()
        };
        assert_eq!(verdict(&policy, "10.9.8.7"), Ok(()));
        assert_eq!(verdict(&policy, "::ffff:10.9.8.7"), Ok(()));
        assert_eq!(verdict(&policy, "fd00::1"), Ok(()));
        assert_eq!(verdict(&policy, "198.51.100.9"), Ok(()));
        // Even 0.0.0.0/0 and ::/0 in the allow list leave tier 2 shut.
        for (ip, reason) in [
            ("127.0.0.1", PeerDenied::Loopback),
            ("::ffff:127.0.0.1", PeerDenied::Loopback),
            ("169.254.169.254", PeerDenied::LinkLocal),
            ("0.0.0.0", PeerDenied::Unspecified),
            ("::", PeerDenied::Unspecified),
            ("224.0.0.1", PeerDenied::Multicast),
            ("240.0.0.1", PeerDenied::Reserved),
        ] {
            assert_eq!(verdict(&policy, ip), Err(reason), "{ip}");
        }
        let deny_only = PeerPolicy {
            allowed: vec!["198.51.100.9".parse().unwrap()],
            ..policy
        };
        assert_eq!(
            verdict(&deny_only, "198.51.100.10"),
            Err(PeerDenied::Configured)
        );
        assert_eq!(
            verdict(&deny_only, "::ffff:198.51.100.10"),
            Err(PeerDenied::Configured)
        );
        assert_eq!(
            verdict(&deny_only, "2001:db8:bad::1"),
            Err(PeerDenied::Configured)
        );
        assert_eq!(verdict(&deny_only, "198.51.100.9"), Ok(()));
        assert_eq!(verdict(&deny_only, "10.0.0.1"), Err(PeerDenied::Private));
    }

    /// Tier 1: on a relay IP only the relayed addresses of live allocations are peers; a free
    /// port of the relay range is someone else's socket (the range overlaps the kernel's
    /// ephemeral ports), so it is refused like any other port of the host.
    #[test]
    fn own_relay_ips_are_peers_only_at_live_relayed_addresses_and_listeners_never() {
        let mut policy = policy();
        let live: SocketAddr = "203.0.113.5:50000".parse().unwrap();
        let live6: SocketAddr = "[2001:db8::5]:65535".parse().unwrap();
        policy.own.relay_live(live);
        policy.own.relay_live(live6);
        let check = |policy: &PeerPolicy, addr: &str| policy.check(addr.parse().unwrap());
        assert_eq!(check(&policy, "203.0.113.5:50000"), Ok(()));
        assert_eq!(check(&policy, "[2001:db8::5]:65535"), Ok(()));
        for refused in [
            "[::ffff:203.0.113.5]:50000",
            "203.0.113.5:50001",
            "203.0.113.5:51820",
            "[::ffff:203.0.113.5]:50001",
            "203.0.113.5:22",
            "203.0.113.5:3478",
            "[2001:db8::5]:49151",
            "[2001:db8::5]:65534",
        ] {
            assert_eq!(
                check(&policy, refused),
                Err(PeerDenied::OwnAddress),
                "{refused}"
            );
        }
        assert_eq!(check(&policy, "203.0.113.6:22"), Ok(()));
        // A gone allocation's address is refused from then on.
        policy.own.relay_gone(live);
        assert_eq!(
            check(&policy, "203.0.113.5:50000"),
            Err(PeerDenied::OwnAddress)
        );
        // Permissions are by IP: the relay IP itself stays admitted (relay to relay).
        assert_eq!(
            policy.check_permission("203.0.113.5".parse().unwrap()),
            Ok(())
        );
        assert_eq!(
            policy.check_permission("::ffff:203.0.113.5".parse().unwrap()),
            Ok(())
        );
    }

    /// The README's browser demo: the relay IP is 127.0.0.1 and loopback is not open. Two
    /// allocations reach each other; nothing else on loopback does, in or out of the range.
    #[test]
    fn a_loopback_relay_ip_opens_live_allocations_only_unless_loopback_is_allowed() {
        let mut lab = PeerPolicy {
            own: OwnAddresses {
                relay_ips: vec!["127.0.0.1".parse().unwrap()],
                listeners: vec!["127.0.0.1:3478".parse().unwrap()],
                relayed: HashSet::new(),
            },
            ..PeerPolicy::default()
        };
        lab.own.relay_live("127.0.0.1:20000".parse().unwrap());
        let check = |policy: &PeerPolicy, addr: &str| policy.check(addr.parse().unwrap());
        assert_eq!(check(&lab, "127.0.0.1:20000"), Ok(()));
        assert_eq!(check(&lab, "127.0.0.1:20001"), Err(PeerDenied::OwnAddress));
        assert_eq!(check(&lab, "127.0.0.1:8080"), Err(PeerDenied::OwnAddress));
        assert_eq!(check(&lab, "127.0.0.2:20000"), Err(PeerDenied::Loopback));
        assert_eq!(lab.check_permission("127.0.0.1".parse().unwrap()), Ok(()));
        let open = PeerPolicy {
            allow_loopback: true,
            ..lab
        };
        assert_eq!(check(&open, "127.0.0.1:8080"), Ok(()));
        assert_eq!(check(&open, "127.0.0.1:3478"), Err(PeerDenied::OwnAddress));
    }

    /// No loops: a listener is refused whatever the port range, and a wildcard listener is
    /// refused on every address of the host the policy knows (relay IPs, loopback).
    #[test]
    fn listening_addresses_are_refused_on_every_address_that_reaches_them() {
        let mut policy = PeerPolicy {
            allow_loopback: true,
            own: OwnAddresses {
                relay_ips: vec!["198.51.100.5".parse().unwrap()],
                listeners: vec![
                    "0.0.0.0:3478".parse().unwrap(),
                    "198.51.100.9:50000".parse().unwrap(),
                    "[::]:443".parse().unwrap(),
                ],
                relayed: HashSet::new(),
            },
            ..PeerPolicy::default()
        };
        policy.own.relay_live("198.51.100.5:50000".parse().unwrap());
        let check = |addr: &str| policy.check(addr.parse().unwrap());
        for refused in [
            "198.51.100.5:3478",
            "127.0.0.1:3478",
            "127.0.0.53:3478",
            "[::ffff:127.0.0.1]:3478",
            "198.51.100.9:3478",
            "198.51.100.9:50000",
            "[::1]:443",
        ] {
            assert_eq!(check(refused), Err(PeerDenied::OwnAddress), "{refused}");
        }
        // The same ports elsewhere are ordinary peers; so is the live relayed address.
        assert_eq!(check("198.51.100.77:3478"), Ok(()));
        assert_eq!(check("[2001:db8::7]:443"), Ok(()));
        assert_eq!(check("198.51.100.5:50000"), Ok(()));
    }

    /// A relay IP mapped to a public one (`relay.external_ips`): both are uturn's own.
    #[test]
    fn the_public_address_of_a_mapped_relay_ip_is_an_own_address_too() {
        let mut config = crate::config::EngineConfig::default();
        config.relay.relay_ips = vec!["10.0.0.5".parse().unwrap()];
        config.relay.external_ips = vec!["203.0.113.5/10.0.0.5".to_owned()];
        let mut policy = PeerPolicy::from_config(&config);
        assert!(
            policy
                .own
                .relay_ips
                .contains(&"203.0.113.5".parse().unwrap())
        );
        policy.own.relay_live("203.0.113.5:50000".parse().unwrap());
        assert_eq!(policy.check("203.0.113.5:50000".parse().unwrap()), Ok(()));
        assert_eq!(
            policy.check("203.0.113.5:50002".parse().unwrap()),
            Err(PeerDenied::OwnAddress)
        );
    }

    #[test]
    fn cidr_parsing_refuses_what_is_not_a_network() {
        for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "x", "10.0.0.0/"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        let net: Cidr = "10.1.2.3/8".parse().unwrap();
        assert!(net.contains("10.200.0.1".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(!net.contains("::ffff:10.0.0.1".parse().unwrap()));
        let all: Cidr = "::/0".parse().unwrap();
        assert!(all.contains("2001:db8::1".parse().unwrap()));
    }
}
