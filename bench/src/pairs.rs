//! Interleaved pairs: the same traffic through two servers in alternation, to compare them
//! where one run of each cannot.
//!
//! On a shared VM the machine itself moves the figures: the same `small` step's p99 went from
//! 158 to 3,067 µs between runs minutes apart (bench/README.md). Two servers measured one after
//! the other then differ by whatever the machine did in between, and a 25 µs bound on the
//! latency a relay adds cannot be told. `uturn-bench pairs` sets up both servers' allocations
//! once, then runs short steps in alternation, A B, B A, A B, ... (the order flips so that a
//! drift favours neither), and reports the median of the per-pair differences, their range,
//! and a sign test: in how many pairs A was lower, and how likely that count is if neither
//! server were.
//!
//! ```text
//!  setup A (TURN) + setup B (the bare forwarder, or another TURN server)
//!  pair i: step A, step B (odd i: B, A) at the same rate, each --pair-secs
//!  summary: per pair A − B (p99, p50), A ÷ B (CPU per packet) → median, min, max, sign test
//! ```

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::report::StepReport;

/// One pair of steps at the same rate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Pair {
    /// Whether A's step ran first in this pair.
    pub a_first: bool,
    /// A's step.
    pub a: StepReport,
    /// B's step.
    pub b: StepReport,
}

impl Pair {
    /// A's p99 minus B's, µs.
    pub fn p99_added_us(&self) -> f64 {
        self.a.latency.p99_us - self.b.latency.p99_us
    }

    /// A's p50 minus B's, µs.
    pub fn p50_added_us(&self) -> f64 {
        self.a.latency.p50_us - self.b.latency.p50_us
    }

    /// A's server CPU per relayed packet over B's, when both are known.
    pub fn cpu_ratio(&self) -> Option<f64> {
        let a = self.a.server_cpu_ns_per_packet?;
        let b = self.b.server_cpu_ns_per_packet?;
        (b > 0.0).then_some(a / b)
    }
}

/// Median, lowest and highest of a figure over the pairs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Spread {
    /// The median (the mean of the two middle values for an even count).
    pub median: f64,
    /// The lowest.
    pub min: f64,
    /// The highest.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; `None` when there are none.
    pub fn of(mut values: Vec<f64>) -> Option<Self> {
        values.retain(|v| v.is_finite());
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: values[0],
            max: values[n - 1],
        })
    }
}

/// What the pairs say together.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PairsSummary {
    /// Pairs run.
    pub pairs: usize,
    /// A's p99 minus B's, µs: the latency A adds at the tail, where B is the reference.
    pub p99_added_us: Option<Spread>,
    /// A's p50 minus B's, µs.
    pub p50_added_us: Option<Spread>,
    /// Pairs in which A's p99 was lower than B's.
    pub a_lower_p99: usize,
    /// Two-sided sign test on `a_lower_p99` (ties left out): the chance of a split at least
    /// this uneven if neither server had the lower p99 more often.
    pub p99_sign_test_p: f64,
    /// Pairs in which A's p99 was at most 25 µs above B's (issue 5's bound).
    pub p99_within_25us: usize,
    /// A's server CPU per packet over B's.
    pub cpu_ratio: Option<Spread>,
    /// Pairs in which either step lost more than 0.1 % or had the generator saturated: their
    /// latency is not that of a loss-free rate.
    pub unclean: usize,
}

/// Two-sided sign test: the probability, with `n` fair coin flips, of `k` or fewer heads or of
/// `n - k` or more (capped at 1).
pub fn sign_test_p(k: usize, n: usize) -> f64 {
    if n == 0 {
        return 1.0;
    }
    let low = k.min(n - k);
    // Σ C(n, i) / 2^n for i ≤ low, built up term by term in floating point (n ≤ 100 here).
    let mut term = 0.5f64.powi(i32::try_from(n).unwrap_or(i32::MAX));
    let mut tail = 0.0;
    for i in 0..=low {
        if i > 0 {
            term = term * (n - i + 1) as f64 / i as f64;
        }
        tail += term;
    }
    (2.0 * tail).min(1.0)
}

