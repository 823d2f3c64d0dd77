//! End-to-end harness for uturn: starts the real `uturn` binary on loopback and talks to it as a
//! TURN client would.
//!
//! Data flow in a test: [`Uturn::start`] builds (once per test process) and spawns the binary
//! with the test's flags, reads its standard output until the line `uturn is ready`, and learns
//! the listener addresses the OS gave it (`--listen 127.0.0.1:0`) and the HTTP listener's
//! (`listening on http ADDR`; the harness passes `--http 127.0.0.1:0` unless the test gives
//! `--http`). A [`TurnClient`] then runs
//! the RFC 8656 exchanges over a UDP socket, building and parsing every message with
//! `uturn-proto`; an [`EchoPeer`] plays the remote peer and sends back what it receives.
//!
//! Nothing here sleeps for a fixed time: every wait is a receive with a deadline, and every loop
//! is bounded in count and time. All traffic stays on 127.0.0.1 and ::1.
#![forbid(unsafe_code)]

pub mod netns;

use std::cell::RefCell;
use std::io::{BufRead as _, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uturn_proto::{
    Attribute, ChannelData, ChannelNumber, Class, ErrorCode, Message, MessageBuilder, Method,
    PacketKind, Protocol, TransactionId, classify, frame_len, long_term_key_md5,
    write_channel_data,
};

/// How long a test waits for any single answer before it calls the answer lost.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// The two data-plane backends every end-to-end test runs on.
pub const BACKENDS: [&str; 2] = ["uring", "mmsg"];

/// A running `uturn` process, killed when dropped.
pub struct Uturn {
    child: Child,
    /// The UDP listener addresses the server reported, in the order of `--listen`.
    pub listeners: Vec<SocketAddr>,
    /// The TCP listeners it reported (`tcp`, `tls` or `auto`, and the address).
    pub stream_listeners: Vec<(String, SocketAddr)>,
    /// Everything the server printed on standard output before it was ready.
    pub banner: Vec<String>,
    /// The HTTP listener (metrics, health, admin API) the server reported.
    pub http: Option<SocketAddr>,
    stderr_log: Arc<Mutex<String>>,
    stderr_thread: Option<JoinHandle<()>>,
}

impl Uturn {
    /// Starts `uturn` with `args` and waits (at most 30 s) until it prints `uturn is ready`.
    ///
    /// # Panics
    ///
    /// When the binary cannot be built or started, or exits before it is ready: the test
    /// cannot go on, and the panic message carries the server's log.
    pub fn start(args: &[&str]) -> Self {
        Self::start_command(Command::new(uturn_binary()), args)
    }

    /// Like [`Uturn::start`], inside the network namespace `netns` (`ip netns exec`, which
    /// execs the binary, so the child is uturn itself). The HTTP listener is then in that
    /// namespace too: reach it from a thread there ([`netns::Topology::run_in`]).
    pub fn start_in_netns(netns: &str, args: &[&str]) -> Self {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", netns]).arg(uturn_binary());
        Self::start_command(command, args)
    }

    fn start_command(mut command: Command, args: &[&str]) -> Self {
        let mut args: Vec<&str> = args.to_vec();
        // Tests run in parallel: never the default HTTP port.
        if !args.contains(&"--http") {
            args.extend(["--http", "127.0.0.1:0"]);
        }
        let mut child = command
            .args(&args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", uturn_binary().display()));
        let stderr_log = Arc::new(Mutex::new(String::new()));
        let stderr_thread = child
            .stderr
            .take()
            .map(|stderr| spawn_log_collector(stderr, Arc::clone(&stderr_log)));
        let stdout = child.stdout.take().expect("stdout was piped");
        // Read stdout on its own thread so the wait below has a deadline even if the server
        // hangs before printing anything; the thread then keeps draining the pipe, so the
        // server never blocks on a full pipe.
        let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = line_tx.send(line);
            }
        });
        let mut listeners = Vec::new();
        let mut http = None;
        let mut stream_listeners = Vec::new();
        let mut banner = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = line_rx.recv_timeout(remaining) else {
                let _ = child.kill();
                let status = child.wait().ok();
                let log = stderr_log.lock().map(|l| l.clone()).unwrap_or_default();
                panic!("uturn was not ready within 30 s ({status:?}); its log:\n{log}");
            };
            if let Some(addr) = line.strip_prefix("listening on udp ") {
                listeners.push(addr.trim().parse().expect("listener address"));
            }
            if let Some(addr) = line.strip_prefix("listening on http ") {
                http = Some(addr.trim().parse().expect("HTTP listener address"));
            }
            for kind in ["tcp", "tls", "auto"] {
                if let Some(addr) = line.strip_prefix(&format!("listening on {kind} ")) {
                    let addr = addr.trim().parse().expect("listener address");
                    stream_listeners.push((kind.to_owned(), addr));
                }
            }
            if line.trim() == "uturn is ready" {
                break;
            }
            banner.push(line);
        }
        Self {
            child,
            listeners,
            stream_listeners,
            banner,
            http,
            stderr_log,
            stderr_thread,
        }
    }

    /// The first listener of the given family.
    ///
    /// # Panics
    ///
    /// When the server has no listener of that family (a bug in the test's arguments).
    pub fn listener(&self, ipv6: bool) -> SocketAddr {
        *self
            .listeners
            .iter()
            .find(|a| a.is_ipv6() == ipv6)
            .expect("a listener of that family")
    }

    /// The first TCP listener of `kind` (`tcp`, `tls`, `auto`) and family.
    ///
    /// # Panics
    ///
    /// When there is none (a bug in the test's arguments).
    pub fn stream_listener(&self, kind: &str, ipv6: bool) -> SocketAddr {
        self.stream_listeners
            .iter()
            .find(|(k, a)| k == kind && a.is_ipv6() == ipv6)
            .map(|(_, a)| *a)
            .expect("a stream listener of that kind and family")
    }

    /// Waits (bounded by `timeout`) until the server's log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::park_timeout(Duration::from_millis(10));
        }
    }

    /// The process id (to send it signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`HUP`, `USR1`, ...) to the server.
    ///
    /// # Panics
    ///
    /// When `kill` cannot be run.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// One HTTP/1.1 request to the server's HTTP listener; returns the status and body.
    ///
    /// # Panics
    ///
    /// When the server has no HTTP listener or does not answer within [`ANSWER_TIMEOUT`].
    pub fn http(&self, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
        let addr = self.http.expect("the server reported an HTTP listener");
        http_request(addr, method, path, token)
    }

    /// `/metrics` parsed into `name{labels}` → value (see [`parse_metrics`]).
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let (status, body) = self.http("GET", "/metrics", None);
        assert_eq!(status, 200, "GET /metrics: {body}");
        parse_metrics(&body)
    }

    /// The sum of every sample of metric `name` whose labels contain all of `labels`
    /// (`("direction", "to_peer")`, ...).
    pub fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics(), name, labels)
    }

    /// Polls `/metrics` until `metric_sum(name, labels) == expected` or `timeout` passes;
    /// returns the last value seen.
    pub fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        expected: f64,
        timeout: Duration,
    ) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.metric_sum(name, labels);
            if (value - expected).abs() < f64::EPSILON || Instant::now() >= deadline {
                return value;
            }
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }

    /// What the server has written to standard error so far.
    pub fn log(&self) -> String {
        self.stderr_log
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    /// Sends SIGTERM and waits (bounded) for the exit status; `None` if it had to be killed.
    pub fn terminate(mut self) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::park_timeout(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Uturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
    }
}

