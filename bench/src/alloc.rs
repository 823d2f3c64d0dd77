//! `alloc` mode: full authenticated allocations per second.
//!
//! ```text
//!  worker thread (--workers), one epoll set, --concurrency / workers handshakes in flight:
//!    fresh non-blocking UDP socket on source 127.1.a.b (--sources addresses, round robin)
//!    Handshake (sans-IO, below):
//!      Allocate ──► 401 + REALM, NONCE ──► Allocate + credentials ──► success (timed up to here)
//!        ──► Refresh LIFETIME 0 ──► success: done; the socket rests open a while (PORTS_HELD)
//!      each request retransmitted (100 ms, doubling, at most TRANSMISSIONS_MAX) and given up
//!      TRANSACTION_TIMEOUT after its first transmission; 438 renews the nonce (twice at most)
//!  the run: new handshakes start for --duration (and --count-max in all), then the ones in
//!    flight finish, bounded by DRAIN_MAX; the rate counts the handshakes done in the window
//! ```
//!
//! Many source addresses because a server limits unauthenticated answers per source (uturn
//! by default: 50 a second, burst 100), which a real crowd of clients does not meet; pipelining
//! because one handshake at a time per thread measures the round trip, not the server. The
//! generator's own CPU per allocation is reported, so a run says when the generator was the
//! limit.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, socket};
use uturn_proto::{
    AddressFamily as StunFamily, Attribute, Class, Message, Method, PacketKind, Protocol,
    TransactionId, classify, long_term_key_md5,
};

use crate::cpu::CpuMark;
use crate::instant_after;
use crate::io::bind_udp;
use crate::load::local_ip_for;
use crate::stats::new_histogram;
use crate::turn::{TurnClient, TurnError, build_request, error_code};

/// One full handshake and its deletion; returns the handshake's duration and the socket.
pub fn allocate_and_delete(
    server: SocketAddr,
    user: &str,
    pass: &str,
    n: u64,
) -> Result<Duration, TurnError> {
    allocate_and_delete_on(server, user, pass, n).map(|(took, _)| took)
}

/// One full handshake whose allocation is then left alone: the server must expire it by
/// itself (the soak checks that it does). The socket closes here, as a client that vanished.
pub fn allocate_and_abandon(
    server: SocketAddr,
    user: &str,
    pass: &str,
    n: u64,
) -> Result<Duration, TurnError> {
    let socket = bind_udp(client_ip(server, n))?;
    let mut client = TurnClient::udp(socket, server, user, pass)?;
    client.timeout = Duration::from_secs(2);
    let start = Instant::now();
    client.allocate()?;
    Ok(start.elapsed())
}

/// The client address of handshake `n`: over IPv4, spread over 127.1.0.1-127.1.249.250 so a
/// 5-tuple does not come back within seconds (the ephemeral ports of one address would be
/// reused after ~28,000 handshakes, and coturn keeps deleted 5-tuples for a while).
fn client_ip(server: SocketAddr, n: u64) -> IpAddr {
    match server {
        SocketAddr::V4(_) => {
            let a = ((n / 250) % 250) as u8;
            let b = (n % 250) as u8 + 1;
            IpAddr::V4(Ipv4Addr::new(127, 1, a, b))
        }
        SocketAddr::V6(_) => local_ip_for(server),
    }
}

fn allocate_and_delete_on(
    server: SocketAddr,
    user: &str,
    pass: &str,
    n: u64,
) -> Result<(Duration, UdpSocket), TurnError> {
    let socket = bind_udp(client_ip(server, n))?;
    let mut client = TurnClient::udp(socket, server, user, pass)?;
    client.timeout = Duration::from_secs(2);
    let start = Instant::now();
    client.allocate()?;
    let took = start.elapsed();
    client.delete()?;
    let socket = client
        .into_udp_socket()
        .ok_or_else(|| TurnError::Io(std::io::Error::other("not a UDP client")))?;
    Ok((took, socket))
}

/// Sockets a worker keeps open after their allocation is deleted, so the OS does not hand
/// the same port of the same source out again at once: a server may keep a deleted
/// allocation's 5-tuple for a moment (coturn answers 437 on it), which would count the
/// harness's port reuse as a failure. With the sources spread over many addresses (each with
/// its own ~28,000 ephemeral ports) a reuse within seconds is unlikely, at a bounded cost in
/// descriptors (this many per worker, and [`PORTS_HELD_TOTAL`] in all).
const PORTS_HELD: usize = 2048;
/// Sockets held open by all the workers together: with [`CONCURRENCY_MAX`] in flight, the
/// run stays within 16,384 descriptors, under the 20,000 a process may open here.
const PORTS_HELD_TOTAL: usize = 8192;