/// The summary of `pairs`.
pub fn summarize(pairs: &[Pair]) -> PairsSummary {
    let p99: Vec<f64> = pairs.iter().map(Pair::p99_added_us).collect();
    let lower = p99.iter().filter(|d| **d < 0.0).count();
    let higher = p99.iter().filter(|d| **d > 0.0).count();
    PairsSummary {
        pairs: pairs.len(),
        p99_added_us: Spread::of(p99.clone()),
        p50_added_us: Spread::of(pairs.iter().map(Pair::p50_added_us).collect()),
        a_lower_p99: lower,
        p99_sign_test_p: sign_test_p(lower, lower + higher),
        p99_within_25us: p99.iter().filter(|d| **d <= 25.0).count(),
        cpu_ratio: Spread::of(pairs.iter().filter_map(Pair::cpu_ratio).collect()),
        unclean: pairs
            .iter()
            .filter(|p| {
                [&p.a, &p.b]
                    .iter()
                    .any(|s| !s.is_loss_free() || s.generator_saturated)
            })
            .count(),
    }
}

/// A `pairs` run: both servers, every pair, the summary.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PairsReport {
    /// A's label (the server under test).
    pub label: String,
    /// B's label (the reference: `forwarder`, or another server).
    pub versus: String,
    /// Workload name.
    pub workload: String,
    /// Offered rate of every step, pps.
    pub rate_pps: f64,
    /// Seconds of each step.
    pub pair_secs: f64,
    /// Every pair.
    pub pairs: Vec<Pair>,
    /// The summary.
    pub summary: PairsSummary,
    /// What to be careful about.
    pub warnings: Vec<String>,
}

impl PairsReport {
    /// A report of `pairs`, summarized, with its warnings.
    pub fn new(
        label: String,
        versus: String,
        workload: String,
        rate_pps: f64,
        pair_secs: f64,
        pairs: Vec<Pair>,
    ) -> Self {
        let summary = summarize(&pairs);
        let mut warnings = Vec::new();
        if summary.unclean > 0 {
            warnings.push(format!(
                "{} of {} pairs lost more than 0.1 % or saturated the generator: latency there \
                 is not that of a loss-free rate; lower --rate",
                summary.unclean, summary.pairs
            ));
        }
        if summary.pairs < 6 {
            warnings.push(format!(
                "{} pairs cannot make a sign test significant at 5 %: run 6 or more",
                summary.pairs
            ));
        }
        Self {
            label,
            versus,
            workload,
            rate_pps,
            pair_secs,
            pairs,
            summary,
            warnings,
        }
    }

    /// The summary in one line.
    pub fn line(&self) -> String {
        let s = &self.summary;
        let spread = |v: Option<Spread>, unit: &str| {
            v.map_or_else(
                || "–".to_owned(),
                |v| {
                    format!(
                        "{:+.1} {unit} (pairs {:+.1} to {:+.1})",
                        v.median, v.min, v.max
                    )
                },
            )
        };
        format!(
            "{} vs {} ({}, {:.0} pps, {} pairs of {} s): p99 added {}, lower in {} of {} pairs \
             (sign test p = {:.3}), within 25 µs in {}; p50 added {}; CPU per packet {}",
            self.label,
            self.versus,
            self.workload,
            self.rate_pps,
            s.pairs,
            self.pair_secs,
            spread(s.p99_added_us, "µs"),
            s.a_lower_p99,
            s.pairs,
            s.p99_sign_test_p,
            s.p99_within_25us,
            spread(s.p50_added_us, "µs"),
            s.cpu_ratio.map_or_else(
                || "–".to_owned(),
                |c| format!("{:.2}× ({:.2}-{:.2}×)", c.median, c.min, c.max)
            ),
        )
    }

