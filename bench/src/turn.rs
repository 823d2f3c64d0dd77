//! A blocking TURN client (RFC 8656) for setup, `alloc` and `probe`: every exchange is a
//! request with retransmissions and a deadline, built and parsed with `uturn-proto`.
//! The traffic itself does not go through here but through the batched event loop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use thiserror::Error;
use uturn_proto::{
    AddressFamily, Attribute, ChannelData, ChannelNumber, Class, Message, MessageBuilder, Method,
    PacketKind, Protocol, StreamFramer, TransactionId, classify, long_term_key_md5,
};

/// What went wrong in one exchange.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TurnError {
    /// No answer before the deadline (after retransmissions over UDP).
    #[error("no answer from {server} within {waited:?}")]
    Timeout {
        /// The server.
        server: SocketAddr,
        /// How long the client waited.
        waited: Duration,
    },
    /// The server answered with an error response.
    #[error("{method} answered {code} {reason:?}")]
    Rejected {
        /// The request's method name.
        method: &'static str,
        /// ERROR-CODE.
        code: u16,
        /// Its reason phrase.
        reason: String,
        /// REALM of the answer, if any.
        realm: Option<String>,
    },
    /// The answer could not be used (missing attribute, failed integrity, ...).
    #[error("unusable answer to {method}: {what}")]
    Malformed {
        /// The request's method name.
        method: &'static str,
        /// What was wrong.
        what: String,
    },
    /// The credentials cannot be turned into a key (not an OpaqueString).
    #[error("invalid credentials: {0}")]
    Credentials(String),
    /// The TLS connection could not be set up.
    #[error("{0}")]
    Tls(String),
    /// A socket error.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

/// An owned answer.
#[derive(Debug, Clone)]
pub struct Response {
    bytes: Vec<u8>,
}

impl Response {
    /// The parsed message (parsed when received, so this cannot fail).
    pub fn message(&self) -> Option<Message<'_>> {
        Message::parse(&self.bytes).ok()
    }
}

/// The result of a successful Allocate.
#[derive(Debug, Clone, Copy)]
pub struct Allocation {
    /// XOR-RELAYED-ADDRESS.
    pub relayed: SocketAddr,
    /// XOR-MAPPED-ADDRESS: the client as the server saw it.
    pub mapped: Option<SocketAddr>,
    /// LIFETIME granted.
    pub lifetime_secs: Option<u32>,
}

enum Link {
    Udp(UdpSocket),
    Tcp(TcpStream, StreamFramer),
    Tls(Box<crate::tls::TlsStream>, StreamFramer),
}

/// A TURN client with long-term credentials on one 5-tuple.
pub struct TurnClient {
    link: Link,
    server: SocketAddr,
    username: String,
    password: String,
    /// REALM learnt from the first 401.
    pub realm: Option<String>,
    nonce: Option<String>,
    key: Option<[u8; 16]>,
    next_tid: u64,
    /// Deadline for one request, retransmissions included.
    pub timeout: Duration,
    /// Relayed data that arrived while waiting for a response (ChannelData payloads and Data
    /// indication payloads), bounded.
    pending: Vec<Vec<u8>>,
}

/// Stream framer capacity: the largest ChannelData (64 KiB payload, 4-byte header) fits.
pub const STREAM_FRAMER_LEN: usize = 65_536 + 4;
/// Relayed data kept while waiting for a response, at most.
const PENDING_MAX: usize = 64;

impl TurnClient {
    /// A UDP client on an existing socket (connected to `server` here).
    pub fn udp(
        socket: UdpSocket,
        server: SocketAddr,
        user: &str,
        pass: &str,
    ) -> Result<Self, TurnError> {
        socket.connect(server)?;
        Ok(Self::with_link(Link::Udp(socket), server, user, pass))
    }

    /// A TCP client (RFC 8656 §3.1: TURN over TCP, ChannelData padded).
    pub fn tcp(
        server: SocketAddr,
        user: &str,
        pass: &str,
        timeout: Duration,
    ) -> Result<Self, TurnError> {
        let stream = TcpStream::connect_timeout(&server, timeout)?;
        Self::over_tcp(stream, server, user, pass)
    }

