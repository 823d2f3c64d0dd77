//! The admin listener under abuse, end to end: idle-connection floods cost no threads and let
//! `/healthz` through, slow request heads are cut at `ops.http_header_timeout_ms`, the cap on
//! open connections closes the oldest idle one, framing that a proxy could read differently is
//! refused before anything runs, oversized heads and bodies are refused, and a request a web
//! page could send (no `X-Uturn-Admin`, or a foreign `Host`) cannot drain the server.
//!
//! Every server here runs the recvmmsg backend: io_uring's kernel workers are threads of the
//! process too, and would blur the thread counts these tests read.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use uturn_e2e::{ANSWER_TIMEOUT, TempConfig, Uturn, metric_sum, parse_metrics, standard_args};

/// How many idle connections the flood tests open (the 9,215 scaled to what a test
/// machine's descriptor limit allows next to other tests).
const FLOOD: usize = 1500;

/// How long a test waits for the server to close or release something.
const SETTLE: Duration = Duration::from_secs(15);

fn start(extra: &[&str]) -> Uturn {
    let mut args = standard_args("mmsg", 1);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Uturn::start(&refs)
}

fn start_with_ops(name: &str, ops: &str, extra: &[&str]) -> (Uturn, TempConfig) {
    let config = TempConfig::new(
        name,
        &format!("[auth]\nrealm = \"e2e.test\"\n[ops]\n{ops}\n"),
    );
    let mut args = vec!["--config", config.path()];
    args.extend_from_slice(extra);
    (start(&args), config)
}

/// A field of /proc/PID/status (`Threads`, `VmRSS` in kB).
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn threads(server: &Uturn) -> u64 {
    proc_status(server.pid(), "Threads")
}

fn open_fds(server: &Uturn) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
        .expect("list fds")
        .count()
}

/// Polls `value` until `done` holds or [`SETTLE`] passes; returns the last value.
fn settle<T: Copy>(mut value: impl FnMut() -> T, done: impl Fn(T) -> bool) -> T {
    let deadline = Instant::now() + SETTLE;
    loop {
        let v = value();
        if done(v) || Instant::now() >= deadline {
            return v;
        }
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

/// Raises this process's soft descriptor limit to `want` (or the hard limit), so the floods
/// below and the other tests of this binary fit.
fn raise_fd_limit(want: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let current = limit.current.unwrap_or(u64::MAX);
    if current >= want {
        return;
    }
    let target = limit.maximum.map_or(want, |hard| hard.min(want));
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        },
    )
    .expect("raise the soft RLIMIT_NOFILE");
    assert!(
        target >= want,
        "the hard descriptor limit {target} is below the {want} this test needs"
    );
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, ANSWER_TIMEOUT).expect("connect");
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .expect("read timeout");
    stream
}

/// Sends `bytes` on a new connection and reads the answer until the server closes; returns the
/// status and the body.
fn raw(addr: SocketAddr, bytes: &[u8]) -> (u16, String) {
    let mut stream = connect(addr);
    stream.write_all(bytes).expect("send request");
    let mut answer = Vec::new();
    // The server may close with request bytes unread (it refused before the body): then the
    // read can end in a reset after the answer arrived.
    if let Err(e) = stream.read_to_end(&mut answer) {
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "read answer: {e}");
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// Whether the server has closed `stream`, waiting at most `within` (a bounded read).
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).expect("read timeout");
    let mut byte = [0u8; 256];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn readyz(server: &Uturn) -> (u16, String) {
    server.http("GET", "/readyz", None)
}

fn metric(server: &Uturn, token: Option<&str>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (status, body) = server.http("GET", "/metrics", token);
    assert_eq!(status, 200, "{body}");
    metric_sum(&parse_metrics(&body), name, labels)
}

