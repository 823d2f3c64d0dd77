//! The HTTP listener: Prometheus `/metrics`, `/healthz`, `/readyz` and the admin API.
//!
//! It runs on its own thread and never touches engine state: every admin request becomes an
//! [`AdminCall`] sent over a bounded crossbeam channel to the control thread, which owns the
//! engine and answers between two inputs; the listener waits at most [`ADMIN_REPLY_TIMEOUT`]
//! for the reply (503 otherwise). `/metrics` renders the Prometheus recorder's state, and
//! `/readyz` reads a [`Readiness`] flag the control thread sets, so neither waits on the
//! control thread.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /` | the relay-usage page (HTML, see below) |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz` | 200 while the process serves HTTP |
//! | `GET /readyz` | 200 `ready`; 503 `starting` or `draining` |
//! | `GET /api/v1/status` | version, uptime, listeners, shards, counts |
//! | `GET /api/v1/allocations[?user=U][&client=IP[:PORT]]` | the relay-usage view |
//! | `DELETE /api/v1/allocations/{id}` | ends one allocation |
//! | `POST /api/v1/reload` | reloads users, REST secrets, peer policy, log level |
//! | `POST /api/v1/drain` | stops accepting allocations (`?off` resumes) |
//!
//! With a token configured every route but `/`, `/healthz` and `/readyz` needs
//! `Authorization: Bearer TOKEN` (401 otherwise). Without one (the listener is then on
//! loopback) a request that changes something (any method but GET and HEAD) needs the header
//! `X-Uturn-Admin: 1` (403 otherwise), and every route but `/` and the two health checks
//! needs a loopback `Host` (421 otherwise): a web page cannot add a custom header to a cross-site
//! request without a CORS preflight, which this listener never grants, and a page that
//! rebinds its own name to 127.0.0.1 still sends that name as `Host`.
//!
//! **The relay-usage page.** `GET /` serves one embedded HTML file (`console/index.html`, its
//! CSS and JavaScript inline) to anyone, token or not, loopback `Host` or not: it holds no data
//! and no secret. What it shows it fetches from `/api/v1/status` and `/api/v1/allocations`
//! with the same rules as any client (it asks for the token when they answer 401 and keeps it
//! in the tab's `sessionStorage`). It is served with a Content-Security-Policy that runs only
//! its own inline script and style (named by their SHA-256) and lets it fetch only from this
//! origin, so an allocation's user name (chosen by a TURN client) cannot become markup that
//! runs; every other answer carries `default-src 'none'`.
//!
//! **Bounded.** One thread runs a current-thread tokio runtime with hyper's HTTP/1.1 server, so
//! connections cost a socket and a small task, never a thread. At most
//! [`HttpLimits::max_connections`] are open; a new one beyond that closes the oldest
//! connection that has not sent a complete request head yet (so a flood of idle connections
//! cannot lock out a health check), or, when every open one is busy, is closed at once. A
//! request head must arrive within [`HttpLimits::header_timeout`] and fit in
//! [`MAX_HEADER_BYTES`] and [`MAX_HEADERS`] lines (431), a body in [`MAX_BODY_BYTES`] (413).
//! A connection carries one request (the answer says `Connection: close`), so the token is
//! checked before the listener reads anything but that one bounded head. Framing that two
//! parsers could read differently is refused with 400 before anything runs: `Content-Length`
//! beside `Transfer-Encoding`, more than one `Content-Length` or `Transfer-Encoding` or `Host`
//! line, a `Content-Length` that is not one decimal number, a `Transfer-Encoding` that is not
//! exactly `chunked`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, bounded};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use subtle::ConstantTimeEq as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, oneshot};
use tracing::{debug, warn};

/// How long the listener waits for the control thread to answer an admin request.
pub const ADMIN_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The header a state-changing request must carry when no token is configured. Browsers
/// cannot add it to a cross-site request without a CORS preflight, which is never granted.
pub const ADMIN_HEADER: &str = "x-uturn-admin";

/// The longest request head (request line and header lines) accepted; longer is 431.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

/// The most header lines a request may have; more is 431.
pub const MAX_HEADERS: usize = 64;

