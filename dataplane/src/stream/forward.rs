//! The passthrough of a shared `auto` port: TLS connections that are not TURN's (a browser
//! loading the web app) go, bytes unchanged both ways, to the web service behind uturn.
//!
//! The shard decides (see `edge`) and hands the socket over with the bytes it has read (the
//! ClientHello); from then on the connection is this thread's: one small thread per shard with
//! its own epoll, so the shard's packet path never waits on, copies for, or even sees a
//! forwarded byte. Each forwarded connection has two fixed buffers of [`BUF_LEN`] (one per
//! direction, allocated at hand-over, never grown); a direction whose buffer is full stops
//! reading until the other side has taken bytes, so a slow side only slows itself. A connection
//! with no byte moving for the idle timeout is closed, as is every connection beyond
//! [`Forwarder::connections_max`]. Its counters are atomics the shard folds into its own
//! counters report.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use socket2::{Domain, Protocol, Socket, Type};

use crate::sys::{self, Epoll};

/// Bytes buffered per direction of a forwarded connection.
pub(crate) const BUF_LEN: usize = 16 * 1024;
/// Token of the wake-up eventfd.
const WAKE_TOKEN: u64 = u64::MAX;
/// Hand-overs waiting at once; more are refused (counted as errors).
const QUEUE_LEN: usize = 256;

/// Totals of one forwarder, read by its shard on the counters tick.
#[derive(Debug, Default)]
pub(crate) struct ForwardStats {
    pub(crate) connections: AtomicU64,
    pub(crate) bytes_to_backend: AtomicU64,
    pub(crate) bytes_to_client: AtomicU64,
    /// The backend refused or failed, a socket error, a full hand-over queue or too many
    /// connections.
    pub(crate) errors: AtomicU64,
    pub(crate) timeouts: AtomicU64,
}

/// A connection handed over by the shard.
pub(crate) struct Handoff {
    pub(crate) client: TcpStream,
    /// What goes to the backend first: the PROXY v2 header (if configured) and the bytes the
    /// shard read (the ClientHello).
    pub(crate) first: Vec<u8>,
}

/// The shard's handle on its forwarder thread (which ends when this is dropped).
pub(crate) struct Forwarder {
    handoffs: Sender<Handoff>,
    wake: std::fs::File,
    pub(crate) stats: Arc<ForwardStats>,
}

impl Forwarder {
    pub(crate) fn start(
        shard: u16,
        backend: SocketAddr,
        idle_timeout: Duration,
        connections_max: usize,
    ) -> io::Result<Self> {
        let (handoffs, rx) = crossbeam_channel::bounded(QUEUE_LEN);
        let wake: OwnedFd = sys::eventfd()?;
        let epoll = Epoll::new(256)?;
        epoll.add(wake.as_raw_fd(), WAKE_TOKEN)?;
        let stats = Arc::new(ForwardStats::default());
        let wake = std::fs::File::from(wake);
        let thread_wake = wake.try_clone()?;
        let thread_stats = Arc::clone(&stats);
        std::thread::Builder::new()
            .name(format!("uturn-forward-{shard}"))
            .spawn(move || {
                let mut state = State {
                    epoll,
                    wake: thread_wake,
                    rx,
                    backend,
                    idle_timeout,
                    connections_max,
                    pairs: Vec::new(),
                    free: Vec::new(),
                    stats: thread_stats,
                };
                state.run();
            })?;
        Ok(Self {
            handoffs,
            wake,
            stats,
        })
    }

