//! The data plane's error type: each variant names what was attempted.

use std::io;
use std::net::SocketAddr;

/// Errors from starting or driving the data plane.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataPlaneError {
    /// The configuration cannot work.
    #[error("invalid data-plane configuration: {0}")]
    Config(&'static str),
    /// Binding a listener failed.
    #[error("bind UDP {addr} for shard {shard}: {source}")]
    Bind {
        addr: SocketAddr,
        shard: u16,
        source: io::Error,
    },
    /// Binding a TCP (stream) listener failed.
    #[error("bind TCP {addr} for shard {shard}: {source}")]
    BindTcp {
        addr: SocketAddr,
        shard: u16,
        source: io::Error,
    },
    /// Configuring a socket failed.
    #[error("configure UDP socket {addr} ({what}): {source}")]
    SocketOption {
        addr: SocketAddr,
        what: &'static str,
        source: io::Error,
    },
    /// io_uring was required but is unavailable.
    #[error("io_uring unavailable: {reason}")]
    UringUnavailable { reason: String },
    /// Setting up a shard's ring, buffers or event source failed.
    #[error("set up {what} for shard {shard}: {source}")]
    ShardSetup {
        shard: u16,
        what: &'static str,
        source: io::Error,
    },
    /// Spawning a shard thread failed.
    #[error("spawn thread for shard {shard}: {source}")]
    Spawn { shard: u16, source: io::Error },
    /// A shard stopped before reporting ready.
    #[error("shard {shard} stopped during startup")]
    ShardStartup { shard: u16 },
    /// No shard with that index.
    #[error("no shard {shard}")]
    NoSuchShard { shard: u16 },
    /// The shard's thread has ended.
    #[error("shard {shard} has stopped")]
    ShardStopped { shard: u16 },
    /// Waking the shard (eventfd write) failed.
    #[error("wake shard {shard}: {source}")]
    Wake { shard: u16, source: io::Error },
}
