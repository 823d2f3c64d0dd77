//! What the engine is configured with: [`EngineConfig`], the `[auth]`, `[limits]` and
//! `[peers]` sections as the TOML file spells them, the engine's part of `[relay]`
//! ([`RelaySettings`]), the SOFTWARE attribute and the drain alternates.
//!
//! The TOML file itself belongs to `uturn-control`, whose `Config` embeds the sections defined
//! here and builds an [`EngineConfig`] from them (`Config::engine_config`); this crate reads no
//! file. [`EngineConfig::validate`] checks what the engine relies on, naming the TOML field.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;

use crate::policy::Cidr;

/// RFC 8656 §3.2: "the default lifetime of an allocation is 10 minutes".
pub const ALLOCATION_LIFETIME_DEFAULT_SECS: u32 = 600;
/// RFC 8656 §7.2: "It is RECOMMENDED that the server use a maximum allowed lifetime value of no
/// more than 3600 seconds (1 hour)."
pub const ALLOCATION_LIFETIME_MAX_SECS: u32 = 3600;
/// RFC 8656 §9: "The Permission Lifetime MUST be 300 seconds (= 5 minutes)."
pub const PERMISSION_LIFETIME_SECS: u32 = 300;
/// RFC 8656 §12: "a channel binding lasts for 10 minutes unless refreshed".
pub const CHANNEL_LIFETIME_SECS: u32 = 600;
/// RFC 8656 §7.2: "The server MUST hold this reservation for at least 30 seconds".
pub const RESERVATION_LIFETIME_SECS: u32 = 30;
/// RFC 8656 §7.2: "the server SHOULD only allocate ports from the range 49152 - 65535".
pub const PORT_MIN_DEFAULT: u16 = 49152;
/// Upper end of the RFC 8656 §7.2 range.
pub const PORT_MAX_DEFAULT: u16 = 65535;
/// draft-uberti-behave-turn-rest-00 §2.2: "ttl: the duration for which the username and
/// password are valid, in seconds. A value of one day (86400 seconds) is recommended."
pub const REST_EXPIRY_MAX_DEFAULT_SECS: u32 = 86_400;

/// `[auth]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// REALM (RFC 8489 §14.9). Default `"uturn"` (Cisco Expressway uses `"TANDBERG"`).
    pub realm: String,
    /// Static users, `[[auth.users]]` tables. Default none.
    pub users: Vec<UserConfig>,
    /// A users file, reloadable at runtime: one `user:password` or `user:key=HEX` (the 16-byte
    /// MD5 long-term key as 32 hex digits) per line; `#` starts a comment line; blank lines are
    /// ignored. Default none.
    pub users_file: Option<PathBuf>,
    /// TURN REST API shared secrets (draft-uberti-behave-turn-rest-00). Several may be active
    /// at once for rotation: a username is accepted when its password matches any of them.
    /// Default none.
    pub secrets: Vec<String>,
    /// Separator between the expiry timestamp and the user in a REST username. Default `':'`.
    pub rest_separator: char,
    /// How long a NONCE stays valid, in seconds. Default 600.
    pub nonce_lifetime_secs: u32,
    /// Error code for a wrong MESSAGE-INTEGRITY: 401 (RFC 8489 §9.2.4, default) or 431 (what
    /// Cisco Expressway sends, for clients that expect it).
    pub integrity_failure_code: u16,
    /// Require long-term credentials on Binding requests, as Expressway X12.6.1+ does.
    /// Default false (plain STUN Binding stays open).
    pub binding_requires_auth: bool,
    /// Bound on cached derived keys of TURN REST users. Default 10000.
    pub rest_key_cache_entries: u32,
    /// How far ahead of the wall clock a TURN REST username's expiry may lie, in seconds; a
    /// credential that expires later is refused (401, `expiry_too_far`). REST credentials
    /// cannot be revoked (draft-uberti-behave-turn-rest-00 §5.1), so this bounds how long one
    /// handed to a browser, or leaked, stays usable, and a web app's wrong TTL shows at once.
    /// `0` means the default, 86400 (the REST draft's recommended one-day TTL). Reloadable.
    pub rest_expiry_max_secs: u32,
}

impl AuthConfig {
    /// [`AuthConfig::rest_expiry_max_secs`] with `0` resolved to the default.
    pub fn rest_expiry_max(&self) -> u64 {
        match self.rest_expiry_max_secs {
            0 => u64::from(REST_EXPIRY_MAX_DEFAULT_SECS),
            secs => u64::from(secs),
        }
    }
}

