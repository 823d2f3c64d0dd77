//! The io_uring ring of one shard: setup and probing, the in-flight token table, send slots,
//! and every SQE the shard pushes. All memory an SQE names lives in this struct (boxed, so it
//! never moves) and outlives the operation: `user_data` is an index into [`Ring::ops`], never a
//! pointer, and a send slot (with the receive buffer it references) is freed only when its CQE
//! arrives.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use io_uring::{IoUring, Probe, cqueue, opcode, squeue, types};

use crate::addr::{self, RawSockAddr, SOCKADDR_LEN_MAX};
use crate::bufring::{BUFFER_GROUP, BufRing, IoBuf};
use crate::sys::ZEROS;
use crate::tables::Relay;

/// What an in-flight token stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Free,
    /// Multishot receive on socket slot `sock`.
    Recv {
        sock: u32,
    },
    /// Send using send slot `slot`.
    Send {
        slot: u32,
    },
    /// Read of the wake-up eventfd.
    Wake,
    /// Counters timer.
    Timer,
    /// Multishot accept on stream listener position `listener`.
    Accept {
        listener: u32,
    },
    /// Receive into stream connection `slot`'s receive buffer.
    StreamRecv {
        slot: u32,
    },
    /// Send from stream connection `slot`'s send queue.
    StreamSend {
        slot: u32,
    },
    /// AsyncCancel of another token.
    Cancel,
}

/// Proof that an io_uring operation has ended, so memory lent to it may be reached again: made
/// only by [`Ring::reap`] (fields private to this module) for the CQE after which the kernel no
/// longer touches the operation's memory. The sequence number tells it apart from an older
/// operation that had the same token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ended {
    token: u32,
    seq: u64,
}

impl Ended {
    pub(crate) fn token(self) -> u32 {
        self.token
    }

    pub(crate) fn seq(self) -> u64 {
        self.seq
    }

    #[cfg(test)]
    pub(crate) fn for_test(token: u32, seq: u64) -> Self {
        Self { token, seq }
    }
}

/// A CQE copied out of the completion queue.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Completion {
    pub(crate) token: u32,
    pub(crate) op: Op,
    pub(crate) result: i32,
    pub(crate) flags: u32,
    /// Set when the operation ended with this CQE: proof for giving lent buffers back.
    pub(crate) ended: Option<Ended>,
}

impl Completion {
    /// The operation will post more CQEs (multishot still armed).
    pub(crate) fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    pub(crate) fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }
}

/// Why a push failed; the caller counts it and retries on a later turn or drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PushError {
    /// No free send slot.
    NoSlot,
    /// The submission queue stayed full after a submit (or the kernel said EBUSY).
    QueueFull,
}

/// A received datagram, read through `RecvMsgOut::parse`.
#[derive(Clone, Debug)]
pub(crate) struct RecvView {
    pub(crate) from: Option<SocketAddr>,
    pub(crate) payload: Range<usize>,
    pub(crate) truncated: bool,
}

/// What a send carries besides addressing.
pub(crate) enum Payload<'a> {
    /// `buffer[range]` of receive buffer `bid`, optionally after a header copied into the slot
    /// and followed by `padding` zero bytes (a Data indication).
    Buffer {
        bid: u16,
        range: Range<usize>,
        header: &'a [u8],
        padding: usize,
        relay: Relay,
    },
    /// A control-built datagram kept alive in the slot until completion.
    Owned(Vec<u8>),
}

/// Sizes of a shard's ring, fixed at startup.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RingSizes {
    pub(crate) buffers: usize,
    pub(crate) buffer_size: usize,
    pub(crate) send_slots: usize,
    pub(crate) batch: usize,
    /// Stream operations that may be in flight at once (a receive and a send per connection,
    /// an accept per listener), for sizing the completion queue.
    pub(crate) stream_ops: usize,
}

struct SendSlot {
    msghdr: libc::msghdr,
    iovecs: [libc::iovec; 3],
    name: RawSockAddr,
    header: [u8; uturn_proto::DATA_INDICATION_HEADER_LEN_MAX],
    bid: Option<u16>,
    /// What the fast path counted for this send, taken back if it fails.
    relay: Option<Relay>,
    owned: Option<Vec<u8>>,
    fd: RawFd,
    retries: u8,
}

