//! The state of one allocation (RFC 8656 §2.2 "Allocations"), its permissions (§9) and channel
//! bindings (§12), and relay port reservations (§7.2, EVEN-PORT R=1).

use std::net::{IpAddr, SocketAddr};

use hashbrown::HashMap;
use uturn_proto::TransactionId;

use crate::auth::Authenticated;
use crate::ports::Family;
use crate::timers::TimerKey;
use crate::{AllocationId, FiveTuple, ShardId};

/// A relayed transport address: the socket address the relay socket binds to, and the one
/// advertised to the client in XOR-RELAYED-ADDRESS (they differ behind static NAT or on a
/// dual-NIC host, see `relay.external_ips`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RelayAddress {
    /// The address the shell binds (relay IP and port).
    pub bound: SocketAddr,
    /// The address the client is told.
    pub advertised: SocketAddr,
}

/// What expires when a deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    Allocation(AllocationId),
    Permission(AllocationId, IpAddr),
    Channel(AllocationId, u16),
    Reservation([u8; 8]),
}

/// RFC 8656 §2.2: "the 5-tuple, the relayed transport address, the authentication information,
/// the time-to-expiry, a list of permissions, a list of channel to peer bindings".
#[derive(Debug)]
pub(crate) struct Allocation {
    pub(crate) five_tuple: FiveTuple,
    pub(crate) shard: ShardId,
    pub(crate) auth: Authenticated,
    pub(crate) relays: Vec<RelayAddress>,
    pub(crate) expiry: TimerKey,
    /// Peer IP → its expiry. RFC 8656 §9: permissions are per IP, ports are ignored.
    pub(crate) permissions: HashMap<IpAddr, TimerKey>,
    /// Channel number → (peer, expiry).
    pub(crate) channels: HashMap<u16, (SocketAddr, TimerKey)>,
    /// Peer → channel number; the inverse of `channels`.
    pub(crate) channel_by_peer: HashMap<SocketAddr, u16>,
    /// RFC 8656 §7.2 note: the transaction that created the allocation and its success
    /// response, to answer a retransmitted Allocate identically.
    pub(crate) allocate_transaction: TransactionId,
    pub(crate) allocate_response: Vec<u8>,
    /// When it was created (for the admin API and the lifetime histogram).
    pub(crate) created_at: std::time::Instant,
    /// Requests answered on its 5-tuple since it was created, and how many were errors.
    pub(crate) requests: u64,
    pub(crate) errors: u64,
}

impl Allocation {
    pub(crate) fn families(&self) -> impl Iterator<Item = Family> + '_ {
        self.relays.iter().map(|relay| Family::of(relay.bound.ip()))
    }

    pub(crate) fn has_family(&self, family: Family) -> bool {
        self.families().any(|f| f == family)
    }
}

/// A port held for a later Allocate that presents `token` (RFC 8656 §7.2, EVEN-PORT R=1).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reservation {
    pub(crate) family: Family,
    pub(crate) port: u16,
    pub(crate) expiry: TimerKey,
}