    /// A TCP client on a connection already made to `server` (the load generator chooses the
    /// local address).
    pub fn over_tcp(
        stream: TcpStream,
        server: SocketAddr,
        user: &str,
        pass: &str,
    ) -> Result<Self, TurnError> {
        stream.set_nodelay(true)?;
        Ok(Self::with_link(
            Link::Tcp(stream, StreamFramer::new(STREAM_FRAMER_LEN)),
            server,
            user,
            pass,
        ))
    }

    /// A TLS client (RFC 8656 §3.1: TURN over TLS over TCP); `host` is the name the
    /// certificate must carry.
    pub fn tls(
        server: SocketAddr,
        host: &str,
        config: std::sync::Arc<rustls::ClientConfig>,
        user: &str,
        pass: &str,
        timeout: Duration,
    ) -> Result<Self, TurnError> {
        let tcp = TcpStream::connect_timeout(&server, timeout)?;
        Self::over_tls(tcp, server, host, config, user, pass, timeout)
    }

    /// A TLS client on a TCP connection already made to `server`: the handshake runs here.
    pub fn over_tls(
        tcp: TcpStream,
        server: SocketAddr,
        host: &str,
        config: std::sync::Arc<rustls::ClientConfig>,
        user: &str,
        pass: &str,
        timeout: Duration,
    ) -> Result<Self, TurnError> {
        tcp.set_nodelay(true)?;
        let stream = crate::tls::connect(tcp, host, config, timeout)
            .map_err(|e| TurnError::Tls(e.to_string()))?;
        Ok(Self::with_link(
            Link::Tls(Box::new(stream), StreamFramer::new(STREAM_FRAMER_LEN)),
            server,
            user,
            pass,
        ))
    }

    fn with_link(link: Link, server: SocketAddr, user: &str, pass: &str) -> Self {
        Self {
            link,
            server,
            username: user.to_owned(),
            password: pass.to_owned(),
            realm: None,
            nonce: None,
            key: None,
            next_tid: u64::from(std::process::id()) << 32,
            timeout: Duration::from_secs(3),
            pending: Vec::new(),
        }
    }

    /// REALM and NONCE in use, to resume on the same 5-tuple later.
    pub fn credentials(&self) -> Option<(String, String)> {
        Some((self.realm.clone()?, self.nonce.clone()?))
    }

    /// Resumes with a REALM and NONCE learnt earlier on this 5-tuple (a stale nonce is
    /// answered 438 and renewed by [`TurnClient::request`]).
    pub fn set_credentials(&mut self, realm: String, nonce: String) -> Result<(), TurnError> {
        self.key = Some(
            long_term_key_md5(&self.username, &realm, &self.password)
                .map_err(|e| TurnError::Credentials(e.to_string()))?,
        );
        self.realm = Some(realm);
        self.nonce = Some(nonce);
        Ok(())
    }

    /// Gives the UDP socket back (for the traffic loop); `None` over TCP.
    pub fn into_udp_socket(self) -> Option<UdpSocket> {
        match self.link {
            Link::Udp(s) => Some(s),
            Link::Tcp(..) | Link::Tls(..) => None,
        }
    }

    /// Gives a stream client's connection back (for the traffic loop): the TCP socket, the TLS
    /// session over it if any, and the framer with whatever it already buffered; `None` over UDP.
    pub fn into_stream(
        self,
    ) -> Option<(TcpStream, Option<rustls::ClientConnection>, StreamFramer)> {
        match self.link {
            Link::Udp(_) => None,
            Link::Tcp(s, framer) => Some((s, None, framer)),
            Link::Tls(s, framer) => {
                let rustls::StreamOwned { conn, sock } = *s;
                Some((sock, Some(conn), framer))
            }
        }
    }

