//! uturn's data plane: thread-per-core UDP shards that relay TURN traffic themselves.
//!
//! # What it is
//!
//! [`DataPlane::start`] binds one `SO_REUSEPORT` UDP socket per shard per listen address and
//! spawns one thread per core (pinned with `sched_setaffinity`). Each shard owns its ring (or its
//! `recvmmsg`/`sendmmsg` batches), its buffers, its tables and its counters; nothing on the packet
//! path is shared between shards: no lock, no atomic per packet, no cross-shard hop. The control
//! thread drives the shards through [`DataPlane::send`] (a per-shard crossbeam queue plus an
//! eventfd wake-up) and reads [`ToControl`] messages from the receiver `start` returns.
//!
//! # Data flow
//!
//! ```text
//! client ──► listener socket ──► classify(first byte)
//!              ├─ ChannelData ─► (listener, client) → allocation → channel → peer
//!              │                 send payload (iovec into the receive buffer) from the relay
//!              │                 socket of the peer's family
//!              ├─ Send indication ─► permission(peer IP)? ─► send DATA from the relay socket
//!              └─ other STUN ─► copy ─► ToControl::Request (the engine answers by Transmit)
//! peer ──► relay socket ──► permission(peer IP)?
//!              ├─ channel bound to that peer ─► 4-byte ChannelData header written in the
//!              │                                headroom in front of the payload, one send
//!              └─ otherwise ─► Data indication: [header from the send slot, payload, padding]
//!              sent from the listener socket the allocation's client uses
//! ```
//!
//! Drops are counted per [`DropReason`], never logged per packet. Counters are plain integers in
//! the shard, reported as [`ToControl::Counters`] every
//! [`DataPlaneConfig::counters_interval`].
//!
//! # Backends
//!
//! [`Backend::Uring`]: io_uring through the `io-uring` crate. Multishot `RecvMsg` on every
//! socket fed by one provided-buffer ring per shard; `SendMsg` many per submit, one
//! `submit_and_wait` per loop turn. [`Backend::Mmsg`]: `recvmmsg`/`sendmmsg` batches driven by
//! `epoll`, for hosts where io_uring is unavailable (old kernels, `kernel.io_uring_disabled`,
//! seccomp). [`BackendChoice::Auto`] probes io_uring once at startup and falls back with a reason
//! ([`DataPlane::backend`]).
//!
//! # Receive buffer layout (both backends)
//!
//! ```text
//!  0                16                           44 = PAYLOAD_OFFSET            buffer_size
//!  ├─ recvmsg_out ──┼─ peer sockaddr (28 bytes) ─┼─ datagram payload ... ──────┤
//!                                    40 ┼─ 4 ─┤
//!                    ChannelData header, written after the sockaddr is copied out
//! ```
//!
//! The kernel writes `io_uring_recvmsg_out` (16 bytes) and the source address (a
//! `sockaddr_in6`-sized field) before the payload. Once the shard has copied the source address
//! out, the 4 bytes in front of the payload are free and the ChannelData header for
//! peer→client goes there, so the payload is never copied. The mmsg backend receives at the same
//! offset so both backends share the fast path.
//!
//! # Memory budget (per shard, fixed at startup)
//!
//! Every term is sized from [`DataPlaneConfig`] when the shard starts; after that the packet
//! path allocates nothing (no `Vec`, no `Box`); only the slow path copies a STUN request into a
//! `Vec` for control, and commands grow the tables.
//!
//! ```text
//! receive buffers = buffer_size × ( send_slots          // one buffer held per in-flight send
//!                                 + recv_buffers_free)  // buffers the kernel fills meanwhile
//! send slots      = send_slots × 256 B     // msghdr, 3 iovecs, sockaddr, Data-ind. header, tags
//! tokens          = (send_slots + 64 + sockets) × 8 B   // in-flight table (user_data index)
//! buffer ring     = next_pow2(send_slots + recv_buffers_free) × 16 B
//! SQ / CQ         = next_pow2(batch_size) × 64 B + next_pow2(2 × (buffers + send_slots + 64))
//!                   × 16 B                               // kernel memory; the CQ cannot overflow
//! completion batch = batch_size × 16 B
//! tables          = per allocation ≈ 200 B, per permission ≈ 40 B, per channel ≈ 80 B,
//!                   per relayed address of any shard's allocation ≈ 40 B (the own-address check)
//! mmsg backend    = batch_size × (buffer_size + ~200 B) // one recvmmsg + one sendmmsg batch
//! ```
//!
//! With the defaults (2048-byte buffers, 1024 send slots, 1024 free receive buffers, batch 256)
//! an io_uring shard holds 4 MiB of packet buffers, 256 KiB of send slots, 32 KiB of buffer ring
//! and about 200 KiB of SQ/CQ. 10,000 allocations with 4 permissions and 2 channels each add
//! about 5 MiB of tables, spread over the shards.
//!
//! # Modules and `unsafe`
//!
//! `tables` (a shard's tables and every fast-path decision, shared by both backends), `uring`
//! and `mmsg` (the two shard loops), `shard` (startup, backend choice, readiness handshake),
//! `socket` (listeners, relay sockets), `addr` (socket addresses to/from kernel form),
//! `contain` (a panic in one stream connection's TLS or framing work closes that connection;
//! every other panic aborts), `fuzzing` (harness of the `tls` fuzz target; tests and the
//! `fuzzing` feature only). `unsafe`
//! is denied crate-wide and allowed only in `ring` (SQEs, in-flight tokens, send slots),
//! `bufring` (the provided-buffer ring) and `sys` (affinity, eventfd, setsockopt, epoll,
//! `recvmmsg`/`sendmmsg`); every block carries a `// SAFETY:` comment.
//!
//! # What it refuses to do
//!
//! - No protocol decisions: authentication, lifetimes, quotas, the peer deny-list live in the
//!   control engine; a shard only applies the tables it is sent.
//! - No timers of its own other than the counters report; permissions and channels expire in the
//!   engine and arrive as `RemovePermission` / `UnbindChannel`.
//! - No allocation per packet after startup (the slow path to the control thread copies).
//! - No `SQPOLL`, no `SEND_ZC`; the relay side is UDP only (RFC 8656).
//!
//! # Stream transports (TCP, TLS, `auto`)
//!
//! See the `stream` module: each shard binds its own `SO_REUSEPORT` TCP listeners, accepts,
//! frames and (for TLS) decrypts on its own thread, so a connection, its allocation and its
//! relay socket live on the shard that accepted it. On io_uring, accepts, receives and sends
//! go through the shard's ring (multishot `Accept`, `Recv`/`Send` on per-connection fixed
//! buffers); the mmsg backend drives the same connection state machine from epoll.
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

