//! `uturn-bench`: load-test any TURN server (uturn, coturn, others) beside the bare-forwarder
//! limit, measure allocations per second, and probe a live server. See bench/README.md.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use uturn_bench::alloc;
use uturn_bench::forwarder;
use uturn_bench::keeper::{REFRESH_PERIOD_DEFAULT, REFRESH_PERIOD_MAX};
use uturn_bench::load::{
    Churn, ChurnCounts, Framing, LoadConfig, LoadRun, PeerMode, SEARCH_TICK_DEFAULT,
    TICK_MIN_DEFAULT, Transport,
};
use uturn_bench::pairs::{Pair, PairsReport};
use uturn_bench::probe;
use uturn_bench::report::{AllocReport, RunReport, StepReport, markdown};
use uturn_bench::sweep::{Outcome, Sweep};
use uturn_bench::tls::{self, TlsTrust};
use uturn_bench::workload::{DRAIN, Workload};
use uturn_bench::{check_load_target, metrics, plot};

#[derive(Parser)]
#[command(
    name = "uturn-bench",
    version,
    about = "Load generator, bare forwarder and probe for TURN servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fixed-rate traffic through the relay: loss, reordering, latency, CPU.
    Run(RunArgs),
    /// Steps the offered load up to the highest rate with loss ≤ 0.1 % (the knee).
    Sweep(SweepArgs),
    /// Full authenticated allocations per second.
    Alloc(AllocArgs),
    /// The same sweep (or fixed run) through the bare UDP forwarder: the physical limit.
    Baseline(BaselineArgs),
    /// The same traffic through two servers in alternating short steps (A B, B A, ...): the
    /// per-pair differences of latency and CPU, where the machine's drift cancels out.
    Pairs(PairsArgs),
    /// Runs the bare UDP forwarder (used by `baseline`; prints `forwarder is ready on ADDR`).
    Forward(ForwardArgs),
    /// Checks a live TURN server step by step: turn:HOST:PORT?transport=udp|tcp|tls.
    Probe(ProbeArgs),
    /// Merges JSON results into one Markdown table with ratios, and SVG plots.
    Report(ReportArgs),
    /// Reads a server's Prometheus page: every sample, one sum, or a bounded wait for a value.
    Metrics(MetricsArgs),
}

#[derive(Args, Clone)]
struct Common {
    /// The server to load (a loopback address unless --allow-remote).
    #[arg(long)]
    server: Option<SocketAddr>,
    /// TURN user name.
    #[arg(short = 'u', long, default_value = "u1")]
    user: String,
    /// TURN password.
    #[arg(short = 'p', long, default_value = "p1")]
    pass: String,
    /// Named workload; the options below override its parts.
    #[arg(long, value_enum, default_value = "audio")]
    workload: Workload,
    /// Allocations carrying traffic.
    #[arg(long)]
    allocations: Option<u32>,
    /// Payload bytes per packet (32..=1400: the stamp takes 32).
    #[arg(long)]
    size: Option<usize>,
    /// ChannelData or Send indications.
    #[arg(long, value_enum, default_value = "channel")]
    framing: Framing,
    /// Echo at the peer (round trip) or sink (one way).
    #[arg(long, value_enum, default_value = "echo")]
    peer: PeerMode,
    /// Generator worker threads (event loops).
    #[arg(long, default_value_t = 1)]
    workers: u32,
    /// PID of the server, for its CPU time (/proc/PID/task/*/schedstat or /proc/PID/stat).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Label of the server in reports (uturn, coturn, ...).
    #[arg(long, default_value = "server")]
    label: String,
    /// Write the JSON report here ("-" for standard output).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Print the Markdown table at the end.
    #[arg(long)]
    markdown: bool,
    /// Milliseconds to wait for late packets after each step.
    #[arg(long, default_value_t = DRAIN.as_millis() as u64)]
    drain_ms: u64,
    /// Shortest pause between two send bursts, µs (longer: bigger batches, burstier load).
    #[arg(long, default_value_t = TICK_MIN_DEFAULT.as_micros() as u64)]
    tick_us: u64,
    /// No UDP GSO: every datagram takes its own trip through the kernel (still batched by
    /// sendmmsg), instead of a client's due datagrams, or the echo peer's replies to one relay,
    /// leaving as one GSO send. The server receives the same datagrams either way; GSO only
    /// makes the generator cheaper (bench/README.md).
    #[arg(long)]
    no_gso: bool,
    /// Client transport of the traffic: one UDP socket, TCP or TLS connection per allocation
    /// (the relay to the peer is UDP in every case).
    #[arg(long, value_enum, default_value = "udp")]
    transport: Transport,
    /// TLS: trust the CA certificates in this PEM file instead of the Mozilla roots.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// TLS: accept any server certificate.
    #[arg(long)]
    insecure: bool,
    /// TLS: the name the server certificate must carry.
    #[arg(long, default_value = "localhost")]
    tls_name: String,
    /// LIFETIME asked for in each traffic allocation's Allocate and Refresh, seconds (default:
    /// the server's).
    #[arg(long)]
    lifetime: Option<u32>,
    /// Seconds between two refreshes of each traffic allocation while traffic flows: Refresh,
    /// and ChannelBind (or CreatePermission with Send indications), from the allocation's own
    /// 5-tuple as a client does, so runs may outlast a permission's 300 s. At most 240;
    /// shortened to half the granted lifetime when that is shorter.
    #[arg(long, default_value_t = REFRESH_PERIOD_DEFAULT.as_secs())]
    refresh_secs: u64,
    /// Churn (workload `churn`): leave every second allocation to expire instead of deleting
    /// it, so the server's expiry runs beside its deletions (the soak uses it).
    #[arg(long)]
    churn_abandon: bool,
    /// Allow a target outside loopback (only a server you own).
    #[arg(long)]
    allow_remote: bool,
    /// No progress bars.
    #[arg(long, short = 'q')]
    quiet: bool,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// Total offered packets per second (default: the workload's nominal rate).
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of traffic.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
}

