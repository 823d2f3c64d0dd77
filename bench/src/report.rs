//! Results: the JSON document of one run, and the Markdown table that puts several runs side
//! by side with ratios (uturn/coturn, uturn/baseline).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::alloc::AllocRaw;
use crate::keeper::RefreshCounts;
use crate::load::{Framing, PeerMode, StepRaw, Transport};
use crate::pairs::Spread;
use crate::stats::{LatencySummary, loss_ratio};

/// Loss at or under this fraction counts as loss-free (the knee criterion): 0.1 %.
pub const LOSS_FREE_MAX: f64 = 0.001;
/// The generator calls itself saturated above this share of its cores.
const OWN_CPU_SATURATED: f64 = 0.9;
/// ... or when it sent less than this share of the target rate.
const OFFERED_SHORT: f64 = 0.95;
/// ... or when its pacing fell this far behind schedule.
const LAG_SATURATED_MS: f64 = 50.0;

/// One run of the harness: one server, one workload, one mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    /// Which server (`uturn`, `coturn`, `baseline`, or the operator's own label).
    pub label: String,
    /// `run`, `sweep`, `alloc` or `baseline`.
    pub mode: String,
    /// Workload name.
    pub workload: String,
    /// Target address.
    pub target: String,
    /// ChannelData, Send indications or bare.
    pub framing: Option<Framing>,
    /// Client transport (absent in reports from before TCP and TLS: UDP).
    #[serde(default)]
    pub transport: Option<Transport>,
    /// Echo or sink.
    pub peer_mode: Option<PeerMode>,
    /// Allocations carrying traffic.
    pub allocations: u32,
    /// Payload bytes.
    pub payload_len: usize,
    /// Generator worker threads.
    pub workers: u32,
    /// Whether the generator asked for UDP GSO sends (absent in older reports: it had none);
    /// each step's `gso_datagrams` says how many went out that way.
    #[serde(default)]
    pub gso: Option<bool>,
    /// Every measured step, in the order run.
    pub steps: Vec<StepReport>,
    /// Sweep: the highest offered rate with loss ≤ 0.1 % and an unsaturated generator.
    pub knee_pps: Option<f64>,
    /// Sweep: the search stopped because the generator, not the server, ran out.
    pub knee_limited_by_generator: bool,
    /// Sweep: a step at half the knee, for latency.
    pub half_knee: Option<StepReport>,
    /// `alloc` mode results.
    pub alloc: Option<AllocReport>,
    /// Churn beside the traffic: (allocations made, failures).
    pub churn: Option<(u64, u64)>,
    /// Of the churned allocations, those left to expire on the server (`--churn-abandon`).
    #[serde(default)]
    pub churn_abandoned: Option<u64>,
    /// Everything the reader must know to trust the figures.
    pub warnings: Vec<String>,
}

/// One measured step at one offered rate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepReport {
    /// Rate asked for.
    pub target_pps: f64,
    /// Rate actually handed to the kernel.
    pub offered_pps: f64,
    /// Rate that came back (or reached the sink).
    pub received_pps: f64,
    /// Sending period, seconds.
    pub duration_secs: f64,
    /// Packets sent.
    pub sent: u64,
    /// Packets the generator could not send (not counted as offered or lost).
    pub send_failed: u64,
    /// Distinct packets received.
    pub received: u64,
    /// Packets lost.
    pub lost: u64,
    /// lost / sent.
    pub loss_ratio: f64,
    /// Packets that arrived after a later one of the same flow.
    pub reordered: u64,
    /// Extra copies received.
    pub duplicates: u64,
    /// Datagrams that were not this step's (late from an earlier step, or not ours).
    pub foreign: u64,
    /// `round-trip` (echo) or `one-way` (sink).
    pub latency_kind: String,
    /// Latency percentiles.
    pub latency: LatencySummary,
    /// Packets the relay forwarded, both legs.
    pub relayed_packets: u64,
    /// Server CPU seconds.
    pub server_cpu_secs: Option<f64>,
    /// Server CPU per relayed packet, ns.
    pub server_cpu_ns_per_packet: Option<f64>,
    /// Harness CPU seconds.
    pub own_cpu_secs: Option<f64>,
    /// Harness CPU in cores (CPU seconds per wall second).
    pub own_cpu_cores: Option<f64>,
    /// Worst pacing lag, ms.
    pub lag_max_ms: f64,
    /// Whether the generator itself was the limit in this step.
    pub generator_saturated: bool,
    /// Datagrams the generator sent inside UDP GSO sends (absent in older reports: 0). The
    /// server receives them as separate datagrams either way.
    #[serde(default)]
    pub gso_datagrams: u64,
    /// Period of the generator's event loop in this step, µs (absent in older reports).
    #[serde(default)]
    pub tick_us: Option<u64>,
    /// The refreshes that kept the allocations alive during the step (absent in older
    /// reports: none).
    #[serde(default)]
    pub refreshes: RefreshCounts,
}

