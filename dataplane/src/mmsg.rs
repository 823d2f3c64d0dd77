//! The fallback shard loop: level-triggered epoll over the shard's sockets and its eventfd,
//! `recvmmsg` batches in, `sendmmsg` batches out. Same tables and fast path as io_uring.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::time::Instant;

use crate::DropReason;
use crate::shard::{ErrnoLog, ShardSetup, classify_send_errno};
use crate::stream::Streams;
use crate::sys::{Epoll, RecvBatch, SendBatch};
use crate::tables::{Action, Core, Effect};

const WAKE_TOKEN: u64 = u64::MAX;
/// The stream epoll descriptor (TCP/TLS listeners and connections).
const STREAMS_TOKEN: u64 = u64::MAX - 1;

/// `recvmmsg` batches per ready socket per turn, so one busy socket cannot starve the others.
const BATCHES_PER_SOCKET_MAX: usize = 8;

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
    let mut epoll = match Epoll::new(sizes.batch) {
        Ok(epoll) => epoll,
        Err(source) => {
            let _ = ready.send(Err(crate::DataPlaneError::ShardSetup {
                shard,
                what: "epoll",
                source,
            }));
            return;
        }
    };
    let mut wake = File::from(wake);
    let mut registered = epoll.add(wake.as_raw_fd(), WAKE_TOKEN);
    if registered.is_ok()
        && let Some(fd) = streams.epoll_fd()
    {
        registered = epoll.add(fd, STREAMS_TOKEN);
    }
    for &slot in core.listener_slots() {
        if registered.is_ok()
            && let Some(fd) = core.fd(slot)
        {
            registered = epoll.add(fd, u64::from(slot));
        }
    }
    if let Err(source) = registered {
        let _ = ready.send(Err(crate::DataPlaneError::ShardSetup {
            shard,
            what: "epoll registration",
            source,
        }));
        return;
    }
    let mut recv = RecvBatch::new(sizes.batch, sizes.buffer_size);
    let mut send = SendBatch::new(sizes.batch);
    let mut tokens: Vec<u64> = Vec::with_capacity(sizes.batch);
    let mut errnos = ErrnoLog::default();
    let mut next_report = Instant::now() + counters_interval;
    let _ = ready.send(Ok(()));
    // Dropped now: a shard that dies before its signal must disconnect the handshake.
    drop(ready);

    let mut shutdown = false;
    while !shutdown {
        let now = Instant::now();
        let timeout_ms = next_report
            .saturating_duration_since(now)
            .as_millis()
            .min(60_000) as i32
            + 1;
        if let Err(error) = epoll.wait(timeout_ms, &mut tokens) {
            tracing::error!(shard, %error, "epoll_wait failed; shard stops");
            break;
        }
        core.counters_mut().loop_turns += 1;
        // epoll_wait may have slept: the bandwidth buckets refill from the time after it.
        core.set_now(Instant::now());
        let mut handled = 0u64;
        for &token in &tokens {
            if token == WAKE_TOKEN {
                let mut counter = [0u8; 8];
                let _ = wake.read(&mut counter);
                while let Ok(command) = commands.try_recv() {
                    let effect = core.handle_command(command);
                    shutdown |= apply_effect(&mut core, &mut streams, &epoll, effect);
                }
                while let Some(sock) = core.take_pending_close() {
                    close_sock(&mut core, &epoll, sock);
                }
                continue;
            }
            if token == STREAMS_TOKEN {
                streams.poll(&mut core, now);
                continue;
            }
            let sock = token as u32;
            for _ in 0..BATCHES_PER_SOCKET_MAX {
                let Some(fd) = core.fd(sock) else { break };
                let n = match recv.recv(fd) {
                    Ok(n) => n,
                    Err(error) => {
                        let errno = error.raw_os_error().unwrap_or(0);
                        // A pending ICMP error surfaces on the next receive of a UDP socket.
                        if !matches!(
                            errno,
                            libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH
                        ) {
                            errnos.log_once(errno, shard, "recvmmsg failed");
                        }
                        break;
                    }
                };
                handled += n as u64;
                for i in 0..n {
                    let received = recv.get(i);
                    if received.truncated {
                        core.count_unreadable(sock, DropReason::Truncated);
                        continue;
                    }
                    let Some(from) = received.from else {
                        core.count_unreadable(sock, DropReason::Malformed);
                        continue;
                    };
                    let action =
                        core.handle_datagram(sock, from, received.buffer, received.payload);
                    match action {
                        Action::Done => {}
                        Action::Send {
                            via,
                            to,
                            range,
                            relay,
                        } => match core.fd(via) {
                            Some(fd) => send.push(relay, fd, &to, i, range, &[], 0),
                            None => core.relay_failed(relay, DropReason::NoAllocation),
                        },
                        Action::SendIndication {
                            via,
                            to,
                            relay,
                            header,
                            header_len,
                            range,
                            padding,
                        } => match core.fd(via) {
                            Some(fd) => {
                                send.push(relay, fd, &to, i, range, &header[..header_len], padding)
                            }
                            None => core.relay_failed(relay, DropReason::NoAllocation),
                        },
                        Action::ToStream {
                            listener,
                            to,
                            relay,
                            header,
                            header_len,
                            range,
                            padding,
                        } => {
                            let parts = [&header[..header_len], &received.buffer[range]];
                            if let Err(reason) =
                                streams.send_frame(&mut core, listener, to, parts, padding)
                            {
                                core.relay_failed(relay, reason);
                            }
                        }
                    }
                }
                let calls = send.flush(&recv, |relay, errno| {
                    core.relay_failed(relay, classify_send_errno(errno, &mut errnos, shard));
                });
                core.counters_mut().submits += calls;
                if n < sizes.batch {
                    break;
                }
            }
        }
        let counters = core.counters_mut();
        counters.completions += handled;
        counters.completions_per_turn_max = counters.completions_per_turn_max.max(handled);
        if Instant::now() >= next_report {
            streams.sweep(&mut core, Instant::now());
            core.report_counters();
            next_report = Instant::now() + counters_interval;
        }
    }
}

/// Executes a command's effect; returns true on shutdown.
fn apply_effect(core: &mut Core, streams: &mut Streams, epoll: &Epoll, effect: Effect) -> bool {
    match effect {
        Effect::None => {}
        Effect::Opened(slots) => {
            for sock in slots.into_iter().flatten() {
                if let Some(fd) = core.fd(sock)
                    && let Err(error) = epoll.add(fd, u64::from(sock))
                {
                    tracing::error!(shard = core.shard().0, %error, "epoll add for a relay socket failed");
                }
            }
        }
        Effect::Closing(slots) => {
            for sock in slots.into_iter().flatten() {
                close_sock(core, epoll, sock);
            }
        }
        Effect::Transmit { via, to, bytes } => {
            let sent = core.socket(via).map(|s| s.send_to(&bytes, to));
            match sent {
                Some(Ok(_)) => core.counters_mut().transmits += 1,
                Some(Err(_)) | None => core.counters_mut().transmit_failures += 1,
            }
        }
        Effect::StreamTransmit {
            listener,
            to,
            bytes,
        } => match streams.send_frame(core, listener, to, [&bytes, &[]], 0) {
            Ok(()) => core.counters_mut().transmits += 1,
            Err(_) => core.counters_mut().transmit_failures += 1,
        },
        Effect::Shutdown => return true,
    }
    false
}

fn close_sock(core: &mut Core, epoll: &Epoll, sock: u32) {
    if let Some(fd) = core.fd(sock) {
        let _ = epoll.delete(fd);
    }
    core.release_socket(sock);
}