/// One HTTP/1.1 request with `Connection: close` and the `X-Uturn-Admin` header the admin API
/// wants on state-changing requests without a token; returns the status and body.
///
/// # Panics
///
/// When the server does not answer within [`ANSWER_TIMEOUT`] or answers something that is not
/// HTTP.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let answer = http_exchange(addr, method, path, token);
    (answer.status, answer.body)
}

/// An HTTP answer: status, header lines (names lower-cased, in order) and body.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    /// The status code.
    pub status: u16,
    /// `(name, value)` per header line, the name lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body as text.
    pub body: String,
}

impl HttpAnswer {
    /// The value of the first header line called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// [`http_request`] with the answer's header lines.
///
/// # Panics
///
/// As [`http_request`].
pub fn http_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> HttpAnswer {
    use std::io::Write as _;
    let mut stream = TcpStream::connect_timeout(&addr, ANSWER_TIMEOUT).expect("connect to HTTP");
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .expect("set read timeout");
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    // What a state-changing request needs without a token (GET ignores it).
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}X-Uturn-Admin: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).expect("send request");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("read HTTP response");
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head and body");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("HTTP status code");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    HttpAnswer {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// Prometheus text format into `(name{labels}, value)` pairs (comments skipped).
pub fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum over the samples of `name` whose labels include every `(key, value)` of `labels`.
pub fn metric_sum(samples: &[(String, f64)], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series.as_str(), ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v)
        .sum()
}

fn spawn_log_collector(mut stderr: ChildStderr, log: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut l) = log.lock() {
                l.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    })
}