/// One `[[auth.users]]` entry: `username` and exactly one of `password` or `key`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The user name (USERNAME attribute).
    pub username: String,
    /// The password; both MD5 and SHA-256 keys are derived from it.
    #[serde(default)]
    pub password: Option<String>,
    /// The precomputed MD5 long-term key, 32 hex digits (RFC 8489 §9.2.2). Such a user can only
    /// authenticate with PASSWORD-ALGORITHM MD5 (or without PASSWORD-ALGORITHM).
    #[serde(default)]
    pub key: Option<String>,
}

/// `[limits]`. `0` means unlimited where noted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Allocations per user, answered 486 beyond (RFC 8656 §7.2 item 10). Default 0
    /// (unlimited: a conferencing back end often uses one user for every call).
    pub allocations_per_user: u32,
    /// Allocations in total, answered 508 beyond. Default 0 (limited by the port range only).
    pub allocations_total: u32,
    /// Permissions per allocation; a CreatePermission or ChannelBind that would exceed it is
    /// answered 508 (Insufficient Capacity). Default 128.
    pub permissions_per_allocation: u32,
    /// Channels per allocation; a ChannelBind beyond it is answered 508. Default 128.
    pub channels_per_allocation: u32,
    /// Unauthenticated requests answered per source address (IPv4 address or IPv6 /64) per
    /// second: plain Binding, 401 challenges and every other answer to a request without valid
    /// credentials. Beyond the budget requests are dropped silently and counted
    /// (`rate_limited`), so a reflected flood gets at most this many answers a second out of
    /// uturn. `0` disables. Default 50.
    pub unauthenticated_per_source_per_sec: u32,
    /// Burst of `unauthenticated_per_source_per_sec`. Default 100.
    pub unauthenticated_burst: u32,
    /// Failed authentications (wrong password, unknown user, expired REST credential) per
    /// source address per second. A source over its budget has every request carrying
    /// credentials dropped until the budget refills (`auth_rate_limited`), which stops password
    /// guessing from it. `0` disables. Default 1, burst 20.
    pub auth_failures_per_source_per_sec: u32,
    /// Burst of `auth_failures_per_source_per_sec`. Default 20.
    pub auth_failures_per_source_burst: u32,
    /// Failed authentications per user name per second; failures beyond it are dropped
    /// silently instead of answered. Correct credentials are still answered: locking a user
    /// out would let anyone lock out the conferencing back end's shared user. `0` disables.
    /// Default 5, burst 50.
    pub auth_failures_per_user_per_sec: u32,
    /// Burst of `auth_failures_per_user_per_sec`. Default 50.
    pub auth_failures_per_user_burst: u32,
    /// Bytes per second one allocation may relay, both directions together (a token bucket
    /// with one second of burst, kept in the shard); the excess is dropped and counted as
    /// `bandwidth`. `0` means no cap (default): the right cap depends on the codecs in use,
    /// e.g. 1250000 (10 Mbit/s) leaves room for HD video.
    pub allocation_bytes_per_sec: u32,
    /// Buckets in each rate-limit table (fixed at start; a spoofed-source flood cannot grow
    /// them). 32 bytes each. Default 16384.
    pub rate_limit_slots: u32,
}

/// `[peers]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeersConfig {
    /// Allow loopback peers (127.0.0.0/8, ::1 and their IPv4-mapped forms). Default false; for
    /// labs and tests only.
    pub allow_loopback: bool,
    /// Networks (CIDR, or bare addresses) opened to peers: private ranges (10/8, 172.16/12,
    /// 192.168/16, 100.64/10, fc00::/7) and `denied_peers` entries. Never opens loopback,
    /// unspecified, link-local, multicast, broadcast or 240/4 (see [`crate::policy`]).
    /// Default none; reloadable.
    pub allowed_peers: Vec<Cidr>,
    /// More networks refused to peers (CIDR or bare addresses), answered 403. Default none;
    /// reloadable.
    pub denied_peers: Vec<Cidr>,
}

