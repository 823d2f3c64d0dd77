//! TURN over TCP and TLS between client and server (RFC 8656 §3.1); the relay side stays UDP.
//!
//! # Ownership
//!
//! Every shard binds its own `SO_REUSEPORT` TCP listener per configured stream address, so the
//! kernel spreads connections over the shards. A connection belongs to the shard that accepted
//! it; the allocation made over it is installed on the same shard (control answers on the shard
//! a request came from), so its relay socket is there too and nothing crosses shards.
//!
//! # Event loop
//!
//! The listeners and connections of a shard are registered in one level-triggered epoll
//! instance owned by [`Streams`]. The shard loop waits on that descriptor like on any other
//! source: the io_uring backend arms a one-shot `PollAdd` on it, the mmsg backend adds it to its
//! own epoll set. When it is readable the shard calls [`Streams::poll`], which accepts, reads,
//! frames, relays and flushes with plain non-blocking `accept4`/`read`/`write` calls. (The UDP
//! path uses multishot receives into the ring's buffers; the stream path does not yet use
//! io_uring `Accept`/`Recv`/`Send`. It needs per-connection buffers anyway, so the gain would be
//! the syscalls only.)
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
//! receive buffer = frame_len_max (plain TCP) or one TLS record, 18437 B (tls, auto)
//! send queue     = StreamLimits::send_queue_bytes     // wire bytes (ciphertext for TLS)
//! TLS            = the rustls session; decrypted records waiting for the framer get a
//!                  frame_len_max framer (rustls 0.23 still hands each decrypted record over
//!                  in a Vec of its own: one allocation per received record)
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

mod conn;

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use socket2::{Domain, Protocol, Socket, Type};

pub(crate) use self::conn::{Close, Connection, Start};
use crate::addr::canonical;
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

/// Per-shard limits of stream connections.
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
    /// Connections open at once per source IP on one shard; more are accepted and closed at
    /// once (`stream_refused`, and dropped as `source_connections`). `0` means no limit.
    pub connections_per_source_max: usize,
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

struct Listener {
    /// The listener's index in the core's listener table.
    index: u16,
    kind: StreamKind,
    socket: TcpListener,
}

struct Conn {
    socket: TcpStream,
    listener: u16,
    client: SocketAddr,
    io: Connection,
    out_interest: bool,
    accepted_at: Instant,
    /// Sent at least one message to control (so control may hold state for its 5-tuple).
    reported: bool,
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

/// A shard's stream listeners and connections.
pub(crate) struct Streams {
    epoll: Epoll,
    listeners: Vec<Listener>,
    conns: Vec<Option<Conn>>,
    free: Vec<u32>,
    by_tuple: HashMap<(u16, SocketAddr), u32>,
    tls: Option<TlsConfig>,
    limits: StreamLimits,
    tokens: Vec<u64>,
    open: usize,
    /// Plaintext staging for TLS encryption (one record), allocated once per shard.
    scratch: Box<[u8]>,
    /// Open connections per source IP; an entry lives only while its source has a
    /// connection, so the map is bounded by `connections_max`.
    per_source: HashMap<IpAddr, u32>,
}

impl Streams {
    /// `listeners` pairs each bound socket with its core listener index and kind.
    pub(crate) fn new(
        listeners: Vec<(u16, StreamKind, TcpListener)>,
        tls: Option<TlsConfig>,
        limits: StreamLimits,
    ) -> io::Result<Self> {
        let epoll = Epoll::new(256)?;
        let mut out = Vec::with_capacity(listeners.len());
        for (i, (index, kind, socket)) in listeners.into_iter().enumerate() {
            epoll.add_events(
                socket.as_raw_fd(),
                LISTENER_TOKEN_BASE + i as u64,
                libc::EPOLLIN,
            )?;
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
            open: 0,
            scratch: vec![0; conn::TLS_PLAINTEXT_LEN_MAX].into_boxed_slice(),
            per_source: HashMap::new(),
        })
    }

    /// The descriptor the shard loop waits on: readable when any listener or connection has
    /// work.
    pub(crate) fn fd(&self) -> i32 {
        self.epoll.raw_fd()
    }

    /// Whether there is anything to poll at all (no stream listeners: the loop skips it).
    pub(crate) fn is_empty(&self) -> bool {
        self.listeners.is_empty()
    }

    /// Handles every ready listener and connection once (bounded work per source).
    pub(crate) fn poll(&mut self, core: &mut Core, now: Instant) {
        let mut tokens = std::mem::take(&mut self.tokens);
        if let Err(error) = self.epoll.wait(0, &mut tokens) {
            tracing::error!(shard = core.shard().0, %error, "stream epoll_wait failed");
        }
        for &token in &tokens {
            if token >= LISTENER_TOKEN_BASE {
                self.accept(core, (token - LISTENER_TOKEN_BASE) as usize, now);
            } else {
                let slot = token as u32;
                if self.on_ready(core, slot).is_err() {
                    self.close(core, slot);
                }
            }
        }
        self.tokens = tokens;
    }

    /// Closes connections that have had no allocation for `idle_timeout`.
    pub(crate) fn sweep(&mut self, core: &mut Core, now: Instant) {
        for slot in 0..self.conns.len() {
            let expired = self.conns[slot].as_ref().is_some_and(|c| {
                now.saturating_duration_since(c.accepted_at) >= self.limits.idle_timeout
                    && !core.has_allocation(c.listener, c.client)
            });
            if expired {
                core.counters_mut().stream_timeouts += 1;
                self.close(core, slot as u32);
            }
        }
    }