#[derive(Args, Clone)]
struct SweepOpts {
    /// First offered rate, total pps.
    #[arg(long, default_value_t = 10_000.0)]
    start_pps: f64,
    /// Highest offered rate tried.
    #[arg(long, default_value_t = 2_000_000.0)]
    max_pps: f64,
    /// Growth factor between steps.
    #[arg(long, default_value_t = 1.6)]
    factor: f64,
    /// Seconds per step.
    #[arg(long, default_value_t = 3.0)]
    step_secs: f64,
    /// Bisection steps after the first loss.
    #[arg(long, default_value_t = 3)]
    refine: u32,
    /// Steps at most.
    #[arg(long, default_value_t = 14)]
    max_steps: u32,
    /// Skip the latency step at half the knee.
    #[arg(long)]
    no_half_knee: bool,
    /// Seconds of the latency step at half the knee. Longer than a sweep step so that one
    /// scheduling stall of the machine (milliseconds, in a VM) holds back well under 1 % of
    /// the step's packets and so cannot decide its p99.
    #[arg(long, default_value_t = 10.0)]
    latency_secs: f64,
    /// Event-loop period of the steps that search for the knee, µs. Longer than --tick-us so
    /// that each client has several datagrams due per turn, which leave as one UDP GSO send:
    /// on loopback that makes the generator cheaper per packet than the server, so the search
    /// finds the server's limit rather than its own. The latency step at half the knee keeps
    /// --tick-us (smoother traffic).
    #[arg(long, default_value_t = SEARCH_TICK_DEFAULT.as_micros() as u64)]
    search_tick_us: u64,
}

#[derive(Args)]
struct SweepArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    sweep: SweepOpts,
}

#[derive(Args)]
struct BaselineArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    sweep: SweepOpts,
    /// Run at this fixed rate instead of sweeping.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of traffic for a fixed rate.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Pin the forwarder this command starts to this CPU (taskset), like the server under test.
    #[arg(long)]
    forwarder_cpu: Option<u32>,
}

#[derive(Args)]
struct PairsArgs {
    #[command(flatten)]
    common: Common,
    /// Total offered packets per second, the same through both servers (for a relay's added
    /// latency: half its loss-free rate).
    #[arg(long)]
    rate: f64,
    /// Pairs of steps (1 to 100; a sign test needs 6 or more).
    #[arg(long, default_value_t = 10)]
    pairs: u32,
    /// Seconds of each step.
    #[arg(long, default_value_t = 2.0)]
    pair_secs: f64,
    /// B: a TURN server at this address (with the same credentials) instead of the bare
    /// forwarder this command starts.
    #[arg(long)]
    versus: Option<SocketAddr>,
    /// PID of B when it is a TURN server, for its CPU.
    #[arg(long)]
    versus_pid: Option<u32>,
    /// Label of B in reports (default: forwarder, or versus).
    #[arg(long)]
    versus_label: Option<String>,
    /// Pin the forwarder this command starts to this CPU (taskset), like the server under test.
    #[arg(long)]
    forwarder_cpu: Option<u32>,
}