mod addr;
#[allow(unsafe_code)]
mod bufring;
mod contain;
mod error;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod mmsg;
#[allow(unsafe_code)]
mod ring;
mod shard;
mod socket;
pub mod sparse;
mod stream;
#[allow(unsafe_code)]
mod sys;
mod tables;
mod uring;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
pub use uturn_proto::ChannelNumber;

pub use crate::contain::abort_on_uncontained_panics;
pub use crate::error::DataPlaneError;
pub use crate::stream::{StreamEdge, StreamKind, StreamLimits, StreamListen, TlsConfig};

/// Bytes in front of every received payload: `io_uring_recvmsg_out` (16) + `sockaddr_in6` (28).
pub const PAYLOAD_OFFSET: usize = 16 + 28;

/// A shard's number and the engine's allocation identity, shared with the engine
/// (`uturn-boundary`), so the control thread passes them through unchanged.
pub use uturn_boundary::{AllocationId, ShardId};

/// Which backend to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// io_uring if the probe succeeds, else `recvmmsg`/`sendmmsg`.
    #[default]
    Auto,
    /// io_uring, or fail to start.
    Uring,
    /// `recvmmsg`/`sendmmsg` with epoll.
    Mmsg,
}

/// The backend that runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// io_uring with multishot receive and a provided-buffer ring.
    Uring,
    /// `recvmmsg`/`sendmmsg` batches driven by epoll.
    Mmsg,
}

