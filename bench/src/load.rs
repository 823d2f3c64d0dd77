//! The traffic engine: allocations set up once, then paced steps of open-loop traffic through
//! the relay and back, each step measured on its own.
//!
//! Every worker thread owns a slice of the allocations, one peer socket and one epoll set, and
//! runs one event loop: send what the pacer says is due (grouped per client socket into
//! `sendmmsg` batches), then drain whatever is readable (`recvmmsg`), echoing at the peer and
//! accounting at the client. The loop never blocks longer than the next send is due, and ends
//! at `duration + drain` whatever happens.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use uturn_proto::{
    Attribute, CHANNEL_DATA_HEADER_LEN, ChannelNumber, Class, MessageBuilder, Method, StreamFramer,
    TransactionId, stream_padding, write_channel_data_header,
};

use crate::cpu::CpuMark;
use crate::io::{
    BATCH, Batch, SLOT_LEN, bind_udp, connect_tcp_from, enable_rx_timestamps, realtime_ns,
};
use crate::keeper::{Binding, Keeper, RefreshCounts, Session, is_response};
use crate::pacing::Pacer;
use crate::stats::{Accounting, STAMP_LEN, Stamp, read_hold, write_hold};
use crate::turn::{TurnClient, TurnError, relayed_payload};

/// How client data reaches the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Framing {
    /// ChannelData on a bound channel (RFC 8656 §12), the common case for media.
    Channel,
    /// Send indications out, Data indications back (RFC 8656 §11).
    Send,
    /// The bare forwarder's framing: ChannelData with no TURN state (baseline only).
    Bare,
}

/// What the peer does with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PeerMode {
    /// Sends it back through the relay: round trip, measured at the client.
    Echo,
    /// Keeps it: one way, measured at the peer.
    Sink,
}

/// How each client reaches the server; the relay to the peer is UDP in every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// One UDP socket per allocation.
    Udp,
    /// One TCP connection per allocation, ChannelData padded (RFC 8656 §3.1, §12.5).
    Tcp,
    /// One TLS connection per allocation (rustls), framed as over TCP.
    Tls,
}

impl Transport {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
            Self::Tls => "tls",
        }
    }
}

/// Setup failures.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A TURN exchange failed during setup.
    #[error("allocation {index}: {source}")]
    Turn {
        /// Which allocation.
        index: u32,
        /// The failure.
        source: TurnError,
    },
    /// The bare forwarder refused or did not answer.
    #[error("forwarder hello for flow {index}: {source}")]
    Hello {
        /// Which flow.
        index: u32,
        /// The failure.
        source: std::io::Error,
    },
    /// A socket or epoll call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The failure.
        source: std::io::Error,
    },
    /// The payload cannot hold the stamp or the datagram slot.
    #[error("payload of {0} bytes is outside {STAMP_LEN}..=1400")]
    PayloadSize(usize),
    /// A combination the harness does not run (the bare forwarder over a stream, TLS without
    /// a client configuration).
    #[error("{0}")]
    Unsupported(&'static str),
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> LoadError {
    move |source| LoadError::Io { what, source }
}

fn nix_err(what: &'static str) -> impl FnOnce(nix::Error) -> LoadError {
    move |e| LoadError::Io {
        what,
        source: std::io::Error::from(e),
    }
}

/// Parameters shared by every step of one load run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The TURN server (or forwarder) to load.
    pub server: SocketAddr,
    /// Long-term credentials.
    pub user: String,
    /// Long-term credentials.
    pub pass: String,
    /// Allocations (flows) in all.
    pub allocations: u32,
    /// Application payload per packet, stamp included.
    pub payload_len: usize,
    /// ChannelData, Send indications or bare.
    pub framing: Framing,
    /// Echo or sink.
    pub peer_mode: PeerMode,
    /// Worker threads (event loops).
    pub workers: u32,
    /// Time given to late packets after the last send of a step.
    pub drain: Duration,
    /// Period of the event loop (see [`TICK_MIN_DEFAULT`]).
    pub tick: Duration,
    /// Whether a UDP client sends the datagrams it has due in one turn as one UDP GSO send
    /// (see [`Batch::with_gso`]); the echo peer too, for runs of datagrams to one relay.
    pub gso: bool,
    /// UDP, TCP or TLS between the clients and the server.
    pub transport: Transport,
    /// TLS: the client configuration (trust, ALPN) and the name the certificate must carry.
    pub tls: Option<(Arc<rustls::ClientConfig>, String)>,
    /// LIFETIME asked for in each Allocate and Refresh (`None`: the server's default).
    pub lifetime_secs: Option<u32>,
    /// Time between two refreshes of one allocation, its permission and its channel while the
    /// traffic flows (see [`crate::keeper`]); shortened to half the granted lifetime when that
    /// is shorter.
    pub refresh_period: Duration,
}