/// How the ring was set up, for the startup log.
#[derive(Clone, Copy, Debug)]
pub(crate) enum SetupFlags {
    SingleIssuerDeferTaskrun,
    CoopTaskrun,
    Plain,
}

pub(crate) struct Ring {
    // Field order is drop order: the ring goes first, so the kernel lets go of everything
    // below before it is freed.
    ring: IoUring,
    buffers: BufRing,
    ops: Vec<Op>,
    /// Sequence number of the operation holding each token (see [`Ended`]).
    seqs: Vec<u64>,
    next_seq: u64,
    ops_free: Vec<u32>,
    slots: Box<[SendSlot]>,
    slots_free: Vec<u32>,
    recv_msghdr: Box<libc::msghdr>,
    wake_buffer: Box<u64>,
    timespec: Box<types::Timespec>,
    in_flight: usize,
    buffers_dirty: bool,
    setup: SetupFlags,
    /// Times `push` found the SQ full and submitted early (reported in the shard counters).
    sq_full_submits: u64,
    /// Connections from accept CQEs (listener position, socket), owned from the moment they
    /// are reaped so that no descriptor leaks or is owned twice.
    accepted: Vec<(u32, std::net::TcpStream)>,
}

fn build_ring(entries: u32, cq_entries: u32) -> io::Result<(IoUring, SetupFlags)> {
    let attempt = |flags: SetupFlags| {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(cq_entries).setup_clamp();
        match flags {
            SetupFlags::SingleIssuerDeferTaskrun => {
                builder.setup_single_issuer().setup_defer_taskrun();
            }
            SetupFlags::CoopTaskrun => {
                builder.setup_coop_taskrun();
            }
            SetupFlags::Plain => {}
        }
        builder.build(entries)
    };
    let mut last = None;
    for flags in [
        SetupFlags::SingleIssuerDeferTaskrun,
        SetupFlags::CoopTaskrun,
        SetupFlags::Plain,
    ] {
        match attempt(flags) {
            Ok(ring) => return Ok((ring, flags)),
            // EINVAL = the kernel does not know a flag; anything else will not improve.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::Unsupported)))
}

/// Checks once that io_uring can run the shard: ring setup, the opcodes, buffer rings and a
/// kernel new enough for multishot `RecvMsg` (6.0). Returns the reason when it cannot.
pub(crate) fn probe() -> Result<(), String> {
    let (ring, _) = build_ring(8, 16).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => {
            format!("io_uring_setup failed: {e} (kernel.io_uring_disabled=2 or seccomp)")
        }
        Some(libc::ENOSYS) => format!("io_uring_setup failed: {e} (kernel built without io_uring)"),
        _ => format!("io_uring_setup failed: {e}"),
    })?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe failed: {e} (kernel older than 5.6)"))?;
    for (code, name) in [
        (opcode::RecvMsgMulti::CODE, "RECVMSG"),
        (opcode::SendMsg::CODE, "SENDMSG"),
        (opcode::Read::CODE, "READ"),
        (opcode::Timeout::CODE, "TIMEOUT"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        (opcode::AcceptMulti::CODE, "ACCEPT"),
        (opcode::Recv::CODE, "RECV"),
        (opcode::Send::CODE, "SEND"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("io_uring lacks opcode {name}"));
        }
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']);
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if major < 6 {
        return Err(format!(
            "kernel {} lacks multishot RecvMsg (needs 6.0)",
            release.trim()
        ));
    }
    let mut buffers =
        BufRing::new(2, 64).map_err(|e| format!("buffer ring allocation failed: {e}"))?;
    buffers
        .register(&ring.submitter())
        .map_err(|e| format!("buffer ring registration failed: {e} (kernel older than 5.19)"))?;
    drop(ring);
    drop(buffers);
    Ok(())
}

impl Ring {
    /// Sets up the ring, the buffer ring and the send slots. Must run on the shard's thread
    /// (`SINGLE_ISSUER`).
    pub(crate) fn new(sizes: RingSizes) -> io::Result<Self> {
        // Completions that can be outstanding at once: one per receive buffer the kernel may
        // fill, one per send, plus the wake-up read, the timer and cancels. Sized so the CQ
        // never overflows.
        let cq_entries =
            ((sizes.buffers + sizes.send_slots + sizes.stream_ops + 64) * 2).next_power_of_two();
        // The SQ holds one batch: a turn that reaps a full batch of receives fills it with their
        // sends (plus re-arms), and `push` then submits and retries. Bigger only costs memory.
        let sq_entries = sizes.batch.next_power_of_two().clamp(8, 4096);
        let (ring, setup) = build_ring(sq_entries as u32, cq_entries.min(65536) as u32)?;
        let mut buffers = BufRing::new(sizes.buffers, sizes.buffer_size)?;
        buffers.register(&ring.submitter())?;

        // SAFETY: msghdr and iovec are plain data; zeroed = null pointers and lengths, and
        // every pointer is set before an SQE names the slot.
        let zero_msghdr: libc::msghdr = unsafe { std::mem::zeroed() };
        let slots: Box<[SendSlot]> = (0..sizes.send_slots)
            .map(|_| SendSlot {
                msghdr: zero_msghdr,
                iovecs: [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; 3],
                name: RawSockAddr::zeroed(),
                header: [0; uturn_proto::DATA_INDICATION_HEADER_LEN_MAX],
                bid: None,
                relay: None,
                owned: None,
                fd: -1,
                retries: 0,
            })
            .collect();
        let mut recv_msghdr = Box::new(zero_msghdr);
        // Only the name and control lengths matter for multishot RecvMsg: they fix the buffer
        // layout drawn in lib.rs (16-byte header, 28-byte name, no control, payload at 44).
        recv_msghdr.msg_namelen = SOCKADDR_LEN_MAX as libc::socklen_t;
        recv_msghdr.msg_controllen = 0;
        let ops_capacity = sizes.send_slots + 64;
        let mut ops = Vec::with_capacity(ops_capacity);
        ops.resize(ops_capacity, Op::Free);
        Ok(Self {
            ring,
            buffers,
            ops,
            seqs: vec![0; ops_capacity],
            next_seq: 0,
            ops_free: (0..ops_capacity as u32).rev().collect(),
            slots,
            slots_free: (0..sizes.send_slots as u32).rev().collect(),
            recv_msghdr,
            wake_buffer: Box::new(0),
            timespec: Box::new(types::Timespec::new()),
            in_flight: 0,
            buffers_dirty: false,
            setup,
            sq_full_submits: 0,
            accepted: Vec::with_capacity(64),
        })
    }

    /// The next connection an accept completion delivered: (listener position, socket).
    pub(crate) fn take_accepted(&mut self) -> Option<(u32, std::net::TcpStream)> {
        self.accepted.pop()
    }

    /// Early submits because the SQ was full, since the last call.
    pub(crate) fn take_sq_full_submits(&mut self) -> u64 {
        std::mem::take(&mut self.sq_full_submits)
    }

    pub(crate) fn setup(&self) -> SetupFlags {
        self.setup
    }

    /// Takes a token for an operation about to be pushed; counts it as in flight.
    fn token(&mut self, op: Op) -> u32 {
        self.in_flight += 1;
        self.next_seq += 1;
        let token = match self.ops_free.pop() {
            Some(token) => {
                self.ops[token as usize] = op;
                token
            }
            None => {
                // Grows only when sockets or connections are added, never per packet: sends
                // are bounded by the slots, which the initial capacity covers.
                self.ops.push(op);
                self.seqs.push(0);
                (self.ops.len() - 1) as u32
            }
        };
        if let Some(seq) = self.seqs.get_mut(token as usize) {
            *seq = self.next_seq;
        }
        token
    }

    fn release_token(&mut self, token: u32) {
        if let Some(op) = self.ops.get_mut(token as usize)
            && *op != Op::Free
        {
            *op = Op::Free;
            self.ops_free.push(token);
            self.in_flight -= 1;
        }
    }

    /// Pushes one SQE; when the queue is full, submits and tries once more.
    fn push(&mut self, entry: &squeue::Entry) -> Result<(), PushError> {
        for attempt in 0..2 {
            // SAFETY: every pointer in `entry` names memory owned by `self` (send slots, the
            // shared recv msghdr, the wake-up buffer, the timespec: all boxed, never moved), a
            // receive buffer held by a send slot, or the lent range of a stream `IoBuf` (which
            // neither frees nor exposes it until the operation's `Ended` gives it back), and
            // stays valid until the CQE releases the token. Descriptors are kept open until
            // their operations completed.
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            if attempt == 0 {
                self.sq_full_submits += 1;
                self.publish_buffers();
                match self.ring.submit() {
                    Ok(_) => {}
                    // EBUSY: the CQ is backed up; the caller reaps first and retries later.
                    Err(_) => return Err(PushError::QueueFull),
                }
            }
        }
        Err(PushError::QueueFull)
    }

    /// Arms a multishot receive on `fd` (socket slot `sock`); returns its token.
    pub(crate) fn arm_recv(&mut self, sock: u32, fd: RawFd) -> Result<u32, PushError> {
        let token = self.token(Op::Recv { sock });
        let entry = opcode::RecvMsgMulti::new(types::Fd(fd), &*self.recv_msghdr, BUFFER_GROUP)
            .build()
            .user_data(u64::from(token));
        match self.push(&entry) {
            Ok(()) => Ok(token),
            Err(e) => {
                self.release_token(token);
                Err(e)
            }
        }
    }

    /// Arms an 8-byte read of the wake-up eventfd.
    pub(crate) fn arm_wake(&mut self, fd: RawFd) -> Result<(), PushError> {
        let token = self.token(Op::Wake);
        let entry = opcode::Read::new(
            types::Fd(fd),
            (&mut *self.wake_buffer as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(u64::from(token));
        self.push(&entry).inspect_err(|_| self.release_token(token))
    }

    /// Arms a multishot accept on stream listener `fd` (position `listener`); each CQE carries
    /// a new connection's descriptor. No memory is named by the SQE.
    pub(crate) fn arm_accept(&mut self, listener: u32, fd: RawFd) -> Result<u32, PushError> {
        let token = self.token(Op::Accept { listener });
        let entry = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(u64::from(token));
        match self.push(&entry) {
            Ok(()) => Ok(token),
            Err(e) => {
                self.release_token(token);
                Err(e)
            }
        }
    }

    /// Receives into `range` of stream connection `slot`'s buffer `buf` from `fd`; `buf` lends
    /// the range to the kernel until the CQE. `NoSlot` when the range cannot be lent.
    pub(crate) fn stream_recv(
        &mut self,
        slot: u32,
        fd: RawFd,
        buf: &mut IoBuf,
        range: Range<usize>,
    ) -> Result<u32, PushError> {
        self.stream_op(Op::StreamRecv { slot }, fd, buf, range)
    }

    /// Sends `range` of stream connection `slot`'s send queue buffer `buf` on `fd` (lent to
    /// the kernel until the CQE).
    pub(crate) fn stream_send(
        &mut self,
        slot: u32,
        fd: RawFd,
        buf: &mut IoBuf,
        range: Range<usize>,
    ) -> Result<u32, PushError> {
        self.stream_op(Op::StreamSend { slot }, fd, buf, range)
    }

    fn stream_op(
        &mut self,
        op: Op,
        fd: RawFd,
        buf: &mut IoBuf,
        range: Range<usize>,
    ) -> Result<u32, PushError> {
        let token = self.token(op);
        let seq = self.seqs.get(token as usize).copied().unwrap_or(0);
        let Some((ptr, len)) = buf.lend(range, token, seq) else {
            self.release_token(token);
            return Err(PushError::NoSlot);
        };
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        let entry = match op {
            Op::StreamSend { .. } => opcode::Send::new(types::Fd(fd), ptr.cast_const(), len)
                .flags(libc::MSG_NOSIGNAL)
                .build(),
            _ => opcode::Recv::new(types::Fd(fd), ptr, len).build(),
        }
        .user_data(u64::from(token));
        // The memory named here is the lent range of `buf`: until `give_back` with this
        // operation's `Ended` (made by `reap` only after its final CQE), safe code cannot reach
        // it and dropping `buf` leaks it instead of freeing it (see `IoBuf`).
        match self.push(&entry) {
            Ok(()) => Ok(token),
            Err(e) => {
                buf.unlend_unpushed(token, seq);
                self.release_token(token);
                Err(e)
            }
        }
    }

    /// Arms the counters timer.
    pub(crate) fn arm_timer(&mut self, interval: Duration) -> Result<(), PushError> {
        *self.timespec = types::Timespec::new()
            .sec(interval.as_secs())
            .nsec(interval.subsec_nanos());
        let token = self.token(Op::Timer);
        let entry = opcode::Timeout::new(&*self.timespec)
            .build()
            .user_data(u64::from(token));
        self.push(&entry).inspect_err(|_| self.release_token(token))
    }

    /// Asks the kernel to cancel the operation behind `target` (a multishot receive).
    pub(crate) fn cancel(&mut self, target: u32) -> Result<(), PushError> {
        let token = self.token(Op::Cancel);
        let entry = opcode::AsyncCancel::new(u64::from(target))
            .build()
            .user_data(u64::from(token));
        self.push(&entry).inspect_err(|_| self.release_token(token))
    }

    /// Queues a send of `payload` to `to` from `fd`. On error the receive buffer (if any) is
    /// already given back and the caller only counts the drop.
    pub(crate) fn send(
        &mut self,
        fd: RawFd,
        to: &SocketAddr,
        payload: Payload<'_>,
    ) -> Result<(), PushError> {
        let Some(slot_index) = self.slots_free.pop() else {
            if let Payload::Buffer { bid, .. } = payload {
                self.recycle(bid);
            }
            return Err(PushError::NoSlot);
        };
        let slot = &mut self.slots[slot_index as usize];
        slot.fd = fd;
        slot.retries = 0;
        let namelen = slot.name.set(to);
        let mut parts = 0;
        match payload {
            Payload::Buffer {
                bid,
                range,
                header,
                padding,
                relay,
            } => {
                slot.relay = Some(relay);
                if !header.is_empty() {
                    let len = header.len().min(slot.header.len());
                    slot.header[..len].copy_from_slice(&header[..len]);
                    slot.iovecs[parts] = libc::iovec {
                        iov_base: slot.header.as_mut_ptr().cast(),
                        iov_len: len,
                    };
                    parts += 1;
                }
                let len = range
                    .len()
                    .min(self.buffers.buffer_size().saturating_sub(range.start));
                slot.iovecs[parts] = libc::iovec {
                    iov_base: self.buffers.buffer_ptr(bid, range.start).cast_mut().cast(),
                    iov_len: len,
                };
                parts += 1;
                if padding > 0 {
                    slot.iovecs[parts] = libc::iovec {
                        iov_base: ZEROS.as_ptr().cast_mut().cast(),
                        iov_len: padding.min(ZEROS.len()),
                    };
                    parts += 1;
                }
                slot.bid = Some(bid);
            }
            Payload::Owned(mut bytes) => {
                slot.iovecs[0] = libc::iovec {
                    iov_base: bytes.as_mut_ptr().cast(),
                    iov_len: bytes.len(),
                };
                parts = 1;
                // Moving the Vec moves its header, not its heap buffer the iovec points at.
                slot.owned = Some(bytes);
            }
        }
        slot.msghdr.msg_name = slot.name.as_mut_ptr().cast();
        slot.msghdr.msg_namelen = namelen;
        slot.msghdr.msg_iov = slot.iovecs.as_mut_ptr();
        slot.msghdr.msg_iovlen = parts;
        slot.msghdr.msg_control = std::ptr::null_mut();
        slot.msghdr.msg_controllen = 0;
        slot.msghdr.msg_flags = 0;
        self.push_send(slot_index).inspect_err(|_| {
            self.free_slot(slot_index);
        })
    }

    fn push_send(&mut self, slot_index: u32) -> Result<(), PushError> {
        let token = self.token(Op::Send { slot: slot_index });
        let slot = &self.slots[slot_index as usize];
        let entry = opcode::SendMsg::new(types::Fd(slot.fd), &slot.msghdr)
            .build()
            .user_data(u64::from(token));
        self.push(&entry).inspect_err(|_| self.release_token(token))
    }

    /// Re-issues the send of a slot whose CQE said EINTR/EAGAIN (at most `max` times). When
    /// the slot is freed instead (retries exhausted or queue full), returns its relay tag.
    pub(crate) fn retry_send(&mut self, slot_index: u32, max: u8) -> Result<(), Option<Relay>> {
        let Some(slot) = self.slots.get_mut(slot_index as usize) else {
            return Err(None);
        };
        if slot.retries >= max {
            return Err(self.free_slot(slot_index));
        }
        slot.retries += 1;
        if self.push_send(slot_index).is_err() {
            return Err(self.free_slot(slot_index));
        }
        Ok(())
    }

    /// Frees a send slot after its CQE: its receive buffer goes back to the kernel. Returns the
    /// relay tag the send carried, for the caller to take back on failure.
    pub(crate) fn free_slot(&mut self, slot_index: u32) -> Option<Relay> {
        let slot = self.slots.get_mut(slot_index as usize)?;
        let bid = slot.bid.take();
        let relay = slot.relay.take();
        slot.owned = None;
        slot.fd = -1;
        self.slots_free.push(slot_index);
        if let Some(bid) = bid {
            self.recycle(bid);
        }
        relay
    }

    /// Gives a receive buffer back to the kernel (published before the next submit).
    pub(crate) fn recycle(&mut self, bid: u16) {
        self.buffers.push(bid);
        self.buffers_dirty = true;
    }

    fn publish_buffers(&mut self) {
        if self.buffers_dirty {
            self.buffers.publish();
            self.buffers_dirty = false;
        }
    }

    /// Reads the kernel-filled buffer `bid` of a multishot completion of `len` bytes.
    pub(crate) fn recv_view(&mut self, bid: u16, len: usize) -> Option<RecvView> {
        let msghdr = &*self.recv_msghdr;
        let buffer = self.buffers.buffer_mut(bid)?;
        let filled = buffer.get(..len)?;
        let out = types::RecvMsgOut::parse(filled, msghdr).ok()?;
        let from = addr::from_kernel_bytes(out.name_data());
        let start = crate::PAYLOAD_OFFSET;
        debug_assert_eq!(
            out.payload_data().as_ptr() as usize - filled.as_ptr() as usize,
            start,
            "payload offset differs from the documented layout"
        );
        let truncated = out.is_payload_truncated();
        Some(RecvView {
            from,
            payload: start..start + out.payload_data().len(),
            truncated,
        })
    }

    /// The receive buffer `bid` the shard owns.
    pub(crate) fn buffer_mut(&mut self, bid: u16) -> Option<&mut [u8]> {
        self.buffers.buffer_mut(bid)
    }

    /// Submits queued SQEs and waits for at least `want` completions. EINTR is not an error.
    pub(crate) fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        self.publish_buffers();
        let want = if self.ring.completion().is_empty() {
            want
        } else {
            0
        };
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            // EBUSY: completions must be reaped before more can be submitted; the caller reaps.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Copies up to `max` CQEs into `out` (cleared first). Tokens of completed one-shot
    /// operations and of multishot receives that ended are released here; send slots are left
    /// to the caller (`free_slot` / `retry_send`).
    pub(crate) fn reap(&mut self, out: &mut Vec<Completion>, max: usize) {
        out.clear();
        let mut completion = self.ring.completion();
        for cqe in completion.by_ref().take(max) {
            let token = cqe.user_data() as u32;
            let op = self.ops.get(token as usize).copied().unwrap_or(Op::Free);
            let flags = cqe.flags();
            if let (Op::Accept { listener }, fd @ 0..) = (op, cqe.result()) {
                // SAFETY: a successful accept CQE carries a new descriptor that nothing else
                // owns; wrapping it here, once, makes its owner responsible for closing it.
                let socket =
                    unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                self.accepted.push((listener, socket));
            }
            let ended = match op {
                Op::Recv { .. } | Op::Accept { .. } => !cqueue::more(flags),
                Op::Free => false,
                _ => true,
            };
            out.push(Completion {
                token,
                op,
                result: cqe.result(),
                flags,
                ended: ended.then(|| Ended {
                    token,
                    seq: self.seqs.get(token as usize).copied().unwrap_or(0),
                }),
            });
        }
        drop(completion);
        for c in out.iter() {
            if c.ended.is_some() {
                self.release_token(c.token);
            }
        }
    }

    /// Cancels everything and waits (bounded) until the kernel holds no operation, so the
    /// buffers can be freed. Leaks them if the kernel does not let go in time.
    /// Stream completions reaped here go to `on_stream` (to give their buffers back).
    pub(crate) fn shutdown(mut self, mut on_stream: impl FnMut(Completion)) {
        let token = self.token(Op::Cancel);
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(u64::from(token));
        if self.push(&entry).is_err() {
            self.release_token(token);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut batch = Vec::with_capacity(256);
        while self.in_flight > 0 && Instant::now() < deadline {
            let ts = types::Timespec::new().nsec(50_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            self.reap(&mut batch, 256);
            for c in &batch {
                match c.op {
                    Op::Send { slot } => {
                        self.free_slot(slot);
                    }
                    Op::StreamRecv { .. } | Op::StreamSend { .. } => on_stream(*c),
                    _ => {}
                }
            }
        }
        if self.in_flight > 0 {
            tracing::error!(
                in_flight = self.in_flight,
                "io_uring operations did not finish at shutdown; leaking their buffers"
            );
            std::mem::forget(self);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    use super::*;

    /// The ring under test, or `None` where io_uring is unavailable (then the probe must say
    /// why, which is what `BackendChoice::Auto` logs).
    fn ring(send_slots: usize, batch: usize) -> Option<Ring> {
        if let Err(reason) = probe() {
            assert!(!reason.is_empty());
            eprintln!("io_uring unavailable here: {reason}");
            return None;
        }
        Some(Ring::new(sizes(send_slots, batch)).expect("the probe passed"))
    }

    fn sizes(send_slots: usize, batch: usize) -> RingSizes {
        RingSizes {
            buffers: 8,
            buffer_size: 256,
            send_slots,
            batch,
            stream_ops: 0,
        }
    }

    /// Reaps until `count` sends completed (bounded by a deadline); returns how many did.
    fn complete_sends(ring: &mut Ring, count: usize) -> usize {
        let mut done = 0;
        let mut batch = Vec::with_capacity(8);
        let deadline = Instant::now() + Duration::from_secs(5);
        while done < count && Instant::now() < deadline {
            ring.submit_and_wait(1).expect("submit");
            ring.reap(&mut batch, 8);
            for c in &batch {
                if let Op::Send { slot } = c.op {
                    assert!(c.result >= 0, "send failed: {}", c.result);
                    ring.free_slot(slot);
                    done += 1;
                }
            }
        }
        done
    }

    /// The memory budget in lib.rs counts 256 bytes per send slot and 8 per token.
    #[test]
    fn send_slots_and_tokens_fit_the_documented_budget() {
        assert!(size_of::<SendSlot>() <= 256, "{}", size_of::<SendSlot>());
        assert!(size_of::<Op>() <= 8);
    }

    #[test]
    fn a_full_submission_queue_is_submitted_early_and_the_push_retried() {
        let Some(mut ring) = ring(64, 8) else { return };
        let target = UdpSocket::bind("127.0.0.1:0").expect("bind");
        target
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let to = target.local_addr().expect("addr");
        let source = UdpSocket::bind("127.0.0.1:0").expect("bind");
        // 40 sends into an 8-entry SQ without a turn in between.
        for i in 0..40u8 {
            ring.send(source.as_raw_fd(), &to, Payload::Owned(vec![i; 10]))
                .expect("queued");
        }
        assert!(
            ring.take_sq_full_submits() >= 4,
            "the full SQ was submitted early"
        );
        assert_eq!(complete_sends(&mut ring, 40), 40);
        let mut buf = [0u8; 64];
        for _ in 0..40 {
            let (n, from) = target.recv_from(&mut buf).expect("datagram");
            assert_eq!(n, 10);
            assert_eq!(from, source.local_addr().expect("addr"));
        }
        ring.shutdown(|_| {});
    }

    #[test]
    fn sends_beyond_the_slot_table_are_refused_until_one_completes() {
        let Some(mut ring) = ring(4, 8) else { return };
        let target = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = target.local_addr().expect("addr");
        let source = UdpSocket::bind("127.0.0.1:0").expect("bind");
        for _ in 0..4 {
            ring.send(source.as_raw_fd(), &to, Payload::Owned(vec![1; 4]))
                .expect("queued");
        }
        assert_eq!(
            ring.send(source.as_raw_fd(), &to, Payload::Owned(vec![1; 4])),
            Err(PushError::NoSlot)
        );
        assert_eq!(complete_sends(&mut ring, 4), 4);
        ring.send(source.as_raw_fd(), &to, Payload::Owned(vec![1; 4]))
            .expect("a slot is free again");
        assert_eq!(complete_sends(&mut ring, 1), 1);
        ring.shutdown(|_| {});
    }
}
