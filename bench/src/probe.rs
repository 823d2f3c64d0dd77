//! `probe`: checks a live TURN server the way a conferencing back end checks its TURN servers
//! (round-trip time, mapped address), step by step, and says in plain words what a failure
//! means.
//!
//! Steps: Binding → Allocate (expects 401 with REALM and NONCE) → Allocate with credentials →
//! CreatePermission → ChannelBind → a round trip client → relay → local peer → relay → client
//! → Refresh 0 (delete).

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use serde::Serialize;
use uturn_proto::ChannelNumber;

use crate::tls::TlsTrust;
use crate::turn::{TurnClient, TurnError, error_code};

/// Transport of a TURN URI (RFC 7065).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UriTransport {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
    /// TLS over TCP (`turns:` or `transport=tls`).
    Tls,
}

/// A parsed `turn:` / `turns:` URI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TurnUri {
    /// Host name or address (brackets removed).
    pub host: String,
    /// Port (3478, or 5349 for TLS, when absent).
    pub port: u16,
    /// Transport.
    pub transport: UriTransport,
}

/// Parses `turn:HOST[:PORT][?transport=udp|tcp|tls]` and `turns:...` (RFC 7065 §3).
pub fn parse_turn_uri(uri: &str) -> Result<TurnUri, String> {
    let (secure, rest) = if let Some(r) = uri.strip_prefix("turns:") {
        (true, r)
    } else if let Some(r) = uri.strip_prefix("turn:") {
        (false, r)
    } else {
        return Err(format!("{uri:?} does not start with turn: or turns:"));
    };
    let (hostport, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut transport = if secure {
        UriTransport::Tls
    } else {
        UriTransport::Udp
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("transport", "udp")) if !secure => transport = UriTransport::Udp,
            Some(("transport", "tcp")) => {
                transport = if secure {
                    UriTransport::Tls
                } else {
                    UriTransport::Tcp
                };
            }
            Some(("transport", "tls")) => transport = UriTransport::Tls,
            _ => return Err(format!("unsupported URI parameter {pair:?}")),
        }
    }
    let default_port = if transport == UriTransport::Tls {
        5349
    } else {
        3478
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("unclosed [ in host")?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("bad port {p:?}"))?,
            None if after.is_empty() => default_port,
            None => return Err(format!("unexpected {after:?} after host")),
        };
        (h.to_owned(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h.to_owned(),
                p.parse().map_err(|_| format!("bad port {p:?}"))?,
            ),
            None => (hostport.to_owned(), default_port),
        }
    };
    if host.is_empty() {
        return Err("empty host".to_owned());
    }
    Ok(TurnUri {
        host,
        port,
        transport,
    })
}

/// The result of one step.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeStep {
    /// Step name.
    pub name: &'static str,
    /// Whether it passed.
    pub ok: bool,
    /// What happened.
    pub detail: String,
    /// For a failure: what it most likely means.
    pub diagnosis: Option<String>,
    /// Round-trip time of the exchange, ms.
    pub rtt_ms: Option<f64>,
}

/// The whole probe.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// The server's address.
    pub server: Option<String>,
    /// Every step run, in order (the probe stops at the first failure that blocks the rest).
    pub steps: Vec<ProbeStep>,
    /// XOR-MAPPED-ADDRESS.
    pub mapped: Option<String>,
    /// XOR-RELAYED-ADDRESS.
    pub relayed: Option<String>,
    /// Round trip through the relay, ms.
    pub relay_rtt_ms: Option<f64>,
}