    /// Hands a connection to the thread; refused (and counted) when its queue is full.
    pub(crate) fn hand_over(&self, handoff: Handoff) {
        match self.handoffs.try_send(handoff) {
            Ok(()) => {
                let _ = (&self.wake).write(&1u64.to_ne_bytes());
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One direction's bytes: read into `buf[len..]`, written from `buf[sent..len]`.
struct Pipe {
    buf: Box<[u8]>,
    sent: usize,
    len: usize,
    /// The reading side sent FIN; once drained, the writing side is shut down for writing.
    eof: bool,
    shut: bool,
}

impl Pipe {
    fn new(first: &[u8]) -> Self {
        let mut buf = vec![0u8; BUF_LEN.max(first.len())].into_boxed_slice();
        buf[..first.len()].copy_from_slice(first);
        Self {
            buf,
            sent: 0,
            len: first.len(),
            eof: false,
            shut: false,
        }
    }
    fn wants_read(&self) -> bool {
        !self.eof && self.len < self.buf.len()
    }
    fn wants_write(&self) -> bool {
        self.sent < self.len
    }
    fn done(&self) -> bool {
        self.eof && !self.wants_write()
    }
}

struct Pair {
    client: TcpStream,
    backend: TcpStream,
    connecting: bool,
    to_backend: Pipe,
    to_client: Pipe,
    last_active: Instant,
    /// The events each side is registered for (`None`: not yet registered).
    interest: [Option<i32>; 2],
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Backend,
}

struct State {
    epoll: Epoll,
    wake: std::fs::File,
    rx: Receiver<Handoff>,
    backend: SocketAddr,
    idle_timeout: Duration,
    connections_max: usize,
    pairs: Vec<Option<Pair>>,
    free: Vec<usize>,
    stats: Arc<ForwardStats>,
}

fn token(slot: usize, side: Side) -> u64 {
    (slot as u64) << 1 | u64::from(side == Side::Backend)
}

impl State {
    fn run(&mut self) {
        let mut tokens = Vec::with_capacity(256);
        let mut last_sweep = Instant::now();
        loop {
            if let Err(error) = self.epoll.wait(1000, &mut tokens) {
                tracing::error!(%error, "forwarder epoll_wait failed; passthrough stops");
                return;
            }
            for &t in &tokens {
                if t == WAKE_TOKEN {
                    let mut counter = [0u8; 8];
                    let _ = self.wake.read(&mut counter);
                    continue;
                }
                let slot = (t >> 1) as usize;
                if self.turn(slot).is_err() {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    self.close(slot);
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(handoff) => self.adopt(handoff),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return,
                }
            }
            let now = Instant::now();
            if now.duration_since(last_sweep) >= Duration::from_secs(1) {
                last_sweep = now;
                self.sweep(now);
            }
        }
    }

    fn adopt(&mut self, handoff: Handoff) {
        let open = self.pairs.len() - self.free.len();
        if open >= self.connections_max {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            return; // dropping the client socket closes it
        }
        let backend = match connect(self.backend) {
            Ok(backend) => backend,
            Err(error) => {
                tracing::debug!(%error, backend = %self.backend, "passthrough connect failed");
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let pair = Pair {
            client: handoff.client,
            backend,
            connecting: true,
            to_backend: Pipe::new(&handoff.first),
            to_client: Pipe::new(&[]),
            last_active: Instant::now(),
            interest: [None, None],
        };
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.pairs.push(None);
                self.pairs.len() - 1
            }
        };
        self.pairs[slot] = Some(pair);
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        if self.update_interest(slot).is_err() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            self.close(slot);
        }
    }

    /// Moves what can move now on both sides of `slot`.
    fn turn(&mut self, slot: usize) -> Result<(), ()> {
        let Some(pair) = self.pairs.get_mut(slot).and_then(Option::as_mut) else {
            return Ok(());
        };
        if pair.connecting {
            match pair.backend.take_error() {
                Ok(None) => {}
                _ => return Err(()),
            }
            match pair.backend.peer_addr() {
                Ok(_) => pair.connecting = false,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(_) => return Err(()),
            }
        }
        let mut moved = 0u64;
        if !pair.connecting {
            let a = pump(&mut pair.client, &mut pair.backend, &mut pair.to_backend)?;
            let b = pump(&mut pair.backend, &mut pair.client, &mut pair.to_client)?;
            self.stats.bytes_to_backend.fetch_add(a, Ordering::Relaxed);
            self.stats.bytes_to_client.fetch_add(b, Ordering::Relaxed);
            moved = a + b;
        }
        if moved > 0 {
            pair.last_active = Instant::now();
        }
        if pair.to_backend.done() && pair.to_client.done() {
            self.close(slot);
            return Ok(());
        }
        self.update_interest(slot)
    }

    fn update_interest(&mut self, slot: usize) -> Result<(), ()> {
        let Some(pair) = self.pairs.get_mut(slot).and_then(Option::as_mut) else {
            return Ok(());
        };
        let (client, backend) = if pair.connecting {
            (0, libc::EPOLLOUT)
        } else {
            let read = |p: &Pipe| if p.wants_read() { libc::EPOLLIN } else { 0 };
            let write = |p: &Pipe| if p.wants_write() { libc::EPOLLOUT } else { 0 };
            (
                read(&pair.to_backend) | write(&pair.to_client),
                read(&pair.to_client) | write(&pair.to_backend),
            )
        };
        for (i, (side, events, fd)) in [
            (Side::Client, client, pair.client.as_raw_fd()),
            (Side::Backend, backend, pair.backend.as_raw_fd()),
        ]
        .into_iter()
        .enumerate()
        {
            // Registered on first use, changed only when the wanted events change.
            let result = match pair.interest[i] {
                None => self.epoll.add_events(fd, token(slot, side), events),
                Some(current) if current != events => {
                    self.epoll.modify(fd, token(slot, side), events)
                }
                Some(_) => Ok(()),
            };
            result.map_err(|_| ())?;
            pair.interest[i] = Some(events);
        }
        Ok(())
    }

    fn close(&mut self, slot: usize) {
        if let Some(entry) = self.pairs.get_mut(slot)
            && let Some(pair) = entry.take()
        {
            let _ = self.epoll.delete(pair.client.as_raw_fd());
            let _ = self.epoll.delete(pair.backend.as_raw_fd());
            self.free.push(slot);
        }
    }

    fn sweep(&mut self, now: Instant) {
        let idle: Vec<usize> = self
            .pairs
            .iter()
            .enumerate()
            .filter_map(|(slot, p)| {
                p.as_ref()
                    .filter(|p| now.duration_since(p.last_active) >= self.idle_timeout)
                    .map(|_| slot)
            })
            .collect();
        for slot in idle {
            self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            self.close(slot);
        }
    }
}

/// Reads from `from` into `pipe` and writes it to `to` until both would block; returns the
/// bytes written. A FIN is passed on as a write shutdown once everything before it is out.
fn pump(from: &mut TcpStream, to: &mut TcpStream, pipe: &mut Pipe) -> Result<u64, ()> {
    let mut written = 0u64;
    // Bounded: each turn reads or writes at least one byte or stops.
    for _ in 0..64 {
        let mut progress = false;
        if pipe.sent == pipe.len {
            pipe.sent = 0;
            pipe.len = 0;
        }
        if pipe.wants_read() {
            match from.read(&mut pipe.buf[pipe.len..]) {
                Ok(0) => pipe.eof = true,
                Ok(n) => {
                    pipe.len += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                Err(_) => return Err(()),
            }
        }
        if pipe.wants_write() {
            match to.write(&pipe.buf[pipe.sent..pipe.len]) {
                Ok(0) => return Err(()),
                Ok(n) => {
                    pipe.sent += n;
                    written += n as u64;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                Err(_) => return Err(()),
            }
        }
        if !progress {
            break;
        }
    }
    if pipe.done() && !pipe.shut {
        pipe.shut = true;
        let _ = to.shutdown(std::net::Shutdown::Write);
    }
    Ok(written)
}

/// A non-blocking connect to the web service (it completes when the socket becomes writable).
fn connect(backend: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(backend),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    let _ = socket.set_tcp_nodelay(true);
    match socket.connect(&backend.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(socket.into())
}
