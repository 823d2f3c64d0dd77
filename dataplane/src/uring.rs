//! The io_uring shard loop: one `submit_and_wait` per turn, completions copied into a fixed batch
//! and handled after reaping, every send queued in the same turn.
//!
//! Stream connections go through the same ring: a multishot `Accept` per listener, one `Recv`
//! into the connection's receive buffer and at most one `Send` of its send queue's head in
//! flight per connection. The bytes are handled by the shared [`Streams`] / `Connection`; this
//! file is only the edge that moves them. A closing connection is retired at once (tables,
//! control, counters), its socket shut down and its operations cancelled; its buffers are freed
//! only when the last of its operations has completed.

use std::os::fd::AsRawFd;
use std::time::Instant;

use crate::DropReason;
use crate::ring::{Completion, Op, Payload, PushError, Ring, RingSizes};
use crate::shard::{ErrnoLog, ShardSetup, classify_send_errno};
use crate::stream::Close;
use crate::stream::Streams;
use crate::tables::{Action, Effect};

/// Budget of retries for a send that completed with EINTR/EAGAIN.
const SEND_RETRIES_MAX: u8 = 3;

#[derive(Clone, Copy, Debug, Default)]
struct SockState {
    /// Token of the armed multishot receive.
    recv: Option<u32>,
    /// RemoveAllocation asked to close it; close when the receive ends.
    closing: bool,
}