impl StepReport {
    /// Turns raw counters into rates and ratios.
    pub fn from_raw(raw: &StepRaw, peer_mode: PeerMode, workers: u32) -> Self {
        let secs = raw.duration.as_secs_f64().max(1e-9);
        let wall = raw.wall.as_secs_f64().max(1e-9);
        let received = raw.accounting.received;
        let lost = raw.accounting.lost(raw.sent);
        let relayed = raw.relayed_packets(peer_mode);
        let offered_pps = raw.sent as f64 / secs;
        let own_cpu_cores = raw.own_cpu_secs.map(|c| c / wall);
        let lag_max_ms = raw.lag_max.as_secs_f64() * 1000.0;
        let generator_saturated = own_cpu_cores
            .is_some_and(|c| c >= OWN_CPU_SATURATED * f64::from(workers.max(1)))
            || offered_pps < OFFERED_SHORT * raw.target_pps
            || raw.send_failed > raw.sent / 1000
            || lag_max_ms > LAG_SATURATED_MS;
        Self {
            target_pps: raw.target_pps,
            offered_pps,
            received_pps: received as f64 / secs,
            duration_secs: secs,
            sent: raw.sent,
            send_failed: raw.send_failed,
            received,
            lost,
            loss_ratio: loss_ratio(raw.sent, lost),
            reordered: raw.accounting.reordered,
            duplicates: raw.accounting.duplicates,
            foreign: raw.accounting.foreign,
            latency_kind: match peer_mode {
                PeerMode::Echo => "round-trip",
                PeerMode::Sink => "one-way",
            }
            .to_owned(),
            latency: LatencySummary::from_histogram(&raw.accounting.latency_ns),
            relayed_packets: relayed,
            server_cpu_secs: raw.server_cpu_secs,
            server_cpu_ns_per_packet: raw
                .server_cpu_secs
                .filter(|_| relayed > 0)
                .map(|c| c * 1e9 / relayed as f64),
            own_cpu_secs: raw.own_cpu_secs,
            own_cpu_cores,
            lag_max_ms,
            generator_saturated,
            gso_datagrams: raw.gso_datagrams,
            tick_us: Some(u64::try_from(raw.tick.as_micros()).unwrap_or(u64::MAX)),
            refreshes: raw.refreshes,
        }
    }

    /// Whether this step counts as loss-free.
    pub fn is_loss_free(&self) -> bool {
        self.sent > 0 && self.loss_ratio <= LOSS_FREE_MAX
    }
}

