//! The typed configuration of uturn: one [`Config`] read from TOML. The `[auth]`, `[limits]`
//! and `[peers]` sections are the engine's own types (`uturn_engine::config`), re-exported
//! here; [`Config::engine_config`] builds the engine's [`EngineConfig`] from the file.
//!
//! Every field has a default that matches the RFC values (RFC 8656 §3.2, §7.2, §9, §12) or a
//! conservative operating choice; `uturn.example.toml` at the repository root shows all of them.
//! Unknown keys are refused (`deny_unknown_fields`) so a typo cannot silently fall back to a
//! default. Durations are integer seconds in fields named `*_secs`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use uturn_engine::UserTable;
pub use uturn_engine::config::{
    ALLOCATION_LIFETIME_DEFAULT_SECS, ALLOCATION_LIFETIME_MAX_SECS, AuthConfig,
    CHANNEL_LIFETIME_SECS, EngineConfig, LimitsConfig, PERMISSION_LIFETIME_SECS, PORT_MAX_DEFAULT,
    PORT_MIN_DEFAULT, PeersConfig, RESERVATION_LIFETIME_SECS, REST_EXPIRY_MAX_DEFAULT_SECS,
    RelaySettings, UserConfig,
};
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
        self.engine_config().validate()?;
        Ok(())
    }

    /// The external mapping as (private relay IP, public IP) pairs, validated.
    pub fn external_mappings(&self) -> Result<Vec<(IpAddr, IpAddr)>, ConfigError> {
        Ok(self.engine_config().external_mappings()?)
    }

    /// What the engine is built from: `[auth]`, the engine's part of `[relay]`, `[limits]`,
    /// `[peers]`, `server.software` and `ops.alternate_servers`.
    pub fn engine_config(&self) -> EngineConfig {
        let relay = &self.relay;
        EngineConfig {
            auth: self.auth.clone(),
            relay: RelaySettings {
                relay_ips: relay.relay_ips.clone(),
                external_ips: relay.external_ips.clone(),
                port_min: relay.port_min,
                port_max: relay.port_max,
                allocation_lifetime_default_secs: relay.allocation_lifetime_default_secs,
                allocation_lifetime_max_secs: relay.allocation_lifetime_max_secs,
                permission_lifetime_secs: relay.permission_lifetime_secs,
                channel_lifetime_secs: relay.channel_lifetime_secs,
                reservation_lifetime_secs: relay.reservation_lifetime_secs,
                accept_rfc5766_channel_numbers: relay.accept_rfc5766_channel_numbers,
            },
            limits: self.limits.clone(),
            peers: self.peers.clone(),
            software: self.server.software.clone(),
            alternate_servers: self.ops.alternate_servers.clone(),
        }
    }
}

impl From<uturn_engine::config::ConfigError> for ConfigError {
    fn from(error: uturn_engine::config::ConfigError) -> Self {
        match error {
            uturn_engine::config::ConfigError::Invalid { field, reason } => {
                Self::Invalid { field, reason }
            }
        }
    }
}

/// The static user table: the inline `[[auth.users]]` plus the users file, if configured
/// (this reads the file; the engine reads none).
pub fn user_table(auth: &AuthConfig) -> Result<UserTable, ConfigError> {
    let mut users = auth.users.clone();
    if let Some(path) = &auth.users_file {
        users.extend(read_users_file(path)?);
    }
    Ok(UserTable::from_users(&auth.realm, &users)?)
}

/// Reads a users file (format in `uturn_engine::auth::credentials`).
pub fn read_users_file(path: &Path) -> Result<Vec<UserConfig>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::UsersFile {
        path: path.to_path_buf(),
        source,
    })?;
    uturn_engine::parse_users_file(&text).map_err(|error| ConfigError::Invalid {
        field: "auth.users_file",
        reason: format!("{}: {error}", path.display()),
    })
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