pub(crate) fn run(setup: ShardSetup) {
    let ShardSetup {
        mut core,
        mut streams,
        commands,
        wake,
        sizes,
        counters_interval,
        ready,
    } = setup;
    let shard = core.shard().0;
    let ring_sizes = RingSizes {
        // One term per consumer: a buffer for every send that may hold one, plus the ones the
        // kernel fills while the shard works.
        buffers: sizes.send_slots + sizes.recv_buffers_free,
        buffer_size: sizes.buffer_size,
        send_slots: sizes.send_slots,
        batch: sizes.batch,
        stream_ops: streams.ops_max(),
    };
    let mut ring = match Ring::new(ring_sizes) {
        Ok(ring) => ring,
        Err(source) => {
            let _ = ready.send(Err(crate::DataPlaneError::ShardSetup {
                shard,
                what: "io_uring ring and buffer ring",
                source,
            }));
            return;
        }
    };
    tracing::debug!(shard, setup = ?ring.setup(), "io_uring shard ready");
    let wake_fd = wake.as_raw_fd();
    let mut socks: Vec<SockState> = vec![SockState::default(); core.socket_slots()];
    let mut rearm: Vec<u32> = Vec::with_capacity(core.socket_slots() + 64);
    let mut release_after_submit: Vec<u32> = Vec::with_capacity(64);
    // Sockets whose cancel did not fit in the submission queue; retried every turn.
    let mut cancel_retry: Vec<u32> = Vec::with_capacity(64);
    let mut wake_armed = ring.arm_wake(wake_fd).is_ok();
    let mut timer_armed = ring.arm_timer(counters_interval).is_ok();
    // Listener positions whose multishot accept is not armed; connections whose receive or
    // send could not be pushed (full queue), retried every turn.
    let mut accept_rearm: Vec<u32> = (0..streams.listeners().len() as u32).collect();
    let mut accept_after_tick: Vec<u32> = Vec::new();
    let mut stream_retry: Vec<u32> = Vec::with_capacity(64);
    let mut expired: Vec<u32> = Vec::with_capacity(64);
    rearm.extend_from_slice(core.listener_slots());
    let mut batch: Vec<Completion> = Vec::with_capacity(sizes.batch);
    let mut errnos = ErrnoLog::default();
    let mut shutdown = false;
    let _ = ready.send(Ok(()));
    // Dropped now: a shard that dies before its signal must disconnect the handshake.
    drop(ready);

    while !shutdown {
        // Re-arm what ended (ENOBUFS, errors) or failed to arm on a full queue.
        let mut still = 0;
        for i in 0..rearm.len() {
            let sock = rearm[i];
            let Some(state) = socks.get_mut(sock as usize) else {
                continue;
            };
            if state.recv.is_some() || state.closing {
                continue;
            }
            let Some(fd) = core.fd(sock) else { continue };
            match ring.arm_recv(sock, fd) {
                Ok(token) => state.recv = Some(token),
                Err(_) => {
                    rearm[still] = sock;
                    still += 1;
                }
            }
        }
        rearm.truncate(still);
        for sock in std::mem::take(&mut cancel_retry) {
            close_sock(
                &mut ring,
                &mut socks,
                &mut release_after_submit,
                &mut cancel_retry,
                sock,
            );
        }
        if !wake_armed {
            wake_armed = ring.arm_wake(wake_fd).is_ok();
        }
        if !timer_armed {
            timer_armed = ring.arm_timer(counters_interval).is_ok();
        }
        for position in std::mem::take(&mut accept_rearm) {
            let Some(fd) = streams
                .listeners()
                .get(position as usize)
                .map(|l| l.socket.as_raw_fd())
            else {
                continue;
            };
            if ring.arm_accept(position, fd).is_err() {
                accept_rearm.push(position);
            }
        }
        for slot in std::mem::take(&mut stream_retry) {
            stream_arm(&mut core, &mut streams, &mut ring, &mut stream_retry, slot);
        }

        if let Err(error) = ring.submit_and_wait(1) {
            tracing::error!(shard, %error, "io_uring_enter failed; shard stops");
            break;
        }
        let sq_full = ring.take_sq_full_submits();
        core.set_now(Instant::now());
        let counters = core.counters_mut();
        counters.submits += 1 + sq_full;
        counters.sq_full_submits += sq_full;
        counters.loop_turns += 1;
        // Sockets closed after the submit that carried their last sends.
        for sock in release_after_submit.drain(..) {
            core.release_socket(sock);
        }

        ring.reap(&mut batch, sizes.batch);
        let counters = core.counters_mut();
        counters.completions += batch.len() as u64;
        counters.completions_per_turn_max =
            counters.completions_per_turn_max.max(batch.len() as u64);

        for c in batch.iter().copied() {
            match c.op {
                Op::Recv { sock } => {
                    handle_recv(
                        &mut core,
                        &mut streams,
                        &mut ring,
                        &mut stream_retry,
                        &mut errnos,
                        c,
                        sock,
                    );
                    if !c.more()
                        && let Some(state) = socks.get_mut(sock as usize)
                    {
                        state.recv = None;
                        if state.closing {
                            // Stays `closing` (never re-armed) until the slot is reused.
                            release_after_submit.push(sock);
                        } else {
                            core.counters_mut().rearms += 1;
                            rearm.push(sock);
                        }
                    }
                }
                Op::Send { slot } => {
                    let failed = if c.result >= 0 {
                        ring.free_slot(slot);
                        None
                    } else if matches!(-c.result, libc::EINTR | libc::EAGAIN) {
                        match ring.retry_send(slot, SEND_RETRIES_MAX) {
                            Ok(()) => None,
                            Err(relay) => Some((relay, DropReason::QueueFull)),
                        }
                    } else {
                        let reason = classify_send_errno(-c.result, &mut errnos, shard);
                        Some((ring.free_slot(slot), reason))
                    };
                    match failed {
                        Some((Some(relay), reason)) => core.relay_failed(relay, reason),
                        // A Transmit (no relay tag) failed in the kernel.
                        Some((None, _)) => core.counters_mut().transmit_failures += 1,
                        None => {}
                    }
                }
                Op::Wake => {
                    wake_armed = false;
                    while let Ok(command) = commands.try_recv() {
                        let effect = core.handle_command(command);
                        let lists = Lists {
                            rearm: &mut rearm,
                            release_after_submit: &mut release_after_submit,
                            cancel_retry: &mut cancel_retry,
                            stream_retry: &mut stream_retry,
                        };
                        shutdown |= apply_effect(
                            &mut core,
                            &mut streams,
                            &mut ring,
                            &mut socks,
                            lists,
                            effect,
                        );
                    }
                    while let Some(sock) = core.take_pending_close() {
                        close_sock(
                            &mut ring,
                            &mut socks,
                            &mut release_after_submit,
                            &mut cancel_retry,
                            sock,
                        );
                    }
                }
                Op::Timer => {
                    timer_armed = false;
                    streams.expired(&mut core, Instant::now(), &mut expired);
                    for &slot in &expired {
                        stream_close(&mut core, &mut streams, &mut ring, slot);
                    }
                    // Accepts that failed (EMFILE and the like) retry once per tick, not in a
                    // tight loop.
                    accept_rearm.append(&mut accept_after_tick);
                    core.report_counters();
                }
                Op::Accept { listener } => {
                    if c.result < 0 && c.result != -libc::ECANCELED {
                        errnos.log_once(-c.result, shard, "stream accept failed");
                    }
                    if c.ended.is_some() {
                        if c.result < 0 {
                            accept_after_tick.push(listener);
                        } else {
                            accept_rearm.push(listener);
                        }
                    }
                    let now = Instant::now();
                    while let Some((position, socket)) = ring.take_accepted() {
                        let Ok(client) = socket.peer_addr() else {
                            continue; // Reset before we looked: dropping closes it.
                        };
                        if let Some(slot) =
                            streams.admit(&mut core, position as usize, socket, client, now)
                        {
                            stream_arm(&mut core, &mut streams, &mut ring, &mut stream_retry, slot);
                        }
                    }
                }
                Op::StreamRecv { slot } | Op::StreamSend { slot } => {
                    stream_completion(
                        &mut core,
                        &mut streams,
                        &mut ring,
                        &mut stream_retry,
                        c,
                        slot,
                    );
                }
                Op::Cancel | Op::Free => {}
            }
        }
        // Connections whose encryption of a relayed frame panicked (see `Streams::queue`).
        while let Some(slot) = streams.take_panicked() {
            stream_close(&mut core, &mut streams, &mut ring, slot);
        }
    }
    // Drain the ring before any socket closes: SQEs still queued may name their descriptors,
    // and stream buffers lent to operations come back only through their completions.
    ring.shutdown(|c| {
        if let (Op::StreamRecv { slot } | Op::StreamSend { slot }, Some(ended)) = (c.op, c.ended)
            && let Some(conn) = streams.conn_mut(slot)
        {
            conn.io.give_back(ended);
        }
    });
    drop(streams);
    drop(core);
}

