//! TURN over TCP and TLS between client and server (RFC 8656 §3.1); the relay side stays UDP.
//!
//! # Ownership
//!
//! Every shard binds its own `SO_REUSEPORT` TCP listener per configured stream address, so the
//! kernel spreads connections over the shards. A connection belongs to the shard that accepted
//! it; the allocation made over it is installed on the same shard (control answers on the shard
//! a request came from), so its relay socket is there too and nothing crosses shards.
//!
//! # I/O edges
//!
//! [`Streams`] owns admission (limits), the connections and their lifetime; the bytes of each
//! connection go through the sans-IO [`conn::Connection`]. Only the edge that moves bytes
//! between sockets and those buffers differs per backend:
//!
//! ```text
//!  io_uring (uring.rs)                          mmsg (this file: poll / send_frame)
//!  multishot Accept per listener ─► admit       epoll on listeners ─► accept4 ─► admit
//!  Recv into Connection::read_range ─►          epoll readable ─► read(read_buf) ─►
//!      Streams::received ─► frames ─► Core          Streams::received ─► frames ─► Core
//!  Send of the send queue's head, one in        write(pending) until EAGAIN, then EPOLLOUT
//!      flight; re-armed on its completion           until the queue drains
//!  close: retire, shutdown(2), cancel ops;      close: retire and free at once
//!      free when the last CQE is in
//! ```
//!
//! On io_uring the buffers are [`IoBuf`](crate::bufring::IoBuf)s lent range by range to one
//! operation at a time; the ring gives a range back only with the proof that its operation
//! ended, and a buffer dropped while lent is leaked rather than freed, so a connection's memory
//! cannot be reused under the kernel. The io_uring backend has no epoll at all; the mmsg backend
//! keeps readiness-driven non-blocking syscalls (bounded per turn: 64 accepts per listener, 16
//! reads per connection).
//!
//! # Framing and TLS
//!
//! The bytes of a connection go through [`conn::Connection`], a sans-IO state machine the I/O
//! edge feeds with what the socket delivered and asks for what to write. Plain TURN is cut into
//! STUN messages and padded ChannelData in place in the receive buffer
//! ([`uturn_proto::frame_len`]). TLS (1.2 and 1.3, ALPN `stun.turn` when the [`TlsConfig`] sets
//! it) is rustls's buffer-level [`rustls::server::UnbufferedServerConnection`]:
//! `process_tls_records` reads the records in the connection's receive buffer, handshake records
//! and encrypted frames are written straight into its send queue; no async runtime. An `auto`
//! listener looks at the first byte: 0x16 (a TLS handshake record) makes the connection TLS,
//! anything else plain TCP.
//!
//! # Memory and back-pressure
//!
//! Per connection, allocated at accept and never grown:
//!
//! ```text
//! receive buffer = one TLS record, 18437 B (at least frame_len_max), for every kind: plain
//!                  TCP takes a few dozen small frames per receive with it
//! send queue     = StreamLimits::send_queue_bytes     // wire bytes (ciphertext for TLS)
//! TLS            = the rustls session and a frame_len_max plaintext framer (frames span
//!                  records). rustls 0.23's record layer still allocates and frees one buffer
//!                  per record it encrypts or decrypts; nothing of it queues or grows.
//! ```
//!
//! plus one 16 KiB plaintext scratch per shard for encryption, and at most
//! [`StreamLimits::connections_max`] connections per shard (more are accepted and closed at
//! once, counted in `stream_refused`). A frame for a client whose send queue cannot take it
//! whole (contiguously: the queue is a two-region circular buffer, so up to one frame of it may
//! be unusable at the wrap) is dropped and counted as [`DropReason::QueueFull`], as a full UDP
//! socket buffer would drop it; a slow reader therefore costs only its own queue, never the
//! shard's time. A handshake record that does not fit ends the connection.
//!
//! # Lifetime
//!
//! A connection with no allocation is closed after [`StreamLimits::idle_timeout`] (checked on
//! the counters tick). When a connection that talked to control closes, the shard sends
//! [`ToControl::ConnectionClosed`](crate::ToControl::ConnectionClosed) and control removes the
//! allocation (RFC 8656 §3.1).

pub(crate) mod conn;
pub(crate) mod edge;
pub(crate) mod forward;
#[cfg(test)]
mod tests;

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use socket2::{Domain, Protocol, Socket, Type};

use self::conn::ProxyEvent;
pub(crate) use self::conn::{Close, Connection, Start};
pub use self::edge::StreamEdge;
use self::forward::{Forwarder, Handoff};
use crate::addr::canonical;
use crate::contain::{self, Caught};
use crate::sys::Epoll;
use crate::tables::{Action, Core};
use crate::{ClientTransport, DataPlaneError, DropReason};