/// First retransmission timeout of a handshake's request (RFC 8489 §6.2.1's 500 ms shortened
/// for loopback, as the blocking client does), doubled per retransmission.
const RTO_FIRST: Duration = Duration::from_millis(100);
/// Transmissions of one request at most (RFC 8489's Rc is 7; these span 100 + 200 + 400 +
/// 800 ms before the last, inside [`TRANSACTION_TIMEOUT`]).
const TRANSMISSIONS_MAX: u8 = 5;
/// Time a request waits for its answer, from its first transmission (the blocking client's 2 s).
pub const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(2);
/// Nonce renewals (438) of one handshake at most: a server that keeps saying 438 is broken.
const RENEWALS_MAX: u8 = 2;
/// Longest wait for the handshakes in flight after the run's window: one transaction's
/// timeout for each of the three requests, so every started handshake ends one way or the
/// other before the run does.
const DRAIN_MAX: Duration = Duration::from_secs(7);
/// Handshakes in flight in all at most (each is a socket; the process may open ~20,000).
pub const CONCURRENCY_MAX: u32 = 8192;
/// Worker threads at most.
pub const WORKERS_MAX: u32 = 64;
/// Source addresses at most: 127.1.0.1-127.1.249.250.
pub const SOURCES_MAX: u32 = 62_500;

/// Which request of the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// The first Allocate, which a server with long-term credentials answers 401.
    Challenge,
    /// The authenticated Allocate.
    Allocate,
    /// Refresh LIFETIME 0, which deletes the allocation.
    Delete,
}

impl Stage {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Challenge => "challenge",
            Self::Allocate => "allocate",
            Self::Delete => "delete",
        }
    }
}

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// An error response with this code (0: without ERROR-CODE).
    Code(u16),
    /// No answer within [`TRANSACTION_TIMEOUT`].
    Timeout,
    /// An answer that is not what the stage expects (a success to the first Allocate without
    /// credentials, a 401 without REALM or NONCE, no XOR-RELAYED-ADDRESS, integrity that does
    /// not verify).
    Unexpected(&'static str),
    /// The socket or the request could not be made or sent.
    Local(String),
}

impl Failure {
    /// The key of this failure in the report's counts: `STAGE CODE`, `STAGE timeout`, ...
    pub fn key(&self, stage: Stage) -> String {
        let what = match self {
            Self::Code(code) => code.to_string(),
            Self::Timeout => "timeout".to_owned(),
            Self::Unexpected(why) => format!("unexpected ({why})"),
            Self::Local(_) => "local error".to_owned(),
        };
        format!("{} {what}", stage.name())
    }
}

/// What the handshake wants after an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing to do (a datagram that is not an answer, a timer not due yet).
    Wait,
    /// Send [`Handshake::request`] (a new request or a retransmission).
    Send,
    /// The authenticated Allocate succeeded, after this long since the first request; send
    /// [`Handshake::request`] (the deletion) next.
    Allocated(Duration),
    /// The allocation is deleted: the handshake is over.
    Deleted,
    /// The handshake is over, failed at this stage.
    Failed(Stage, Failure),
}

/// The long-term key of the last realm seen: a worker talks to one server, so one entry
/// saves an MD5 per handshake.
#[derive(Debug, Default)]
pub struct KeyCache {
    realm: String,
    key: [u8; 16],
    filled: bool,
}

impl KeyCache {
    fn key(&mut self, user: &str, pass: &str, realm: &str) -> Option<[u8; 16]> {
        if !(self.filled && self.realm == realm) {
            self.key = long_term_key_md5(user, realm, pass).ok()?;
            realm.clone_into(&mut self.realm);
            self.filled = true;
        }
        Some(self.key)
    }
}

/// One allocation's handshake as a sans-IO state machine: it builds the requests and reads
/// the answers; the worker owns the socket and the clock.
#[derive(Debug)]
pub struct Handshake {
    stage: Stage,
    ipv6: bool,
    tid: TransactionId,
    tid_base: u64,
    request: Vec<u8>,
    started: Instant,
    /// First transmission of the current request.
    sent_first: Instant,
    resend_at: Instant,
    rto: Duration,
    transmissions: u8,
    renewals: u8,
    realm: String,
    nonce: String,
    key: [u8; 16],
}

impl Handshake {
    /// A handshake whose first request (Allocate without credentials) is ready to send at
    /// `now`; `id` makes its transaction ids unique within the run.
    pub fn new(id: u64, ipv6: bool, now: Instant) -> Result<Self, Failure> {
        let mut h = Self {
            stage: Stage::Challenge,
            ipv6,
            tid: TransactionId([0; 12]),
            tid_base: id.wrapping_mul(4),
            request: Vec::new(),
            started: now,
            sent_first: now,
            resend_at: now,
            rto: RTO_FIRST,
            transmissions: 0,
            renewals: 0,
            realm: String::new(),
            nonce: String::new(),
            key: [0; 16],
        };
        h.prepare(None, now)?;
        Ok(h)
    }

