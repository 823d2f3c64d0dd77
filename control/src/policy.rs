//! Peer address policy: which peers a client may open permissions and channels to.
//!
//! RFC 8656 §21.5 warns that a TURN server can be used to reach hosts the operator did not
//! mean to expose. The default refuses addresses that name the server itself or its local
//! network services: loopback, unspecified, "this network" 0.0.0.0/8, multicast, broadcast and
//! link-local (169.254.169.254 is the cloud metadata service). IPv6 forms that embed an IPv4
//! address (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::/96` and
//! 6to4 `2002::/16`) are checked as the IPv4 address they carry, so they cannot bypass the
//! list. CreatePermission and ChannelBind answer 403 (Forbidden) for a denied peer; the data
//! plane applies the same check to Send indications.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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
        }
    }
}

impl std::fmt::Display for PeerDenied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The peer policy: a pure function of the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerPolicy {
    /// Let loopback peers through (labs and tests).
    pub allow_loopback: bool,
}

impl PeerPolicy {
    /// Builds the policy from `[peers]`.
    pub fn from_config(peers: &crate::config::PeersConfig) -> Self {
        Self {
            allow_loopback: peers.allow_loopback,
        }
    }

    /// Accepts or refuses a peer IP.
    pub fn check(&self, ip: IpAddr) -> Result<(), PeerDenied> {
        match ip {
            IpAddr::V4(v4) => self.check_v4(v4),
            IpAddr::V6(v6) => match embedded_ipv4(v6) {
                Some(v4) => self.check_v4(v4),
                None => self.check_v6(v6),
            },
        }
    }

    fn check_v4(&self, ip: Ipv4Addr) -> Result<(), PeerDenied> {
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
        } else {
            Ok(())
        }
    }

    fn check_v6(&self, ip: Ipv6Addr) -> Result<(), PeerDenied> {
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

/// The IPv4 address an IPv6 address stands for, if it embeds one: IPv4-mapped `::ffff:0:0/96`,
/// IPv4-compatible `::/96` (except `::` and `::1`, which are IPv6's own), NAT64 `64:ff9b::/96`
/// (RFC 6052) and 6to4 `2002::/16` (RFC 3056, address in bits 16-48).
fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(low),
        [0, 0, 0, 0, 0, 0, 0, 0] | [0, 0, 0, 0, 0, 0, 0, 1] => None,
        [0, 0, 0, 0, 0, 0, _, _] => Some(low),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low),
        [0x2002, a, b, ..] => Some(Ipv4Addr::new(
            (a >> 8) as u8,
            a as u8,
            (b >> 8) as u8,
            b as u8,
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(ip: &str) -> Result<(), PeerDenied> {
        PeerPolicy::default().check(ip.parse().unwrap())
    }

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
            ("169.254.169.254", PeerDenied::LinkLocal),
            ("::ffff:169.254.169.254", PeerDenied::LinkLocal),
            ("64:ff9b::a9fe:a9fe", PeerDenied::LinkLocal),
            ("fe80::1", PeerDenied::LinkLocal),
            ("febf::1", PeerDenied::LinkLocal),
            ("224.0.0.1", PeerDenied::Multicast),
            ("239.1.2.3", PeerDenied::Multicast),
            ("ff02::1", PeerDenied::Multicast),
            ("255.255.255.255", PeerDenied::Broadcast),
            ("::ffff:255.255.255.255", PeerDenied::Broadcast),
            ("::ffff:0.0.0.0", PeerDenied::Unspecified),
        ];
        for (ip, reason) in cases {
            assert_eq!(denied(ip), Err(reason), "{ip}");
        }
    }

    #[test]
    fn ordinary_unicast_peers_are_allowed() {
        for ip in [
            "198.51.100.7",
            "10.0.0.1",
            "2001:db8::1",
            "::ffff:198.51.100.7",
            "fec0::1",
        ] {
            assert_eq!(denied(ip), Ok(()), "{ip}");
        }
    }

    #[test]
    fn allow_loopback_admits_loopback_in_every_form_but_nothing_else() {
        let policy = PeerPolicy {
            allow_loopback: true,
        };
        for ip in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(policy.check(ip.parse().unwrap()), Ok(()), "{ip}");
        }
        assert_eq!(
            policy.check("0.0.0.0".parse().unwrap()),
            Err(PeerDenied::Unspecified)
        );
        assert_eq!(
            policy.check("169.254.169.254".parse().unwrap()),
            Err(PeerDenied::LinkLocal)
        );
    }
}