    /// The client's local address.
    pub fn local_addr(&self) -> Result<SocketAddr, TurnError> {
        Ok(match &self.link {
            Link::Udp(s) => s.local_addr()?,
            Link::Tcp(s, _) => s.local_addr()?,
            Link::Tls(s, _) => s.sock.local_addr()?,
        })
    }

    fn fresh_tid(&mut self) -> TransactionId {
        self.next_tid = self.next_tid.wrapping_add(1);
        let mut id = [0u8; 12];
        id[..8].copy_from_slice(&self.next_tid.to_be_bytes());
        id[8..].copy_from_slice(b"utbn");
        TransactionId(id)
    }

    /// Binding request without credentials; returns XOR-MAPPED-ADDRESS.
    pub fn binding(&mut self) -> Result<Option<SocketAddr>, TurnError> {
        let tid = self.fresh_tid();
        let bytes = build_request(Method::BINDING, tid, &[], None)?;
        let r = self.transact(Method::BINDING, tid, &bytes)?;
        let msg = r
            .message()
            .ok_or_else(|| malformed(Method::BINDING, "unparsable"))?;
        check_success(Method::BINDING, &msg)?;
        Ok(msg.xor_mapped_address().ok().flatten())
    }

    /// Sends a request, authenticated once realm and nonce are known, answering a 401 or 438
    /// challenge once; returns the success response or the error.
    pub fn request(
        &mut self,
        method: Method,
        attrs: &[Attribute<'_>],
    ) -> Result<Response, TurnError> {
        for _ in 0..3 {
            let tid = self.fresh_tid();
            let creds = match (&self.realm, &self.nonce, &self.key) {
                (Some(r), Some(n), Some(k)) => {
                    Some((self.username.as_str(), r.as_str(), n.as_str(), k))
                }
                _ => None,
            };
            let had_key = creds.is_some();
            let bytes = build_request(method, tid, attrs, creds)?;
            let response = self.transact(method, tid, &bytes)?;
            let msg = response
                .message()
                .ok_or_else(|| malformed(method, "unparsable"))?;
            let code = error_code(&msg);
            if code == Some(401) || code == Some(438) {
                let realm = msg.realm().ok().flatten().map(str::to_owned);
                let nonce = msg.nonce().ok().flatten().map(str::to_owned);
                let stale = code == Some(438) || !had_key;
                if stale {
                    if let (Some(realm), Some(nonce)) = (realm, nonce) {
                        let key = long_term_key_md5(&self.username, &realm, &self.password)
                            .map_err(|e| TurnError::Credentials(e.to_string()))?;
                        self.key = Some(key);
                        self.realm = Some(realm);
                        self.nonce = Some(nonce);
                        continue;
                    }
                }
            }
            check_success(method, &msg)?;
            if let Some(key) = &self.key {
                if msg.has_integrity() && msg.verify_integrity(key).is_err() {
                    return Err(malformed(
                        method,
                        "MESSAGE-INTEGRITY of the response does not verify",
                    ));
                }
            }
            return Ok(response);
        }
        Err(malformed(method, "the server kept challenging"))
    }

    /// The first, unauthenticated Allocate: returns the error (expected 401 with REALM and
    /// NONCE) without answering it, for the probe to report.
    pub fn allocate_unauthenticated(&mut self) -> Result<Response, TurnError> {
        let tid = self.fresh_tid();
        let attrs = [Attribute::RequestedTransport(Protocol::UDP)];
        let bytes = build_request(Method::ALLOCATE, tid, &attrs, None)?;
        let response = self.transact(Method::ALLOCATE, tid, &bytes)?;
        if let Some(msg) = response.message() {
            if error_code(&msg) == Some(401) {
                self.realm = msg.realm().ok().flatten().map(str::to_owned);
                self.nonce = msg.nonce().ok().flatten().map(str::to_owned);
                if let Some(realm) = &self.realm {
                    self.key = Some(
                        long_term_key_md5(&self.username, realm, &self.password)
                            .map_err(|e| TurnError::Credentials(e.to_string()))?,
                    );
                }
            }
        }
        Ok(response)
    }

    /// Allocate a UDP relay (the full handshake: 401 challenge, then authenticated).
    pub fn allocate(&mut self) -> Result<Allocation, TurnError> {
        self.allocate_for(None)
    }

    /// [`TurnClient::allocate`] asking for a LIFETIME (the server grants at most its maximum,
    /// and at least its default).
    ///
    /// Over IPv6 it asks for an IPv6 relay (REQUESTED-ADDRESS-FAMILY, RFC 8656 §7.1): without
    /// it a server allocates IPv4, and the peers this harness runs beside the client (on the
    /// server's family) could not be reached from it.
    pub fn allocate_for(&mut self, lifetime_secs: Option<u32>) -> Result<Allocation, TurnError> {
        let mut attrs = Vec::with_capacity(3);
        attrs.push(Attribute::RequestedTransport(Protocol::UDP));
        if self.server.is_ipv6() {
            attrs.push(Attribute::RequestedAddressFamily(AddressFamily::V6));
        }
        if let Some(secs) = lifetime_secs {
            attrs.push(Attribute::Lifetime(secs));
        }
        let r = self.request(Method::ALLOCATE, &attrs)?;
        let msg = r
            .message()
            .ok_or_else(|| malformed(Method::ALLOCATE, "unparsable"))?;
        let relayed = msg
            .xor_relayed_addresses()
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| malformed(Method::ALLOCATE, "no XOR-RELAYED-ADDRESS"))?;
        Ok(Allocation {
            relayed,
            mapped: msg.xor_mapped_address().ok().flatten(),
            lifetime_secs: msg.lifetime().ok().flatten(),
        })
    }