    /// A Markdown table of the pairs, then the summary line.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "| pair | first | {a} p50 µs | {b} p50 µs | {a} p99 µs | {b} p99 µs | p99 added µs | CPU/pkt {a} ÷ {b} |\n\
             |---:|---|---:|---:|---:|---:|---:|---:|\n",
            a = self.label,
            b = self.versus,
        );
        for (i, p) in self.pairs.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:+.1} | {} |",
                i + 1,
                if p.a_first { &self.label } else { &self.versus },
                p.a.latency.p50_us,
                p.b.latency.p50_us,
                p.a.latency.p99_us,
                p.b.latency.p99_us,
                p.p99_added_us(),
                p.cpu_ratio()
                    .map_or_else(|| "–".to_owned(), |c| format!("{c:.2}")),
            );
        }
        let _ = writeln!(out, "\n{}", self.line());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::LatencySummary;

    fn step(p50: f64, p99: f64, cpu: Option<f64>, lost: u64) -> StepReport {
        StepReport {
            target_pps: 1000.0,
            offered_pps: 1000.0,
            received_pps: 1000.0,
            duration_secs: 1.0,
            sent: 1000,
            send_failed: 0,
            received: 1000 - lost,
            lost,
            loss_ratio: lost as f64 / 1000.0,
            reordered: 0,
            duplicates: 0,
            foreign: 0,
            latency_kind: "round-trip".into(),
            latency: LatencySummary {
                count: 1000,
                mean_us: p50,
                p50_us: p50,
                p90_us: p99,
                p99_us: p99,
                p999_us: p99,
                max_us: p99,
                cdf: Vec::new(),
            },
            relayed_packets: 2000,
            server_cpu_secs: None,
            server_cpu_ns_per_packet: cpu,
            own_cpu_secs: None,
            own_cpu_cores: None,
            lag_max_ms: 0.0,
            generator_saturated: false,
            gso_datagrams: 0,
            tick_us: None,
            refreshes: Default::default(),
        }
    }

    fn pair(a_p99: f64, b_p99: f64) -> Pair {
        Pair {
            a_first: true,
            a: step(50.0, a_p99, Some(3000.0), 0),
            b: step(60.0, b_p99, Some(2000.0), 0),
        }
    }

    #[test]
    fn the_sign_test_matches_the_binomial_tails() {
        // 10 of 10: 2 / 1024.
        assert!((sign_test_p(0, 10) - 2.0 / 1024.0).abs() < 1e-12);
        assert!((sign_test_p(10, 10) - 2.0 / 1024.0).abs() < 1e-12);
        // 1 of 10: 2 × (1 + 10) / 1024.
        assert!((sign_test_p(1, 10) - 22.0 / 1024.0).abs() < 1e-12);
        // An even split is no evidence at all.
        assert_eq!(sign_test_p(5, 10), 1.0);
        assert_eq!(sign_test_p(0, 0), 1.0);
    }

    #[test]
    fn the_summary_takes_medians_of_the_per_pair_differences() {
        let pairs = vec![
            pair(100.0, 130.0),
            pair(300.0, 200.0),
            pair(150.0, 160.0),
            pair(90.0, 95.0),
        ];
        let s = summarize(&pairs);
        // Differences −30, +100, −10, −5: median of the middle two (−10, −5).
        let p99 = s.p99_added_us.unwrap();
        assert_eq!((p99.median, p99.min, p99.max), (-7.5, -30.0, 100.0));
        assert_eq!(s.a_lower_p99, 3);
        assert_eq!(s.p99_within_25us, 3);
        assert!((s.p99_sign_test_p - 2.0 * 5.0 / 16.0).abs() < 1e-12);
        assert_eq!(s.p50_added_us.unwrap().median, -10.0);
        assert_eq!(s.cpu_ratio.unwrap().median, 1.5);
        assert_eq!(s.unclean, 0);
    }

    #[test]
    fn pairs_with_loss_are_flagged_and_few_pairs_warned_about() {
        let mut lossy = pair(100.0, 100.0);
        lossy.b = step(60.0, 100.0, None, 5);
        let r = PairsReport::new(
            "uturn".into(),
            "forwarder".into(),
            "small".into(),
            1000.0,
            2.0,
            vec![lossy, pair(100.0, 120.0)],
        );
        assert_eq!(r.summary.unclean, 1);
        assert_eq!(
            r.summary.a_lower_p99, 1,
            "a tie is neither lower nor higher"
        );
        assert_eq!(
            r.summary.cpu_ratio.unwrap().median,
            1.5,
            "unknown CPU is left out"
        );
        assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
        let md = r.markdown();
        assert!(
            md.contains("| 2 | uturn | 50.0 | 60.0 | 100.0 | 120.0 | -20.0 | 1.50 |"),
            "{md}"
        );
        assert!(md.contains("lower in 1 of 2 pairs"), "{md}");
    }
}