/// What a TCP listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// Plain TURN over TCP.
    Tcp,
    /// TURN over TLS.
    Tls,
    /// Either, told apart by the first byte (0x16 starts a TLS handshake).
    Auto,
}

impl StreamKind {
    /// Static name (`tcp`, `tls`, `auto`), the scheme of `--listen`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Tls => "tls",
            Self::Auto => "auto",
        }
    }

    /// Whether a connection of `transport` may have arrived on this listener.
    pub(crate) fn carries(self, transport: ClientTransport) -> bool {
        matches!(
            (self, transport),
            (Self::Tcp | Self::Auto, ClientTransport::Tcp)
                | (Self::Tls | Self::Auto, ClientTransport::Tls)
        )
    }
}

/// One TCP listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamListen {
    /// Address to bind (port 0: shard 0 picks one, the others bind the same).
    pub addr: SocketAddr,
    /// What it speaks.
    pub kind: StreamKind,
}

/// Limits of stream connections (per shard, except the per-source one, which is server-wide).
#[derive(Clone, Copy, Debug)]
pub struct StreamLimits {
    /// Connections open at once per shard.
    pub connections_max: usize,
    /// A connection without an allocation is closed after this long (RFC 8656 leaves it to the
    /// server; 30 s keeps idle sockets from piling up).
    pub idle_timeout: Duration,
    /// Bytes queued for one client's socket; relayed frames that do not fit are dropped.
    pub send_queue_bytes: usize,
    /// Largest frame a client may send (STUN message or ChannelData with padding).
    pub frame_len_max: usize,
    /// Connections open at once per source (an IPv4 address or an IPv6 /64) across all shards;
    /// more are accepted and closed at once (`stream_refused`, and dropped as
    /// `source_connections`). `0` means no limit.
    pub connections_per_source_max: usize,
    /// A connection still waiting for its PROXY header or, on a forwarding `auto` port, for its
    /// whole ClientHello is closed after this long (counted in `stream_timeouts`).
    pub hello_timeout: Duration,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            connections_max: 4096,
            idle_timeout: Duration::from_secs(30),
            send_queue_bytes: 64 * 1024,
            // A UDP receive buffer holds 2004 payload bytes by default; a stream frame of twice
            // that covers every relayed payload and any sane STUN request.
            frame_len_max: 4096,
            connections_per_source_max: 256,
            hello_timeout: Duration::from_secs(5),
        }
    }
}

/// The TLS server configuration shared by every shard, replaceable at run time (SIGHUP).
/// Connections keep the configuration they started with; new ones take the current one.
#[derive(Clone)]
pub struct TlsConfig {
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
}

impl TlsConfig {
    /// Wraps a rustls server configuration.
    pub fn new(config: Arc<rustls::ServerConfig>) -> Self {
        Self {
            current: Arc::new(RwLock::new(config)),
        }
    }

