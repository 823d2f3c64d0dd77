//! Prometheus metrics: engine events and shard counters turned into `metrics` calls.
//!
//! Shards keep plain local counters and publish cumulative totals every
//! `ops.counters_interval_ms` ([`uturn_dataplane::Counters`]); [`Telemetry::on_counters`] turns
//! the differences into counter increments here, on the control thread. Nothing on the packet
//! path touches an atomic or a lock for metrics. No metric has a per-user or per-allocation
//! label: the admin API serves per-allocation detail.
//!
//! Every name uturn exports is listed in [`METRIC_NAMES`]; the Grafana dashboard test checks
//! its queries against that list.

use std::time::Instant;

use hashbrown::HashMap;
use metrics::{Unit, counter, gauge, histogram};
use uturn_dataplane::{AllocationCounters, Counters, ShardCounters};

use crate::engine::Event;
use crate::{AllocationId, AllocationInfo, AuthFailure, Transport};

/// Every metric family uturn exports (histograms without their `_bucket`/`_sum`/`_count`
/// suffixes).
pub const METRIC_NAMES: &[&str] = &[
    "uturn_build_info",
    "uturn_start_time_seconds",
    "uturn_draining",
    "uturn_allocations",
    "uturn_permissions",
    "uturn_channels",
    "uturn_connections",
    "uturn_requests_total",
    "uturn_auth_failures_total",
    "uturn_relayed_packets_total",
    "uturn_relayed_bytes_total",
    "uturn_dropped_packets_total",
    "uturn_allocation_lifetime_seconds",
    "uturn_shard_received_datagrams_total",
    "uturn_shard_relayed_packets_total",
    "uturn_dataplane_loop_turns_total",
    "uturn_dataplane_completions_total",
    "uturn_dataplane_completions_per_turn_max",
    "uturn_dataplane_submits_total",
    "uturn_connection_panics_total",
    "uturn_proxy_headers_total",
    "uturn_forwarded_connections_total",
    "uturn_forwarded_bytes_total",
    "uturn_forward_failures_total",
    "uturn_reloads_total",
    "uturn_http_open_connections",
    "uturn_http_connections_dropped_total",
    "uturn_http_requests_refused_total",
    "uturn_xdp_packets_total",
    "uturn_xdp_map_failures_total",
];

/// The kind of a metric family, as `# TYPE` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only grows.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Samples in buckets.
    Histogram,
}

