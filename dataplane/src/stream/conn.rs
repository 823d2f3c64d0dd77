//! One stream connection as a sans-IO state machine: the shard's I/O edge hands it the bytes the
//! socket delivered and asks it for the bytes to write; it knows nothing of sockets, epoll or
//! io_uring, so both backends share it and tests drive it from memory.
//!
//! ```text
//!  socket ──read──► rx (IoBuf, fixed) ─┬─ plain: frame_len in place ────────────► on_frame
//!                                      └─ TLS: UnbufferedServerConnection ──► plaintext
//!                                           ::process_tls_records            framer ─► on_frame
//!  queue_frame(parts, padding) ─┬─ plain: copied into tx
//!                               └─ TLS: copied into the shard's scratch, encrypted into tx
//!  socket ◄──write── tx (SendQueue over an IoBuf, fixed): head() / consumed(n)
//! ```
//!
//! Both buffers are allocated when the connection is created and never grow. `rx` holds one
//! whole TLS record (the largest rustls accepts; at least one whole frame); `tx` holds
//! `send_queue_bytes` of wire bytes. A frame for `tx` goes in whole or is refused
//! ([`DropReason::QueueFull`]); handshake records that do not fit end the connection.

use std::ops::Range;
use std::sync::Arc;

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
use uturn_proto::{StreamFramer, frame_len};

use crate::bufring::IoBuf;
use crate::stream::edge::{self, Hello, Proxy, Route};
use crate::{ClientTransport, DropReason};

/// Largest TLS record on the wire: 5-byte header, 2^14 plaintext, 2048 of expansion (TLS 1.2's
/// bound; TLS 1.3 needs at most 256).
pub(crate) const TLS_RECORD_LEN_MAX: usize = 5 + (1 << 14) + 2048;
/// Plaintext per TLS record we write.
pub(crate) const TLS_PLAINTEXT_LEN_MAX: usize = 1 << 14;
/// Upper bound of the bytes a record adds to its plaintext with rustls's suites: header 5,
/// TLS 1.2 explicit nonce 8, tag 16, TLS 1.3 content type 1.
const TLS_RECORD_OVERHEAD_MAX: usize = 5 + 8 + 16 + 1;

/// Test builds only: a connection that receives bytes starting with these (or is handed a
/// frame whose payload does) panics inside its own work, to show that the panic is contained.
/// The leading 0xff is garbage to every framer, so no real client could send it by accident;
/// release and debug builds of the binary do not have this at all.
#[cfg(test)]
pub(crate) const TEST_PANIC_MAGIC: &[u8] = b"\xffuturn test: panic here";

/// Why a connection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Close {
    /// The client closed (TCP FIN, or TLS close_notify; ours is queued in `tx` then).
    Eof,
    /// Garbage, a framing or TLS error, or a full buffer during the handshake.
    Error,
    /// An `auto` connection's ClientHello is not TURN's: the edge hands the socket and the
    /// bytes read so far ([`unread`](Connection::unread)) to the forwarder.
    Forward,
}

/// What the PROXY protocol step of a connection found (for the shard to count and act on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProxyEvent {
    /// A trusted peer's header, naming this client (`None`: LOCAL / UNKNOWN, the peer stands).
    Accepted(Option<std::net::SocketAddr>),
    /// A header from a peer not trusted to send one, or a trusted peer's connection without
    /// (or with a broken) header: closed.
    Refused,
}

enum Mode {
    /// An `auto` connection before its first byte.
    Sniff,
    Plain,
    Tls(Box<Tls>),
}

struct Tls {
    session: UnbufferedServerConnection,
    /// Decrypted bytes not yet cut into frames (records and frames do not line up).
    plain: StreamFramer,
    /// Whether rustls has written any record for the client yet; until then the record layer
    /// is plaintext, so an alert of our own is a valid record.
    sent: bool,
    /// The session ended (closed or failed): rustls is not called again.
    ended: bool,
}

/// A connection's fixed bytes for the socket, as a two-region circular queue (a "bip buffer"):
/// region A `[a.start, a.end)` is sent first; once A reaches the end of the buffer, new bytes go
/// to region B `[0, b_end)` in front of A. Every region is contiguous, so `head()` is one write
/// (or one io_uring `Send`) and an encrypted record lands in one piece; bytes never move, so an
/// in-flight `Send` of the head stays valid while new bytes are queued behind it.
pub(crate) struct SendQueue {
    buf: IoBuf,
    a: Range<usize>,
    /// Region B's end; B exists while `b_end > 0`.
    b_end: usize,
}

