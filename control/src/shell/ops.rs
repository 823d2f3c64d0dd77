//! The control thread's operations side: admin API calls, reload, drain, metrics and the
//! operator-facing log lines. A child of `shell`, so it works on [`ControlThread`] directly.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hashbrown::HashMap;
use rand::RngCore;
use serde_json::{Value, json};
use tracing::{error, info, warn};

use super::ControlThread;
use crate::engine::Event;
use crate::http::{AdminCall, AdminReply, AdminRequest, Readiness};
use crate::telemetry::{Telemetry, transport_label};
use uturn_dataplane::ShardCommand;

use crate::{AllocationId, AuthFailure, Config, DropReason, PeerPolicy, ShardId};

/// Re-reads the configuration (file and flags) for a reload.
pub type Reloader = Box<dyn FnMut() -> Result<Config, String> + Send>;
/// Applies a new log filter.
pub type LogLevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send>;
/// Loads and swaps what another part of the process reloads (TLS certificates): called with
/// the new configuration after every check passed and before the engine's part is applied; an
/// `Err` refuses the whole reload, so it must leave the old state in place when it fails.
pub type ReloadHook = Box<dyn FnMut(&Config) -> Result<&'static str, String> + Send>;

/// How often the per-shard gauges are recomputed from the engine at most (O(allocations)).
const GAUGES_INTERVAL: Duration = Duration::from_millis(100);

/// Log lines of one kind allowed in a burst, and refilled per second, before the rest are
/// counted and summarised ("N similar lines suppressed").
const LOG_BURST: f64 = 20.0;
const LOG_REFILL_PER_SEC: f64 = 5.0;
/// How often suppressed counts are reported.
const LOG_SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// What a reload hook returns once it has applied `server.tls_cert` and `server.tls_key`: the
/// reload then counts those two as in effect, not as waiting for a restart.
pub const RELOADED_TLS_CERTIFICATE: &str = "tls certificate";

/// What the operations side needs from the binary.
pub struct OpsHooks {
    /// Admin calls from the HTTP thread.
    pub admin: crossbeam_channel::Receiver<AdminCall>,
    /// The `/readyz` flag.
    pub readiness: Readiness,
    /// Listeners for `/api/v1/status`: transport and address.
    pub listeners: Vec<(&'static str, SocketAddr)>,
    /// Re-reads the configuration on reload; `None` reloads only the users file.
    pub reloader: Option<Reloader>,
    /// Applies a new log filter on reload.
    pub log_level: Option<LogLevelSetter>,
    /// Further reload steps (the TLS transport's certificates).
    pub reload_hooks: Vec<ReloadHook>,
}

impl std::fmt::Debug for OpsHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpsHooks")
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}

/// What a reload did.
#[derive(Debug)]
pub(super) struct Reloaded {
    /// The parts of the configuration now in effect from the file.
    pub(super) applied: Vec<&'static str>,
    /// Sections and fields where the file differs from what runs and only a restart applies
    /// it (every reload names them again until then).
    pub(super) restart_needed: Vec<&'static str>,
}

/// Per-allocation facts kept for log lines.
#[derive(Debug, Clone)]
struct AllocationLog {
    user: String,
    client: SocketAddr,
    transport: &'static str,
    relays: String,
}

/// The operations state inside the control thread.
pub(super) struct OpsState {
    pub(super) telemetry: Telemetry,
    admin: crossbeam_channel::Receiver<AdminCall>,
    readiness: Readiness,
    listeners: Vec<(&'static str, SocketAddr)>,
    reloader: Option<Reloader>,
    log_level: Option<LogLevelSetter>,
    reload_hooks: Vec<ReloadHook>,
    started: Instant,
    gauges_at: Instant,
    gauges_dirty: bool,
    logs: HashMap<AllocationId, AllocationLog>,
    /// Shared with the shell's own warnings (relay bind failures).
    pub(super) limiter: LogLimiter,
}

impl OpsState {
    pub(super) fn new(shard_count: usize, now: Instant) -> Self {
        let start_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Self {
            telemetry: Telemetry::new(shard_count, start_unix),
            admin: crossbeam_channel::never(),
            readiness: Readiness::default(),
            listeners: Vec::new(),
            reloader: None,
            log_level: None,
            reload_hooks: Vec::new(),
            started: now,
            gauges_at: now,
            gauges_dirty: true,
            logs: HashMap::new(),
            limiter: LogLimiter::new(now),
        }
    }