/// The `uturn` binary under test: `$UTURN_BIN`, or the workspace's own, built once per test
/// process with the same profile as the tests (a no-op when it is up to date, as it is under
/// `cargo test --workspace`, which builds it for `uturn-control`'s tests).
pub fn uturn_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("UTURN_BIN") {
            return PathBuf::from(bin);
        }
        // The test executable lives in <target>/<profile>/deps/.
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("<target>/<profile>/deps layout")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("<target> dir").to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        // `cargo test` sets CARGO_MANIFEST_DIR for the test process; a nested build that
        // inherits it looks to ring's build script like a changed environment, and rebuilds
        // ring and everything above it (about 40 s), and the next plain build again.
        build
            .env_remove("CARGO_MANIFEST_DIR")
            .args(["build", "--quiet", "-p", "uturn-control", "--bin", "uturn"])
            .arg("--target-dir")
            .arg(&target_dir);
        if release {
            build.arg("--release");
        }
        let status = build
            .status()
            .expect("run cargo build for the uturn binary");
        assert!(status.success(), "cargo build --bin uturn failed");
        profile_dir.join("uturn")
    })
    .clone()
}

/// A configuration file for `--config` in a directory of its own under the system's temp
/// directory; dropping it removes the directory and whatever the test put beside the file
/// (a users file), also when the test panics.
pub struct TempConfig {
    dir: PathBuf,
    path: PathBuf,
}

impl TempConfig {
    /// Writes `text` to `uturn.toml` in a new directory named after `name`, the process and a
    /// counter, so tests running in parallel never share one.
    ///
    /// # Panics
    ///
    /// When the directory or the file cannot be written, or the temp directory's path is
    /// not UTF-8 (the path goes on a command line).
    pub fn new(name: &str, text: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("uturn-e2e-{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let path = dir.join("uturn.toml");
        assert!(path.to_str().is_some(), "{} is not UTF-8", path.display());
        let config = Self { dir, path };
        config.write(text);
        config
    }

    /// The file's path, for `--config`.
    pub fn path(&self) -> &str {
        self.path.to_str().unwrap_or_default()
    }

    /// Replaces the file's contents (before a reload).
    ///
    /// # Panics
    ///
    /// When the file cannot be written.
    pub fn write(&self, text: &str) {
        std::fs::write(&self.path, text)
            .unwrap_or_else(|e| panic!("write {}: {e}", self.path.display()));
    }

    /// A path beside the file, removed with it.
    pub fn sibling(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A response (or indication) received by a [`TurnClient`], owned.
#[derive(Debug, Clone)]
pub struct Received {
    bytes: Vec<u8>,
}

impl Received {
    /// The parsed message.
    ///
    /// # Panics
    ///
    /// When the server sent a malformed STUN message, which is a test failure.
    pub fn message(&self) -> Message<'_> {
        Message::parse(&self.bytes).expect("the server sends well-formed STUN")
    }

    /// The ERROR-CODE number of an error response, `None` for a success.
    pub fn error_code(&self) -> Option<u16> {
        let msg = self.message();
        match msg.class() {
            Class::ErrorResponse => msg.error_code().ok().flatten().map(|e| e.code.0),
            _ => None,
        }
    }
}

/// What a client receives from the relay besides responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relayed {
    /// A ChannelData message.
    ChannelData {
        /// The channel number.
        channel: u16,
        /// The application data.
        payload: Vec<u8>,
    },
    /// A Data indication.
    Data {
        /// XOR-PEER-ADDRESS: who sent it.
        peer: SocketAddr,
        /// The DATA attribute.
        payload: Vec<u8>,
    },
}

/// The result of a successful Allocate.
#[derive(Debug, Clone)]
pub struct Allocation {
    /// Every XOR-RELAYED-ADDRESS (two for a dual-stack allocation).
    pub relayed: Vec<SocketAddr>,
    /// XOR-MAPPED-ADDRESS: the client's address as the server saw it.
    pub mapped: SocketAddr,
    /// LIFETIME granted, in seconds.
    pub lifetime_secs: u32,
    /// RESERVATION-TOKEN, when EVEN-PORT asked for one.
    pub reservation_token: Option<[u8; 8]>,
}

/// How a [`TurnClient`] reaches the server.
enum Link {
    Udp(UdpSocket),
    /// TCP or TLS: the stream, and bytes read but not yet framed.
    Stream {
        stream: RefCell<Box<dyn StreamIo>>,
        buffer: RefCell<Vec<u8>>,
    },
}

/// A TCP or TLS byte stream with a read timeout.
pub trait StreamIo: Read + Write + Send {
    /// Sets the read timeout of the underlying socket.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
    /// Shuts down both directions of the underlying socket.
    fn shutdown(&self);
}

impl StreamIo for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        Self::set_read_timeout(self, timeout)
    }
    fn shutdown(&self) {
        let _ = Self::shutdown(self, std::net::Shutdown::Both);
    }
}