    /// Replaces the configuration for connections accepted from now on.
    pub fn replace(&self, config: Arc<rustls::ServerConfig>) {
        match self.current.write() {
            Ok(mut guard) => *guard = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        match self.current.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig").finish_non_exhaustive()
    }
}

/// Binds every stream listener on every shard, like `socket::bind_listeners` for UDP.
#[allow(clippy::type_complexity)]
pub(crate) fn bind_stream_listeners(
    listen: &[StreamListen],
    shards: usize,
) -> Result<(Vec<Vec<TcpListener>>, Vec<StreamListen>), DataPlaneError> {
    let mut per_shard: Vec<Vec<TcpListener>> = (0..shards)
        .map(|_| Vec::with_capacity(listen.len()))
        .collect();
    let mut resolved = Vec::with_capacity(listen.len());
    for configured in listen {
        let mut addr = configured.addr;
        for (shard, sockets) in per_shard.iter_mut().enumerate() {
            let shard_id = u16::try_from(shard).unwrap_or(u16::MAX);
            let error = |source| DataPlaneError::BindTcp {
                addr,
                shard: shard_id,
                source,
            };
            let listener = bind_tcp(addr).map_err(error)?;
            if shard == 0 {
                addr = listener.local_addr().map_err(error)?;
                resolved.push(StreamListen {
                    addr,
                    kind: configured.kind,
                });
            }
            sockets.push(listener);
        }
    }
    Ok((per_shard, resolved))
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Accepts per listener per `poll`, so a connection storm cannot starve the packet path.
const ACCEPTS_PER_POLL_MAX: usize = 64;
/// Socket reads per connection per `poll`, so one busy client cannot starve the others.
const READS_PER_EVENT_MAX: usize = 16;
/// Epoll tokens at or above this are listeners; below are connection slots.
const LISTENER_TOKEN_BASE: u64 = 1 << 32;

const EVENTS_IN: i32 = libc::EPOLLIN | libc::EPOLLRDHUP;
const EVENTS_IN_OUT: i32 = EVENTS_IN | libc::EPOLLOUT;

pub(crate) struct Listener {
    /// The listener's index in the core's listener table.
    index: u16,
    kind: StreamKind,
    pub(crate) socket: TcpListener,
}

/// Open TCP/TLS connections per source (IPv4 address or IPv6 /64), shared by every shard so the limit is server-wide
/// (issue 8). A mutex around a map, not atomics: it is touched only on accept and close, never
/// on the packet path, and an exact count per IP needs no hashing into shared buckets (where
/// two sources could be refused for each other). Contention is between shards accepting at the
/// same moment, bounded by the accept rate.
#[derive(Clone, Debug, Default)]
pub(crate) struct SourceConnections {
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl SourceConnections {
    /// Counts one more connection from `ip` unless its source already has `max` (0: no limit).
    fn try_add(&self, ip: IpAddr, max: usize) -> bool {
        let ip = source_of(ip);
        let mut open = match self.open.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let count = open.entry(ip).or_insert(0);
        if max != 0 && *count as usize >= max {
            if *count == 0 {
                open.remove(&ip);
            }
            return false;
        }
        *count += 1;
        true
    }

    fn remove(&self, ip: IpAddr) {
        let ip = source_of(ip);
        let mut open = match self.open.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(count) = open.get_mut(&ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&ip);
            }
        }
    }
}

/// The source a connection counts against: an IPv4 address, or the /64 of an IPv6 address, as
/// the rate limits count (one host is given a whole /64, RFC 6177 §2; counting per /128 would
/// let one attacker open `connections_per_source_max` connections from each of 2^64 addresses).
/// `ip` is canonical already (an IPv4-mapped address arrives as IPv4).
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from_bits(
            v6.to_bits() & (u128::MAX << 64),
        )),
    }
}

/// One connection: its socket, its bytes (the sans-IO [`Connection`]) and the state of the
/// I/O edge that drives it.
pub(crate) struct Conn {
    pub(crate) socket: TcpStream,
    listener: u16,
    client: SocketAddr,
    pub(crate) io: Connection,
    /// Epoll edge: EPOLLOUT armed.
    out_interest: bool,
    accepted_at: Instant,
    /// Sent at least one message to control (so control may hold state for its 5-tuple).
    reported: bool,
    /// Counted in the TLS gauge (else the TCP one).
    counted_tls: bool,
    /// io_uring edge: token of the `Recv` in flight.
    pub(crate) recv_op: Option<u32>,
    /// io_uring edge: token of the `Send` in flight.
    pub(crate) send_op: Option<u32>,
    /// Closed for everyone else (tables, control, counters); kept only until the ring gives
    /// its buffers back.
    pub(crate) retired: bool,
    /// Its TLS or framing work panicked: its state is garbage, so nothing more is read from
    /// it (not even the last best-effort write); it is closing.
    pub(crate) panicked: bool,
    /// Handed to the forwarder (a duplicate of the socket lives on there): closing it here
    /// must not shut the socket down.
    pub(crate) handed_off: bool,
}

impl Conn {
    fn transport(&self) -> ClientTransport {
        if self.io.is_tls() {
            ClientTransport::Tls
        } else {
            ClientTransport::Tcp
        }
    }
}

/// A shard's stream listeners and connections: admission, bytes in and out of each
/// [`Connection`], lifetime. The I/O edge is the backend's: `poll`/`send_frame` below run it
/// with epoll and non-blocking syscalls (mmsg backend); `uring.rs` runs it with io_uring
/// `Accept`/`Recv`/`Send` and the methods marked for it.
pub(crate) struct Streams {
    /// The mmsg edge's readiness set; `None` on the io_uring backend.
    epoll: Option<Epoll>,
    listeners: Vec<Listener>,
    conns: Vec<Option<Conn>>,
    free: Vec<u32>,
    by_tuple: HashMap<(u16, SocketAddr), u32>,
    tls: Option<TlsConfig>,
    limits: StreamLimits,
    tokens: Vec<u64>,
    open_tcp: usize,
    open_tls: usize,
    /// Plaintext staging for TLS encryption (one record), allocated once per shard.
    scratch: Box<[u8]>,
    sources: SourceConnections,
    /// Connections whose work panicked while a relayed frame was queued for them; the edge
    /// closes them ([`take_panicked`](Self::take_panicked)).
    panicked: Vec<u32>,
    /// PROXY trust and the shared-port rules.
    edge: Arc<StreamEdge>,
    /// The passthrough thread of this shard's forwarding `auto` listeners, if any.
    forwarder: Option<Forwarder>,
}