impl ProbeReport {
    /// Whether every step passed.
    pub fn passed(&self) -> bool {
        !self.steps.is_empty() && self.steps.iter().all(|s| s.ok)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs the probe; `realm` is the realm the operator expects, if any; `trust` says which
/// certificates a TLS server may present.
pub fn run(
    uri: &TurnUri,
    user: &str,
    pass: &str,
    realm: Option<&str>,
    timeout: Duration,
    trust: &TlsTrust,
) -> ProbeReport {
    let mut report = ProbeReport {
        server: None,
        steps: Vec::new(),
        mapped: None,
        relayed: None,
        relay_rtt_ms: None,
    };
    let step = |report: &mut ProbeReport,
                name,
                ok,
                detail: String,
                diagnosis: Option<String>,
                rtt: Option<Duration>| {
        report.steps.push(ProbeStep {
            name,
            ok,
            detail,
            diagnosis,
            rtt_ms: rtt.map(ms),
        });
        ok
    };
    let Ok(Some(server)) = (uri.host.as_str(), uri.port)
        .to_socket_addrs()
        .map(|mut a| a.next())
    else {
        step(
            &mut report,
            "Resolve",
            false,
            format!("cannot resolve {:?}", uri.host),
            Some("check the host name in the URI".to_owned()),
            None,
        );
        return report;
    };
    report.server = Some(server.to_string());
    let transport_name = match uri.transport {
        UriTransport::Udp => "udp",
        UriTransport::Tcp => "tcp",
        UriTransport::Tls => "tls",
    };
    let client = match uri.transport {
        UriTransport::Udp => UdpSocket::bind(if server.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        })
        .map_err(TurnError::from)
        .and_then(|s| TurnClient::udp(s, server, user, pass)),
        UriTransport::Tcp => TurnClient::tcp(server, user, pass, timeout),
        UriTransport::Tls => crate::tls::client_config(trust)
            .map_err(|e| TurnError::Tls(e.to_string()))
            .and_then(|config| TurnClient::tls(server, &uri.host, config, user, pass, timeout)),
    };
    let mut client = match client {
        Ok(c) => c,
        Err(e) => {
            let diagnosis = match &e {
                TurnError::Tls(what)
                    if what.contains("certificate") || what.contains("Certificate") =>
                {
                    format!(
                        "the server's certificate is not trusted for {:?}: pass --ca-file with its CA, or --insecure to check TURN without checking identity",
                        uri.host
                    )
                }
                TurnError::Tls(_) => format!(
                    "the TLS handshake with {server} failed: not a TLS listener, or no protocol in common"
                ),
                TurnError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                    format!(
                        "nothing listens on {server} over {transport_name}: wrong port, or the listener is off"
                    )
                }
                _ => format!(
                    "no {transport_name} connection to {server}: server down, or a firewall drops it"
                ),
            };
            step(
                &mut report,
                "Connect",
                false,
                e.to_string(),
                Some(diagnosis),
                None,
            );
            return report;
        }
    };
    client.timeout = timeout;

    // 1. Binding.
    let start = Instant::now();
    match client.binding() {
        Ok(mapped) => {
            report.mapped = mapped.map(|m| m.to_string());
            let detail = format!(
                "mapped address {}",
                mapped.map_or_else(|| "absent".to_owned(), |m| m.to_string())
            );
            step(
                &mut report,
                "Binding",
                true,
                detail,
                None,
                Some(start.elapsed()),
            );
        }
        Err(e) => {
            let diagnosis = match &e {
                TurnError::Timeout { .. } => format!(
                    "no answer from {server} over {transport_name}: the server is down, listens on another port, or a firewall drops STUN"
                ),
                TurnError::Rejected { code, .. } => format!(
                    "the server refused a plain Binding ({code}); some servers require authentication for STUN, the TURN steps below may still work"
                ),
                _ => "the server answered something that is not STUN".to_owned(),
            };
            // A refused Binding does not stop the TURN steps: only a silent server does.
            let fatal = matches!(e, TurnError::Timeout { .. } | TurnError::Io(_));
            step(
                &mut report,
                "Binding",
                false,
                e.to_string(),
                Some(diagnosis),
                None,
            );
            if fatal {
                return report;
            }
        }
    }

    // 2. Allocate without credentials: the server must challenge.
    let start = Instant::now();
    let challenge = client.allocate_unauthenticated();
    let rtt = start.elapsed();
    match &challenge {
        Ok(r) => {
            let msg = r.message();
            let code = msg.as_ref().and_then(error_code);
            let server_realm = client.realm.clone();
            match (code, server_realm) {
                (Some(401), Some(server_realm)) => {
                    if let Some(expected) = realm.filter(|r| *r != server_realm) {
                        step(
                            &mut report,
                            "Allocate (challenge)",
                            false,
                            format!("401 with realm {server_realm:?}"),
                            Some(format!(
                                "realm mismatch: the server's realm is {server_realm:?}, you expected {expected:?}; the key (MD5 of user:realm:password) will not match"
                            )),
                            Some(rtt),
                        );
                        return report;
                    }
                    step(
                        &mut report,
                        "Allocate (challenge)",
                        true,
                        format!("401 with realm {server_realm:?} and a nonce"),
                        None,
                        Some(rtt),
                    );
                }
                (Some(code), _) => {
                    step(
                        &mut report,
                        "Allocate (challenge)",
                        false,
                        format!("answered {code} instead of 401 with REALM and NONCE"),
                        Some(describe_code(code).to_owned()),
                        Some(rtt),
                    );
                    return report;
                }
                (None, _) => {
                    step(
                        &mut report,
                        "Allocate (challenge)",
                        false,
                        "allocated without asking for credentials".to_owned(),
                        Some(
                            "the server runs without authentication: anyone can relay through it"
                                .to_owned(),
                        ),
                        Some(rtt),
                    );
                }
            }
        }
        Err(e) => {
            step(
                &mut report,
                "Allocate (challenge)",
                false,
                e.to_string(),
                Some(format!(
                    "Binding worked but Allocate got no answer: the server may not be a TURN server, or TURN is disabled on {server}"
                )),
                None,
            );
            return report;
        }
    }