/// Arms what a live connection needs: a receive unless one is in flight, and a send of its
/// queue's head unless one is in flight or the queue is empty. A push that does not fit the
/// submission queue is retried next turn.
fn stream_arm(
    core: &mut crate::tables::Core,
    streams: &mut Streams,
    ring: &mut Ring,
    retry: &mut Vec<u32>,
    slot: u32,
) {
    let Some(conn) = streams.conn_mut(slot) else {
        return;
    };
    if conn.retired || conn.panicked {
        // A panicked one is closed at the end of this turn (`Streams::take_panicked`).
        return;
    }
    let fd = conn.socket.as_raw_fd();
    let mut failed = false;
    let mut broken = false;
    if conn.recv_op.is_none() {
        let (range, buf) = conn.io.read_range();
        if range.is_empty() {
            // A frame larger than the buffer is pending: `received` refuses those, so this
            // connection is broken.
            broken = true;
        } else {
            match ring.stream_recv(slot, fd, buf, range) {
                Ok(token) => conn.recv_op = Some(token),
                Err(_) => failed = true,
            }
        }
    }
    if !broken && conn.send_op.is_none() && conn.io.wants_write() {
        let (range, buf) = conn.io.send_queue().head_for_send();
        match ring.stream_send(slot, fd, buf, range) {
            Ok(token) => conn.send_op = Some(token),
            Err(_) => failed = true,
        }
    }
    if broken {
        stream_close(core, streams, ring, slot);
    } else if failed && !retry.contains(&slot) {
        retry.push(slot);
    }
}