impl Streams {
    /// `listeners` pairs each bound socket with its core listener index and kind. With
    /// `epoll`, the shard drives the streams through [`poll`](Self::poll) (mmsg backend).
    pub(crate) fn new(
        listeners: Vec<(u16, StreamKind, TcpListener)>,
        tls: Option<TlsConfig>,
        limits: StreamLimits,
        edge: &StreamEdge,
        shard: u16,
        sources: SourceConnections,
        epoll: bool,
    ) -> io::Result<Self> {
        let forwarder = match edge.forward_other_to {
            Some(backend)
                if listeners
                    .iter()
                    .any(|(_, kind, _)| *kind == StreamKind::Auto) =>
            {
                Some(Forwarder::start(
                    shard,
                    backend,
                    limits.idle_timeout,
                    limits.connections_max,
                )?)
            }
            _ => None,
        };
        let epoll = if epoll && !listeners.is_empty() {
            Some(Epoll::new(256)?)
        } else {
            None
        };
        let mut out = Vec::with_capacity(listeners.len());
        for (i, (index, kind, socket)) in listeners.into_iter().enumerate() {
            if let Some(epoll) = &epoll {
                epoll.add_events(
                    socket.as_raw_fd(),
                    LISTENER_TOKEN_BASE + i as u64,
                    libc::EPOLLIN,
                )?;
            }
            out.push(Listener {
                index,
                kind,
                socket,
            });
        }
        Ok(Self {
            epoll,
            listeners: out,
            conns: Vec::new(),
            free: Vec::new(),
            by_tuple: HashMap::new(),
            tls,
            limits,
            tokens: Vec::with_capacity(256),
            open_tcp: 0,
            open_tls: 0,
            scratch: vec![0; conn::TLS_PLAINTEXT_LEN_MAX].into_boxed_slice(),
            sources,
            panicked: Vec::new(),
            edge: Arc::new(edge.clone()),
            forwarder,
        })
    }

    /// The epoll descriptor the mmsg shard loop waits on, if this shard has stream listeners.
    pub(crate) fn epoll_fd(&self) -> Option<i32> {
        self.epoll.as_ref().map(Epoll::raw_fd)
    }

    /// The listening sockets, in listener-position order (io_uring arms an `Accept` on each).
    pub(crate) fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    pub(crate) fn conn_mut(&mut self, slot: u32) -> Option<&mut Conn> {
        self.conns.get_mut(slot as usize).and_then(Option::as_mut)
    }

    /// Stream operations that may be in flight on a ring at once: a receive and a send per
    /// connection and an accept per listener.
    pub(crate) fn ops_max(&self) -> usize {
        self.limits.connections_max.saturating_mul(2) + self.listeners.len()
    }

    /// Takes in a connection accepted on listener position `position`; returns its slot, or
    /// `None` when a limit refused it (the socket is closed, the refusal counted).
    pub(crate) fn admit(
        &mut self,
        core: &mut Core,
        position: usize,
        socket: TcpStream,
        client: SocketAddr,
        now: Instant,
    ) -> Option<u32> {
        let listener = self.listeners.get(position)?;
        let (listener_index, kind) = (listener.index, listener.kind);
        if self.open_tcp + self.open_tls >= self.limits.connections_max {
            core.counters_mut().stream_refused += 1;
            return None; // Dropping `socket` closes it.
        }
        let client = canonical(client);
        // Issue 8: one source cannot take the server's connections for itself.
        if !self
            .sources
            .try_add(client.ip(), self.limits.connections_per_source_max)
        {
            core.counters_mut().stream_refused += 1;
            core.count_drop(DropReason::SourceConnections);
            return None;
        }
        let admitted = self.install(core, listener_index, kind, socket, client, now);
        if admitted.is_none() {
            self.sources.remove(client.ip());
        }
        admitted
    }

