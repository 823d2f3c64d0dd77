//! Command-line flags, and how they override the configuration file.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use uturn_control::Config;
use uturn_control::config::{IoBackend, UserConfig};
use uturn_control::listen::ListenAddr;
use uturn_control::ops::LogFormat;

/// uturn: a TURN/STUN relay server (RFC 8489, RFC 8656).
///
/// With no flags and no config file it serves UDP 0.0.0.0:3478 with a `demo` user whose
/// password is printed at start-up. Flags override the config file.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "uturn",
    version,
    about,
    long_about = None,
    after_help = "Exit status: 0 after SIGINT or SIGTERM; 2 for any configuration error (a bad \
                  flag, a config file that cannot be read or has an invalid field, a users file \
                  or TLS certificate/key that cannot be read), with one line on standard error \
                  naming the field or file; 1 when a valid configuration fails at run time (e.g. \
                  a listener address already in use)."
)]
pub(crate) struct Cli {
    /// TOML configuration file (see uturn.example.toml for every setting and its default).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,

    /// Listener, repeatable (replaces `server.listen`): ADDR:PORT (UDP and TCP), or
    /// udp://, tcp://, tls://, auto:// (TCP taking plain TURN and TLS) before ADDR:PORT, e.g.
    /// 0.0.0.0:3478, auto://0.0.0.0:443, tls://[::]:5349. Port 0 takes a port from the OS.
    #[arg(long, value_name = "[SCHEME://]ADDR:PORT")]
    pub(crate) listen: Vec<ListenAddr>,

    /// Pass TLS connections of auto:// listeners that are not TURN's (a browser loading the web
    /// app) through to this address (`server.forward_other_to`): one public 443 for both.
    #[arg(long = "forward-other-to", value_name = "ADDR:PORT")]
    pub(crate) forward_other_to: Option<SocketAddr>,

    /// Start every passed-through connection with a PROXY v2 header (`server.forward_proxy_protocol`).
    #[arg(long = "forward-proxy-protocol")]
    pub(crate) forward_proxy_protocol: bool,

    /// Peers that must send a PROXY v1/v2 header first, CIDR, repeatable (replaces
    /// `server.proxy_protocol_from`): a load balancer in front of uturn.
    #[arg(long = "proxy-protocol-from", value_name = "CIDR")]
    pub(crate) proxy_protocol_from: Vec<ipnet::IpNet>,

