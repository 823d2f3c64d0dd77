//! The operator's edge of the stream listeners: PROXY protocol headers from a trusted load
//! balancer, and the shared TCP 443 of an `auto` listener, where a TLS connection whose
//! ClientHello is not TURN's is passed through to the web service behind uturn.
//!
//! Both look at the first bytes of a connection *before* the connection's own work (framing,
//! rustls) starts, and neither consumes what it looks at unless it is a PROXY header: a
//! ClientHello stays in the connection's receive buffer, so rustls reads it from there when the
//! connection is TURN's, and the forwarder sends it on unchanged when it is the web service's.
//!
//! # Which TLS connections are TURN's
//!
//! ```text
//!  SNI in turn_server_names                  → TURN
//!  ALPN list offers "stun.turn" (RFC 7443)   → TURN
//!  ALPN list offers anything else only       → forwarded (browsers send h2 / http/1.1)
//!  no ALPN at all                            → TURN
//! ```
//!
//! A connection without ALPN is TURN's because that is what libwebrtc (Chrome, Edge, the
//! native SDKs) sends for `turns:` URLs: its TURN/TLS client sets SNI to the URL's host and
//! offers no ALPN, while every browser offers `h2` and/or `http/1.1` when it loads a web page,
//! so "no ALPN" is never a browser loading the web app. The SNI rule lets an operator who
//! serves TURN and the web app under different names be explicit.
//!
//! # Bounds
//!
//! The ClientHello must arrive in the first TLS record (at most 2^14 + 5 bytes, which the
//! receive buffer holds whole); a hello fragmented over several records is left to rustls
//! (TURN). A PROXY header is at most 107 bytes (v1) or 16 + 216 bytes of addresses and TLVs we
//! accept (v2, bounded by `PROXY_V2_LEN_MAX`). Both wait at most the listener's hello timeout.

use std::net::{IpAddr, SocketAddr};

/// How the stream listeners treat what comes before TURN.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamEdge {
    /// `auto` listeners pass TLS connections that are not TURN's to this address (the web
    /// service); `None` serves every connection as TURN.
    pub forward_other_to: Option<SocketAddr>,
    /// Start every forwarded connection with a PROXY protocol v2 header carrying the client's
    /// address, so the web service sees who connected.
    pub forward_proxy_protocol: bool,
    /// TLS server names (SNI) that are TURN's whatever the ALPN says (lower case).
    pub turn_server_names: Vec<String>,
    /// Peers that must start every connection with a PROXY protocol v1 or v2 header (a load
    /// balancer in front); the address it carries is the client's from then on. A connection
    /// from anywhere else that starts with a PROXY header is closed.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
}

impl StreamEdge {
    /// Whether connections from `peer` must carry a PROXY header.
    pub(crate) fn trusts(&self, peer: IpAddr) -> bool {
        let peer = match peer {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.proxy_protocol_from
            .iter()
            .any(|net| net.contains(&peer))
    }
}

/// What the start of a TLS connection says about whose it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Turn,
    Forward,
}

/// The outcome of looking at the first bytes of a TLS connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hello {
    /// Not all of the first record is here yet.
    NeedMore,
    /// Decided.
    Route(Route),
}

const ALPN_TURN: &[u8] = b"stun.turn";
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;

/// Classifies a connection from its first bytes (starting with the TLS record header). Never
/// reads past `bytes`; anything malformed is TURN's, where rustls answers it with an alert.
pub(crate) fn classify(bytes: &[u8], turn_server_names: &[String]) -> Hello {
    let Some(header) = bytes.get(..5) else {
        return Hello::NeedMore;
    };
    let record_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    let Some(record) = bytes.get(5..5 + record_len) else {
        return if record_len > (1 << 14) {
            Hello::Route(Route::Turn)
        } else {
            Hello::NeedMore
        };
    };
    Hello::Route(route(record, turn_server_names).unwrap_or(Route::Turn))
}