impl Backend {
    /// Static name for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Uring => "io_uring",
            Self::Mmsg => "recvmmsg",
        }
    }
}

/// The transport between a client and the server (RFC 8656 §3.1): the engine's
/// [`uturn_boundary::Transport`], under the name the data plane's modules use for it.
pub use uturn_boundary::Transport as ClientTransport;

/// Data-plane configuration. `Default` gives sane values except `listen`, which is empty.
#[derive(Clone, Debug)]
pub struct DataPlaneConfig {
    /// UDP listen addresses; every shard binds each one with `SO_REUSEPORT`. Port 0 picks a port
    /// once (shard 0) and the other shards bind the same port.
    pub listen: Vec<SocketAddr>,
    /// TCP listeners (plain TCP, TLS, or `auto`), bound by every shard with `SO_REUSEPORT`.
    pub stream_listen: Vec<StreamListen>,
    /// Certificate and key for `Tls` and `Auto` listeners (required when there are any).
    pub tls: Option<TlsConfig>,
    /// Per-shard connection limits and buffer sizes of stream connections.
    pub stream_limits: StreamLimits,
    /// PROXY protocol trust and the shared-port passthrough of the stream listeners.
    pub stream_edge: StreamEdge,
    /// Number of shards; `None` = the cores this process may use (`sched_getaffinity`).
    pub threads: Option<usize>,
    /// Pin shard k to the k-th allowed core.
    pub pin_threads: bool,
    /// Backend selection.
    pub backend: BackendChoice,
    /// `SO_RCVBUF` for listener sockets; `None` = kernel default. A warning names
    /// `net.core.rmem_max` when the kernel caps it lower. Relay sockets keep the kernel default
    /// (one allocation each).
    pub socket_recv_buffer_bytes: Option<usize>,
    /// `SO_SNDBUF` for listener sockets; `None` = kernel default. A warning names
    /// `net.core.wmem_max` when capped.
    pub socket_send_buffer_bytes: Option<usize>,
    /// Size of one receive buffer including the [`PAYLOAD_OFFSET`] headroom; the largest
    /// datagram received whole is `buffer_size - PAYLOAD_OFFSET`, larger ones are counted as
    /// `truncated` and dropped.
    pub buffer_size: usize,
    /// Sends in flight per shard (each may hold one receive buffer until it completes).
    pub send_slots: usize,
    /// Receive buffers left for the kernel to fill while the shard works.
    pub recv_buffers_free: usize,
    /// Completions reaped per pass (io_uring) / datagrams per `recvmmsg` (mmsg).
    pub batch_size: usize,
    /// Depth of the shard→control queue; messages beyond it are dropped and counted
    /// (`queue_full`) rather than blocking the shard.
    pub control_queue_depth: usize,
    /// How often each shard reports [`ToControl::Counters`].
    pub counters_interval: Duration,
    /// Whether shards send those reports at all. Off only to measure what metrics cost: the
    /// shard still counts (plain local integers), the report is never built or sent.
    pub publish_counters: bool,
    /// uturn's own relay addresses, re-checked per packet (see [`PeerGuard`]).
    pub peer_guard: PeerGuard,
    /// Bytes per second each allocation may relay, both directions together (a token bucket
    /// of one second's burst in the shard); excess is dropped and counted as `bandwidth`.
    /// 0: no cap.
    pub allocation_bytes_per_sec: u64,
}