impl SendQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            buf: IoBuf::new(capacity),
            a: 0..0,
            b_end: 0,
        }
    }

    /// Bytes queued.
    pub(crate) fn len(&self) -> usize {
        self.a.len() + self.b_end
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where `len` contiguous bytes can go, without queueing them yet (see `commit`).
    fn reserve(&mut self, len: usize) -> Option<(Range<usize>, bool)> {
        if self.a.is_empty() && self.b_end == 0 && !self.buf.is_lent() {
            self.a = 0..0;
        }
        let range = if self.b_end > 0 {
            (self.b_end + len <= self.a.start).then_some((self.b_end..self.b_end + len, true))
        } else if self.a.end + len <= self.buf.len() {
            Some((self.a.end..self.a.end + len, false))
        } else if len <= self.a.start {
            Some((0..len, true))
        } else {
            None
        }?;
        Some(range)
    }

    fn commit(&mut self, at: usize, n: usize, in_b: bool) {
        if in_b {
            self.b_end = at + n;
        } else {
            self.a.end = at + n;
        }
    }

    /// The largest contiguous free range (for a handshake record of unknown length).
    fn largest_free(&mut self) -> (Range<usize>, bool) {
        if self.a.is_empty() && self.b_end == 0 && !self.buf.is_lent() {
            self.a = 0..0;
        }
        if self.b_end > 0 {
            (self.b_end..self.a.start.max(self.b_end), true)
        } else if self.buf.len() - self.a.end >= self.a.start {
            (self.a.end..self.buf.len(), false)
        } else {
            (0..self.a.start, true)
        }
    }

    /// The bytes to write next, contiguous.
    pub(crate) fn head(&self) -> &[u8] {
        self.buf.get(self.a.clone()).unwrap_or(&[])
    }

    /// The range of `head()` in the buffer, and the buffer, for a `Send` the ring lends it to.
    pub(crate) fn head_for_send(&mut self) -> (Range<usize>, &mut IoBuf) {
        (self.a.clone(), &mut self.buf)
    }

    /// `n` bytes of the head went out.
    pub(crate) fn consumed(&mut self, n: usize) {
        self.a.start = (self.a.start + n).min(self.a.end);
        if self.a.is_empty() {
            self.a = 0..self.b_end;
            self.b_end = 0;
        }
    }
}

/// One connection's bytes and TLS state.
pub(crate) struct Connection {
    mode: Mode,
    rx: IoBuf,
    /// Received bytes not yet consumed: `rx[rx_start..rx_end]`.
    rx_start: usize,
    rx_end: usize,
    tx: SendQueue,
    frame_len_max: usize,
    /// Relayed frames refused because `tx` was full.
    pub(crate) queue_full_drops: u64,
    /// The peer is a trusted load balancer: the connection must start with a PROXY header.
    expect_proxy: bool,
    /// The first bytes were checked for a PROXY header from an untrusted peer.
    first_checked: bool,
    /// An `auto` connection on a shared port: TLS that is not TURN's is forwarded; the TLS
    /// server names that are TURN's.
    forward: Option<Arc<edge::StreamEdge>>,
    /// Set by the PROXY step; taken by the shard.
    proxy_event: Option<ProxyEvent>,
}

/// How a connection starts.
pub(crate) enum Start {
    Plain,
    Tls(Arc<rustls::ServerConfig>),
    /// Decide on the first byte; the configuration is used if it is 0x16 (`None`: no TLS here).
    Sniff,
}

impl Connection {
    /// A connection with its buffers: `rx` of one TLS record (at least `frame_len_max`) and
    /// `tx` of `send_queue_bytes`.
    pub(crate) fn new(
        start: Start,
        frame_len_max: usize,
        send_queue_bytes: usize,
    ) -> Result<Self, rustls::Error> {
        let mode = match start {
            Start::Plain => Mode::Plain,
            Start::Tls(config) => Mode::Tls(Box::new(Tls::new(config, frame_len_max)?)),
            Start::Sniff => Mode::Sniff,
        };
        // One TLS record must fit whole; plain TCP gets the same so that one receive (one
        // io_uring `Recv`, one loop turn) takes a few dozen small frames, not a handful.
        let rx_len = TLS_RECORD_LEN_MAX.max(frame_len_max);
        Ok(Self {
            mode,
            rx: IoBuf::new(rx_len),
            rx_start: 0,
            rx_end: 0,
            tx: SendQueue::new(send_queue_bytes),
            frame_len_max,
            queue_full_drops: 0,
            expect_proxy: false,
            first_checked: false,
            forward: None,
            proxy_event: None,
        })
    }

    /// Makes this connection wait for a PROXY header first (`expect_proxy`, a trusted peer) and,
    /// for an `auto` connection, pass TLS that is not TURN's on (`forward`).
    pub(crate) fn with_edge(
        mut self,
        expect_proxy: bool,
        forward: Option<Arc<edge::StreamEdge>>,
    ) -> Self {
        self.expect_proxy = expect_proxy;
        self.forward = forward;
        self
    }

    /// The PROXY step's outcome, once.
    pub(crate) fn take_proxy_event(&mut self) -> Option<ProxyEvent> {
        self.proxy_event.take()
    }

    /// Whether the connection is still deciding what it is (waiting for a PROXY header or for
    /// the ClientHello of an `auto` connection): such a connection has the hello timeout.
    pub(crate) fn is_undecided(&self) -> bool {
        self.expect_proxy || matches!(self.mode, Mode::Sniff)
    }

    /// The bytes received and not consumed (for a forwarded connection: the ClientHello and
    /// whatever followed it).
    pub(crate) fn unread(&self) -> &[u8] {
        self.rx.get(self.rx_start..self.rx_end).unwrap_or(&[])
    }

    pub(crate) fn is_tls(&self) -> bool {
        matches!(self.mode, Mode::Tls(_))
    }