/// The largest request body accepted; larger is 413. No route reads a body: the limit bounds
/// what a client can make the listener read before it answers.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// hyper's read buffer per connection at most (hyper's own minimum is 8 KiB).
const READ_BUFFER_BYTES: usize = 16 * 1024;

/// How much of a connection's first bytes are kept to re-read the request head's framing
/// lines (the head itself is at most [`MAX_HEADER_BYTES`]).
const HEAD_TAP_BYTES: usize = 2 * MAX_HEADER_BYTES;

/// How long a connection may live beyond its header timeout (reading a body, waiting for the
/// control thread, writing to a slow reader) before it is closed.
const CONNECTION_GRACE: Duration = Duration::from_secs(30);

/// The listen backlog: a burst of connects waits in the kernel, not in a refused SYN.
const LISTEN_BACKLOG: u32 = 1024;

/// How long the listener pauses after a failed accept (out of file descriptors), so it does
/// not spin on an error that repeats until something is closed.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// At most one log line per this interval says the connection cap is reached.
const CAP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Admin requests waiting for the control thread; beyond this the API answers 503.
const ADMIN_QUEUE_DEPTH: usize = 64;

/// How often the recorder's histograms are folded into their buckets when nobody scrapes:
/// until then every recorded sample is held in memory, so a server that is never scraped
/// would grow by one sample per ended allocation (the exporter's own default upkeep period).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// A request for the control thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminRequest {
    /// `GET /api/v1/status`.
    Status,
    /// `GET /api/v1/allocations` with its filters.
    Allocations {
        /// Only this user's allocations.
        user: Option<String>,
        /// Only allocations whose client address matches (an IP, or IP:port).
        client: Option<String>,
    },
    /// `DELETE /api/v1/allocations/{id}`.
    DeleteAllocation(u64),
    /// `POST /api/v1/reload`.
    Reload,
    /// `POST /api/v1/drain` (true) or `POST /api/v1/drain?off` (false).
    Drain(bool),
}

/// The control thread's answer: an HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminReply {
    /// HTTP status code.
    pub status: u16,
    /// The body.
    pub body: serde_json::Value,
}

/// One admin request and where to send its answer.
#[derive(Debug)]
pub struct AdminCall {
    /// What is asked.
    pub request: AdminRequest,
    /// Where the answer goes (the listener may have given up; sending then fails quietly).
    /// A oneshot that a plain thread can send on and the listener's runtime can await.
    pub reply: oneshot::Sender<AdminReply>,
}

/// Whether the server takes new allocations, as `/readyz` reports it.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicU8>);

impl Readiness {
    // 0, the default, is "starting".
    const READY: u8 = 1;
    const DRAINING: u8 = 2;

    /// The shards are up and the control thread runs.
    pub fn set_ready(&self) {
        self.0.store(Self::READY, Ordering::Relaxed);
    }

    /// Draining (true) or ready again (false).
    pub fn set_draining(&self, draining: bool) {
        let state = if draining {
            Self::DRAINING
        } else {
            Self::READY
        };
        self.0.store(state, Ordering::Relaxed);
    }

    fn label(&self) -> &'static str {
        match self.0.load(Ordering::Relaxed) {
            Self::READY => "ready",
            Self::DRAINING => "draining",
            _ => "starting",
        }
    }
}

/// What the listener tolerates from its clients (`ops.http_header_timeout_ms`,
/// `ops.http_max_connections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// How long a client may take to send a request head.
    pub header_timeout: Duration,
    /// Connections open at most.
    pub max_connections: usize,
}

impl HttpLimits {
    /// The limits `[ops]` configures.
    pub fn from_ops(ops: &crate::ops::OpsConfig) -> Self {
        Self {
            header_timeout: Duration::from_millis(u64::from(ops.http_header_timeout_ms)),
            max_connections: usize::try_from(ops.http_max_connections).unwrap_or(usize::MAX),
        }
    }
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self::from_ops(&crate::ops::OpsConfig::default())
    }
}

