//! Starting shards: backend choice, listener binding, pinned threads and the readiness
//! handshake. The backend is picked here, once, and callers never see which one runs.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::socket::{self, SocketTuning};
use crate::stream::{self, StreamKind, Streams};
use crate::tables::Core;
use crate::{
    Backend, BackendChoice, DataPlane, DataPlaneConfig, DataPlaneError, DropReason, PAYLOAD_OFFSET,
    ShardCommand, ShardHandle, ShardId, ToControl, bufring, contain, mmsg, ring, sys, uring,
};

/// Buffer and batch sizes a shard needs, from the config.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sizes {
    pub(crate) buffer_size: usize,
    pub(crate) send_slots: usize,
    pub(crate) recv_buffers_free: usize,
    pub(crate) batch: usize,
}

/// Everything a shard thread starts with.
pub(crate) struct ShardSetup {
    pub(crate) core: Core,
    /// The shard's TCP/TLS listeners and connections.
    pub(crate) streams: Streams,
    pub(crate) commands: Receiver<ShardCommand>,
    pub(crate) wake: OwnedFd,
    pub(crate) sizes: Sizes,
    pub(crate) counters_interval: Duration,
    /// Readiness handshake: the shard sends `Ok` once it can receive, or why it cannot.
    pub(crate) ready: Sender<Result<(), DataPlaneError>>,
}

/// Logs each unknown errno once per shard, loudly, then only counts it.
#[derive(Debug, Default)]
pub(crate) struct ErrnoLog {
    seen: [u64; 4],
}

impl ErrnoLog {
    pub(crate) fn log_once(&mut self, errno: i32, shard: u16, what: &'static str) {
        let index = errno.clamp(0, 255) as usize;
        let (word, bit) = (index / 64, 1u64 << (index % 64));
        if self.seen[word] & bit == 0 {
            self.seen[word] |= bit;
            let error = io::Error::from_raw_os_error(errno);
            tracing::error!(shard, errno, %error, "{what} (unexpected errno; logged once)");
        }
    }
}

/// Maps a send's errno to a drop reason; logs unexpected ones once.
pub(crate) fn classify_send_errno(errno: i32, log: &mut ErrnoLog, shard: u16) -> DropReason {
    match errno {
        // Expected on UDP: ICMP errors from earlier datagrams, routes, firewalls, DF too big.
        libc::ECONNREFUSED
        | libc::EHOSTUNREACH
        | libc::ENETUNREACH
        | libc::ENETDOWN
        | libc::EHOSTDOWN
        | libc::EPERM
        | libc::EACCES
        | libc::EMSGSIZE
        | libc::EADDRNOTAVAIL => DropReason::SendError,
        // Socket buffer full or kernel memory short: the queue is full.
        libc::EAGAIN | libc::ENOBUFS | libc::ENOMEM => DropReason::QueueFull,
        // A descriptor closed under a send would be a bug in socket lifetimes.
        libc::EBADF | libc::ENOTSOCK | libc::EFAULT => {
            log.log_once(
                errno,
                shard,
                "send failed: descriptor or buffer invalid (bug)",
            );
            DropReason::SendError
        }
        _ => {
            log.log_once(errno, shard, "send failed");
            DropReason::SendError
        }
    }
}