/// The flood: thousands of idle connections made a thread each and held their memory.
/// Now they add no thread, `/healthz` answers while they are open (the cap closes the oldest
/// idle ones to make room), and the descriptors return once the clients leave.
#[test]
fn idle_connections_add_no_threads_and_health_checks_still_answer() {
    raise_fd_limit(8192);
    let server = start(&[]);
    let addr = server.http.expect("HTTP listener");
    assert_eq!(server.http("GET", "/healthz", None).0, 200);
    let (threads_before, fds_before) = (threads(&server), open_fds(&server));
    let rss_before = proc_status(server.pid(), "VmRSS");

    let mut idle: Vec<TcpStream> = (0..FLOOD).map(|_| connect(addr)).collect();
    // Each connection over the cap (1024 by default) closes the oldest idle one: when the
    // one the last connect pushed out is closed, the server has taken every connection in.
    assert!(
        closed_within(&mut idle[FLOOD - 1024 - 1], SETTLE),
        "the cap did not close the oldest idle connections"
    );
    let fds_during = open_fds(&server);
    let threads_during = threads(&server);
    let rss_during = proc_status(server.pid(), "VmRSS");
    let (status, body) = server.http("GET", "/healthz", None);
    assert_eq!(
        (status, body.as_str()),
        (200, "ok\n"),
        "health while flooded"
    );
    let evicted = metric(
        &server,
        None,
        "uturn_http_connections_dropped_total",
        &[("reason", "over_cap_evicted")],
    );
    eprintln!(
        "{FLOOD} idle connections: threads {threads_before} -> {threads_during}, fds \
         {fds_before} -> {fds_during}, VmRSS {rss_before} kB -> {rss_during} kB, evicted by \
         the cap {evicted}"
    );
    assert_eq!(
        threads_during, threads_before,
        "idle connections must not add threads"
    );
    // The default cap (1024) holds that many; the rest were closed oldest first.
    assert!(
        fds_during <= fds_before + 1024 + 2,
        "{fds_during} fds with {FLOOD} idle connections (cap 1024)"
    );
    assert!(
        evicted >= (FLOOD - 1024) as f64,
        "{evicted} connections evicted over the cap"
    );

    drop(idle);
    let fds_after = settle(|| open_fds(&server), |n| n <= fds_before);
    let rss_after = proc_status(server.pid(), "VmRSS");
    eprintln!(
        "after the clients left: fds {fds_after} (before {fds_before}), VmRSS {rss_after} kB \
         (before {rss_before} kB, during {rss_during} kB), threads {}",
        threads(&server)
    );
    assert!(
        fds_after <= fds_before,
        "descriptors not returned: {fds_after} > {fds_before}"
    );
    assert_eq!(threads(&server), threads_before);
    assert_eq!(server.http("GET", "/healthz", None).0, 200);

    // A second flood reuses what the first left allocated: memory is bounded by the cap, not
    // by how often the listener is flooded (reported, not asserted: the allocator decides).
    let mut again: Vec<TcpStream> = (0..FLOOD).map(|_| connect(addr)).collect();
    assert!(closed_within(&mut again[FLOOD - 1024 - 1], SETTLE));
    eprintln!(
        "second flood: VmRSS {} kB, threads {}",
        proc_status(server.pid(), "VmRSS"),
        threads(&server)
    );
    assert_eq!(threads(&server), threads_before);
    drop(again);
    let fds_after = settle(|| open_fds(&server), |n| n <= fds_before);
    assert!(fds_after <= fds_before, "{fds_after} > {fds_before}");
}

/// `ops.http_max_connections`: beyond it the oldest connection that never sent a request is
/// closed for the new one, so the newest survive and the server holds no more than the cap.
#[test]
fn the_connection_cap_closes_the_oldest_idle_connections_first() {
    raise_fd_limit(8192);
    let (server, _config) = start_with_ops("admin-cap", "http_max_connections = 16", &[]);
    let addr = server.http.expect("HTTP listener");
    let fds_before = open_fds(&server);
    let mut idle: Vec<TcpStream> = (0..100).map(|_| connect(addr)).collect();
    let oldest_closed = closed_within(&mut idle[0], SETTLE);
    // Connection i closes connection i - 16: the 100th pushes out the 84th.
    let all_taken = closed_within(&mut idle[83], SETTLE);
    let fds_during = open_fds(&server);
    assert!(all_taken, "the 84th connection is still open");
    assert!(
        oldest_closed,
        "the oldest idle connection stays open over the cap"
    );
    assert!(
        fds_during <= fds_before + 16,
        "{fds_during} fds with a cap of 16 (before {fds_before})"
    );
    let newest = idle.last_mut().expect("connections");
    assert!(
        !closed_within(newest, Duration::from_millis(200)),
        "the newest connection was closed"
    );
    // A request still gets through: it takes the place of an idle connection.
    assert_eq!(server.http("GET", "/healthz", None).0, 200);
    let evicted = metric(
        &server,
        None,
        "uturn_http_connections_dropped_total",
        &[("reason", "over_cap_evicted")],
    );
    assert!(evicted >= 84.0, "{evicted} evicted of 100 over a cap of 16");
}

