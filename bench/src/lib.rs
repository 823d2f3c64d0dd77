//! # uturn-bench: load generator, bare forwarder and probe for TURN servers
//!
//! The harness speaks standard TURN (RFC 8656) through `uturn-proto`, so it loads any server:
//! uturn, coturn, others. It measures what an operator needs to compare them, in one run:
//!
//! ```text
//!  setup (blocking, turn.rs): Allocate 401 → Allocate(auth) → CreatePermission → ChannelBind
//!  traffic (load.rs, one event loop per worker, batched with sendmmsg/recvmmsg, and runs of
//!    datagrams to one destination as one UDP GSO send, io.rs):
//!    client socket ──ChannelData / Send ind.──► relay ──► peer socket (echo or sink)
//!    client socket ◄──ChannelData / Data ind.── relay ◄──┘
//!    (client socket: UDP, or with --transport tcp|tls one TCP/TLS connection per allocation,
//!     written whole frames at a time, read through a StreamFramer; the peer side stays UDP)
//!  each payload carries [magic | flow | seq | send time | peer hold] (stats.rs) → loss,
//!    reordering, latency (send stamp to the kernel's SO_TIMESTAMPNS arrival stamp)
//!  pacing (pacing.rs): open loop, packet k leaves at start + k / rate, never waits for answers
//!  keeper (keeper.rs): every --refresh-secs (60 s) each allocation sends Refresh and
//!    ChannelBind (or CreatePermission) on its own 5-tuple, renewing stale nonces, so runs may
//!    outlast a permission's 300 s; the event loop reads the answers beside the traffic
//!  sweep (sweep.rs): grow the rate until loss > 0.1 %, then bisect: the knee (searched on a
//!    1 ms tick, so that clients batch; then a 10 s latency step at half of it on 100 µs)
//!  cpu (cpu.rs): server CPU from /proc/PID/task/*/schedstat (or /proc/PID/stat), own from
//!    getrusage
//!  report (report.rs, plot.rs): JSON, Markdown table with ratios, SVG plots
//!  pairs (pairs.rs): two servers set up at once, then short steps in alternation (A B, B A,
//!    ...) at one rate: per-pair differences of p99, p50 and CPU, and a sign test
//! ```
//!
//! `metrics.rs` reads a server's Prometheus page (the soak polls it until allocations drain).
//! Besides the load modes it holds the bare UDP forwarder (`forwarder.rs`, the physical-limit
//! reference) and the `probe` (`probe.rs`, with `tls.rs` for `turns:`), which checks a live
//! server step by step.
//!
//! What it refuses to do: load (not probe) any address outside loopback unless told to with
//! `--allow-remote`; run a loop without a bound in count and time; invent a figure (every number
//! in a report is measured in that run).
#![forbid(unsafe_code)]

pub mod alloc;
pub mod cpu;
pub mod forwarder;
pub mod io;
pub mod keeper;
pub mod load;
pub mod metrics;
pub mod pacing;
pub mod pairs;
pub mod plot;
pub mod probe;
pub mod report;
pub mod stats;
pub mod sweep;
pub mod tls;
pub mod turn;
pub mod workload;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// `now + d`, saturating at a far but representable instant instead of panicking ("overflow
/// when adding duration to instant") when `d` is huge: a deadline from an unbounded
/// duration, or a timer doubled once too often, then means "not in this run".
pub fn instant_after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// What [`instant_after`] saturates at: a century, longer than any run and small enough to
/// add to any `Instant` the monotonic clock gives.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Refuses a load target outside loopback unless `allow_remote` is set: this harness can send
/// hundreds of thousands of packets per second, which is only acceptable towards a server the
/// operator owns and means to load.
pub fn check_load_target(target: SocketAddr, allow_remote: bool) -> Result<(), String> {
    if target.ip().is_loopback() || allow_remote {
        Ok(())
    } else {
        Err(format!(
            "{target} is not a loopback address; pass --allow-remote to load a server you own"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_from_a_huge_duration_saturates_instead_of_panicking() {
        let now = Instant::now();
        assert_eq!(
            instant_after(now, Duration::from_millis(5)),
            now + Duration::from_millis(5)
        );
        let far = instant_after(now, Duration::MAX);
        assert!(far >= now + Duration::from_secs(3600 * 24 * 365));
    }
}