/// The data path's re-check of the peer policy for uturn's own addresses.
///
/// Permissions are per IP (RFC 8656 §9), and control admits a permission for one of uturn's
/// relay IPs so that relay to relay works. The port is what separates another allocation from
/// everything else on the host: on a relay IP only the relayed addresses of live allocations
/// (of every shard; control broadcasts them with [`ShardCommand::SetRelayed`]) are peers, and
/// the host's other sockets there (`sshd`, a resolver's ephemeral port inside the relay range,
/// WireGuard, the listeners themselves) are not. A Send indication or ChannelData to, or a
/// datagram from, any other address of a relay IP, or a listening address, is dropped and
/// counted as `peer_denied` (the data path's only `peer_denied` cause: the policy's
/// `own_address`).
///
/// Cost per packet: a peer IP that is neither one of the few own IPs nor loopback costs a
/// comparison with each of them and nothing more; one that is costs a scan of the listeners
/// and one hash lookup in the shard's table of live relayed addresses. No allocation, no lock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerGuard {
    relay_ips: Vec<IpAddr>,
    listeners: Vec<SocketAddr>,
    allow_loopback: bool,
    /// The relay IPs and the specific listener IPs, without repeats: the one list a peer IP
    /// is compared with per packet.
    own_ips: Vec<IpAddr>,
}

impl PeerGuard {
    /// The guard for relay IPs `relay_ips` (bound and advertised), listening addresses
    /// `listeners` (a wildcard one stands for its port on the relay IPs, the specific
    /// listener IPs and loopback) and `allow_loopback` (`--allow-loopback-peers`: a loopback
    /// relay IP's ports that are not relayed addresses are then not refused; the listeners
    /// still are).
    pub fn new(relay_ips: &[IpAddr], listeners: &[SocketAddr], allow_loopback: bool) -> Self {
        let mut own_ips: Vec<IpAddr> = Vec::with_capacity(relay_ips.len() + listeners.len());
        let specific = listeners
            .iter()
            .map(SocketAddr::ip)
            .filter(|ip| !ip.is_unspecified());
        for ip in relay_ips.iter().copied().chain(specific) {
            if !own_ips.contains(&ip) {
                own_ips.push(ip);
            }
        }
        Self {
            relay_ips: relay_ips.to_vec(),
            listeners: listeners.to_vec(),
            allow_loopback,
            own_ips,
        }
    }

    /// Whether `peer` (canonical: no IPv4-mapped form) may be relayed to or from, as far as
    /// uturn's own addresses go; `is_relayed` says whether an address is the relayed address
    /// of a live allocation (asked only for an address on a relay IP).
    pub fn admits(&self, peer: SocketAddr, is_relayed: impl FnOnce(SocketAddr) -> bool) -> bool {
        let ip = peer.ip();
        let loopback = ip.is_loopback();
        if !loopback && !self.own_ips.contains(&ip) {
            return true;
        }
        let listener = self.listeners.iter().any(|l| {
            l.port() == peer.port()
                && (l.ip() == ip || (l.ip().is_unspecified() && l.is_ipv4() == peer.is_ipv4()))
        });
        if listener {
            return false;
        }
        // Open loopback first: it admits without the hash lookup (labs, tests, benchmarks).
        !self.relay_ips.contains(&ip) || (self.allow_loopback && loopback) || is_relayed(peer)
    }
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            stream_listen: Vec::new(),
            tls: None,
            stream_limits: StreamLimits::default(),
            stream_edge: StreamEdge::default(),
            threads: None,
            pin_threads: true,
            backend: BackendChoice::Auto,
            socket_recv_buffer_bytes: Some(4 << 20),
            socket_send_buffer_bytes: Some(4 << 20),
            buffer_size: 2048,
            send_slots: 1024,
            recv_buffers_free: 1024,
            batch_size: 256,
            control_queue_depth: 4096,
            counters_interval: Duration::from_secs(1),
            publish_counters: true,
            peer_guard: PeerGuard::default(),
            allocation_bytes_per_sec: 0,
        }
    }
}

/// A relay socket the control side bound for an allocation.
#[derive(Debug)]
pub struct RelaySocket {
    /// The bound socket (any blocking mode; the shard makes it non-blocking).
    pub socket: UdpSocket,
    /// The relayed transport address it stands for (as advertised).
    pub addr: SocketAddr,
}