/// `alloc` mode results.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AllocReport {
    /// Handshakes completed (an allocation made), within the window or in the drain after it.
    pub succeeded: u64,
    /// Handshakes failed before their allocation was made.
    pub failed: u64,
    /// Seconds of the window (new handshakes start during it).
    pub duration_secs: f64,
    /// Handshakes completed within the window, per second of it.
    pub per_sec: f64,
    /// Handshake latency (two round trips: the 401 and the authenticated Allocate).
    pub latency: LatencySummary,
    /// Server CPU seconds within the window.
    pub server_cpu_secs: Option<f64>,
    /// Server CPU per allocation (made and deleted) within the window, µs.
    pub server_cpu_us_per_allocation: Option<f64>,
    /// Harness CPU seconds within the window.
    pub own_cpu_secs: Option<f64>,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Handshakes completed within the window (absent in older reports).
    #[serde(default)]
    pub succeeded_in_window: Option<u64>,
    /// Allocations made whose deletion failed (left to expire on the server).
    #[serde(default)]
    pub delete_failed: Option<u64>,
    /// Failures by stage and code: `challenge timeout`, `allocate 486`, `delete 437`, ...
    #[serde(default)]
    pub failures: BTreeMap<String, u64>,
    /// Harness CPU per allocation within the window, µs.
    #[serde(default)]
    pub own_cpu_us_per_allocation: Option<f64>,
    /// Harness CPU in cores within the window.
    #[serde(default)]
    pub own_cpu_cores: Option<f64>,
    /// Cores the harness could run on (its CPU affinity, at most one per worker).
    #[serde(default)]
    pub own_cores_available: Option<u32>,
    /// The harness used ≥ 90 % of the cores it could use: the rate is at least the
    /// generator's limit, not necessarily the server's.
    #[serde(default)]
    pub generator_saturated: bool,
    /// Worker threads, handshakes in flight in all, source addresses.
    #[serde(default)]
    pub workers: Option<u32>,
    /// Handshakes in flight in all.
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// Source addresses.
    #[serde(default)]
    pub sources: Option<u32>,
    /// Seconds from the window's end until the last handshake in flight ended.
    #[serde(default)]
    pub drain_secs: Option<f64>,
}

/// Share of its available cores above which the generator counts as the limit.
const GENERATOR_SATURATED: f64 = 0.9;

impl AllocReport {
    /// From the raw counters.
    pub fn from_raw(raw: &AllocRaw) -> Self {
        let secs = raw.wall.as_secs_f64().max(1e-9);
        let in_window = raw.succeeded_in_window;
        let per_alloc = |cpu: Option<f64>| {
            cpu.filter(|_| in_window > 0)
                .map(|c| c * 1e6 / in_window as f64)
        };
        let cores = std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .min(raw.workers.max(1));
        let own_cpu_cores = raw.own_cpu_secs.map(|c| c / secs);
        Self {
            succeeded: raw.succeeded,
            failed: raw.failed,
            duration_secs: secs,
            per_sec: in_window as f64 / secs,
            latency: LatencySummary::from_histogram(&raw.latency_ns),
            server_cpu_secs: raw.server_cpu_secs,
            server_cpu_us_per_allocation: per_alloc(raw.server_cpu_secs),
            own_cpu_secs: raw.own_cpu_secs,
            first_error: raw.first_error.clone(),
            succeeded_in_window: Some(in_window),
            delete_failed: Some(raw.delete_failed),
            failures: raw.failures.clone(),
            own_cpu_us_per_allocation: per_alloc(raw.own_cpu_secs),
            own_cpu_cores,
            own_cores_available: Some(cores),
            generator_saturated: own_cpu_cores
                .is_some_and(|c| c >= GENERATOR_SATURATED * f64::from(cores)),
            workers: Some(raw.workers),
            concurrency: Some(raw.concurrency),
            sources: Some(raw.sources),
            drain_secs: Some(raw.drain.as_secs_f64()),
        }
    }
}

impl RunReport {
    /// The mode, with the client transport when it is not UDP (`sweep (tcp)`).
    pub fn mode_shown(&self) -> String {
        match self.transport {
            Some(t) if t != Transport::Udp => format!("{} ({})", self.mode, t.name()),
            _ => self.mode.clone(),
        }
    }

    /// Whether the clients spoke TCP or TLS.
    pub fn is_stream(&self) -> bool {
        matches!(self.transport, Some(Transport::Tcp | Transport::Tls))
    }

    /// The step that stands for the run: the knee step of a sweep, else the last step.
    pub fn headline(&self) -> Option<&StepReport> {
        if let Some(knee) = self.knee_pps {
            if let Some(s) = self.steps.iter().find(|s| s.target_pps == knee) {
                return Some(s);
            }
        }
        self.steps.last()
    }