impl StreamIo for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.sock.set_read_timeout(timeout)
    }
    fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

/// A self-signed certificate for `localhost`, 127.0.0.1 and ::1, written as PEM files, and a
/// rustls client configuration that trusts it.
pub struct TestCertificate {
    /// Certificate PEM file.
    pub cert_path: PathBuf,
    /// Private key PEM file.
    pub key_path: PathBuf,
    /// Trusts exactly this certificate; offers ALPN `stun.turn`.
    pub client_config: Arc<rustls::ClientConfig>,
    dir: PathBuf,
}

impl TestCertificate {
    /// Generates a fresh key pair and certificate (rcgen) in a new temporary directory.
    ///
    /// # Panics
    ///
    /// When generation or writing fails: the test cannot go on.
    pub fn generate() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        let certified = rcgen::generate_simple_self_signed(names).expect("rcgen certificate");
        let dir = std::env::temp_dir().join(format!(
            "uturn-e2e-tls-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create certificate directory");
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        std::fs::write(&cert_path, certified.cert.pem()).expect("write certificate");
        std::fs::write(&key_path, certified.signing_key.serialize_pem()).expect("write key");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(certified.cert.der().clone())
            .expect("trust the test certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        client_config.alpn_protocols = vec![b"stun.turn".to_vec()];
        Self {
            cert_path,
            key_path,
            client_config: Arc::new(client_config),
            dir,
        }
    }

    /// The same trust, restricted to one TLS version (`rustls::version::TLS12` or `TLS13`).
    pub fn client_config_for(
        &self,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .expect("protocol version")
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"stun.turn".to_vec()];
        Arc::new(config)
    }

    fn roots(&self) -> rustls::RootCertStore {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.cert_path).expect("read certificate") {
            roots
                .add(cert.expect("valid PEM"))
                .expect("trust the test certificate");
        }
        roots
    }
}

impl Drop for TestCertificate {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TURN client over UDP, TCP or TLS with long-term credentials.
pub struct TurnClient {
    link: Link,
    local: SocketAddr,
    server: SocketAddr,
    username: String,
    password: String,
    realm: Option<String>,
    nonce: Option<String>,
    key: Option<[u8; 16]>,
    next_tid: u64,
    /// Relayed data that arrived while the client waited for a response.
    pending: Vec<Relayed>,
}

impl TurnClient {
    /// A client on a fresh loopback socket of the server's family.
    pub fn new(server: SocketAddr, username: &str, password: &str) -> Self {
        Self::new_on(loopback(server.is_ipv6()), server, username, password)
    }

    /// A client on a UDP socket bound to `local` (an address in a test's network namespace
    /// rather than loopback).
    pub fn new_on(local: SocketAddr, server: SocketAddr, username: &str, password: &str) -> Self {
        let socket = UdpSocket::bind(local).expect("bind client socket");
        socket
            .connect(server)
            .expect("connect client socket to the server");
        let local = socket.local_addr().expect("client socket address");
        Self::with_link(Link::Udp(socket), local, server, username, password)
    }

    /// A client over a TCP connection to `server` (RFC 8656 §3.1).
    pub fn new_tcp(server: SocketAddr, username: &str, password: &str) -> Self {
        let stream = TcpStream::connect_timeout(&server, ANSWER_TIMEOUT).expect("connect TCP");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let local = stream.local_addr().expect("client address");
        Self::with_link(
            Self::stream_link(Box::new(stream)),
            local,
            server,
            username,
            password,
        )
    }

    /// A client over TLS to `server`, trusting what `config` trusts; the handshake completes
    /// before this returns.
    pub fn new_tls(
        server: SocketAddr,
        username: &str,
        password: &str,
        config: Arc<rustls::ClientConfig>,
    ) -> Self {
        let stream = TcpStream::connect_timeout(&server, ANSWER_TIMEOUT).expect("connect TCP");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        stream
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .expect("read timeout");
        let local = stream.local_addr().expect("client address");
        let name = rustls::pki_types::ServerName::from(server.ip());
        let connection = rustls::ClientConnection::new(config, name).expect("TLS client");
        let mut tls = rustls::StreamOwned::new(connection, stream);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .expect("TLS handshake with the server");
        }
        Self::with_link(
            Self::stream_link(Box::new(tls)),
            local,
            server,
            username,
            password,
        )
    }

    fn stream_link(stream: Box<dyn StreamIo>) -> Link {
        Link::Stream {
            stream: RefCell::new(stream),
            buffer: RefCell::new(Vec::new()),
        }
    }