/// Why the HTTP listener could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The address could not be bound (in use, or not local).
    #[error("cannot listen for HTTP on {addr}: {reason} (choose another with --http ADDR:PORT)")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        reason: String,
    },
    /// The Prometheus recorder could not be installed (another one is).
    #[error("cannot install the Prometheus recorder: {0}")]
    Recorder(String),
    /// The listener's runtime (its event loop) could not be built.
    #[error("cannot start the HTTP listener's event loop: {0}")]
    Runtime(io::Error),
    /// The thread could not be spawned.
    #[error("cannot spawn the HTTP thread: {0}")]
    Spawn(#[from] io::Error),
}

/// The running HTTP listener.
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddr,
    stop: Arc<Notify>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Installs the global Prometheus recorder (unless `metrics` is false: then no recorder,
    /// every metric update is a no-op and `/metrics` answers 404), binds `addr` and starts the
    /// HTTP thread. Returns the server and the receiver of admin calls for the control thread.
    pub fn start(
        addr: SocketAddr,
        token: Option<String>,
        metrics: bool,
        readiness: Readiness,
        limits: HttpLimits,
    ) -> Result<(Self, Receiver<AdminCall>), HttpError> {
        let prometheus = if metrics {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(
                        "uturn_allocation_lifetime_seconds".to_owned(),
                    ),
                    crate::telemetry::LIFETIME_BUCKETS_SECS,
                )
                .map_err(|e| HttpError::Recorder(e.to_string()))?
                .install_recorder()
                .map_err(|e| HttpError::Recorder(e.to_string()))?;
            crate::telemetry::describe_metrics();
            Some(handle)
        } else {
            None
        };
        // One thread, whatever the number of connections: the runtime never starts another
        // (nothing here uses its blocking pool).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(HttpError::Runtime)?;
        let listener = {
            let _context = runtime.enter();
            bind(addr).map_err(|e| HttpError::Bind {
                addr,
                reason: e.to_string(),
            })?
        };
        let bound = listener.local_addr().unwrap_or(addr);
        let (calls_tx, calls) = bounded(ADMIN_QUEUE_DEPTH);
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .keep_alive(false)
            .max_headers(MAX_HEADERS)
            .max_header_size(MAX_HEADER_BYTES)
            .max_buf_size(READ_BUFFER_BYTES);
        let shared = Arc::new(Shared {
            handler: Handler {
                token,
                readiness,
                prometheus,
                calls: calls_tx,
                header_timeout: limits.header_timeout,
            },
            http1,
            limits,
            open: Mutex::new(Open::default()),
        });
        let stop = Arc::new(Notify::new());
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("uturn-http".into())
            .spawn(move || runtime.block_on(serve(listener, shared, thread_stop)))?;
        Ok((
            Self {
                addr: bound,
                stop,
                thread: Some(thread),
            },
            calls,
        ))
    }

    /// The bound address (port 0 resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        // A stored permit: the accept loop sees it even if it is not waiting right now.
        self.stop.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// What the accept loop and every connection task share.
struct Shared {
    handler: Handler,
    http1: http1::Builder,
    limits: HttpLimits,
    open: Mutex<Open>,
}

/// The open connections, oldest first (ids only grow).
#[derive(Default)]
struct Open {
    next_id: u64,
    slots: BTreeMap<u64, Arc<Slot>>,
}

/// One open connection, as the cap sees it.
struct Slot {
    /// A complete request head has arrived: the connection is answering, not idling.
    busy: AtomicBool,
    /// Closes the connection to make room for a new one.
    evict: Notify,
}

impl Open {
    /// Takes a new connection in under the cap `max`: at the cap the oldest connection that is
    /// not busy is taken out to make room (returned, for the caller to close); when every one
    /// is busy the new one is refused (`None`).
    fn admit(&mut self, max: usize) -> Option<Admitted> {
        let mut evicted = None;
        if self.slots.len() >= max {
            let idle = self
                .slots
                .iter()
                .find(|(_, slot)| !slot.busy.load(Ordering::Relaxed))
                .map(|(id, _)| *id)?;
            evicted = self.slots.remove(&idle);
        }
        let id = self.next_id;
        self.next_id += 1;
        let slot = Arc::new(Slot {
            busy: AtomicBool::new(false),
            evict: Notify::new(),
        });
        self.slots.insert(id, Arc::clone(&slot));
        Some(Admitted { id, slot, evicted })
    }
}