#[derive(Args)]
struct AllocArgs {
    #[command(flatten)]
    common: Common,
    /// Seconds during which new handshakes start (those in flight then finish, bounded).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Handshakes in flight at once, in all, spread over --workers threads (each its own
    /// socket; at most 8,192).
    #[arg(long, default_value_t = 256)]
    concurrency: u32,
    /// Source addresses over IPv4: 127.1.0.1 onwards, used in turn (1 to 62,500), so that a
    /// server's limit of unauthenticated answers per source (uturn: 50/s, burst 100) sees a
    /// crowd, not one client. Over IPv6 the source is ::1 alone.
    #[arg(long, default_value_t = 2000)]
    sources: u32,
    /// Handshakes at most.
    #[arg(long, default_value_t = 1_000_000)]
    count_max: u64,
}

#[derive(Args)]
struct ForwardArgs {
    /// Listener address (loopback).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Clients at most.
    #[arg(long, default_value_t = 20_000)]
    clients_max: usize,
    /// Stops by itself after this many seconds.
    #[arg(long, default_value_t = 900)]
    max_secs: u64,
}

#[derive(Args)]
struct ProbeArgs {
    /// turn:HOST:PORT?transport=udp|tcp|tls
    uri: String,
    /// User name.
    #[arg(short = 'u', long)]
    user: String,
    /// Password.
    #[arg(short = 'p', long)]
    pass: String,
    /// The realm you expect (diagnoses a realm mismatch).
    #[arg(long)]
    realm: Option<String>,
    /// Seconds to wait for each answer.
    #[arg(long, default_value_t = 3.0)]
    timeout: f64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// TLS: trust the CA certificates in this PEM file instead of the Mozilla roots.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// TLS: accept any server certificate (checks TURN, not the server's identity).
    #[arg(long)]
    insecure: bool,
}

#[derive(Args)]
struct ReportArgs {
    /// JSON results of earlier runs.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Write the Markdown here as well as to standard output.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Write the SVG plots into this folder.
    #[arg(long)]
    plots: Option<PathBuf>,
}

#[derive(Args)]
struct MetricsArgs {
    /// The server's HTTP address (uturn's --http).
    #[arg(long)]
    http: SocketAddr,
    /// Path of the Prometheus page.
    #[arg(long, default_value = "/metrics")]
    path: String,
    /// Print only the sum of this metric (over --label filters) instead of every sample.
    #[arg(long)]
    sum: Option<String>,
    /// Label filter for --sum, KEY=VALUE; repeat for several (all must match).
    #[arg(long, value_parser = parse_label)]
    label: Vec<(String, String)>,
    /// With --sum: poll (every 100 ms) until the sum equals this value; exit status 1 when it
    /// has not by --timeout.
    #[arg(long, requires = "sum")]
    until: Option<f64>,
    /// Seconds to wait for an answer, or for --until.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn metrics_mode(a: &MetricsArgs) -> Result<i32> {
    let timeout = secs(a.timeout)?;
    let labels: Vec<(&str, &str)> = a
        .label
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let Some(name) = &a.sum else {
        let body = metrics::fetch(a.http, &a.path, timeout)?;
        for sample in metrics::parse(&body) {
            println!("{}", metrics::render(&sample));
        }
        return Ok(0);
    };
    if let Some(want) = a.until {
        return match metrics::wait_for(a.http, &a.path, name, &labels, want, timeout) {
            Ok(took) => {
                println!("{want}");
                eprintln!("{name} reached {want} after {:.1} s", took.as_secs_f64());
                Ok(0)
            }
            Err(e) => {
                eprintln!("uturn-bench: {e}");
                Ok(1)
            }
        };
    }
    let body = metrics::fetch(a.http, &a.path, timeout)?;
    println!("{}", metrics::sum(&metrics::parse(&body), name, &labels));
    Ok(0)
}

