//! Operations end to end: `/metrics` while traffic flows, the allocations API and DELETE,
//! reload (SIGHUP and the API), drain (the API and SIGUSR1), the bearer token, and the Grafana
//! dashboard against what the server exports.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use uturn_e2e::{
    ANSWER_TIMEOUT, EchoPeer, Relayed, TempConfig, TurnClient, Uturn, standard_args, uturn_binary,
};

/// How long a test waits for published counters (shards publish every 50 ms here).
const COUNTERS_TIMEOUT: Duration = Duration::from_secs(10);

fn start(backend: &str, extra: &[&str]) -> Uturn {
    let mut args = standard_args(backend, 2);
    args.extend(["--counters-interval-ms", "50"].map(str::to_owned));
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Uturn::start(&refs)
}

/// A new Allocate to a draining `server` is answered 300 (Try Alternate) naming `alternate`.
fn assert_redirected_to(server: &Uturn, alternate: SocketAddr) {
    let mut redirected = TurnClient::new(server.listener(false), "alice", "wonderland");
    let response = redirected.request(
        uturn_proto::Method::ALLOCATE,
        &[uturn_proto::Attribute::RequestedTransport(
            uturn_proto::Protocol::UDP,
        )],
    );
    assert_eq!(response.error_code(), Some(300));
    assert_eq!(
        response.message().alternate_server().unwrap(),
        Some(alternate)
    );
}

/// Sends `payloads` on channel 0x4000 and checks that each comes back through the echo peer.
fn echo_through(client: &mut TurnClient, payloads: &[Vec<u8>]) {
    for payload in payloads {
        client.send_channel_data(0x4000, payload);
        let echoed = client
            .recv_relayed(ANSWER_TIMEOUT)
            .expect("the echo comes back through the relay");
        assert_eq!(
            echoed,
            Relayed::ChannelData {
                channel: 0x4000,
                payload: payload.clone()
            }
        );
    }
}

fn payloads(count: usize, len: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| (0..len).map(|j| ((i + j) % 251) as u8).collect())
        .collect()
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// During traffic the relayed packet and byte counters move by exactly what was sent, each
/// way; the gauges follow allocations, permissions and channels, and return to zero after the
/// allocation ends.
fn metrics_count_exactly_what_was_relayed(backend: &str) {
    let server = start(backend, &[]);
    let peer = EchoPeer::start(false);
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    client.allocate(&[]).expect("Allocate");
    client.channel_bind(0x4000, peer.addr).expect("ChannelBind");

    let (count, len) = (25usize, 173usize);
    echo_through(&mut client, &payloads(count, len));
    let (packets, bytes) = (count as f64, (count * len) as f64);
    for direction in ["to_peer", "to_client"] {
        let labels = [("direction", direction), ("transport", "udp")];
        let seen = server.wait_metric(
            "uturn_relayed_packets_total",
            &labels,
            packets,
            COUNTERS_TIMEOUT,
        );
        assert_eq!(seen, packets, "{direction} packets");
        let seen = server.wait_metric(
            "uturn_relayed_bytes_total",
            &labels,
            bytes,
            COUNTERS_TIMEOUT,
        );
        assert_eq!(seen, bytes, "{direction} bytes");
    }
    // The per-shard view sums to the same packets.
    let shard = server.wait_metric(
        "uturn_shard_relayed_packets_total",
        &[("direction", "to_peer")],
        packets,
        COUNTERS_TIMEOUT,
    );
    assert_eq!(shard, packets);
    assert_eq!(
        server.wait_metric("uturn_allocations", &[], 1.0, COUNTERS_TIMEOUT),
        1.0
    );
    assert_eq!(
        server.wait_metric("uturn_permissions", &[], 1.0, COUNTERS_TIMEOUT),
        1.0
    );
    assert_eq!(
        server.wait_metric("uturn_channels", &[], 1.0, COUNTERS_TIMEOUT),
        1.0
    );
    let metrics = server.metrics();
    let allocate_ok = uturn_e2e::metric_sum(
        &metrics,
        "uturn_requests_total",
        &[("method", "Allocate"), ("code", "200")],
    );
    let challenged = uturn_e2e::metric_sum(
        &metrics,
        "uturn_requests_total",
        &[("method", "Allocate"), ("code", "401")],
    );
    assert_eq!((allocate_ok, challenged), (1.0, 1.0));

    client.refresh(0).expect("Refresh with LIFETIME 0 deletes");
    for gauge in ["uturn_allocations", "uturn_permissions", "uturn_channels"] {
        assert_eq!(
            server.wait_metric(gauge, &[], 0.0, COUNTERS_TIMEOUT),
            0.0,
            "{gauge}"
        );
    }
    assert_eq!(
        server.wait_metric(
            "uturn_allocation_lifetime_seconds_count",
            &[],
            1.0,
            COUNTERS_TIMEOUT
        ),
        1.0
    );
    // Nothing moved after the end: still exactly what was sent.
    let labels = [("direction", "to_peer"), ("transport", "udp")];
    assert_eq!(
        server.metric_sum("uturn_relayed_packets_total", &labels),
        packets
    );
}