/// A connection taken in, and the one closed to make room for it.
struct Admitted {
    id: u64,
    slot: Arc<Slot>,
    evicted: Option<Arc<Slot>>,
}

impl Shared {
    fn open(&self) -> std::sync::MutexGuard<'_, Open> {
        // Nothing panics while holding the lock; if something did, the map is still whole.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a connection in, making room under the cap; `None` when there is none to make.
    fn admit(&self, last_cap_log: &mut Option<Instant>) -> Option<(u64, Arc<Slot>)> {
        let mut open = self.open();
        let at_cap = open.slots.len() >= self.limits.max_connections;
        let admitted = open.admit(self.limits.max_connections);
        metrics::gauge!("uturn_http_open_connections").set(open.slots.len() as f64);
        drop(open);
        if at_cap {
            let reason = match &admitted {
                Some(Admitted {
                    evicted: Some(_), ..
                }) => "over_cap_evicted",
                _ => "over_cap_refused",
            };
            metrics::counter!("uturn_http_connections_dropped_total", "reason" => reason)
                .increment(1);
            if last_cap_log.is_none_or(|at| at.elapsed() >= CAP_LOG_INTERVAL) {
                warn!(
                    max = self.limits.max_connections,
                    "HTTP listener at its connection cap (ops.http_max_connections): closing \
                     the oldest connection without a request, or the new one"
                );
                *last_cap_log = Some(Instant::now());
            }
        }
        let Admitted { id, slot, evicted } = admitted?;
        if let Some(evicted) = evicted {
            evicted.evict.notify_one();
        }
        Some((id, slot))
    }

