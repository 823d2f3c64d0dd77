//! The vocabulary the engine (`uturn-engine`), the data plane (`uturn-dataplane`) and the
//! control thread (`uturn-control`) share, defined once so nothing converts at the boundary:
//! a shard's number, an allocation's identity, the client transport and the 5-tuple.
//!
//! A leaf crate: the engine must not depend on the data plane nor the data plane on the engine,
//! so the types both speak live below them. Plain `Copy` values, no behaviour.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::net::SocketAddr;

/// A data-plane shard (thread) number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

/// An allocation's identity, given by the engine and unique for its life; the shards' tables
/// key allocations by it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocationId(pub u64);

/// The transport between client and server (RFC 8656 §2.1 and §3.1; the relay side is always
/// UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// UDP datagrams on a UDP listener.
    Udp,
    /// TURN over a TCP connection.
    Tcp,
    /// TURN over TLS over TCP.
    Tls,
}

/// RFC 8656 §2.1: "5-tuple: The combination (client IP address and port, server IP address
/// and port, and transport protocol (currently one of UDP, TCP, DTLS/UDP, or TLS/TCP)) used
/// to communicate between the client and the server."
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FiveTuple {
    /// Client to server transport.
    pub transport: Transport,
    /// The client's address as the server sees it.
    pub client: SocketAddr,
    /// The listener address that received the message.
    pub server: SocketAddr,
}