#[test]
fn metrics_count_exactly_what_was_relayed_uring() {
    metrics_count_exactly_what_was_relayed("uring");
}

#[test]
fn metrics_count_exactly_what_was_relayed_mmsg() {
    metrics_count_exactly_what_was_relayed("mmsg");
}

/// A wrong password is counted as `bad_integrity` and logged with what to fix.
#[test]
fn a_wrong_password_is_counted_and_explained() {
    let server = start("mmsg", &[]);
    let mut client = TurnClient::new(server.listener(false), "alice", "not-the-password");
    assert_eq!(client.allocate(&[]).map(|_| ()), Err(401));
    let failures = server.wait_metric(
        "uturn_auth_failures_total",
        &[("reason", "bad_integrity")],
        1.0,
        COUNTERS_TIMEOUT,
    );
    assert_eq!(failures, 1.0);
    let log = server.log();
    assert!(
        log.contains("user 'alice' failed MESSAGE-INTEGRITY: the password configured on the client differs from uturn's"),
        "{log}"
    );
}

/// The relay-usage view: a live allocation with its permissions, channels and counters,
/// filtered by user and client; DELETE ends it and relaying stops; it is then forgotten.
#[test]
fn the_allocations_api_shows_and_ends_a_live_allocation() {
    let server = start("uring", &[]);
    let peer = EchoPeer::start(false);
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    let allocation = client.allocate(&[]).expect("Allocate");
    client.channel_bind(0x4000, peer.addr).expect("ChannelBind");
    echo_through(&mut client, &payloads(7, 100));

    // Counters reach the API with the next report.
    let deadline = Instant::now() + COUNTERS_TIMEOUT;
    let entry = loop {
        let (status, body) = server.http("GET", "/api/v1/allocations?user=alice", None);
        assert_eq!(status, 200, "{body}");
        let list = json(&body)["allocations"].clone();
        assert_eq!(list.as_array().map(Vec::len), Some(1), "{body}");
        let entry = list[0].clone();
        if entry["to_client"]["packets"] == 7 || Instant::now() >= deadline {
            break entry;
        }
        std::thread::park_timeout(Duration::from_millis(20));
    };
    assert_eq!(entry["username"], "alice");
    assert_eq!(entry["transport"], "udp");
    assert_eq!(entry["client"], client.local_addr().to_string());
    assert_eq!(entry["relayed"][0], allocation.relayed[0].to_string());
    assert_eq!(entry["permissions"][0]["peer"], peer.addr.ip().to_string());
    assert_eq!(entry["channels"][0]["channel"], 0x4000);
    assert_eq!(entry["channels"][0]["peer"], peer.addr.to_string());
    assert_eq!(entry["to_peer"]["packets"], 7);
    assert_eq!(entry["to_peer"]["bytes"], 700);
    assert_eq!(entry["to_client"]["packets"], 7);
    assert_eq!(entry["to_client"]["bytes"], 700);
    assert_eq!(entry["requests"], 2, "Allocate and ChannelBind");
    assert_eq!(entry["errors"], 0);
    assert!(entry["expires"].as_f64() > entry["created"].as_f64());

    // Filters.
    let filtered = |query: &str| {
        let (_, body) = server.http("GET", &format!("/api/v1/allocations?{query}"), None);
        json(&body)["allocations"].as_array().map_or(0, Vec::len)
    };
    assert_eq!(filtered("user=bob"), 0);
    assert_eq!(filtered(&format!("client={}", client.local_addr().ip())), 1);
    assert_eq!(filtered(&format!("client={}", client.local_addr())), 1);
    assert_eq!(filtered("client=192.0.2.1"), 0);

    let id = entry["id"].as_u64().expect("numeric id");
    let (status, body) = server.http("DELETE", &format!("/api/v1/allocations/{id}"), None);
    assert_eq!(status, 200, "{body}");
    let (_, body) = server.http("GET", "/api/v1/allocations", None);
    assert_eq!(json(&body)["allocations"].as_array().map(Vec::len), Some(0));
    let (status, _) = server.http("DELETE", &format!("/api/v1/allocations/{id}"), None);
    assert_eq!(status, 404);

    // Relaying has stopped: the peer sees nothing more.
    let before = peer.seen().len();
    client.send_channel_data(0x4000, b"after delete");
    assert!(client.recv_relayed(Duration::from_millis(400)).is_none());
    assert_eq!(peer.seen().len(), before);
    assert!(server.log().contains("allocation ended by an operator"));
}

