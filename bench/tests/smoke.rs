//! Smoke runs of every mode against the real `uturn` binary on loopback: seconds, tiny loads,
//! and no threshold on speed. They check that each mode runs end to end and that its figures
//! are consistent (packets arrived, loss adds up, the JSON parses), not how fast anything is.
//!
//! The server is `$UTURN_BIN`, or the workspace's own `uturn`, built on first use (see
//! `uturn_e2e::uturn_binary`).

use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};

use uturn_bench::report::RunReport;

const BENCH: &str = env!("CARGO_BIN_EXE_uturn-bench");

/// A uturn for one smoke run: one shard, one user, loopback peers allowed, its own relay port
/// slice. The spawner (readiness wait with a deadline, `--http 127.0.0.1:0`, kill on drop) is
/// the end-to-end harness's.
struct Uturn {
    process: uturn_e2e::Uturn,
    addr: SocketAddr,
}

impl Uturn {
    fn start() -> Self {
        Self::start_on("127.0.0.1", "127.0.0.1")
    }

    /// A uturn on ::1 only, relaying from ::1.
    fn start_v6() -> Self {
        Self::start_on("::1", "::1")
    }

    /// A uturn listening on `listen_ip` alone and relaying from `relay_ip` alone.
    fn start_on(listen_ip: &str, relay_ip: &str) -> Self {
        Self::start_on_with(listen_ip, relay_ip, &[])
    }

    /// A uturn on 127.0.0.1 with `extra` arguments (a `--config`).
    fn start_with(extra: &[&str]) -> Self {
        Self::start_on_with("127.0.0.1", "127.0.0.1", extra)
    }

    fn start_on_with(listen_ip: &str, relay_ip: &str, extra: &[&str]) -> Self {
        let ports = uturn_e2e::relay_port_slice();
        let ipv6 = listen_ip.contains(':');
        let listen = if ipv6 {
            format!("[{listen_ip}]:0")
        } else {
            format!("{listen_ip}:0")
        };
        let mut args = vec![
            "--listen",
            &listen,
            "--relay-ip",
            relay_ip,
            "--user",
            "u1:p1",
            "--allow-loopback-peers",
            "--threads",
            "1",
            "--ports",
            &ports,
        ];
        args.extend_from_slice(extra);
        let process = uturn_e2e::Uturn::start(&args);
        let addr = process.listener(ipv6);
        Self { process, addr }
    }

    /// A uturn that also listens on TCP and TLS (a certificate made for this run).
    fn start_with_streams(cert: &uturn_e2e::TestCertificate) -> Self {
        let ports = uturn_e2e::relay_port_slice();
        let process = uturn_e2e::Uturn::start(&[
            "--listen",
            "udp://127.0.0.1:0",
            "--listen",
            "tcp://127.0.0.1:0",
            "--listen",
            "tls://127.0.0.1:0",
            "--tls-cert",
            cert.cert_path.to_str().expect("UTF-8 path"),
            "--tls-key",
            cert.key_path.to_str().expect("UTF-8 path"),
            "--relay-ip",
            "127.0.0.1",
            "--user",
            "u1:p1",
            "--allow-loopback-peers",
            "--threads",
            "1",
            "--ports",
            &ports,
        ]);
        let addr = process.listener(false);
        Self { process, addr }
    }

    fn pid(&self) -> String {
        self.process.pid().to_string()
    }

    /// `uturn-bench MODE ARGS` against this uturn (its address, its pid for the CPU figures,
    /// the label `uturn`), with the JSON report on standard output and no progress bars.
    fn bench(&self, mode: &str, args: &[&str]) -> Output {
        let addr = self.addr.to_string();
        let pid = self.pid();
        let mut all = vec![
            mode,
            "--server",
            &addr,
            "--server-pid",
            &pid,
            "--label",
            "uturn",
        ];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--json", "-", "-q"]);
        bench(&all)
    }
}