    /// Whether the kind is still unknown (an `auto` connection before its first byte).
    #[cfg(test)]
    pub(crate) fn is_sniffing(&self) -> bool {
        matches!(self.mode, Mode::Sniff)
    }

    /// The free range of `rx` the next socket read goes into (compacting first), and the buffer.
    /// Empty only if a frame larger than the buffer is pending, which `received` refuses, so an
    /// empty range means a bug; callers close then.
    pub(crate) fn read_range(&mut self) -> (Range<usize>, &mut IoBuf) {
        if self.rx_start > 0 && self.rx.move_to_front(self.rx_start..self.rx_end) {
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        (self.rx_end..self.rx.len(), &mut self.rx)
    }

    /// The free part of `rx`, for a `read` syscall; then call [`received`](Self::received).
    pub(crate) fn read_buf(&mut self) -> &mut [u8] {
        let (range, rx) = self.read_range();
        rx.get_mut(range).unwrap_or(&mut [])
    }

    /// `n` bytes were written into the read range. Whole frames go to `on_frame` in order.
    /// `sniff_tls` is asked for the TLS configuration when an `auto` connection starts with 0x16.
    pub(crate) fn received(
        &mut self,
        n: usize,
        sniff_tls: impl FnOnce() -> Option<Arc<rustls::ServerConfig>>,
        scratch: &mut [u8],
        on_frame: &mut dyn FnMut(ClientTransport, &[u8]),
    ) -> Result<(), Close> {
        self.rx_end = (self.rx_end + n).min(self.rx.len());
        #[cfg(test)]
        if self
            .rx
            .get(self.rx_start..self.rx_end)
            .is_some_and(|b| b.starts_with(TEST_PANIC_MAGIC))
        {
            panic!("injected by a test: this connection's framing work panics");
        }
        if self.expect_proxy {
            let pending = self.rx.get(self.rx_start..self.rx_end).unwrap_or(&[]);
            match edge::parse_proxy(pending) {
                Proxy::NeedMore => return Ok(()),
                Proxy::Header { len, source } => {
                    self.rx_start += len;
                    self.expect_proxy = false;
                    self.first_checked = true;
                    self.proxy_event = Some(ProxyEvent::Accepted(source));
                    // The shard takes the client address before any frame is handled, then
                    // calls again (with n = 0) for the bytes after the header.
                    return Ok(());
                }
                Proxy::Invalid => {
                    self.proxy_event = Some(ProxyEvent::Refused);
                    return Err(Close::Error);
                }
            }
        }
        if !self.first_checked {
            let Some(&first) = self
                .rx
                .get(self.rx_start..self.rx_end)
                .and_then(|b| b.first())
            else {
                return Ok(());
            };
            self.first_checked = true;
            if edge::may_start_proxy(first) {
                // No TURN or TLS byte stream starts like this: a PROXY header from a peer that
                // is not trusted to send one (it would let anyone claim any address).
                self.proxy_event = Some(ProxyEvent::Refused);
                return Err(Close::Error);
            }
        }
        if let Mode::Sniff = self.mode {
            let Some(&first) = self
                .rx
                .get(self.rx_start..self.rx_end)
                .and_then(|b| b.first())
            else {
                return Ok(());
            };
            if first == 0x16
                && let Some(forward) = &self.forward
            {
                let pending = self.rx.get(self.rx_start..self.rx_end).unwrap_or(&[]);
                match edge::classify(pending, &forward.turn_server_names) {
                    Hello::NeedMore => return Ok(()),
                    Hello::Route(Route::Forward) => return Err(Close::Forward),
                    Hello::Route(Route::Turn) => {}
                }
            }
            self.mode = if first == 0x16 {
                let config = sniff_tls().ok_or(Close::Error)?;
                Mode::Tls(Box::new(
                    Tls::new(config, self.frame_len_max).map_err(|_| Close::Error)?,
                ))
            } else {
                Mode::Plain
            };
        }
        match self.mode {
            Mode::Sniff => Ok(()),
            Mode::Plain => self.cut_plain(on_frame),
            Mode::Tls(_) => self.pump_tls(None, scratch, on_frame).map(|_| ()),
        }
    }

    /// Frames in place in `rx` (no copy for plain TCP).
    fn cut_plain(&mut self, on_frame: &mut dyn FnMut(ClientTransport, &[u8])) -> Result<(), Close> {
        loop {
            let pending = self
                .rx
                .get(self.rx_start..self.rx_end)
                .ok_or(Close::Error)?;
            let len = match frame_len(pending) {
                Ok(Some(len)) => len,
                Ok(None) => break,
                Err(_) => return Err(Close::Error),
            };
            if len > self.frame_len_max {
                return Err(Close::Error);
            }
            let Some(frame) = pending.get(..len) else {
                break;
            };
            on_frame(ClientTransport::Tcp, frame);
            self.rx_start += len;
        }
        // Rewinding while a receive is in flight would make its bytes land past `rx_end`.
        if self.rx_start == self.rx_end && !self.rx.is_lent() {
            self.rx_start = 0;
            self.rx_end = 0;
        }
        Ok(())
    }

    /// Drives rustls over the received records until it needs more bytes: handshake records go
    /// to `tx`, application data through the plaintext framer to `on_frame`. With `encrypt`,
    /// also encrypts that frame into `tx` once rustls allows application data; returns whether
    /// it did. Once it has returned `Err` (the session ended or failed), it never calls rustls
    /// again: rustls is not made to be driven after a fatal error (it asserts it sends at most
    /// one fatal alert), and the edges close the connection anyway.
    fn pump_tls(
        &mut self,
        encrypt: Option<(&[&[u8]; 2], usize)>,
        scratch: &mut [u8],
        on_frame: &mut dyn FnMut(ClientTransport, &[u8]),
    ) -> Result<Option<Result<(), DropReason>>, Close> {
        match &self.mode {
            Mode::Tls(tls) if tls.ended => return Err(Close::Error),
            Mode::Tls(_) => {}
            _ => return Ok(None),
        }
        let result = self.pump_tls_records(encrypt, scratch, on_frame);
        if result.is_err()
            && let Mode::Tls(tls) = &mut self.mode
        {
            tls.ended = true;
        }
        result
    }

    fn pump_tls_records(
        &mut self,
        mut encrypt: Option<(&[&[u8]; 2], usize)>,
        scratch: &mut [u8],
        on_frame: &mut dyn FnMut(ClientTransport, &[u8]),
    ) -> Result<Option<Result<(), DropReason>>, Close> {
        let Mode::Tls(tls) = &mut self.mode else {
            return Ok(None);
        };
        let Tls {
            session,
            plain,
            sent: tls_sent,
            ended: _,
        } = &mut **tls;
        // Bounded: every turn consumes input, emits output or returns; the cap guards a bug.
        for _ in 0..1024 {
            let incoming = self
                .rx
                .get_mut(self.rx_start..self.rx_end)
                .ok_or(Close::Error)?;
            let UnbufferedStatus { mut discard, state } = session.process_tls_records(incoming);
            let mut done = None;
            let mut closed = None;
            let state = match state {
                Ok(state) => state,
                Err(error) => {
                    // rustls's contract: the discard is applied before any further call, and a
                    // further call sees the rest of the same bytes, never a buffer it has not
                    // seen (its deframer keeps offsets into that buffer).
                    self.rx_start = (self.rx_start + discard).min(self.rx_end);
                    let rest = self
                        .rx
                        .get_mut(self.rx_start..self.rx_end)
                        .ok_or(Close::Error)?;
                    queue_alert(session, rest, &mut self.tx, &error, *tls_sent);
                    return Err(Close::Error);
                }
            };
            match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(|_| Close::Error)?;
                        discard += record.discard;
                        deliver(plain, record.payload, on_frame)?;
                    }
                }
                ConnectionState::ReadEarlyData(mut early) => {
                    // 0-RTT is off (rustls's default), so this does not happen; read it anyway.
                    while let Some(record) = early.next_record() {
                        let record = record.map_err(|_| Close::Error)?;
                        discard += record.discard;
                        deliver(plain, record.payload, on_frame)?;
                    }
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    let tx = &mut self.tx;
                    let (range, in_b) = tx.largest_free();
                    let out = tx.buf.get_mut(range.clone()).ok_or(Close::Error)?;
                    // A handshake record that does not fit: the client is not reading.
                    let written = encode.encode(out).map_err(|_| Close::Error)?;
                    tx.commit(range.start, written, in_b);
                    *tls_sent |= written > 0;
                }
                ConnectionState::TransmitTlsData(transmit) => {
                    // The records are in `tx`, which goes out in order: that is transmitting.
                    transmit.done();
                }
                ConnectionState::BlockedHandshake => closed = Some(Ok(())),
                ConnectionState::WriteTraffic(mut traffic) => {
                    if let Some((parts, padding)) = encrypt.take() {
                        done = Some(encrypt_frame(
                            &mut traffic,
                            &mut self.tx,
                            parts,
                            padding,
                            scratch,
                        ));
                    }
                    closed = Some(Ok(()));
                }
                ConnectionState::PeerClosed => {
                    // Answer close_notify with ours (queued; the edge writes it best-effort).
                    closed = Some(Err(Close::Eof));
                }
                ConnectionState::Closed => closed = Some(Err(Close::Eof)),
                _ => closed = Some(Err(Close::Error)),
            }
            self.rx_start = (self.rx_start + discard).min(self.rx_end);
            if self.rx_start == self.rx_end && !self.rx.is_lent() {
                self.rx_start = 0;
                self.rx_end = 0;
            }
            if let Some(result) = closed {
                if result == Err(Close::Eof) {
                    let rest = self
                        .rx
                        .get_mut(self.rx_start..self.rx_end)
                        .ok_or(Close::Error)?;
                    queue_close_notify(session, rest, &mut self.tx);
                }
                return result.map(|()| done);
            }
            if done.is_some() {
                return Ok(done);
            }
        }
        Err(Close::Error)
    }

    /// Queues `parts` followed by `padding` zero bytes as one frame, whole or not at all
    /// (encrypted first for TLS, through `scratch` of at least [`TLS_PLAINTEXT_LEN_MAX`]).
    /// `Err(QueueFull)` is counted in `queue_full_drops`; `Err(NoAllocation)` means the
    /// connection cannot carry data yet (TLS handshake not done, or still sniffing).
    pub(crate) fn queue_frame(
        &mut self,
        parts: [&[u8]; 2],
        padding: usize,
        scratch: &mut [u8],
    ) -> Result<(), DropReason> {
        #[cfg(test)]
        if parts[1].starts_with(TEST_PANIC_MAGIC) {
            panic!("injected by a test: this connection's send work panics");
        }
        let result = match self.mode {
            Mode::Sniff => Err(DropReason::NoAllocation),
            Mode::Plain => {
                let len = parts[0].len() + parts[1].len() + padding;
                match self.tx.reserve(len) {
                    Some((range, in_b)) => {
                        let at = range.start;
                        if let Some(out) = self.tx.buf.get_mut(range) {
                            let (head, rest) = out.split_at_mut(parts[0].len());
                            head.copy_from_slice(parts[0]);
                            let (body, pad) = rest.split_at_mut(parts[1].len());
                            body.copy_from_slice(parts[1]);
                            pad.fill(0);
                            self.tx.commit(at, len, in_b);
                            Ok(())
                        } else {
                            Err(DropReason::QueueFull)
                        }
                    }
                    None => Err(DropReason::QueueFull),
                }
            }
            Mode::Tls(_) => match self.pump_tls(Some((&parts, padding)), scratch, &mut |_, _| {}) {
                Ok(Some(result)) => result,
                // Not writable yet (handshake) or the session ended.
                Ok(None) | Err(_) => Err(DropReason::NoAllocation),
            },
        };
        if result == Err(DropReason::QueueFull) {
            self.queue_full_drops += 1;
        }
        result
    }

    /// The bytes to write next, contiguous (empty: nothing to write).
    pub(crate) fn pending(&self) -> &[u8] {
        self.tx.head()
    }

    pub(crate) fn wants_write(&self) -> bool {
        !self.tx.is_empty()
    }

    /// `n` bytes of [`pending`](Self::pending) were written.
    pub(crate) fn sent(&mut self, n: usize) {
        self.tx.consumed(n);
    }

    /// Takes back a buffer range lent to the io_uring operation that `ended`.
    pub(crate) fn give_back(&mut self, ended: crate::ring::Ended) -> bool {
        self.rx.give_back(ended) || self.tx.buf.give_back(ended)
    }

    /// The send queue, for the io_uring edge that lends its head to a `Send`.
    pub(crate) fn send_queue(&mut self) -> &mut SendQueue {
        &mut self.tx
    }
}