/// The `# HELP` text of every family in [`METRIC_NAMES`]: name, kind, unit and what it counts,
/// in the words an operator reading a dashboard needs.
pub const METRIC_HELP: &[(&str, MetricKind, Option<Unit>, &str)] = &[
    (
        "uturn_build_info",
        MetricKind::Gauge,
        None,
        "Always 1; the version label is the running uturn's version",
    ),
    (
        "uturn_start_time_seconds",
        MetricKind::Gauge,
        Some(Unit::Seconds),
        "When the process started, Unix time",
    ),
    (
        "uturn_draining",
        MetricKind::Gauge,
        None,
        "1 while draining (new allocations refused: POST /api/v1/drain or SIGUSR1), 0 otherwise",
    ),
    (
        "uturn_allocations",
        MetricKind::Gauge,
        None,
        "Live allocations per shard",
    ),
    (
        "uturn_permissions",
        MetricKind::Gauge,
        None,
        "Installed permissions (peer IPs a client may exchange data with) per shard",
    ),
    (
        "uturn_channels",
        MetricKind::Gauge,
        None,
        "Bound channels per shard",
    ),
    (
        "uturn_connections",
        MetricKind::Gauge,
        None,
        "Open TCP and TLS client connections per shard and transport",
    ),
    (
        "uturn_requests_total",
        MetricKind::Counter,
        None,
        "STUN/TURN requests answered, by method and response code (200 for a success)",
    ),
    (
        "uturn_auth_failures_total",
        MetricKind::Counter,
        None,
        "Requests refused by authentication, by reason (the log line says what to fix)",
    ),
    (
        "uturn_relayed_packets_total",
        MetricKind::Counter,
        None,
        "Packets relayed, by direction (to_peer, to_client), client transport and path (socket: the shards; xdp: the XDP program)",
    ),
    (
        "uturn_relayed_bytes_total",
        MetricKind::Counter,
        Some(Unit::Bytes),
        "Application bytes relayed, by direction (to_peer, to_client), client transport and path (socket, xdp)",
    ),
    (
        "uturn_dropped_packets_total",
        MetricKind::Counter,
        None,
        "Packets the relay dropped instead of relaying, by reason",
    ),
    (
        "uturn_allocation_lifetime_seconds",
        MetricKind::Histogram,
        Some(Unit::Seconds),
        "How long allocations lived, from creation to deletion or expiry",
    ),
    (
        "uturn_shard_received_datagrams_total",
        MetricKind::Counter,
        None,
        "Datagrams a shard received, by source (client or peer): the load of each shard",
    ),
    (
        "uturn_shard_relayed_packets_total",
        MetricKind::Counter,
        None,
        "Packets a shard relayed, by direction",
    ),
    (
        "uturn_dataplane_loop_turns_total",
        MetricKind::Counter,
        None,
        "Turns of a shard's event loop",
    ),
    (
        "uturn_dataplane_completions_total",
        MetricKind::Counter,
        None,
        "I/O completions a shard handled",
    ),
    (
        "uturn_dataplane_completions_per_turn_max",
        MetricKind::Gauge,
        None,
        "Most I/O completions one loop turn handled in the last report interval",
    ),
    (
        "uturn_dataplane_submits_total",
        MetricKind::Counter,
        None,
        "Submissions a shard made to the kernel (io_uring_enter or a batch system call)",
    ),
    (
        "uturn_connection_panics_total",
        MetricKind::Counter,
        None,
        "TCP/TLS connections closed because a panic in their TLS or framing work was caught \
         (a bug: the log has the backtrace), per shard",
    ),
    (
        "uturn_proxy_headers_total",
        MetricKind::Counter,
        None,
        "PROXY protocol headers on TCP/TLS connections: accepted from a trusted balancer \
         (server.proxy_protocol_from), or refused and the connection closed",
    ),
    (
        "uturn_forwarded_connections_total",
        MetricKind::Counter,
        None,
        "TLS connections of a shared auto:// port passed through to server.forward_other_to",
    ),
    (
        "uturn_forwarded_bytes_total",
        MetricKind::Counter,
        Some(Unit::Bytes),
        "Bytes passed through between clients and server.forward_other_to, per direction",
    ),
    (
        "uturn_forward_failures_total",
        MetricKind::Counter,
        None,
        "Passed-through connections that failed (the web service refused or broke, or the \
         forwarder was full) or were closed idle",
    ),
    (
        "uturn_reloads_total",
        MetricKind::Counter,
        None,
        "Configuration reloads (SIGHUP or POST /api/v1/reload), by result (ok, refused)",
    ),
    (
        "uturn_http_open_connections",
        MetricKind::Gauge,
        None,
        "Connections open on the HTTP listener (metrics, health, admin API, relay-usage page)",
    ),
    (
        "uturn_http_connections_dropped_total",
        MetricKind::Counter,
        None,
        "HTTP connections the listener closed before answering, by reason (cap, timeouts)",
    ),
    (
        "uturn_http_requests_refused_total",
        MetricKind::Counter,
        None,
        "HTTP requests refused before they ran, by reason (token, host, framing, size)",
    ),
    (
        "uturn_xdp_packets_total",
        MetricKind::Counter,
        None,
        "Datagrams the XDP program saw, by what it did (forwarded each way, or why it passed \
         one to the kernel)",
    ),
    (
        "uturn_xdp_map_failures_total",
        MetricKind::Counter,
        None,
        "Channels the control thread could not write into the XDP maps (they stay on the \
         socket path)",
    ),
];