    /// The lowest rate above the knee at which the server lost more than 0.1 % while the
    /// generator kept up: with a knee the generator bounded (`≥`), the server's own limit lies
    /// between the two.
    pub fn knee_ceiling(&self) -> Option<f64> {
        let knee = self.knee_pps?;
        self.steps
            .iter()
            .filter(|s| s.target_pps > knee && !s.is_loss_free() && !s.generator_saturated)
            .map(|s| s.target_pps)
            .min_by(f64::total_cmp)
    }

    /// The step whose latency stands for the run: half the knee, else the headline.
    pub fn latency_step(&self) -> Option<&StepReport> {
        self.half_knee.as_ref().or_else(|| self.headline())
    }

    /// The figure runs are ranked by: the knee, else received pps, else allocations/s.
    pub fn rate(&self) -> Option<f64> {
        if self.mode == "sweep" || self.mode == "baseline" {
            return self.knee_pps.or(Some(0.0));
        }
        if let Some(a) = &self.alloc {
            return Some(a.per_sec);
        }
        self.headline().map(|s| s.received_pps)
    }

    /// Warnings derived from the steps (saturated generator, loss in a fixed run).
    pub fn derive_warnings(&mut self) {
        let saturated: Vec<String> = self
            .steps
            .iter()
            .filter(|s| s.generator_saturated)
            .map(|s| format!("{:.0}", s.target_pps))
            .collect();
        if !saturated.is_empty() {
            self.warnings.push(format!(
                "the generator was itself saturated at {} pps (own CPU, pacing lag or send \
                 failures): figures at those rates measure the harness, not the server",
                saturated.join(", ")
            ));
        }
        let mut refreshes = RefreshCounts::default();
        for s in &self.steps {
            refreshes.add(&s.refreshes);
        }
        if refreshes.failed > 0 {
            let last = match refreshes.last_failure_code {
                Some(0) | None => "no answer".to_owned(),
                Some(code) => format!("error {code}"),
            };
            self.warnings.push(format!(
                "{} of {} refresh requests failed (last: {last}): the server may have dropped \
                 those allocations, permissions or channels, and their traffic after that",
                refreshes.failed, refreshes.requests
            ));
        }
        if self.steps.iter().any(|s| s.server_cpu_secs.is_none()) && self.alloc.is_none() {
            self.warnings
                .push("server CPU unknown (no --server-pid, or /proc unreadable)".to_owned());
        }
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
}

/// Median of several runs of the same (label, workload, mode): the run with the median rate,
/// and how many runs there were.
pub fn medians(reports: &[RunReport]) -> Vec<(RunReport, usize)> {
    let mut groups: BTreeMap<(String, String, String), Vec<&RunReport>> = BTreeMap::new();
    for r in reports {
        groups
            .entry((r.workload.clone(), r.label.clone(), r.mode_shown()))
            .or_default()
            .push(r);
    }
    groups
        .into_values()
        .map(|mut runs| {
            runs.sort_by(|a, b| a.rate().unwrap_or(0.0).total_cmp(&b.rate().unwrap_or(0.0)));
            let n = runs.len();
            (runs[(n - 1) / 2].clone(), n)
        })
        .collect()
}

/// The Markdown table of several runs (medians when a configuration ran several times),
/// followed by the ratios of uturn against coturn and the baseline per workload.
pub fn markdown(reports: &[RunReport]) -> String {
    let rows = medians(reports);
    let mut md = String::new();
    md.push_str(
        "| server | workload | mode | runs | loss-free pps | received pps | loss % | \
         p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | server CPU ns/pkt | generator CPU |\n",
    );
    md.push_str("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (r, n) in &rows {
        if let Some(a) = &r.alloc {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:.0} alloc/s | – | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} µs/alloc | {} |",
                r.label,
                r.workload,
                r.mode,
                n,
                a.per_sec,
                if a.succeeded + a.failed > 0 {
                    format!(
                        "{:.3}",
                        100.0 * a.failed as f64 / (a.succeeded + a.failed) as f64
                    )
                } else {
                    "–".to_owned()
                },
                a.latency.p50_us,
                a.latency.p90_us,
                a.latency.p99_us,
                a.latency.p999_us,
                a.latency.max_us,
                opt(a.server_cpu_us_per_allocation, 1),
                a.own_cpu_cores.map_or_else(
                    || "–".to_owned(),
                    |c| format!(
                        "{:.0} %{}",
                        c * 100.0,
                        if a.generator_saturated {
                            " (saturated)"
                        } else {
                            ""
                        }
                    )
                ),
            );
            continue;
        }
        let Some(h) = r.headline() else { continue };
        let l = r.latency_step().unwrap_or(h);
        let knee = match (r.knee_pps, r.knee_limited_by_generator) {
            (Some(k), true) => match r.knee_ceiling() {
                Some(c) => format!("≥ {k:.0} (< {c:.0})"),
                None => format!("≥ {k:.0}"),
            },
            (Some(k), false) => format!("{k:.0}"),
            (None, _) if r.mode == "sweep" || r.mode == "baseline" => "none".to_owned(),
            (None, _) => "–".to_owned(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.0} | {:.3} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
            r.label,
            r.workload,
            r.mode_shown(),
            n,
            knee,
            h.received_pps,
            h.loss_ratio * 100.0,
            l.latency.p50_us,
            l.latency.p90_us,
            l.latency.p99_us,
            l.latency.p999_us,
            l.latency.max_us,
            opt(h.server_cpu_ns_per_packet, 0),
            opt(h.own_cpu_cores.map(|c| c * 100.0), 0).to_owned() + " %",
        );
    }
    md.push('\n');
    md.push_str(&ratios(&rows, reports));
    md
}