fn main() {
    let cli = Cli::parse();
    let code = match run_cli(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("uturn-bench: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

fn run_cli(cli: Cli) -> Result<i32> {
    match cli.command {
        Cmd::Run(a) => {
            let server = target(&a.common)?;
            // The workload's rate per allocation, on the allocations actually set up.
            let shape = a.common.workload.shape();
            let allocations = a.common.allocations.unwrap_or(shape.allocations).max(1);
            let rate = a
                .rate
                .unwrap_or(shape.pps_per_allocation * f64::from(allocations));
            let plan = Plan::Fixed {
                rate,
                duration: secs(a.duration)?,
            };
            traffic(&a.common, server, "run", plan).map(|_| 0)
        }
        Cmd::Sweep(a) => {
            let server = target(&a.common)?;
            traffic(&a.common, server, "sweep", Plan::Sweep(a.sweep.clone())).map(|_| 0)
        }
        Cmd::Baseline(a) => baseline(a).map(|_| 0),
        Cmd::Pairs(a) => pairs_mode(&a).map(|_| 0),
        Cmd::Alloc(a) => alloc_mode(&a).map(|_| 0),
        Cmd::Forward(a) => {
            let stop = AtomicBool::new(false);
            let stats = forwarder::run(
                a.listen,
                a.clients_max,
                Duration::from_secs(a.max_secs),
                &stop,
                |addr| {
                    println!("forwarder is ready on {addr}");
                },
            )
            .with_context(|| format!("run the forwarder on {}", a.listen))?;
            eprintln!(
                "forwarder done: {} to peers, {} to clients, {} dropped",
                stats.to_peers, stats.to_clients, stats.dropped
            );
            Ok(0)
        }
        Cmd::Probe(a) => {
            let uri = probe::parse_turn_uri(&a.uri).map_err(anyhow::Error::msg)?;
            let trust = match (&a.ca_file, a.insecure) {
                (_, true) => TlsTrust::InsecureAcceptAny,
                (Some(path), false) => TlsTrust::CaFile(path.clone()),
                (None, false) => TlsTrust::WebPki,
            };
            let report = probe::run(
                &uri,
                &a.user,
                &a.pass,
                a.realm.as_deref(),
                secs(a.timeout)?,
                &trust,
            );
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", probe::render(&report));
            }
            Ok(if report.passed() { 0 } else { 1 })
        }
        Cmd::Metrics(a) => metrics_mode(&a),
        Cmd::Report(a) => {
            let mut reports = Vec::new();
            for p in &a.inputs {
                let text =
                    std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
                let r: RunReport = serde_json::from_str(&text)
                    .with_context(|| format!("parse {}", p.display()))?;
                reports.push(r);
            }
            let md = markdown(&reports);
            print!("{md}");
            if let Some(path) = &a.markdown {
                std::fs::write(path, &md).with_context(|| format!("write {}", path.display()))?;
            }
            if let Some(dir) = &a.plots {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("create {}", dir.display()))?;
                for (name, svg) in plot::plots(&reports) {
                    let path = dir.join(name);
                    std::fs::write(&path, svg)
                        .with_context(|| format!("write {}", path.display()))?;
                    eprintln!("wrote {}", path.display());
                }
            }
            Ok(0)
        }
    }
}

fn secs(s: f64) -> Result<Duration> {
    if !(s.is_finite() && s > 0.0 && s <= 3600.0) {
        bail!("a duration must be between 0 and 3600 seconds, not {s}");
    }
    Ok(Duration::from_secs_f64(s))
}

fn target(c: &Common) -> Result<SocketAddr> {
    let server = c.server.context("--server ADDR is required")?;
    check_load_target(server, c.allow_remote).map_err(anyhow::Error::msg)?;
    Ok(server)
}

enum Plan {
    Fixed { rate: f64, duration: Duration },
    Sweep(SweepOpts),
}

fn bar(quiet: bool, len: u64, msg: String) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{msg:32} [{bar:30}] {pos}/{len} {elapsed}") {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(msg);
    pb
}

fn load_config(c: &Common, server: SocketAddr, framing: Framing) -> Result<LoadConfig> {
    let shape = c.workload.shape();
    let tls = match c.transport {
        Transport::Tls => {
            let trust = match (&c.ca_file, c.insecure) {
                (_, true) => TlsTrust::InsecureAcceptAny,
                (Some(path), false) => TlsTrust::CaFile(path.clone()),
                (None, false) => TlsTrust::WebPki,
            };
            let mut config = Arc::unwrap_or_clone(tls::client_config(&trust)?);
            config.alpn_protocols = vec![b"stun.turn".to_vec()];
            Some((Arc::new(config), c.tls_name.clone()))
        }
        Transport::Udp | Transport::Tcp => None,
    };
    Ok(LoadConfig {
        transport: c.transport,
        tls,
        server,
        user: c.user.clone(),
        pass: c.pass.clone(),
        allocations: c.allocations.unwrap_or(shape.allocations).max(1),
        payload_len: c.size.unwrap_or(shape.payload_len),
        framing,
        peer_mode: c.peer,
        workers: c.workers.max(1),
        drain: Duration::from_millis(c.drain_ms),
        tick: Duration::from_micros(c.tick_us.clamp(1, 10_000)),
        gso: !c.no_gso,
        lifetime_secs: c.lifetime,
        refresh_period: refresh_period(c.refresh_secs)?,
    })
}

