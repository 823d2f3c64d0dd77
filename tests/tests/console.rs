//! The operator's console end to end: the relay-usage page at `/` (served public, with a strict
//! same-origin Content-Security-Policy, its data behind the token), the allocations API fields
//! the page reads, and `# HELP` text for every Prometheus family the server exports.
//!
//! The page running in a real browser during a relayed call is checked by
//! `scripts/browser-e2e.sh` (headless Chromium), which needs packages `cargo test` may not have.

use std::time::{Duration, Instant};

use uturn_e2e::{
    ANSWER_TIMEOUT, EchoPeer, HttpAnswer, TurnClient, Uturn, http_exchange, standard_args,
};

const TOKEN: &str = "console-s3cret";

fn start(extra: &[&str]) -> Uturn {
    let mut args = standard_args("mmsg", 1);
    args.extend(["--counters-interval-ms", "50"].map(str::to_owned));
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Uturn::start(&refs)
}

fn get(server: &Uturn, path: &str, token: Option<&str>) -> HttpAnswer {
    let addr = server.http.expect("the server reported an HTTP listener");
    http_exchange(addr, "GET", path, token)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The page is HTML, its policy lets nothing load or run but the page's own inline script and
/// style and fetches to its own origin, and it names no other host.
fn assert_is_the_page(answer: &HttpAnswer) {
    assert_eq!(answer.status, 200, "GET /: {}", answer.body);
    assert_eq!(
        answer.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let csp = answer
        .header("content-security-policy")
        .expect("the page is served with a Content-Security-Policy");
    for needed in [
        "default-src 'none'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(needed), "CSP {csp:?} lacks {needed}");
    }
    for part in ["script-src 'sha256-", "style-src 'sha256-"] {
        assert!(csp.contains(part), "CSP {csp:?}: inline code by hash only");
    }
    assert!(
        !csp.contains("unsafe") && !csp.contains('*') && !csp.contains("http"),
        "CSP {csp:?} allows more than this origin"
    );
    assert_eq!(answer.header("x-content-type-options"), Some("nosniff"));
    let page = &answer.body;
    assert!(
        page.starts_with("<!doctype html>"),
        "{}",
        &page[..80.min(page.len())]
    );
    assert!(page.contains("TURN relay usage"));
    // Same origin only: no absolute URL (no CDN, no font, no script from elsewhere) and no
    // protocol-relative one; what it fetches are this listener's own API routes.
    let lower = page.to_ascii_lowercase();
    for remote in [
        "http://",
        "https://",
        "src=\"//",
        "href=\"//",
        "url(",
        "@import",
    ] {
        assert!(!lower.contains(remote), "the page references {remote}");
    }
    assert!(
        !lower.contains(" src="),
        "the page loads no separate resource"
    );
    for route in ["'/api/v1/status'", "'/api/v1/allocations'"] {
        assert!(page.contains(route), "the page reads {route}");
    }
}

#[test]
fn the_relay_usage_page_is_served_at_the_root_with_a_strict_same_origin_policy() {
    let server = start(&[]);
    assert_is_the_page(&get(&server, "/", None));
    // Every other answer may load and run nothing at all.
    let status = get(&server, "/api/v1/status", None);
    assert_eq!(status.status, 200, "{}", status.body);
    assert_eq!(status.header("content-type"), Some("application/json"));
    let csp = status.header("content-security-policy").unwrap_or_default();
    assert!(csp.starts_with("default-src 'none'"), "{csp:?}");
    // The page answers GET only.
    let addr = server.http.expect("HTTP listener");
    assert_eq!(http_exchange(addr, "POST", "/", None).status, 405);
}

/// With `ops.http_token` the page itself stays public (it holds no data and asks the token when
/// the API answers 401), while what it shows does not: the API it reads answers 401 without the
/// token, and with it gives every field the page draws.
#[test]
fn with_a_token_the_page_is_public_and_its_data_needs_the_token() {
    let server = start(&["--http-token", TOKEN]);
    assert_is_the_page(&get(&server, "/", None));
    assert_is_the_page(&get(&server, "/", Some(TOKEN)));
    for path in ["/api/v1/status", "/api/v1/allocations"] {
        let refused = get(&server, path, None);
        assert_eq!(refused.status, 401, "{path} without the token");
        assert_eq!(refused.header("www-authenticate"), Some("Bearer"));
        assert_eq!(get(&server, path, Some("wrong")).status, 401, "{path}");
    }

    let status = json(&get(&server, "/api/v1/status", Some(TOKEN)).body);
    for field in ["version", "uptime_secs", "state", "listeners", "shards"] {
        assert!(!status[field].is_null(), "status lacks {field}: {status}");
    }
    assert_eq!(status["state"], "ready");
    assert_eq!(
        status["metrics"], true,
        "the page reads counters only when they are on"
    );

    // An allocation with a permission, a channel and traffic both ways.
    let peer = EchoPeer::start(false);
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    client.allocate(&[]).expect("Allocate");
    client.channel_bind(0x4000, peer.addr).expect("ChannelBind");
    client.send_channel_data(0x4000, b"console");
    assert!(client.recv_relayed(ANSWER_TIMEOUT).is_some(), "echoed");
    let deadline = Instant::now() + Duration::from_secs(10);
    let allocation = loop {
        let list = json(&get(&server, "/api/v1/allocations", Some(TOKEN)).body);
        let now = list["now"]
            .as_f64()
            .expect("the server's clock beside the list");
        let first = list["allocations"][0].clone();
        if first["to_client"]["packets"].as_u64() == Some(1) || Instant::now() >= deadline {
            break (now, first);
        }
        std::thread::park_timeout(Duration::from_millis(20));
    };
    let (now, a) = allocation;
    assert_eq!(a["username"], "alice");
    assert_eq!(a["transport"], "udp");
    assert_eq!(a["client"], client.local_addr().to_string());
    assert!(
        a["relayed"].as_array().is_some_and(|r| !r.is_empty()),
        "{a}"
    );
    let created = a["created"].as_f64().expect("created");
    let expires = a["expires"].as_f64().expect("expires");
    assert!(created <= now && now < expires, "{created} {now} {expires}");
    assert_eq!(a["permissions"][0]["peer"], peer.addr.ip().to_string());
    assert!(
        a["permissions"][0]["expires"]
            .as_f64()
            .is_some_and(|e| e > now)
    );
    assert_eq!(a["channels"][0]["channel"], 0x4000);
    assert_eq!(a["channels"][0]["peer"], peer.addr.to_string());
    assert!(
        a["channels"][0]["expires"]
            .as_f64()
            .is_some_and(|e| e > now)
    );
    for direction in ["to_peer", "to_client"] {
        assert_eq!(a[direction]["packets"], 1, "{direction}: {a}");
        assert_eq!(a[direction]["bytes"], 7, "{direction}: {a}");
    }
}

/// Every family on `/metrics` is described: each `# TYPE NAME` line has a `# HELP NAME` line,
/// after traffic that creates the families registered only when first used (request codes,
/// the lifetime histogram, refused HTTP requests).
#[test]
fn every_prometheus_family_has_help_text() {
    let server = start(&["--http-token", TOKEN]);
    let peer = EchoPeer::start(false);
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    client.allocate(&[]).expect("Allocate");
    client.channel_bind(0x4000, peer.addr).expect("ChannelBind");
    client.send_channel_data(0x4000, b"help");
    assert!(client.recv_relayed(ANSWER_TIMEOUT).is_some(), "echoed");
    client.refresh(0).expect("Refresh 0 ends the allocation");
    // A refused request (no token) for uturn_http_requests_refused_total.
    assert_eq!(get(&server, "/metrics", None).status, 401);

    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let scrape = get(&server, "/metrics", Some(TOKEN));
        assert_eq!(scrape.status, 200, "{}", scrape.body);
        let done = scrape
            .body
            .contains("uturn_allocation_lifetime_seconds_count 1");
        if done || Instant::now() >= deadline {
            break scrape.body;
        }
        std::thread::park_timeout(Duration::from_millis(20));
    };
    let typed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let helped: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| {
            let (name, help) = l.split_once(' ')?;
            (!help.trim().is_empty()).then_some(name)
        })
        .collect();
    for family in [
        "uturn_requests_total",
        "uturn_allocation_lifetime_seconds",
        "uturn_http_requests_refused_total",
        "uturn_relayed_bytes_total",
        "uturn_allocations",
    ] {
        assert!(typed.contains(&family), "{family} not exported:\n{text}");
    }
    let undescribed: Vec<&&str> = typed.iter().filter(|n| !helped.contains(n)).collect();
    assert!(
        undescribed.is_empty(),
        "families without # HELP: {undescribed:?}"
    );
}