    /// Queues `parts` and `padding` zero bytes as one frame for the client of listener
    /// `listener` at `client`, and writes what the socket takes now. The frame is queued whole
    /// or not at all.
    pub(crate) fn send_frame(
        &mut self,
        core: &mut Core,
        listener: u16,
        client: SocketAddr,
        parts: [&[u8]; 2],
        padding: usize,
    ) -> Result<(), DropReason> {
        let Some(&slot) = self.by_tuple.get(&(listener, client)) else {
            return Err(DropReason::NoAllocation);
        };
        let Some(conn) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return Err(DropReason::NoAllocation);
        };
        let first_overflow = conn.io.queue_full_drops == 0;
        if let Err(reason) = conn.io.queue_frame(parts, padding, &mut self.scratch) {
            if reason == DropReason::QueueFull && first_overflow {
                tracing::debug!(
                    shard = core.shard().0,
                    %client,
                    "stream send queue full: relayed frames are dropped and counted as queue_full \
                     (logged once per connection)"
                );
            }
            return Err(reason);
        }
        if flush(conn, &self.epoll, slot).is_err() {
            self.close(core, slot);
        }
        Ok(())
    }

    fn accept(&mut self, core: &mut Core, index: usize, now: Instant) {
        for _ in 0..ACCEPTS_PER_POLL_MAX {
            let Some(listener) = self.listeners.get(index) else {
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
            let (listener_index, kind) = (listener.index, listener.kind);
            if self.open >= self.limits.connections_max {
                core.counters_mut().stream_refused += 1;
                continue; // Dropping `socket` closes it.
            }
            // Issue 8: one source cannot take the shard's connections for itself.
            let source = canonical(client).ip();
            let from_source = self.per_source.get(&source).copied().unwrap_or(0);
            if self.limits.connections_per_source_max != 0
                && from_source as usize >= self.limits.connections_per_source_max
            {
                core.counters_mut().stream_refused += 1;
                core.count_drop(DropReason::SourceConnections);
                continue;
            }
            if socket.set_nonblocking(true).is_err() {
                continue;
            }
            // Relayed media is latency-sensitive and already framed.
            let _ = socket.set_nodelay(true);
            let start = match kind {
                StreamKind::Tcp => Start::Plain,
                StreamKind::Auto => Start::Sniff,
                StreamKind::Tls => match self.tls.as_ref() {
                    Some(tls) => Start::Tls(tls.current()),
                    None => continue,
                },
            };
            let io = match Connection::new(
                start,
                self.limits.frame_len_max,
                self.limits.send_queue_bytes,
            ) {
                Ok(io) => io,
                Err(error) => {
                    tracing::warn!(%error, "TLS session setup failed");
                    continue;
                }
            };
            let client = canonical(client);
            let conn = Conn {
                socket,
                listener: listener_index,
                client,
                io,
                out_interest: false,
                accepted_at: now,
                reported: false,
            };
            let slot = match self.free.pop() {
                Some(slot) => slot,
                None => {
                    self.conns.push(None);
                    u32::try_from(self.conns.len() - 1).unwrap_or(u32::MAX)
                }
            };
            if let Err(error) =
                self.epoll
                    .add_events(conn.socket.as_raw_fd(), u64::from(slot), EVENTS_IN)
            {
                tracing::warn!(shard = core.shard().0, %error, "epoll add for a connection failed");
                self.free.push(slot);
                continue;
            }
            self.conns[slot as usize] = Some(conn);
            if let Some(old) = self.by_tuple.insert((listener_index, client), slot) {
                // The kernel handed out a 4-tuple still in our table: the old one is dead.
                self.by_tuple.remove(&(listener_index, client));
                self.close(core, old);
                self.by_tuple.insert((listener_index, client), slot);
            }
            self.open += 1;
            *self.per_source.entry(client.ip()).or_insert(0) += 1;
            let counters = core.counters_mut();
            counters.stream_accepted += 1;
            counters.stream_open = self.open as u64;
        }
    }

    fn on_ready(&mut self, core: &mut Core, slot: u32) -> Result<(), Close> {
        let Some(conn) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return Ok(());
        };
        let tls = self.tls.as_ref();
        for _ in 0..READS_PER_EVENT_MAX {
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
            let (listener, client) = (conn.listener, conn.client);
            let reported = &mut conn.reported;
            let result = conn.io.received(
                n,
                || tls.map(TlsConfig::current),
                &mut self.scratch,
                &mut |transport, frame| {
                    handle_frame(core, listener, client, transport, frame, reported);
                },
            );
            if let Err(close) = result {
                if close == Close::Eof {
                    // Best effort: our close_notify, queued by `received`.
                    let _ = conn.socket.write(conn.io.pending());
                }
                return Err(close);
            }
        }
        flush(conn, &self.epoll, slot).map_err(|()| Close::Error)
    }

    fn close(&mut self, core: &mut Core, slot: u32) {
        let Some(conn) = self.conns.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        let _ = self.epoll.delete(conn.socket.as_raw_fd());
        if self.by_tuple.get(&(conn.listener, conn.client)) == Some(&slot) {
            self.by_tuple.remove(&(conn.listener, conn.client));
        }
        if conn.reported {
            core.stream_closed(conn.listener, conn.transport(), conn.client);
        }
        self.free.push(slot);
        self.open = self.open.saturating_sub(1);
        if let Some(count) = self.per_source.get_mut(&conn.client.ip()) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_source.remove(&conn.client.ip());
            }
        }
        let counters = core.counters_mut();
        counters.stream_closed += 1;
        counters.stream_open = self.open as u64;
    }
}

/// Hands one whole frame to the fast path (ChannelData and Send indications go to the relay
/// socket here; other STUN goes to control). The transport is the connection's.
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