/// A command from the control thread to one shard. Commands are applied in order.
#[derive(Debug)]
#[non_exhaustive]
pub enum ShardCommand {
    /// Send `bytes` to `to` from the listener bound to `server` (a control-built response).
    Transmit {
        /// UDP, or the connection's transport for a stream listener.
        transport: ClientTransport,
        server: SocketAddr,
        to: SocketAddr,
        bytes: Vec<u8>,
    },
    /// Install an allocation for the 5-tuple (`client_server` listener, `client`) and start
    /// receiving on its relay sockets (at most one per address family).
    OpenAllocation {
        alloc: AllocationId,
        /// The client's transport: with `client_server` it names the listener.
        transport: ClientTransport,
        client_server: SocketAddr,
        client: SocketAddr,
        relays: Vec<RelaySocket>,
        /// Set `IP_MTU_DISCOVER=IP_PMTUDISC_DO` / `IPV6_DONTFRAG` on the relay sockets.
        dont_fragment: bool,
    },
    /// Allow peer traffic from/to `peer_ip` (RFC 8656 §9: permissions are per IP, not port).
    SetPermission {
        alloc: AllocationId,
        peer_ip: IpAddr,
    },
    /// Remove a permission.
    RemovePermission {
        alloc: AllocationId,
        peer_ip: IpAddr,
    },
    /// Bind `channel` (0x4000-0x4FFF) to `peer` (RFC 8656 §12).
    BindChannel {
        alloc: AllocationId,
        channel: ChannelNumber,
        peer: SocketAddr,
    },
    /// Unbind `channel`.
    UnbindChannel {
        alloc: AllocationId,
        channel: ChannelNumber,
    },
    /// Remove the allocation, its permissions and channels, and close its relay sockets.
    RemoveAllocation { alloc: AllocationId },
    /// Replace the data path's re-check of uturn's own addresses (the listeners became known,
    /// or a reload changed the peer policy). Applied between batches like every command: the
    /// packet path reads the shard's own copy, with no lock.
    SetPeerGuard(PeerGuard),
    /// `addrs` became (`live`) or stopped being the relayed addresses (bound and advertised)
    /// of an allocation on some shard. Sent to every shard, so that each one's copy of the
    /// live relayed addresses ([`PeerGuard`]) covers the other shards' allocations.
    SetRelayed { addrs: Vec<SocketAddr>, live: bool },
    /// Stop the shard: close its sockets and end its thread.
    Shutdown,
}

/// A message from a shard to the control thread.
#[derive(Debug)]
#[non_exhaustive]
pub enum ToControl {
    /// A STUN message the fast path does not handle (requests, unexpected indications).
    Request {
        shard: ShardId,
        /// How the message arrived; for a stream the (server, client) pair is the connection.
        transport: ClientTransport,
        server: SocketAddr,
        client: SocketAddr,
        bytes: Vec<u8>,
    },
    /// A TCP/TLS connection that sent at least one message to control has closed; over a
    /// stream the 5-tuple is the connection, so its allocation must end (RFC 8656 §3.1).
    ConnectionClosed {
        shard: ShardId,
        transport: ClientTransport,
        server: SocketAddr,
        client: SocketAddr,
    },
    /// Periodic counters, cumulative since the shard (or the allocation) started. Boxed: the
    /// report is many times the size of a request, and every message in the queue would
    /// otherwise take its size (one allocation per report, once per counters interval).
    Counters(Box<Counters>),
}

/// Why a datagram was dropped. `Copy` with a static name, so a metric label costs nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// No allocation for the client's 5-tuple (or for the relay socket).
    NoAllocation,
    /// The peer IP has no permission on the allocation.
    NoPermission,
    /// ChannelData on a channel that is not bound.
    NoChannel,
    /// Not STUN nor ChannelData, or a malformed ChannelData / Send indication.
    Malformed,
    /// Larger than a receive buffer (`MSG_TRUNC`).
    Truncated,
    /// No free send slot, submission queue exhausted, or the control queue is full.
    QueueFull,
    /// The kernel refused the send (ECONNREFUSED, EHOSTUNREACH, EMSGSIZE, ...).
    SendError,
    /// The allocation has no relay socket of the peer's address family.
    FamilyMismatch,
    /// A Send indication or ChannelData to, or a datagram from, an address of uturn's relay
    /// IPs that is not a live allocation's relayed address, or a listening address
    /// ([`PeerGuard`]).
    PeerDenied,
    /// The allocation is over its bandwidth cap
    /// ([`DataPlaneConfig::allocation_bytes_per_sec`]).
    Bandwidth,
    /// A TCP/TLS connection from a source address that already has
    /// `StreamLimits::connections_per_source_max` open ones was closed at accept.
    SourceConnections,
}