    fn with_link(
        link: Link,
        local: SocketAddr,
        server: SocketAddr,
        username: &str,
        password: &str,
    ) -> Self {
        Self {
            link,
            local,
            server,
            username: username.to_owned(),
            password: password.to_owned(),
            realm: None,
            nonce: None,
            key: None,
            next_tid: 1,
            pending: Vec::new(),
        }
    }

    /// The client's own address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Whether the client talks over TCP or TLS.
    pub fn is_stream(&self) -> bool {
        matches!(self.link, Link::Stream { .. })
    }

    /// Writes `bytes` to the server: one datagram, or bytes on the stream.
    fn send_bytes(&self, bytes: &[u8]) {
        match &self.link {
            Link::Udp(socket) => {
                socket.send(bytes).expect("send datagram");
            }
            Link::Stream { stream, .. } => {
                let mut stream = stream.borrow_mut();
                stream.write_all(bytes).expect("write to the stream");
                stream.flush().expect("flush the stream");
            }
        }
    }

    /// Writes `bytes` in pieces of `chunk` bytes, flushing each (stream clients), so the
    /// server receives them split across reads.
    pub fn send_in_pieces(&self, bytes: &[u8], chunk: usize) {
        for piece in bytes.chunks(chunk.max(1)) {
            self.send_bytes(piece);
            if self.is_stream() {
                // Give the server a chance to read each piece on its own; bounded and tiny.
                std::thread::yield_now();
            }
        }
    }

    /// Closes a stream client's connection (both directions).
    pub fn close(&self) {
        if let Link::Stream { stream, .. } = &self.link {
            stream.borrow().shutdown();
        }
    }

