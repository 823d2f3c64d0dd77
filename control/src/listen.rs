//! Listener addresses: `udp://`, `tcp://`, `tls://`, `auto://` and the bare `ADDR:PORT`.
//!
//! A bare address means UDP and TCP on the same port (what TURN servers have always served on
//! 3478). `auto://` is a TCP port that takes plain TURN and TLS alike, told apart by the first
//! byte (0x16 starts a TLS handshake): the form for TCP 443, so one port serves browsers behind
//! firewalls whether they speak TLS or not.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::Deserialize;
use uturn_dataplane::{StreamKind, StreamListen};

/// One `--listen` / `server.listen` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// `ADDR:PORT`: UDP and TCP on that port.
    UdpAndTcp(SocketAddr),
    /// `udp://ADDR:PORT`.
    Udp(SocketAddr),
    /// `tcp://`, `tls://` or `auto://ADDR:PORT`.
    Stream(StreamKind, SocketAddr),
}

impl ListenAddr {
    /// The socket address, whatever the transport.
    pub fn addr(self) -> SocketAddr {
        match self {
            Self::UdpAndTcp(addr) | Self::Udp(addr) | Self::Stream(_, addr) => addr,
        }
    }

    /// Whether this entry needs a TLS certificate.
    pub fn needs_tls(self) -> bool {
        matches!(self, Self::Stream(StreamKind::Tls | StreamKind::Auto, _))
    }
}

/// The UDP listener addresses of `list`, in order.
pub fn udp_addrs(list: &[ListenAddr]) -> Vec<SocketAddr> {
    list.iter()
        .filter_map(|l| match *l {
            ListenAddr::UdpAndTcp(addr) | ListenAddr::Udp(addr) => Some(addr),
            ListenAddr::Stream(..) => None,
        })
        .collect()
}

/// The TCP listeners of `list`, in order.
pub fn stream_listeners(list: &[ListenAddr]) -> Vec<StreamListen> {
    list.iter()
        .filter_map(|l| match *l {
            ListenAddr::UdpAndTcp(addr) => Some(StreamListen {
                addr,
                kind: StreamKind::Tcp,
            }),
            ListenAddr::Stream(kind, addr) => Some(StreamListen { addr, kind }),
            ListenAddr::Udp(_) => None,
        })
        .collect()
}

/// Why a listen address does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}`: expected ADDR:PORT or udp:// tcp:// tls:// auto:// followed by ADDR:PORT \
     (IPv6 in brackets, e.g. [::]:3478)"
)]
pub struct ListenAddrError(String);

impl FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = || ListenAddrError(s.to_owned());
        let (scheme, rest) = match s.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest),
            None => (None, s),
        };
        let addr: SocketAddr = rest.parse().map_err(|_| error())?;
        Ok(match scheme {
            None => Self::UdpAndTcp(addr),
            Some("udp") => Self::Udp(addr),
            Some("tcp") => Self::Stream(StreamKind::Tcp, addr),
            Some("tls") => Self::Stream(StreamKind::Tls, addr),
            Some("auto") => Self::Stream(StreamKind::Auto, addr),
            Some(_) => return Err(error()),
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UdpAndTcp(addr) => write!(f, "{addr}"),
            Self::Udp(addr) => write!(f, "udp://{addr}"),
            Self::Stream(kind, addr) => write!(f, "{}://{addr}", kind.name()),
        }
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses_and_prints_back() {
        for text in [
            "0.0.0.0:3478",
            "udp://0.0.0.0:3478",
            "tcp://0.0.0.0:3478",
            "auto://0.0.0.0:443",
            "tls://[::]:5349",
        ] {
            let parsed: ListenAddr = text.parse().expect("valid");
            assert_eq!(parsed.to_string(), text);
        }
        let list: Vec<ListenAddr> = ["127.0.0.1:3478", "udp://127.0.0.1:3479", "auto://[::1]:443"]
            .iter()
            .map(|s| s.parse().expect("valid"))
            .collect();
        assert_eq!(udp_addrs(&list).len(), 2);
        let streams = stream_listeners(&list);
        assert_eq!(streams.len(), 2);
        assert_eq!(streams[0].kind, StreamKind::Tcp);
        assert_eq!(streams[1].kind, StreamKind::Auto);
    }

    #[test]
    fn unknown_schemes_and_bare_hosts_are_refused() {
        for text in ["dtls://0.0.0.0:3478", "localhost:3478", "tcp://", "0.0.0.0"] {
            assert!(text.parse::<ListenAddr>().is_err(), "{text}");
        }
    }
}