/// A client that never finishes its request head (slowloris) is cut at
/// `ops.http_header_timeout_ms`, whether it sends nothing, half a head, or a byte at a time;
/// a declared body that does not arrive in that time again is answered 408.
#[test]
fn slow_request_heads_are_cut_at_the_header_timeout() {
    let (server, _config) = start_with_ops("admin-slow", "http_header_timeout_ms = 300", &[]);
    let addr = server.http.expect("HTTP listener");

    let started = Instant::now();
    let mut silent = connect(addr);
    let mut half = connect(addr);
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .expect("send half a head");
    assert!(closed_within(&mut silent, SETTLE), "silent connection kept");
    assert!(closed_within(&mut half, SETTLE), "half a head kept");
    eprintln!(
        "silent and half-head connections closed after {:?} (timeout 300 ms)",
        started.elapsed()
    );

    // One byte every 50 ms never completes a head: the timeout counts from the connection, not
    // from the last byte. Bounded: 400 bytes (20 s) at most.
    let mut trickle = connect(addr);
    let head = b"GET /healthz HTTP/1.1\r\nX-Slow: ".iter().copied();
    let mut cut = false;
    for byte in head.chain(std::iter::repeat(b'a')).take(400) {
        if trickle.write_all(&[byte]).is_err()
            || closed_within(&mut trickle, Duration::from_millis(50))
        {
            cut = true;
            break;
        }
    }
    assert!(cut, "a head sent a byte at a time was never cut");

    // A body that never arrives is given the same time again, then answered 408 (not run).
    let mut stalled = connect(addr);
    stalled
        .set_read_timeout(Some(SETTLE))
        .expect("read timeout");
    let request = format!(
        "POST /api/v1/drain HTTP/1.1\r\nHost: {addr}\r\nX-Uturn-Admin: 1\r\nContent-Length: 10\r\n\r\nabc"
    );
    stalled.write_all(request.as_bytes()).expect("send");
    let mut answer = String::new();
    stalled
        .read_to_string(&mut answer)
        .expect("answer then close");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(
        readyz(&server),
        (200, "ready\n".into()),
        "a stalled drain ran"
    );
    let timeouts = metric(
        &server,
        None,
        "uturn_http_connections_dropped_total",
        &[("reason", "header_timeout")],
    );
    assert!(timeouts >= 3.0, "{timeouts} header timeouts counted");
    assert_eq!(server.http("GET", "/healthz", None).0, 200);
}