impl DropReason {
    /// Every reason, in the order of [`DropCounts`].
    pub const ALL: [Self; 11] = [
        Self::NoAllocation,
        Self::NoPermission,
        Self::NoChannel,
        Self::Malformed,
        Self::Truncated,
        Self::QueueFull,
        Self::SendError,
        Self::FamilyMismatch,
        Self::PeerDenied,
        Self::Bandwidth,
        Self::SourceConnections,
    ];

    /// Static name for metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::NoAllocation => "no_allocation",
            Self::NoPermission => "no_permission",
            Self::NoChannel => "no_channel",
            Self::Malformed => "malformed",
            Self::Truncated => "truncated",
            Self::QueueFull => "queue_full",
            Self::SendError => "send_error",
            Self::FamilyMismatch => "family_mismatch",
            Self::PeerDenied => "peer_denied",
            Self::Bandwidth => "bandwidth",
            Self::SourceConnections => "source_connections",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Drop counts by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounts([u64; DropReason::ALL.len()]);

impl DropCounts {
    /// Drops for one reason.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason.index()]
    }

    /// Sum over all reasons.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// `(reason, count)` for every reason.
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.get(*r)))
    }

    pub(crate) fn add(&mut self, reason: DropReason) {
        self.0[reason.index()] += 1;
    }
}

/// Per-allocation counters (cumulative since `OpenAllocation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocationCounters {
    /// Datagrams relayed client→peer.
    pub to_peer_packets: u64,
    /// Payload bytes relayed client→peer.
    pub to_peer_bytes: u64,
    /// Datagrams relayed peer→client.
    pub to_client_packets: u64,
    /// Payload bytes relayed peer→client.
    pub to_client_bytes: u64,
}

/// Per-shard counters (cumulative since the shard started).
///
/// For the datagrams a shard receives the books balance: `client_datagrams + peer_datagrams =
/// to_peer_packets + to_client_packets + requests + drops.total()`. A relay the kernel refuses
/// after it was queued moves from the relayed counts to `drops` (`send_error` / `queue_full`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardCounters {
    /// Datagrams received on listener sockets.
    pub client_datagrams: u64,
    /// Datagrams received on relay sockets.
    pub peer_datagrams: u64,
    /// Datagrams relayed client→peer (handed to the kernel).
    pub to_peer_packets: u64,
    /// Datagrams relayed peer→client (handed to the kernel).
    pub to_client_packets: u64,
    /// Messages sent to control as `ToControl::Request`.
    pub requests: u64,
    /// `Transmit` commands sent.
    pub transmits: u64,
    /// `Transmit` commands that could not be sent (no slot, or the kernel refused).
    pub transmit_failures: u64,
    /// Drops by reason.
    pub drops: DropCounts,
    /// Event-loop turns.
    pub loop_turns: u64,
    /// Completions (io_uring) or datagrams (mmsg) handled.
    pub completions: u64,
    /// Most completions handled in one loop turn.
    pub completions_per_turn_max: u64,
    /// `io_uring_enter` / `sendmmsg` calls.
    pub submits: u64,
    /// io_uring: submits forced by a full submission queue in the middle of a turn.
    pub sq_full_submits: u64,
    /// Counters reports lost because the control queue was full.
    pub reports_dropped: u64,
    /// Multishot receives re-armed (ended without `MORE`, e.g. the buffer ring ran dry).
    pub rearms: u64,
    /// TCP/TLS connections accepted.
    pub stream_accepted: u64,
    /// Connections refused at accept because the shard had `connections_max` already.
    pub stream_refused: u64,
    /// Connections closed (by the client, an error, a framing error or a timeout).
    pub stream_closed: u64,
    /// Connections closed because they had no allocation after `idle_timeout`.
    pub stream_timeouts: u64,
    /// Plain TCP connections open now (an `auto` connection counts here until its first byte).
    pub stream_open_tcp: u64,
    /// TLS connections open now.
    pub stream_open_tls: u64,
    /// Connections closed because their TLS or framing work panicked (the panic was caught;
    /// see the `contain` module).
    pub connection_panics: u64,
    /// PROXY protocol headers accepted from trusted peers.
    pub proxy_headers: u64,
    /// Connections closed over the PROXY protocol: a header from an untrusted peer, or a
    /// trusted peer's connection without a valid header.
    pub proxy_refused: u64,
    /// TLS connections of a shared `auto` port passed through to the web service.
    pub forwarded_connections: u64,
    /// Bytes passed through client → web service (the PROXY header included).
    pub forwarded_bytes_to_backend: u64,
    /// Bytes passed through web service → client.
    pub forwarded_bytes_to_client: u64,
    /// Passthroughs that failed: the web service refused or broke, a socket error, or the
    /// forwarder was full.
    pub forward_errors: u64,
    /// Passthroughs closed after the idle timeout with no byte moving.
    pub forward_timeouts: u64,
}

