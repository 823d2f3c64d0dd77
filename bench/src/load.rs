//! The traffic engine: allocations set up once, then paced steps of open-loop traffic through
//! the relay and back, each step measured on its own.
//!
//! Every worker thread owns a slice of the allocations, one peer socket and one epoll set, and
//! runs one event loop: send what the pacer says is due (grouped per client socket into
//! `sendmmsg` batches), then drain whatever is readable (`recvmmsg`), echoing at the peer and
//! accounting at the client. The loop never blocks longer than the next send is due, and ends
//! at `duration + drain` whatever happens.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use uturn_proto::{
    Attribute, CHANNEL_DATA_HEADER_LEN, ChannelNumber, Class, MessageBuilder, Method,
    TransactionId, write_channel_data_header,
};

use crate::cpu::CpuMark;
use crate::io::{BATCH, Batch, SLOT_LEN, bind_udp, enable_rx_timestamps, realtime_ns};
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
    /// LIFETIME asked for in each Allocate (`None`: the server's default). A run longer than
    /// the granted lifetime loses its allocations mid-run: the traffic loop does not refresh.
    pub lifetime_secs: Option<u32>,
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
    socket: UdpSocket,
    channel: ChannelNumber,
    peer: SocketAddr,
    /// REALM and NONCE of the setup, so the teardown's Refresh is authenticated at once.
    credentials: Option<(String, String)>,
}

