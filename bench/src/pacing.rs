//! Open-loop pacing: packet `k` (from 0) is due at `start + k / rate`, whatever the server
//! answers. A closed loop (send the next packet when the previous answer arrives) would slow
//! down exactly when the server struggles and hide its loss; an open loop keeps offering the
//! load and lets the loss show.

use std::time::Duration;

/// Computes how many packets are due at a given elapsed time, bounded by a total count.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate_pps: f64,
    limit: u64,
    issued: u64,
}

impl Pacer {
    /// A pacer for `rate_pps` packets per second during `duration` (so at most
    /// `rate_pps * duration` packets in all).
    pub fn new(rate_pps: f64, duration: Duration) -> Self {
        let rate_pps = if rate_pps.is_finite() && rate_pps > 0.0 {
            rate_pps
        } else {
            0.0
        };
        // Saturating float-to-int conversion: a rate of 0 gives a limit of 0.
        let limit = (rate_pps * duration.as_secs_f64()).floor() as u64;
        Self {
            rate_pps,
            limit,
            issued: 0,
        }
    }

    /// The number of packets that should have left by `elapsed` and have not been issued yet.
    pub fn due(&self, elapsed: Duration) -> u64 {
        let by_now = ((self.rate_pps * elapsed.as_secs_f64()).floor() as u64).min(self.limit);
        by_now.saturating_sub(self.issued)
    }

    /// Records that `count` packets were issued (sent or failed to send).
    pub fn issue(&mut self, count: u64) {
        self.issued = self.issued.saturating_add(count).min(self.limit);
    }

    /// Packets issued so far.
    pub fn issued(&self) -> u64 {
        self.issued
    }

    /// The total number of packets this pacer will issue.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether every packet has been issued.
    pub fn is_done(&self) -> bool {
        self.issued >= self.limit
    }

    /// The elapsed time at which the next packet is due, `None` when done.
    pub fn next_due(&self) -> Option<Duration> {
        if self.is_done() || self.rate_pps <= 0.0 {
            return None;
        }
        // `due` counts floor(rate * elapsed) packets, so the packet after the `issued` ones
        // becomes due when rate * elapsed reaches issued + 1.
        Some(Duration::from_secs_f64(
            (self.issued + 1) as f64 / self.rate_pps,
        ))
    }

    /// How far behind schedule the pacer is at `elapsed` (the age of the oldest due packet).
    pub fn lag(&self, elapsed: Duration) -> Duration {
        match self.next_due() {
            Some(at) if elapsed > at && self.due(elapsed) > 0 => elapsed - at,
            _ => Duration::ZERO,
        }
    }
}

/// Which flow packet `seq` belongs to: round-robin, so every flow sees `rate / flows`.
pub fn flow_of(seq: u64, flows: u32) -> u32 {
    if flows == 0 {
        0
    } else {
        (seq % u64::from(flows)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pacer_releases_packets_at_the_configured_rate() {
        let mut p = Pacer::new(1000.0, Duration::from_secs(2));
        assert_eq!(p.limit(), 2000);
        assert_eq!(p.due(Duration::ZERO), 0);
        assert_eq!(p.due(Duration::from_millis(10)), 10);
        p.issue(10);
        assert_eq!(p.due(Duration::from_millis(10)), 0);
        assert_eq!(p.due(Duration::from_millis(25)), 15);
    }

    #[test]
    fn a_pacer_never_issues_more_than_its_limit() {
        let mut p = Pacer::new(100.0, Duration::from_secs(1));
        assert_eq!(p.due(Duration::from_secs(50)), 100);
        p.issue(1000);
        assert_eq!(p.issued(), 100);
        assert!(p.is_done());
        assert_eq!(p.due(Duration::from_secs(60)), 0);
        assert_eq!(p.next_due(), None);
    }

    #[test]
    fn a_late_pacer_catches_up_in_one_burst_and_reports_its_lag() {
        // Open loop: a stall does not lower the offered load, it shows as a burst and a lag.
        let mut p = Pacer::new(1000.0, Duration::from_secs(1));
        p.issue(p.due(Duration::from_millis(100)));
        assert_eq!(p.lag(Duration::from_millis(100)), Duration::ZERO);
        let lag = p.lag(Duration::from_millis(150));
        assert!(lag >= Duration::from_millis(49) && lag <= Duration::from_millis(50));
        assert_eq!(p.due(Duration::from_millis(150)), 50);
    }

    #[test]
    fn next_due_is_the_schedule_of_the_next_packet() {
        let mut p = Pacer::new(4.0, Duration::from_secs(1));
        assert_eq!(p.next_due(), Some(Duration::from_millis(250)));
        p.issue(p.due(Duration::from_millis(250)));
        assert_eq!(p.next_due(), Some(Duration::from_millis(500)));
    }

    #[test]
    fn a_zero_or_invalid_rate_issues_nothing() {
        for rate in [0.0, -5.0, f64::NAN] {
            let p = Pacer::new(rate, Duration::from_secs(10));
            assert_eq!(p.limit(), 0);
            assert_eq!(p.due(Duration::from_secs(5)), 0);
        }
    }

    #[test]
    fn packets_spread_round_robin_over_flows() {
        let counts = (0..1000u64).fold([0u32; 3], |mut c, k| {
            c[flow_of(k, 3) as usize] += 1;
            c
        });
        assert_eq!(counts, [334, 333, 333]);
        assert_eq!(flow_of(7, 0), 0);
    }
}