    /// PEM certificate chain for tls:// and auto:// listeners (reloaded on SIGHUP).
    #[arg(long = "tls-cert", value_name = "FILE")]
    pub(crate) tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long = "tls-key", value_name = "FILE")]
    pub(crate) tls_key: Option<PathBuf>,

    /// IP address that relay sockets bind to, repeatable, IPv4 and/or IPv6 (replaces
    /// `relay.relay_ips`).
    #[arg(long = "relay-ip", value_name = "IP")]
    pub(crate) relay_ip: Vec<IpAddr>,

    /// Advertise PUBLIC instead of the relay IP PRIVATE (static NAT, dual NIC), repeatable;
    /// a bare PUBLIC maps the only relay IP of its family.
    #[arg(long = "external-ip", value_name = "PUBLIC[/PRIVATE]")]
    pub(crate) external_ip: Vec<String>,

    /// Relay port range, e.g. 49152-65535 (RFC 8656) or 24000-29999 (Cisco Expressway).
    #[arg(long, value_name = "LOW-HIGH", value_parser = parse_port_range)]
    pub(crate) ports: Option<(u16, u16)>,

    /// Authentication realm (`auth.realm`).
    #[arg(long)]
    pub(crate) realm: Option<String>,

    /// A long-term credential user, repeatable.
    #[arg(long, value_name = "NAME:PASSWORD", value_parser = parse_user)]
    pub(crate) user: Vec<(String, String)>,

    /// TURN REST shared secret, repeatable (several are accepted at once, for rotation).
    #[arg(long = "auth-secret", value_name = "SECRET")]
    pub(crate) auth_secret: Vec<String>,

    /// Let clients relay to loopback peers (labs and tests only; off by default).
    #[arg(long = "allow-loopback-peers")]
    pub(crate) allow_loopback_peers: bool,

    /// Also bind channel numbers 0x5000-0x7FFF, which RFC 5766 allowed and RFC 8656 §12 no
    /// longer does (`relay.accept_rfc5766_channel_numbers`), for clients written for RFC 5766
    /// such as Debian's coturn 4.6.1 `turnutils_uclient`.
    #[arg(long = "accept-rfc5766-channels")]
    pub(crate) accept_rfc5766_channels: bool,

    /// Answers to unauthenticated requests per source address per second (`limits.
    /// unauthenticated_per_source_per_sec`; 0 turns the limit off). The burst is twice this.
    #[arg(long = "unauthenticated-rate", value_name = "PER_SEC")]
    pub(crate) unauthenticated_rate: Option<u32>,

    /// Data-plane shards (threads); 0 means one per core this process may use.
    #[arg(long, value_name = "N")]
    pub(crate) threads: Option<u16>,

    /// Data-plane I/O backend.
    #[arg(long, value_enum, value_name = "BACKEND")]
    pub(crate) io: Option<IoFlag>,

    /// HTTP listener for /metrics, /healthz, /readyz and the admin API /api/v1 (`ops.http_listen`,
    /// default 127.0.0.1:9641). A non-loopback address needs --http-token.
    #[arg(long, value_name = "ADDR:PORT")]
    pub(crate) http: Option<SocketAddr>,

    /// Bearer token the HTTP API requires (`ops.http_token`); /healthz and /readyz stay open.
    #[arg(long = "http-token", value_name = "TOKEN")]
    pub(crate) http_token: Option<String>,

    /// Log format on standard error (`ops.log_format`).
    #[arg(long = "log-format", value_enum, value_name = "FORMAT")]
    pub(crate) log_format: Option<LogFormatFlag>,

    /// Where draining sends new clients (300 Try Alternate), repeatable (`ops.alternate_servers`).
    #[arg(long = "alternate-server", value_name = "ADDR:PORT")]
    pub(crate) alternate_server: Vec<SocketAddr>,

    /// How often shards publish their counters, milliseconds (`ops.counters_interval_ms`).
    #[arg(long = "counters-interval-ms", value_name = "MS")]
    pub(crate) counters_interval_ms: Option<u32>,

    /// Turn Prometheus metrics and the shards' counter reports off, to measure what they cost
    /// (`ops.metrics = false`).
    #[arg(long = "no-metrics")]
    pub(crate) no_metrics: bool,
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormatFlag {
    /// One human-readable line per event.
    Human,
    /// One JSON object per line.
    Json,
}

/// `--io` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum IoFlag {
    /// io_uring when the kernel allows it, else recvmmsg/sendmmsg.
    Auto,
    /// io_uring only; fail if unavailable.
    Uring,
    /// recvmmsg/sendmmsg batching.
    Mmsg,
}

impl Cli {
    /// The configuration: the file (or the defaults), then every flag given on top.
    pub(crate) fn apply(&self, mut config: Config) -> Config {
        if !self.listen.is_empty() {
            config.server.listen.clone_from(&self.listen);
        }
        if let Some(to) = self.forward_other_to {
            config.server.forward_other_to = Some(to);
        }
        if self.forward_proxy_protocol {
            config.server.forward_proxy_protocol = true;
        }
        if !self.proxy_protocol_from.is_empty() {
            config
                .server
                .proxy_protocol_from
                .clone_from(&self.proxy_protocol_from);
        }
        if let Some(cert) = &self.tls_cert {
            config.server.tls_cert = Some(cert.clone());
        }
        if let Some(key) = &self.tls_key {
            config.server.tls_key = Some(key.clone());
        }
        if !self.relay_ip.is_empty() {
            config.relay.relay_ips.clone_from(&self.relay_ip);
        }
        config
            .relay
            .external_ips
            .extend(self.external_ip.iter().cloned());
        if let Some((low, high)) = self.ports {
            config.relay.port_min = low;
            config.relay.port_max = high;
        }
        if let Some(realm) = &self.realm {
            config.auth.realm.clone_from(realm);
        }
        config
            .auth
            .users
            .extend(self.user.iter().map(|(name, password)| UserConfig {
                username: name.clone(),
                password: Some(password.clone()),
                key: None,
            }));
        config.auth.secrets.extend(self.auth_secret.iter().cloned());
        if self.allow_loopback_peers {
            config.peers.allow_loopback = true;
        }
        if self.accept_rfc5766_channels {
            config.relay.accept_rfc5766_channel_numbers = true;
        }
        if let Some(rate) = self.unauthenticated_rate {
            config.limits.unauthenticated_per_source_per_sec = rate;
            config.limits.unauthenticated_burst = rate.saturating_mul(2);
        }
        if let Some(threads) = self.threads {
            config.server.threads = threads;
        }
        if let Some(http) = self.http {
            config.ops.http_listen = http;
        }
        if let Some(token) = &self.http_token {
            config.ops.http_token = Some(token.clone());
        }
        if let Some(format) = self.log_format {
            config.ops.log_format = match format {
                LogFormatFlag::Human => LogFormat::Human,
                LogFormatFlag::Json => LogFormat::Json,
            };
        }
        config
            .ops
            .alternate_servers
            .extend(self.alternate_server.iter().copied());
        if let Some(ms) = self.counters_interval_ms {
            config.ops.counters_interval_ms = ms;
        }
        if self.no_metrics {
            config.ops.metrics = false;
        }
        if let Some(io) = self.io {
            config.server.io = match io {
                IoFlag::Auto => IoBackend::Auto,
                IoFlag::Uring => IoBackend::Uring,
                IoFlag::Mmsg => IoBackend::Mmsg,
            };
        }
        config
    }
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (low, high) = s
        .split_once('-')
        .ok_or_else(|| format!("expected LOW-HIGH, got {s:?}"))?;
    let low: u16 = low
        .trim()
        .parse()
        .map_err(|_| format!("{low:?} is not a port number"))?;
    let high: u16 = high
        .trim()
        .parse()
        .map_err(|_| format!("{high:?} is not a port number"))?;
    if low == 0 || low > high {
        return Err(format!("need 1 <= LOW <= HIGH, got {low}-{high}"));
    }
    Ok((low, high))
}

