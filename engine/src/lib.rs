//! uturn's sans-IO TURN engine: its authentication, peer policy, relay ports, rate limits and
//! timers, configured by an [`EngineConfig`].
//!
//! # What it is
//!
//! [`Engine`] answers every STUN/TURN request that the data plane does not handle itself
//! (RFC 8489 Binding; RFC 8656 Allocate, Refresh, CreatePermission, ChannelBind), runs the
//! long-term credential mechanism ([`auth`]: static users, a users file and TURN REST shared
//! secrets, with MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256, PASSWORD-ALGORITHMS and
//! USERHASH), chooses relay ports ([`ports`]), applies the peer policy ([`policy`]) and
//! expires allocations, permissions, channels and port reservations on time.
//!
//! # Data flow
//!
//! ```text
//! shard ──bytes──► Engine::handle_message(now, wall_clock, shard, 5-tuple, bytes)
//!                      │  parse (uturn-proto) ► authenticate ► method checks in RFC order
//!                      ▼
//!            Engine::poll_output() ──► Output::BindRelay  ──► control thread binds relay sockets
//!                                                              └► Engine::handle_relay_bound
//!                                  ──► Output::Table      ──► shard tables (OpenAllocation
//!                                                              first, then the response)
//!                                  ──► Output::Transmit   ──► shard sends the response
//!                                  ──► Output::Event      ──► logs, metrics
//! Engine::poll_timeout() ──► Engine::handle_timeout(now) ──► RemovePermission, UnbindChannel,
//!                                                            RemoveAllocation
//! ```
//!
//! # What it refuses to do
//!
//! The engine reads no clock (every input carries `now: Instant`, and TURN REST expiry uses a
//! separate wall-clock input), performs no I/O (relay sockets are bound by the control thread on
//! request), spawns nothing and holds no locks: `&mut self` all the way down. Randomness
//! comes from the injected `R: RngCore`, so tests are reproducible. A refused request is an
//! output (a STUN error response with the RFC's code), never a Rust `Err`. Parsing, building,
//! integrity and credential keys come from `uturn-proto`; this crate has no codec of its own.
//! Nothing here depends on the data plane or the control thread: `uturn-control` builds the
//! [`EngineConfig`] from its TOML file and carries the engine's outputs to the shards.
//! `clippy.toml` in this crate refuses the clock, sockets, threads and locks
//! (`cargo clippy -p uturn-engine`), and `tests/hostile.rs` reads the source for them too.
//!
//! # Send and Data indications
//!
//! RFC 8656 §11 indications never reach the engine in normal operation: the data plane
//! relays a Send indication's DATA to its XOR-PEER-ADDRESS when the allocation has a
//! permission for that peer IP (and the peer policy admits it), dropping it silently
//! otherwise (§11.2: "the server MUST silently discard the indication" on a missing
//! permission, no DATA, no XOR-PEER-ADDRESS); it wraps a peer's UDP datagram into a Data
//! indication (or ChannelData when a channel is bound to that peer) only when a permission
//! exists for the peer's IP (§11.3). A Send indication that reaches the engine is dropped with
//! [`Event::Dropped`] and [`DropReason::Indication`].

//! # Decisions where the RFCs leave a choice
//!
//! - Responses carry FINGERPRINT exactly when the request did, and the integrity attribute the
//!   request used (MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256), keyed with the key that
//!   verified it. Error responses to authenticated requests are protected too; 400 for missing
//!   credentials attributes, 401, 431 and 438 are not (RFC 8489 §9.2.4).
//! - PASSWORD-ALGORITHMS offers SHA-256 then MD5. The nonce cookie announces "Username
//!   anonymity" (USERHASH) only when no TURN REST secret is configured, since a USERHASH cannot
//!   be mapped back to a REST username.
//! - A retransmitted Allocate (same 5-tuple and transaction ID) is answered from the cached
//!   success response before authentication; one that arrives while the relay sockets are
//!   still being bound is dropped (the first answer is coming).
//! - CreatePermission and ChannelBind beyond `permissions_per_allocation` or
//!   `channels_per_allocation` are answered 508 (Insufficient Capacity); allocations beyond
//!   `allocations_per_user` 486, beyond `allocations_total` or the port range 508.
//! - A Refresh with REQUESTED-ADDRESS-FAMILY matches a dual-stack allocation when either of its
//!   families is named; otherwise 443 (RFC 8656 §8.2).
//! - A request with a method the engine does not serve (including RFC 6062 Connect) is
//!   answered 400.
//! - TURN REST users count against `allocations_per_user` by their user part, not by the whole
//!   `expiry:user` username.
//! - While draining ([`Engine::set_draining`]) an authenticated Allocate that passed the 437
//!   check is answered 300 (Try Alternate) with the ALTERNATE-SERVER of the client's family from
//!   `ops.alternate_servers`, or 508 when there is none; Refresh, CreatePermission and
//!   ChannelBind on existing allocations are unaffected. The 300 carries MESSAGE-INTEGRITY, as
//!   RFC 8489 §10 asks of a redirect sent after authentication.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![warn(missing_docs)]
// clippy.toml refuses the clock in this crate; unit tests read it once for a base instant.
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod allocation;
pub mod auth;
pub mod config;
pub mod engine;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod map;
pub mod policy;
pub mod ports;
mod ratelimit;
mod timers;

pub use allocation::RelayAddress;
pub use auth::credentials::{UserTable, UsersFileError, parse_users_file};
pub use auth::{AuthFailure, Authenticated, IntegrityKind};
pub use config::{ConfigError, EngineConfig};
pub use engine::{
    AllocationInfo, AllocationSnapshot, BindFailed, DropReason, Engine, EngineError, Event, Output,
    ReloadRefused, TableChange,
};
pub use policy::{Cidr, OwnAddresses, PeerDenied, PeerPolicy};

/// The boundary vocabulary, shared with the data plane (`uturn-boundary`).
pub use uturn_boundary::{AllocationId, FiveTuple, ShardId, Transport};

/// Names the relay sockets of one [`Output::BindRelay`] until `OpenAllocation` takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BindToken(pub u64);