    /// The server this client talks to.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    fn fresh_tid(&mut self) -> TransactionId {
        self.next_tid += 1;
        let mut id = [0u8; 12];
        id[..8].copy_from_slice(&self.next_tid.to_be_bytes());
        id[8..].copy_from_slice(&std::process::id().to_be_bytes());
        TransactionId(id)
    }

    /// Sends a request with `attrs`, authenticated when the client knows realm and nonce, and
    /// returns the response. A 401 or 438 challenge is answered once, with the new nonce.
    ///
    /// # Panics
    ///
    /// When no response arrives within [`ANSWER_TIMEOUT`] (after retransmissions).
    pub fn request(&mut self, method: Method, attrs: &[Attribute<'_>]) -> Received {
        for _ in 0..3 {
            let tid = self.fresh_tid();
            let bytes = self.build_request(method, tid, attrs);
            let response = self.transact(tid, &bytes);
            let code = response.error_code();
            if code == Some(401) || code == Some(438) {
                let msg = response.message();
                let realm = msg.realm().ok().flatten().map(str::to_owned);
                let nonce = msg.nonce().ok().flatten().map(str::to_owned);
                // A 401 to a request that already carried integrity means wrong credentials
                // (the server may issue a fresh nonce with it): hand it to the test instead of
                // looping.
                if code == Some(401) && self.key.is_some() {
                    return response;
                }
                if let (Some(realm), Some(nonce)) = (realm, nonce) {
                    self.key = Some(
                        long_term_key_md5(&self.username, &realm, &self.password)
                            .expect("test credentials are valid OpaqueString"),
                    );
                    self.realm = Some(realm);
                    self.nonce = Some(nonce);
                    continue;
                }
            }
            return response;
        }
        panic!("server kept challenging a {method:?} request");
    }

    /// Builds a request; public so tests can send variations (retransmissions, raw bytes).
    pub fn build_request(
        &self,
        method: Method,
        tid: TransactionId,
        attrs: &[Attribute<'_>],
    ) -> Vec<u8> {
        let mut buf = vec![0u8; 1500];
        let mut b = MessageBuilder::new(&mut buf, Class::Request, method, tid);
        for a in attrs {
            b.attribute(a).expect("request fits in 1500 bytes");
        }
        if let (Some(realm), Some(nonce), Some(key)) = (&self.realm, &self.nonce, &self.key) {
            b.attribute(&Attribute::Username(&self.username))
                .and_then(|b| b.attribute(&Attribute::Realm(realm)))
                .and_then(|b| b.attribute(&Attribute::Nonce(nonce)))
                .and_then(|b| b.message_integrity(key))
                .expect("credentials fit");
        }
        b.fingerprint().expect("fingerprint fits");
        let len = b.finish();
        buf.truncate(len);
        buf
    }

    /// Sends `bytes` (retransmitting on the RFC 8489 schedule from 500 ms) until a response
    /// with transaction id `tid` arrives.
    ///
    /// # Panics
    ///
    /// When none arrives within [`ANSWER_TIMEOUT`].
    pub fn transact(&mut self, tid: TransactionId, bytes: &[u8]) -> Received {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        // RFC 8489 §6.2.1: "RTO SHOULD be greater than 500 ms". A shorter one makes a loaded
        // machine retransmit, and the server then counts the request twice.
        let mut rto = Duration::from_millis(500);
        let mut sent = false;
        while Instant::now() < deadline {
            // A stream is reliable: send once, wait the whole time (RFC 8489 §6.2.2).
            if !(sent && self.is_stream()) {
                self.send_bytes(bytes);
                sent = true;
            }
            let resend_at = (Instant::now() + rto).min(deadline);
            while let Some(datagram) = self.recv_raw_until(resend_at) {
                match classify(&datagram) {
                    PacketKind::Stun => {
                        let Ok(msg) = Message::parse(&datagram) else {
                            continue;
                        };
                        if msg.transaction_id() == tid
                            && matches!(msg.class(), Class::SuccessResponse | Class::ErrorResponse)
                        {
                            return Received { bytes: datagram };
                        }
                        if let Some(r) = to_relayed(&datagram) {
                            self.pending.push(r);
                        }
                    }
                    _ => {
                        if let Some(r) = to_relayed(&datagram) {
                            self.pending.push(r);
                        }
                    }
                }
            }
            rto *= 2;
        }
        panic!("no response from {} within {ANSWER_TIMEOUT:?}", self.server);
    }

    fn recv_raw_until(&self, deadline: Instant) -> Option<Vec<u8>> {
        match &self.link {
            Link::Udp(socket) => {
                let now = Instant::now();
                if now >= deadline {
                    return None;
                }
                socket
                    .set_read_timeout(Some(deadline - now))
                    .expect("set read timeout");
                let mut buf = vec![0u8; 65536];
                match socket.recv(&mut buf) {
                    Ok(n) => {
                        buf.truncate(n);
                        Some(buf)
                    }
                    Err(_) => None,
                }
            }
            Link::Stream { stream, buffer } => {
                let mut buffer = buffer.borrow_mut();
                let mut stream = stream.borrow_mut();
                // Bounded: each pass either returns or reads (with the deadline as timeout).
                for _ in 0..100_000 {
                    match frame_len(&buffer) {
                        Ok(Some(len)) if buffer.len() >= len => {
                            let frame: Vec<u8> = buffer.drain(..len).collect();
                            if classify(&frame) == PacketKind::ChannelData {
                                // RFC 8656 §12.5: over TCP/TLS ChannelData is padded to 4.
                                assert_eq!(frame.len() % 4, 0, "ChannelData frame is padded");
                                let payload_len =
                                    usize::from(u16::from_be_bytes([frame[2], frame[3]]));
                                assert!(
                                    frame[4 + payload_len..].iter().all(|b| *b == 0),
                                    "padding bytes are zero"
                                );
                            }
                            return Some(frame);
                        }
                        Ok(_) => {}
                        Err(e) => panic!("the server sent a bad stream: {e:?}"),
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return None;
                    }
                    stream
                        .set_read_timeout(Some(deadline - now))
                        .expect("set read timeout");
                    let mut chunk = [0u8; 16384];
                    match stream.read(&mut chunk) {
                        Ok(0) => return None,
                        Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        Err(_) => return None,
                    }
                }
                None
            }
        }
    }

    /// Whether the server closed the stream within `timeout` (reads until EOF or an error,
    /// discarding frames).
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let Link::Stream { stream, .. } = &self.link else {
            return false;
        };
        let deadline = Instant::now() + timeout;
        let mut stream = stream.borrow_mut();
        let mut chunk = [0u8; 4096];
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .is_err()
            {
                return true;
            }
            match stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return true,
            }
        }
        false
    }

    /// Allocate with REQUESTED-TRANSPORT UDP and `extra` attributes; `Err(code)` on an error
    /// response.
    pub fn allocate(&mut self, extra: &[Attribute<'_>]) -> Result<Allocation, u16> {
        let mut attrs = vec![Attribute::RequestedTransport(Protocol::UDP)];
        attrs.extend_from_slice(extra);
        let response = self.request(Method::ALLOCATE, &attrs);
        if let Some(code) = response.error_code() {
            return Err(code);
        }
        let msg = response.message();
        assert_eq!(msg.class(), Class::SuccessResponse);
        assert!(
            msg.verify_integrity(&self.key.expect("authenticated"))
                .is_ok(),
            "the Allocate success response carries a valid MESSAGE-INTEGRITY"
        );
        let relayed = msg
            .xor_relayed_addresses()
            .map(|a| a.expect("valid XOR-RELAYED-ADDRESS"))
            .collect();
        Ok(Allocation {
            relayed,
            mapped: msg
                .xor_mapped_address()
                .expect("valid XOR-MAPPED-ADDRESS")
                .expect("XOR-MAPPED-ADDRESS present"),
            lifetime_secs: msg
                .lifetime()
                .expect("valid LIFETIME")
                .expect("LIFETIME present"),
            reservation_token: msg.reservation_token().ok().flatten().map(|t| t.0),
        })
    }

    /// CreatePermission for every address in `peers`, in one request.
    pub fn create_permission(&mut self, peers: &[SocketAddr]) -> Result<(), u16> {
        let attrs: Vec<_> = peers
            .iter()
            .map(|p| Attribute::XorPeerAddress(*p))
            .collect();
        match self.request(Method::CREATE_PERMISSION, &attrs).error_code() {
            None => Ok(()),
            Some(code) => Err(code),
        }
    }

    /// ChannelBind `channel` to `peer`.
    pub fn channel_bind(&mut self, channel: u16, peer: SocketAddr) -> Result<(), u16> {
        let number = ChannelNumber::new(channel).expect("test uses a valid channel");
        let attrs = [
            Attribute::ChannelNumber(number),
            Attribute::XorPeerAddress(peer),
        ];
        match self.request(Method::CHANNEL_BIND, &attrs).error_code() {
            None => Ok(()),
            Some(code) => Err(code),
        }
    }

    /// Refresh with LIFETIME `lifetime_secs`; returns the granted lifetime.
    pub fn refresh(&mut self, lifetime_secs: u32) -> Result<u32, u16> {
        let response = self.request(Method::REFRESH, &[Attribute::Lifetime(lifetime_secs)]);
        if let Some(code) = response.error_code() {
            return Err(code);
        }
        Ok(response
            .message()
            .lifetime()
            .ok()
            .flatten()
            .expect("LIFETIME in the Refresh response"))
    }

    /// Sends a ChannelData message.
    pub fn send_channel_data(&self, channel: u16, payload: &[u8]) {
        let bytes = self.channel_data(channel, payload);
        self.send_bytes(&bytes);
    }

    /// A ChannelData message as this client frames it (padded to 4 over TCP/TLS).
    pub fn channel_data(&self, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; payload.len() + 8];
        let number = ChannelNumber::new(channel).expect("valid channel");
        let len =
            write_channel_data(&mut buf, number, payload, self.is_stream()).expect("buffer fits");
        buf.truncate(len);
        buf
    }

    /// Sends a Send indication to `peer`.
    pub fn send_indication(&mut self, peer: SocketAddr, payload: &[u8]) {
        let tid = self.fresh_tid();
        let mut buf = vec![0u8; payload.len() + 64];
        let mut b = MessageBuilder::new(&mut buf, Class::Indication, Method::SEND, tid);
        b.attribute(&Attribute::XorPeerAddress(peer))
            .and_then(|b| b.attribute(&Attribute::Data(payload)))
            .expect("buffer fits");
        let len = b.finish();
        self.send_bytes(&buf[..len]);
    }

    /// Sends raw bytes to the server.
    pub fn send_raw(&self, bytes: &[u8]) {
        self.send_bytes(bytes);
    }

    /// The next relayed message (ChannelData or Data indication) within `timeout`.
    pub fn recv_relayed(&mut self, timeout: Duration) -> Option<Relayed> {
        if !self.pending.is_empty() {
            return Some(self.pending.remove(0));
        }
        let deadline = Instant::now() + timeout;
        while let Some(datagram) = self.recv_raw_until(deadline) {
            if let Some(r) = to_relayed(&datagram) {
                return Some(r);
            }
        }
        None
    }
}