    fn release(&self, id: u64) {
        let mut open = self.open();
        open.slots.remove(&id);
        metrics::gauge!("uturn_http_open_connections").set(open.slots.len() as f64);
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: Arc<Notify>) {
    let mut upkeep = tokio::time::interval(UPKEEP_INTERVAL);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_cap_log = None;
    loop {
        tokio::select! {
            () = stop.notified() => break,
            _ = upkeep.tick() => {
                if let Some(prometheus) = &shared.handler.prometheus {
                    prometheus.run_upkeep();
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    // Over the cap with every connection busy: dropping the stream closes it.
                    if let Some((id, slot)) = shared.admit(&mut last_cap_log) {
                        tokio::spawn(connection(Arc::clone(&shared), stream, id, slot));
                    }
                }
                Err(e) => {
                    debug!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
    // Returning drops the runtime with every connection task: their sockets close.
}

/// Serves one connection: one request, then close.
async fn connection(shared: Arc<Shared>, stream: TcpStream, id: u64, slot: Arc<Slot>) {
    let started = tokio::time::Instant::now();
    let deadline = started + shared.limits.header_timeout + CONNECTION_GRACE;
    tokio::select! {
        () = serve_one(&shared, stream, &slot, started) => {}
        // Counted when the cap chose it.
        () = slot.evict.notified() => {}
        () = tokio::time::sleep_until(deadline) => {
            metrics::counter!("uturn_http_connections_dropped_total", "reason" => "deadline")
                .increment(1);
        }
    }
    shared.release(id);
}

async fn serve_one(
    shared: &Arc<Shared>,
    stream: TcpStream,
    slot: &Arc<Slot>,
    started: tokio::time::Instant,
) {
    let header_timeout = shared.limits.header_timeout;
    // hyper takes its 8 KiB read buffer when it starts reading: until the client sends
    // something (or closes), an idle connection holds only its socket and this task, about
    // 2 KB. A peek, not `readable()`: tokio reports a fresh registration ready at once.
    let mut first = [0u8; 1];
    match tokio::time::timeout(header_timeout, stream.peek(&mut first)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            debug!(error = %e, "HTTP connection failed before its request");
            return;
        }
        Err(_) => {
            metrics::counter!("uturn_http_connections_dropped_total", "reason" => "header_timeout")
                .increment(1);
            return;
        }
    }
    // The head's time counts from the connection, not from its first byte.
    let remaining = header_timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(1));
    let mut http1 = shared.http1.clone();
    http1.header_read_timeout(remaining);
    let head = Arc::new(Mutex::new(Vec::new()));
    let io = TokioIo::new(HeadTap {
        inner: stream,
        head: Arc::clone(&head),
    });
    let service = {
        let shared = Arc::clone(shared);
        let slot = Arc::clone(slot);
        service_fn(move |request| {
            slot.busy.store(true, Ordering::Relaxed);
            let shared = Arc::clone(&shared);
            let head = Arc::clone(&head);
            async move { Ok::<_, Infallible>(shared.handler.respond(request, &head).await) }
        })
    };
    if let Err(e) = http1.serve_connection(io, service).await {
        let reason = if e.is_timeout() {
            "header_timeout"
        } else if e.is_parse_too_large() {
            "header_too_large"
        } else if e.is_parse() {
            "malformed"
        } else {
            "io"
        };
        metrics::counter!("uturn_http_connections_dropped_total", "reason" => reason).increment(1);
        debug!(error = %e, reason, "HTTP connection ended with an error");
    }
}

/// The socket, keeping a copy of the first [`HEAD_TAP_BYTES`] it reads: hyper folds duplicate
/// `Content-Length` lines and drops one beside `Transfer-Encoding` before a service sees the
/// headers, so the framing check re-reads the head from these bytes.
struct HeadTap {
    inner: TcpStream,
    head: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for HeadTap {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let mut head = this.head.lock().unwrap_or_else(PoisonError::into_inner);
            let room = HEAD_TAP_BYTES.saturating_sub(head.len());
            let fresh = buf.filled().get(before..).unwrap_or_default();
            head.extend_from_slice(fresh.get(..room.min(fresh.len())).unwrap_or_default());
        }
        polled
    }
}

impl AsyncWrite for HeadTap {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
const HTML: &str = "text/html; charset=utf-8";

/// The relay-usage page served at `/`.
const CONSOLE_PAGE: &str = include_str!("console/index.html");

/// The Content-Security-Policy of every answer that is not the page: nothing may load or run.
const CSP_NONE: &str =
    "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The page's Content-Security-Policy: its own inline `<script>` and `<style>` by hash (no
/// `'unsafe-inline'`), fetches to this origin only, images only from `data:` URLs in the page
/// (its icon: a favicon request would be answered 401 when a token is set), no frames, no
/// plugins, no form posts.
fn console_csp() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        let scripts = inline_hashes(CONSOLE_PAGE, "script");
        let styles = inline_hashes(CONSOLE_PAGE, "style");
        format!(
            "default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; \
             img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
    })
}

/// The CSP sources (`'sha256-…'`) of every inline `<TAG>…</TAG>` element of `page`, as a
/// browser hashes them: the exact text between the opening and the closing tag. Text inside
/// HTML comments is not an element and is skipped.
fn inline_hashes(page: &str, tag: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut sources = Vec::new();
    let mut rest = page;
    while let Some(start) = rest.find(&open) {
        if let Some(comment) = rest.find("<!--").filter(|c| *c < start) {
            let after = &rest[comment + 4..];
            rest = after.find("-->").map_or("", |end| &after[end + 3..]);
            continue;
        }
        let body = &rest[start + open.len()..];
        let Some(end) = body.find(&close) else { break };
        let digest = sha2::Sha256::digest(&body.as_bytes()[..end]);
        sources.push(format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(digest)
        ));
        rest = &body[end + close.len()..];
    }
    if sources.is_empty() {
        // Nothing inline: nothing may run.
        return "'none'".to_owned();
    }
    sources.join(" ")
}