fn parse_user(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((name, password)) if !name.is_empty() && !password.is_empty() => {
            Ok((name.to_owned(), password.to_owned()))
        }
        _ => Err(format!("expected NAME:PASSWORD, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_edge_flags_set_the_shared_port_and_the_trusted_balancers() {
        let cli = Cli::parse_from([
            "uturn",
            "--forward-other-to",
            "127.0.0.1:8443",
            "--forward-proxy-protocol",
            "--proxy-protocol-from",
            "10.0.0.0/8",
            "--proxy-protocol-from",
            "192.0.2.10/32",
        ]);
        let config = cli.apply(Config::default());
        assert_eq!(
            config.server.forward_other_to,
            Some("127.0.0.1:8443".parse().expect("literal"))
        );
        assert!(config.server.forward_proxy_protocol);
        assert_eq!(config.server.proxy_protocol_from.len(), 2);
        assert!(Cli::try_parse_from(["uturn", "--proxy-protocol-from", "10.0.0.0"]).is_err());
    }

    #[test]
    fn flags_override_the_file_and_add_to_its_lists() {
        let cli = Cli::parse_from([
            "uturn",
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "[::1]:0",
            "--listen",
            "auto://127.0.0.1:0",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--ports",
            "24000-29999",
            "--user",
            "alice:pw:with:colons",
            "--auth-secret",
            "s1",
            "--io",
            "mmsg",
            "--threads",
            "3",
            "--allow-loopback-peers",
            "--accept-rfc5766-channels",
        ]);
        let config = cli.apply(Config::default());
        assert_eq!(config.server.listen.len(), 3);
        assert!(config.server.listen[2].needs_tls());
        assert!(config.server.tls_cert.is_some() && config.server.tls_key.is_some());
        assert_eq!(
            (config.relay.port_min, config.relay.port_max),
            (24000, 29999)
        );
        assert_eq!(config.auth.users[0].username, "alice");
        assert_eq!(
            config.auth.users[0].password.as_deref(),
            Some("pw:with:colons")
        );
        assert_eq!(config.auth.secrets, vec!["s1".to_owned()]);
        assert_eq!(config.server.io, IoBackend::Mmsg);
        assert_eq!(config.server.threads, 3);
        assert!(config.peers.allow_loopback);
        assert!(config.relay.accept_rfc5766_channel_numbers);
    }

    #[test]
    fn malformed_flags_are_refused_with_the_expected_form() {
        assert!(parse_port_range("30000").unwrap_err().contains("LOW-HIGH"));
        assert!(parse_port_range("500-100").is_err());
        assert!(parse_port_range("0-100").is_err());
        assert!(
            parse_user("nopassword")
                .unwrap_err()
                .contains("NAME:PASSWORD")
        );
        assert!(Cli::try_parse_from(["uturn", "--io", "epoll"]).is_err());
        assert!(Cli::try_parse_from(["uturn", "--listen", "localhost"]).is_err());
    }
}