/// Gives every family its `# HELP` text (and unit) in the installed recorder. Called once the
/// recorder is installed: descriptions given before are lost.
pub fn describe_metrics() {
    for &(name, kind, unit, help) in METRIC_HELP {
        match (kind, unit) {
            (MetricKind::Counter, Some(unit)) => metrics::describe_counter!(name, unit, help),
            (MetricKind::Counter, None) => metrics::describe_counter!(name, help),
            (MetricKind::Gauge, Some(unit)) => metrics::describe_gauge!(name, unit, help),
            (MetricKind::Gauge, None) => metrics::describe_gauge!(name, help),
            (MetricKind::Histogram, Some(unit)) => metrics::describe_histogram!(name, unit, help),
            (MetricKind::Histogram, None) => metrics::describe_histogram!(name, help),
        }
    }
}

/// Histogram buckets for allocation lifetimes, seconds: a failed call lasts seconds, a
/// meeting an hour or more (refreshed allocations live past the 3600 s maximum lifetime).
pub const LIFETIME_BUCKETS_SECS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
];

/// The authentication failure reasons counted (the first leg of every handshake, a request
/// without credentials, is not a failure).
const AUTH_REASONS: [AuthFailure; 9] = [
    AuthFailure::UnknownUser,
    AuthFailure::BadIntegrity,
    AuthFailure::StaleNonce,
    AuthFailure::ExpiredCredential,
    AuthFailure::ExpiryTooFar,
    AuthFailure::RealmMismatch,
    AuthFailure::MissingAttributes,
    AuthFailure::AlgorithmMismatch,
    AuthFailure::AlgorithmUnavailable,
];

/// What the control thread remembers per allocation for metrics.
#[derive(Debug, Clone, Copy)]
struct Tracked {
    transport: Transport,
    created_at: Instant,
    last: AllocationCounters,
    /// The shard that reports it, once a report has named it.
    shard: Option<u16>,
    /// When the engine removed it; its final counters may still be on their way from the shard.
    retired: Option<Instant>,
}

/// How long a removed allocation is remembered when its shard never reports it (a lost
/// report); a bound on the map, not a normal path.
const RETIRED_KEEP: std::time::Duration = std::time::Duration::from_secs(60);

/// Converts engine events and shard counter reports into metrics.
#[derive(Debug)]
pub struct Telemetry {
    shards: Vec<ShardCounters>,
    allocations: HashMap<AllocationId, Tracked>,
    /// Packets and bytes relayed since start, summed over every allocation.
    relayed: AllocationCounters,
    /// Allocations the engine removed whose final report may still come.
    retired: hashbrown::HashSet<AllocationId>,
    /// The latest XDP counters (cumulative) of each allocation the program relayed for.
    xdp: HashMap<AllocationId, AllocationCounters>,
}