    fn install(
        &mut self,
        core: &mut Core,
        listener_index: u16,
        kind: StreamKind,
        socket: TcpStream,
        client: SocketAddr,
        now: Instant,
    ) -> Option<u32> {
        socket.set_nonblocking(true).ok()?;
        // Relayed media is latency-sensitive and already framed.
        let _ = socket.set_nodelay(true);
        let start = match kind {
            StreamKind::Tcp => Start::Plain,
            StreamKind::Auto => Start::Sniff,
            StreamKind::Tls => Start::Tls(self.tls.as_ref()?.current()),
        };
        let io = match Connection::new(
            start,
            self.limits.frame_len_max,
            self.limits.send_queue_bytes,
        ) {
            Ok(io) => io,
            Err(error) => {
                tracing::warn!(%error, "TLS session setup failed");
                return None;
            }
        };
        let expect_proxy = self.edge.trusts(client.ip());
        let forward =
            (kind == StreamKind::Auto && self.forwarder.is_some()).then(|| Arc::clone(&self.edge));
        let io = io.with_edge(expect_proxy, forward);
        let counted_tls = io.is_tls();
        let conn = Conn {
            socket,
            listener: listener_index,
            client,
            io,
            out_interest: false,
            accepted_at: now,
            reported: false,
            counted_tls,
            recv_op: None,
            send_op: None,
            retired: false,
            panicked: false,
            handed_off: false,
        };
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.conns.push(None);
                u32::try_from(self.conns.len() - 1).unwrap_or(u32::MAX)
            }
        };
        if let Some(epoll) = &self.epoll
            && let Err(error) =
                epoll.add_events(conn.socket.as_raw_fd(), u64::from(slot), EVENTS_IN)
        {
            tracing::warn!(shard = core.shard().0, %error, "epoll add for a connection failed");
            self.free.push(slot);
            return None;
        }
        self.conns[slot as usize] = Some(conn);
        if let Some(old) = self.by_tuple.insert((listener_index, client), slot) {
            // The kernel handed out a 4-tuple still in our table: the old connection is dead.
            // Freed now unless an io_uring operation still holds its buffers (then the edge
            // frees it when that completes, as for any retired connection).
            self.retire(core, old);
            if self
                .conn_mut(old)
                .is_some_and(|c| c.recv_op.is_none() && c.send_op.is_none())
            {
                self.release(old);
            }
        }
        if counted_tls {
            self.open_tls += 1;
        } else {
            self.open_tcp += 1;
        }
        let counters = core.counters_mut();
        counters.stream_accepted += 1;
        self.publish_gauges(core);
        Some(slot)
    }

    fn publish_gauges(&self, core: &mut Core) {
        let counters = core.counters_mut();
        counters.stream_open_tcp = self.open_tcp as u64;
        counters.stream_open_tls = self.open_tls as u64;
    }

    /// `n` bytes were read into the connection's read range: frames go to the fast path.
    /// The connection's own work (TLS, framing) is contained: a panic in it closes this
    /// connection (`Err`), counted and logged; the fast path it calls per frame is not (a
    /// panic there aborts, see the `contain` module).
    pub(crate) fn received(&mut self, core: &mut Core, slot: u32, n: usize) -> Result<(), Close> {
        let tls = self.tls.as_ref();
        let Some(conn) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return Ok(());
        };
        if conn.panicked {
            // Panicked earlier in this loop turn (queueing a frame) and not closed yet.
            return Err(Close::Error);
        }
        let (listener, client) = (conn.listener, conn.client);
        let reported = &mut conn.reported;
        let io = &mut conn.io;
        let scratch = &mut self.scratch;
        let outcome = contain::contained(|| {
            io.received(
                n,
                || tls.map(TlsConfig::current),
                scratch,
                &mut |transport, frame| {
                    contain::uncontained(|| {
                        handle_frame(core, listener, client, transport, frame, reported);
                    });
                },
            )
        });
        let result = match outcome {
            Ok(result) => result,
            Err(caught) => {
                conn.panicked = true;
                connection_panicked(core, client, &caught);
                Err(Close::Error)
            }
        };
        let proxy_event = conn.io.take_proxy_event();
        let result = match (result, proxy_event) {
            (Ok(()), Some(ProxyEvent::Accepted(source))) => {
                core.counters_mut().proxy_headers += 1;
                self.proxied(core, slot, source)?;
                // The bytes after the header, now under the carried address.
                return self.received(core, slot, 0);
            }
            (result, Some(ProxyEvent::Refused)) => {
                core.counters_mut().proxy_refused += 1;
                result
            }
            (Err(Close::Forward), _) => {
                self.hand_over(slot);
                Err(Close::Forward)
            }
            (result, _) => result,
        };
        let Some(conn) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return result;
        };
        if conn.io.is_tls() && !conn.counted_tls {
            // An `auto` connection turned out to be TLS.
            conn.counted_tls = true;
            self.open_tcp = self.open_tcp.saturating_sub(1);
            self.open_tls += 1;
            self.publish_gauges(core);
        }
        result
    }

    /// A trusted peer's PROXY header named `source` as the client: from now on the connection
    /// is that client's (its 5-tuple for control, the engine's rate limits and quotas, the
    /// per-source connection cap). `None` (LOCAL, UNKNOWN) keeps the peer's own address.
    fn proxied(
        &mut self,
        core: &mut Core,
        slot: u32,
        source: Option<SocketAddr>,
    ) -> Result<(), Close> {
        let Some(source) = source.map(canonical) else {
            return Ok(());
        };
        let Some(conn) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return Err(Close::Error);
        };
        let (listener, old) = (conn.listener, conn.client);
        if old == source {
            return Ok(());
        }
        // The balancer's address was counted at accept; the client's counts from now on.
        if !self
            .sources
            .try_add(source.ip(), self.limits.connections_per_source_max)
        {
            core.counters_mut().stream_refused += 1;
            core.count_drop(DropReason::SourceConnections);
            return Err(Close::Error);
        }
        self.sources.remove(old.ip());
        conn.client = source;
        if self.by_tuple.get(&(listener, old)) == Some(&slot) {
            self.by_tuple.remove(&(listener, old));
        }
        if let Some(previous) = self.by_tuple.insert((listener, source), slot)
            && previous != slot
        {
            // Two live connections claim the same client 5-tuple (a balancer reusing a
            // source port it named before): the newer one wins, as at accept.
            self.retire(core, previous);
            if self
                .conn_mut(previous)
                .is_some_and(|c| c.recv_op.is_none() && c.send_op.is_none())
            {
                self.release(previous);
            }
        }
        Ok(())
    }

    /// Hands a connection whose ClientHello is not TURN's to the forwarder, with what it has
    /// read (and a PROXY v2 header first if configured). The edge then closes our side as
    /// usual; the forwarder holds a duplicate of the socket.
    fn hand_over(&mut self, slot: u32) {
        let forward_proxy = self.edge.forward_proxy_protocol;
        let (Some(forwarder), Some(conn)) = (
            &self.forwarder,
            self.conns.get_mut(slot as usize).and_then(Option::as_mut),
        ) else {
            return;
        };
        let Ok(client) = conn.socket.try_clone() else {
            forwarder.stats.errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut first = Vec::new();
        if forward_proxy && let Ok(local) = conn.socket.local_addr() {
            first = edge::proxy_v2_header(conn.client, canonical(local));
        }
        first.extend_from_slice(conn.io.unread());
        conn.handed_off = true;
        forwarder.hand_over(Handoff { client, first });
    }

    /// Queues `parts` and `padding` zero bytes as one frame for the client of listener
    /// `listener` at `client`, whole or not at all; returns the connection's slot for the edge
    /// to write from. Encryption is contained like [`received`](Self::received): after a
    /// panic the frame is dropped (`send_error`) and the slot waits in
    /// [`take_panicked`](Self::take_panicked) for the edge to close it.
    pub(crate) fn queue(
        &mut self,
        core: &mut Core,
        listener: u16,
        client: SocketAddr,
        parts: [&[u8]; 2],
        padding: usize,
    ) -> Result<u32, DropReason> {
        let Some(&slot) = self.by_tuple.get(&(listener, client)) else {
            return Err(DropReason::NoAllocation);
        };
        let Some(conn) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return Err(DropReason::NoAllocation);
        };
        if conn.panicked {
            return Err(DropReason::SendError);
        }
        let first_overflow = conn.io.queue_full_drops == 0;
        let io = &mut conn.io;
        let scratch = &mut self.scratch;
        let outcome = contain::contained(|| io.queue_frame(parts, padding, scratch));
        match outcome {
            Ok(Ok(())) => Ok(slot),
            Ok(Err(reason)) => {
                if reason == DropReason::QueueFull && first_overflow {
                    tracing::debug!(
                        shard = core.shard().0,
                        %client,
                        "stream send queue full: relayed frames are dropped and counted as \
                         queue_full (logged once per connection)"
                    );
                }
                Err(reason)
            }
            Err(caught) => {
                conn.panicked = true;
                connection_panicked(core, client, &caught);
                self.panicked.push(slot);
                Err(DropReason::SendError)
            }
        }
    }

    /// A connection whose work panicked in [`queue`](Self::queue), for the edge to close.
    pub(crate) fn take_panicked(&mut self) -> Option<u32> {
        self.panicked.pop()
    }

    /// Slots of connections that have had no allocation for `idle_timeout`; counted as timeouts.
    /// Also closes connections still undecided after `hello_timeout`, and folds the
    /// forwarder's totals into the shard's counters (this runs on the counters tick).
    pub(crate) fn expired(&self, core: &mut Core, now: Instant, out: &mut Vec<u32>) {
        out.clear();
        for (slot, conn) in self.conns.iter().enumerate() {
            if let Some(c) = conn
                && !c.retired
            {
                let age = now.saturating_duration_since(c.accepted_at);
                if (age >= self.limits.idle_timeout && !core.has_allocation(c.listener, c.client))
                    || (age >= self.limits.hello_timeout && c.io.is_undecided())
                {
                    out.push(slot as u32);
                }
            }
        }
        if let Some(forwarder) = &self.forwarder {
            let stats = &forwarder.stats;
            let counters = core.counters_mut();
            counters.forwarded_connections = stats.connections.load(Ordering::Relaxed);
            counters.forwarded_bytes_to_backend = stats.bytes_to_backend.load(Ordering::Relaxed);
            counters.forwarded_bytes_to_client = stats.bytes_to_client.load(Ordering::Relaxed);
            counters.forward_errors = stats.errors.load(Ordering::Relaxed);
            counters.forward_timeouts = stats.timeouts.load(Ordering::Relaxed);
        }
        core.counters_mut().stream_timeouts += out.len() as u64;
    }

    /// Closes the connection for everyone but the I/O edge: tables, control (its allocation
    /// ends), limits and counters. The edge frees it with [`release`](Self::release) once no
    /// operation uses its buffers. Returns false if it was retired already.
    pub(crate) fn retire(&mut self, core: &mut Core, slot: u32) -> bool {
        let Some(conn) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return false;
        };
        if conn.retired {
            return false;
        }
        conn.retired = true;
        if let Some(epoll) = &self.epoll {
            let _ = epoll.delete(conn.socket.as_raw_fd());
        }
        let (listener, client, transport) = (conn.listener, conn.client, conn.transport());
        if conn.counted_tls {
            self.open_tls = self.open_tls.saturating_sub(1);
        } else {
            self.open_tcp = self.open_tcp.saturating_sub(1);
        }
        if conn.reported {
            core.stream_closed(listener, transport, client);
        }
        if self.by_tuple.get(&(listener, client)) == Some(&slot) {
            self.by_tuple.remove(&(listener, client));
        }
        self.sources.remove(client.ip());
        core.counters_mut().stream_closed += 1;
        self.publish_gauges(core);
        true
    }

    /// Frees a retired connection (its socket closes). The io_uring edge calls it only when
    /// no operation is in flight; a buffer still lent would be leaked, not freed.
    pub(crate) fn release(&mut self, slot: u32) {
        if let Some(entry) = self.conns.get_mut(slot as usize)
            && entry.as_ref().is_some_and(|c| c.retired)
        {
            *entry = None;
            self.free.push(slot);
        }
    }

    fn close_now(&mut self, core: &mut Core, slot: u32) {
        self.retire(core, slot);
        self.release(slot);
    }

    // ---- The epoll edge (mmsg backend) ----

    /// Handles every ready listener and connection once (bounded work per source).
    pub(crate) fn poll(&mut self, core: &mut Core, now: Instant) {
        let mut tokens = std::mem::take(&mut self.tokens);
        if let Some(epoll) = &mut self.epoll
            && let Err(error) = epoll.wait(0, &mut tokens)
        {
            tracing::error!(shard = core.shard().0, %error, "stream epoll_wait failed");
        }
        for &token in &tokens {
            if token >= LISTENER_TOKEN_BASE {
                self.accept(core, (token - LISTENER_TOKEN_BASE) as usize, now);
            } else {
                let slot = token as u32;
                if self.on_ready(core, slot).is_err() {
                    self.close_now(core, slot);
                }
            }
        }
        self.tokens = tokens;
    }

    /// Closes idle connections (epoll edge).
    pub(crate) fn sweep(&mut self, core: &mut Core, now: Instant) {
        let mut expired = Vec::new();
        self.expired(core, now, &mut expired);
        for slot in expired {
            self.close_now(core, slot);
        }
    }

    /// Queues a frame and writes what the socket takes now (epoll edge).
    pub(crate) fn send_frame(
        &mut self,
        core: &mut Core,
        listener: u16,
        client: SocketAddr,
        parts: [&[u8]; 2],
        padding: usize,
    ) -> Result<(), DropReason> {
        let slot = match self.queue(core, listener, client, parts, padding) {
            Ok(slot) => slot,
            Err(reason) => {
                while let Some(slot) = self.take_panicked() {
                    self.close_now(core, slot);
                }
                return Err(reason);
            }
        };
        if let (Some(epoll), Some(conn)) = (
            &self.epoll,
            self.conns.get_mut(slot as usize).and_then(Option::as_mut),
        ) && flush(conn, epoll, slot).is_err()
        {
            self.close_now(core, slot);
        }
        Ok(())
    }

    fn accept(&mut self, core: &mut Core, position: usize, now: Instant) {
        for _ in 0..ACCEPTS_PER_POLL_MAX {
            let Some(listener) = self.listeners.get(position) else {
                return;
            };
            let (socket, client) = match listener.socket.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    // EMFILE, ENFILE, ENOBUFS: the connection stays in the backlog; try later.
                    tracing::warn!(shard = core.shard().0, %error, "accept failed");
                    return;
                }
            };
            let _ = self.admit(core, position, socket, client, now);
        }
    }

    fn on_ready(&mut self, core: &mut Core, slot: u32) -> Result<(), Close> {
        for _ in 0..READS_PER_EVENT_MAX {
            let Some(conn) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
                return Ok(());
            };
            let buf = conn.io.read_buf();
            if buf.is_empty() {
                return Err(Close::Error);
            }
            let n = match conn.socket.read(buf) {
                Ok(0) => return Err(Close::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(Close::Error),
            };
            if let Err(close) = self.received(core, slot, n) {
                if let Some(conn) = self.conns.get_mut(slot as usize).and_then(Option::as_mut)
                    && !conn.panicked
                {
                    // Best effort: what `received` queued last, our close_notify or the TLS
                    // alert that names the client's error.
                    let _ = conn.socket.write(conn.io.pending());
                }
                return Err(close);
            }
        }
        match (
            &self.epoll,
            self.conns.get_mut(slot as usize).and_then(Option::as_mut),
        ) {
            (Some(epoll), Some(conn)) => flush(conn, epoll, slot).map_err(|()| Close::Error),
            _ => Ok(()),
        }
    }
}