    pub(super) fn admin(&self) -> crossbeam_channel::Receiver<AdminCall> {
        self.admin.clone()
    }
}

impl<R: RngCore> ControlThread<R> {
    /// Connects the HTTP listener, readiness flag, status details and reload hooks.
    #[must_use]
    pub fn with_ops(mut self, hooks: OpsHooks) -> Self {
        self.ops.admin = hooks.admin;
        self.ops.readiness = hooks.readiness;
        self.ops.listeners = hooks.listeners;
        self.ops.reloader = hooks.reloader;
        self.ops.log_level = hooks.log_level;
        self.ops.reload_hooks = hooks.reload_hooks;
        self.ops.readiness.set_ready();
        self
    }

    pub(super) fn handle_admin(&mut self, call: AdminCall) {
        let reply = match call.request {
            AdminRequest::Status => self.status(),
            AdminRequest::Allocations { user, client } => {
                self.allocations_json(user.as_deref(), client.as_deref())
            }
            AdminRequest::DeleteAllocation(id) => {
                if self
                    .engine
                    .delete_allocation(Instant::now(), AllocationId(id))
                {
                    ok(json!({ "deleted": id }))
                } else {
                    reply(404, json!({ "error": format!("no allocation {id}") }))
                }
            }
            AdminRequest::Reload => match self.reload_all() {
                Ok(outcome) => ok(json!({
                    "reloaded": outcome.applied,
                    "restart_needed": outcome.restart_needed,
                })),
                Err(reason) => reply(422, json!({ "error": reason })),
            },
            AdminRequest::Drain(on) => {
                self.set_draining(on);
                ok(json!({ "draining": on }))
            }
        };
        // The HTTP thread may have given up waiting; nothing to do then.
        let _ = call.reply.send(reply);
    }

    pub(super) fn set_draining(&mut self, on: bool) {
        if on != self.engine.is_draining() {
            if on {
                warn!(
                    allocations = self.engine.allocation_count(),
                    "draining: new allocations are refused, existing ones run until they expire"
                );
            } else {
                info!("drain ended: accepting new allocations");
            }
        }
        self.engine.set_draining(on);
        self.ops.readiness.set_draining(on);
        self.ops.gauges_dirty = true;
    }