    // 3. Allocate with credentials.
    let start = Instant::now();
    let allocation = match client.allocate() {
        Ok(a) => {
            report.relayed = Some(a.relayed.to_string());
            if report.mapped.is_none() {
                report.mapped = a.mapped.map(|m| m.to_string());
            }
            step(
                &mut report,
                "Allocate (authenticated)",
                true,
                format!(
                    "relayed address {}, lifetime {} s",
                    a.relayed,
                    a.lifetime_secs
                        .map_or_else(|| "?".to_owned(), |l| l.to_string())
                ),
                None,
                Some(start.elapsed()),
            );
            a
        }
        Err(e) => {
            let diagnosis = match &e {
                TurnError::Rejected { code: 401, reason, .. } => {
                    let hint = reason.to_ascii_lowercase();
                    if hint.contains("user") && !hint.contains("password") {
                        format!("unknown user: the server does not know {user:?} in its realm (reason: {reason:?})")
                    } else if hint.contains("password") || hint.contains("integrity") {
                        format!("wrong password for {user:?} (reason: {reason:?})")
                    } else {
                        format!(
                            "credentials rejected: either the server does not know user {user:?} in realm {:?} or the password is wrong (a 401 does not say which; reason: {reason:?}); check the user table on the server",
                            client.realm.clone().unwrap_or_default()
                        )
                    }
                }
                TurnError::Rejected { code: 431, .. } => format!("wrong password for {user:?}: the server knows the user but the MESSAGE-INTEGRITY does not verify"),
                TurnError::Rejected { code, .. } => describe_code(*code).to_owned(),
                TurnError::Timeout { .. } => "the authenticated Allocate got no answer: the server dropped it (rate limit, or it could not bind a relay port)".to_owned(),
                TurnError::Credentials(_) => "the user name or password has characters that OpaqueString refuses".to_owned(),
                _ => "unexpected answer".to_owned(),
            };
            step(
                &mut report,
                "Allocate (authenticated)",
                false,
                e.to_string(),
                Some(diagnosis),
                None,
            );
            return report;
        }
    };

    // 4. The local peer: a UDP socket on the address the client uses.
    let local_ip = client.local_addr().map(|a| a.ip()).ok();
    let local_ip = match (
        local_ip,
        report
            .mapped
            .as_deref()
            .and_then(|m| m.parse::<SocketAddr>().ok()),
    ) {
        (Some(ip), _) if !ip.is_unspecified() => ip,
        (_, Some(mapped)) => mapped.ip(),
        _ => crate::load::local_ip_for(server),
    };
    let peer = match UdpSocket::bind(SocketAddr::new(local_ip, 0))
        .and_then(|s| s.local_addr().map(|a| (s, a)))
    {
        Ok(p) => p,
        Err(e) => {
            step(
                &mut report,
                "CreatePermission",
                false,
                format!("cannot bind a local peer socket: {e}"),
                None,
                None,
            );
            return report;
        }
    };
    let (peer_socket, peer_addr) = peer;

    let start = Instant::now();
    match client.create_permission(peer_addr) {
        Ok(()) => step(
            &mut report,
            "CreatePermission",
            true,
            format!("peer {}", peer_addr.ip()),
            None,
            Some(start.elapsed()),
        ),
        Err(e) => {
            let diagnosis = match &e {
                TurnError::Rejected { code: 403, .. } => format!(
                    "the server's peer policy forbids {} (loopback and private ranges are often denied by default)",
                    peer_addr.ip()
                ),
                TurnError::Rejected { code, .. } => describe_code(*code).to_owned(),
                _ => "no usable answer".to_owned(),
            };
            step(
                &mut report,
                "CreatePermission",
                false,
                e.to_string(),
                Some(diagnosis),
                None,
            );
            return report;
        }
    };