/// The median of `figure` over every run of (label, workload, one of `modes`, the first that
/// ran). The ratio line takes each figure's own median: when several runs share a rate (all
/// generator-bound, say), the run with the median rate is an arbitrary one of them, and so
/// would be its CPU and its latency.
fn median_figure(
    reports: &[RunReport],
    label: &str,
    workload: &str,
    modes: &[&str],
    figure: impl Fn(&RunReport) -> Option<f64>,
) -> Option<f64> {
    let mode = modes.iter().find(|m| {
        reports
            .iter()
            .any(|r| !r.is_stream() && r.label == label && r.workload == workload && r.mode == **m)
    })?;
    let values: Vec<f64> = reports
        .iter()
        .filter(|r| !r.is_stream() && r.label == label && r.workload == workload && r.mode == *mode)
        .filter_map(&figure)
        .collect();
    Spread::of(values).map(|s| s.median)
}

fn ratios(rows: &[(RunReport, usize)], reports: &[RunReport]) -> String {
    // Per workload, every (label, mode) that ran.
    let mut by_workload: BTreeMap<&str, Vec<&RunReport>> = BTreeMap::new();
    // The ratios compare UDP runs (the goals are about UDP); TCP and TLS runs have
    // their own rows in the table.
    for (r, _) in rows.iter().filter(|(r, _)| !r.is_stream()) {
        by_workload.entry(&r.workload).or_default().push(r);
    }
    let mut md = String::new();
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".to_owned(),
    };
    let mut lines = Vec::new();
    for (workload, runs) in &by_workload {
        // The first of `modes` that ran for `label`.
        let pick = |label: &str, modes: &[&str]| {
            modes.iter().find_map(|m| {
                runs.iter()
                    .find(|r| r.label == label && r.mode == *m)
                    .copied()
            })
        };
        let Some(u) = pick("uturn", &["sweep", "alloc", "run"]) else {
            continue;
        };
        let c = pick("coturn", &["sweep", "alloc", "run"]);
        let b = pick("baseline", &["baseline", "baseline-run"]);
        let cpu = |r: &RunReport| {
            r.alloc.as_ref().map_or_else(
                || r.headline().and_then(|h| h.server_cpu_ns_per_packet),
                |a| a.server_cpu_us_per_allocation,
            )
        };
        let p99 = |r: &RunReport| r.latency_step().map(|s| s.latency.p99_us);
        let traffic = ["sweep", "alloc", "run"];
        let u_cpu = median_figure(reports, "uturn", workload, &traffic, cpu);
        let c_cpu = median_figure(reports, "coturn", workload, &traffic, cpu);
        let u_p99 = median_figure(reports, "uturn", workload, &traffic, p99);
        // Added latency: the forwarder at uturn's own half-knee rate when the script ran it
        // (`baseline-run`), else the forwarder's half knee.
        let b_p99 = median_figure(
            reports,
            "baseline",
            workload,
            &["baseline-run", "baseline"],
            p99,
        );
        let added = match (u_p99, b_p99) {
            (Some(u), Some(b)) => format!("{:+.1}", u - b),
            _ => "–".to_owned(),
        };
        lines.push(format!(
            "| {workload} | {} | {} | {} | {} | {} |",
            ratio(u.rate(), c.and_then(|c| c.rate())),
            ratio(u.rate(), b.and_then(|b| b.rate())),
            ratio(u_cpu, c_cpu),
            opt(u_p99, 1),
            added,
        ));
    }
    if !lines.is_empty() {
        md.push_str(
            "| workload | rate uturn/coturn | rate uturn/baseline | CPU per packet uturn/coturn \
             (medians) | uturn p99 µs at ½ knee (median) | p99 added over baseline, µs |\n",
        );
        md.push_str("|---|---:|---:|---:|---:|---:|\n");
        for l in lines {
            md.push_str(&l);
            md.push('\n');
        }
        md.push('\n');
    }
    md
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::stats::{Accounting, Stamp};
    use std::time::Duration;

    fn raw(target: f64, sent: u64, received: u64) -> StepRaw {
        let mut accounting = Accounting::new(0, sent, 1);
        for seq in 0..received {
            accounting.record(
                Stamp {
                    flow: 0,
                    seq,
                    sent_ns: 0,
                },
                10_000,
            );
        }
        StepRaw {
            target_pps: target,
            duration: Duration::from_secs(1),
            sent,
            send_failed: 0,
            accounting,
            peer_received: received,
            server_cpu_secs: Some(0.5),
            own_cpu_secs: Some(0.2),
            wall: Duration::from_secs(1),
            lag_max: Duration::ZERO,
            gso_datagrams: 0,
            tick: Duration::from_micros(100),
            refreshes: RefreshCounts::default(),
        }
    }

    pub(crate) fn report(label: &str, knee: f64, ns: f64) -> RunReport {
        let mut step =
            StepReport::from_raw(&raw(knee, knee as u64, knee as u64), PeerMode::Echo, 1);
        step.server_cpu_ns_per_packet = Some(ns);
        RunReport {
            label: label.to_owned(),
            mode: if label == "baseline" {
                "baseline"
            } else {
                "sweep"
            }
            .to_owned(),
            workload: "small".to_owned(),
            target: "127.0.0.1:3478".to_owned(),
            framing: Some(Framing::Channel),
            transport: None,
            peer_mode: Some(PeerMode::Echo),
            allocations: 1,
            payload_len: 64,
            workers: 1,
            gso: None,
            steps: vec![step],
            knee_pps: Some(knee),
            knee_limited_by_generator: false,
            half_knee: None,
            alloc: None,
            churn: None,
            churn_abandoned: None,
            warnings: vec![],
        }
    }

    #[test]
    fn a_step_turns_counters_into_rates_loss_and_cpu_per_packet() {
        let s = StepReport::from_raw(&raw(1000.0, 1000, 990), PeerMode::Echo, 1);
        assert_eq!((s.sent, s.received, s.lost), (1000, 990, 10));
        assert!((s.loss_ratio - 0.01).abs() < 1e-12);
        assert_eq!(s.relayed_packets, 1980, "both legs");
        let ns = s.server_cpu_ns_per_packet.unwrap();
        assert!((ns - 0.5e9 / 1980.0).abs() < 1e-6);
        assert!(!s.is_loss_free());
        assert!(!s.generator_saturated);
        assert!(StepReport::from_raw(&raw(1000.0, 1000, 999), PeerMode::Echo, 1).is_loss_free());
    }

    #[test]
    fn a_generator_that_cannot_keep_up_says_so() {
        let mut r = raw(1000.0, 900, 900);
        assert!(StepReport::from_raw(&r, PeerMode::Echo, 1).generator_saturated);
        r = raw(1000.0, 1000, 1000);
        r.own_cpu_secs = Some(0.95);
        assert!(StepReport::from_raw(&r, PeerMode::Echo, 1).generator_saturated);
        assert!(!StepReport::from_raw(&r, PeerMode::Echo, 2).generator_saturated);
    }

    #[test]
    fn the_table_holds_every_server_and_the_ratios() {
        let md = markdown(&[
            report("uturn", 300_000.0, 500.0),
            report("coturn", 100_000.0, 2000.0),
            report("baseline", 400_000.0, 300.0),
        ]);
        for needle in [
            "| uturn |",
            "| coturn |",
            "| baseline |",
            "3.00×",
            "0.75×",
            "0.25×",
        ] {
            assert!(md.contains(needle), "missing {needle} in\n{md}");
        }
    }

    #[test]
    fn several_runs_collapse_to_their_median() {
        let runs = [
            report("uturn", 1.0, 1.0),
            report("uturn", 3.0, 1.0),
            report("uturn", 2.0, 1.0),
        ];
        let m = medians(&runs);
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].0.knee_pps, m[0].1), (Some(2.0), 3));
    }

    #[test]
    fn the_ratio_line_takes_each_figures_own_median_over_the_runs() {
        // Three generator-bound uturn runs share one rate, so the median-rate run is whichever
        // sorts into the middle (the second: CPU 1,000, p99 50), not the median of either.
        let with_p99 = |mut r: RunReport, p99: f64| {
            let mut half = r.steps[0].clone();
            half.latency.p99_us = p99;
            r.half_knee = Some(half);
            r
        };
        let md = markdown(&[
            with_p99(report("uturn", 100_000.0, 9_000.0), 900.0),
            with_p99(report("uturn", 100_000.0, 1_000.0), 50.0),
            with_p99(report("uturn", 100_000.0, 1_100.0), 60.0),
            report("coturn", 50_000.0, 4_000.0),
            with_p99(report("baseline", 100_000.0, 800.0), 40.0),
        ]);
        let ratio_line = md
            .lines()
            .find(|l| l.starts_with("| small | 2.00×"))
            .unwrap_or_else(|| panic!("no ratio line in\n{md}"));
        assert_eq!(
            ratio_line,
            "| small | 2.00× | 1.00× | 0.28× | 60.0 | +20.0 |"
        );
    }

    #[test]
    fn a_generator_bound_knee_below_a_server_loss_shows_both_bounds() {
        let mut r = report("uturn", 100_000.0, 1_000.0);
        r.knee_limited_by_generator = true;
        let step = |target: f64, received: u64, own_cpu: f64| {
            let mut raw = raw(target, target as u64, received);
            raw.own_cpu_secs = Some(own_cpu);
            StepReport::from_raw(&raw, PeerMode::Echo, 1)
        };
        // Lost at 160 k with the generator itself saturated (no bound on the server), lost at
        // 130 k and 140 k with the generator keeping up (the server's): the lowest is the bound.
        r.steps.push(step(160_000.0, 100_000, 0.95));
        r.steps.push(step(140_000.0, 120_000, 0.7));
        r.steps.push(step(130_000.0, 120_000, 0.7));
        assert_eq!(r.knee_ceiling(), Some(130_000.0));
        assert!(markdown(&[r]).contains("| ≥ 100000 (< 130000) |"));
        // Without such a step the knee is a bare lower bound.
        let mut bare = report("uturn", 100_000.0, 1_000.0);
        bare.knee_limited_by_generator = true;
        assert_eq!(bare.knee_ceiling(), None);
        assert!(markdown(&[bare]).contains("| ≥ 100000 |"));
    }

    #[test]
    fn a_report_survives_json() {
        let r = report("uturn", 10.0, 1.0);
        let json = serde_json::to_string(&r).unwrap();
        let back: RunReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back.steps, r.steps);
    }
}