    fn status(&self) -> AdminReply {
        let now = Instant::now();
        let listeners: Vec<Value> = self
            .ops
            .listeners
            .iter()
            .map(|(transport, addr)| json!({ "transport": transport, "address": addr.to_string() }))
            .collect();
        let (mut permissions, mut channels) = (0usize, 0usize);
        for info in self.engine.allocations() {
            permissions += info.permissions;
            channels += info.channels;
        }
        ok(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": now.saturating_duration_since(self.ops.started).as_secs(),
            "state": if self.engine.is_draining() { "draining" } else { "ready" },
            "listeners": listeners,
            "shards": self.counters.len(),
            // Off, the allocations' packet counters stay 0: the relay-usage page says so
            // instead of reading it as traffic that stopped.
            "metrics": self.config.ops.metrics,
            "allocations": self.engine.allocation_count(),
            "permissions": permissions,
            "channels": channels,
            "relayed": relayed_json(self.ops.telemetry.relayed()),
        }))
    }

    fn allocations_json(&self, user: Option<&str>, client: Option<&str>) -> AdminReply {
        let now = Instant::now();
        let wall = SystemTime::now();
        let unix = |at: Instant| -> f64 {
            let at_wall = if at >= now {
                wall + (at - now)
            } else {
                wall - (now - at)
            };
            at_wall
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| (d.as_secs_f64() * 1000.0).round() / 1000.0)
        };
        let list: Vec<Value> = self
            .engine
            .allocation_snapshots()
            .into_iter()
            .filter(|a| user.is_none_or(|u| a.user == u))
            .filter(|a| client.is_none_or(|c| client_matches(a.client.client, c)))
            .map(|a| {
                let counters = self.ops.telemetry.allocation_counters(a.id);
                json!({
                    "id": a.id.0,
                    "shard": a.shard.0,
                    "transport": transport_label(a.client.transport),
                    "client": a.client.client.to_string(),
                    "server": a.client.server.to_string(),
                    "username": a.user,
                    "relayed": a.relays.iter().map(|r| r.advertised.to_string()).collect::<Vec<_>>(),
                    "created": unix(a.created_at),
                    "expires": unix(a.expires_at),
                    "expires_in_secs": a.expires_at.saturating_duration_since(now).as_secs(),
                    "permissions": a.permissions.iter().map(|(ip, at)| json!({
                        "peer": ip.to_string(), "expires": unix(*at),
                    })).collect::<Vec<_>>(),
                    "channels": a.channels.iter().map(|(n, peer, at)| json!({
                        "channel": n, "peer": peer.to_string(), "expires": unix(*at),
                    })).collect::<Vec<_>>(),
                    "to_peer": relayed_json(counters)["to_peer"],
                    "to_client": relayed_json(counters)["to_client"],
                    "requests": a.requests,
                    "errors": a.errors,
                })
            })
            .collect();
        // The server's clock beside the list, so that a page on another machine computes ages
        // and expiries from these timestamps without its own clock's skew.
        ok(json!({ "now": unix(now), "allocations": list }))
    }

    /// Reload from SIGHUP or the API: users (static and file), REST secrets, peer policy,
    /// alternate servers, TLS certificates and log level. All or nothing: an invalid new
    /// configuration changes nothing.
    pub(super) fn reload_all(&mut self) -> Result<Reloaded, String> {
        let result = self.try_reload();
        match &result {
            Ok(outcome) => {
                metrics::counter!("uturn_reloads_total", "result" => "ok").increment(1);
                info!(
                    applied = %outcome.applied.join(","),
                    restart_needed = %outcome.restart_needed.join(","),
                    "configuration reloaded"
                );
            }
            Err(reason) => {
                metrics::counter!("uturn_reloads_total", "result" => "refused").increment(1);
                error!(%reason, "reload refused; the running configuration stays");
            }
        }
        result
    }

    fn try_reload(&mut self) -> Result<Reloaded, String> {
        let config = match &mut self.ops.reloader {
            Some(reload) => reload()?,
            None => self.config.clone(),
        };
        config.validate().map_err(|e| e.to_string())?;
        let users = crate::config::user_table(&config.auth).map_err(|e| e.to_string())?;
        if users.realm() != config.auth.realm && !users.is_empty() {
            return Err("auth.realm cannot change while running".into());
        }
        if config.auth.realm != self.config.auth.realm {
            return Err("auth.realm cannot change while running (restart uturn)".into());
        }
        if config.auth.secrets.is_empty() != self.config.auth.secrets.is_empty() {
            return Err(
                "auth.secrets: switching TURN REST credentials on or off needs a \
                        restart (issued nonces announce USERHASH only without them)"
                    .into(),
            );
        }
        // Everything uturn can check is checked; the hooks load their part (and keep the old
        // one when they fail), then the engine's part, which cannot fail any more, is applied.
        let mut applied = Vec::new();
        for hook in &mut self.ops.reload_hooks {
            applied.push(hook(&config)?);
        }
        self.engine
            .reload_secrets(&config.auth)
            .map_err(|e| e.to_string())?;
        self.engine.reload_users(users).map_err(|e| e.to_string())?;
        self.engine
            .set_peer_policy(PeerPolicy::from_config(&config.engine_config()));
        let guard = super::data_path_guard(self.engine.peer_policy());
        for shard in 0..self.dataplane.shard_count() {
            let shard = ShardId(u16::try_from(shard).unwrap_or(u16::MAX));
            self.send(shard, ShardCommand::SetPeerGuard(guard.clone()));
        }
        self.engine
            .set_alternate_servers(config.ops.alternate_servers.clone());
        applied.extend(["users", "secrets", "peers", "alternate_servers"]);
        // `self.config` stays what runs: the parts just applied come from the file, the rest
        // stays as started, so every reload names again what still waits for a restart.
        let running = &mut self.config;
        running.auth = config.auth.clone();
        running.peers = config.peers.clone();
        running.ops.alternate_servers = config.ops.alternate_servers.clone();
        if applied.contains(&RELOADED_TLS_CERTIFICATE) {
            running.server.tls_cert = config.server.tls_cert.clone();
            running.server.tls_key = config.server.tls_key.clone();
        }
        if config.ops.log_level != running.ops.log_level
            && let Some(set) = &self.ops.log_level
        {
            match set(&config.ops.log_level) {
                Ok(()) => {
                    applied.push("log_level");
                    running.ops.log_level = config.ops.log_level.clone();
                }
                Err(e) => warn!(error = %e, "log level not changed"),
            }
        }
        let restart_needed: Vec<&'static str> = [
            ("server", config.server != running.server),
            ("relay", config.relay != running.relay),
            ("limits", config.limits != running.limits),
            (
                "ops.http_listen",
                config.ops.http_listen != running.ops.http_listen,
            ),
            (
                "ops.http_token",
                config.ops.http_token != running.ops.http_token,
            ),
            (
                "ops.log_format",
                config.ops.log_format != running.ops.log_format,
            ),
            (
                "ops.counters_interval_ms",
                config.ops.counters_interval_ms != running.ops.counters_interval_ms,
            ),
            ("ops.metrics", config.ops.metrics != running.ops.metrics),
            (
                "ops.http_header_timeout_ms",
                config.ops.http_header_timeout_ms != running.ops.http_header_timeout_ms,
            ),
            (
                "ops.http_max_connections",
                config.ops.http_max_connections != running.ops.http_max_connections,
            ),
        ]
        .into_iter()
        .filter_map(|(field, changed)| changed.then_some(field))
        .collect();
        for field in &restart_needed {
            warn!(
                field,
                "differs in the configuration from what runs; it takes effect only after a restart"
            );
        }
        Ok(Reloaded {
            applied,
            restart_needed,
        })
    }

    /// Counts an event and writes the operator's log line for it. Allocation lifecycle lines
    /// are never held back (one per allocation, each a distinct fact); lines that a flood
    /// repeats (authentication failures, refused peers) go through the [`LogLimiter`].
    pub(super) fn observe(&mut self, event: &Event) {
        let now = Instant::now();
        self.ops.telemetry.on_event(event, now);
        match event {
            Event::AllocationCreated {
                alloc,
                client,
                user,
                relays,
                lifetime_secs,
            } => {
                self.ops.gauges_dirty = true;
                let entry = AllocationLog {
                    user: user.clone(),
                    client: client.client,
                    transport: transport_label(client.transport),
                    relays: relays
                        .iter()
                        .map(|r| r.advertised.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                };
                let shard = self.owners.get(alloc).map_or(-1, |s| i32::from(s.0));
                info!(
                    alloc = alloc.0,
                    shard,
                    user = %entry.user,
                    client = %entry.client,
                    transport = entry.transport,
                    relayed = %entry.relays,
                    lifetime_secs,
                    "allocation created"
                );
                self.ops.logs.insert(*alloc, entry);
            }
            Event::AllocationRefreshed {
                alloc,
                lifetime_secs,
            } => {
                if let Some(entry) = self.ops.logs.get(alloc) {
                    info!(
                        alloc = alloc.0,
                        user = %entry.user,
                        client = %entry.client,
                        relayed = %entry.relays,
                        lifetime_secs,
                        "allocation refreshed"
                    );
                }
            }
            Event::AllocationDeleted { alloc }
            | Event::AllocationExpired { alloc }
            | Event::AllocationRevoked { alloc } => {
                self.ops.gauges_dirty = true;
                let how = match event {
                    Event::AllocationDeleted { .. } => "allocation deleted by its client",
                    Event::AllocationExpired { .. } => "allocation expired",
                    _ => "allocation ended by an operator",
                };
                let counters = self.ops.telemetry.allocation_counters(*alloc);
                if let Some(entry) = self.ops.logs.remove(alloc) {
                    uturn_dataplane::sparse::shrink_map(&mut self.ops.logs);
                    info!(
                        alloc = alloc.0,
                        user = %entry.user,
                        client = %entry.client,
                        relayed = %entry.relays,
                        to_peer_packets = counters.to_peer_packets,
                        to_client_packets = counters.to_client_packets,
                        "{how}"
                    );
                }
            }
            Event::PermissionCreated { .. }
            | Event::PermissionExpired { .. }
            | Event::ChannelBound { .. }
            | Event::ChannelExpired { .. } => self.ops.gauges_dirty = true,
            Event::PermissionRevoked {
                alloc,
                peer_ip,
                reason,
            } => {
                self.ops.gauges_dirty = true;
                if self.ops.limiter.allow("peer_revoked", now) {
                    warn!(
                        alloc = alloc.0,
                        peer = %peer_ip,
                        reason = reason.as_str(),
                        "permission revoked: the reloaded peer policy refuses this peer"
                    );
                }
            }
            // The limiter sits in the guards: a line held back is counted there and the event
            // falls through to the no-op arm.
            Event::AuthFailed {
                client,
                username,
                reason,
                code,
            } if *reason != AuthFailure::NoCredentials
                && self.ops.limiter.allow(reason.as_str(), now) =>
            {
                let user = username.as_deref().unwrap_or("-");
                let advice = auth_advice(*reason, user, &self.config.auth, SystemTime::now());
                warn!(
                    client = %client.client,
                    user,
                    reason = reason.as_str(),
                    code,
                    "authentication failed: {advice}"
                );
            }
            // Rate limiting is itself rate-limited in the log: a flood shows as one line per
            // limiter interval plus the "suppressed" summary, and in the counters.
            Event::Dropped {
                client,
                reason: reason @ (DropReason::RateLimited | DropReason::AuthRateLimited),
            } if self.ops.limiter.allow(reason.as_str(), now) => {
                warn!(
                    client = %client.client,
                    reason = reason.as_str(),
                    "source over its request budget: requests dropped without an answer"
                );
            }
            Event::PeerDenied {
                alloc,
                peer_ip,
                reason,
            } if self.ops.limiter.allow("peer_denied", now) => {
                let user = self.ops.logs.get(alloc).map_or("-", |e| e.user.as_str());
                warn!(
                    alloc = alloc.0,
                    user,
                    peer = %peer_ip,
                    reason = ?reason,
                    "peer refused by the peer policy (403)"
                );
            }
            _ => {}
        }
    }

    /// Periodic work after each loop turn: gauges and suppressed-log summaries.
    pub(super) fn ops_tick(&mut self) {
        let now = Instant::now();
        if self.ops.gauges_dirty
            && now.saturating_duration_since(self.ops.gauges_at) >= GAUGES_INTERVAL
        {
            self.ops
                .telemetry
                .set_gauges(self.engine.allocations(), self.engine.is_draining());
            self.ops.gauges_dirty = false;
            self.ops.gauges_at = now;
        }
        self.ops.limiter.summarise(now);
    }
}