/// A status, a content type and a body.
type Answer = (u16, &'static str, String);

struct Handler {
    token: Option<String>,
    readiness: Readiness,
    /// None with `ops.metrics = false`.
    prometheus: Option<PrometheusHandle>,
    calls: Sender<AdminCall>,
    /// Also the time a declared body has to arrive.
    header_timeout: Duration,
}

impl Handler {
    async fn respond(
        &self,
        request: Request<Incoming>,
        head: &Mutex<Vec<u8>>,
    ) -> Response<Full<Bytes>> {
        let (status, content_type, body) = self.answer(request, head).await;
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() =
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        let csp = if content_type == HTML {
            console_csp()
        } else {
            CSP_NONE
        };
        if let Ok(csp) = HeaderValue::from_str(csp) {
            headers.insert(header::CONTENT_SECURITY_POLICY, csp);
        }
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == 401 {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }

    async fn answer(&self, request: Request<Incoming>, head: &Mutex<Vec<u8>>) -> Answer {
        let framing = {
            let head = head.lock().unwrap_or_else(PoisonError::into_inner);
            check_framing(&head)
        };
        if let Err(why) = framing {
            return refuse("framing", 400, why);
        }
        let (parts, body) = request.into_parts();
        let path = parts.uri.path();
        let query = parts.uri.query().unwrap_or("");
        match (&parts.method, path) {
            (&Method::GET, "/healthz") => return (200, TEXT, "ok\n".into()),
            // Public: the page holds no data; what it shows comes from the API below.
            (&Method::GET, "/") => return (200, HTML, CONSOLE_PAGE.to_owned()),
            (&Method::GET, "/readyz") => {
                let state = self.readiness.label();
                let status = if state == "ready" { 200 } else { 503 };
                return (status, TEXT, format!("{state}\n"));
            }
            _ => {}
        }
        if self.token.is_none() && !host_is_loopback(&parts.headers) {
            return refuse(
                "host",
                421,
                "without ops.http_token the admin API answers only requests for a loopback \
                 host (127.0.0.1, [::1] or localhost)",
            );
        }
        if !self.authorized(&parts.headers) {
            return refuse("unauthorized", 401, "missing or wrong bearer token");
        }
        let changes_state = !matches!(parts.method, Method::GET | Method::HEAD);
        if changes_state && self.token.is_none() && !parts.headers.contains_key(ADMIN_HEADER) {
            return refuse(
                "admin_header",
                403,
                "a request that changes state needs the header `X-Uturn-Admin: 1` (or a \
                 bearer token), which a web page cannot send cross-site",
            );
        }
        if let Err(refused) = self.read_body(&parts.headers, body).await {
            return refused;
        }
        let admin = match (&parts.method, path) {
            (&Method::GET, "/metrics") => {
                let Some(prometheus) = &self.prometheus else {
                    return (
                        404,
                        JSON,
                        error_json("metrics are off (ops.metrics = false)"),
                    );
                };
                prometheus.run_upkeep();
                return (
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    prometheus.render(),
                );
            }
            (&Method::GET, "/api/v1/status") => AdminRequest::Status,
            (&Method::GET, "/api/v1/allocations") => AdminRequest::Allocations {
                user: query_param(query, "user"),
                client: query_param(query, "client"),
            },
            (&Method::DELETE, p) if p.starts_with("/api/v1/allocations/") => {
                let id = p.strip_prefix("/api/v1/allocations/").unwrap_or_default();
                match id.parse::<u64>() {
                    Ok(id) => AdminRequest::DeleteAllocation(id),
                    Err(_) => {
                        return (400, JSON, error_json(&format!("bad allocation id {id:?}")));
                    }
                }
            }
            (&Method::POST, "/api/v1/reload") => AdminRequest::Reload,
            (&Method::POST, "/api/v1/drain") => {
                AdminRequest::Drain(!query.split('&').any(|p| p == "off"))
            }
            (_, "/" | "/metrics" | "/healthz" | "/readyz" | "/api/v1/status")
            | (_, "/api/v1/reload")
            | (_, "/api/v1/drain" | "/api/v1/allocations") => {
                return (405, JSON, error_json("method not allowed"));
            }
            _ => return (404, JSON, error_json("no such route")),
        };
        let reply = self.call(admin).await;
        (reply.status, JSON, format!("{}\n", reply.body))
    }

    /// Reads (and drops) the body, bounded in size and time, so nothing runs on a request whose
    /// body is malformed or still arriving.
    async fn read_body(&self, headers: &HeaderMap, body: Incoming) -> Result<(), Answer> {
        let too_large = || {
            refuse(
                "too_large",
                413,
                &format!("a request body may have {MAX_BODY_BYTES} bytes at most"),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
            return Err(too_large());
        }
        let collected = tokio::time::timeout(
            self.header_timeout,
            Limited::new(body, MAX_BODY_BYTES).collect(),
        )
        .await;
        match collected {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
            Ok(Err(e)) => {
                debug!(error = %e, "HTTP request body not read");
                Err(refuse("framing", 400, "the request body could not be read"))
            }
            Err(_) => Err(refuse(
                "body_timeout",
                408,
                "the request body did not arrive in time",
            )),
        }
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.strip_prefix("Bearer "))
            .any(|given| bool::from(given.trim().as_bytes().ct_eq(token.as_bytes())))
    }

    async fn call(&self, request: AdminRequest) -> AdminReply {
        let (reply_tx, reply_rx) = oneshot::channel();
        let unavailable = |why: &str| AdminReply {
            status: 503,
            body: serde_json::json!({ "error": why }),
        };
        if self
            .calls
            .try_send(AdminCall {
                request,
                reply: reply_tx,
            })
            .is_err()
        {
            warn!("admin request refused: the control thread's queue is full or gone");
            return unavailable("the control thread is busy or stopped");
        }
        match tokio::time::timeout(ADMIN_REPLY_TIMEOUT, reply_rx).await {
            Ok(Ok(reply)) => reply,
            _ => unavailable("the control thread did not answer in time"),
        }
    }
}

/// A refusal, counted by `reason`.
fn refuse(reason: &'static str, status: u16, why: &str) -> Answer {
    metrics::counter!("uturn_http_requests_refused_total", "reason" => reason).increment(1);
    (status, TEXT, format!("{why}\n"))
}

/// Refuses framing that a proxy in front and this server could read differently (request
/// smuggling, RFC 9112 §6.1 and §6.3): hyper alone lets `Transfer-Encoding` win over
/// `Content-Length` and folds equal duplicates. `head` starts with the request head.
fn check_framing(head: &[u8]) -> Result<(), &'static str> {
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut lines);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err("the request head could not be read"),
    }
    let (mut lengths, mut encodings, mut hosts) = (0, 0, 0);
    for line in request.headers.iter() {
        let value = line.value.trim_ascii();
        if line.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return Err("Content-Length must be one decimal number");
            }
        } else if line.name.eq_ignore_ascii_case("transfer-encoding") {
            encodings += 1;
            if !value.eq_ignore_ascii_case(b"chunked") {
                return Err("the only Transfer-Encoding accepted is `chunked`");
            }
        } else if line.name.eq_ignore_ascii_case("host") {
            hosts += 1;
        }
    }
    if lengths > 0 && encodings > 0 {
        return Err("Content-Length and Transfer-Encoding together are refused");
    }
    if lengths > 1 || encodings > 1 {
        return Err("a framing header (Content-Length, Transfer-Encoding) appears more than once");
    }
    if hosts > 1 {
        return Err("more than one Host header");
    }
    Ok(())
}