/// `--no-metrics` (for measuring what metrics cost): `/metrics` answers 404 and the server
/// relays as usual.
#[test]
fn with_metrics_off_the_exporter_is_gone_and_relaying_goes_on() {
    let server = start("mmsg", &["--no-metrics"]);
    let (status, body) = server.http("GET", "/metrics", None);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("metrics are off"), "{body}");
    let peer = EchoPeer::start(false);
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    client.allocate(&[]).expect("Allocate");
    client.channel_bind(0x4000, peer.addr).expect("ChannelBind");
    echo_through(&mut client, &payloads(3, 50));
}

/// SIGHUP reloads the users file: a user added can allocate; a broken file is refused, the old
/// users keep working; the live allocation relays throughout.
#[test]
fn sighup_reloads_users_and_refuses_a_broken_file() {
    let config = TempConfig::new("ops-reload", "");
    let users = config.sibling("users");
    std::fs::write(&users, "carol:first\n").unwrap();
    config.write(&format!(
        "[auth]\nrealm = \"e2e.test\"\nusers_file = \"{}\"\n",
        users.display()
    ));
    let server = start("mmsg", &["--config", config.path()]);
    let peer = EchoPeer::start(false);
    let mut live = TurnClient::new(server.listener(false), "carol", "first");
    live.allocate(&[]).expect("carol allocates");
    live.channel_bind(0x4000, peer.addr).unwrap();
    echo_through(&mut live, &payloads(3, 50));
    assert_eq!(
        TurnClient::new(server.listener(false), "dave", "second")
            .allocate(&[])
            .map(|_| ()),
        Err(401),
        "dave is not a user yet"
    );

    std::fs::write(&users, "carol:first\ndave:second\n").unwrap();
    server.signal("HUP");
    // The reload is asynchronous: retry (bounded) until dave is accepted.
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let accepted = loop {
        let mut dave = TurnClient::new(server.listener(false), "dave", "second");
        match dave.allocate(&[]) {
            Ok(_) => break true,
            Err(_) if Instant::now() < deadline => {
                std::thread::park_timeout(Duration::from_millis(50));
            }
            Err(_) => break false,
        }
    };
    assert!(
        accepted,
        "dave allocates after SIGHUP; log:\n{}",
        server.log()
    );
    echo_through(&mut live, &payloads(3, 50));

    // A broken file is refused (through the API, which returns the reason), old users stay.
    std::fs::write(&users, "carol:first\nthis line has no separator\n").unwrap();
    let (status, body) = server.http("POST", "/api/v1/reload", None);
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("line 2"), "the reason names the line: {body}");
    server.signal("HUP");
    let mut dave_again = TurnClient::new(server.listener(false), "dave", "second");
    dave_again.allocate(&[]).expect("old users still work");
    echo_through(&mut live, &payloads(3, 50));
    let refused = server.wait_metric(
        "uturn_reloads_total",
        &[("result", "refused")],
        2.0,
        COUNTERS_TIMEOUT,
    );
    assert_eq!(refused, 2.0);
    assert!(server.log().contains("reload refused"));
}

