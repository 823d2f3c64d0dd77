//! The typed configuration of uturn: one [`Config`] read from TOML.
//!
//! Every field has a default that matches the RFC values (RFC 8656 §3.2, §7.2, §9, §12) or a
//! conservative operating choice; `uturn.example.toml` at the repository root shows all of them.
//! Unknown keys are refused (`deny_unknown_fields`) so a typo cannot silently fall back to a
//! default. Durations are integer seconds in fields named `*_secs`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

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

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`: listeners, threads, I/O backend.
    pub server: ServerConfig,
    /// `[auth]`: realm, credentials, nonces.
    pub auth: AuthConfig,
    /// `[relay]`: relay addresses, port range, lifetimes.
    pub relay: RelayConfig,
    /// `[limits]`: quotas.
    pub limits: LimitsConfig,
    /// `[peers]`: peer address policy.
    pub peers: PeersConfig,
    /// `[ops]`: HTTP listener, token, logs, drain alternates.
    pub ops: crate::ops::OpsConfig,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Listeners: `"ADDR:PORT"` (UDP and TCP), `"udp://…"`, `"tcp://…"`, `"tls://…"`,
    /// `"auto://…"` (TCP port taking plain TURN and TLS). Default `["0.0.0.0:3478"]` (RFC 8489
    /// §18.6 default STUN port, UDP and TCP).
    pub listen: Vec<crate::listen::ListenAddr>,
    /// PEM certificate chain for `tls://` and `auto://` listeners; reloaded on SIGHUP.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// TCP/TLS connections open at once per shard; more are accepted and closed. Default 4096.
    pub stream_connections_max: u32,
    /// TCP/TLS connections open at once from one source IP, across all shards; more are
    /// accepted and closed (`source_connections`). `0` means no limit. Default 256.
    pub stream_connections_per_source_max: u32,
    /// Seconds a TCP/TLS connection may stay without an allocation before it is closed
    /// (checked once a second). Default 30.
    pub stream_idle_timeout_secs: u32,
    /// Data-plane shard threads; `0` (default) means one per available core. The shards share
    /// the relay port range (see [`RelayConfig::port_min`]).
    pub threads: u16,
    /// I/O backend: `"auto"` (default: io_uring when the kernel allows it, else mmsg), `"uring"`
    /// or `"mmsg"`.
    pub io: IoBackend,
    /// `SO_RCVBUF`/`SO_SNDBUF` for each socket, in bytes; `0` keeps the system default.
    /// Default 4 MiB.
    pub socket_buffer_bytes: u32,
    /// SOFTWARE attribute (RFC 8489 §14.14) added to every response; default none, which also
    /// avoids advertising the server version.
    pub software: Option<String>,
    /// One public port for TURN and the web service: `auto://` listeners pass every TLS
    /// connection whose ClientHello is not TURN's (ALPN `stun.turn`, no ALPN at all, or an SNI
    /// in `turn_server_names` are TURN's) through, unchanged, to this address. Default none.
    pub forward_other_to: Option<SocketAddr>,
    /// Start each passed-through connection with a PROXY protocol v2 header carrying the
    /// client's address (the web service must expect it). Default false.
    pub forward_proxy_protocol: bool,
    /// TLS server names (SNI) that are TURN's on a forwarding `auto://` listener whatever ALPN
    /// the client offers. Default none.
    pub turn_server_names: Vec<String>,
    /// Peers (CIDRs) in front of uturn that must start every TCP/TLS connection with a PROXY
    /// protocol v1/v2 header; the client address it carries is used everywhere. A PROXY header
    /// from any other peer closes the connection. Default none.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
}

/// The data-plane I/O backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoBackend {
    /// io_uring when available, else recvmmsg/sendmmsg.
    #[default]
    Auto,
    /// io_uring only; startup fails when the kernel refuses it.
    Uring,
    /// recvmmsg/sendmmsg.
    Mmsg,
}

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