/// Whether the request names a loopback host (or none, as HTTP/1.0 may: browsers always do).
fn host_is_loopback(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::HOST) else {
        return true;
    };
    let Ok(text) = value.to_str() else {
        return false;
    };
    let host = match text.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => text.split(':').next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn error_json(message: &str) -> String {
    format!("{}\n", serde_json::json!({ "error": message }))
}

/// The value of `name` in a query string (`a=1&b=2`), percent-decoded.
fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| percent_decode(value))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(head: &str) -> Result<(), &'static str> {
        check_framing(head.as_bytes())
    }

    #[test]
    fn framing_that_two_parsers_could_read_differently_is_refused() {
        // RFC 9112 §6.1: Content-Length beside Transfer-Encoding "ought to be handled as an
        // error"; §6.3: differing or listed lengths are unrecoverable framing errors.
        let ok = "POST /api/v1/drain HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(framing(ok), Ok(()));
        assert_eq!(
            framing("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            Ok(()),
            "the body after the head does not matter"
        );
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 4, 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +4\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n",
        ] {
            assert!(framing(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(
            framing("POST / HTTP/1.1\r\ntransfer-encoding:  Chunked \r\n\r\n"),
            Ok(()),
            "names and the coding are case-insensitive"
        );
    }

    #[test]
    fn at_the_cap_the_oldest_idle_connection_makes_room_and_busy_ones_are_kept() {
        let mut open = Open::default();
        let first: Vec<_> = (0..3).map(|_| open.admit(3).unwrap()).collect();
        assert!(first.iter().all(|a| a.evicted.is_none()));
        first[0].slot.busy.store(true, Ordering::Relaxed);
        // Full: the oldest idle one (the second; the first is answering) is taken out.
        let fourth = open.admit(3).unwrap();
        assert!(Arc::ptr_eq(
            fourth.evicted.as_ref().unwrap(),
            &first[1].slot
        ));
        assert_eq!(open.slots.len(), 3);
        assert!(open.slots.contains_key(&first[0].id));
        for admitted in [&first[2], &fourth] {
            admitted.slot.busy.store(true, Ordering::Relaxed);
        }
        assert!(
            open.admit(3).is_none(),
            "every connection busy: the new one is refused"
        );
        assert_eq!(open.slots.len(), 3);
    }

    #[test]
    fn only_loopback_hosts_pass_without_a_token() {
        let host = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, HeaderValue::from_str(value).unwrap());
            host_is_loopback(&headers)
        };
        for ok in [
            "127.0.0.1:9641",
            "127.0.0.1",
            "[::1]:9641",
            "localhost:9641",
            "LOCALHOST",
        ] {
            assert!(host(ok), "{ok}");
        }
        for bad in [
            "attacker.example:9641",
            "192.0.2.1:9641",
            "[2001:db8::1]:80",
            "localhost.evil",
        ] {
            assert!(!host(bad), "{bad}");
        }
        assert!(host_is_loopback(&HeaderMap::new()), "HTTP/1.0 without Host");
    }

    #[test]
    fn the_page_runs_only_its_own_inline_script_and_style_under_its_csp() {
        // CSP3 §8.3: a hash source matches an inline element whose exact text content hashes to
        // it. sha256("") is the well-known 47DEQ… value.
        assert_eq!(
            inline_hashes("<script></script>", "script"),
            "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='"
        );
        assert_eq!(inline_hashes("<p>none</p>", "script"), "'none'");
        // A tag named in a comment is no element: the real one after it is hashed.
        assert_eq!(
            inline_hashes("<!-- an inline <script> --><script></script>", "script"),
            "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='"
        );
        let csp = console_csp();
        assert!(HeaderValue::from_str(csp).is_ok(), "{csp}");
        for needed in [
            "default-src 'none'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(needed), "{csp} lacks {needed}");
        }
        assert!(!csp.contains("unsafe"), "{csp}");
        // One inline script and one inline style, each named by its own hash.
        for tag in ["script", "style"] {
            let hashes = inline_hashes(CONSOLE_PAGE, tag);
            assert_eq!(hashes.matches("'sha256-").count(), 1, "{tag}: {hashes}");
            assert!(csp.contains(&format!("{tag}-src {hashes};")), "{csp}");
        }
        // A hash does not allow inline event handlers or style attributes: the page has none.
        for forbidden in [
            " onclick=",
            " onload=",
            " oninput=",
            " onsubmit=",
            " style=\"",
        ] {
            assert!(!CONSOLE_PAGE.contains(forbidden), "page has {forbidden}");
        }
        // The page fetches its data only through textContent, never as markup.
        assert!(!CONSOLE_PAGE.contains("innerHTML"));
    }

    #[test]
    fn query_parameters_are_found_and_decoded() {
        assert_eq!(
            query_param("user=cms&client=%5B%3A%3A1%5D%3A5000", "client").as_deref(),
            Some("[::1]:5000")
        );
        assert_eq!(query_param("user=a+b", "user").as_deref(), Some("a b"));
        assert_eq!(query_param("user=cms", "client"), None);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
    }
}