/// A stream receive or send completed.
fn stream_completion(
    core: &mut crate::tables::Core,
    streams: &mut Streams,
    ring: &mut Ring,
    retry: &mut Vec<u32>,
    c: Completion,
    slot: u32,
) {
    let Some(conn) = streams.conn_mut(slot) else {
        return;
    };
    if let Some(ended) = c.ended {
        conn.io.give_back(ended);
    }
    let is_recv = matches!(c.op, Op::StreamRecv { .. });
    if is_recv {
        conn.recv_op = None;
    } else {
        conn.send_op = None;
    }
    if conn.retired {
        if conn.recv_op.is_none() && conn.send_op.is_none() {
            streams.release(slot);
        }
        return;
    }
    let outcome = match c.result {
        n if n > 0 && is_recv => streams.received(core, slot, n as usize),
        n if n > 0 => {
            conn.io.sent(n as usize);
            Ok(())
        }
        // EOF from the client (a zero-length send does not happen: the head is never empty).
        0 => Err(Close::Eof),
        e if matches!(-e, libc::EINTR | libc::EAGAIN) => Ok(()),
        _ => Err(Close::Error),
    };
    match outcome {
        Ok(()) => stream_arm(core, streams, ring, retry, slot),
        // An end of either kind (EOF or error) closes the same way.
        Err(_) => stream_close(core, streams, ring, slot),
    }
}

/// Closes a connection: retired at once; its socket is shut down and its operations cancelled,
/// and it is freed when the last of them completes (at once if none is in flight).
fn stream_close(core: &mut crate::tables::Core, streams: &mut Streams, ring: &mut Ring, slot: u32) {
    if let Some(conn) = streams.conn_mut(slot)
        && conn.send_op.is_none()
        && !conn.panicked
        && conn.io.wants_write()
    {
        // Best effort, one non-blocking write: what is queued last, our TLS close_notify (a
        // clean close) or the alert that names the client's TLS error.
        let _ = std::io::Write::write(&mut conn.socket, conn.io.pending());
    }
    if !streams.retire(core, slot) {
        return;
    }
    let Some(conn) = streams.conn_mut(slot) else {
        return;
    };
    // Ends a pending receive (it completes with 0) even if the cancel cannot be queued. Not for
    // a connection handed to the forwarder: shutdown(2) would end its duplicate there too.
    if !conn.handed_off {
        let _ = conn.socket.shutdown(std::net::Shutdown::Both);
    }
    let ops = [conn.recv_op, conn.send_op];
    if ops.iter().all(Option::is_none) {
        streams.release(slot);
        return;
    }
    for token in ops.into_iter().flatten() {
        let _ = ring.cancel(token);
    }
}

fn handle_recv(
    core: &mut crate::tables::Core,
    streams: &mut Streams,
    ring: &mut Ring,
    stream_retry: &mut Vec<u32>,
    errnos: &mut ErrnoLog,
    c: Completion,
    sock: u32,
) {
    if c.result < 0 {
        match -c.result {
            // The buffer ring ran dry; the receive ends and is re-armed after buffers return.
            // Cancelled by RemoveAllocation or shutdown; ICMP errors on a relay socket.
            libc::ENOBUFS
            | libc::ECANCELED
            | libc::ECONNREFUSED
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH => {}
            errno => {
                errnos.log_once(errno, core.shard().0, "multishot RecvMsg failed");
            }
        }
        return;
    }
    let Some(bid) = c.buffer() else { return };
    let Some(view) = ring.recv_view(bid, c.result as usize) else {
        ring.recycle(bid);
        core.count_unreadable(sock, DropReason::Malformed);
        return;
    };
    if view.truncated {
        ring.recycle(bid);
        core.count_unreadable(sock, DropReason::Truncated);
        return;
    }
    let Some(from) = view.from else {
        ring.recycle(bid);
        core.count_unreadable(sock, DropReason::Malformed);
        return;
    };
    let action = match ring.buffer_mut(bid) {
        Some(buffer) => {
            let action = core.handle_datagram(sock, from, buffer, view.payload);
            if let Action::ToStream {
                listener,
                to,
                relay,
                header,
                header_len,
                range,
                padding,
            } = action
            {
                // Stream clients get a copy in their send queue; the buffer goes back now.
                let parts = [&header[..header_len], buffer.get(range).unwrap_or(&[])];
                match streams.queue(core, listener, to, parts, padding) {
                    Ok(slot) => stream_arm(core, streams, ring, stream_retry, slot),
                    Err(reason) => core.relay_failed(relay, reason),
                }
                Action::Done
            } else {
                action
            }
        }
        None => Action::Done,
    };
    let (via, to, relay, payload) = match action {
        Action::Done | Action::ToStream { .. } => {
            ring.recycle(bid);
            return;
        }
        Action::Send {
            via,
            to,
            range,
            relay,
        } => (
            via,
            to,
            relay,
            Payload::Buffer {
                bid,
                range,
                header: &[],
                padding: 0,
                relay,
            },
        ),
        Action::SendIndication {
            via,
            to,
            relay,
            ref header,
            header_len,
            range,
            padding,
        } => (
            via,
            to,
            relay,
            Payload::Buffer {
                bid,
                range,
                header: &header[..header_len],
                padding,
                relay,
            },
        ),
    };
    let Some(fd) = core.fd(via) else {
        ring.recycle(bid);
        core.relay_failed(relay, DropReason::NoAllocation);
        return;
    };
    if let Err(PushError::NoSlot | PushError::QueueFull) = ring.send(fd, &to, payload) {
        core.relay_failed(relay, DropReason::QueueFull);
    }
}