/// A page in a browser on the same host can send a "simple" cross-site POST (no custom
/// headers, `Content-Type: text/plain`), or rebind its own name to 127.0.0.1; neither may drain
/// the server. With `X-Uturn-Admin: 1` (curl, scripts) or the bearer token it works.
#[test]
fn a_cross_site_post_cannot_drain_the_server() {
    let server = start(&[]);
    let addr = server.http.expect("HTTP listener");
    let simple = format!(
        "POST /api/v1/drain HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://attacker.example\r\n\
         Sec-Fetch-Site: cross-site\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n\r\n"
    );
    let (status, body) = raw(addr, simple.as_bytes());
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("X-Uturn-Admin"), "{body}");
    let delete = format!("DELETE /api/v1/allocations/1 HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    assert_eq!(raw(addr, delete.as_bytes()).0, 403);
    let reload =
        format!("POST /api/v1/reload HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(raw(addr, reload.as_bytes()).0, 403);
    // DNS rebinding: the page's own name now points at 127.0.0.1, so it is same-origin and may
    // add headers, but its Host is not loopback.
    let rebound = format!(
        "POST /api/v1/drain HTTP/1.1\r\nHost: attacker.example:{}\r\nX-Uturn-Admin: 1\r\n\
         Content-Length: 0\r\n\r\n",
        addr.port()
    );
    let (status, body) = raw(addr, rebound.as_bytes());
    assert_eq!(status, 421, "{body}");
    assert_eq!(
        readyz(&server),
        (200, "ready\n".into()),
        "drained by a web page"
    );
    let (_, status_body) = server.http("GET", "/api/v1/status", None);
    assert!(status_body.contains("\"state\":\"ready\""), "{status_body}");

    let allowed = format!(
        "POST /api/v1/drain HTTP/1.1\r\nHost: {addr}\r\nX-Uturn-Admin: 1\r\nContent-Length: 0\r\n\r\n"
    );
    let (status, body) = raw(addr, allowed.as_bytes());
    assert_eq!((status, body.trim()), (200, "{\"draining\":true}"));
    assert_eq!(readyz(&server), (503, "draining\n".into()));
    let refused = metric(
        &server,
        None,
        "uturn_http_requests_refused_total",
        &[("reason", "admin_header")],
    );
    assert!(refused >= 3.0, "{refused}");
    drop(server);

    // With a token the token is what a page cannot send; no further header is needed.
    let server = start(&["--http-token", "s3cret"]);
    let addr = server.http.expect("HTTP listener");
    let with_token = format!(
        "POST /api/v1/drain HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer s3cret\r\n\
         Content-Length: 0\r\n\r\n"
    );
    assert_eq!(raw(addr, with_token.as_bytes()).0, 200);
    assert_eq!(readyz(&server).0, 503);
    let without = format!(
        "POST /api/v1/drain?off HTTP/1.1\r\nHost: {addr}\r\nX-Uturn-Admin: 1\r\nContent-Length: 0\r\n\r\n"
    );
    assert_eq!(raw(addr, without.as_bytes()).0, 401);
    assert_eq!(readyz(&server).0, 503, "undrained without the token");
}

/// RFC 9112 §6.1/§6.3: Content-Length beside Transfer-Encoding, repeated lengths and codings
/// other than `chunked` are the material of request smuggling; each is answered 400 and the
/// request (drain here) does not run. Heads and bodies over the limits are refused (431, 413).
#[test]
fn ambiguous_framing_and_oversized_requests_are_refused_and_not_executed() {
    let server = start(&[]);
    let addr = server.http.expect("HTTP listener");
    let drain = |headers: &str, body: &str| {
        format!(
            "POST /api/v1/drain HTTP/1.1\r\nHost: {addr}\r\nX-Uturn-Admin: 1\r\n{headers}\r\n{body}"
        )
    };
    let cases = [
        (
            "Content-Length and Transfer-Encoding",
            drain(
                "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
        ),
        (
            "Transfer-Encoding then Content-Length",
            drain(
                "Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
                "0\r\n\r\n",
            ),
        ),
        (
            "two equal Content-Length lines",
            drain("Content-Length: 0\r\nContent-Length: 0\r\n", ""),
        ),
        (
            "two differing Content-Length lines",
            drain("Content-Length: 0\r\nContent-Length: 2\r\n", "xx"),
        ),
        (
            "a listed Content-Length",
            drain("Content-Length: 0, 0\r\n", ""),
        ),
        (
            "a coding before chunked",
            drain("Transfer-Encoding: gzip, chunked\r\n", "0\r\n\r\n"),
        ),
        (
            "a coding that is not chunked",
            drain("Transfer-Encoding: identity\r\n", ""),
        ),
        (
            "two Transfer-Encoding lines",
            drain(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
        ),
        (
            "a malformed chunked body",
            drain("Transfer-Encoding: chunked\r\n", "zz\r\n\r\n"),
        ),
    ];
    for (what, request) in &cases {
        let (status, body) = raw(addr, request.as_bytes());
        assert_eq!(status, 400, "{what}: {body}");
        assert_eq!(
            readyz(&server),
            (200, "ready\n".into()),
            "{what} drained the server"
        );
    }

    let big_header = drain(
        &format!(
            "X-Padding: {}\r\nContent-Length: 0\r\n",
            "a".repeat(10 * 1024)
        ),
        "",
    );
    assert_eq!(raw(addr, big_header.as_bytes()).0, 431, "a 10 KiB header");
    let many: String = (0..100).map(|i| format!("X-H{i}: 1\r\n")).collect();
    let many_headers = drain(&format!("{many}Content-Length: 0\r\n"), "");
    assert_eq!(
        raw(addr, many_headers.as_bytes()).0,
        431,
        "100 header lines"
    );
    let declared = drain("Content-Length: 1000000\r\n", "");
    assert_eq!(
        raw(addr, declared.as_bytes()).0,
        413,
        "a 1 MB declared body"
    );
    let chunk = format!("{:x}\r\n{}\r\n", 8192, "b".repeat(8192));
    let chunked = drain(
        "Transfer-Encoding: chunked\r\n",
        &format!("{chunk}{chunk}{chunk}0\r\n\r\n"),
    );
    assert_eq!(
        raw(addr, chunked.as_bytes()).0,
        413,
        "a 24 KiB chunked body"
    );
    assert_eq!(readyz(&server), (200, "ready\n".into()));

    // Well-formed framing still works, chunked included.
    let ok = drain("Transfer-Encoding: chunked\r\n", "3\r\nabc\r\n0\r\n\r\n");
    assert_eq!(raw(addr, ok.as_bytes()).0, 200);
    assert_eq!(readyz(&server), (503, "draining\n".into()));
    // hyper refuses some of these itself (differing lengths, a final coding that is not
    // chunked) before the listener's own check sees them: counted as malformed connections.
    let framing = metric(
        &server,
        None,
        "uturn_http_requests_refused_total",
        &[("reason", "framing")],
    ) + metric(
        &server,
        None,
        "uturn_http_connections_dropped_total",
        &[("reason", "malformed")],
    );
    assert!(
        framing >= cases.len() as f64,
        "{framing} framing refusals counted for {} cases",
        cases.len()
    );
}

/// With a token, an unauthenticated flood costs one bounded request head per connection: no
/// thread, a 401, and the connection is closed.
#[test]
fn with_a_token_an_unauthenticated_flood_makes_no_threads() {
    raise_fd_limit(8192);
    let server = start(&["--http-token", "s3cret"]);
    let addr = server.http.expect("HTTP listener");
    let threads_before = threads(&server);
    let fds_before = open_fds(&server);
    let idle: Vec<TcpStream> = (0..500).map(|_| connect(addr)).collect();
    let mut unauthenticated: Vec<TcpStream> = (0..500)
        .map(|_| {
            let mut stream = connect(addr);
            let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n");
            stream.write_all(request.as_bytes()).expect("send");
            stream
        })
        .collect();
    let threads_during = threads(&server);
    for stream in &mut unauthenticated {
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .expect("answer then close");
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    }
    let (status, _) = server.http("GET", "/metrics", Some("s3cret"));
    assert_eq!(status, 200, "the token still works during the flood");
    eprintln!(
        "500 idle and 500 unauthenticated connections: threads {threads_before} -> \
         {threads_during}, fds {fds_before} -> {}",
        open_fds(&server)
    );
    assert_eq!(threads_during, threads_before);
    assert_eq!(threads(&server), threads_before);
    let refused = metric(
        &server,
        Some("s3cret"),
        "uturn_http_requests_refused_total",
        &[("reason", "unauthorized")],
    );
    assert!(refused >= 500.0, "{refused} unauthorized requests counted");
    drop(idle);
    let fds_after = settle(|| open_fds(&server), |n| n <= fds_before);
    assert!(fds_after <= fds_before, "{fds_after} > {fds_before}");
}