/// `[relay]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Relay IPs the relay sockets bind to, at most one IPv4 and one IPv6, each a concrete
    /// address (it is advertised unless mapped). Default `[]`: the `uturn` binary then picks
    /// them at start-up (`shell::default_relay_ips`): a listener's IP when it is specific, else,
    /// for a wildcard listener, the host's first global IPv4 or IPv6 interface address; it
    /// refuses to start when it finds none. (An [`crate::Engine`] given no relay IP of a family
    /// answers Allocates for that family 440, Address Family not Supported.)
    pub relay_ips: Vec<IpAddr>,
    /// External address mapping for static NAT and dual-NIC hosts: `"PUBLIC/PRIVATE"` maps the
    /// relay IP PRIVATE to PUBLIC in XOR-RELAYED-ADDRESS; a bare `"PUBLIC"` applies to the only
    /// relay IP of its family. Default none.
    pub external_ips: Vec<String>,
    /// Lowest relay port. Default 49152 (RFC 8656 §7.2). Cisco Expressway uses 24000-29999.
    pub port_min: u16,
    /// Highest relay port. Default 65535.
    pub port_max: u16,
    /// Allocation lifetime when the client asks for less, seconds. Default 600 (RFC 8656 §3.2).
    pub allocation_lifetime_default_secs: u32,
    /// Largest allocation lifetime granted, seconds. Default 3600 (RFC 8656 §7.2).
    pub allocation_lifetime_max_secs: u32,
    /// Permission lifetime, seconds. Default 300 (RFC 8656 §9).
    pub permission_lifetime_secs: u32,
    /// Channel binding lifetime, seconds. Default 600 (RFC 8656 §12).
    pub channel_lifetime_secs: u32,
    /// How long a port reserved by EVEN-PORT R=1 is held, seconds. Default 30 (RFC 8656 §7.2).
    pub reservation_lifetime_secs: u32,
    /// Also bind channel numbers 0x5000-0x7FFF, which RFC 5766 allowed and RFC 8656 §12 no
    /// longer does. Default false (RFC 8656: answered 400). Turn it on for clients written for
    /// RFC 5766 that pick channels up there, such as coturn's `turnutils_uclient`.
    pub accept_rfc5766_channel_numbers: bool,
    /// The XDP fast path for UDP ChannelData (README "XDP fast path"): `"off"` (default),
    /// `"auto"` (native XDP where it attaches, else none, with one log line saying why),
    /// `"native"` or `"generic"` (fail to start when it cannot attach).
    pub xdp: XdpMode,
    /// Interfaces to attach the XDP program to. Default `[]`: those holding the UDP
    /// listeners' addresses.
    pub xdp_interfaces: Vec<String>,
}

/// `relay.xdp`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// No XDP program (the default: it needs CAP_BPF and forwarding on the interface).
    #[default]
    Off,
    /// Native XDP where the driver and the capabilities allow it, else none.
    Auto,
    /// Native XDP or refuse to start.
    Native,
    /// Generic (skb) XDP or refuse to start.
    Generic,
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
    /// unspecified, link-local, multicast, broadcast or 240/4 (see `uturn_control::policy`).
    /// Default none; reloadable.
    pub allowed_peers: Vec<crate::policy::Cidr>,
    /// More networks refused to peers (CIDR or bare addresses), answered 403. Default none;
    /// reloadable.
    pub denied_peers: Vec<crate::policy::Cidr>,
}

