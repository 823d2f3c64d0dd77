//! uturn's control plane: the control thread ([`shell`]) that runs the sans-IO engine
//! (`uturn-engine`) beside the data plane, the HTTP listener, telemetry, the typed TOML
//! configuration ([`config`]) and the `uturn` binary.
//!
//! # Data flow
//!
//! ```text
//! shard ──bytes──► shell ──► Engine::handle_message(now, wall_clock, shard, 5-tuple, bytes)
//!                                │
//!            Engine::poll_output() ──► Output::BindRelay  ──► shell binds relay sockets
//!                                                              └► Engine::handle_relay_bound
//!                                  ──► Output::Table      ──► shard tables
//!                                  ──► Output::Transmit   ──► shard sends the response
//!                                  ──► Output::Event      ──► logs, metrics, ops log
//! ```
//!
//! The engine's modules are re-exported under their old paths (`uturn_control::engine`,
//! `uturn_control::auth`...) so the control thread, the binary and the end-to-end tests name
//! one set of types; the engine itself is documented in `uturn-engine`.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![warn(missing_docs)]

pub mod config;
pub mod http;
pub mod listen;
pub mod ops;
pub mod shell;
pub mod telemetry;
pub mod tls;
pub mod xdp;

pub use uturn_engine::{allocation, auth, engine, policy, ports};

pub use config::{Config, ConfigError, read_users_file, user_table};
pub use uturn_engine::{
    AllocationId, AllocationInfo, AllocationSnapshot, AuthFailure, Authenticated, BindFailed,
    BindToken, Cidr, DropReason, Engine, EngineConfig, EngineError, Event, FiveTuple,
    IntegrityKind, Output, OwnAddresses, PeerDenied, PeerPolicy, RelayAddress, ReloadRefused,
    ShardId, TableChange, Transport, UserTable, UsersFileError, parse_users_file,
};
