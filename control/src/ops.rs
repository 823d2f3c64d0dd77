//! `[ops]`: how uturn is operated — the HTTP listener (metrics, health, admin API), its bearer
//! token, log format, drain alternates and how often shards publish their counters.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;

/// Default HTTP listener: loopback only, so an unconfigured server exposes nothing.
pub const HTTP_LISTEN_DEFAULT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9641);

/// `[ops]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsConfig {
    /// The HTTP listener for `/metrics`, `/healthz`, `/readyz` and `/api/v1/*`. Default
    /// `127.0.0.1:9641`. A non-loopback address needs `http_token`.
    pub http_listen: SocketAddr,
    /// Bearer token required on every request except `/healthz` and `/readyz`
    /// (`Authorization: Bearer TOKEN`). Default none (only allowed on loopback).
    pub http_token: Option<String>,
    /// Where to send new clients while draining: 300 (Try Alternate) with ALTERNATE-SERVER of
    /// the client's family. Default none (draining answers 508).
    pub alternate_servers: Vec<SocketAddr>,
    /// Log format on standard error: `"human"` (default) or `"json"`.
    pub log_format: LogFormat,
    /// Log filter (`tracing` EnvFilter syntax, e.g. `"info"` or `"uturn_control=debug"`; each
    /// comma-separated directive a level or `TARGET=LEVEL`, anything else is refused);
    /// reloadable. `RUST_LOG` wins at start-up when set. Default `"info"`.
    pub log_level: String,
    /// How often shards publish their counters, milliseconds. Default 1000.
    pub counters_interval_ms: u32,
    /// Prometheus metrics and the shards' counter reports. Default true. `false` (`--no-metrics`)
    /// exists to measure what metrics cost (`METRICS_AB=1 scripts/bench-compare.sh`): no
    /// recorder is installed (every metric update is a no-op), `/metrics` answers 404, shards
    /// keep counting locally but publish nothing, so the allocations API shows no packet
    /// counters either.
    pub metrics: bool,
    /// How long a client of the HTTP listener may take to send a request head, milliseconds;
    /// the connection is closed then. Default 5000.
    pub http_header_timeout_ms: u32,
    /// Connections the HTTP listener holds open at most. Beyond it the oldest connection that
    /// has not yet sent a request head is closed for the new one (none: the new one is).
    /// Default 1024.
    pub http_max_connections: u32,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

impl Default for OpsConfig {
    fn default() -> Self {
        Self {
            http_listen: HTTP_LISTEN_DEFAULT,
            http_token: None,
            alternate_servers: Vec::new(),
            log_format: LogFormat::Human,
            log_level: "info".to_owned(),
            counters_interval_ms: 1000,
            metrics: true,
            http_header_timeout_ms: 5000,
            http_max_connections: 1024,
        }
    }
}

impl OpsConfig {
    /// The counters interval as a duration.
    pub fn counters_interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.counters_interval_ms))
    }

    /// Refuses an exposed HTTP listener without a token, and values the server cannot use.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, reason: String| ConfigError::Invalid { field, reason };
        if self.http_token.as_deref().is_some_and(str::is_empty) {
            return Err(invalid("ops.http_token", "cannot be empty".into()));
        }
        if !self.http_listen.ip().is_loopback() && self.http_token.is_none() {
            return Err(invalid(
                "ops.http_listen",
                format!(
                    "{} is not a loopback address: anyone who reaches it could end allocations \
                     and drain the server; set ops.http_token (--http-token) or listen on \
                     127.0.0.1",
                    self.http_listen
                ),
            ));
        }
        if !(10..=60_000).contains(&self.counters_interval_ms) {
            return Err(invalid(
                "ops.counters_interval_ms",
                format!("must be 10 to 60000, not {}", self.counters_interval_ms),
            ));
        }
        if !(100..=60_000).contains(&self.http_header_timeout_ms) {
            return Err(invalid(
                "ops.http_header_timeout_ms",
                format!("must be 100 to 60000, not {}", self.http_header_timeout_ms),
            ));
        }
        if !(1..=65_536).contains(&self.http_max_connections) {
            return Err(invalid(
                "ops.http_max_connections",
                format!("must be 1 to 65536, not {}", self.http_max_connections),
            ));
        }
        Ok(())
    }
}