impl Tls {
    fn new(config: Arc<rustls::ServerConfig>, frame_len_max: usize) -> Result<Self, rustls::Error> {
        Ok(Self {
            session: UnbufferedServerConnection::new(config)?,
            plain: StreamFramer::new(frame_len_max),
            sent: false,
            ended: false,
        })
    }
}

/// Pushes decrypted bytes through the framer, handing out every whole frame.
fn deliver(
    plain: &mut StreamFramer,
    mut bytes: &[u8],
    on_frame: &mut dyn FnMut(ClientTransport, &[u8]),
) -> Result<(), Close> {
    loop {
        let taken = plain.push(bytes);
        bytes = bytes.get(taken..).unwrap_or(&[]);
        loop {
            match plain.pop() {
                Ok(Some(frame)) => on_frame(ClientTransport::Tls, frame),
                Ok(None) => break,
                Err(_) => return Err(Close::Error),
            }
        }
        if bytes.is_empty() {
            return Ok(());
        }
        if taken == 0 {
            // The framer is full without a whole frame: cannot happen below frame_len_max.
            return Err(Close::Error);
        }
    }
}

/// Encrypts `parts ++ padding zeros` into `tx` as records of at most `TLS_PLAINTEXT_LEN_MAX`,
/// all or nothing.
fn encrypt_frame(
    traffic: &mut rustls::unbuffered::WriteTraffic<'_, rustls::server::ServerConnectionData>,
    tx: &mut SendQueue,
    parts: &[&[u8]; 2],
    padding: usize,
    scratch: &mut [u8],
) -> Result<(), DropReason> {
    let len = parts[0].len() + parts[1].len() + padding;
    let chunk = scratch.len().min(TLS_PLAINTEXT_LEN_MAX);
    if chunk == 0 {
        return Err(DropReason::QueueFull);
    }
    let records = len.div_ceil(chunk).max(1);
    let (range, in_b) = tx
        .reserve(len + records * TLS_RECORD_OVERHEAD_MAX)
        .ok_or(DropReason::QueueFull)?;
    let at = range.start;
    let out = tx.buf.get_mut(range).ok_or(DropReason::QueueFull)?;
    let mut written = 0;
    let mut offset = 0;
    while offset < len {
        let n = chunk.min(len - offset);
        let plain = scratch.get_mut(..n).ok_or(DropReason::QueueFull)?;
        gather(parts, offset, plain);
        let dst = out.get_mut(written..).ok_or(DropReason::QueueFull)?;
        // On error the records already written would be half a frame: nothing is committed.
        written += traffic
            .encrypt(plain, dst)
            .map_err(|_| DropReason::QueueFull)?;
        offset += n;
    }
    tx.commit(at, written, in_b);
    Ok(())
}