/// Drain: new Allocates get 508 (no alternate) or 300 with ALTERNATE-SERVER; existing
/// allocations keep relaying; /readyz says draining.
#[test]
fn draining_refuses_new_allocations_and_keeps_existing_ones() {
    let server = start("uring", &[]);
    let peer = EchoPeer::start(false);
    let mut live = TurnClient::new(server.listener(false), "alice", "wonderland");
    live.allocate(&[]).unwrap();
    live.channel_bind(0x4000, peer.addr).unwrap();
    assert_eq!(server.http("GET", "/readyz", None), (200, "ready\n".into()));

    let (status, _) = server.http("POST", "/api/v1/drain", None);
    assert_eq!(status, 200);
    assert_eq!(
        server.http("GET", "/readyz", None),
        (503, "draining\n".into())
    );
    let mut newcomer = TurnClient::new(server.listener(false), "alice", "wonderland");
    assert_eq!(newcomer.allocate(&[]).map(|_| ()), Err(508));
    echo_through(&mut live, &payloads(5, 60));
    live.refresh(600)
        .expect("existing allocations can still refresh");

    // SIGUSR1 with an alternate configured: 300 and ALTERNATE-SERVER.
    let alternate: SocketAddr = "127.0.0.1:3479".parse().unwrap();
    let second = start("mmsg", &["--alternate-server", "127.0.0.1:3479"]);
    second.signal("USR1");
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    while second.http("GET", "/readyz", None).0 != 503 && Instant::now() < deadline {
        std::thread::park_timeout(Duration::from_millis(20));
    }
    assert_redirected_to(&second, alternate);
}

/// With a token, every route but the health checks needs it; a non-loopback listener without
/// one is refused at start-up with a clear error.
#[test]
fn the_bearer_token_is_enforced() {
    let server = start("mmsg", &["--http-token", "s3cret"]);
    assert_eq!(server.http("GET", "/metrics", None).0, 401);
    assert_eq!(server.http("GET", "/api/v1/status", Some("wrong")).0, 401);
    assert_eq!(server.http("POST", "/api/v1/drain", None).0, 401);
    assert_eq!(server.http("GET", "/healthz", None).0, 200);
    assert_eq!(server.http("GET", "/readyz", None).0, 200);
    assert_eq!(server.http("GET", "/metrics", Some("s3cret")).0, 200);
    let (status, body) = server.http("GET", "/api/v1/status", Some("s3cret"));
    assert_eq!(status, 200);
    let status = json(&body);
    assert_eq!(status["shards"], 2);
    assert_eq!(status["state"], "ready");
    // Two bare `--listen ADDR:PORT` flags: each is a UDP and a TCP listener.
    assert_eq!(status["listeners"].as_array().map(Vec::len), Some(4));

    let output = Command::new(uturn_binary())
        .args(["--listen", "127.0.0.1:0", "--relay-ip", "127.0.0.1"])
        .args(["--user", "a:b", "--http", "0.0.0.0:0"])
        .stdin(Stdio::null())
        .output()
        .expect("run uturn");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("ops.http_listen") && stderr.contains("http_token"),
        "{stderr}"
    );
}

/// An HTTP port already in use is a clear start-up error, not a server without metrics.
#[test]
fn a_taken_http_port_is_a_clear_start_up_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a TCP port");
    let addr = taken.local_addr().unwrap().to_string();
    let output = Command::new(uturn_binary())
        .args(["--listen", "127.0.0.1:0", "--relay-ip", "127.0.0.1"])
        .args(["--user", "a:b", "--http", &addr])
        .stdin(Stdio::null())
        .output()
        .expect("run uturn");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen for HTTP on {addr}")) && stderr.contains("--http"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("uturn is ready"), "{stdout}");
}