    /// The datagram to send now.
    pub fn request(&self) -> &[u8] {
        &self.request
    }

    /// The stage it is at.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// When [`Handshake::on_timer`] has something to do.
    pub fn next_timer(&self) -> Instant {
        self.resend_at
            .min(instant_after(self.sent_first, TRANSACTION_TIMEOUT))
    }

    fn fresh_tid(&mut self) {
        // Distinct per request: the handshake's id, the request's place, and a renewal count.
        let mut id = [0u8; 12];
        id[..8].copy_from_slice(&self.tid_base.to_be_bytes());
        id[8] = self.stage as u8;
        id[9] = self.renewals;
        id[10..].copy_from_slice(b"ua");
        self.tid = TransactionId(id);
    }

    /// Builds the current stage's request (with credentials after the challenge) and arms
    /// its timers.
    fn prepare(&mut self, creds: Option<&str>, now: Instant) -> Result<(), Failure> {
        self.fresh_tid();
        let mut attrs = Vec::with_capacity(2);
        match self.stage {
            Stage::Challenge | Stage::Allocate => {
                attrs.push(Attribute::RequestedTransport(Protocol::UDP));
                if self.ipv6 {
                    attrs.push(Attribute::RequestedAddressFamily(StunFamily::V6));
                }
            }
            Stage::Delete => attrs.push(Attribute::Lifetime(0)),
        }
        let creds = creds.map(|user| (user, self.realm.as_str(), self.nonce.as_str(), &self.key));
        self.request = build_request(self.method(), self.tid, &attrs, creds)
            .map_err(|e| Failure::Local(e.to_string()))?;
        self.sent_first = now;
        self.resend_at = instant_after(now, RTO_FIRST);
        self.rto = RTO_FIRST;
        self.transmissions = 1;
        Ok(())
    }

    fn method(&self) -> Method {
        match self.stage {
            Stage::Challenge | Stage::Allocate => Method::ALLOCATE,
            Stage::Delete => Method::REFRESH,
        }
    }

    /// Retransmits or gives up when a timer is due at `now`.
    pub fn on_timer(&mut self, now: Instant) -> Next {
        if now >= instant_after(self.sent_first, TRANSACTION_TIMEOUT) {
            return Next::Failed(self.stage, Failure::Timeout);
        }
        if now < self.resend_at || self.transmissions >= TRANSMISSIONS_MAX {
            return Next::Wait;
        }
        self.transmissions += 1;
        self.rto = self.rto.saturating_mul(2);
        self.resend_at = instant_after(now, self.rto);
        Next::Send
    }

    /// Reads a datagram that arrived on the handshake's socket.
    pub fn on_datagram(
        &mut self,
        bytes: &[u8],
        user: &str,
        pass: &str,
        keys: &mut KeyCache,
        now: Instant,
    ) -> Next {
        if classify(bytes) != PacketKind::Stun {
            return Next::Wait;
        }
        let Ok(msg) = Message::parse(bytes) else {
            return Next::Wait;
        };
        if msg.transaction_id() != self.tid
            || !matches!(msg.class(), Class::SuccessResponse | Class::ErrorResponse)
        {
            return Next::Wait; // a late answer to an earlier request, or not an answer
        }
        let stage = self.stage;
        let fail = |f| Next::Failed(stage, f);
        let code = error_code(&msg);
        match (stage, code) {
            (Stage::Challenge, Some(401)) => {
                let (Some(realm), Some(nonce)) =
                    (msg.realm().ok().flatten(), msg.nonce().ok().flatten())
                else {
                    return fail(Failure::Unexpected("401 without REALM or NONCE"));
                };
                let Some(key) = keys.key(user, pass, realm) else {
                    return fail(Failure::Local("the credentials cannot be hashed".into()));
                };
                realm.clone_into(&mut self.realm);
                nonce.clone_into(&mut self.nonce);
                self.key = key;
                self.stage = Stage::Allocate;
                match self.prepare(Some(user), now) {
                    Ok(()) => Next::Send,
                    Err(f) => Next::Failed(Stage::Allocate, f),
                }
            }
            (Stage::Challenge, None) => fail(Failure::Unexpected("no 401 without credentials")),
            (Stage::Allocate | Stage::Delete, Some(438)) if self.renewals < RENEWALS_MAX => {
                let Some(nonce) = msg.nonce().ok().flatten() else {
                    return fail(Failure::Code(438));
                };
                nonce.clone_into(&mut self.nonce);
                self.renewals += 1;
                match self.prepare(Some(user), now) {
                    Ok(()) => Next::Send,
                    Err(f) => fail(f),
                }
            }
            (_, Some(code)) => fail(Failure::Code(code)),
            (Stage::Allocate, None) => {
                // A success that claims integrity and fails it is not the server's.
                if msg.has_integrity() && msg.verify_integrity(&self.key).is_err() {
                    return fail(Failure::Unexpected("MESSAGE-INTEGRITY does not verify"));
                }
                if !msg.xor_relayed_addresses().any(|a| a.is_ok()) {
                    return fail(Failure::Unexpected("no XOR-RELAYED-ADDRESS"));
                }
                let took = now.saturating_duration_since(self.started);
                self.stage = Stage::Delete;
                match self.prepare(Some(user), now) {
                    Ok(()) => Next::Allocated(took),
                    Err(f) => Next::Failed(Stage::Delete, f),
                }
            }
            (Stage::Delete, None) => Next::Deleted,
        }
    }
}