/// One counters report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counters {
    /// The reporting shard.
    pub shard: ShardId,
    /// Shard totals.
    pub shard_counters: ShardCounters,
    /// Every live allocation, plus allocations removed since the last report (final values).
    pub allocations: Vec<(AllocationId, AllocationCounters)>,
}

/// The running data plane: shard threads and their command queues.
#[derive(Debug)]
pub struct DataPlane {
    shards: Vec<ShardHandle>,
    backend: Backend,
    backend_reason: String,
    listeners: Vec<SocketAddr>,
    stream_listeners: Vec<StreamListen>,
}

#[derive(Debug)]
struct ShardHandle {
    commands: Sender<ShardCommand>,
    wake: std::fs::File,
    thread: Option<JoinHandle<()>>,
}

impl DataPlane {
    /// Binds the listeners, spawns the pinned shard threads and returns once every shard runs.
    pub fn start(config: DataPlaneConfig) -> Result<(Self, Receiver<ToControl>), DataPlaneError> {
        shard::start(config)
    }

    /// Queues a command for `shard` and wakes it.
    pub fn send(&self, shard: ShardId, command: ShardCommand) -> Result<(), DataPlaneError> {
        let handle = self
            .shards
            .get(usize::from(shard.0))
            .ok_or(DataPlaneError::NoSuchShard { shard: shard.0 })?;
        handle
            .commands
            .send(command)
            .map_err(|_| DataPlaneError::ShardStopped { shard: shard.0 })?;
        shard::wake(&handle.wake).map_err(|source| DataPlaneError::Wake {
            shard: shard.0,
            source,
        })
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The backend that runs and why it was chosen (for the startup log line).
    pub fn backend(&self) -> (Backend, &str) {
        (self.backend, &self.backend_reason)
    }

    /// The bound listener addresses (port 0 resolved), in `DataPlaneConfig::listen` order. Every
    /// shard binds each of them.
    pub fn listener_addrs(&self) -> &[SocketAddr] {
        &self.listeners
    }

    /// The bound stream (TCP) listeners with their kinds, in configuration order (ports resolved).
    pub fn stream_listeners(&self) -> &[StreamListen] {
        &self.stream_listeners
    }

    /// Stops every shard (closing its sockets) and joins the threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for handle in &self.shards {
            // A shard that already stopped has dropped its receiver; nothing to do then.
            if handle.commands.send(ShardCommand::Shutdown).is_ok() {
                let _ = shard::wake(&handle.wake);
            }
        }
        for handle in &mut self.shards {
            if let Some(thread) = handle.thread.take()
                && thread.join().is_err()
            {
                tracing::error!("a shard thread panicked");
            }
        }
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.stop();
    }
}