/// `--refresh-secs` checked: a refresh every 1 to 240 s keeps a permission (300 s) alive
/// with room for a lost round.
fn refresh_period(secs: u64) -> Result<Duration> {
    let period = Duration::from_secs(secs);
    if secs == 0 || period > REFRESH_PERIOD_MAX {
        bail!(
            "--refresh-secs must be from 1 to {} (a permission lives 300 s), not {secs}",
            REFRESH_PERIOD_MAX.as_secs()
        );
    }
    Ok(period)
}

/// Sets up the allocations, runs the plan, and writes the report.
fn traffic(c: &Common, server: SocketAddr, mode: &str, plan: Plan) -> Result<RunReport> {
    traffic_with(c, server, mode, plan, c.framing)
}

fn traffic_with(
    c: &Common,
    server: SocketAddr,
    mode: &str,
    plan: Plan,
    framing: Framing,
) -> Result<RunReport> {
    if c.workload == Workload::Alloc {
        bail!("the alloc workload has no traffic: use the alloc command");
    }
    if framing == Framing::Bare && c.transport != Transport::Udp {
        bail!("the bare forwarder speaks UDP only: --transport tcp|tls applies to run and sweep");
    }
    let config = load_config(c, server, framing)?;
    let setup_bar = bar(
        c.quiet,
        u64::from(config.allocations),
        format!("{}: allocations", c.label),
    );
    let t0 = Instant::now();
    let mut run = LoadRun::setup(config.clone(), &|n| setup_bar.inc(n))
        .with_context(|| format!("set up {} allocations on {server}", config.allocations))?;
    setup_bar.finish_and_clear();
    eprintln!(
        "{}: {} allocations ready on {server} in {:.2} s",
        c.label,
        config.allocations,
        t0.elapsed().as_secs_f64()
    );
    let stop = AtomicBool::new(false);
    let shape = c.workload.shape();
    let churn_budget = match &plan {
        Plan::Fixed { duration, .. } => *duration,
        Plan::Sweep(o) => {
            Duration::from_secs_f64(o.step_secs * f64::from(o.max_steps) + o.latency_secs)
        }
    };
    let churn = (shape.churn_per_sec > 0.0 && framing != Framing::Bare).then(|| {
        Churn::start(
            server,
            &c.user,
            &c.pass,
            shape.churn_per_sec,
            churn_budget,
            c.churn_abandon,
        )
    });
    let mut report = RunReport {
        label: c.label.clone(),
        mode: mode.to_owned(),
        workload: c.workload.name().to_owned(),
        target: server.to_string(),
        framing: Some(framing),
        transport: Some(c.transport),
        peer_mode: Some(c.peer),
        allocations: config.allocations,
        payload_len: config.payload_len,
        workers: config.workers,
        gso: Some(config.gso),
        steps: Vec::new(),
        knee_pps: None,
        knee_limited_by_generator: false,
        half_knee: None,
        alloc: None,
        churn: None,
        churn_abandoned: None,
        warnings: Vec::new(),
    };
    let mut one_step = |rate: f64, duration: Duration, tick: Duration| -> StepReport {
        let pb = bar(
            c.quiet,
            duration.as_millis() as u64,
            format!("{}: {:.0} pps", c.label, rate),
        );
        let done = Arc::new(AtomicBool::new(false));
        let ticker = {
            let (pb, done) = (pb.clone(), Arc::clone(&done));
            std::thread::spawn(move || {
                let start = Instant::now();
                while !done.load(Ordering::Relaxed)
                    && start.elapsed() < duration.saturating_add(Duration::from_secs(30))
                {
                    pb.set_position(start.elapsed().as_millis() as u64);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        let raw = run.step(rate, duration, tick, c.server_pid, &stop);
        done.store(true, Ordering::Relaxed);
        let _ = ticker.join();
        pb.finish_and_clear();
        let s = StepReport::from_raw(&raw, c.peer, config.workers);
        eprintln!(
            "{}: target {:>9.0} offered {:>9.0} received {:>9.0} pps, loss {:.3} %, reordered {}, p50 {:.1} µs p99 {:.1} µs p99.9 {:.1} µs max {:.1} µs, server CPU {} ns/pkt, own CPU {:.0} %{}",
            c.label,
            s.target_pps,
            s.offered_pps,
            s.received_pps,
            s.loss_ratio * 100.0,
            s.reordered,
            s.latency.p50_us,
            s.latency.p99_us,
            s.latency.p999_us,
            s.latency.max_us,
            s.server_cpu_ns_per_packet
                .map_or_else(|| "?".to_owned(), |n| format!("{n:.0}")),
            s.own_cpu_cores.unwrap_or(0.0) * 100.0,
            if s.generator_saturated {
                " [GENERATOR SATURATED]"
            } else {
                ""
            },
        );
        s
    };
    match plan {
        Plan::Fixed { rate, duration } => {
            let s = one_step(rate, duration, config.tick);
            report.steps.push(s);
        }
        Plan::Sweep(o) => {
            let step_duration = secs(o.step_secs)?;
            let latency_duration = secs(o.latency_secs)?;
            let search_tick = Duration::from_micros(o.search_tick_us.clamp(1, 10_000));
            let mut sweep = Sweep::new(o.start_pps, o.factor, o.max_pps, o.refine, o.max_steps);
            while let Some(rate) = sweep.next() {
                let s = one_step(rate, step_duration, search_tick);
                let outcome = match (s.is_loss_free(), s.generator_saturated) {
                    (true, false) => Outcome::Pass,
                    (true, true) => Outcome::GeneratorLimit,
                    (false, _) => Outcome::Fail,
                };
                sweep.record(rate, outcome);
                report.steps.push(s);
            }
            report.knee_pps = sweep.knee();
            report.knee_limited_by_generator = sweep.limited_by_generator();
            if let (Some(knee), false) = (sweep.knee(), o.no_half_knee) {
                report.half_knee = Some(one_step(
                    (knee / 2.0).round().max(1.0),
                    latency_duration,
                    config.tick,
                ));
            }
            eprintln!(
                "{}: loss-free rate {}",
                c.label,
                sweep.knee().map_or_else(
                    || "none found".to_owned(),
                    |k| format!(
                        "{k:.0} pps{}",
                        if sweep.limited_by_generator() {
                            " (at least: the generator was the limit)"
                        } else {
                            ""
                        }
                    )
                )
            );
        }
    }
    if let Some(ch) = churn {
        let ChurnCounts {
            made,
            abandoned,
            failed,
        } = ch.finish();
        report.churn = Some((made, failed));
        report.churn_abandoned = Some(abandoned);
        eprintln!(
            "{}: churn made {made} allocations ({} deleted, {abandoned} left to expire), {failed} failed",
            c.label,
            made - abandoned,
        );
        if failed > 0 {
            report
                .warnings
                .push(format!("{failed} churn allocations failed"));
        }
    }
    run.teardown();
    report.derive_warnings();
    emit(c, &report)?;
    Ok(report)
}

fn emit(c: &Common, report: &RunReport) -> Result<()> {
    for w in &report.warnings {
        eprintln!("{}: warning: {w}", report.label);
    }
    if let Some(path) = &c.json {
        let json = serde_json::to_string_pretty(report)?;
        if path.as_os_str() == "-" {
            println!("{json}");
        } else {
            std::fs::write(path, json).with_context(|| format!("write {}", path.display()))?;
        }
    }
    if c.markdown {
        print!("{}", markdown(std::slice::from_ref(report)));
    }
    Ok(())
}

fn alloc_mode(a: &AllocArgs) -> Result<RunReport> {
    let c = &a.common;
    let server = target(c)?;
    let duration = secs(a.duration)?;
    let pb = bar(c.quiet, 0, format!("{}: allocations", c.label));
    let stop = AtomicBool::new(false);
    let config = alloc::AllocConfig {
        server,
        user: c.user.clone(),
        pass: c.pass.clone(),
        workers: c.workers,
        concurrency: a.concurrency,
        sources: a.sources,
        duration,
        count_max: a.count_max,
        server_pid: c.server_pid,
    };
    let raw = alloc::run(&config, &stop, &|| pb.inc(1));
    pb.finish_and_clear();
    let ar = AllocReport::from_raw(&raw);
    eprintln!(
        "{}: {:.0} allocations/s ({} ok in {:.1} s, {} failed, {} not deleted; {} workers, {} in flight, {} sources), handshake p50 {:.0} µs p99 {:.0} µs, server CPU {} µs/allocation, own CPU {} µs/allocation ({}){}",
        c.label,
        ar.per_sec,
        ar.succeeded_in_window.unwrap_or(0),
        ar.duration_secs,
        ar.failed,
        raw.delete_failed,
        raw.workers,
        raw.concurrency,
        raw.sources,
        ar.latency.p50_us,
        ar.latency.p99_us,
        ar.server_cpu_us_per_allocation
            .map_or_else(|| "?".to_owned(), |v| format!("{v:.1}")),
        ar.own_cpu_us_per_allocation
            .map_or_else(|| "?".to_owned(), |v| format!("{v:.1}")),
        ar.own_cpu_cores.map_or_else(
            || "?".to_owned(),
            |v| format!("{:.0} % of a core", v * 100.0)
        ),
        if ar.generator_saturated {
            " [GENERATOR SATURATED: the rate is the generator's limit, at least]"
        } else {
            ""
        },
    );
    for (what, n) in &ar.failures {
        eprintln!("{}: failures: {what}: {n}", c.label);
    }
    let mut report = RunReport {
        label: c.label.clone(),
        mode: "alloc".to_owned(),
        workload: "alloc".to_owned(),
        target: server.to_string(),
        framing: None,
        transport: None,
        peer_mode: None,
        allocations: 0,
        payload_len: 0,
        workers: raw.workers,
        gso: None,
        steps: Vec::new(),
        knee_pps: None,
        knee_limited_by_generator: false,
        half_knee: None,
        alloc: Some(ar),
        churn: None,
        churn_abandoned: None,
        warnings: Vec::new(),
    };
    if let Some(e) = &raw.first_error {
        report.warnings.push(format!("first failure: {e}"));
    }
    if report.alloc.as_ref().is_some_and(|a| a.generator_saturated) {
        report.warnings.push(
            "the generator used all its cores: the rate is its limit, at least, not the server's"
                .to_owned(),
        );
    }
    emit(c, &report)?;
    Ok(report)
}

/// The forwarder child process, killed when dropped.
struct ForwarderChild(Child);

impl Drop for ForwarderChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_forwarder(cpu: Option<u32>, max_secs: u64) -> Result<(ForwarderChild, SocketAddr)> {
    let exe = std::env::current_exe().context("find the uturn-bench executable")?;
    let mut cmd = match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.args([
        "forward",
        "--listen",
        "127.0.0.1:0",
        "--max-secs",
        &max_secs.to_string(),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let mut child = ForwarderChild(cmd.spawn().context("start the forwarder")?);
    let stdout = child.0.stdout.take().context("forwarder stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("read the forwarder's ready line")?;
    let addr = line
        .trim()
        .strip_prefix("forwarder is ready on ")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("unexpected forwarder output {line:?}"))?;
    Ok((child, addr))
}

/// `pairs`: A is `--server`, B the forwarder this starts or `--versus`; both set up once, then
/// `--pairs` pairs of steps in alternating order (see `uturn_bench::pairs`).
fn pairs_mode(a: &PairsArgs) -> Result<PairsReport> {
    let c = &a.common;
    if matches!(c.workload, Workload::Alloc | Workload::Churn) {
        bail!("pairs compares steady traffic: use --workload small, audio or video");
    }
    if !(1..=100).contains(&a.pairs) {
        bail!("--pairs must be from 1 to 100, not {}", a.pairs);
    }
    if !(a.rate.is_finite() && a.rate > 0.0) {
        bail!("--rate must be a positive number of packets per second");
    }
    let step = secs(a.pair_secs)?;
    if step.as_secs_f64() * 2.0 * f64::from(a.pairs) > 3600.0 {
        bail!("--pairs × 2 × --pair-secs must stay within an hour");
    }
    let server = target(c)?;
    let config_a = load_config(c, server, c.framing)?;
    let (forwarder, versus, versus_pid, framing_b, versus_label) = match a.versus {
        Some(addr) => {
            check_load_target(addr, c.allow_remote).map_err(anyhow::Error::msg)?;
            let label = a
                .versus_label
                .clone()
                .unwrap_or_else(|| "versus".to_owned());
            (None, addr, a.versus_pid, c.framing, label)
        }
        None => {
            let budget = 60 + (step.as_secs_f64() * 2.0 * f64::from(a.pairs)) as u64;
            let (child, addr) = spawn_forwarder(a.forwarder_cpu, budget)?;
            let pid = child.0.id();
            let label = a
                .versus_label
                .clone()
                .unwrap_or_else(|| "forwarder".to_owned());
            (Some(child), addr, Some(pid), Framing::Bare, label)
        }
    };
    let config_b = load_config(c, versus, framing_b)?;
    let mut run_a = LoadRun::setup(config_a.clone(), &|_| {})
        .with_context(|| format!("set up {} allocations on {server}", config_a.allocations))?;
    let mut run_b = LoadRun::setup(config_b.clone(), &|_| {})
        .with_context(|| format!("set up {} flows on {versus}", config_b.allocations))?;
    eprintln!(
        "{} ({server}) vs {versus_label} ({versus}): {} allocations each, {} pairs of {} s at {:.0} pps",
        c.label,
        config_a.allocations,
        a.pairs,
        step.as_secs_f64(),
        a.rate
    );
    let stop = AtomicBool::new(false);
    let pb = bar(c.quiet, u64::from(a.pairs), format!("{}: pairs", c.label));
    let mut pairs = Vec::new();
    for i in 0..a.pairs {
        // The order flips every pair, so that a drift of the machine favours neither server.
        let a_first = i % 2 == 0;
        let mut step_a = None;
        let mut step_b = None;
        for a_turn in [a_first, !a_first] {
            if a_turn {
                let raw = run_a.step(a.rate, step, config_a.tick, c.server_pid, &stop);
                step_a = Some(StepReport::from_raw(&raw, c.peer, config_a.workers));
            } else {
                let raw = run_b.step(a.rate, step, config_b.tick, versus_pid, &stop);
                step_b = Some(StepReport::from_raw(&raw, c.peer, config_b.workers));
            }
        }
        let (Some(sa), Some(sb)) = (step_a, step_b) else {
            continue;
        };
        let pair = Pair {
            a_first,
            a: sa,
            b: sb,
        };
        pb.suspend(|| {
            eprintln!(
                "pair {:>3}: {} p99 {:>8.1} µs, {versus_label} p99 {:>8.1} µs, added {:>+8.1} µs; loss {:.3} % / {:.3} %",
                i + 1,
                c.label,
                pair.a.latency.p99_us,
                pair.b.latency.p99_us,
                pair.p99_added_us(),
                pair.a.loss_ratio * 100.0,
                pair.b.loss_ratio * 100.0,
            );
        });
        pairs.push(pair);
        pb.inc(1);
    }
    pb.finish_and_clear();
    run_a.teardown();
    run_b.teardown();
    drop(forwarder);
    let report = PairsReport::new(
        c.label.clone(),
        versus_label,
        c.workload.name().to_owned(),
        a.rate,
        step.as_secs_f64(),
        pairs,
    );
    eprintln!("{}", report.line());
    for w in &report.warnings {
        eprintln!("{}: warning: {w}", report.label);
    }
    if let Some(path) = &c.json {
        let json = serde_json::to_string_pretty(&report)?;
        if path.as_os_str() == "-" {
            println!("{json}");
        } else {
            std::fs::write(path, json).with_context(|| format!("write {}", path.display()))?;
        }
    }
    if c.markdown {
        print!("{}", report.markdown());
    }
    Ok(report)
}

fn baseline(a: BaselineArgs) -> Result<RunReport> {
    let mut c = a.common.clone();
    if c.label == "server" {
        c.label = "baseline".to_owned();
    }
    let plan = match a.rate {
        Some(rate) => Plan::Fixed {
            rate,
            duration: secs(a.duration)?,
        },
        None => Plan::Sweep(a.sweep.clone()),
    };
    let mode = if a.rate.is_some() {
        "baseline-run"
    } else {
        "baseline"
    };
    match c.server {
        Some(server) => {
            check_load_target(server, c.allow_remote).map_err(anyhow::Error::msg)?;
            traffic_with(&c, server, mode, plan, Framing::Bare)
        }
        None => {
            let budget = 60
                + (a.sweep.step_secs * f64::from(a.sweep.max_steps + 1) + a.sweep.latency_secs)
                    as u64
                + a.duration as u64;
            let (child, server) = spawn_forwarder(a.forwarder_cpu, budget)?;
            c.server_pid = c.server_pid.or(Some(child.0.id()));
            let r = traffic_with(&c, server, mode, plan, Framing::Bare);
            drop(child);
            r
        }
    }
}