/// What an `alloc` run asks for.
#[derive(Debug, Clone)]
pub struct AllocConfig {
    /// The server.
    pub server: SocketAddr,
    /// TURN user name and password.
    pub user: String,
    /// TURN password.
    pub pass: String,
    /// Worker threads (1 to [`WORKERS_MAX`]).
    pub workers: u32,
    /// Handshakes in flight in all, spread over the workers (1 to [`CONCURRENCY_MAX`]).
    pub concurrency: u32,
    /// Source addresses over IPv4 (1 to [`SOURCES_MAX`]; IPv6 uses ::1 alone).
    pub sources: u32,
    /// Time during which new handshakes start.
    pub duration: Duration,
    /// Handshakes started at most, in all.
    pub count_max: u64,
    /// The server's pid, for its CPU.
    pub server_pid: Option<u32>,
}

/// Outcome of an `alloc` run.
#[derive(Debug)]
pub struct AllocRaw {
    /// Handshakes that ended in a relayed address (deleted or not).
    pub succeeded: u64,
    /// Of those, the ones that did so within the window (they make the rate).
    pub succeeded_in_window: u64,
    /// Handshakes that failed before their allocation (error response or timeout).
    pub failed: u64,
    /// Allocations made whose deletion failed (left to expire on the server).
    pub delete_failed: u64,
    /// Failures by stage and code (`allocate 401`, `challenge timeout`, ...), deletions too.
    pub failures: BTreeMap<String, u64>,
    /// The window: from the start until new handshakes stopped.
    pub wall: Duration,
    /// From the window's end until the last handshake in flight ended.
    pub drain: Duration,
    /// Handshake latency, ns (first request to the authenticated Allocate's success).
    pub latency_ns: Histogram<u64>,
    /// Server CPU seconds within the window, when its pid is known.
    pub server_cpu_secs: Option<f64>,
    /// Own CPU seconds within the window.
    pub own_cpu_secs: Option<f64>,
    /// Worker threads that ran.
    pub workers: u32,
    /// Handshakes in flight in all.
    pub concurrency: u32,
    /// Source addresses used.
    pub sources: u32,
    /// The first failure, for the report.
    pub first_error: Option<String>,
}

/// What one worker counted.
struct WorkerOut {
    succeeded: u64,
    succeeded_in_window: u64,
    failed: u64,
    delete_failed: u64,
    failures: BTreeMap<String, u64>,
    hist: Histogram<u64>,
    first_error: Option<String>,
    last_end: Instant,
}

/// The source address of handshake `n`: over IPv4, 127.1.a.b, the `sources` first of
/// 127.1.0.1-127.1.249.250 in turn; over IPv6, ::1.
pub fn source_ip(server: SocketAddr, n: u64, sources: u32) -> IpAddr {
    match server {
        SocketAddr::V4(_) => {
            let i = n % u64::from(sources.clamp(1, SOURCES_MAX));
            let a = (i / 250) as u8;
            let b = (i % 250) as u8 + 1;
            IpAddr::V4(Ipv4Addr::new(127, 1, a, b))
        }
        SocketAddr::V6(_) => local_ip_for(server),
    }
}

/// A non-blocking UDP socket on `ip` (port chosen by the OS) connected to `server`: three
/// system calls, where std's bind, connect and set_nonblocking take four.
fn handshake_socket(ip: IpAddr, server: SocketAddr) -> std::io::Result<UdpSocket> {
    let family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(SocketAddr::new(ip, 0)),
    )?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(server),
    )?;
    Ok(UdpSocket::from(fd))
}

/// A handshake in flight and its socket.
struct Slot {
    socket: UdpSocket,
    hs: Handshake,
}