/// The engine's part of `[relay]`: relay addresses, external mapping, port range and
/// lifetimes (the TOML section also holds data-plane settings, which stay in `uturn-control`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySettings {
    /// `relay.relay_ips`: at most one IPv4 and one IPv6 concrete address the relay sockets bind
    /// to. An engine given no relay IP of a family answers Allocates for that family 440
    /// (Address Family not Supported).
    pub relay_ips: Vec<IpAddr>,
    /// `relay.external_ips`: `"PUBLIC/PRIVATE"` or a bare `"PUBLIC"` (see
    /// [`EngineConfig::external_mappings`]).
    pub external_ips: Vec<String>,
    /// `relay.port_min`.
    pub port_min: u16,
    /// `relay.port_max`.
    pub port_max: u16,
    /// `relay.allocation_lifetime_default_secs`.
    pub allocation_lifetime_default_secs: u32,
    /// `relay.allocation_lifetime_max_secs`.
    pub allocation_lifetime_max_secs: u32,
    /// `relay.permission_lifetime_secs`.
    pub permission_lifetime_secs: u32,
    /// `relay.channel_lifetime_secs`.
    pub channel_lifetime_secs: u32,
    /// `relay.reservation_lifetime_secs`.
    pub reservation_lifetime_secs: u32,
    /// `relay.accept_rfc5766_channel_numbers`: also bind 0x5000-0x7FFF (RFC 5766).
    pub accept_rfc5766_channel_numbers: bool,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            relay_ips: Vec::new(),
            external_ips: Vec::new(),
            port_min: PORT_MIN_DEFAULT,
            port_max: PORT_MAX_DEFAULT,
            allocation_lifetime_default_secs: ALLOCATION_LIFETIME_DEFAULT_SECS,
            allocation_lifetime_max_secs: ALLOCATION_LIFETIME_MAX_SECS,
            permission_lifetime_secs: PERMISSION_LIFETIME_SECS,
            channel_lifetime_secs: CHANNEL_LIFETIME_SECS,
            reservation_lifetime_secs: RESERVATION_LIFETIME_SECS,
            accept_rfc5766_channel_numbers: false,
        }
    }
}

/// Everything an [`crate::Engine`] is built from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EngineConfig {
    /// `[auth]`.
    pub auth: AuthConfig,
    /// The engine's part of `[relay]`.
    pub relay: RelaySettings,
    /// `[limits]`.
    pub limits: LimitsConfig,
    /// `[peers]`.
    pub peers: PeersConfig,
    /// `server.software`: the SOFTWARE attribute (RFC 8489 §14.14) of every response.
    pub software: Option<String>,
    /// `ops.alternate_servers`: ALTERNATE-SERVER candidates for 300 while draining.
    pub alternate_servers: Vec<SocketAddr>,
}

/// A configuration value the engine cannot use, naming the TOML field.
///
/// One variant, exhaustive: `uturn-control` folds it into its own `ConfigError::Invalid`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A field has a value the server cannot use.
    #[error("invalid config field `{field}`: {reason}")]
    Invalid {
        /// The dotted field name, e.g. `relay.port_min`.
        field: &'static str,
        /// Why the value is refused.
        reason: String,
    },
}

