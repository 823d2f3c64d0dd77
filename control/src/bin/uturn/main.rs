//! The `uturn` binary: flags and config file in, a running TURN server out.
//!
//! Start-up order: parse flags, load and validate the config (a bad flag or field is one line
//! on standard error and exit code 2), start the data plane (listeners bound, shards running),
//! print the listeners and `uturn is ready`, then run the control thread until SIGINT or
//! SIGTERM. SIGHUP reloads the users file.
#![forbid(unsafe_code)]

mod cli;
mod streams;

use std::io::IsTerminal as _;
use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use crossbeam_channel::bounded;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;
use uturn_control::config::{IoBackend, UserConfig};
use uturn_control::listen;
use uturn_control::shell::{ControlThread, Signal, default_relay_ips};
use uturn_control::{Config, UserTable};
use uturn_dataplane::{BackendChoice, DataPlane, DataPlaneConfig, StreamLimits, TlsConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a configuration or flag error (clap uses 2 for usage errors too).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let (config, demo_password) = match load_config(&cli) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("uturn: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match run(config, demo_password.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uturn: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The config file (or defaults) with the flags on top, completed and validated. Returns the
/// generated demo password when no credentials were configured at all.
fn load_config(cli: &cli::Cli) -> anyhow::Result<(Config, Option<String>)> {
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
        let password: String = rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(20)
            .map(char::from)
            .collect();
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

fn run(config: Config, demo_password: Option<&str>) -> anyhow::Result<()> {
    raise_open_file_limit();
    let users = UserTable::from_config(&config.auth)?;
    let tls = streams::load_tls(&config)?;
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

    // Machine-readable lines on stdout: tests and scripts wait for `uturn is ready`.
    let listeners = dataplane.listener_addrs().to_vec();
    for addr in &listeners {
        println!("listening on udp {addr}");
    }
    for listener in dataplane.stream_listeners() {
        println!("listening on {} {}", listener.kind.name(), listener.addr);
    }
    if let Some(password) = demo_password {
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
    let mut os_signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("install signal handlers")?;
    std::thread::Builder::new()
        .name("uturn-signals".into())
        .spawn(move || {
            for signal in os_signals.forever() {
                let message = if signal == SIGHUP {
                    Signal::Reload
                } else {
                    Signal::Stop
                };
                if signal_tx.send(message).is_err() || message == Signal::Stop {
                    break;
                }
            }
        })
        .context("spawn the signal thread")?;

    let reload_tls = streams::reload_hook(&config, tls);
    let mut control = ControlThread::new(
        config,
        users,
        dataplane,
        from_shards,
        signals,
        StdRng::from_os_rng(),
    )?;
    if let Some(hook) = reload_tls {
        control.on_reload(hook);
    }
    println!("uturn is ready");
    info!("uturn is ready");
    control.run();
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
            ..StreamLimits::default()
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
        ..DataPlaneConfig::default()
    }
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