/// `None` when the record is not a whole ClientHello we can read.
fn route(record: &[u8], turn_server_names: &[String]) -> Option<Route> {
    let mut r = Reader(record);
    // Handshake header: type 1 (client_hello), 24-bit length.
    if r.u8()? != 1 {
        return None;
    }
    let len = r.u24()?;
    let mut hello = Reader(r.take(len)?);
    hello.take(2 + 32)?; // legacy_version, random
    let session = usize::from(hello.u8()?);
    hello.take(session)?;
    let suites = usize::from(hello.u16()?);
    hello.take(suites)?;
    let compression = usize::from(hello.u8()?);
    hello.take(compression)?;
    let mut alpn_seen = false;
    let mut alpn_turn = false;
    let mut sni_turn = false;
    if hello.0.is_empty() {
        // No extensions at all: no ALPN.
        return Some(Route::Turn);
    }
    let extensions_len = usize::from(hello.u16()?);
    let mut extensions = Reader(hello.take(extensions_len)?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let len = usize::from(extensions.u16()?);
        let mut body = Reader(extensions.take(len)?);
        match kind {
            EXT_ALPN => {
                alpn_seen = true;
                let list_len = usize::from(body.u16()?);
                let mut list = Reader(body.take(list_len)?);
                while !list.0.is_empty() {
                    let name_len = usize::from(list.u8()?);
                    if list.take(name_len)? == ALPN_TURN {
                        alpn_turn = true;
                    }
                }
            }
            EXT_SERVER_NAME => {
                let list_len = usize::from(body.u16()?);
                let mut list = Reader(body.take(list_len)?);
                while !list.0.is_empty() {
                    let name_type = list.u8()?;
                    let name_len = usize::from(list.u16()?);
                    let name = list.take(name_len)?;
                    if name_type == 0
                        && turn_server_names
                            .iter()
                            .any(|n| n.as_bytes().eq_ignore_ascii_case(name))
                    {
                        sni_turn = true;
                    }
                }
            }
            _ => {}
        }
    }
    Some(if sni_turn || alpn_turn || !alpn_seen {
        Route::Turn
    } else {
        Route::Forward
    })
}

/// A bounds-checked cursor; every read returns `None` past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
}

// ---- PROXY protocol (haproxy's proxy-protocol.txt, versions 1 and 2; parsed by `ppp`) ----

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (the specification's bound).
const V1_LEN_MAX: usize = 107;
/// Longest v2 header we accept: the 16-byte fixed part, IPv6 addresses (36) and TLVs up to
/// 512 bytes in all (AWS and GCP add a few dozen; anything longer is refused).
pub(crate) const PROXY_V2_LEN_MAX: usize = 16 + 512;

/// The outcome of reading a PROXY header at the start of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Proxy {
    NeedMore,
    /// A whole header of `len` bytes; `source` is the client it names (`None`: a LOCAL
    /// command or an UNKNOWN family, the connection's own peer stands).
    Header {
        len: usize,
        source: Option<SocketAddr>,
    },
    Invalid,
}

/// Whether `first` can start a PROXY header (v1's "P", v2's CR): no TURN or TLS connection
/// starts with either (STUN starts with two zero bits, ChannelData with 0x40-0x4F, TLS 0x16),
/// so an untrusted peer's connection can be refused on its first byte.
pub(crate) fn may_start_proxy(first: u8) -> bool {
    first == b'P' || first == b'\r'
}