/// The loop's socket work lists.
struct Lists<'a> {
    rearm: &'a mut Vec<u32>,
    release_after_submit: &'a mut Vec<u32>,
    cancel_retry: &'a mut Vec<u32>,
    stream_retry: &'a mut Vec<u32>,
}

/// Executes a command's effect; returns true on shutdown.
fn apply_effect(
    core: &mut crate::tables::Core,
    streams: &mut Streams,
    ring: &mut Ring,
    socks: &mut Vec<SockState>,
    lists: Lists<'_>,
    effect: Effect,
) -> bool {
    match effect {
        Effect::None => {}
        Effect::Opened(slots) => {
            if socks.len() < core.socket_slots() {
                socks.resize(core.socket_slots(), SockState::default());
            }
            for sock in slots.into_iter().flatten() {
                socks[sock as usize] = SockState::default();
                lists.rearm.push(sock);
            }
        }
        Effect::Closing(slots) => {
            for sock in slots.into_iter().flatten() {
                close_sock(
                    ring,
                    socks,
                    lists.release_after_submit,
                    lists.cancel_retry,
                    sock,
                );
            }
        }
        Effect::Transmit { via, to, bytes } => {
            let Some(fd) = core.fd(via) else { return false };
            match ring.send(fd, &to, Payload::Owned(bytes)) {
                Ok(()) => core.counters_mut().transmits += 1,
                Err(_) => core.counters_mut().transmit_failures += 1,
            }
        }
        Effect::StreamTransmit {
            listener,
            to,
            bytes,
        } => match streams.queue(core, listener, to, [&bytes, &[]], 0) {
            Ok(slot) => {
                core.counters_mut().transmits += 1;
                stream_arm(core, streams, ring, lists.stream_retry, slot);
            }
            Err(_) => core.counters_mut().transmit_failures += 1,
        },
        Effect::Shutdown => return true,
    }
    false
}

/// Starts closing a socket: cancel its multishot receive (closed when the last CQE arrives), or
/// close it after the next submit when nothing is armed.
fn close_sock(
    ring: &mut Ring,
    socks: &mut [SockState],
    release_after_submit: &mut Vec<u32>,
    cancel_retry: &mut Vec<u32>,
    sock: u32,
) {
    let Some(state) = socks.get_mut(sock as usize) else {
        release_after_submit.push(sock);
        return;
    };
    match state.recv {
        Some(token) => {
            state.closing = true;
            if ring.cancel(token).is_err() {
                // Queue full even after a submit: try again next turn.
                cancel_retry.push(sock);
            }
        }
        None => {
            // `closing` keeps the re-arm pass off it until the slot is reused.
            state.closing = true;
            release_after_submit.push(sock);
        }
    }
}