/// One worker's allocations and sockets.
struct Worker {
    flows: Vec<Flow>,
    peer_socket: UdpSocket,
    epoll: Epoll,
    next_seq: u64,
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
/// Packets sent per loop turn at most, so receiving is never starved by a late sender.
const SEND_PER_TURN_MAX: u64 = 16 * BATCH as u64;
/// Datagram batches read from one ready socket per loop turn at most.
const RECV_BATCHES_PER_SOCKET: usize = 4;
/// Longest time spent deleting allocations after a run.
const TEARDOWN_MAX: Duration = Duration::from_secs(5);
/// Allocations in one worker at most: each is a socket.
pub const ALLOCATIONS_MAX: u32 = 20_000;

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
                let socket = bind_udp(ip).map_err(io_err("bind client socket"))?;
                let flow = setup_flow(&config, socket, peer, index)?;
                flows.push(flow);
                index += 1;
                progress(1);
            }
            for (i, f) in flows.iter().enumerate() {
                enable_rx_timestamps(&f.socket);
                f.socket
                    .set_nonblocking(true)
                    .map_err(io_err("nonblocking"))?;
                epoll
                    .add(
                        f.socket.as_fd(),
                        EpollEvent::new(EpollFlags::EPOLLIN, i as u64),
                    )
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
            workers.push(Worker {
                flows,
                peer_socket,
                epoll,
                next_seq: 0,
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
                .map(|w| scope.spawn(move || w.run_step(config, rate_pps / n, duration, stop)))
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        let wall = start.elapsed();
        let (server_cpu_secs, own_cpu_secs) = before.since(&CpuMark::now(server_pid));
        let mut accounting = Accounting::new(0, 0, 0);
        let (mut sent, mut send_failed, mut peer_received) = (0, 0, 0);
        let mut lag_max = Duration::ZERO;
        for r in &results {
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
        let deadline = Instant::now() + TEARDOWN_MAX;
        for w in self.workers {
            for f in w.flows {
                if Instant::now() >= deadline {
                    return;
                }
                let _ = f.socket.set_nonblocking(false);
                if let Ok(mut c) = TurnClient::udp(
                    f.socket,
                    self.config.server,
                    &self.config.user,
                    &self.config.pass,
                ) {
                    c.timeout = Duration::from_millis(300);
                    if let Some((realm, nonce)) = f.credentials {
                        let _ = c.set_credentials(realm, nonce);
                    }
                    let _ = c.delete();
                }
            }
        }
    }
}

fn setup_flow(
    config: &LoadConfig,
    socket: UdpSocket,
    peer: SocketAddr,
    index: u32,
) -> Result<Flow, LoadError> {
    let channel = ChannelNumber::MIN;
    if config.framing == Framing::Bare {
        socket.connect(config.server).map_err(io_err("connect"))?;
        crate::forwarder::hello(&socket, peer)
            .map_err(|source| LoadError::Hello { index, source })?;
        return Ok(Flow {
            socket,
            channel,
            peer,
            credentials: None,
        });
    }
    let turn = |source| LoadError::Turn { index, source };
    let mut client =
        TurnClient::udp(socket, config.server, &config.user, &config.pass).map_err(turn)?;
    client.allocate_for(config.lifetime_secs).map_err(turn)?;
    client.create_permission(peer).map_err(turn)?;
    if config.framing == Framing::Channel {
        client.channel_bind(channel, peer).map_err(turn)?;
    }
    let credentials = client.credentials();
    let socket = client.into_udp_socket().ok_or_else(|| LoadError::Io {
        what: "client socket",
        source: std::io::Error::other("not a UDP client"),
    })?;
    Ok(Flow {
        socket,
        channel,
        peer,
        credentials,
    })
}

struct WorkerStep {
    sent: u64,
    send_failed: u64,
    peer_received: u64,
    accounting: Accounting,
    lag_max: Duration,
}

impl Worker {
    fn run_step(
        &mut self,
        config: &LoadConfig,
        rate_pps: f64,
        duration: Duration,
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
        };
        // Separate batches for sending and receiving: nix's recvmmsg relies on the address
        // fields its headers were preallocated with, which a sendmmsg on the same headers
        // overwrites.
        let mut batch = Batch::new();
        let mut inbox = Batch::new();
        let mut echo = Batch::new();
        let mut scratch = vec![0u8; config.payload_len];
        let mut events = vec![EpollEvent::empty(); 256];
        // Timer slack (50 µs by default) would delay every wake-up of this loop, and so every
        // latency sample; ask for 1 µs. Best effort: a failure only costs precision.
        let _ = nix::sys::prctl::set_timerslack(1_000);
        let start = Instant::now();
        let hard_end = start + duration + config.drain;
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
                self.send_due(config, k0, due, &mut batch, &mut scratch, &mut out);
                pacer.issue(due);
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
            if ready == events.len() {
                continue; // more sockets may be ready than one wait reports
            }
            let next_tick = now + config.tick;
            let after = Instant::now();
            if next_tick > after {
                std::thread::sleep(next_tick - after);
            }
        }
        self.next_seq = base + pacer.limit();
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
        out: &mut WorkerStep,
    ) {
        let n = self.flows.len() as u64;
        if n == 0 {
            return;
        }
        for offset in 0..due.min(n) {
            let flow_index = ((k0 + offset) % n) as usize;
            let Some(flow) = self.flows.get(flow_index) else {
                continue;
            };
            let count = (due - offset).div_ceil(n);
            for j in 0..count {
                let seq = k0 + offset + j * n;
                // Stamped per packet (a vDSO clock read), so a burst's last packet does not
                // carry its first packet's time.
                let stamp = Stamp {
                    flow: flow_index as u32,
                    seq,
                    sent_ns: realtime_ns(),
                };
                if !fill_slot(config, flow, stamp, batch, scratch) {
                    out.send_failed += 1;
                }
                if batch.is_full() {
                    let (s, f) = batch.send(&flow.socket);
                    out.sent += s;
                    out.send_failed += f;
                }
            }
            let (s, f) = batch.send(&flow.socket);
            out.sent += s;
            out.send_failed += f;
        }
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
            match self.flows.get(token as usize) {
                Some(f) => &f.socket,
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

/// Writes one datagram for `flow` into the batch's next slot; `false` if it did not fit.
fn fill_slot(
    config: &LoadConfig,
    flow: &Flow,
    stamp: Stamp,
    batch: &mut Batch,
    scratch: &mut [u8],
) -> bool {
    let len = config.payload_len;
    let Some(slot) = batch.slot() else {
        return false;
    };
    let written = match config.framing {
        Framing::Channel | Framing::Bare => {
            let end = CHANNEL_DATA_HEADER_LEN + len;
            if end > SLOT_LEN || write_channel_data_header(slot, flow.channel, len).is_err() {
                return false;
            }
            if !stamp.write(&mut slot[CHANNEL_DATA_HEADER_LEN..end]) {
                return false;
            }
            end
        }
        Framing::Send => {
            if !stamp.write(scratch) {
                return false;
            }
            let mut tid = [0u8; 12];
            tid[..8].copy_from_slice(&stamp.seq.to_be_bytes());
            tid[8..].copy_from_slice(&stamp.flow.to_be_bytes());
            let mut b =
                MessageBuilder::new(slot, Class::Indication, Method::SEND, TransactionId(tid));
            if b.attribute(&Attribute::XorPeerAddress(flow.peer))
                .and_then(|b| b.attribute(&Attribute::Data(scratch)))
                .is_err()
            {
                return false;
            }
            b.finish()
        }
    };
    batch.commit(written, None);
    true
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