    let channel = ChannelNumber::MIN;
    let start = Instant::now();
    let bound = match client.channel_bind(channel, peer_addr) {
        Ok(()) => step(
            &mut report,
            "ChannelBind",
            true,
            format!("channel {channel} → {peer_addr}"),
            None,
            Some(start.elapsed()),
        ),
        Err(e) => {
            let diagnosis = match &e {
                TurnError::Rejected { code, .. } => describe_code(*code).to_owned(),
                _ => "no usable answer".to_owned(),
            };
            step(
                &mut report,
                "ChannelBind",
                false,
                e.to_string(),
                Some(diagnosis),
                None,
            )
        }
    };

    // 5. Round trip through the relay.
    if bound {
        let payload = b"uturn-bench probe round trip";
        let start = Instant::now();
        let outcome = relay_round_trip(
            &mut client,
            &peer_socket,
            channel,
            payload,
            allocation.relayed,
            timeout,
        );
        match outcome {
            Ok(()) => {
                let rtt = start.elapsed();
                report.relay_rtt_ms = Some(ms(rtt));
                step(
                    &mut report,
                    "Relay round trip",
                    true,
                    format!("client → {} → peer {peer_addr} → back", allocation.relayed),
                    None,
                    Some(rtt),
                );
            }
            Err((detail, diagnosis)) => {
                step(
                    &mut report,
                    "Relay round trip",
                    false,
                    detail,
                    Some(diagnosis),
                    None,
                );
            }
        }
    }

    let start = Instant::now();
    match client.delete() {
        Ok(()) => step(
            &mut report,
            "Refresh (delete)",
            true,
            "allocation deleted".to_owned(),
            None,
            Some(start.elapsed()),
        ),
        Err(e) => step(
            &mut report,
            "Refresh (delete)",
            false,
            e.to_string(),
            Some("the allocation will expire by itself".to_owned()),
            None,
        ),
    };
    report
}

fn relay_round_trip(
    client: &mut TurnClient,
    peer: &UdpSocket,
    channel: ChannelNumber,
    payload: &[u8],
    relayed: SocketAddr,
    timeout: Duration,
) -> Result<(), (String, String)> {
    let to_s = |e: TurnError| (e.to_string(), "socket error".to_owned());
    peer.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| (e.to_string(), "socket error".to_owned()))?;
    let deadline = crate::instant_after(Instant::now(), timeout);
    let mut buf = [0u8; 2048];
    // Up to three sends: UDP may lose one.
    let mut from_relay = None;
    for _ in 0..3 {
        client.send_channel_data(channel, payload).map_err(to_s)?;
        let attempt_end = crate::instant_after(Instant::now(), timeout / 3).min(deadline);
        while Instant::now() < attempt_end {
            if let Ok((n, from)) = peer.recv_from(&mut buf) {
                if &buf[..n] == payload {
                    from_relay = Some(from);
                    break;
                }
            }
        }
        if from_relay.is_some() {
            break;
        }
    }
    let Some(from) = from_relay else {
        return Err((
            format!("the peer received nothing from relay address {relayed}"),
            format!(
                "the relay accepted the channel but nothing reached the peer: the server cannot send from its relay address {relayed} to this machine (a firewall on the relay port range, or a relay address that is not routable)"
            ),
        ));
    };
    if from.ip() != relayed.ip() {
        // Behind a NAT or with an advertised external address, the source differs: not a failure.
    }
    for _ in 0..3 {
        peer.send_to(payload, from)
            .map_err(|e| (e.to_string(), "socket error".to_owned()))?;
        let attempt_end = crate::instant_after(Instant::now(), timeout / 3)
            .min(crate::instant_after(deadline, timeout));
        while let Some(p) = client.recv_relayed(attempt_end).map_err(to_s)? {
            if p == payload {
                return Ok(());
            }
        }
    }
    Err((
        format!("the peer's answer to {from} never came back"),
        format!(
            "the relay's outbound leg works but nothing returns: no answer from the relay port {relayed} to the peer, which points at a firewall blocking inbound traffic on the relay port range"
        ),
    ))
}

