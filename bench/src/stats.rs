//! Per-packet accounting: the stamp each payload carries, loss, duplicates, reordering and the
//! latency histogram.
//!
//! Payload layout (big-endian), the rest of the payload is zero padding up to its size:
//!
//! ```text
//! [0..4) magic "UTB1" | [4..8) flow | [8..16) sequence number | [16..24) send time, ns of
//! CLOCK_REALTIME (the clock of the kernel's receive stamps; both ends are this process, so no
//! clock sync is needed) | [24..32) the echo peer's hold time, ns: how long the harness's
//! own peer kept the packet before echoing it, subtracted from the round trip so the figure is
//! the relay's and the network's, not the harness's
//! ```

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Bytes the stamp occupies at the start of every payload.
pub const STAMP_LEN: usize = 32;
/// Where the echo peer writes its hold time.
const HOLD_AT: usize = 24;
const MAGIC: [u8; 4] = *b"UTB1";
/// Highest latency the histogram holds: 60 s in ns; anything above is clamped.
const LATENCY_NS_MAX: u64 = 60_000_000_000;

/// What a payload carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The flow (allocation index within its worker).
    pub flow: u32,
    /// Sequence number, unique per worker.
    pub seq: u64,
    /// Send time, CLOCK_REALTIME ns.
    pub sent_ns: u64,
}

/// Writes the echo peer's hold time into a received payload before it goes back.
pub fn write_hold(payload: &mut [u8], hold_ns: u64) {
    if let Some(h) = payload.get_mut(HOLD_AT..STAMP_LEN) {
        h.copy_from_slice(&hold_ns.to_be_bytes());
    }
}

/// The echo peer's hold time in a payload (0 when absent).
pub fn read_hold(payload: &[u8]) -> u64 {
    payload
        .get(HOLD_AT..STAMP_LEN)
        .and_then(|h| h.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

impl Stamp {
    /// Writes the stamp into `payload[..STAMP_LEN]`; `false` when the payload is too short.
    pub fn write(&self, payload: &mut [u8]) -> bool {
        let Some(head) = payload.get_mut(..STAMP_LEN) else {
            return false;
        };
        head[..4].copy_from_slice(&MAGIC);
        head[4..8].copy_from_slice(&self.flow.to_be_bytes());
        head[8..16].copy_from_slice(&self.seq.to_be_bytes());
        head[16..24].copy_from_slice(&self.sent_ns.to_be_bytes());
        head[HOLD_AT..STAMP_LEN].fill(0);
        true
    }

    /// Reads a stamp; `None` for a payload this harness did not send.
    pub fn read(payload: &[u8]) -> Option<Self> {
        let head = payload.get(..STAMP_LEN)?;
        if head[..4] != MAGIC {
            return None;
        }
        Some(Self {
            flow: u32::from_be_bytes(head[4..8].try_into().ok()?),
            seq: u64::from_be_bytes(head[8..16].try_into().ok()?),
            sent_ns: u64::from_be_bytes(head[16..24].try_into().ok()?),
        })
    }
}

/// Accounting for one measurement step: which sequence numbers in `[base, base + capacity)`
/// arrived, in what order, and how late.
#[derive(Debug, Clone)]
pub struct Accounting {
    base: u64,
    capacity: u64,
    seen: Vec<u64>,
    highest_per_flow: Vec<Option<u64>>,
    /// Distinct packets received.
    pub received: u64,
    /// Packets received more than once (after the first copy).
    pub duplicates: u64,
    /// Packets that arrived after a higher sequence number of the same flow.
    pub reordered: u64,
    /// Packets outside this step's range (late ones from an earlier step) or not ours.
    pub foreign: u64,
    /// One-way or round-trip latency in ns, as measured by the caller.
    pub latency_ns: Histogram<u64>,
}

impl Accounting {
    /// Accounting for sequence numbers `base..base + capacity` over `flows` flows.
    pub fn new(base: u64, capacity: u64, flows: u32) -> Self {
        let words = usize::try_from(capacity.div_ceil(64)).unwrap_or(usize::MAX);
        Self {
            base,
            capacity,
            seen: vec![0; words],
            highest_per_flow: vec![None; flows as usize],
            received: 0,
            duplicates: 0,
            reordered: 0,
            foreign: 0,
            latency_ns: new_histogram(),
        }
    }

    /// Accounts one received stamp, `latency_ns` after it was sent.
    pub fn record(&mut self, stamp: Stamp, latency_ns: u64) {
        let Some(offset) = stamp
            .seq
            .checked_sub(self.base)
            .filter(|o| *o < self.capacity)
        else {
            self.foreign += 1;
            return;
        };
        let Some(highest) = self.highest_per_flow.get_mut(stamp.flow as usize) else {
            self.foreign += 1;
            return;
        };
        let (word, bit) = ((offset / 64) as usize, offset % 64);
        let Some(w) = self.seen.get_mut(word) else {
            self.foreign += 1;
            return;
        };
        if *w & (1 << bit) != 0 {
            self.duplicates += 1;
            return;
        }
        *w |= 1 << bit;
        self.received += 1;
        match highest {
            Some(h) if *h > stamp.seq => self.reordered += 1,
            _ => *highest = Some(stamp.seq),
        }
        let _ = self.latency_ns.record(latency_ns.clamp(1, LATENCY_NS_MAX));
    }

    /// Packets lost out of `sent`: sent and never received (duplicates do not hide a loss).
    pub fn lost(&self, sent: u64) -> u64 {
        sent.saturating_sub(self.received)
    }

    /// Merges another worker's accounting (disjoint sequence spaces) into the totals.
    pub fn merge_totals(&mut self, other: &Self) {
        self.received += other.received;
        self.duplicates += other.duplicates;
        self.reordered += other.reordered;
        self.foreign += other.foreign;
        let _ = self.latency_ns.add(&other.latency_ns);
    }
}

/// An empty latency histogram: 1 ns to 60 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts (low >= 1, high >= 2 * low, sigfig
    // <= 5), so this cannot fail on any input: it is an internal invariant, not input handling.
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("constant histogram bounds are valid")
}

/// Loss as a fraction of what was sent (0 when nothing was sent).
pub fn loss_ratio(sent: u64, lost: u64) -> f64 {
    if sent == 0 {
        0.0
    } else {
        lost as f64 / sent as f64
    }
}

/// Latency percentiles in microseconds, with a CDF for plots.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Maximum.
    pub max_us: f64,
    /// (quantile 0..1, latency µs) points, for the CDF plot.
    pub cdf: Vec<(f64, f64)>,
}

