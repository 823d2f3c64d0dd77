//! The HTTP listener: Prometheus `/metrics`, `/healthz`, `/readyz` and the admin API.
//!
//! It runs on its own thread and never touches engine state: every admin request becomes an
//! [`AdminCall`] sent over a bounded crossbeam channel to the control thread, which owns the
//! engine and answers between two inputs; this thread waits at most [`ADMIN_REPLY_TIMEOUT`]
//! for the reply (503 otherwise). `/metrics` renders the Prometheus recorder's state, and
//! `/readyz` reads a [`Readiness`] flag the control thread sets, so neither waits on the
//! control thread.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz` | 200 while the process serves HTTP |
//! | `GET /readyz` | 200 `ready`; 503 `starting` or `draining` |
//! | `GET /api/v1/status` | version, uptime, listeners, shards, counts |
//! | `GET /api/v1/allocations[?user=U][&client=IP[:PORT]]` | the relay-usage view |
//! | `DELETE /api/v1/allocations/{id}` | ends one allocation |
//! | `POST /api/v1/reload` | reloads users, REST secrets, peer policy, log level |
//! | `POST /api/v1/drain` | stops accepting allocations (`?off` resumes) |
//!
//! With a token configured every route but `/healthz` and `/readyz` needs
//! `Authorization: Bearer TOKEN` (401 otherwise).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use subtle::ConstantTimeEq as _;
use tiny_http::{Header, Method, Request, Response, Server};
use tracing::{debug, warn};

/// How long the HTTP thread waits for the control thread to answer an admin request.
pub const ADMIN_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Admin requests waiting for the control thread; beyond this the API answers 503.
const ADMIN_QUEUE_DEPTH: usize = 64;

/// How long one wait for a request lasts before the thread looks at its stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(200);

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
    /// Where the answer goes (the HTTP thread may have given up; sending then fails quietly).
    pub reply: Sender<AdminReply>,
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
    /// The thread could not be spawned.
    #[error("cannot spawn the HTTP thread: {0}")]
    Spawn(#[from] std::io::Error),
}

/// The running HTTP listener.
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
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
            Some(handle)
        } else {
            None
        };
        let server = Server::http(addr).map_err(|e| HttpError::Bind {
            addr,
            reason: e.to_string(),
        })?;
        let bound = server.server_addr().to_ip().unwrap_or(addr);
        let stop = Arc::new(AtomicBool::new(false));
        let (calls_tx, calls) = bounded(ADMIN_QUEUE_DEPTH);
        let handler = Handler {
            token,
            readiness,
            prometheus,
            calls: calls_tx,
        };
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("uturn-http".into())
            .spawn(move || serve(&server, &handler, &thread_stop))?;
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
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Handler {
    token: Option<String>,
    readiness: Readiness,
    /// None with `ops.metrics = false`.
    prometheus: Option<PrometheusHandle>,
    calls: Sender<AdminCall>,
}

fn serve(server: &Server, handler: &Handler, stop: &AtomicBool) {
    let mut upkept = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match server.recv_timeout(ACCEPT_POLL) {
            Ok(Some(request)) => handler.handle(request),
            Ok(None) => {}
            Err(e) => debug!(error = %e, "HTTP connection failed"),
        }
        if upkept.elapsed() >= UPKEEP_INTERVAL {
            if let Some(prometheus) = &handler.prometheus {
                prometheus.run_upkeep();
            }
            upkept = Instant::now();
        }
    }
}

impl Handler {
    fn handle(&self, request: Request) {
        let url = request.url().to_owned();
        let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
        let method = request.method().clone();
        let (status, content_type, body) = self.route(&method, path, query, &request);
        let mut response = Response::from_string(body).with_status_code(status);
        if let Ok(header) = Header::from_bytes("Content-Type", content_type) {
            response = response.with_header(header);
        }
        if status == 401 {
            if let Ok(header) = Header::from_bytes("WWW-Authenticate", "Bearer") {
                response = response.with_header(header);
            }
        }
        if let Err(e) = request.respond(response) {
            debug!(error = %e, "HTTP response not sent");
        }
    }

    fn route(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        request: &Request,
    ) -> (u16, &'static str, String) {
        const TEXT: &str = "text/plain; charset=utf-8";
        const JSON: &str = "application/json";
        match (method, path) {
            (Method::Get, "/healthz") => return (200, TEXT, "ok\n".into()),
            (Method::Get, "/readyz") => {
                let state = self.readiness.label();
                let status = if state == "ready" { 200 } else { 503 };
                return (status, TEXT, format!("{state}\n"));
            }
            _ => {}
        }
        if !self.authorized(request) {
            return (401, TEXT, "missing or wrong bearer token\n".into());
        }
        let admin = match (method, path) {
            (Method::Get, "/metrics") => {
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
            (Method::Get, "/api/v1/status") => AdminRequest::Status,
            (Method::Get, "/api/v1/allocations") => AdminRequest::Allocations {
                user: query_param(query, "user"),
                client: query_param(query, "client"),
            },
            (Method::Delete, p) if p.starts_with("/api/v1/allocations/") => {
                let id = p.strip_prefix("/api/v1/allocations/").unwrap_or_default();
                match id.parse::<u64>() {
                    Ok(id) => AdminRequest::DeleteAllocation(id),
                    Err(_) => {
                        return (400, JSON, error_json(&format!("bad allocation id {id:?}")));
                    }
                }
            }
            (Method::Post, "/api/v1/reload") => AdminRequest::Reload,
            (Method::Post, "/api/v1/drain") => {
                AdminRequest::Drain(!query.split('&').any(|p| p == "off"))
            }
            (_, "/metrics" | "/healthz" | "/readyz" | "/api/v1/status" | "/api/v1/reload")
            | (_, "/api/v1/drain" | "/api/v1/allocations") => {
                return (405, JSON, error_json("method not allowed"));
            }
            _ => return (404, JSON, error_json("no such route")),
        };
        let reply = self.call(admin);
        (reply.status, JSON, format!("{}\n", reply.body))
    }

    fn authorized(&self, request: &Request) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        request
            .headers()
            .iter()
            .filter(|h| h.field.equiv("Authorization"))
            .filter_map(|h| h.value.as_str().strip_prefix("Bearer "))
            .any(|given| bool::from(given.trim().as_bytes().ct_eq(token.as_bytes())))
    }

    fn call(&self, request: AdminRequest) -> AdminReply {
        let (reply_tx, reply_rx) = bounded(1);
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
        reply_rx
            .recv_timeout(ADMIN_REPLY_TIMEOUT)
            .unwrap_or_else(|_| unavailable("the control thread did not answer in time"))
    }
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