impl Telemetry {
    /// Registers every metric family with zero values so that dashboards see them at once.
    pub fn new(shard_count: usize, start_unix_secs: f64) -> Self {
        gauge!("uturn_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        gauge!("uturn_start_time_seconds").set(start_unix_secs);
        gauge!("uturn_draining").set(0.0);
        for reason in AUTH_REASONS {
            counter!("uturn_auth_failures_total", "reason" => reason.as_str()).absolute(0);
        }
        for transport in [Transport::Udp, Transport::Tcp, Transport::Tls] {
            for direction in ["to_peer", "to_client"] {
                let t = transport_label(transport);
                counter!("uturn_relayed_packets_total", "direction" => direction, "transport" => t, "path" => "socket")
                    .absolute(0);
                counter!("uturn_relayed_bytes_total", "direction" => direction, "transport" => t, "path" => "socket")
                    .absolute(0);
            }
        }
        // The XDP program relays UDP clients only.
        for direction in ["to_peer", "to_client"] {
            counter!("uturn_relayed_packets_total", "direction" => direction, "transport" => "udp", "path" => "xdp")
                .absolute(0);
            counter!("uturn_relayed_bytes_total", "direction" => direction, "transport" => "udp", "path" => "xdp")
                .absolute(0);
        }
        for reason in uturn_dataplane::DropReason::ALL {
            counter!("uturn_dropped_packets_total", "reason" => reason.name()).absolute(0);
        }
        counter!("uturn_dropped_packets_total", "reason" => "peer_denied").absolute(0);
        for result in ["ok", "refused"] {
            counter!("uturn_reloads_total", "result" => result).absolute(0);
        }
        for shard in 0..shard_count {
            let s = shard.to_string();
            gauge!("uturn_allocations", "shard" => s.clone()).set(0.0);
            gauge!("uturn_permissions", "shard" => s.clone()).set(0.0);
            gauge!("uturn_channels", "shard" => s.clone()).set(0.0);
            for direction in ["to_peer", "to_client"] {
                counter!("uturn_shard_relayed_packets_total", "shard" => s.clone(), "direction" => direction)
                    .absolute(0);
            }
            for source in ["client", "peer"] {
                counter!("uturn_shard_received_datagrams_total", "shard" => s.clone(), "source" => source)
                    .absolute(0);
            }
            for name in [
                "uturn_dataplane_loop_turns_total",
                "uturn_dataplane_completions_total",
                "uturn_dataplane_submits_total",
                "uturn_connection_panics_total",
                "uturn_forwarded_connections_total",
            ] {
                counter!(name, "shard" => s.clone()).absolute(0);
            }
            for outcome in ["accepted", "refused"] {
                counter!("uturn_proxy_headers_total", "shard" => s.clone(), "outcome" => outcome)
                    .absolute(0);
            }
            for direction in ["to_backend", "to_client"] {
                counter!("uturn_forwarded_bytes_total", "shard" => s.clone(), "direction" => direction)
                    .absolute(0);
            }
            for reason in ["error", "timeout"] {
                counter!("uturn_forward_failures_total", "shard" => s.clone(), "reason" => reason)
                    .absolute(0);
            }
            gauge!("uturn_dataplane_completions_per_turn_max", "shard" => s.clone()).set(0.0);
            for transport in ["tcp", "tls"] {
                gauge!("uturn_connections", "shard" => s.clone(), "transport" => transport)
                    .set(0.0);
            }
        }
        Self {
            shards: vec![ShardCounters::default(); shard_count],
            allocations: HashMap::new(),
            relayed: AllocationCounters::default(),
            retired: hashbrown::HashSet::new(),
            xdp: HashMap::new(),
        }
    }

    /// Packets and bytes relayed since start, each way (what the `uturn_relayed_*` counters
    /// say, summed over transports).
    pub fn relayed(&self) -> AllocationCounters {
        self.relayed
    }

    /// Counts one engine event.
    pub fn on_event(&mut self, event: &Event, now: Instant) {
        match event {
            Event::RequestHandled { method, code, .. } => {
                let method = method.name().unwrap_or("unknown");
                let code = code.map_or_else(|| "200".to_owned(), |c| c.to_string());
                counter!("uturn_requests_total", "method" => method, "code" => code).increment(1);
            }
            Event::AuthFailed { reason, .. } if *reason != AuthFailure::NoCredentials => {
                counter!("uturn_auth_failures_total", "reason" => reason.as_str()).increment(1);
            }
            Event::AllocationCreated { alloc, client, .. } => {
                self.allocations.insert(
                    *alloc,
                    Tracked {
                        transport: client.transport,
                        created_at: now,
                        last: AllocationCounters::default(),
                        shard: None,
                        retired: None,
                    },
                );
            }
            Event::AllocationDeleted { alloc }
            | Event::AllocationExpired { alloc }
            | Event::AllocationRevoked { alloc } => {
                if let Some(tracked) = self.allocations.get_mut(alloc) {
                    tracked.retired = Some(now);
                    self.retired.insert(*alloc);
                    let lived = now.saturating_duration_since(tracked.created_at);
                    histogram!("uturn_allocation_lifetime_seconds").record(lived.as_secs_f64());
                }
            }
            Event::PeerDenied { .. } => {
                counter!("uturn_dropped_packets_total", "reason" => "peer_denied").increment(1);
            }
            Event::Dropped { reason, .. } => {
                counter!("uturn_dropped_packets_total", "reason" => reason.as_str()).increment(1);
            }
            _ => {}
        }
    }

    /// Turns one shard report (cumulative totals) into counter increments.
    pub fn on_counters(&mut self, report: &Counters) {
        let index = usize::from(report.shard.0);
        let Some(previous) = self.shards.get_mut(index) else {
            return;
        };
        let now = report.shard_counters;
        let delta = |new: u64, old: u64| new.saturating_sub(old);
        let shard = index.to_string();
        counter!("uturn_shard_received_datagrams_total", "shard" => shard.clone(), "source" => "client")
            .increment(delta(now.client_datagrams, previous.client_datagrams));
        counter!("uturn_shard_received_datagrams_total", "shard" => shard.clone(), "source" => "peer")
            .increment(delta(now.peer_datagrams, previous.peer_datagrams));
        counter!("uturn_shard_relayed_packets_total", "shard" => shard.clone(), "direction" => "to_peer")
            .increment(delta(now.to_peer_packets, previous.to_peer_packets));
        counter!("uturn_shard_relayed_packets_total", "shard" => shard.clone(), "direction" => "to_client")
            .increment(delta(now.to_client_packets, previous.to_client_packets));
        for (reason, count) in now.drops.iter() {
            counter!("uturn_dropped_packets_total", "reason" => reason.name())
                .increment(delta(count, previous.drops.get(reason)));
        }
        counter!("uturn_dataplane_loop_turns_total", "shard" => shard.clone())
            .increment(delta(now.loop_turns, previous.loop_turns));
        counter!("uturn_dataplane_completions_total", "shard" => shard.clone())
            .increment(delta(now.completions, previous.completions));
        counter!("uturn_dataplane_submits_total", "shard" => shard.clone())
            .increment(delta(now.submits, previous.submits));
        // Stream connections closed because their TLS or framing work panicked (caught in the
        // shard; each is logged there with its backtrace).
        counter!("uturn_connection_panics_total", "shard" => shard.clone())
            .increment(delta(now.connection_panics, previous.connection_panics));
        // The stream edge: PROXY headers, and the shared port's passthrough to the web service.
        counter!("uturn_proxy_headers_total", "shard" => shard.clone(), "outcome" => "accepted")
            .increment(delta(now.proxy_headers, previous.proxy_headers));
        counter!("uturn_proxy_headers_total", "shard" => shard.clone(), "outcome" => "refused")
            .increment(delta(now.proxy_refused, previous.proxy_refused));
        counter!("uturn_forwarded_connections_total", "shard" => shard.clone()).increment(delta(
            now.forwarded_connections,
            previous.forwarded_connections,
        ));
        counter!("uturn_forwarded_bytes_total", "shard" => shard.clone(), "direction" => "to_backend")
            .increment(delta(now.forwarded_bytes_to_backend, previous.forwarded_bytes_to_backend));
        counter!("uturn_forwarded_bytes_total", "shard" => shard.clone(), "direction" => "to_client")
            .increment(delta(now.forwarded_bytes_to_client, previous.forwarded_bytes_to_client));
        counter!("uturn_forward_failures_total", "shard" => shard.clone(), "reason" => "error")
            .increment(delta(now.forward_errors, previous.forward_errors));
        counter!("uturn_forward_failures_total", "shard" => shard.clone(), "reason" => "timeout")
            .increment(delta(now.forward_timeouts, previous.forward_timeouts));
        #[allow(clippy::cast_precision_loss)] // a per-turn count, far below 2^52
        gauge!("uturn_dataplane_completions_per_turn_max", "shard" => shard)
            .set(now.completions_per_turn_max as f64);
        *previous = now;

        let mut by_transport = [AllocationCounters::default(); 3];
        for &(alloc, ref counters) in &report.allocations {
            // An allocation the control thread no longer tracks (it lived and ended between two
            // reports) still counts, from zero.
            let tracked = self.allocations.entry(alloc).or_insert(Tracked {
                transport: Transport::Udp,
                created_at: Instant::now(),
                last: AllocationCounters::default(),
                shard: None,
                retired: Some(Instant::now()),
            });
            tracked.shard = Some(report.shard.0);
            if tracked.retired.is_some() {
                self.retired.insert(alloc);
            }
            let last = tracked.last;
            let moved = AllocationCounters {
                to_peer_packets: delta(counters.to_peer_packets, last.to_peer_packets),
                to_peer_bytes: delta(counters.to_peer_bytes, last.to_peer_bytes),
                to_client_packets: delta(counters.to_client_packets, last.to_client_packets),
                to_client_bytes: delta(counters.to_client_bytes, last.to_client_bytes),
            };
            add(&mut by_transport[transport_index(tracked.transport)], moved);
            add(&mut self.relayed, moved);
            tracked.last = *counters;
        }
        // One registry update per series and report, not per allocation.
        for transport in [Transport::Udp, Transport::Tcp, Transport::Tls] {
            let moved = by_transport[transport_index(transport)];
            if moved == AllocationCounters::default() {
                continue;
            }
            let t = transport_label(transport);
            counter!("uturn_relayed_packets_total", "direction" => "to_peer", "transport" => t, "path" => "socket")
                .increment(moved.to_peer_packets);
            counter!("uturn_relayed_bytes_total", "direction" => "to_peer", "transport" => t, "path" => "socket")
                .increment(moved.to_peer_bytes);
            counter!("uturn_relayed_packets_total", "direction" => "to_client", "transport" => t, "path" => "socket")
                .increment(moved.to_client_packets);
            counter!("uturn_relayed_bytes_total", "direction" => "to_client", "transport" => t, "path" => "socket")
                .increment(moved.to_client_bytes);
        }
        // A retired allocation that its own shard no longer reports has had its final counters
        // counted (a shard reports a removed allocation once, with its final values).
        if self.retired.is_empty() {
            return;
        }
        let reported: hashbrown::HashSet<u64> =
            report.allocations.iter().map(|(a, _)| a.0).collect();
        let shard = report.shard.0;
        let now = Instant::now();
        let allocations = &mut self.allocations;
        self.retired.retain(|alloc| {
            let Some(tracked) = allocations.get(alloc) else {
                return false;
            };
            let retired = tracked.retired.unwrap_or(now);
            let final_counted = tracked.shard == Some(shard) && !reported.contains(&alloc.0);
            let lost = now.saturating_duration_since(retired) > RETIRED_KEEP;
            if final_counted || lost {
                allocations.remove(alloc);
                return false;
            }
            true
        });
        uturn_dataplane::sparse::shrink_map(&mut self.allocations);
        uturn_dataplane::sparse::shrink_set(&mut self.retired);
    }

    /// Turns the XDP program's per-allocation counters (cumulative) into increments of the
    /// `path="xdp"` series, and keeps them for the admin API.
    pub fn on_xdp_counters(&mut self, reports: &[crate::xdp::XdpReport]) {
        let mut moved = AllocationCounters::default();
        for report in reports {
            let last = if report.ended {
                self.xdp.remove(&report.alloc).unwrap_or_default()
            } else {
                self.xdp
                    .insert(report.alloc, report.counters)
                    .unwrap_or_default()
            };
            let c = report.counters;
            moved.to_peer_packets += c.to_peer_packets.saturating_sub(last.to_peer_packets);
            moved.to_peer_bytes += c.to_peer_bytes.saturating_sub(last.to_peer_bytes);
            moved.to_client_packets += c.to_client_packets.saturating_sub(last.to_client_packets);
            moved.to_client_bytes += c.to_client_bytes.saturating_sub(last.to_client_bytes);
        }
        uturn_dataplane::sparse::shrink_map(&mut self.xdp);
        add(&mut self.relayed, moved);
        for (direction, packets, bytes) in [
            ("to_peer", moved.to_peer_packets, moved.to_peer_bytes),
            ("to_client", moved.to_client_packets, moved.to_client_bytes),
        ] {
            counter!("uturn_relayed_packets_total", "direction" => direction, "transport" => "udp", "path" => "xdp")
                .increment(packets);
            counter!("uturn_relayed_bytes_total", "direction" => direction, "transport" => "udp", "path" => "xdp")
                .increment(bytes);
        }
    }

    /// Publishes the XDP program's own counters: per forward/pass/drop reason (`pass_*` went
    /// on to the kernel and the shards), and the channels left on the socket path because the
    /// program's maps were full.
    pub fn set_xdp_reasons(&self, reasons: &uturn_xdp::ReasonCounters, map_failures: u64) {
        for (reason, count) in reasons.iter() {
            counter!("uturn_xdp_packets_total", "reason" => reason.label()).absolute(count);
        }
        counter!("uturn_xdp_map_failures_total").absolute(map_failures);
    }

    /// The latest packet and byte counters of one allocation, for the admin API: the shards'
    /// and the XDP program's together.
    pub fn allocation_counters(&self, alloc: AllocationId) -> AllocationCounters {
        let mut sum = self
            .allocations
            .get(&alloc)
            .map(|t| t.last)
            .unwrap_or_default();
        if let Some(xdp) = self.xdp.get(&alloc) {
            add(&mut sum, *xdp);
        }
        sum
    }

    /// Sets the number of open TCP or TLS client connections of one shard (for the stream
    /// transports, which report them with their counters).
    #[allow(clippy::cast_precision_loss)] // a connection count, far below 2^52
    pub fn set_connections(&self, shard: usize, transport: Transport, open: u64) {
        gauge!("uturn_connections", "shard" => shard.to_string(), "transport" => transport_label(transport))
            .set(open as f64);
    }

    /// Sets the per-shard gauges from the engine's view of its allocations.
    pub fn set_gauges<'a>(
        &self,
        allocations: impl Iterator<Item = AllocationInfo<'a>>,
        draining: bool,
    ) {
        let mut per_shard = vec![(0usize, 0usize, 0usize); self.shards.len()];
        for info in allocations {
            if let Some(slot) = per_shard.get_mut(usize::from(info.shard.0)) {
                slot.0 += 1;
                slot.1 += info.permissions;
                slot.2 += info.channels;
            }
        }
        #[allow(clippy::cast_precision_loss)] // counts of live objects, far below 2^52
        for (shard, (allocations, permissions, channels)) in per_shard.into_iter().enumerate() {
            let s = shard.to_string();
            gauge!("uturn_allocations", "shard" => s.clone()).set(allocations as f64);
            gauge!("uturn_permissions", "shard" => s.clone()).set(permissions as f64);
            gauge!("uturn_channels", "shard" => s).set(channels as f64);
        }
        gauge!("uturn_draining").set(if draining { 1.0 } else { 0.0 });
    }
}