/// One worker: `in_flight` handshakes at a time until the window ends or `issued` reaches
/// the configured maximum, then the ones in flight finish (bounded by [`DRAIN_MAX`]).
#[allow(clippy::too_many_arguments)]
fn worker(
    c: &AllocConfig,
    in_flight: usize,
    held_max: usize,
    window_end: Instant,
    issued: &AtomicU64,
    stop: &AtomicBool,
    tick: &(dyn Fn() + Sync),
) -> WorkerOut {
    let mut out = WorkerOut {
        succeeded: 0,
        succeeded_in_window: 0,
        failed: 0,
        delete_failed: 0,
        failures: BTreeMap::new(),
        hist: new_histogram(),
        first_error: None,
        last_end: Instant::now(),
    };
    let note = |out: &mut WorkerOut, stage: Stage, f: Failure| {
        if out.first_error.is_none() {
            out.first_error = Some(match &f {
                Failure::Local(e) => format!("{}: {e}", f.key(stage)),
                _ => f.key(stage),
            });
        }
        *out.failures.entry(f.key(stage)).or_insert(0) += 1;
        if stage == Stage::Delete {
            out.delete_failed += 1;
        } else {
            out.failed += 1;
        }
    };
    let epoll = match Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC) {
        Ok(e) => e,
        Err(e) => {
            note(
                &mut out,
                Stage::Challenge,
                Failure::Local(format!("epoll: {e}")),
            );
            return out;
        }
    };
    let ipv6 = c.server.is_ipv6();
    let mut slots: Vec<Option<Slot>> = (0..in_flight).map(|_| None).collect();
    // The free slots, so that starting handshakes does not scan every slot.
    let mut free: Vec<usize> = (0..in_flight).rev().collect();
    let mut held: VecDeque<UdpSocket> = VecDeque::with_capacity(held_max);
    let mut keys = KeyCache::default();
    let mut events = vec![EpollEvent::empty(); 256];
    let mut buf = vec![0u8; 2048];
    let hard_end = instant_after(window_end, DRAIN_MAX);
    let mut draining = false;
    let mut active = 0usize;
    let mut next_scan = Instant::now();
    loop {
        let now = Instant::now();
        if now >= window_end || stop.load(Ordering::Relaxed) {
            draining = true;
        }
        if (draining && active == 0) || now >= hard_end {
            break;
        }
        // Fill free slots with new handshakes.
        let mut made_failed = false;
        while !draining {
            let Some(&i) = free.last() else { break };
            let n = issued.fetch_add(1, Ordering::Relaxed);
            if n >= c.count_max {
                draining = true;
                break;
            }
            let started = Instant::now();
            let made = Handshake::new(n, ipv6, started).and_then(|hs| {
                let socket = handshake_socket(source_ip(c.server, n, c.sources), c.server)
                    .map_err(|e| Failure::Local(format!("socket: {e}")))?;
                epoll
                    .add(
                        socket.as_fd(),
                        EpollEvent::new(EpollFlags::EPOLLIN, i as u64),
                    )
                    .map_err(|e| Failure::Local(format!("epoll add: {e}")))?;
                // A datagram the socket does not take is retransmitted on its timer.
                let _ = socket.send(hs.request());
                Ok(Slot { socket, hs })
            });
            match made {
                Ok(s) => {
                    free.pop();
                    if let Some(slot) = slots.get_mut(i) {
                        *slot = Some(s);
                        active += 1;
                    }
                }
                Err(f) => {
                    note(&mut out, Stage::Challenge, f);
                    tick();
                    // Out of descriptors or ports: try again after a pause, once the
                    // handshakes in flight had a chance to end, not in a tight loop.
                    made_failed = true;
                    break;
                }
            }
        }
        let timeout = if active == 0 && !made_failed {
            EpollTimeout::ZERO
        } else {
            EpollTimeout::from(5u8)
        };
        let ready = epoll.wait(&mut events, timeout).unwrap_or(0);
        let now = Instant::now();
        let mut ended: Vec<(usize, Option<(Stage, Failure)>)> = Vec::new();
        for ev in &events[..ready] {
            let i = ev.data() as usize;
            let Some(Some(slot)) = slots.get_mut(i) else {
                continue;
            };
            // Level-triggered: read what is there now; anything left wakes the next wait.
            for _ in 0..4 {
                let len = match slot.socket.recv(&mut buf) {
                    Ok(len) => len,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    // ICMP port unreachable from an earlier send: the timer retransmits.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                    Err(e) => {
                        ended.push((i, Some((slot.hs.stage(), Failure::Local(e.to_string())))));
                        break;
                    }
                };
                let next = slot
                    .hs
                    .on_datagram(&buf[..len], &c.user, &c.pass, &mut keys, now);
                match next {
                    Next::Wait => continue,
                    Next::Send => {
                        let _ = slot.socket.send(slot.hs.request());
                    }
                    Next::Allocated(took) => {
                        out.succeeded += 1;
                        if now < window_end {
                            out.succeeded_in_window += 1;
                        }
                        let _ = out.hist.record((took.as_nanos() as u64).max(1));
                        let _ = slot.socket.send(slot.hs.request());
                    }
                    Next::Deleted => ended.push((i, None)),
                    Next::Failed(stage, f) => ended.push((i, Some((stage, f)))),
                }
                break;
            }
        }
        if now >= next_scan {
            next_scan = instant_after(now, Duration::from_millis(5));
            for (i, slot) in slots.iter_mut().enumerate() {
                let Some(slot) = slot else { continue };
                if now < slot.hs.next_timer() {
                    continue;
                }
                match slot.hs.on_timer(now) {
                    Next::Send => {
                        let _ = slot.socket.send(slot.hs.request());
                    }
                    Next::Failed(stage, f) => ended.push((i, Some((stage, f)))),
                    _ => {}
                }
            }
        }
        for (i, failure) in ended {
            let Some(slot) = slots.get_mut(i).and_then(Option::take) else {
                continue;
            };
            active -= 1;
            free.push(i);
            out.last_end = now;
            let _ = epoll.delete(slot.socket.as_fd());
            if let Some((stage, f)) = failure {
                note(&mut out, stage, f);
            }
            if held.len() >= held_max {
                held.pop_front();
            }
            if held_max > 0 {
                held.push_back(slot.socket);
            }
            tick();
        }
    }
    // What is still in flight at the hard end failed at its stage by timeout.
    for slot in slots.into_iter().flatten() {
        note(&mut out, slot.hs.stage(), Failure::Timeout);
    }
    out
}

