//! Soak: the real `uturn` under churn and audio-like load for a given time, then a check that
//! it returned to rest. `scripts/soak.sh` runs it (30 minutes by default, 60 s in CI).
//!
//! ```sh
//! cargo build --release -p uturn-control --bin uturn
//! UTURN_BIN=target/release/uturn cargo run --release -p uturn-e2e --example soak -- [SECONDS]
//! ```
//!
//! Workloads, all on loopback (this is uturn's own small load loop: the bench crate's CLI is
//! not on this branch yet):
//! - **audio**: `AUDIO_CLIENTS` long-lived allocations, each sending a 160-byte payload every
//!   20 ms (G.711 at 50 packets per second) on a channel to an echo peer and refreshing every
//!   2 s;
//! - **churn**: allocations opened, used for a few round trips and then either deleted
//!   (LIFETIME 0) or abandoned to expire, `CHURN_PER_SEC` a second.
//!
//! Allocations live 6 s unless refreshed (config below), so everything drains quickly at the
//! end. Passes when: (1) every allocation is gone (`uturn_allocations` is 0) within 15 s of
//! the load stopping; (2) no unexpected error counter moved (drops for malformed, truncated,
//! queue_full, send_error, peer_denied, rate-limited input; error responses other than the
//! 401 challenges); (3) resident memory after the drain is within 5% of its level after a
//! warm-up cycle (one round of the same load, drained), the "starting level": the first cycle
//! sizes hash tables and allocator arenas, which is growth by design, not a leak.
#![allow(clippy::print_stdout, unreachable_pub)]

use std::time::{Duration, Instant};

use uturn_e2e::{EchoPeer, Relayed, TurnClient, Uturn, standard_args};

const AUDIO_CLIENTS: usize = 20;
const CHURN_PER_SEC: usize = 10;
const PAYLOAD: [u8; 160] = [0x55; 160];

fn main() {
    let seconds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1800);
    let dir = std::env::temp_dir().join(format!("uturn-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("uturn.toml");
    std::fs::write(
        &config,
        "[relay]\nallocation_lifetime_default_secs = 6\nallocation_lifetime_max_secs = 6\n",
    )
    .expect("config");
    // Its own relay range: audio clients plus churned allocations waiting to expire need more
    // ports than the harness's default slice.
    let mut args = uturn_e2e::with_relay_ports(standard_args("uring", 2), "17000-18999");
    args.extend(
        [
            "--config",
            config.to_str().expect("utf-8 path"),
            "--counters-interval-ms",
            "200",
        ]
        .map(str::to_owned),
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Uturn::start(&refs);
    let peer = EchoPeer::start(false);

    // Warm-up: one short cycle of the same load, drained; its resident memory is the baseline.
    // Twenty seconds: longer than an abandoned allocation lives, so the concurrency of the
    // steady state (and the table sizes it needs) is reached before the baseline is taken.
    run_load(&server, &peer, Duration::from_secs(20.min(seconds)));
    assert!(drained(&server), "warm-up allocations did not expire");
    let baseline = rss_kib(server.pid());
    println!("baseline RSS after warm-up: {baseline} KiB");

    let (round_trips, churned) = run_load(&server, &peer, Duration::from_secs(seconds));
    let peak = rss_kib(server.pid());
    assert!(drained(&server), "allocations did not all expire");
    let after = rss_kib(server.pid());
    println!(
        "load: {seconds} s, {round_trips} audio round trips, {churned} churned allocations; \
         RSS peak {peak} KiB, after drain {after} KiB"
    );

    let mut failures = Vec::new();
    for reason in [
        "malformed",
        "truncated",
        "queue_full",
        "send_error",
        "peer_denied",
        "rate_limited",
        "auth_rate_limited",
        "family_mismatch",
        "bandwidth",
    ] {
        let n = server.metric_sum("uturn_dropped_packets_total", &[("reason", reason)]);
        if n > 0.0 {
            failures.push(format!("{n} drops for {reason}"));
        }
    }
    for code in ["400", "403", "437", "438", "486", "500", "508"] {
        let n = server.metric_sum("uturn_requests_total", &[("code", code)]);
        if n > 0.0 {
            failures.push(format!("{n} responses {code}"));
        }
    }
    #[allow(clippy::cast_precision_loss)]
    let growth = (after as f64 - baseline as f64) / baseline as f64;
    println!("RSS growth over the baseline: {:.2}%", growth * 100.0);
    if growth > 0.05 {
        failures.push(format!(
            "resident memory {after} KiB is {:.1}% above the baseline {baseline} KiB",
            growth * 100.0
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    if failures.is_empty() {
        println!("soak passed");
    } else {
        for failure in &failures {
            println!("FAIL: {failure}");
        }
        std::process::exit(1);
    }
}

/// Runs both workloads for `duration`; returns (audio round trips, churned allocations).
fn run_load(server: &Uturn, peer: &EchoPeer, duration: Duration) -> (u64, u64) {
    let addr = server.listener(false);
    let mut audio: Vec<TurnClient> = (0..AUDIO_CLIENTS)
        .map(|_| {
            let mut client = TurnClient::new(addr, "alice", "wonderland");
            client.allocate(&[]).expect("audio allocation");
            client.channel_bind(0x4000, peer.addr).expect("channel");
            client
        })
        .collect();
    let start = Instant::now();
    let (mut round_trips, mut churned) = (0u64, 0u64);
    let mut next_refresh = start + Duration::from_secs(2);
    let mut next_churn = start;
    while start.elapsed() < duration {
        let tick = Instant::now();
        for client in &mut audio {
            client.send_channel_data(0x4000, &PAYLOAD);
        }
        for client in &mut audio {
            if let Some(Relayed::ChannelData { .. }) =
                client.recv_relayed(Duration::from_millis(50))
            {
                round_trips += 1;
            }
        }
        if Instant::now() >= next_refresh {
            for client in &mut audio {
                client.refresh(6).expect("audio refresh");
            }
            next_refresh += Duration::from_secs(2);
        }
        while Instant::now() >= next_churn {
            let mut client = TurnClient::new(addr, "alice", "wonderland");
            client.allocate(&[]).expect("churn allocation");
            client
                .channel_bind(0x4001, peer.addr)
                .expect("churn channel");
            client.send_channel_data(0x4001, &PAYLOAD);
            let _ = client.recv_relayed(Duration::from_millis(50));
            if churned % 2 == 0 {
                client.refresh(0).expect("delete");
            } // else: abandoned, expires after 6 s.
            churned += 1;
            next_churn += Duration::from_millis(1000 / CHURN_PER_SEC as u64);
        }
        // 20 ms packetisation.
        if let Some(rest) = Duration::from_millis(20).checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    // Audio clients stop refreshing: their allocations expire too.
    drop(audio);
    (round_trips, churned)
}

/// Waits (at most 15 s) until no allocation is left.
fn drained(server: &Uturn) -> bool {
    server.wait_metric("uturn_allocations", &[], 0.0, Duration::from_secs(15)) == 0.0
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