/// Reads a PROXY header at the start of `bytes` with the `ppp` crate, within our bounds (107
/// bytes for v1, [`PROXY_V2_LEN_MAX`] for v2: a header that is not whole by then is refused,
/// so a trusted peer cannot make a connection wait on an endless header).
pub(crate) fn parse_proxy(bytes: &[u8]) -> Proxy {
    use ppp::PartialResult as _;
    match bytes.first() {
        None => Proxy::NeedMore,
        Some(b'P') => {
            let window = bytes.get(..V1_LEN_MAX).unwrap_or(bytes);
            let result = ppp::v1::Header::try_from(window);
            match result {
                Ok(header) => Proxy::Header {
                    len: header.header.len(),
                    source: match header.addresses {
                        ppp::v1::Addresses::Tcp4(a) => {
                            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                        }
                        ppp::v1::Addresses::Tcp6(a) => {
                            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                        }
                        ppp::v1::Addresses::Unknown => None,
                    },
                },
                Err(error) if error.is_incomplete() && window.len() < V1_LEN_MAX => Proxy::NeedMore,
                Err(_) => Proxy::Invalid,
            }
        }
        Some(b'\r') => {
            let have = bytes.len().min(V2_SIGNATURE.len());
            if bytes.get(..have) != V2_SIGNATURE.get(..have) {
                return Proxy::Invalid;
            }
            if let Some(fixed) = bytes.get(..16)
                && 16 + usize::from(u16::from_be_bytes([fixed[14], fixed[15]])) > PROXY_V2_LEN_MAX
            {
                return Proxy::Invalid;
            }
            match ppp::v2::Header::try_from(bytes) {
                Ok(header) => {
                    let source = match (header.command, header.addresses) {
                        (ppp::v2::Command::Local, _) | (_, ppp::v2::Addresses::Unspecified) => None,
                        (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => {
                            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                        }
                        (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => {
                            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                        }
                        // A UNIX socket address names no client uturn could answer.
                        (ppp::v2::Command::Proxy, ppp::v2::Addresses::Unix(_)) => {
                            return Proxy::Invalid;
                        }
                    };
                    Proxy::Header {
                        len: header.len(),
                        source,
                    }
                }
                Err(error) if error.is_incomplete() => Proxy::NeedMore,
                Err(_) => Proxy::Invalid,
            }
        }
        Some(_) => Proxy::Invalid,
    }
}

/// A PROXY v2 header (command PROXY, TCP) saying `client` connected to `local`, for the web
/// service behind a forwarding `auto` listener. Mixed families name the client as IPv6
/// (an IPv4 address mapped), which is what the specification asks of such a sender.
pub(crate) fn proxy_v2_header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, PROXY
    match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&c.ip().octets());
            out.extend_from_slice(&l.ip().octets());
            out.extend_from_slice(&c.port().to_be_bytes());
            out.extend_from_slice(&l.port().to_be_bytes());
        }
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(client).octets());
            out.extend_from_slice(&v6(local).octets());
            out.extend_from_slice(&client.port().to_be_bytes());
            out.extend_from_slice(&local.port().to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS record holding a ClientHello with the given ALPN names and SNI.
    pub(crate) fn client_hello(alpn: &[&str], sni: Option<&str>) -> Vec<u8> {
        let mut ext = Vec::new();
        if let Some(name) = sni {
            let mut list = vec![0u8];
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name.as_bytes());
            ext.extend_from_slice(&EXT_SERVER_NAME.to_be_bytes());
            ext.extend_from_slice(&((list.len() + 2) as u16).to_be_bytes());
            ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
            ext.extend_from_slice(&list);
        }
        if !alpn.is_empty() {
            let mut list = Vec::new();
            for name in alpn {
                list.push(name.len() as u8);
                list.extend_from_slice(name.as_bytes());
            }
            ext.extend_from_slice(&EXT_ALPN.to_be_bytes());
            ext.extend_from_slice(&((list.len() + 2) as u16).to_be_bytes());
            ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
            ext.extend_from_slice(&list);
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut handshake = vec![1];
        handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&body);
        let mut record = vec![0x16, 3, 1];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    #[test]
    fn a_browser_hello_offering_h2_and_http_1_1_is_forwarded_to_the_web_service() {
        let hello = client_hello(&["h2", "http/1.1"], Some("meet.example.com"));
        assert_eq!(classify(&hello, &[]), Hello::Route(Route::Forward));
    }

    #[test]
    fn alpn_stun_turn_of_rfc_7443_is_turn_whatever_else_is_offered() {
        let hello = client_hello(&["h2", "stun.turn"], Some("meet.example.com"));
        assert_eq!(classify(&hello, &[]), Hello::Route(Route::Turn));
    }

    #[test]
    fn libwebrtc_turn_tls_with_sni_and_no_alpn_is_turn() {
        let hello = client_hello(&[], Some("turn.example.com"));
        assert_eq!(classify(&hello, &[]), Hello::Route(Route::Turn));
        assert_eq!(
            classify(&client_hello(&[], None), &[]),
            Hello::Route(Route::Turn)
        );
    }

    #[test]
    fn an_sni_listed_in_turn_server_names_is_turn_even_with_http_alpn() {
        let names = vec!["turn.example.com".to_owned()];
        let hello = client_hello(&["http/1.1"], Some("TURN.example.com"));
        assert_eq!(classify(&hello, &names), Hello::Route(Route::Turn));
        let web = client_hello(&["http/1.1"], Some("meet.example.com"));
        assert_eq!(classify(&web, &names), Hello::Route(Route::Forward));
    }

    #[test]
    fn a_hello_cut_anywhere_waits_for_more_and_garbage_is_left_to_rustls() {
        let hello = client_hello(&["h2"], Some("meet.example.com"));
        for cut in 0..hello.len() {
            assert_eq!(
                classify(&hello[..cut], &[]),
                Hello::NeedMore,
                "cut at {cut}"
            );
        }
        let mut broken = hello.clone();
        broken[6] = 0xff; // handshake length beyond the record
        assert_eq!(classify(&broken, &[]), Hello::Route(Route::Turn));
        assert_eq!(
            classify(&[0x16, 3, 1, 0xff, 0xff], &[]),
            Hello::Route(Route::Turn),
            "a record longer than TLS allows is not waited for"
        );
    }

    #[test]
    fn proxy_v1_headers_give_the_client_address_and_their_length() {
        let header = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\nrest";
        assert_eq!(
            parse_proxy(header),
            Proxy::Header {
                len: header.len() - 4,
                source: Some("192.0.2.7:40000".parse().expect("literal"))
            }
        );
        let v6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 5000 443\r\n";
        assert!(matches!(
            parse_proxy(v6),
            Proxy::Header { source: Some(s), .. } if s == "[2001:db8::7]:5000".parse().expect("literal")
        ));
        assert_eq!(
            parse_proxy(b"PROXY UNKNOWN\r\n"),
            Proxy::Header {
                len: 15,
                source: None
            }
        );
        assert_eq!(parse_proxy(b"PROXY TCP4 192.0"), Proxy::NeedMore);
        assert_eq!(parse_proxy(b"PRXY"), Proxy::Invalid);
        assert_eq!(
            parse_proxy(b"PROXY TCP4 300.0.0.1 1.1.1.1 1 2\r\n"),
            Proxy::Invalid
        );
        assert_eq!(parse_proxy(&[b'P'; 200]), Proxy::Invalid, "bounded at 107");
    }

    #[test]
    fn proxy_v2_headers_round_trip_through_our_own_writer() {
        let client: SocketAddr = "127.0.0.7:5555".parse().expect("literal");
        let local: SocketAddr = "127.0.0.1:443".parse().expect("literal");
        let header = proxy_v2_header(client, local);
        assert_eq!(
            parse_proxy(&header),
            Proxy::Header {
                len: header.len(),
                source: Some(client)
            }
        );
        for cut in 0..header.len() {
            assert_eq!(parse_proxy(&header[..cut]), Proxy::NeedMore, "cut at {cut}");
        }
        let v6: SocketAddr = "[2001:db8::9]:7".parse().expect("literal");
        let header = proxy_v2_header(v6, local);
        assert!(matches!(parse_proxy(&header), Proxy::Header { source: Some(s), .. } if s == v6));
        // LOCAL command (a health check): the peer stands.
        let mut local_cmd = proxy_v2_header(client, local);
        local_cmd[12] = 0x20;
        assert!(matches!(
            parse_proxy(&local_cmd),
            Proxy::Header { source: None, .. }
        ));
        let mut too_long = proxy_v2_header(client, local);
        too_long[14..16].copy_from_slice(&4000u16.to_be_bytes());
        assert_eq!(parse_proxy(&too_long), Proxy::Invalid);
        let mut version1 = proxy_v2_header(client, local);
        version1[12] = 0x11;
        assert_eq!(parse_proxy(&version1), Proxy::Invalid);
    }

    #[test]
    fn trusted_sources_match_ipv4_mapped_peers_too() {
        let edge = StreamEdge {
            proxy_protocol_from: vec!["10.0.0.0/8".parse().expect("literal")],
            ..StreamEdge::default()
        };
        assert!(edge.trusts("10.1.2.3".parse().expect("literal")));
        assert!(edge.trusts("::ffff:10.1.2.3".parse().expect("literal")));
        assert!(!edge.trusts("192.0.2.1".parse().expect("literal")));
        assert!(!StreamEdge::default().trusts("10.1.2.3".parse().expect("literal")));
    }
}