/// Copies bytes `[offset, offset + out.len())` of `parts[0] ++ parts[1] ++ zeros` into `out`.
fn gather(parts: &[&[u8]; 2], mut offset: usize, out: &mut [u8]) {
    let mut filled = 0;
    for part in parts {
        if offset >= part.len() {
            offset -= part.len();
            continue;
        }
        let n = (part.len() - offset).min(out.len() - filled);
        if let (Some(dst), Some(src)) = (
            out.get_mut(filled..filled + n),
            part.get(offset..offset + n),
        ) {
            dst.copy_from_slice(src);
        }
        filled += n;
        offset = 0;
    }
    if let Some(rest) = out.get_mut(filled..) {
        rest.fill(0);
    }
}

/// After a fatal TLS error, puts the alert that names it (RFC 8446 §6.2, RFC 5246 §7.2.2) in
/// `tx`, so that the edge's last write tells the client why (a `bad_record_mac` or
/// `decode_error` instead of a bare reset); best effort: without room it is left out.
///
/// rustls queues its alert inside the session and hands it out only from
/// `process_tls_records`, which returns queued records before it reads input. So it is called
/// once more, on `rest`: the bytes of the failed call minus its discard, the only buffer its
/// deframer's offsets are valid for (an empty or fresh buffer makes rustls 0.23 index out of
/// range). Only an `EncodeTlsData` answer is used; rustls is not driven further.
///
/// Some errors queue nothing (a handshake message longer than rustls accepts is one). Then, if
/// no record has gone to the client yet, the record layer is still plaintext and the alert is
/// written here; after that it would have to be encrypted, and the connection just closes.
fn queue_alert(
    session: &mut UnbufferedServerConnection,
    rest: &mut [u8],
    tx: &mut SendQueue,
    error: &rustls::Error,
    sent: bool,
) {
    let status = session.process_tls_records(rest);
    if let Ok(ConnectionState::EncodeTlsData(mut encode)) = status.state {
        let (range, in_b) = tx.largest_free();
        if let Some(out) = tx.buf.get_mut(range.clone())
            && let Ok(written) = encode.encode(out)
        {
            tx.commit(range.start, written, in_b);
        }
        return;
    }
    if sent {
        return;
    }
    let description = match error {
        // A fatal alert from the client ends the connection without one of ours.
        rustls::Error::AlertReceived(_) => return,
        rustls::Error::InvalidMessage(invalid) => rustls::AlertDescription::from(*invalid),
        rustls::Error::PeerMisbehaved(_) => rustls::AlertDescription::UnexpectedMessage,
        _ => rustls::AlertDescription::HandshakeFailure,
    };
    // Type alert, legacy version TLS 1.2, length 2, level fatal.
    let alert = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, u8::from(description)];
    if let Some((range, in_b)) = tx.reserve(alert.len())
        && let Some(out) = tx.buf.get_mut(range.clone())
    {
        out.copy_from_slice(&alert);
        tx.commit(range.start, alert.len(), in_b);
    }
}