/// Runs `c.workers` workers of pipelined handshakes for `c.duration` (at most `c.count_max`
/// in all); `tick` is called after each handshake ends.
pub fn run(c: &AllocConfig, stop: &AtomicBool, tick: &(dyn Fn() + Sync)) -> AllocRaw {
    let workers = c.workers.clamp(1, WORKERS_MAX);
    let concurrency = c.concurrency.clamp(workers, CONCURRENCY_MAX);
    let sources = match c.server {
        SocketAddr::V4(_) => c.sources.clamp(1, SOURCES_MAX),
        SocketAddr::V6(_) => 1,
    };
    let c = &AllocConfig {
        concurrency,
        workers,
        sources,
        ..c.clone()
    };
    let issued = AtomicU64::new(0);
    let before = CpuMark::now(c.server_pid);
    let start = Instant::now();
    let window_end = instant_after(start, c.duration);
    // The CPU marks at the window's end (or when every worker is done, if sooner: the
    // --count-max case), so that the drain of the handshakes in flight does not count.
    let finished = AtomicU32::new(0);
    let held_max = PORTS_HELD.min(PORTS_HELD_TOTAL / workers as usize);
    let (results, window_mark, wall) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let share = concurrency / workers + u32::from(w < concurrency % workers);
                let (issued, finished) = (&issued, &finished);
                scope.spawn(move || {
                    let out = worker(c, share as usize, held_max, window_end, issued, stop, tick);
                    finished.fetch_add(1, Ordering::Relaxed);
                    out
                })
            })
            .collect();
        while Instant::now() < window_end
            && !stop.load(Ordering::Relaxed)
            && finished.load(Ordering::Relaxed) < workers
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mark = CpuMark::now(c.server_pid);
        let wall = start.elapsed().min(c.duration);
        let results: Vec<WorkerOut> = handles.into_iter().filter_map(|h| h.join().ok()).collect();
        (results, mark, wall)
    });
    let (server_cpu_secs, own_cpu_secs) = before.since(&window_mark);
    let mut raw = AllocRaw {
        succeeded: 0,
        succeeded_in_window: 0,
        failed: 0,
        delete_failed: 0,
        failures: BTreeMap::new(),
        wall,
        drain: Duration::ZERO,
        latency_ns: new_histogram(),
        server_cpu_secs,
        own_cpu_secs,
        workers,
        concurrency,
        sources,
        first_error: None,
    };
    let window_end = instant_after(start, wall);
    for r in results {
        raw.succeeded += r.succeeded;
        raw.succeeded_in_window += r.succeeded_in_window;
        raw.failed += r.failed;
        raw.delete_failed += r.delete_failed;
        for (k, v) in r.failures {
            *raw.failures.entry(k).or_insert(0) += v;
        }
        let _ = raw.latency_ns.add(&r.hist);
        raw.drain = raw
            .drain
            .max(r.last_end.saturating_duration_since(window_end));
        if raw.first_error.is_none() {
            raw.first_error = r.first_error;
        }
    }
    raw
}