    /// CreatePermission for `peer`'s IP.
    pub fn create_permission(&mut self, peer: SocketAddr) -> Result<(), TurnError> {
        self.request(
            Method::CREATE_PERMISSION,
            &[Attribute::XorPeerAddress(peer)],
        )
        .map(drop)
    }

    /// ChannelBind `channel` to `peer`.
    pub fn channel_bind(
        &mut self,
        channel: ChannelNumber,
        peer: SocketAddr,
    ) -> Result<(), TurnError> {
        self.request(
            Method::CHANNEL_BIND,
            &[
                Attribute::ChannelNumber(channel),
                Attribute::XorPeerAddress(peer),
            ],
        )
        .map(drop)
    }

    /// Refresh with LIFETIME 0: deletes the allocation.
    pub fn delete(&mut self) -> Result<(), TurnError> {
        self.request(Method::REFRESH, &[Attribute::Lifetime(0)])
            .map(drop)
    }

    /// Sends a ChannelData message (padded over TCP).
    pub fn send_channel_data(
        &mut self,
        channel: ChannelNumber,
        payload: &[u8],
    ) -> Result<(), TurnError> {
        let mut buf = vec![0u8; payload.len() + 8];
        let padded = !matches!(self.link, Link::Udp(_));
        let n = uturn_proto::write_channel_data(&mut buf, channel, payload, padded)
            .map_err(|e| malformed(Method::SEND, &format!("{e:?}")))?;
        self.send_bytes(&buf[..n])
    }

    /// The next relayed payload (ChannelData or Data indication) before `deadline`.
    pub fn recv_relayed(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, TurnError> {
        if !self.pending.is_empty() {
            return Ok(Some(self.pending.remove(0)));
        }
        while let Some(frame) = self.recv_frame(deadline)? {
            if let Some(p) = relayed_payload(&frame) {
                return Ok(Some(p.to_vec()));
            }
        }
        Ok(None)
    }

    fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), TurnError> {
        match &mut self.link {
            Link::Udp(s) => {
                s.send(bytes)?;
            }
            Link::Tcp(s, _) => s.write_all(bytes)?,
            Link::Tls(s, _) => {
                s.write_all(bytes)?;
                s.flush()?;
            }
        }
        Ok(())
    }