impl LatencySummary {
    /// Summarises a histogram of nanoseconds.
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        let quantiles = [
            0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995,
            0.999, 0.9995, 0.9999, 1.0,
        ];
        Self {
            count: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            cdf: quantiles
                .iter()
                .map(|q| (*q, us(h.value_at_quantile(*q))))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(flow: u32, seq: u64) -> Stamp {
        Stamp {
            flow,
            seq,
            sent_ns: 0,
        }
    }

    #[test]
    fn a_stamp_survives_a_round_trip_through_a_payload() {
        let s = Stamp {
            flow: 7,
            seq: 0x0102_0304_0506_0708,
            sent_ns: 99,
        };
        let mut payload = [0u8; 64];
        assert!(s.write(&mut payload));
        assert_eq!(Stamp::read(&payload), Some(s));
    }

    #[test]
    fn the_peer_hold_time_rides_behind_the_stamp() {
        let mut payload = [0u8; 64];
        assert!(stamp(1, 2).write(&mut payload));
        assert_eq!(read_hold(&payload), 0);
        write_hold(&mut payload, 12_345);
        assert_eq!(read_hold(&payload), 12_345);
        assert_eq!(Stamp::read(&payload), Some(stamp(1, 2)));
        write_hold(&mut [0u8; 10], 1); // too short: ignored, no panic
    }

    #[test]
    fn short_or_foreign_payloads_carry_no_stamp() {
        assert!(!stamp(0, 0).write(&mut [0u8; STAMP_LEN - 1]));
        assert_eq!(Stamp::read(&[0u8; 10]), None);
        assert_eq!(Stamp::read(&[0u8; 64]), None, "wrong magic");
    }

    #[test]
    fn loss_is_what_was_sent_and_never_received() {
        let mut a = Accounting::new(0, 100, 1);
        for seq in (0..100).filter(|s| s % 10 != 0) {
            a.record(stamp(0, seq), 1000);
        }
        assert_eq!(a.received, 90);
        assert_eq!(a.lost(100), 10);
        assert!((loss_ratio(100, a.lost(100)) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn duplicates_are_counted_and_do_not_hide_a_loss() {
        let mut a = Accounting::new(0, 4, 1);
        for seq in [0, 1, 1, 2, 2, 2] {
            a.record(stamp(0, seq), 1000);
        }
        assert_eq!((a.received, a.duplicates, a.lost(4)), (3, 3, 1));
    }

    #[test]
    fn reordering_is_counted_per_flow() {
        // Flows 0 and 1 interleave; only flow 0 sees an inversion (4 after 6).
        let mut a = Accounting::new(0, 10, 2);
        for (flow, seq) in [(0, 0), (1, 1), (0, 2), (0, 6), (1, 3), (0, 4), (1, 5)] {
            a.record(stamp(flow, seq), 1000);
        }
        assert_eq!(a.reordered, 1);
        assert_eq!(a.received, 7);
    }

    #[test]
    fn packets_from_another_step_or_flow_are_foreign() {
        let mut a = Accounting::new(100, 10, 2);
        a.record(stamp(0, 99), 1);
        a.record(stamp(0, 110), 1);
        a.record(stamp(5, 105), 1);
        assert_eq!((a.foreign, a.received), (3, 0));
        a.record(stamp(1, 105), 1);
        assert_eq!(a.received, 1);
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut a = Accounting::new(0, 1000, 1);
        for seq in 0..1000u64 {
            a.record(stamp(0, seq), (seq + 1) * 1000); // 1 µs .. 1000 µs
        }
        let s = LatencySummary::from_histogram(&a.latency_ns);
        assert_eq!(s.count, 1000);
        let close = |x: f64, y: f64| (x - y).abs() <= y * 0.01;
        assert!(close(s.p50_us, 500.0), "{}", s.p50_us);
        assert!(close(s.p90_us, 900.0), "{}", s.p90_us);
        assert!(close(s.p99_us, 990.0), "{}", s.p99_us);
        assert!(close(s.p999_us, 999.0), "{}", s.p999_us);
        assert!(close(s.max_us, 1000.0), "{}", s.max_us);
        assert!(
            s.cdf.windows(2).all(|w| w[0].1 <= w[1].1),
            "a CDF never decreases"
        );
    }

    #[test]
    fn merged_totals_add_up() {
        let mut a = Accounting::new(0, 10, 1);
        let mut b = Accounting::new(0, 10, 1);
        a.record(stamp(0, 1), 10);
        b.record(stamp(0, 1), 20);
        b.record(stamp(0, 0), 30);
        a.merge_totals(&b);
        assert_eq!((a.received, a.reordered, a.latency_ns.len()), (3, 1, 3));
    }

    #[test]
    fn an_empty_histogram_summarises_to_zeroes() {
        assert_eq!(
            LatencySummary::from_histogram(&new_histogram()),
            LatencySummary::default()
        );
    }
}
