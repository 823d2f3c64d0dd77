//! Socket addresses to and from their kernel form, without `unsafe`: the kernel form is written
//! through a `repr(C)` union and read back from the bytes the kernel filled in.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Size of the name field the shard asks the kernel for: big enough for either family.
pub(crate) const SOCKADDR_LEN_MAX: usize = size_of::<libc::sockaddr_in6>();

/// A socket address in kernel form, stable while it lives in a send slot.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) union RawSockAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

impl RawSockAddr {
    pub(crate) const fn zeroed() -> Self {
        Self {
            v6: libc::sockaddr_in6 {
                sin6_family: 0,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: [0; 16] },
                sin6_scope_id: 0,
            },
        }
    }

    /// Writes `addr` and returns the length to pass as `msg_namelen`.
    pub(crate) fn set(&mut self, addr: &SocketAddr) -> libc::socklen_t {
        match addr {
            SocketAddr::V4(a) => {
                self.v4 = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                size_of::<libc::sockaddr_in>() as libc::socklen_t
            }
            SocketAddr::V6(a) => {
                self.v6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo().to_be(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                size_of::<libc::sockaddr_in6>() as libc::socklen_t
            }
        }
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut libc::sockaddr {
        (self as *mut Self).cast()
    }
}

/// Reads a socket address from the bytes the kernel wrote into a name field.
pub(crate) fn from_kernel_bytes(name: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*name.first()?, *name.get(1)?]);
    let port = u16::from_be_bytes([*name.get(2)?, *name.get(3)?]);
    if i32::from(family) == libc::AF_INET {
        let ip: [u8; 4] = name.get(4..8)?.try_into().ok()?;
        Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
    } else if i32::from(family) == libc::AF_INET6 {
        let flow: [u8; 4] = name.get(4..8)?.try_into().ok()?;
        let ip: [u8; 16] = name.get(8..24)?.try_into().ok()?;
        let scope: [u8; 4] = name.get(24..28)?.try_into().ok()?;
        Some(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(ip),
            port,
            u32::from_be_bytes(flow),
            u32::from_ne_bytes(scope),
        )))
    } else {
        None
    }
}

/// Unmaps `::ffff:a.b.c.d` so permission and table keys compare equal across families.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_address_survives_the_kernel_form_both_families() {
        for text in ["192.0.2.7:3478", "[2001:db8::1]:49152"] {
            let addr: SocketAddr = text.parse().expect("literal");
            let mut raw = RawSockAddr::zeroed();
            let len = raw.set(&addr) as usize;
            let bytes: Vec<u8> = match addr {
                SocketAddr::V4(_) => {
                    let mut b = vec![0u8; len];
                    b[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
                    b[2..4].copy_from_slice(&addr.port().to_be_bytes());
                    if let IpAddr::V4(ip) = addr.ip() {
                        b[4..8].copy_from_slice(&ip.octets());
                    }
                    b
                }
                SocketAddr::V6(_) => {
                    let mut b = vec![0u8; len];
                    b[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
                    b[2..4].copy_from_slice(&addr.port().to_be_bytes());
                    if let IpAddr::V6(ip) = addr.ip() {
                        b[8..24].copy_from_slice(&ip.octets());
                    }
                    b
                }
            };
            assert_eq!(from_kernel_bytes(&bytes), Some(addr));
        }
        assert_eq!(from_kernel_bytes(&[0, 0]), None);
    }

    #[test]
    fn an_ipv4_mapped_address_is_unmapped() {
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:5000".parse().expect("literal");
        assert_eq!(
            canonical(mapped),
            "192.0.2.1:5000".parse::<SocketAddr>().expect("literal")
        );
    }
}
