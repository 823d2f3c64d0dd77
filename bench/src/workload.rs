//! Named, reproducible workloads: every figure in a report names the workload it came from,
//! and the same name always means the same packets.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A named workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Voice: 200-byte payloads, 50 pps per allocation, 1,000 allocations (50 kpps).
    Audio,
    /// Video: 1,200-byte payloads, 100 pps per allocation, 100 allocations (10 kpps).
    Video,
    /// Small packets: 64-byte payloads, 1,000 pps per allocation, 64 allocations (64 kpps);
    /// the per-packet cost with as little per-byte cost as possible.
    Small,
    /// `audio`-sized traffic on 200 allocations while 50 allocations per second are made and
    /// deleted beside it.
    Churn,
    /// Full authenticated allocations per second (no traffic).
    Alloc,
}

/// The parameters a workload fixes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// Payload bytes (stamp included).
    pub payload_len: usize,
    /// Packets per second per allocation at the nominal rate.
    pub pps_per_allocation: f64,
    /// Allocations.
    pub allocations: u32,
    /// Allocations made and deleted per second beside the traffic.
    pub churn_per_sec: f64,
}

impl Workload {
    /// The workload's shape.
    pub fn shape(self) -> Shape {
        let (payload_len, pps_per_allocation, allocations, churn_per_sec) = match self {
            Self::Audio => (200, 50.0, 1000, 0.0),
            Self::Video => (1200, 100.0, 100, 0.0),
            Self::Small => (64, 1000.0, 64, 0.0),
            Self::Churn => (200, 50.0, 200, 50.0),
            Self::Alloc => (200, 0.0, 0, 0.0),
        };
        Shape {
            payload_len,
            pps_per_allocation,
            allocations,
            churn_per_sec,
        }
    }

    /// The workload's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Audio => "audio",
            Self::Video => "video",
            Self::Small => "small",
            Self::Churn => "churn",
            Self::Alloc => "alloc",
        }
    }
}

impl Shape {
    /// The nominal total rate.
    pub fn nominal_pps(&self) -> f64 {
        self.pps_per_allocation * f64::from(self.allocations)
    }
}

/// Default drain after each step: late packets beyond this count as lost.
pub const DRAIN: Duration = Duration::from_millis(300);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_named_workloads_match_the_issue() {
        let audio = Workload::Audio.shape();
        assert_eq!((audio.payload_len, audio.allocations), (200, 1000));
        assert_eq!(audio.nominal_pps(), 50_000.0);
        assert_eq!(Workload::Video.shape().payload_len, 1200);
        assert_eq!(Workload::Small.shape().payload_len, 64);
        assert!(Workload::Churn.shape().churn_per_sec > 0.0);
    }
}