fn to_relayed(datagram: &[u8]) -> Option<Relayed> {
    match classify(datagram) {
        PacketKind::ChannelData => {
            let cd = ChannelData::parse(datagram).ok()?;
            Some(Relayed::ChannelData {
                channel: cd.channel().get(),
                payload: cd.payload().to_vec(),
            })
        }
        PacketKind::Stun => {
            let msg = Message::parse(datagram).ok()?;
            if msg.class() != Class::Indication || msg.method() != Method::DATA {
                return None;
            }
            let peer = msg.xor_peer_addresses().next()?.ok()?;
            let payload = msg.data().ok()??.to_vec();
            Some(Relayed::Data { peer, payload })
        }
        _ => None,
    }
}

/// The loopback address of a family with port 0.
pub fn loopback(ipv6: bool) -> SocketAddr {
    if ipv6 {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0)
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
    }
}

/// A datagram as a peer saw it: source address and bytes.
pub type Datagram = (SocketAddr, Vec<u8>);

/// A UDP peer on loopback that echoes every datagram to its sender, and records what it saw.
pub struct EchoPeer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Datagram>>>,
    thread: Option<JoinHandle<()>>,
}

impl EchoPeer {
    /// Starts an echo peer on loopback of the given family.
    pub fn start(ipv6: bool) -> Self {
        let socket = UdpSocket::bind(loopback(ipv6)).expect("bind echo peer");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("set read timeout");
        let addr = socket.local_addr().expect("peer address");
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let stop = Arc::clone(&stop);
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        // Record before echoing, so a client that got the echo finds the
                        // datagram recorded.
                        if let Ok(mut s) = seen.lock() {
                            s.push((from, buf[..n].to_vec()));
                        }
                        let _ = socket.send_to(&buf[..n], from);
                    }
                }
            })
        };
        Self {
            addr,
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// Every datagram received so far, with its source address.
    pub fn seen(&self) -> Vec<Datagram> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits (at most `timeout`) until `count` datagrams have arrived; returns how many did.
    pub fn wait_for(&self, count: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.seen.lock().map(|s| s.len()).unwrap_or(0);
            if n >= count || Instant::now() >= deadline {
                return n;
            }
            std::thread::park_timeout(Duration::from_millis(5));
        }
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A plain UDP socket on loopback acting as a peer that sends first.
pub fn peer_socket(ipv6: bool) -> UdpSocket {
    let s = UdpSocket::bind(loopback(ipv6)).expect("bind peer socket");
    s.set_read_timeout(Some(ANSWER_TIMEOUT))
        .expect("set read timeout");
    s
}

/// A relay port range of its own for each test server: a 200-port slice of 20000-31999, below
/// Linux's ephemeral range (32768-60999) so the tests' client sockets never hold a relay port.
/// A process takes the 60 slices in turn from an offset given by its process id, so servers
/// alive at the same time (tests in parallel, other test processes on the machine) do not share
/// ports. A shared port would still be correct, just slower: the engine retries a port it cannot
/// bind, but a reserved EVEN-PORT pair cannot move. A test that needs more ports passes its own
/// `--ports` below 20000 (see [`with_relay_ports`]).
pub fn relay_port_slice() -> String {
    const FIRST: u32 = 20_000;
    const SLICE: u32 = 200;
    const SLICES: u32 = 60;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let low = FIRST + ((std::process::id().wrapping_mul(7) + n) % SLICES) * SLICE;
    format!("{low}-{}", low + SLICE - 1)
}

/// `args` with the value of `--ports` replaced by `ports`.
pub fn with_relay_ports(mut args: Vec<String>, ports: &str) -> Vec<String> {
    if let Some(i) = args.iter().position(|a| a == "--ports") {
        if let Some(value) = args.get_mut(i + 1) {
            ports.clone_into(value);
        }
    }
    args
}

/// A test server with the standard flags plus a `tls://` and an `auto://` listener on
/// 127.0.0.1 serving `cert`, one shard, counters published every 50 ms.
pub fn start_with_tls_listeners(backend: &str, cert: &TestCertificate) -> Uturn {
    let mut args = standard_args(backend, 1);
    for extra in [
        "--listen",
        "tls://127.0.0.1:0",
        "--listen",
        "auto://127.0.0.1:0",
        "--tls-cert",
        cert.cert_path.to_str().expect("UTF-8 path"),
        "--tls-key",
        cert.key_path.to_str().expect("UTF-8 path"),
        "--counters-interval-ms",
        "50",
    ] {
        args.push(extra.to_owned());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Uturn::start(&refs)
}

/// The standard flags of a test server: loopback listeners on both families with OS ports, both
/// relay IPs, one user, loopback peers allowed, the given backend and shard count.
pub fn standard_args(backend: &str, threads: usize) -> Vec<String> {
    [
        "--listen",
        "127.0.0.1:0",
        "--listen",
        "[::1]:0",
        "--relay-ip",
        "127.0.0.1",
        "--relay-ip",
        "::1",
        "--realm",
        "e2e.test",
        "--ports",
        &relay_port_slice(),
        "--user",
        "alice:wonderland",
        "--allow-loopback-peers",
        // Every test client shares the source 127.0.0.1, and some tests open a thousand
        // allocations at once: the per-source budget of unauthenticated answers is off here
        // (tests/tests/amplification.rs checks it with its own budget).
        "--unauthenticated-rate",
        "0",
        "--io",
        backend,
        "--threads",
        &threads.to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Error codes the tests compare against, re-exported for readability.
pub const FORBIDDEN: u16 = ErrorCode::FORBIDDEN.0;

/// Runs each named scenario `fn name(backend: &str)` once per data-plane backend, as the tests
/// `name::uring` and `name::mmsg`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn uring() {
                    super::$name("uring");
                }
                #[test]
                fn mmsg() {
                    super::$name("mmsg");
                }
            }
        )*
    };
}