/// Wakes a shard: adds 1 to its eventfd.
pub(crate) fn wake(file: &File) -> io::Result<()> {
    match (&*file).write(&1u64.to_ne_bytes()) {
        Ok(_) => Ok(()),
        // The counter is saturated: the shard has a wake-up pending anyway.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}

fn validate(config: &DataPlaneConfig) -> Result<(), DataPlaneError> {
    if config.listen.is_empty() && config.stream_listen.is_empty() {
        return Err(DataPlaneError::Config("no listen address"));
    }
    if config.tls.is_none()
        && config
            .stream_listen
            .iter()
            .any(|l| l.kind != StreamKind::Tcp)
    {
        return Err(DataPlaneError::Config(
            "tls and auto listeners need a TLS certificate and key",
        ));
    }
    let limits = &config.stream_limits;
    if limits.connections_max == 0
        || limits.idle_timeout.is_zero()
        || limits.frame_len_max < 2048
        || limits.send_queue_bytes < limits.frame_len_max
    {
        return Err(DataPlaneError::Config(
            "stream limits: connections_max and idle_timeout must be positive, \
             frame_len_max at least 2048 and send_queue_bytes at least frame_len_max",
        ));
    }
    if config.buffer_size < PAYLOAD_OFFSET + 512 || config.buffer_size > (1 << 20) {
        return Err(DataPlaneError::Config(
            "buffer_size must be 556..=1048576 bytes",
        ));
    }
    if config.send_slots == 0 || config.recv_buffers_free == 0 || config.batch_size == 0 {
        return Err(DataPlaneError::Config(
            "send_slots, recv_buffers_free and batch_size must be positive",
        ));
    }
    if config.send_slots + config.recv_buffers_free > bufring::ENTRIES_MAX {
        return Err(DataPlaneError::Config(
            "send_slots + recv_buffers_free must not exceed 32768 (buffer ring limit)",
        ));
    }
    if config.control_queue_depth == 0 {
        return Err(DataPlaneError::Config(
            "control_queue_depth must be positive",
        ));
    }
    if config.counters_interval.is_zero() {
        return Err(DataPlaneError::Config("counters_interval must be positive"));
    }
    if config.threads == Some(0) || config.threads.is_some_and(|t| t > usize::from(u16::MAX)) {
        return Err(DataPlaneError::Config("threads must be 1..=65535"));
    }
    Ok(())
}

fn choose_backend(choice: BackendChoice) -> Result<(Backend, String), DataPlaneError> {
    match choice {
        BackendChoice::Mmsg => Ok((Backend::Mmsg, "configured".to_owned())),
        BackendChoice::Uring => match ring::probe() {
            Ok(()) => Ok((Backend::Uring, "configured".to_owned())),
            Err(reason) => Err(DataPlaneError::UringUnavailable { reason }),
        },
        BackendChoice::Auto => match ring::probe() {
            Ok(()) => Ok((Backend::Uring, "io_uring probe succeeded".to_owned())),
            Err(reason) => Ok((Backend::Mmsg, reason)),
        },
    }
}

pub(crate) fn start(
    config: DataPlaneConfig,
) -> Result<(DataPlane, Receiver<ToControl>), DataPlaneError> {
    validate(&config)?;
    let cpus = sys::allowed_cpus().unwrap_or_default();
    let threads = config.threads.unwrap_or_else(|| {
        if cpus.is_empty() {
            std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(1)
        } else {
            cpus.len()
        }
    });
    let (backend, backend_reason) = choose_backend(config.backend)?;
    let tuning = SocketTuning {
        recv_buffer_bytes: config.socket_recv_buffer_bytes,
        send_buffer_bytes: config.socket_send_buffer_bytes,
    };
    let (mut listeners, resolved) = socket::bind_listeners(&config.listen, threads, &tuning)?;
    let (mut stream_listeners, stream_resolved) =
        stream::bind_stream_listeners(&config.stream_listen, threads)?;
    let stream_addrs: Vec<(std::net::SocketAddr, StreamKind)> =
        stream_resolved.iter().map(|l| (l.addr, l.kind)).collect();
    let (to_control, from_shards) = crossbeam_channel::bounded(config.control_queue_depth);
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(threads);
    let sizes = Sizes {
        buffer_size: config.buffer_size,
        send_slots: config.send_slots,
        recv_buffers_free: config.recv_buffers_free,
        batch: config.batch_size,
    };
    // One table for every shard: the per-source limit is server-wide.
    let sources = stream::SourceConnections::default();
    let mut plane = DataPlane {
        shards: Vec::with_capacity(threads),
        backend,
        backend_reason,
        listeners: resolved,
        stream_listeners: stream_resolved,
    };
    for (index, (shard_listeners, shard_streams)) in listeners
        .drain(..)
        .zip(stream_listeners.drain(..))
        .enumerate()
    {
        let id = u16::try_from(index).unwrap_or(u16::MAX);
        let setup_error = |what, source| DataPlaneError::ShardSetup {
            shard: id,
            what,
            source,
        };
        let wake = sys::eventfd().map_err(|e| setup_error("eventfd", e))?;
        let wake_writer = File::from(wake.try_clone().map_err(|e| setup_error("eventfd", e))?);
        let (commands_tx, commands_rx) = crossbeam_channel::unbounded();
        let mut core = Core::new(
            ShardId(id),
            shard_listeners,
            &stream_addrs,
            to_control.clone(),
        );
        core.set_peer_guard(config.peer_guard.clone());
        core.set_bandwidth_cap(config.allocation_bytes_per_sec);
        core.set_counters_published(config.publish_counters);
        let base = core.stream_listener_base();
        let streams = Streams::new(
            shard_streams
                .into_iter()
                .zip(&stream_addrs)
                .enumerate()
                .map(|(i, (socket, &(_, kind)))| {
                    (
                        base.saturating_add(u16::try_from(i).unwrap_or(u16::MAX)),
                        kind,
                        socket,
                    )
                })
                .collect(),
            config.tls.clone(),
            config.stream_limits,
            &config.stream_edge,
            id,
            sources.clone(),
            // io_uring accepts, receives and sends through its ring; only mmsg polls epoll.
            backend == Backend::Mmsg,
        )
        .map_err(|e| setup_error("stream epoll", e))?;
        let setup = ShardSetup {
            core,
            streams,
            commands: commands_rx,
            wake,
            sizes,
            counters_interval: config.counters_interval,
            ready: ready_tx.clone(),
        };
        let cpu = if config.pin_threads && !cpus.is_empty() {
            Some(cpus[index % cpus.len()])
        } else {
            None
        };
        let thread = std::thread::Builder::new()
            .name(format!("uturn-shard-{id}"))
            .spawn(move || {
                // Before any work: a panic outside a connection's contained work aborts.
                contain::enter_shard_thread();
                if let Some(cpu) = cpu
                    && let Err(error) = sys::pin_current_thread(cpu)
                {
                    tracing::warn!(shard = id, cpu, %error, "could not pin shard thread");
                }
                match backend {
                    Backend::Uring => uring::run(setup),
                    Backend::Mmsg => mmsg::run(setup),
                }
            })
            .map_err(|source| DataPlaneError::Spawn { shard: id, source })?;
        plane.shards.push(ShardHandle {
            commands: commands_tx,
            wake: wake_writer,
            thread: Some(thread),
        });
    }
    drop(ready_tx);
    for index in 0..threads {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            // Dropping `plane` shuts down the shards that did start.
            Ok(Err(error)) => return Err(error),
            Err(_) => {
                return Err(DataPlaneError::ShardStartup {
                    shard: u16::try_from(index).unwrap_or(u16::MAX),
                });
            }
        }
    }
    Ok((plane, from_shards))
}