/// Every metric the Grafana dashboard queries is one uturn exports.
#[test]
fn the_dashboard_queries_only_exported_metrics() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/grafana/uturn-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("read the dashboard");
    let dashboard = json(&text);
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 6, "the dashboard has panels with queries");
    let queried: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();

    // A server that has seen an allocation live and end exports every family.
    let server = start("mmsg", &[]);
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    client.allocate(&[]).unwrap();
    client.refresh(0).unwrap();
    server.wait_metric(
        "uturn_allocation_lifetime_seconds_count",
        &[],
        1.0,
        COUNTERS_TIMEOUT,
    );
    let (_, body) = server.http("GET", "/metrics", None);
    let exported: BTreeSet<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let missing: Vec<&String> = queried
        .iter()
        .filter(|name| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            !exported.contains(*name) && !exported.contains(base)
        })
        .collect();
    assert!(queried.len() >= 6, "{queried:?}");
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Identifiers starting with `uturn_` in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(offset) = expr[i..].find("uturn_") {
        let start = i + offset;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            names.push(expr[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// The systemd unit starts uturn with flags the binary has.
#[test]
fn the_systemd_unit_uses_real_flags() {
    let unit = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/deploy/uturn.service"),
    )
    .expect("read the unit");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let help = Command::new(uturn_binary())
        .arg("--help")
        .output()
        .expect("uturn --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in exec.split_whitespace().filter(|w| w.starts_with("--")) {
        assert!(help.contains(flag), "{flag} is not a uturn flag");
    }
    assert!(unit.contains("AmbientCapabilities=CAP_NET_BIND_SERVICE"));
    assert!(unit.contains("User=uturn"));
}

/// `--log-format json` writes one JSON object per line.
#[test]
fn json_logs_are_one_object_per_line() {
    let server = start("mmsg", &["--log-format", "json"]);
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    client.allocate(&[]).unwrap();
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    while !server.log().contains("allocation created") && Instant::now() < deadline {
        std::thread::park_timeout(Duration::from_millis(20));
    }
    let log = server.log();
    let created = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(json)
        .find(|line| line["fields"]["message"] == "allocation created")
        .unwrap_or_else(|| panic!("no allocation line in {log}"));
    assert_eq!(created["fields"]["user"], "alice");
    assert_eq!(created["fields"]["client"], client.local_addr().to_string());
}

/// A reload applies `ops.alternate_servers` (so an operator can name them just before a
/// drain), and names what only a restart applies, again on every reload until the restart: the
/// running configuration is not overwritten with values that do not run.
#[test]
fn a_reload_applies_alternate_servers_and_keeps_naming_what_needs_a_restart() {
    let config = TempConfig::new("ops-restart-needed", "");
    let write = |alternates: &str, total: u32| {
        config.write(&format!(
            "[auth]\nrealm = \"e2e.test\"\n[limits]\nallocations_total = {total}\n\
             [ops]\nalternate_servers = [{alternates}]\n"
        ));
    };
    write("", 1000);
    let server = start("mmsg", &["--config", config.path()]);
    let (status, body) = server.http("POST", "/api/v1/reload", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        json(&body)["restart_needed"],
        serde_json::json!([]),
        "{body}"
    );

    write("\"127.0.0.1:3480\"", 500);
    for reload in 1..=2 {
        let (status, body) = server.http("POST", "/api/v1/reload", None);
        assert_eq!(status, 200, "{body}");
        let reply = json(&body);
        assert!(
            reply["reloaded"]
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v == "alternate_servers")),
            "reload {reload}: {body}"
        );
        assert_eq!(
            reply["restart_needed"],
            serde_json::json!(["limits"]),
            "reload {reload}: {body}"
        );
    }

    let (status, _) = server.http("POST", "/api/v1/drain", None);
    assert_eq!(status, 200);
    assert_redirected_to(&server, "127.0.0.1:3480".parse().unwrap());
}

/// A reload applies a new log level from the config file.
#[test]
fn a_reload_applies_the_log_level() {
    let config = TempConfig::new("ops-loglevel", "");
    let write = |level: &str| {
        config.write(&format!(
            "[auth]\nrealm = \"e2e.test\"\n[ops]\nlog_level = \"{level}\"\n"
        ));
    };
    write("info");
    let server = start("mmsg", &["--config", config.path()]);
    write("warn");
    let (status, body) = server.http("POST", "/api/v1/reload", None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("log_level"), "{body}");
    let mut quiet = TurnClient::new(server.listener(false), "alice", "wonderland");
    quiet.allocate(&[]).unwrap();
    let mut loud = TurnClient::new(server.listener(false), "alice", "wrong");
    assert_eq!(loud.allocate(&[]).map(|_| ()), Err(401));
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    while !server.log().contains("failed MESSAGE-INTEGRITY") && Instant::now() < deadline {
        std::thread::park_timeout(Duration::from_millis(20));
    }
    let log = server.log();
    assert!(
        log.contains("failed MESSAGE-INTEGRITY"),
        "warnings still logged: {log}"
    );
    let quiet_line = format!("client={}", quiet.local_addr());
    assert!(
        !log.lines()
            .any(|l| l.contains("allocation created") && l.contains(&quiet_line)),
        "info lines are filtered after the reload: {log}"
    );
}