/// Queues our close_notify in answer to the client's. `rest` is what is left of the bytes the
/// last `process_tls_records` saw, after its discard (see [`queue_alert`] for why no other
/// buffer will do).
fn queue_close_notify(
    session: &mut UnbufferedServerConnection,
    rest: &mut [u8],
    tx: &mut SendQueue,
) {
    let status = session.process_tls_records(rest);
    if let Ok(ConnectionState::WriteTraffic(mut traffic)) = status.state
        && let Some((range, in_b)) = tx.reserve(64)
        && let Some(out) = tx.buf.get_mut(range.clone())
        && let Ok(n) = traffic.queue_close_notify(out)
    {
        tx.commit(range.start, n, in_b);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    const FRAME_MAX: usize = 4096;

    /// A server configuration and a client configuration trusting it, both with ALPN stun.turn.
    fn configs(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[version])
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)
            .expect("server config");
        server.alpn_protocols = vec![b"stun.turn".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(certified.cert.der().clone()).expect("root");
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"stun.turn".to_vec()];
        (Arc::new(server), Arc::new(client))
    }

    /// A padded ChannelData frame on channel 0x4000 with `payload`.
    fn channel_data(payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0x40, 0x00];
        frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        frame.extend_from_slice(payload);
        frame.resize(frame.len().next_multiple_of(4), 0);
        frame
    }

    struct Harness {
        server: Connection,
        client: rustls::ClientConnection,
        scratch: Vec<u8>,
        frames: Vec<(ClientTransport, Vec<u8>)>,
    }

    impl Harness {
        fn new(version: &'static rustls::SupportedProtocolVersion, queue: usize) -> Self {
            let (server, client) = configs(version);
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            Self {
                server: Connection::new(Start::Tls(server), FRAME_MAX, queue).expect("server"),
                client: rustls::ClientConnection::new(client, name).expect("client"),
                scratch: vec![0; TLS_PLAINTEXT_LEN_MAX],
                frames: Vec::new(),
            }
        }

        /// Feeds `bytes` to the server `chunk` bytes at a time.
        fn feed(&mut self, bytes: &[u8], chunk: usize) -> Result<(), Close> {
            for piece in bytes.chunks(chunk.max(1)) {
                let buf = self.server.read_buf();
                buf[..piece.len()].copy_from_slice(piece);
                let frames = &mut self.frames;
                self.server
                    .received(piece.len(), || None, &mut self.scratch, &mut |t, f| {
                        frames.push((t, f.to_vec()));
                    })?;
            }
            Ok(())
        }

        /// Client's pending TLS bytes.
        fn client_out(&mut self) -> Vec<u8> {
            let mut out = Vec::new();
            while self.client.wants_write() {
                self.client.write_tls(&mut out).expect("write_tls");
            }
            out
        }

        /// Everything the server queued, handed to the client.
        fn server_to_client(&mut self) {
            while self.server.wants_write() {
                let bytes = self.server.pending().to_vec();
                self.server.sent(bytes.len());
                let mut reader = &bytes[..];
                while !reader.is_empty() {
                    self.client.read_tls(&mut reader).expect("read_tls");
                    self.client
                        .process_new_packets()
                        .expect("client accepts the records");
                }
            }
        }

        fn handshake(&mut self, chunk: usize) {
            for _ in 0..8 {
                let out = self.client_out();
                self.feed(&out, chunk).expect("handshake");
                self.server_to_client();
                if !self.client.is_handshaking() && !self.client.wants_write() {
                    break;
                }
            }
            assert!(!self.client.is_handshaking());
            assert_eq!(self.client.alpn_protocol(), Some(&b"stun.turn"[..]));
        }
    }

    #[test]
    fn tls_handshake_and_frames_both_ways_for_1_2_and_1_3() {
        for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let mut h = Harness::new(version, 64 * 1024);
            h.handshake(usize::MAX);
            let frame = channel_data(b"hello");
            h.client.writer().write_all(&frame).expect("write");
            let out = h.client_out();
            h.feed(&out, usize::MAX).expect("data");
            assert_eq!(h.frames, vec![(ClientTransport::Tls, frame.clone())]);
            // Server to client: header + payload + padding as one frame.
            h.server
                .queue_frame([&frame[..4], b"hello"], 3, &mut h.scratch)
                .expect("queued");
            h.server_to_client();
            let mut got = vec![0; frame.len()];
            h.client.reader().read_exact(&mut got).expect("plaintext");
            assert_eq!(got, frame);
        }
    }

    #[test]
    fn tls_records_split_into_single_bytes_are_reassembled() {
        let mut h = Harness::new(&rustls::version::TLS13, 64 * 1024);
        h.handshake(1);
        let frames: Vec<Vec<u8>> = (0..20u8).map(|i| channel_data(&[i; 37])).collect();
        for frame in &frames {
            h.client.writer().write_all(frame).expect("write");
        }
        let out = h.client_out();
        h.feed(&out, 1).expect("data, one byte per read");
        let got: Vec<Vec<u8>> = h.frames.iter().map(|(_, f)| f.clone()).collect();
        assert_eq!(got, frames);
    }

    #[test]
    fn a_client_close_notify_ends_the_connection_and_is_answered() {
        let mut h = Harness::new(&rustls::version::TLS13, 64 * 1024);
        h.handshake(usize::MAX);
        h.client.send_close_notify();
        let out = h.client_out();
        assert_eq!(h.feed(&out, usize::MAX), Err(Close::Eof));
        assert!(h.server.wants_write(), "our close_notify is queued");
        h.server_to_client();
        let mut rest = Vec::new();
        // A clean EOF (close_notify received), not an error.
        assert_eq!(
            h.client
                .reader()
                .read_to_end(&mut rest)
                .expect("clean close"),
            0
        );
    }

    #[test]
    fn garbage_instead_of_a_tls_record_is_an_error_answered_with_an_alert() {
        let mut h = Harness::new(&rustls::version::TLS13, 64 * 1024);
        assert_eq!(
            h.feed(&[0x17, 0x03, 0x03, 0x00, 0x05, 1, 2, 3, 4, 5], 64),
            Err(Close::Error)
        );
        // One TLS record of type alert (21), level fatal (2), for the edge's last write.
        let pending = h.server.pending();
        assert!(pending.len() >= 7, "an alert is queued: {pending:?}");
        assert_eq!((pending[0], pending[5]), (21, 2), "{pending:?}");
    }

    /// The record that aborted the server: a handshake record whose message claims 16 MiB.
    /// rustls refuses it; the connection must close with an alert and nothing may panic.
    #[test]
    fn an_oversized_handshake_message_closes_the_connection_without_a_panic() {
        let mut record = vec![0x16, 0x03, 0x01, 0x00, 0x10];
        record.extend_from_slice(&[0xff; 16]);
        for chunk in [usize::MAX, 1, 5, 7] {
            let mut h = Harness::new(&rustls::version::TLS13, 64 * 1024);
            assert_eq!(h.feed(&record, chunk), Err(Close::Error), "chunk {chunk}");
            let pending = h.server.pending();
            assert!(pending.len() >= 7, "an alert is queued: {pending:?}");
            // Alert, fatal, decode_error (50): the message does not parse (RFC 8446 §6.2).
            assert_eq!(
                (pending[0], pending[5], pending[6]),
                (21, 2, 50),
                "{pending:?}"
            );
        }
    }

    #[test]
    fn a_corrupted_record_after_the_handshake_is_answered_with_an_alert() {
        let mut h = Harness::new(&rustls::version::TLS13, 64 * 1024);
        h.handshake(usize::MAX);
        h.client
            .writer()
            .write_all(&channel_data(b"x"))
            .expect("write");
        let mut out = h.client_out();
        let last = out.len() - 1;
        out[last] ^= 0xff; // the record's authentication tag no longer matches
        assert_eq!(h.feed(&out, usize::MAX), Err(Close::Error));
        let pending = h.server.pending().to_vec();
        let mut reader = &pending[..];
        h.client.read_tls(&mut reader).expect("read_tls");
        let error = h
            .client
            .process_new_packets()
            .expect_err("the client reads a fatal alert");
        assert!(
            matches!(
                error,
                rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac)
            ),
            "{error:?}"
        );
    }

    #[test]
    fn a_full_send_queue_drops_whole_frames_and_counts_them() {
        for tls in [false, true] {
            let queue = 4096;
            let (mut conn, mut scratch) = if tls {
                let mut h = Harness::new(&rustls::version::TLS13, queue);
                h.handshake(usize::MAX);
                (h.server, h.scratch)
            } else {
                let conn = Connection::new(Start::Plain, FRAME_MAX, queue).expect("plain");
                (conn, vec![0; TLS_PLAINTEXT_LEN_MAX])
            };
            let payload = [7u8; 1000];
            let mut queued = 0;
            let mut refused = 0;
            for _ in 0..10 {
                match conn.queue_frame([&[0x40, 0, 0x03, 0xe8], &payload], 0, &mut scratch) {
                    Ok(()) => queued += 1,
                    Err(reason) => {
                        assert_eq!(reason, DropReason::QueueFull);
                        refused += 1;
                    }
                }
            }
            assert!(
                queued >= 3 && refused >= 1,
                "tls={tls}: {queued} queued, {refused} refused"
            );
            assert_eq!(conn.queue_full_drops, refused);
            assert!(conn.send_queue().len() <= queue);
            // Draining makes room again, and the queue never held a partial frame.
            let len = conn.pending().len();
            conn.sent(len);
            while conn.wants_write() {
                let len = conn.pending().len();
                conn.sent(len);
            }
            conn.queue_frame([&[0x40, 0, 0x03, 0xe8], &payload], 0, &mut scratch)
                .expect("room after draining");
        }
    }

    #[test]
    fn plain_frames_split_or_batched_come_out_whole() {
        let mut conn = Connection::new(Start::Sniff, FRAME_MAX, 4096).expect("auto");
        let frames: Vec<Vec<u8>> = (1..30u8)
            .map(|i| channel_data(&vec![i; usize::from(i)]))
            .collect();
        let stream: Vec<u8> = frames.concat();
        let mut got = Vec::new();
        let mut scratch = vec![0; TLS_PLAINTEXT_LEN_MAX];
        for (i, piece) in stream.chunks(7).enumerate() {
            let buf = conn.read_buf();
            buf[..piece.len()].copy_from_slice(piece);
            conn.received(piece.len(), || None, &mut scratch, &mut |t, f| {
                assert_eq!(t, ClientTransport::Tcp);
                got.push(f.to_vec());
            })
            .expect("frames");
            if i == 0 {
                assert!(
                    !conn.is_tls() && !conn.is_sniffing(),
                    "0x40 means plain TURN"
                );
            }
        }
        assert_eq!(got, frames);
        // An oversized frame closes: the stream cannot be resynchronised.
        let mut big = vec![0x40, 0x00, 0xff, 0xff];
        big.resize(64, 0);
        let buf = conn.read_buf();
        buf[..big.len()].copy_from_slice(&big);
        assert_eq!(
            conn.received(big.len(), || None, &mut scratch, &mut |_, _| {}),
            Err(Close::Error)
        );
    }

    #[test]
    fn the_send_queue_wraps_without_moving_queued_bytes() {
        let mut q = SendQueue::new(10);
        let (r, b) = q.reserve(6).expect("room");
        q.buf
            .get_mut(r.clone())
            .expect("free")
            .copy_from_slice(b"abcdef");
        q.commit(r.start, 6, b);
        q.consumed(4);
        // 4 free at the end is too little for 5; 4 free at the front is too little as well.
        assert!(q.reserve(5).is_none());
        let (r, b) = q.reserve(4).expect("end of A");
        q.buf
            .get_mut(r.clone())
            .expect("free")
            .copy_from_slice(b"ghij");
        q.commit(r.start, 4, b);
        let (r, b) = q.reserve(3).expect("wraps into B");
        assert_eq!(r, 0..3);
        q.buf
            .get_mut(r.clone())
            .expect("free")
            .copy_from_slice(b"klm");
        q.commit(r.start, 3, b);
        assert_eq!(q.head(), b"efghij");
        q.consumed(6);
        assert_eq!(q.head(), b"klm");
        assert_eq!(q.len(), 3);
    }
}