/// The counters of one step, summed over workers.
#[derive(Debug)]
pub struct StepRaw {
    /// Offered rate asked for.
    pub target_pps: f64,
    /// Sending period.
    pub duration: Duration,
    /// Packets handed to the kernel.
    pub sent: u64,
    /// Packets the generator failed to send (its own socket buffer full): not offered.
    pub send_failed: u64,
    /// What arrived where it is accounted (the client when echoing, the peer when sinking).
    pub accounting: Accounting,
    /// Packets the peer received (the first relayed leg).
    pub peer_received: u64,
    /// Server CPU seconds during the step, when its pid is known.
    pub server_cpu_secs: Option<f64>,
    /// This process's CPU seconds during the step.
    pub own_cpu_secs: Option<f64>,
    /// Wall time of the step, drain included.
    pub wall: Duration,
    /// Worst pacing lag seen: how far the sender fell behind schedule.
    pub lag_max: Duration,
    /// Of `sent` and the echoes, the datagrams that left inside UDP GSO sends.
    pub gso_datagrams: u64,
    /// Period of the event loop during the step.
    pub tick: Duration,
    /// What keeping the allocations alive took during the step.
    pub refreshes: RefreshCounts,
}

impl StepRaw {
    /// Packets the relay forwarded, both legs: client→peer as seen by the peer, plus peer→client
    /// as seen by the client when echoing.
    pub fn relayed_packets(&self, peer_mode: PeerMode) -> u64 {
        match peer_mode {
            PeerMode::Echo => self.peer_received + self.accounting.received,
            PeerMode::Sink => self.peer_received,
        }
    }
}

struct Flow {
    link: FlowLink,
    channel: ChannelNumber,
    peer: SocketAddr,
    /// The credentials the server last accepted (the setup's, then renewed by the keeper),
    /// for refreshes and the teardown's Refresh; `None` for the bare forwarder.
    session: Option<Session>,
    /// The lifetime the server granted, when it said.
    granted_lifetime_secs: Option<u32>,
}

/// A client's connection to the server.
enum FlowLink {
    Udp(UdpSocket),
    Stream(Box<StreamLink>),
}

/// A TCP or TLS client connection in the traffic loop (non-blocking).
struct StreamLink {
    tcp: TcpStream,
    /// The TLS session over `tcp`, if TLS.
    tls: Option<rustls::ClientConnection>,
    /// Bytes received and not yet framed.
    framer: StreamFramer,
    /// Frames (or the rest of one) not yet taken by the socket or the TLS session, bounded by
    /// [`STREAM_BACKLOG_MAX`].
    out: Vec<u8>,
    /// Whether the flow is on the worker's list of flows with bytes to write.
    backlogged: bool,
    /// The connection failed or closed: nothing more is sent or read on it.
    closed: bool,
}

impl Flow {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match &self.link {
            FlowLink::Udp(s) => s.as_fd(),
            FlowLink::Stream(s) => s.tcp.as_fd(),
        }
    }
}