fn bench(args: &[&str]) -> Output {
    let out = Command::new(BENCH)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run uturn-bench");
    assert!(
        out.status.success() || args.first() == Some(&"probe"),
        "uturn-bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json_report(out: &Output) -> RunReport {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "JSON report does not parse ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Consistency that holds whatever the speed: every sent packet is received or lost.
fn assert_step_sane(r: &RunReport) {
    assert!(!r.steps.is_empty(), "no step in {r:?}");
    for s in &r.steps {
        assert!(s.sent > 0, "nothing sent: {s:?}");
        assert_eq!(s.received + s.lost, s.sent, "loss accounting: {s:?}");
        assert!((s.loss_ratio - s.lost as f64 / s.sent as f64).abs() < 1e-9);
        assert!(s.latency.p50_us <= s.latency.p99_us && s.latency.p99_us <= s.latency.max_us);
    }
    assert!(
        r.steps.iter().any(|s| s.received > 0),
        "nothing came back: {r:?}"
    );
}

#[test]
fn a_fixed_run_relays_channel_data_through_uturn() {
    let server = Uturn::start();
    let out = server.bench(
        "run",
        &["--allocations", "8", "--rate", "400", "--duration", "1"],
    );
    let r = json_report(&out);
    assert_step_sane(&r);
    assert_eq!(
        (r.label.as_str(), r.mode.as_str(), r.allocations),
        ("uturn", "run", 8)
    );
    assert!(
        r.steps[0].server_cpu_secs.is_some(),
        "server CPU read from /proc"
    );
}

#[test]
fn a_fixed_run_relays_send_indications_through_uturn() {
    let server = Uturn::start();
    let out = server.bench(
        "run",
        &[
            "--framing",
            "send",
            "--allocations",
            "4",
            "--rate",
            "200",
            "--duration",
            "1",
        ],
    );
    assert_step_sane(&json_report(&out));
}

/// A fixed run over a stream transport: same accounting as over UDP, transport in the report.
fn a_fixed_run_over(transport: &str, framing: &str) {
    let cert = uturn_e2e::TestCertificate::generate();
    let server = Uturn::start_with_streams(&cert);
    let addr = server.process.stream_listener(transport, false);
    let out = bench(&[
        "run",
        "--server",
        &addr.to_string(),
        "--server-pid",
        &server.pid(),
        "--transport",
        transport,
        "--ca-file",
        cert.cert_path.to_str().expect("UTF-8 path"),
        "--framing",
        framing,
        // Not a multiple of four: every ChannelData frame carries padding on the stream.
        "--size",
        "101",
        "--allocations",
        "4",
        "--rate",
        "400",
        "--duration",
        "1",
        "--json",
        "-",
        "-q",
    ]);
    let r = json_report(&out);
    assert_step_sane(&r);
    assert_eq!(
        serde_json::to_value(r.transport).expect("transport serializes"),
        serde_json::json!(transport)
    );
    assert!(r.mode_shown().ends_with(&format!("({transport})")));
}

#[test]
fn a_fixed_run_relays_padded_channel_data_over_tcp() {
    a_fixed_run_over("tcp", "channel");
}

#[test]
fn a_fixed_run_relays_channel_data_over_tls() {
    a_fixed_run_over("tls", "channel");
}

#[test]
fn a_fixed_run_relays_send_indications_over_tcp() {
    a_fixed_run_over("tcp", "send");
}

#[test]
fn a_sweep_steps_the_load_and_reports_a_knee_or_none() {
    let server = Uturn::start();
    let out = server.bench(
        "sweep",
        &[
            "--workload",
            "small",
            "--allocations",
            "4",
            "--start-pps",
            "200",
            "--max-pps",
            "400",
            "--factor",
            "2",
            "--step-secs",
            "0.5",
            "--max-steps",
            "2",
            "--refine",
            "0",
            "--latency-secs",
            "0.5",
        ],
    );
    let r = json_report(&out);
    assert_step_sane(&r);
    assert!(r.steps.len() <= 2);
    assert_eq!(r.payload_len, 64);
    // The search runs on its own tick (1 ms by default), the latency step on --tick-us.
    assert_eq!(r.gso, Some(true));
    assert!(r.steps.iter().all(|s| s.tick_us == Some(1_000)), "{r:?}");
    if let Some(knee) = r.knee_pps {
        assert!(r.steps.iter().any(|s| s.target_pps == knee));
        let half = r
            .half_knee
            .as_ref()
            .expect("a latency step at half the knee");
        assert_eq!(half.tick_us, Some(100));
        assert!((half.duration_secs - 0.5).abs() < 1e-9, "{half:?}");
    }
}

/// `alloc`: pipelined handshakes from several workers and source addresses; every one made
/// is deleted again (the server's own count of ended allocations says so), and nothing fails
/// on loopback.
#[test]
fn alloc_mode_makes_and_deletes_pipelined_allocations_from_many_sources() {
    let server = Uturn::start();
    let out = server.bench(
        "alloc",
        &[
            "--duration",
            "2",
            "--workers",
            "2",
            "--concurrency",
            "16",
            "--sources",
            "8",
            "--count-max",
            "300",
        ],
    );
    let r = json_report(&out);
    let a = r.alloc.expect("alloc results");
    assert_eq!(a.workers, Some(2), "{a:?}");
    assert_eq!(a.concurrency, Some(16), "{a:?}");
    assert_eq!(a.sources, Some(8), "{a:?}");
    assert!(a.succeeded > 0 && a.succeeded + a.failed <= 300, "{a:?}");
    assert_eq!(a.failed, 0, "{a:?}");
    assert_eq!(a.delete_failed, Some(0), "{a:?}");
    assert!(a.failures.is_empty(), "{:?}", a.failures);
    let in_window = a.succeeded_in_window.expect("in-window count");
    assert!(in_window <= a.succeeded, "{a:?}");
    assert!(
        (a.per_sec - in_window as f64 / a.duration_secs).abs() < 1e-6,
        "the rate is the window's handshakes over its length: {a:?}"
    );
    assert!(a.latency.p50_us <= a.latency.p99_us && a.latency.p99_us <= a.latency.max_us);
    assert!(
        a.server_cpu_us_per_allocation.is_some_and(|c| c > 0.0),
        "{a:?}"
    );
    assert!(
        a.own_cpu_us_per_allocation.is_some_and(|c| c > 0.0),
        "{a:?}"
    );
    // RFC 8656 §7.3: Refresh LIFETIME 0 deletes; the server ended as many as were made, and
    // holds none.
    let live = server.process.wait_metric(
        "uturn_allocations",
        &[],
        0.0,
        std::time::Duration::from_secs(5),
    );
    assert_eq!(live, 0.0, "allocations left on the server");
    let ended = server
        .process
        .metric_sum("uturn_allocation_lifetime_seconds_count", &[]);
    assert_eq!(ended, a.succeeded as f64, "{a:?}");
}

/// Past the server's budget of unauthenticated answers for one source (uturn: burst 100, then
/// 50 a second, dropped silently beyond), the handshakes' retransmissions carry them through:
/// all succeed, and at least one had to wait for a retransmission (100 ms) to be answered.
#[test]
fn alloc_mode_from_one_source_rides_out_the_unauthenticated_rate_limit() {
    let server = Uturn::start();
    let out = server.bench(
        "alloc",
        &[
            "--duration",
            "10",
            "--concurrency",
            "4",
            "--sources",
            "1",
            "--count-max",
            "130",
        ],
    );
    let a = json_report(&out).alloc.expect("alloc results");
    assert_eq!(a.succeeded, 130, "{a:?}");
    assert!(a.failures.is_empty(), "{:?}", a.failures);
    assert!(
        a.latency.max_us >= 100_000.0,
        "30 handshakes beyond the burst were all answered at once: {a:?}"
    );
}

#[test]
fn churn_makes_and_deletes_allocations_while_traffic_flows() {
    let server = Uturn::start();
    let out = server.bench(
        "run",
        &[
            "--workload",
            "churn",
            "--allocations",
            "4",
            "--rate",
            "200",
            "--duration",
            "1",
        ],
    );
    let r = json_report(&out);
    assert_step_sane(&r);
    let (made, _failed) = r.churn.expect("churn counters");
    assert!(made > 0);
}

#[test]
fn the_baseline_forwarder_carries_the_same_traffic() {
    let out = bench(&[
        "baseline",
        "--allocations",
        "4",
        "--rate",
        "400",
        "--duration",
        "1",
        "--json",
        "-",
        "-q",
    ]);
    let r = json_report(&out);
    assert_step_sane(&r);
    assert_eq!(r.label, "baseline");
}

/// `pairs` alternates uturn and the forwarder it starts, and reports every pair and the
/// per-pair differences; with uturn's pid and the forwarder's both CPU figures are known.
#[test]
fn pairs_alternate_uturn_and_the_forwarder() {
    let server = Uturn::start();
    let out = server.bench(
        "pairs",
        &[
            "--workload",
            "small",
            "--allocations",
            "4",
            "--rate",
            "400",
            "--pairs",
            "3",
            "--pair-secs",
            "0.5",
        ],
    );
    let r: uturn_bench::pairs::PairsReport = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(
        (r.label.as_str(), r.versus.as_str()),
        ("uturn", "forwarder")
    );
    assert_eq!(r.pairs.len(), 3);
    let firsts: Vec<bool> = r.pairs.iter().map(|p| p.a_first).collect();
    assert_eq!(firsts, vec![true, false, true], "the order alternates");
    for p in &r.pairs {
        for s in [&p.a, &p.b] {
            assert!(s.sent > 0 && s.received > 0, "{s:?}");
            assert_eq!(s.received + s.lost, s.sent);
            assert!(s.server_cpu_secs.is_some(), "{s:?}");
        }
    }
    assert_eq!(r.summary.pairs, 3);
    let p99 = r.summary.p99_added_us.expect("p99 differences");
    assert!(p99.min <= p99.median && p99.median <= p99.max);
    assert!(r.summary.cpu_ratio.is_some(), "{:?}", r.summary);
    assert!(
        r.warnings.iter().any(|w| w.contains("sign test")),
        "three pairs are too few, and the report says so: {:?}",
        r.warnings
    );
}

#[test]
fn the_probe_passes_on_uturn_and_names_a_wrong_password() {
    let server = Uturn::start();
    let uri = format!("turn:{}?transport=udp", server.addr);
    let ok = bench(&["probe", &uri, "-u", "u1", "-p", "p1"]);
    let text = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(ok.status.code(), Some(0), "{text}");
    assert!(
        text.contains("Relay round trip") && text.contains("PASS"),
        "{text}"
    );
    let bad = bench(&["probe", &uri, "-u", "u1", "-p", "wrong"]);
    let text = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{text}");
    assert!(text.contains("password"), "{text}");
}

#[test]
fn the_report_merges_runs_into_a_table_and_plots() {
    let server = Uturn::start();
    let dir = std::env::temp_dir().join(format!("uturn-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let a = dir.join("uturn.json");
    let b = dir.join("baseline.json");
    bench(&[
        "run",
        "--server",
        &server.addr.to_string(),
        "--label",
        "uturn",
        "--workload",
        "small",
        "--allocations",
        "4",
        "--rate",
        "200",
        "--duration",
        "0.5",
        "--json",
        a.to_str().unwrap(),
        "-q",
    ]);
    bench(&[
        "baseline",
        "--workload",
        "small",
        "--allocations",
        "4",
        "--rate",
        "200",
        "--duration",
        "0.5",
        "--json",
        b.to_str().unwrap(),
        "-q",
    ]);
    let plots = dir.join("plots");
    let out = bench(&[
        "report",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--plots",
        plots.to_str().unwrap(),
    ]);
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(
        md.contains("| uturn | small |") && md.contains("| baseline | small |"),
        "{md}"
    );
    assert!(plots.join("latency-cdf-small.svg").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Traffic outlasts every lifetime on the server, as a long load test outlasts the real ones
/// (permission 300 s, channel 600 s): here a uturn whose allocations, permissions and channels
/// live 3 s and nonces 1 s carries an 8 s run without loss, because the generator refreshes
/// each flow every second from its own 5-tuple and renews the nonces the server calls stale.
/// Without the refreshes everything after the first 3 s would be lost. (The 2 s of margin
/// absorb a stall of a busy CI machine.)
#[test]
fn traffic_outlasting_every_lifetime_is_kept_alive_by_refreshes() {
    let config = uturn_e2e::TempConfig::new(
        "bench-short-lifetimes",
        "[auth]\nnonce_lifetime_secs = 1\n\n[relay]\nallocation_lifetime_default_secs = 3\n\
         permission_lifetime_secs = 3\nchannel_lifetime_secs = 3\n",
    );
    let server = Uturn::start_with(&["--config", config.path()]);
    for framing in ["channel", "send"] {
        let out = server.bench(
            "run",
            &[
                "--workload",
                "small",
                "--framing",
                framing,
                "--allocations",
                "4",
                "--rate",
                "400",
                "--duration",
                "8",
                "--refresh-secs",
                "1",
            ],
        );
        let r = json_report(&out);
        assert_step_sane(&r);
        let s = &r.steps[0];
        assert!(
            s.lost * 100 <= s.sent,
            "{framing}: lost {} of {}: the allocations were not kept alive",
            s.lost,
            s.sent
        );
        let refreshes = &s.refreshes;
        // 4 flows refreshed every second for about 8 s, two requests each.
        assert!(refreshes.succeeded >= 40, "{framing}: {refreshes:?}");
        assert!(refreshes.renewed_nonces > 0, "{framing}: {refreshes:?}");
        assert_eq!(refreshes.failed, 0, "{framing}: {refreshes:?}");
        assert!(
            r.warnings.iter().all(|w| !w.contains("refresh")),
            "{:?}",
            r.warnings
        );
    }
}

/// `--refresh-secs` must keep a permission alive with room for a lost round.
#[test]
fn a_refresh_period_a_permission_would_not_survive_is_refused() {
    for secs in ["0", "241"] {
        let out = Command::new(BENCH)
            .args(["run", "--server", "127.0.0.1:9", "--refresh-secs", secs])
            .stdin(Stdio::null())
            .output()
            .expect("run uturn-bench");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--refresh-secs {secs} was accepted");
        assert!(
            stderr.contains("--refresh-secs must be from 1 to 240"),
            "{stderr}"
        );
    }
}

/// Over IPv6 the harness asks for an IPv6 relay, so its peers on ::1 are reachable: the probe
/// passes and a fixed run carries its traffic, GSO sends included.
#[test]
fn the_probe_and_a_run_work_over_ipv6() {
    let server = Uturn::start_v6();
    assert!(server.addr.is_ipv6());
    let uri = format!("turn:{}?transport=udp", server.addr);
    let ok = bench(&["probe", &uri, "-u", "u1", "-p", "p1"]);
    let text = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(ok.status.code(), Some(0), "{text}");
    assert!(text.contains("[::1]"), "relayed address not IPv6: {text}");
    let out = server.bench(
        "run",
        &[
            "--workload",
            "small",
            "--allocations",
            "2",
            "--rate",
            "400",
            "--duration",
            "1",
            // Long ticks: several datagrams per client per turn, so they leave as GSO sends.
            "--tick-us",
            "10000",
        ],
    );
    let r = json_report(&out);
    assert_step_sane(&r);
    let step = &r.steps[0];
    assert!(step.gso_datagrams > 0, "no GSO send over IPv6: {step:?}");
}

/// A server reached over IPv6 that relays only from IPv4 answers the probe's Allocate with 440,
/// and the probe says what that means and what to do.
#[test]
fn the_probe_explains_a_server_without_a_relay_of_its_family() {
    let server = Uturn::start_on("::1", "127.0.0.1");
    let uri = format!("turn:{}?transport=udp", server.addr);
    let out = bench(&["probe", &uri, "-u", "u1", "-p", "p1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("no relay address of the family asked for"),
        "{text}"
    );
}