/// What a TURN error code most likely means for an operator.
pub fn describe_code(code: u16) -> &'static str {
    match code {
        400 => "bad request: the server did not understand the request (protocol mismatch)",
        401 => "unauthorized: credentials missing or rejected",
        403 => "forbidden: the server's policy refuses this (peer address or user)",
        420 => "unknown attribute: the server lacks a feature the probe uses",
        431 => "integrity check failure: wrong password",
        437 => {
            "allocation mismatch: an allocation already exists on this 5-tuple (retry from another port)"
        }
        438 => "stale nonce: the server's nonces expire too fast",
        440 => {
            "address family not supported: the server has no relay address of the family asked for \
             (over IPv6 the probe asks for an IPv6 relay): give the server one, or probe over IPv4"
        }
        443 => "peer address family mismatch: the relay and the peer are of different IP families",
        441 => "wrong credentials for this allocation",
        442 => "unsupported transport protocol",
        486 => "allocation quota reached for this user",
        500 => "server error",
        508 => "insufficient capacity: the server has no free relay port",
        _ => "unexpected error code",
    }
}

/// Prints the report for a person.
pub fn render(report: &ProbeReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if let Some(s) = &report.server {
        let _ = writeln!(out, "server {s}");
    }
    for s in &report.steps {
        let rtt = s
            .rtt_ms
            .map_or_else(String::new, |r| format!(" ({r:.2} ms)"));
        let _ = writeln!(
            out,
            "[{}] {:<24} {}{}",
            if s.ok { " OK " } else { "FAIL" },
            s.name,
            s.detail,
            rtt
        );
        if let Some(d) = &s.diagnosis {
            let _ = writeln!(out, "       → {d}");
        }
    }
    let _ = writeln!(
        out,
        "mapped {} · relayed {} · relay round trip {}",
        report.mapped.as_deref().unwrap_or("–"),
        report.relayed.as_deref().unwrap_or("–"),
        report
            .relay_rtt_ms
            .map_or_else(|| "–".to_owned(), |r| format!("{r:.2} ms"))
    );
    let _ = writeln!(out, "{}", if report.passed() { "PASS" } else { "FAIL" });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_uris_parse_with_defaults() {
        let u = parse_turn_uri("turn:127.0.0.1:3479?transport=tcp").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.transport),
            ("127.0.0.1", 3479, UriTransport::Tcp)
        );
        let u = parse_turn_uri("turn:example.org").unwrap();
        assert_eq!((u.port, u.transport), (3478, UriTransport::Udp));
        let u = parse_turn_uri("turns:[::1]").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.transport),
            ("::1", 5349, UriTransport::Tls)
        );
        let u = parse_turn_uri("turn:[::1]:5000?transport=udp").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 5000));
    }

    #[test]
    fn bad_turn_uris_are_refused() {
        for bad in [
            "stun:x",
            "turn:",
            "turn:h:notaport",
            "turn:h?transport=sctp",
            "turn:[::1",
        ] {
            assert!(parse_turn_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_tls_probe_of_a_listener_that_is_not_tls_says_so() {
        use std::io::Write as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let _ = s.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\n");
            }
        });
        let uri = parse_turn_uri(&format!("turns:127.0.0.1:{port}")).unwrap();
        let report = run(
            &uri,
            "u",
            "p",
            None,
            Duration::from_secs(2),
            &TlsTrust::WebPki,
        );
        server.join().unwrap();
        assert!(!report.passed());
        let connect = &report.steps[0];
        assert_eq!(connect.name, "Connect");
        assert!(
            connect.diagnosis.as_deref().unwrap().contains("TLS"),
            "{connect:?}"
        );
    }

    #[test]
    fn a_silent_server_is_diagnosed_as_unreachable() {
        // A bound socket that never answers.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let uri = parse_turn_uri(&format!("turn:127.0.0.1:{port}")).unwrap();
        let report = run(
            &uri,
            "u",
            "p",
            None,
            Duration::from_millis(300),
            &TlsTrust::WebPki,
        );
        assert!(!report.passed());
        let binding = &report.steps[0];
        assert_eq!(binding.name, "Binding");
        assert!(binding.diagnosis.as_deref().unwrap().contains("no answer"));
        assert!(render(&report).contains("FAIL"));
    }
}