/// Counts and logs a panic caught in one connection's work (its caller closes it). The log
/// line carries the backtrace the first time a location panics on this shard; later panics at
/// the same place are only counted, so a client that can trigger one cannot flood the log.
fn connection_panicked(core: &mut Core, client: SocketAddr, caught: &Caught) {
    core.counters_mut().connection_panics += 1;
    if let Some(backtrace) = &caught.backtrace {
        tracing::error!(
            shard = core.shard().0,
            %client,
            panic = %caught.message,
            location = %caught.location,
            %backtrace,
            "a stream connection's TLS or framing work panicked: that connection is closed, \
             the shard goes on (uturn_connection_panics_total; logged once per location)"
        );
    }
}

/// Hands one whole frame to the fast path (ChannelData and Send indications go to the relay
/// socket here; other STUN goes to control).
fn handle_frame(
    core: &mut Core,
    listener: u16,
    client: SocketAddr,
    transport: ClientTransport,
    frame: &[u8],
    reported: &mut bool,
) {
    let action = core.handle_stream_frame(listener, transport, client, frame, reported);
    match action {
        Action::Send {
            via,
            to,
            range,
            relay,
        } => {
            let sent = match (core.socket(via), frame.get(range)) {
                (Some(socket), Some(payload)) => socket.send_to(payload, to).map(|_| ()),
                _ => Err(io::Error::from(io::ErrorKind::NotFound)),
            };
            if let Err(error) = sent {
                let reason = match error.kind() {
                    io::ErrorKind::WouldBlock => DropReason::QueueFull,
                    io::ErrorKind::NotFound => DropReason::NoAllocation,
                    _ => DropReason::SendError,
                };
                core.relay_failed(relay, reason);
            }
        }
        // Client frames only go to peers or to control.
        Action::Done | Action::SendIndication { .. } | Action::ToStream { .. } => {}
    }
}

/// Writes queued bytes until the socket would block, and asks epoll for writability only while
/// something is left.
fn flush(conn: &mut Conn, epoll: &Epoll, slot: u32) -> Result<(), ()> {
    while conn.io.wants_write() {
        match conn.socket.write(conn.io.pending()) {
            Ok(0) => return Err(()),
            Ok(n) => conn.io.sent(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(()),
        }
    }
    let pending = conn.io.wants_write();
    if pending != conn.out_interest {
        let events = if pending { EVENTS_IN_OUT } else { EVENTS_IN };
        epoll
            .modify(conn.socket.as_raw_fd(), u64::from(slot), events)
            .map_err(|_| ())?;
        conn.out_interest = pending;
    }
    Ok(())
}