    fn recv_frame(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, TurnError> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wait = (deadline - now).max(Duration::from_millis(1));
            match &mut self.link {
                Link::Udp(s) => {
                    s.set_read_timeout(Some(wait))?;
                    let mut buf = vec![0u8; 65_536];
                    match s.recv(&mut buf) {
                        Ok(n) => {
                            buf.truncate(n);
                            return Ok(Some(buf));
                        }
                        Err(e) if is_timeout(&e) => return Ok(None),
                        // ICMP port unreachable from an earlier send surfaces here; the
                        // server may still answer a retransmission.
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                            return Ok(None);
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Link::Tcp(s, framer) => {
                    s.set_read_timeout(Some(wait))?;
                    if let Some(frame) = read_frame(s, framer)? {
                        return Ok(Some(frame));
                    }
                }
                Link::Tls(s, framer) => {
                    s.sock.set_read_timeout(Some(wait))?;
                    if let Some(frame) = read_frame(s.as_mut(), framer)? {
                        return Ok(Some(frame));
                    }
                }
            }
        }
    }

    /// Sends `bytes` (retransmitting over UDP: 100 ms, doubling, RFC 8489 §6.2.1 shortened for
    /// loopback) until the response with `tid` arrives or [`TurnClient::timeout`] passes.
    fn transact(
        &mut self,
        method: Method,
        tid: TransactionId,
        bytes: &[u8],
    ) -> Result<Response, TurnError> {
        let start = Instant::now();
        let deadline = crate::instant_after(start, self.timeout);
        let udp = matches!(self.link, Link::Udp(_));
        let mut rto = RTO_FIRST;
        let _ = method;
        loop {
            if Instant::now() >= deadline {
                return Err(TurnError::Timeout {
                    server: self.server,
                    waited: self.timeout,
                });
            }
            self.send_bytes(bytes)?;
            let resend_at = if udp {
                crate::instant_after(Instant::now(), rto).min(deadline)
            } else {
                deadline
            };
            while let Some(frame) = self.recv_frame(resend_at)? {
                if classify(&frame) == PacketKind::Stun {
                    if let Ok(msg) = Message::parse(&frame) {
                        if msg.transaction_id() == tid
                            && matches!(msg.class(), Class::SuccessResponse | Class::ErrorResponse)
                        {
                            return Ok(Response { bytes: frame });
                        }
                    }
                }
                if let Some(p) = relayed_payload(&frame) {
                    if self.pending.len() < PENDING_MAX {
                        self.pending.push(p.to_vec());
                    }
                }
            }
            // A read can end before `resend_at` (an ICMP refusal surfaces at once): wait the
            // timer out, so a refused request is not resent in a tight loop, and the timer
            // doubles once per timeout, not once per refusal.
            let now = Instant::now();
            if now < resend_at {
                std::thread::sleep(resend_at - now);
            }
            rto = rto.saturating_mul(2).min(RTO_MAX);
        }
    }
}

/// First retransmission timeout of [`TurnClient`] over UDP (RFC 8489 §6.2.1's 500 ms
/// shortened for loopback), doubled per retransmission up to [`RTO_MAX`].
const RTO_FIRST: Duration = Duration::from_millis(100);
/// Longest retransmission timeout: the doubling stops here.
const RTO_MAX: Duration = Duration::from_millis(1600);

/// One whole frame from a stream: a buffered one, else one read (`None` on a read timeout or
/// when the read did not complete a frame; the caller loops until its deadline).
fn read_frame(
    stream: &mut impl Read,
    framer: &mut StreamFramer,
) -> Result<Option<Vec<u8>>, TurnError> {
    match framer.pop() {
        Ok(Some(frame)) => return Ok(Some(frame.to_vec())),
        Ok(None) => {}
        Err(e) => return Err(malformed(Method::SEND, &format!("stream framing: {e:?}"))),
    }
    let spare = framer.spare_capacity_mut();
    match stream.read(spare) {
        Ok(0) => Err(TurnError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the server closed the connection",
        ))),
        Ok(n) => {
            framer.commit(n);
            match framer.pop() {
                Ok(Some(frame)) => Ok(Some(frame.to_vec())),
                Ok(None) => Ok(None),
                Err(e) => Err(malformed(Method::SEND, &format!("stream framing: {e:?}"))),
            }
        }
        Err(e) if is_timeout(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The payload of a ChannelData message or of a Data indication.
pub fn relayed_payload(datagram: &[u8]) -> Option<&[u8]> {
    match classify(datagram) {
        PacketKind::ChannelData => ChannelData::parse(datagram).ok().map(|c| c.payload()),
        PacketKind::Stun => {
            let msg = Message::parse(datagram).ok()?;
            if msg.class() != Class::Indication || msg.method() != Method::DATA {
                return None;
            }
            msg.data().ok().flatten()
        }
        _ => None,
    }
}

/// The ERROR-CODE of an error response.
pub fn error_code(msg: &Message<'_>) -> Option<u16> {
    if msg.class() != Class::ErrorResponse {
        return None;
    }
    Some(msg.error_code().ok().flatten().map_or(0, |e| e.code.0))
}

fn check_success(method: Method, msg: &Message<'_>) -> Result<(), TurnError> {
    match msg.class() {
        Class::SuccessResponse => Ok(()),
        _ => Err(TurnError::Rejected {
            method: method_name(method),
            code: error_code(msg).unwrap_or(0),
            reason: msg
                .error_code()
                .ok()
                .flatten()
                .map(|e| e.reason.to_owned())
                .unwrap_or_default(),
            realm: msg.realm().ok().flatten().map(str::to_owned),
        }),
    }
}

/// A request with `attrs`, authenticated with `creds` (USERNAME, REALM, NONCE and
/// MESSAGE-INTEGRITY with the key) when given, and FINGERPRINT.
pub fn build_request(
    method: Method,
    tid: TransactionId,
    attrs: &[Attribute<'_>],
    creds: Option<(&str, &str, &str, &[u8; 16])>,
) -> Result<Vec<u8>, TurnError> {
    let mut buf = vec![0u8; 1500];
    let mut b = MessageBuilder::new(&mut buf, Class::Request, method, tid);
    let too_small = |_| malformed(method, "request does not fit in 1,500 bytes");
    for a in attrs {
        b.attribute(a).map_err(too_small)?;
    }
    if let Some((user, realm, nonce, key)) = creds {
        b.attribute(&Attribute::Username(user))
            .and_then(|b| b.attribute(&Attribute::Realm(realm)))
            .and_then(|b| b.attribute(&Attribute::Nonce(nonce)))
            .and_then(|b| b.message_integrity(key))
            .map_err(too_small)?;
    }
    b.fingerprint().map_err(too_small)?;
    let n = b.finish();
    buf.truncate(n);
    Ok(buf)
}

/// A method's name for messages.
pub fn method_name(method: Method) -> &'static str {
    method.name().unwrap_or("request")
}

fn malformed(method: Method, what: &str) -> TurnError {
    TurnError::Malformed {
        method: method_name(method),
        what: what.to_owned(),
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, UdpSocket};

    /// A port on loopback nobody listens on: bound, read, closed.
    fn dead_port() -> SocketAddr {
        let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        s.local_addr().unwrap()
    }

    #[test]
    fn a_request_to_a_closed_port_times_out_instead_of_overflowing_its_retransmission_timer() {
        // Every send to a closed loopback port is answered by ICMP port unreachable, so each
        // read returns at once and the retransmission timer doubled on every turn: after ~67
        // turns (a few ms) `now + rto` overflowed the Instant and panicked. RFC 8489 §6.2.1
        // caps the transmissions; the client must end with a timeout (or the refusal).
        let server = dead_port();
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let mut client = TurnClient::udp(socket, server, "u", "p").unwrap();
        client.timeout = Duration::from_millis(300);
        let started = Instant::now();
        let err = client.allocate().unwrap_err();
        assert!(
            matches!(err, TurnError::Timeout { .. }),
            "expected a timeout, got {err}"
        );
        assert!(started.elapsed() >= Duration::from_millis(300));
    }
}