impl StreamLink {
    /// Writes what `out` holds until the socket would block; `Err` when the connection broke.
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.tls {
            None => {
                let mut written = 0;
                while written < self.out.len() {
                    match self.tcp.write(&self.out[written..]) {
                        Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                        Ok(n) => written += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                self.out.drain(..written);
            }
            Some(conn) => {
                if !self.out.is_empty() {
                    // rustls takes what fits under its buffer limit; the rest waits here.
                    let n = conn.writer().write(&self.out)?;
                    self.out.drain(..n);
                }
                while conn.wants_write() {
                    match conn.write_tls(&mut self.tcp) {
                        Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether bytes are waiting to be written (here or in the TLS session).
    fn has_backlog(&self) -> bool {
        !self.out.is_empty() || self.tls.as_ref().is_some_and(|c| c.wants_write())
    }

    /// Reads what the socket has (at most [`STREAM_READS_PER_TURN`] reads) into the framer and
    /// hands every whole frame to `frame`. `Err` when the connection closed or broke.
    fn read_frames(&mut self, mut frame: impl FnMut(&[u8])) -> std::io::Result<()> {
        for _ in 0..STREAM_READS_PER_TURN {
            let got = match &mut self.tls {
                None => match self.tcp.read(self.framer.spare_capacity_mut()) {
                    Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => {
                        self.framer.commit(n);
                        n
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                },
                Some(conn) => {
                    let tls_read = match conn.read_tls(&mut self.tcp) {
                        Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    };
                    conn.process_new_packets()
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                    let mut plain = 0;
                    loop {
                        match conn.reader().read(self.framer.spare_capacity_mut()) {
                            Ok(0) => break,
                            Ok(n) => {
                                self.framer.commit(n);
                                plain += n;
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(e),
                        }
                    }
                    tls_read.max(plain)
                }
            };
            loop {
                match self.framer.pop() {
                    Ok(Some(f)) => frame(f),
                    Ok(None) => break,
                    Err(e) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("stream framing: {e:?}"),
                        ));
                    }
                }
            }
            if got == 0 {
                break;
            }
        }
        Ok(())
    }
}

/// One worker's allocations and sockets.
struct Worker {
    flows: Vec<Flow>,
    peer_socket: UdpSocket,
    epoll: Epoll,
    next_seq: u64,
    /// Refreshes the flows' allocations; `None` for the bare forwarder.
    keeper: Option<Keeper>,
    /// STUN responses received on flows, for the keeper: (flow, message).
    answers: Vec<(usize, Vec<u8>)>,
}

/// A set of set-up allocations, ready to carry traffic steps.
pub struct LoadRun {
    config: LoadConfig,
    workers: Vec<Worker>,
}

/// epoll token of a worker's peer socket; flows use their index.
const PEER_TOKEN: u64 = u64::MAX;
/// Default period of the event loop. The loop wakes once per tick, sends what is due, and
/// reads whatever arrived, instead of waking for every datagram: a wake-up costs more than a
/// datagram, and at 100 kpps per-packet wake-ups made the generator its own bottleneck.
/// Latency stays honest because it is measured from the send stamp to the kernel's arrival
/// stamp (SO_TIMESTAMPNS), not to the moment the loop reads the socket; only the spacing of
/// packets gets burstier (up to one tick's worth at once).
pub const TICK_MIN_DEFAULT: Duration = Duration::from_micros(100);
/// Default period of the event loop in a sweep's search for the knee: at 1 ms a `small`
/// client (64 allocations) has two or more datagrams due per turn from about 130 kpps on,
/// enough for GSO sends to take the generator past the servers it measures (bench/README.md,
/// "Limits of this machine").
pub const SEARCH_TICK_DEFAULT: Duration = Duration::from_millis(1);
/// Packets sent per loop turn at most, so receiving is never starved by a late sender.
const SEND_PER_TURN_MAX: u64 = 16 * BATCH as u64;
/// Datagram batches read from one ready socket per loop turn at most.
const RECV_BATCHES_PER_SOCKET: usize = 4;
/// Longest time spent deleting allocations after a run.
const TEARDOWN_MAX: Duration = Duration::from_secs(5);
/// Allocations in one worker at most: each is a socket.
pub const ALLOCATIONS_MAX: u32 = 20_000;
/// Bytes a stream client holds for a server that does not read fast enough. Past it, a new
/// packet is dropped here, as a full socket buffer drops a datagram, and counts as lost.
const STREAM_BACKLOG_MAX: usize = 256 * 1024;
/// Reads of one ready stream per loop turn at most.
const STREAM_READS_PER_TURN: usize = 8;
/// Time for connecting and completing a TLS handshake during setup.
const STREAM_SETUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The loopback address of `server`'s family, for client and peer sockets.
pub fn local_ip_for(server: SocketAddr) -> IpAddr {
    match server {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

impl LoadRun {
    /// Sets up every allocation: TURN handshake (401, authenticated Allocate, CreatePermission,
    /// ChannelBind) or the forwarder's hello. `progress` is called after each.
    pub fn setup(config: LoadConfig, progress: &dyn Fn(u64)) -> Result<Self, LoadError> {
        if !(STAMP_LEN..=1400).contains(&config.payload_len) {
            return Err(LoadError::PayloadSize(config.payload_len));
        }
        if config.transport != Transport::Udp && config.framing == Framing::Bare {
            return Err(LoadError::Unsupported("the bare forwarder speaks UDP only"));
        }
        if config.transport == Transport::Tls && config.tls.is_none() {
            return Err(LoadError::Unsupported("TLS needs a client configuration"));
        }
        let workers_n = config.workers.clamp(1, 64);
        let allocations = config.allocations.clamp(1, ALLOCATIONS_MAX);
        let ip = local_ip_for(config.server);
        let mut workers = Vec::new();
        let mut index = 0u32;
        for w in 0..workers_n {
            let share = allocations / workers_n + u32::from(w < allocations % workers_n);
            let peer_socket = bind_udp(ip).map_err(io_err("bind peer socket"))?;
            let peer = peer_socket.local_addr().map_err(io_err("peer address"))?;
            let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(nix_err("epoll"))?;
            let mut flows = Vec::new();
            for _ in 0..share {
                let flow = setup_flow(&config, peer, index)?;
                flows.push(flow);
                index += 1;
                progress(1);
            }
            for (i, f) in flows.iter().enumerate() {
                match &f.link {
                    FlowLink::Udp(socket) => {
                        enable_rx_timestamps(socket);
                        socket
                            .set_nonblocking(true)
                            .map_err(io_err("nonblocking"))?;
                    }
                    FlowLink::Stream(s) => {
                        s.tcp
                            .set_read_timeout(None)
                            .map_err(io_err("read timeout"))?;
                        s.tcp.set_nonblocking(true).map_err(io_err("nonblocking"))?;
                    }
                }
                epoll
                    .add(f.fd(), EpollEvent::new(EpollFlags::EPOLLIN, i as u64))
                    .map_err(nix_err("epoll add"))?;
            }
            peer_socket
                .set_nonblocking(true)
                .map_err(io_err("nonblocking"))?;
            enable_rx_timestamps(&peer_socket);
            epoll
                .add(
                    peer_socket.as_fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN, PEER_TOKEN),
                )
                .map_err(nix_err("epoll add"))?;
            let keeper = keeper_for(&config, peer, &flows);
            workers.push(Worker {
                flows,
                peer_socket,
                epoll,
                next_seq: 0,
                keeper,
                answers: Vec::new(),
            });
        }
        Ok(Self { config, workers })
    }

    /// The configuration.
    pub fn config(&self) -> &LoadConfig {
        &self.config
    }

    /// Runs one step at `rate_pps` (total) for `duration`, then drains; `server_pid` gives the
    /// server's CPU; `stop` ends it early (Ctrl-C), still bounded.
    pub fn step(
        &mut self,
        rate_pps: f64,
        duration: Duration,
        tick: Duration,
        server_pid: Option<u32>,
        stop: &AtomicBool,
    ) -> StepRaw {
        let n = self.workers.len().max(1) as f64;
        let config = &self.config;
        let before = CpuMark::now(server_pid);
        let start = Instant::now();
        let results: Vec<WorkerStep> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .workers
                .iter_mut()
                .map(|w| {
                    scope.spawn(move || w.run_step(config, rate_pps / n, duration, tick, stop))
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        let wall = start.elapsed();
        let (server_cpu_secs, own_cpu_secs) = before.since(&CpuMark::now(server_pid));
        let mut accounting = Accounting::new(0, 0, 0);
        let (mut sent, mut send_failed, mut peer_received) = (0, 0, 0);
        let mut lag_max = Duration::ZERO;
        let mut gso_datagrams = 0;
        let mut refreshes = RefreshCounts::default();
        for r in &results {
            gso_datagrams += r.gso_datagrams;
            refreshes.add(&r.refreshes);
            accounting.merge_totals(&r.accounting);
            sent += r.sent;
            send_failed += r.send_failed;
            peer_received += r.peer_received;
            lag_max = lag_max.max(r.lag_max);
        }
        StepRaw {
            target_pps: rate_pps,
            duration,
            sent,
            send_failed,
            accounting,
            peer_received,
            server_cpu_secs,
            own_cpu_secs,
            wall,
            lag_max,
            gso_datagrams,
            tick,
            refreshes,
        }
    }

    /// Deletes every allocation (Refresh 0), best effort, so a server's quota is free for the
    /// next run. Bounded: one short request per allocation.
    pub fn teardown(self) {
        if self.config.framing == Framing::Bare {
            return;
        }
        // Bounded in time too: a server that stopped answering must not hold the run for
        // (allocations × timeout); what is left expires on the server by itself.
        let deadline = crate::instant_after(Instant::now(), TEARDOWN_MAX);
        for w in self.workers {
            for f in w.flows {
                let socket = match f.link {
                    FlowLink::Udp(socket) => socket,
                    // RFC 8656 §3.1: closing the connection ends its allocation.
                    FlowLink::Stream(mut s) => {
                        if let Some(conn) = &mut s.tls {
                            conn.send_close_notify();
                            let _ = conn.write_tls(&mut s.tcp);
                        }
                        continue;
                    }
                };
                if Instant::now() >= deadline {
                    return;
                }
                let _ = socket.set_nonblocking(false);
                if let Ok(mut c) = TurnClient::udp(
                    socket,
                    self.config.server,
                    &self.config.user,
                    &self.config.pass,
                ) {
                    c.timeout = Duration::from_millis(300);
                    if let Some(session) = f.session {
                        let _ = c.set_credentials(session.realm, session.nonce);
                    }
                    let _ = c.delete();
                }
            }
        }
    }
}

/// The local address of stream client `index`: over IPv4 one loopback address per client
/// (127.2.0.1-127.2.249.250, then again), as many clients would have, so that a per-source
/// connection limit does not cap the load.
fn stream_client_ip(server: SocketAddr, index: u32) -> IpAddr {
    match server {
        SocketAddr::V4(_) => {
            let a = ((index / 250) % 250) as u8;
            let b = (index % 250) as u8 + 1;
            IpAddr::V4(Ipv4Addr::new(127, 2, a, b))
        }
        SocketAddr::V6(_) => local_ip_for(server),
    }
}

fn setup_flow(config: &LoadConfig, peer: SocketAddr, index: u32) -> Result<Flow, LoadError> {
    let channel = ChannelNumber::MIN;
    let turn = |source| LoadError::Turn { index, source };
    if config.transport != Transport::Udp {
        let tcp = connect_tcp_from(
            stream_client_ip(config.server, index),
            config.server,
            STREAM_SETUP_TIMEOUT,
        )
        .map_err(io_err("connect"))?;
        let mut client = match &config.tls {
            Some((tls, name)) if config.transport == Transport::Tls => TurnClient::over_tls(
                tcp,
                config.server,
                name,
                Arc::clone(tls),
                &config.user,
                &config.pass,
                STREAM_SETUP_TIMEOUT,
            ),
            _ => TurnClient::over_tcp(tcp, config.server, &config.user, &config.pass),
        }
        .map_err(turn)?;
        let granted_lifetime_secs = client
            .allocate_for(config.lifetime_secs)
            .map_err(turn)?
            .lifetime_secs;
        client.create_permission(peer).map_err(turn)?;
        if config.framing == Framing::Channel {
            client.channel_bind(channel, peer).map_err(turn)?;
        }
        let session = session_of(config, &client);
        let (tcp, tls, framer) = client
            .into_stream()
            .ok_or(LoadError::Unsupported("a stream client without a stream"))?;
        return Ok(Flow {
            link: FlowLink::Stream(Box::new(StreamLink {
                tcp,
                tls,
                framer,
                out: Vec::with_capacity(STREAM_BACKLOG_MAX),
                backlogged: false,
                closed: false,
            })),
            channel,
            peer,
            session,
            granted_lifetime_secs,
        });
    }
    let ip = local_ip_for(config.server);
    let socket = bind_udp(ip).map_err(io_err("bind client socket"))?;
    if config.framing == Framing::Bare {
        socket.connect(config.server).map_err(io_err("connect"))?;
        crate::forwarder::hello(&socket, peer)
            .map_err(|source| LoadError::Hello { index, source })?;
        return Ok(Flow {
            link: FlowLink::Udp(socket),
            channel,
            peer,
            session: None,
            granted_lifetime_secs: None,
        });
    }
    let mut client =
        TurnClient::udp(socket, config.server, &config.user, &config.pass).map_err(turn)?;
    let granted_lifetime_secs = client
        .allocate_for(config.lifetime_secs)
        .map_err(turn)?
        .lifetime_secs;
    client.create_permission(peer).map_err(turn)?;
    if config.framing == Framing::Channel {
        client.channel_bind(channel, peer).map_err(turn)?;
    }
    let session = session_of(config, &client);
    let socket = client.into_udp_socket().ok_or_else(|| LoadError::Io {
        what: "client socket",
        source: std::io::Error::other("not a UDP client"),
    })?;
    Ok(Flow {
        link: FlowLink::Udp(socket),
        channel,
        peer,
        session,
        granted_lifetime_secs,
    })
}

/// The credentials a set-up client authenticated with.
fn session_of(config: &LoadConfig, client: &TurnClient) -> Option<Session> {
    let (realm, nonce) = client.credentials()?;
    Session::new(&config.user, &config.pass, realm, nonce)
}

/// The keeper of one worker's flows, set up by now: each flow refreshed every
/// `config.refresh_period`, or every half of the shortest granted lifetime when that is
/// shorter. `None` for the bare forwarder, which has nothing to refresh.
fn keeper_for(config: &LoadConfig, peer: SocketAddr, flows: &[Flow]) -> Option<Keeper> {
    if config.framing == Framing::Bare {
        return None;
    }
    let binding = match config.framing {
        Framing::Send => Binding::Permission(peer),
        _ => Binding::Channel(
            flows.first().map_or(ChannelNumber::MIN, |f| f.channel),
            peer,
        ),
    };
    let shortest = flows
        .iter()
        .filter_map(|f| f.granted_lifetime_secs)
        .min()
        .map(|secs| Duration::from_secs(u64::from(secs.max(2)) / 2));
    let period = shortest.map_or(config.refresh_period, |half| {
        half.min(config.refresh_period)
    });
    Some(Keeper::new(
        &config.user,
        &config.pass,
        config.lifetime_secs,
        binding,
        flows.len(),
        period,
        Instant::now(),
    ))
}

struct WorkerStep {
    sent: u64,
    send_failed: u64,
    peer_received: u64,
    accounting: Accounting,
    lag_max: Duration,
    gso_datagrams: u64,
    refreshes: RefreshCounts,
}

impl Worker {
    fn run_step(
        &mut self,
        config: &LoadConfig,
        rate_pps: f64,
        duration: Duration,
        tick: Duration,
        stop: &AtomicBool,
    ) -> WorkerStep {
        let flows_n = self.flows.len().max(1) as u32;
        let mut pacer = Pacer::new(rate_pps, duration);
        let base = self.next_seq;
        let mut out = WorkerStep {
            sent: 0,
            send_failed: 0,
            peer_received: 0,
            accounting: Accounting::new(base, pacer.limit(), flows_n),
            lag_max: Duration::ZERO,
            gso_datagrams: 0,
            refreshes: RefreshCounts::default(),
        };
        let refreshes_before = self.keeper.as_ref().map(Keeper::counts).unwrap_or_default();
        // Separate batches for sending and receiving: nix's recvmmsg relies on the address
        // fields its headers were preallocated with, which a sendmmsg on the same headers
        // overwrites.
        let sending = || {
            if config.gso {
                Batch::with_gso()
            } else {
                Batch::new()
            }
        };
        let mut batch = sending();
        let mut inbox = Batch::new();
        let mut echo = sending();
        let mut scratch = vec![0u8; config.payload_len];
        // Stream flows with bytes the socket did not take yet, retried every turn.
        let mut backlog: Vec<usize> = Vec::new();
        let mut events = vec![EpollEvent::empty(); 256];
        // Timer slack (50 µs by default) would delay every wake-up of this loop, and so every
        // latency sample; ask for 1 µs. Best effort: a failure only costs precision.
        let _ = nix::sys::prctl::set_timerslack(1_000);
        let start = Instant::now();
        let hard_end = crate::instant_after(start, duration.saturating_add(config.drain));
        loop {
            let now = Instant::now();
            if now >= hard_end || stop.load(Ordering::Relaxed) {
                break;
            }
            let elapsed = now - start;
            let due = pacer.due(elapsed).min(SEND_PER_TURN_MAX);
            if due > 0 {
                out.lag_max = out.lag_max.max(pacer.lag(elapsed));
                let k0 = base + pacer.issued();
                self.send_due(
                    config,
                    k0,
                    due,
                    &mut batch,
                    &mut scratch,
                    &mut backlog,
                    &mut out,
                );
                pacer.issue(due);
            }
            if !backlog.is_empty() {
                self.flush_backlog(&mut backlog);
            }
            if pacer.is_done() && out.accounting.received + out.send_failed >= pacer.limit() {
                break; // everything came back: no need to wait for the drain to pass
            }
            // Read everything waiting, without blocking, then sleep out the rest of the tick.
            let ready = self
                .epoll
                .wait(&mut events, EpollTimeout::ZERO)
                .unwrap_or(0);
            for ev in &events[..ready] {
                self.receive(config, ev.data(), &mut inbox, &mut echo, &mut out);
            }
            self.keep(Instant::now(), &mut backlog, &mut out);
            if ready == events.len() {
                continue; // more sockets may be ready than one wait reports
            }
            let next_tick = crate::instant_after(now, tick);
            let after = Instant::now();
            if next_tick > after {
                std::thread::sleep(next_tick - after);
            }
        }
        self.next_seq = base + pacer.limit();
        out.gso_datagrams = batch.gso_datagrams() + echo.gso_datagrams();
        if let Some(k) = &self.keeper {
            out.refreshes = k.counts().since(&refreshes_before);
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn send_due(
        &mut self,
        config: &LoadConfig,
        k0: u64,
        due: u64,
        batch: &mut Batch,
        scratch: &mut [u8],
        backlog: &mut Vec<usize>,
        out: &mut WorkerStep,
    ) {
        let n = self.flows.len() as u64;
        if n == 0 {
            return;
        }
        let mut frame = [0u8; SLOT_LEN];
        for offset in 0..due.min(n) {
            let flow_index = ((k0 + offset) % n) as usize;
            let Some(flow) = self.flows.get_mut(flow_index) else {
                continue;
            };
            let count = (due - offset).div_ceil(n);
            let stamp = |j: u64| Stamp {
                flow: flow_index as u32,
                seq: k0 + offset + j * n,
                // Stamped per packet (a vDSO clock read), so a burst's last packet does not
                // carry its first packet's time.
                sent_ns: realtime_ns(),
            };
            match &mut flow.link {
                FlowLink::Udp(socket) => {
                    for j in 0..count {
                        let written = batch.slot().and_then(|slot| {
                            write_packet(
                                config,
                                flow.channel,
                                flow.peer,
                                stamp(j),
                                slot,
                                scratch,
                                false,
                            )
                        });
                        match written {
                            Some(len) => batch.commit(len, None),
                            None => out.send_failed += 1,
                        }
                        if batch.is_full() {
                            let (s, f) = batch.send(socket);
                            out.sent += s;
                            out.send_failed += f;
                        }
                    }
                    let (s, f) = batch.send(socket);
                    out.sent += s;
                    out.send_failed += f;
                }
                FlowLink::Stream(link) => {
                    for j in 0..count {
                        let Some(len) = write_packet(
                            config,
                            flow.channel,
                            flow.peer,
                            stamp(j),
                            &mut frame,
                            scratch,
                            true,
                        ) else {
                            out.send_failed += 1;
                            continue;
                        };
                        // Offered either way: a packet that finds the connection closed or
                        // its backlog full is lost on the way, like a datagram dropped by a
                        // full socket buffer, and shows as loss.
                        out.sent += 1;
                        if !link.closed && link.out.len() + len <= STREAM_BACKLOG_MAX {
                            link.out.extend_from_slice(&frame[..len]);
                        }
                    }
                    if link.closed {
                        continue;
                    }
                    if let Err(e) = link.flush() {
                        close_stream(link, flow_index, &e);
                    } else if link.has_backlog() && !link.backlogged {
                        link.backlogged = true;
                        backlog.push(flow_index);
                    }
                }
            }
        }
    }

    /// Runs the keeper (see [`crate::keeper`]): reads the answers received this turn, renews
    /// stale nonces, retransmits what went unanswered, starts the refreshes due, and sends
    /// what that produced on the flows' own connections. Costs one time comparison when
    /// nothing is due.
    fn keep(&mut self, now: Instant, backlog: &mut Vec<usize>, out: &mut WorkerStep) {
        let Some(keeper) = self.keeper.as_mut() else {
            return;
        };
        let flows = &mut self.flows;
        for (flow, bytes) in self.answers.drain(..) {
            let answered = flows
                .get(flow)
                .and_then(|f| f.session.as_ref())
                .is_some_and(|s| keeper.on_response(flow, &bytes, s));
            if !answered {
                out.accounting.foreign += 1;
            }
        }
        if keeper.is_busy() {
            for renewal in keeper.take_renewals() {
                if let Some(s) = flows
                    .get_mut(renewal.flow())
                    .and_then(|f| f.session.as_mut())
                {
                    keeper.renew(renewal, s, now);
                }
            }
            while let Some(pending) = keeper.expired(now) {
                if let Some(s) = flows.get(pending.flow()).and_then(|f| f.session.as_ref()) {
                    keeper.retransmit(pending, s, now);
                }
            }
        }
        while let Some(flow) = keeper.due(now) {
            if let Some(s) = flows.get(flow).and_then(|f| f.session.as_ref()) {
                keeper.refresh(flow, s, now);
            }
        }
        keeper.turn_done();
        let outbox = keeper.take_outbox();
        for (flow, bytes) in &outbox {
            match flows.get_mut(*flow).map(|f| &mut f.link) {
                // A request the socket does not take is retransmitted on its timeout.
                Some(FlowLink::Udp(socket)) => {
                    let _ = socket.send(bytes);
                }
                Some(FlowLink::Stream(link)) if !link.closed => {
                    if link.out.len() + bytes.len() <= STREAM_BACKLOG_MAX {
                        link.out.extend_from_slice(bytes);
                    }
                    if let Err(e) = link.flush() {
                        close_stream(link, *flow, &e);
                    } else if link.has_backlog() && !link.backlogged {
                        link.backlogged = true;
                        backlog.push(*flow);
                    }
                }
                Some(FlowLink::Stream(_)) | None => {}
            }
        }
        keeper.return_outbox(outbox);
    }

    /// Retries the writes the sockets did not take; keeps the flows still behind.
    fn flush_backlog(&mut self, backlog: &mut Vec<usize>) {
        backlog.retain(|&i| {
            let Some(FlowLink::Stream(link)) = self.flows.get_mut(i).map(|f| &mut f.link) else {
                return false;
            };
            if link.closed {
                link.backlogged = false;
                return false;
            }
            if let Err(e) = link.flush() {
                close_stream(link, i, &e);
            }
            link.backlogged = !link.closed && link.has_backlog();
            link.backlogged
        });
    }

    fn receive(
        &mut self,
        config: &LoadConfig,
        token: u64,
        batch: &mut Batch,
        echo: &mut Batch,
        out: &mut WorkerStep,
    ) {
        let socket = if token == PEER_TOKEN {
            &self.peer_socket
        } else {
            match self.flows.get_mut(token as usize).map(|f| &mut f.link) {
                Some(FlowLink::Udp(socket)) => &*socket,
                Some(FlowLink::Stream(link)) => {
                    if link.closed {
                        return;
                    }
                    let accounting = &mut out.accounting;
                    let keeping = self.keeper.is_some();
                    let answers = &mut self.answers;
                    let read = link.read_frames(|frame| {
                        // No kernel arrival stamp on a stream: the read time stands in, so
                        // latency over TCP and TLS includes up to one loop tick.
                        let now_ns = realtime_ns();
                        match relayed_payload(frame) {
                            Some(payload) => account(accounting, payload, now_ns),
                            None if keeping && is_response(frame) => {
                                answers.push((token as usize, frame.to_vec()));
                            }
                            None => accounting.foreign += 1,
                        }
                    });
                    if let Err(e) = read {
                        let fd = link.tcp.as_fd();
                        let _ = self.epoll.delete(fd);
                        close_stream(link, token as usize, &e);
                    } else if link.has_backlog() {
                        // TLS may owe the server bytes after reading (a key update).
                        if let Err(e) = link.flush() {
                            close_stream(link, token as usize, &e);
                        }
                    }
                    return;
                }
                None => return,
            }
        };
        for _ in 0..RECV_BATCHES_PER_SOCKET {
            let got = batch.recv(socket).unwrap_or(0);
            if got == 0 {
                break;
            }
            let read_ns = realtime_ns();
            for i in 0..got {
                let Some((bytes, from)) = batch.get(i) else {
                    continue;
                };
                // The kernel's arrival stamp when the socket has one, else the read time.
                let now_ns = match batch.rx_ns(i) {
                    0 => read_ns,
                    rx => rx,
                };
                if token == PEER_TOKEN {
                    out.peer_received += 1;
                    match config.peer_mode {
                        PeerMode::Echo => {
                            // Echo with the time this peer held the packet, which the client
                            // subtracts: the harness's own turnaround is not the relay's.
                            let hold = realtime_ns().saturating_sub(now_ns);
                            let n = bytes.len();
                            if let Some(slot) = echo.slot() {
                                if n <= slot.len() {
                                    slot[..n].copy_from_slice(bytes);
                                    write_hold(&mut slot[..n], hold);
                                    echo.commit(n, from);
                                }
                            }
                        }
                        PeerMode::Sink => account(&mut out.accounting, bytes, now_ns),
                    }
                } else if let Some(payload) = relayed_payload(bytes) {
                    account(&mut out.accounting, payload, now_ns);
                } else if self.keeper.is_some() && is_response(bytes) {
                    // A refresh's answer: rare, so copying it out costs nothing that matters.
                    self.answers.push((token as usize, bytes.to_vec()));
                } else {
                    out.accounting.foreign += 1;
                }
            }
            if !echo.is_empty() {
                let (_, failed) = echo.send(&self.peer_socket);
                // An echo the peer could not send is a loss on the way back; it shows as such.
                let _ = failed;
            }
            if got < BATCH {
                break;
            }
        }
    }
}

fn account(acc: &mut Accounting, payload: &[u8], now_ns: u64) {
    match Stamp::read(payload) {
        Some(s) => acc.record(
            s,
            now_ns
                .saturating_sub(s.sent_ns)
                .saturating_sub(read_hold(payload)),
        ),
        None => acc.foreign += 1,
    }
}

/// A stream connection failed or closed: nothing more is sent on it (what would have been is
/// lost), and the run says so once.
fn close_stream(link: &mut StreamLink, flow: usize, error: &std::io::Error) {
    if !link.closed {
        link.closed = true;
        link.out.clear();
        eprintln!("uturn-bench: flow {flow}: connection lost: {error}");
    }
}

/// Writes one packet for a flow (ChannelData on `channel`, or a Send indication to `peer`)
/// into `buf`, padded to a multiple of four on a stream (RFC 8656 §12.5); its length, or
/// `None` if it did not fit.
fn write_packet(
    config: &LoadConfig,
    channel: ChannelNumber,
    peer: SocketAddr,
    stamp: Stamp,
    buf: &mut [u8],
    scratch: &mut [u8],
    padded: bool,
) -> Option<usize> {
    let len = config.payload_len;
    match config.framing {
        Framing::Channel | Framing::Bare => {
            let end = CHANNEL_DATA_HEADER_LEN + len;
            let padding = if padded { stream_padding(len) } else { 0 };
            if end + padding > buf.len() || write_channel_data_header(buf, channel, len).is_err() {
                return None;
            }
            if !stamp.write(&mut buf[CHANNEL_DATA_HEADER_LEN..end]) {
                return None;
            }
            buf[end..end + padding].fill(0);
            Some(end + padding)
        }
        Framing::Send => {
            // STUN messages are multiples of four bytes already.
            if !stamp.write(scratch) {
                return None;
            }
            let mut tid = [0u8; 12];
            tid[..8].copy_from_slice(&stamp.seq.to_be_bytes());
            tid[8..].copy_from_slice(&stamp.flow.to_be_bytes());
            let mut b =
                MessageBuilder::new(buf, Class::Indication, Method::SEND, TransactionId(tid));
            b.attribute(&Attribute::XorPeerAddress(peer))
                .and_then(|b| b.attribute(&Attribute::Data(scratch)))
                .ok()?;
            Some(b.finish())
        }
    }
}

/// A background churn of allocations (create, then delete) at `per_sec`, while traffic flows.
pub struct Churn {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    abandoned: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What a churn did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChurnCounts {
    /// Allocations made, deleted or abandoned (failures not included).
    pub made: u64,
    /// Of those, left to expire on the server.
    pub abandoned: u64,
    /// Handshakes (or deletions) that failed.
    pub failed: u64,
}

/// Whether churned allocation `n` is left to expire: every second one when abandoning.
pub fn churn_abandons(abandon: bool, n: u64) -> bool {
    abandon && n % 2 == 1
}

impl Churn {
    /// Starts churning against `server`; stops by itself after `max_duration`. With `abandon`,
    /// every second allocation is not deleted but left to expire, so the server's expiry runs
    /// beside its deletions.
    pub fn start(
        server: SocketAddr,
        user: &str,
        pass: &str,
        per_sec: f64,
        max_duration: Duration,
        abandon: bool,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let abandoned = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (user, pass) = (user.to_owned(), pass.to_owned());
        let thread = {
            let (stop, done, abandoned, failed) = (
                Arc::clone(&stop),
                Arc::clone(&done),
                Arc::clone(&abandoned),
                Arc::clone(&failed),
            );
            std::thread::spawn(move || {
                let mut pacer = Pacer::new(per_sec, max_duration);
                let start = Instant::now();
                while !stop.load(Ordering::Relaxed) && !pacer.is_done() {
                    if pacer.due(start.elapsed()) == 0 {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    let n = pacer.issued();
                    pacer.issue(1);
                    let leave = churn_abandons(abandon, n);
                    let ok = if leave {
                        crate::alloc::allocate_and_abandon(server, &user, &pass, n).is_ok()
                    } else {
                        crate::alloc::allocate_and_delete(server, &user, &pass, n).is_ok()
                    };
                    let counter = if ok { &done } else { &failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                    if ok && leave {
                        abandoned.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        Self {
            stop,
            done,
            abandoned,
            failed,
            thread: Some(thread),
        }
    }

    /// Stops and returns what was done.
    pub fn finish(mut self) -> ChurnCounts {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        ChurnCounts {
            made: self.done.load(Ordering::Relaxed),
            abandoned: self.abandoned.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abandoning_churn_leaves_every_second_allocation() {
        let left: Vec<u64> = (0..6).filter(|&n| churn_abandons(true, n)).collect();
        assert_eq!(left, vec![1, 3, 5]);
        assert!((0..6).all(|n| !churn_abandons(false, n)));
    }
}