impl EngineConfig {
    /// Checks the values that types alone cannot: ranges, exclusive options, address mapping.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, reason: String| ConfigError::Invalid { field, reason };
        if self.auth.realm.is_empty() || self.auth.realm.len() > 763 {
            // RFC 8489 §14.9: REALM MUST be fewer than 128 characters (763 bytes).
            return Err(invalid("auth.realm", "must be 1 to 763 bytes long".into()));
        }
        if !matches!(self.auth.integrity_failure_code, 401 | 431) {
            return Err(invalid(
                "auth.integrity_failure_code",
                format!(
                    "must be 401 or 431, not {}",
                    self.auth.integrity_failure_code
                ),
            ));
        }
        if self.auth.nonce_lifetime_secs == 0 {
            return Err(invalid(
                "auth.nonce_lifetime_secs",
                "must be at least 1".into(),
            ));
        }
        for user in &self.auth.users {
            match (&user.password, &user.key) {
                (Some(_), None) => {}
                (None, Some(key)) => {
                    if crate::auth::credentials::parse_hex_key(key).is_none() {
                        return Err(invalid(
                            "auth.users.key",
                            format!("user {:?}: key must be 32 hex digits", user.username),
                        ));
                    }
                }
                _ => {
                    return Err(invalid(
                        "auth.users",
                        format!(
                            "user {:?}: give exactly one of password or key",
                            user.username
                        ),
                    ));
                }
            }
        }
        if self.auth.secrets.iter().any(String::is_empty) {
            return Err(invalid(
                "auth.secrets",
                "a shared secret cannot be empty".into(),
            ));
        }
        let relay = &self.relay;
        if relay.port_min == 0 || relay.port_min > relay.port_max {
            return Err(invalid(
                "relay.port_min",
                format!(
                    "port range {}-{} is empty or starts at 0",
                    relay.port_min, relay.port_max
                ),
            ));
        }
        let v4 = relay.relay_ips.iter().filter(|ip| ip.is_ipv4()).count();
        let v6 = relay.relay_ips.len() - v4;
        if v4 > 1 || v6 > 1 {
            return Err(invalid(
                "relay.relay_ips",
                "at most one IPv4 and one IPv6 relay address".into(),
            ));
        }
        if relay.relay_ips.iter().any(IpAddr::is_unspecified) {
            return Err(invalid(
                "relay.relay_ips",
                "a relay IP must be a concrete address (it is advertised to clients)".into(),
            ));
        }
        self.external_mappings()?;
        if self.limits.rate_limit_slots == 0 || self.limits.rate_limit_slots > 1 << 24 {
            return Err(invalid(
                "limits.rate_limit_slots",
                "must be 1 to 16777216".into(),
            ));
        }
        if relay.allocation_lifetime_default_secs == 0
            || relay.allocation_lifetime_default_secs > relay.allocation_lifetime_max_secs
        {
            return Err(invalid(
                "relay.allocation_lifetime_default_secs",
                "must be at least 1 and at most allocation_lifetime_max_secs".into(),
            ));
        }
        for (field, value) in [
            (
                "relay.permission_lifetime_secs",
                relay.permission_lifetime_secs,
            ),
            ("relay.channel_lifetime_secs", relay.channel_lifetime_secs),
            (
                "relay.reservation_lifetime_secs",
                relay.reservation_lifetime_secs,
            ),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1".into()));
            }
        }
        Ok(())
    }

    /// The external mapping as (private relay IP, public IP) pairs, validated.
    pub fn external_mappings(&self) -> Result<Vec<(IpAddr, IpAddr)>, ConfigError> {
        let mut pairs = Vec::new();
        for entry in &self.relay.external_ips {
            let invalid = |reason: String| ConfigError::Invalid {
                field: "relay.external_ips",
                reason: format!("{entry:?}: {reason}"),
            };
            let (public, private) = match entry.split_once('/') {
                Some((public, private)) => {
                    let public: IpAddr = public
                        .trim()
                        .parse()
                        .map_err(|_| invalid("PUBLIC is not an IP address".into()))?;
                    let private: IpAddr = private
                        .trim()
                        .parse()
                        .map_err(|_| invalid("PRIVATE is not an IP address".into()))?;
                    (public, private)
                }
                None => {
                    let public: IpAddr = entry
                        .trim()
                        .parse()
                        .map_err(|_| invalid("not an IP address".into()))?;
                    let same_family: Vec<&IpAddr> = self
                        .relay
                        .relay_ips
                        .iter()
                        .filter(|ip| ip.is_ipv4() == public.is_ipv4())
                        .collect();
                    match same_family.as_slice() {
                        [only] => (public, **only),
                        _ => {
                            return Err(invalid(
                                "a bare PUBLIC needs exactly one relay IP of its family".into(),
                            ));
                        }
                    }
                }
            };
            if public.is_ipv4() != private.is_ipv4() {
                return Err(invalid(
                    "PUBLIC and PRIVATE must be of the same family".into(),
                ));
            }
            if !self.relay.relay_ips.contains(&private) {
                return Err(invalid(format!("{private} is not one of relay.relay_ips")));
            }
            if pairs.iter().any(|(p, _)| *p == private) {
                return Err(invalid(format!("{private} is mapped twice")));
            }
            pairs.push((private, public));
        }
        Ok(pairs)
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            realm: "uturn".to_owned(),
            users: Vec::new(),
            users_file: None,
            secrets: Vec::new(),
            rest_separator: ':',
            nonce_lifetime_secs: 600,
            integrity_failure_code: 401,
            binding_requires_auth: false,
            rest_key_cache_entries: 10_000,
            rest_expiry_max_secs: REST_EXPIRY_MAX_DEFAULT_SECS,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            allocations_per_user: 0,
            allocations_total: 0,
            permissions_per_allocation: 128,
            channels_per_allocation: 128,
            unauthenticated_per_source_per_sec: 50,
            unauthenticated_burst: 100,
            auth_failures_per_source_per_sec: 1,
            auth_failures_per_source_burst: 20,
            auth_failures_per_user_per_sec: 5,
            auth_failures_per_user_burst: 50,
            allocation_bytes_per_sec: 0,
            rate_limit_slots: 16384,
        }
    }
}