fn add(total: &mut AllocationCounters, moved: AllocationCounters) {
    total.to_peer_packets += moved.to_peer_packets;
    total.to_peer_bytes += moved.to_peer_bytes;
    total.to_client_packets += moved.to_client_packets;
    total.to_client_bytes += moved.to_client_bytes;
}

fn transport_index(transport: Transport) -> usize {
    match transport {
        Transport::Udp => 0,
        Transport::Tcp => 1,
        Transport::Tls => 2,
    }
}

/// The label value of a client transport.
pub fn transport_label(transport: Transport) -> &'static str {
    match transport {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
        Transport::Tls => "tls",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use uturn_dataplane::{AllocationCounters, Counters};

    use super::*;
    use crate::{FiveTuple, Transport};

    fn report(shard: u16, allocations: &[(u64, u64)]) -> Counters {
        Counters {
            shard: crate::ShardId(shard),
            shard_counters: ShardCounters::default(),
            allocations: allocations
                .iter()
                .map(|(id, packets)| {
                    let counters = AllocationCounters {
                        to_peer_packets: *packets,
                        to_peer_bytes: packets * 100,
                        to_client_packets: *packets,
                        to_client_bytes: packets * 100,
                    };
                    (AllocationId(*id), counters)
                })
                .collect(),
        }
    }

    fn created(alloc: u64) -> Event {
        Event::AllocationCreated {
            alloc: AllocationId(alloc),
            client: FiveTuple {
                transport: Transport::Udp,
                client: "198.51.100.1:5000".parse().unwrap(),
                server: "192.0.2.1:3478".parse().unwrap(),
            },
            user: "alice".into(),
            relays: Vec::new(),
            lifetime_secs: 600,
        }
    }

    /// A shard's caught connection panics reach Prometheus as `uturn_connection_panics_total`,
    /// per shard, counted once however often the cumulative total is reported.
    #[test]
    fn caught_connection_panics_are_exported_per_shard() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let mut t = Telemetry::new(2, 0.0);
            let mut panicked = report(1, &[]);
            panicked.shard_counters.connection_panics = 2;
            t.on_counters(&panicked);
            t.on_counters(&panicked);
            t.on_counters(&report(0, &[]));
        });
        let text = handle.render();
        assert!(
            text.contains("uturn_connection_panics_total{shard=\"1\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("uturn_connection_panics_total{shard=\"0\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn every_exported_family_has_help_text() {
        let described: Vec<&str> = METRIC_HELP.iter().map(|(name, ..)| *name).collect();
        assert_eq!(
            described, METRIC_NAMES,
            "METRIC_HELP and METRIC_NAMES differ"
        );
        for (name, _, _, help) in METRIC_HELP {
            assert!(!help.is_empty(), "{name}");
        }
    }

    /// Cumulative reports become exact totals: a removed allocation's final report counts once,
    /// even when the other shard reports in between and when it lived between two reports.
    #[test]
    fn cumulative_reports_count_each_packet_once_across_shards() {
        let now = Instant::now();
        let mut t = Telemetry::new(2, 0.0);
        t.on_event(&created(1), now);
        t.on_counters(&report(0, &[(1, 10)]));
        t.on_counters(&report(1, &[]));
        t.on_counters(&report(0, &[(1, 15)]));
        assert_eq!(t.relayed().to_peer_packets, 15);
        assert_eq!(t.allocation_counters(AllocationId(1)).to_client_bytes, 1500);

        // Removed: shard 1's report does not name it, which must not forget it yet.
        t.on_event(
            &Event::AllocationExpired {
                alloc: AllocationId(1),
            },
            now,
        );
        t.on_counters(&report(1, &[]));
        t.on_counters(&report(0, &[(1, 18)])); // the final values
        t.on_counters(&report(0, &[])); // gone from shard 0: forgotten
        assert_eq!(t.relayed().to_peer_packets, 18);
        assert!(t.allocations.is_empty());
        assert!(t.retired.is_empty());

        // Lived and ended between two reports: its final values still count, once.
        t.on_event(&created(2), now);
        t.on_event(
            &Event::AllocationDeleted {
                alloc: AllocationId(2),
            },
            now,
        );
        t.on_counters(&report(1, &[(2, 4)]));
        t.on_counters(&report(1, &[]));
        assert_eq!(t.relayed().to_peer_packets, 22);
        assert_eq!(t.relayed().to_client_bytes, 2200);
        assert!(t.allocations.is_empty());
    }
}