#[cfg(test)]
mod tests {
    use super::*;
    use uturn_proto::{ErrorCode, ErrorCodeAttribute, MessageBuilder};

    const RELAYED: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 49_152);

    /// The server's answer to `request`: an error with REALM and NONCE, or a success (with a
    /// relayed address for an Allocate), signed with `key` when given.
    fn answer(request: &[u8], error: Option<(u16, &str)>, key: Option<&[u8; 16]>) -> Vec<u8> {
        let req = Message::parse(request).unwrap();
        let mut buf = vec![0u8; 512];
        let class = if error.is_some() {
            Class::ErrorResponse
        } else {
            Class::SuccessResponse
        };
        let mut b = MessageBuilder::new(&mut buf, class, req.method(), req.transaction_id());
        match error {
            Some((code, nonce)) => {
                b.attribute(&Attribute::ErrorCode(ErrorCodeAttribute {
                    code: ErrorCode(code),
                    reason: "no",
                }))
                .unwrap()
                .attribute(&Attribute::Realm("uturn"))
                .unwrap()
                .attribute(&Attribute::Nonce(nonce))
                .unwrap();
            }
            None if req.method() == Method::ALLOCATE => {
                b.attribute(&Attribute::XorRelayedAddress(RELAYED)).unwrap();
            }
            None => {}
        }
        if let Some(key) = key {
            b.message_integrity(key).unwrap();
        }
        b.fingerprint().unwrap();
        let n = b.finish();
        buf.truncate(n);
        buf
    }

    fn key() -> [u8; 16] {
        long_term_key_md5("u", "uturn", "p").unwrap()
    }

    #[test]
    fn a_handshake_answers_the_401_with_credentials_then_deletes_its_allocation() {
        // RFC 8656 §7.2 and RFC 8489 §9.2: the first Allocate is challenged (401 with REALM
        // and NONCE), the second carries USERNAME, REALM, NONCE and MESSAGE-INTEGRITY;
        // Refresh LIFETIME 0 (§7.3) deletes the allocation.
        let t0 = Instant::now();
        let mut keys = KeyCache::default();
        let mut h = Handshake::new(7, false, t0).unwrap();
        let first_bytes = h.request().to_vec();
        let first = Message::parse(&first_bytes).unwrap();
        assert_eq!(first.method(), Method::ALLOCATE);
        assert!(first.username().unwrap().is_none(), "no credentials yet");
        let challenge = answer(h.request(), Some((401, "n1")), None);
        let t1 = t0 + Duration::from_millis(1);
        assert_eq!(
            h.on_datagram(&challenge, "u", "p", &mut keys, t1),
            Next::Send
        );
        let second = Message::parse(h.request()).unwrap();
        assert_eq!(second.method(), Method::ALLOCATE);
        assert_eq!(second.username().unwrap(), Some("u"));
        assert_eq!(second.nonce().unwrap(), Some("n1"));
        second.verify_integrity(&key()).unwrap();
        assert_ne!(second.transaction_id(), first.transaction_id());
        let ok = answer(h.request(), None, Some(&key()));
        let t2 = t0 + Duration::from_millis(3);
        assert_eq!(
            h.on_datagram(&ok, "u", "p", &mut keys, t2),
            Next::Allocated(Duration::from_millis(3))
        );
        let delete = Message::parse(h.request()).unwrap();
        assert_eq!(delete.method(), Method::REFRESH);
        assert_eq!(delete.lifetime().unwrap(), Some(0));
        delete.verify_integrity(&key()).unwrap();
        let deleted = answer(h.request(), None, Some(&key()));
        assert_eq!(
            h.on_datagram(&deleted, "u", "p", &mut keys, t2),
            Next::Deleted
        );
    }

    #[test]
    fn a_late_answer_to_an_earlier_request_is_ignored() {
        // RFC 8489 §6.3: a response is matched to its request by transaction id; the answer
        // to a retransmitted first Allocate arriving after the challenge is not the second's.
        let t0 = Instant::now();
        let mut keys = KeyCache::default();
        let mut h = Handshake::new(1, false, t0).unwrap();
        let first = h.request().to_vec();
        let challenge = answer(&first, Some((401, "n1")), None);
        assert_eq!(
            h.on_datagram(&challenge, "u", "p", &mut keys, t0),
            Next::Send
        );
        assert_eq!(
            h.on_datagram(&challenge, "u", "p", &mut keys, t0),
            Next::Wait
        );
        assert_eq!(h.stage(), Stage::Allocate);
    }

    #[test]
    fn a_stale_nonce_is_renewed_and_the_request_sent_again() {
        // RFC 8489 §9.2.5: 438 with a new NONCE: the client retries with it.
        let t0 = Instant::now();
        let mut keys = KeyCache::default();
        let mut h = Handshake::new(2, false, t0).unwrap();
        let challenge = answer(h.request(), Some((401, "n1")), None);
        h.on_datagram(&challenge, "u", "p", &mut keys, t0);
        let stale = answer(h.request(), Some((438, "n2")), None);
        assert_eq!(h.on_datagram(&stale, "u", "p", &mut keys, t0), Next::Send);
        let again = Message::parse(h.request()).unwrap();
        assert_eq!(again.nonce().unwrap(), Some("n2"));
        assert_eq!(h.stage(), Stage::Allocate);
        // A server that keeps saying 438 ends the handshake instead of looping.
        for _ in 0..RENEWALS_MAX - 1 {
            let stale = answer(h.request(), Some((438, "n3")), None);
            assert_eq!(h.on_datagram(&stale, "u", "p", &mut keys, t0), Next::Send);
        }
        let stale = answer(h.request(), Some((438, "n4")), None);
        assert_eq!(
            h.on_datagram(&stale, "u", "p", &mut keys, t0),
            Next::Failed(Stage::Allocate, Failure::Code(438))
        );
    }

    #[test]
    fn an_error_is_reported_with_its_stage_and_code() {
        let t0 = Instant::now();
        let mut keys = KeyCache::default();
        let mut h = Handshake::new(3, false, t0).unwrap();
        let challenge = answer(h.request(), Some((401, "n1")), None);
        h.on_datagram(&challenge, "u", "p", &mut keys, t0);
        let quota = answer(h.request(), Some((486, "n1")), None);
        let next = h.on_datagram(&quota, "u", "p", &mut keys, t0);
        assert_eq!(next, Next::Failed(Stage::Allocate, Failure::Code(486)));
        assert_eq!(Failure::Code(486).key(Stage::Allocate), "allocate 486");
    }

    #[test]
    fn an_unanswered_request_is_retransmitted_with_a_doubling_timeout_then_given_up() {
        // RFC 8489 §6.2.1: retransmissions at RTO, 2 RTO, 4 RTO ... and a bounded wait.
        let t0 = Instant::now();
        let mut h = Handshake::new(4, false, t0).unwrap();
        assert_eq!(h.on_timer(t0 + Duration::from_millis(50)), Next::Wait);
        let mut at = t0;
        let mut sends = Vec::new();
        for ms in (0..2_000).step_by(5) {
            at = t0 + Duration::from_millis(ms);
            if h.on_timer(at) == Next::Send {
                sends.push(ms);
            }
        }
        assert_eq!(sends, vec![100, 300, 700, 1500]);
        assert_eq!(h.stage(), Stage::Challenge);
        assert_eq!(
            h.on_timer(at + Duration::from_millis(5)),
            Next::Failed(Stage::Challenge, Failure::Timeout)
        );
    }

    #[test]
    fn a_success_without_a_relayed_address_is_not_an_allocation() {
        let t0 = Instant::now();
        let mut keys = KeyCache::default();
        let mut h = Handshake::new(5, false, t0).unwrap();
        let challenge = answer(h.request(), Some((401, "n1")), None);
        h.on_datagram(&challenge, "u", "p", &mut keys, t0);
        // A Refresh-shaped success (no XOR-RELAYED-ADDRESS) with this transaction id.
        let req = Message::parse(h.request()).unwrap();
        let mut buf = vec![0u8; 256];
        let mut b = MessageBuilder::new(
            &mut buf,
            Class::SuccessResponse,
            Method::ALLOCATE,
            req.transaction_id(),
        );
        b.message_integrity(&key()).unwrap();
        let n = b.finish();
        buf.truncate(n);
        assert_eq!(
            h.on_datagram(&buf, "u", "p", &mut keys, t0),
            Next::Failed(
                Stage::Allocate,
                Failure::Unexpected("no XOR-RELAYED-ADDRESS")
            )
        );
    }

    #[test]
    fn handshakes_spread_over_the_configured_sources() {
        let server: SocketAddr = "127.0.0.1:3478".parse().unwrap();
        let ips: std::collections::BTreeSet<IpAddr> =
            (0..1000).map(|n| source_ip(server, n, 300)).collect();
        assert_eq!(ips.len(), 300);
        assert_eq!(
            source_ip(server, 0, 300),
            IpAddr::V4(Ipv4Addr::new(127, 1, 0, 1))
        );
        assert_eq!(
            source_ip(server, 251, 300),
            IpAddr::V4(Ipv4Addr::new(127, 1, 1, 2))
        );
        let v6: SocketAddr = "[::1]:3478".parse().unwrap();
        assert_eq!(source_ip(v6, 5, 300), local_ip_for(v6));
    }
}