/// A configuration that cannot be used, naming the field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The users file (`auth.users_file`) could not be read.
    #[error("cannot read users file (auth.users_file) {path}: {source}")]
    UsersFile {
        /// The path configured.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML did not parse or did not match the schema.
    #[error("invalid config: {0}")]
    Toml(#[from] toml::de::Error),
    /// A field has a value the server cannot use.
    #[error("invalid config field `{field}`: {reason}")]
    Invalid {
        /// The dotted field name, e.g. `relay.port_min`.
        field: &'static str,
        /// Why the value is refused.
        reason: String,
    },
}

impl Config {
    /// Parses and validates a TOML document.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text)
    }

    /// Checks the values that types alone cannot: ranges, exclusive options, address mapping.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, reason: String| ConfigError::Invalid { field, reason };
        self.ops.validate()?;
        check_log_filter(&self.ops.log_level).map_err(|reason| invalid("ops.log_level", reason))?;
        if self.server.listen.is_empty() {
            return Err(invalid(
                "server.listen",
                "at least one address is needed".into(),
            ));
        }
        if self.server.listen.iter().any(|l| l.needs_tls())
            && (self.server.tls_cert.is_none() || self.server.tls_key.is_none())
        {
            return Err(invalid(
                "server.tls_cert",
                "tls:// and auto:// listeners need tls_cert and tls_key (--tls-cert, --tls-key)"
                    .into(),
            ));
        }
        if self.server.forward_other_to.is_some()
            && !self.server.listen.iter().any(|l| {
                matches!(
                    l,
                    crate::listen::ListenAddr::Stream(uturn_dataplane::StreamKind::Auto, _)
                )
            })
        {
            return Err(invalid(
                "server.forward_other_to",
                "only auto:// listeners pass connections through; add one (e.g. \
                 auto://0.0.0.0:443) or remove forward_other_to"
                    .into(),
            ));
        }
        if self.server.forward_proxy_protocol && self.server.forward_other_to.is_none() {
            return Err(invalid(
                "server.forward_proxy_protocol",
                "needs forward_other_to (the web service that reads the header)".into(),
            ));
        }
        if self.server.stream_connections_max == 0 || self.server.stream_idle_timeout_secs == 0 {
            return Err(invalid(
                "server.stream_connections_max",
                "stream_connections_max and stream_idle_timeout_secs must be positive".into(),
            ));
        }
        if self.server.tls_cert.is_some() != self.server.tls_key.is_some() {
            return Err(invalid(
                "server.tls_key",
                "tls_cert and tls_key go together".into(),
            ));
        }
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
        // IFNAMSIZ: interface names are at most 15 bytes.
        if let Some(bad) = relay
            .xdp_interfaces
            .iter()
            .find(|n| n.is_empty() || n.len() > 15)
        {
            return Err(invalid(
                "relay.xdp_interfaces",
                format!("{bad:?} is not an interface name (1 to 15 bytes)"),
            ));
        }
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

/// Refuses a log filter that would silently log something else than the operator meant.
/// `tracing`'s EnvFilter takes a bare word as a target name and then logs nothing but that
/// target, so a typo (`"infoo"`, `"verbose"`) would switch every other log line off; and it
/// drops a directive it cannot parse with only a warning. Here each comma-separated directive
/// must be a level or `TARGET=LEVEL` (or a span filter), and the whole must parse.
fn check_log_filter(filter: &str) -> Result<(), String> {
    use tracing::level_filters::LevelFilter;
    if filter.trim().is_empty() {
        return Err("is empty; give a level such as \"info\"".into());
    }
    for directive in filter.split(',').map(str::trim) {
        if directive.is_empty() {
            return Err(format!("{filter:?} has an empty directive"));
        }
        if !directive.contains('=')
            && !directive.contains('[')
            && directive.parse::<LevelFilter>().is_err()
        {
            return Err(format!(
                "{directive:?} is neither a level (trace, debug, info, warn, error, off) nor \
                 TARGET=LEVEL"
            ));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map(drop)
        .map_err(|e| format!("{filter:?}: {e}"))
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: vec![crate::listen::ListenAddr::UdpAndTcp(SocketAddr::from((
                [0, 0, 0, 0],
                3478,
            )))],
            tls_cert: None,
            tls_key: None,
            stream_connections_max: 4096,
            stream_connections_per_source_max: 256,
            stream_idle_timeout_secs: 30,
            threads: 0,
            io: IoBackend::Auto,
            socket_buffer_bytes: 4 * 1024 * 1024,
            software: None,
            forward_other_to: None,
            forward_proxy_protocol: false,
            turn_server_names: Vec::new(),
            proxy_protocol_from: Vec::new(),
        }
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

impl Default for RelayConfig {
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
            xdp: XdpMode::Off,
            xdp_interfaces: Vec::new(),
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