fn relayed_json(c: uturn_dataplane::AllocationCounters) -> Value {
    json!({
        "to_peer": { "packets": c.to_peer_packets, "bytes": c.to_peer_bytes },
        "to_client": { "packets": c.to_client_packets, "bytes": c.to_client_bytes },
    })
}

fn ok(body: Value) -> AdminReply {
    reply(200, body)
}

fn reply(status: u16, body: Value) -> AdminReply {
    AdminReply { status, body }
}

/// Whether `client` matches a filter given as an IP or as IP:port.
fn client_matches(client: SocketAddr, filter: &str) -> bool {
    if let Ok(addr) = filter.parse::<SocketAddr>() {
        return addr == client;
    }
    filter
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip == client.ip())
}

/// What an operator should do about an authentication failure.
fn auth_advice(
    reason: AuthFailure,
    user: &str,
    auth: &crate::config::AuthConfig,
    wall: SystemTime,
) -> String {
    match reason {
        AuthFailure::BadIntegrity => format!(
            "user '{user}' failed MESSAGE-INTEGRITY: the password configured on the client \
             differs from uturn's"
        ),
        AuthFailure::UnknownUser => format!(
            "unknown user '{user}': not a configured user nor a TURN REST username uturn can \
             check; add it to the users file or fix the client's username"
        ),
        AuthFailure::ExpiredCredential => {
            let expiry = user
                .split(auth.rest_separator)
                .next()
                .and_then(|t| t.parse::<u64>().ok());
            match expiry {
                Some(t) => {
                    let now = wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                    format!(
                        "REST credential expired at {} ({} s ago): the application must issue \
                         fresh TURN credentials (or the clocks differ)",
                        utc_timestamp(t),
                        now.saturating_sub(t)
                    )
                }
                None => "REST credential expired".to_owned(),
            }
        }
        AuthFailure::ExpiryTooFar => {
            let expiry = user
                .split(auth.rest_separator)
                .next()
                .and_then(|t| t.parse::<u64>().ok());
            let now = wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let ahead = expiry.map_or_else(
                || "?".to_owned(),
                |t| format!("{} s", t.saturating_sub(now)),
            );
            format!(
                "REST credential expires {ahead} from now, more than auth.rest_expiry_max_secs \
                 ({} s) allows: the application issues TURN credentials with too long a TTL \
                 (the REST draft recommends one day), or the clocks differ",
                auth.rest_expiry_max()
            )
        }
        AuthFailure::StaleNonce => "nonce stale: the client must retry with the new NONCE \
                                     (normal now and then; constant failures mean a broken client)"
            .to_owned(),
        AuthFailure::RealmMismatch => format!(
            "realm mismatch: the client's REALM differs from uturn's '{}'",
            auth.realm
        ),
        other => format!("{}: malformed or inconsistent credentials", other.as_str()),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix timestamp (proleptic Gregorian, UTC).
pub(super) fn utc_timestamp(unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (non-negative here).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Token buckets per kind of log line, so a flood (a scanner guessing passwords, a client in a
/// retry loop) cannot fill a disk; what is held back is summarised every
/// [`LOG_SUMMARY_INTERVAL`].
#[derive(Debug)]
pub(super) struct LogLimiter {
    buckets: HashMap<&'static str, (f64, Instant, u64)>,
    summarised_at: Instant,
}

impl LogLimiter {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            buckets: HashMap::new(),
            summarised_at: now,
        }
    }

    /// Whether a line of `kind` may be written now; counts it as suppressed otherwise.
    pub(super) fn allow(&mut self, kind: &'static str, now: Instant) -> bool {
        let (tokens, at, suppressed) = self.buckets.entry(kind).or_insert((LOG_BURST, now, 0));
        let refill = now.saturating_duration_since(*at).as_secs_f64() * LOG_REFILL_PER_SEC;
        *tokens = (*tokens + refill).min(LOG_BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            *suppressed += 1;
            false
        }
    }

    /// Writes one line per kind with suppressed lines, at most every [`LOG_SUMMARY_INTERVAL`].
    /// Returns how many lines were reported suppressed.
    pub(super) fn summarise(&mut self, now: Instant) -> u64 {
        if now.saturating_duration_since(self.summarised_at) < LOG_SUMMARY_INTERVAL {
            return 0;
        }
        self.summarised_at = now;
        let mut total = 0;
        for (kind, (_, _, suppressed)) in &mut self.buckets {
            if *suppressed > 0 {
                warn!(
                    kind,
                    suppressed = *suppressed,
                    "{} similar log lines suppressed",
                    *suppressed
                );
                total += *suppressed;
                *suppressed = 0;
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_lines_is_cut_to_the_burst_and_summarised() {
        let start = Instant::now();
        let mut limiter = LogLimiter::new(start);
        let allowed = (0..1000)
            .filter(|_| limiter.allow("bad_integrity", start))
            .count();
        assert_eq!(allowed, 20);
        assert!(
            limiter.allow("unknown_user", start),
            "kinds have their own buckets"
        );
        // One second refills five lines.
        let later = start + Duration::from_secs(1);
        let allowed = (0..100)
            .filter(|_| limiter.allow("bad_integrity", later))
            .count();
        assert_eq!(allowed, 5);
        assert_eq!(limiter.summarise(later), 0, "not yet time for a summary");
        assert_eq!(limiter.summarise(start + LOG_SUMMARY_INTERVAL), 980 + 95);
        assert_eq!(limiter.summarise(start + LOG_SUMMARY_INTERVAL * 2), 0);
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn auth_advice_names_the_fix() {
        let auth = crate::config::AuthConfig::default();
        let wall = UNIX_EPOCH + Duration::from_secs(1_700_000_100);
        let bad = auth_advice(AuthFailure::BadIntegrity, "cms", &auth, wall);
        assert!(bad.contains("user 'cms' failed MESSAGE-INTEGRITY"), "{bad}");
        let expired = auth_advice(
            AuthFailure::ExpiredCredential,
            "1700000000:cms",
            &auth,
            wall,
        );
        assert!(
            expired.contains("expired at 2023-11-14T22:13:20Z (100 s ago)"),
            "{expired}"
        );
        let too_far = auth_advice(AuthFailure::ExpiryTooFar, "1800000000:cms", &auth, wall);
        assert!(
            too_far.contains(
                "expires 99999900 s from now, more than auth.rest_expiry_max_secs (86400 s)"
            ),
            "{too_far}"
        );
        assert!(auth_advice(AuthFailure::UnknownUser, "x", &auth, wall).contains("unknown user"));
        assert!(auth_advice(AuthFailure::StaleNonce, "x", &auth, wall).contains("nonce stale"));
    }

    #[test]
    fn client_filters_match_an_ip_or_an_address() {
        let client: SocketAddr = "198.51.100.7:5000".parse().unwrap();
        assert!(client_matches(client, "198.51.100.7"));
        assert!(client_matches(client, "198.51.100.7:5000"));
        assert!(!client_matches(client, "198.51.100.7:5001"));
        assert!(!client_matches(client, "nonsense"));
    }
}
