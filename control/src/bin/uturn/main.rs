//! The `uturn` binary: flags and config file in, a running TURN server out.
//!
//! Start-up order: parse flags, load and validate the config and read the files it names
//! (users file, TLS certificate and key; a bad flag, field or file is one line on standard
//! error and exit code 2, `EXIT_CONFIG`), start the data plane (listeners bound, shards
//! running), start the HTTP listener (metrics, health, admin API), print the listeners and
//! `uturn is ready`, then run the control thread until SIGINT or SIGTERM. SIGHUP reloads users,
//! REST secrets, peer policy, log level and the TLS certificate; SIGUSR1 starts draining.
#![forbid(unsafe_code)]

mod cli;
mod host;
mod tls_certificates;

use std::io::IsTerminal as _;
use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use crossbeam_channel::bounded;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use tracing::{info, warn};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, reload};
use uturn_control::config::{IoBackend, UserConfig};
use uturn_control::http::{HttpLimits, HttpServer, Readiness};
use uturn_control::listen;
use uturn_control::ops::LogFormat;
use uturn_control::shell::{
    ControlThread, LogLevelSetter, OpsHooks, Signal, data_path_guard, default_relay_ips,
};
use uturn_control::{Config, PeerPolicy, UserTable};
use uturn_dataplane::{
    BackendChoice, DataPlane, DataPlaneConfig, StreamEdge, StreamLimits, TlsConfig,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for every configuration error: a bad flag (clap uses 2 for usage errors too), a
/// config file that cannot be read or has a bad field, a users file or TLS certificate that
/// cannot be read. Failures of a valid configuration at run time (a listener address in use)
/// exit with 1. `uturn --help` says so.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    // Built with panic = "unwind" so that a panic in one stream connection's work is caught
    // and costs that connection; every other panic, on any thread, still ends the process.
    uturn_dataplane::abort_on_uncontained_panics();
    // First, before the shards and tables are allocated: see `disable_transparent_huge_pages`.
    let thp = disable_transparent_huge_pages();
    let cli = cli::Cli::parse();
    let loaded = load_config(&cli, None).and_then(|(config, demo_password)| {
        let files = load_files(&config)?;
        Ok((config, demo_password, files))
    });
    let (config, demo_password, files) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("uturn: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let log_level = init_logging(&config);
    if let Err(e) = thp {
        warn!(error = %e, "could not turn transparent huge pages off; resident memory may stay above what is in use");
    }
    match run(cli, config, files, demo_password, log_level) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uturn: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to standard error in the configured format; `RUST_LOG` wins over `ops.log_level` at
/// start-up. Returns the setter that a reload uses to change the filter.
fn init_logging(config: &Config) -> LogLevelSetter {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.ops.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match config.ops.log_format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Human => fmt.with_ansi(std::io::stderr().is_terminal()).boxed(),
    };
    tracing_subscriber::registry().with(filter).with(fmt).init();
    Box::new(move |level: &str| {
        let filter = EnvFilter::try_new(level).map_err(|e| format!("ops.log_level: {e}"))?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

/// The config file (or defaults) with the flags on top, completed and validated. Returns the
/// generated demo password when no credentials were configured at all (`demo` reuses one
/// generated before, so a reload keeps the demo user's password).
fn load_config(cli: &cli::Cli, demo: Option<&str>) -> anyhow::Result<(Config, Option<String>)> {
    let file = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let mut config = cli.apply(file);
    if config.relay.relay_ips.is_empty() {
        let interfaces: Vec<IpAddr> = if_addrs::get_if_addrs()
            .context("list network interfaces to choose a relay IP")?
            .into_iter()
            .map(|i| i.ip())
            .collect();
        let listen: Vec<std::net::SocketAddr> =
            config.server.listen.iter().map(|l| l.addr()).collect();
        config.relay.relay_ips = default_relay_ips(&listen, &interfaces);
        anyhow::ensure!(
            !config.relay.relay_ips.is_empty(),
            "relay.relay_ips: none configured and no usable interface address found; \
             give --relay-ip"
        );
    }
    let mut demo_password = None;
    if config.auth.users.is_empty()
        && config.auth.users_file.is_none()
        && config.auth.secrets.is_empty()
    {
        let password: String = demo.map_or_else(
            || {
                rand::rng()
                    .sample_iter(rand::distr::Alphanumeric)
                    .take(20)
                    .map(char::from)
                    .collect()
            },
            str::to_owned,
        );
        config.auth.users.push(UserConfig {
            username: "demo".to_owned(),
            password: Some(password.clone()),
            key: None,
        });
        demo_password = Some(password);
    }
    config.validate()?;
    Ok((config, demo_password))
}

/// What the configuration names besides itself, read before anything starts, so that a
/// missing or broken file is a configuration error like a bad field.
struct Files {
    users: UserTable,
    tls: Option<TlsConfig>,
}

fn load_files(config: &Config) -> anyhow::Result<Files> {
    Ok(Files {
        users: uturn_control::config::user_table(&config.auth)?,
        tls: tls_certificates::load_tls(config)?,
    })
}

fn run(
    cli: cli::Cli,
    config: Config,
    files: Files,
    demo_password: Option<String>,
    log_level: LogLevelSetter,
) -> anyhow::Result<()> {
    raise_open_file_limit();
    warn_if_relay_ports_are_ephemeral(&config);
    let Files { users, tls } = files;
    let (dataplane, from_shards) =
        DataPlane::start(dataplane_config(&config, tls.clone())).context("start the data plane")?;
    let (backend, why) = dataplane.backend();
    info!(
        backend = backend.name(),
        why,
        shards = dataplane.shard_count(),
        "data plane running"
    );
    let relay_ips: Vec<String> = config
        .relay
        .relay_ips
        .iter()
        .map(IpAddr::to_string)
        .collect();
    info!(
        relay_ips = %relay_ips.join(","),
        ports = %format!("{}-{}", config.relay.port_min, config.relay.port_max),
        realm = %config.auth.realm,
        "relay configured"
    );

    let readiness = Readiness::default();
    let (http, admin) = HttpServer::start(
        config.ops.http_listen,
        config.ops.http_token.clone(),
        config.ops.metrics,
        readiness.clone(),
        HttpLimits::from_ops(&config.ops),
    )?;

    // Machine-readable lines on stdout: tests and scripts wait for `uturn is ready`.
    let listeners = dataplane.listener_addrs().to_vec();
    for addr in &listeners {
        println!("listening on udp {addr}");
    }
    for listener in dataplane.stream_listeners() {
        println!("listening on {} {}", listener.kind.name(), listener.addr);
    }
    println!("listening on http {}", http.local_addr());
    info!(addr = %http.local_addr(), "HTTP listener (metrics, health, admin API) running");
    if let Some(password) = demo_password.as_deref() {
        let host = listeners
            .first()
            .map(|a| {
                if a.ip().is_unspecified() {
                    config.relay.relay_ips.first().map_or(a.ip(), |ip| *ip)
                } else {
                    a.ip()
                }
            })
            .map(|ip| match ip {
                IpAddr::V6(v6) => format!("[{v6}]"),
                IpAddr::V4(v4) => v4.to_string(),
            })
            .unwrap_or_default();
        let port = listeners.first().map_or(3478, std::net::SocketAddr::port);
        println!("no credentials configured: created user `demo` for this run only");
        println!("  turn:{host}:{port}?transport=udp  username=demo  password={password}");
        println!("  try: turnutils_uclient -u demo -w {password} -p {port} {host}");
    }

    let (signal_tx, signals) = bounded(16);
    let mut os_signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGUSR1])
        .context("install signal handlers")?;
    std::thread::Builder::new()
        .name("uturn-signals".into())
        .spawn(move || {
            for signal in os_signals.forever() {
                let message = match signal {
                    SIGHUP => Signal::Reload,
                    SIGUSR1 => Signal::Drain,
                    _ => Signal::Stop,
                };
                if signal_tx.send(message).is_err() || message == Signal::Stop {
                    break;
                }
            }
        })
        .context("spawn the signal thread")?;

    let reload_tls = tls_certificates::reload_hook(tls);
    let status_listeners: Vec<(&'static str, std::net::SocketAddr)> = listeners
        .iter()
        .map(|a| ("udp", *a))
        .chain(
            dataplane
                .stream_listeners()
                .iter()
                .map(|l| (l.kind.name(), l.addr)),
        )
        .collect();
    // Before the control thread runs, so no table change can come before the program's maps.
    let xdp = uturn_control::xdp::XdpMirror::start(
        config.relay.xdp,
        &config.relay.xdp_interfaces,
        &listeners,
        config.limits.allocation_bytes_per_sec,
    )
    .map_err(|why| anyhow::anyhow!("relay.xdp: {why}"))?;
    let control = ControlThread::new(
        config,
        users,
        dataplane,
        from_shards,
        signals,
        StdRng::from_os_rng(),
    )?
    .with_ops(OpsHooks {
        admin,
        readiness,
        listeners: status_listeners,
        reloader: Some(Box::new(move || {
            load_config(&cli, demo_password.as_deref())
                .map(|(config, _)| config)
                .map_err(|e| format!("{e:#}"))
        })),
        log_level: Some(log_level),
        reload_hooks: reload_tls.into_iter().collect(),
    })
    .with_xdp(xdp);
    println!("uturn is ready");
    info!("uturn is ready");
    control.run();
    drop(http);
    info!("stopped");
    Ok(())
}

fn dataplane_config(config: &Config, tls: Option<TlsConfig>) -> DataPlaneConfig {
    let buffer = usize::try_from(config.server.socket_buffer_bytes).ok();
    DataPlaneConfig {
        listen: listen::udp_addrs(&config.server.listen),
        stream_listen: listen::stream_listeners(&config.server.listen),
        tls,
        stream_limits: StreamLimits {
            connections_max: usize::try_from(config.server.stream_connections_max)
                .unwrap_or(usize::MAX),
            idle_timeout: Duration::from_secs(u64::from(config.server.stream_idle_timeout_secs)),
            connections_per_source_max: usize::try_from(
                config.server.stream_connections_per_source_max,
            )
            .unwrap_or(usize::MAX),
            ..StreamLimits::default()
        },
        stream_edge: StreamEdge {
            forward_other_to: config.server.forward_other_to,
            forward_proxy_protocol: config.server.forward_proxy_protocol,
            turn_server_names: config
                .server
                .turn_server_names
                .iter()
                .map(|n| n.to_ascii_lowercase())
                .collect(),
            proxy_protocol_from: config.server.proxy_protocol_from.clone(),
        },
        threads: match config.server.threads {
            0 => None,
            n => Some(usize::from(n)),
        },
        backend: match config.server.io {
            IoBackend::Auto => BackendChoice::Auto,
            IoBackend::Uring => BackendChoice::Uring,
            IoBackend::Mmsg => BackendChoice::Mmsg,
        },
        socket_recv_buffer_bytes: buffer,
        socket_send_buffer_bytes: buffer,
        counters_interval: config.ops.counters_interval(),
        publish_counters: config.ops.metrics,
        allocation_bytes_per_sec: u64::from(config.limits.allocation_bytes_per_sec),
        peer_guard: data_path_guard(&PeerPolicy::from_config(&config.engine_config())),
        ..DataPlaneConfig::default()
    }
}

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`, which holds for
/// every thread and for memory mapped before the call), so that a host whose THP setting is
/// `always` does not bring them back; mimalloc is built without its own request for them (the
/// `no_thp` feature), which covers what it maps before `main` runs.
///
/// Why: mimalloc asks for huge pages on its arenas, and the kernel's khugepaged then fills a
/// sparsely used 2 MiB range up to a whole huge page (`max_ptes_none` is 511 by default).
/// Measured in the soak (`scripts/soak.sh`, 60 s rounds): with huge pages, resident memory
/// after the calls drained was 55 MB and jumped by 2 to 8 MB between identical rounds; without,
/// 21 MB. An operator alerting on a relay's memory needs that figure to follow the calls. The
/// packet path does not notice: server CPU per relayed packet with and without was within 1.5 %
/// either way (bench/README.md, "THP off, before and after").
fn disable_transparent_huge_pages() -> std::io::Result<()> {
    rustix::thread::disable_transparent_huge_pages(true).map_err(std::io::Error::from)
}

/// Each allocation holds one or two relay sockets: a server with thousands of allocations
/// needs more descriptors than the usual soft limit of 1024, so raise the soft limit to the
/// hard one, as far as the system allows.
fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let Some(max) = limit.maximum {
        if limit.current.is_some_and(|c| c < max) {
            let raised = rustix::process::Rlimit {
                current: Some(max),
                maximum: Some(max),
            };
            if let Err(e) = setrlimit(Resource::Nofile, raised) {
                warn!(error = %e, "could not raise the open-file limit");
            }
        }
    }
}

/// Warns when the kernel may hand out relay ports as ephemeral ports to other sockets on the
/// host: each such port is one uturn cannot bind, and a run of them fails an Allocate (508).
fn warn_if_relay_ports_are_ephemeral(config: &Config) {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let Some(ephemeral) = host::parse_port_range(&read("/proc/sys/net/ipv4/ip_local_port_range"))
    else {
        return;
    };
    let reserved = host::parse_reserved_ports(&read("/proc/sys/net/ipv4/ip_local_reserved_ports"));
    let relay = config.relay.port_min..=config.relay.port_max;
    if let Some((low, high)) = host::relay_ports_in_ephemeral_range(relay, ephemeral, &reserved) {
        warn!(
            "relay ports {low}-{high} are also the kernel's ephemeral ports: other sockets on \
             this host can take them and make Allocate fail; move the relay range \
             (relay.port_min/port_max) or set sysctl net.ipv4.ip_local_reserved_ports={}-{} \
             (or narrow net.ipv4.ip_local_port_range; see scripts/deploy/99-uturn.conf)",
            config.relay.port_min, config.relay.port_max
        );
    }
}
