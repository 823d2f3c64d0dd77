//! CPU accounting: the target server's from `/proc/PID/task/*/schedstat` (ns) or
//! `/proc/PID/stat` (ticks), the harness's own from `getrusage(RUSAGE_SELF)`.

use std::time::Duration;

use thiserror::Error;

/// `/proc/PID/stat` counts in USER_HZ ticks, which Linux fixes at 100 per second for user
/// space whatever the kernel's internal HZ (see proc(5), "times(2)").
const USER_HZ: u64 = 100;

/// Failure to read a process's CPU time.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CpuError {
    /// The stat file could not be read (process gone, no permission).
    #[error("cannot read /proc/{pid}/stat: {source}")]
    Read {
        /// The process.
        pid: u32,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The stat file did not have the expected fields.
    #[error("unexpected format of /proc/{pid}/stat")]
    Format {
        /// The process.
        pid: u32,
    },
    /// getrusage failed.
    #[error("getrusage: {0}")]
    Rusage(nix::Error),
}

/// CPU time of the process `pid` (all its threads): the sum of its threads' run time in ns
/// from `/proc/PID/task/*/schedstat` where the kernel has schedstats, else user plus system
/// time from `/proc/PID/stat`, which counts in 10 ms ticks (too coarse for one-second steps).
pub fn process_cpu(pid: u32) -> Result<Duration, CpuError> {
    if let Some(ns) = schedstat_ns(pid) {
        return Ok(Duration::from_nanos(ns));
    }
    process_cpu_ticks(pid)
}

/// The sum of the first field (time on CPU, ns) of every thread's schedstat.
fn schedstat_ns(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    let mut any = false;
    for task in tasks.flatten() {
        let text = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        total = total.saturating_add(parse_schedstat_ns(&text)?);
        any = true;
    }
    any.then_some(total)
}

/// The run time in ns from the text of a schedstat file (`run_ns wait_ns timeslices`).
pub fn parse_schedstat_ns(text: &str) -> Option<u64> {
    text.split_ascii_whitespace().next()?.parse().ok()
}

/// User plus system time of the process `pid` from `/proc/PID/stat` (10 ms resolution).
pub fn process_cpu_ticks(pid: u32) -> Result<Duration, CpuError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|source| CpuError::Read { pid, source })?;
    let ticks = parse_stat_ticks(&stat).ok_or(CpuError::Format { pid })?;
    Ok(Duration::from_millis(ticks.saturating_mul(1000 / USER_HZ)))
}

/// utime + stime (fields 14 and 15) from the text of `/proc/PID/stat`. The command name
/// (field 2) is in parentheses and may itself hold spaces and parentheses, so the fields are
/// counted from the last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")": field 3 (state) is the first token, so utime (14) is token 11, stime token 12.
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime.saturating_add(stime))
}

/// User plus system time of this process, all threads, microsecond resolution.
pub fn own_cpu() -> Result<Duration, CpuError> {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF).map_err(CpuError::Rusage)?;
    let to = |tv: nix::sys::time::TimeVal| {
        Duration::from_secs(u64::try_from(tv.tv_sec()).unwrap_or(0))
            + Duration::from_micros(u64::try_from(tv.tv_usec()).unwrap_or(0))
    };
    Ok(to(usage.user_time()) + to(usage.system_time()))
}

/// A before/after CPU reading of the server (optional) and of the harness.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    server: Option<Duration>,
    own: Option<Duration>,
}

impl CpuMark {
    /// Reads both clocks now; a server that cannot be read gives `None`, not an error, so a
    /// run without `--server-pid` still works.
    pub fn now(server_pid: Option<u32>) -> Self {
        Self {
            server: server_pid.and_then(|pid| process_cpu(pid).ok()),
            own: own_cpu().ok(),
        }
    }

    /// CPU seconds used since `self`: (server, own).
    pub fn since(&self, later: &Self) -> (Option<f64>, Option<f64>) {
        let diff = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64()),
            _ => None,
        };
        (diff(self.server, later.server), diff(self.own, later.own))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utime_and_stime_are_read_after_the_command_name() {
        let stat = "4242 (turn server) (x) S 1 4242 4242 0 -1 4194560 120 0 0 0 \
                    250 50 0 0 20 0 3 0 100 1000 10 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(300));
    }

    #[test]
    fn schedstat_gives_nanoseconds() {
        assert_eq!(parse_schedstat_ns("123456789 5000 42\n"), Some(123_456_789));
        assert_eq!(parse_schedstat_ns(""), None);
    }

    #[test]
    fn a_truncated_stat_line_is_rejected() {
        assert_eq!(parse_stat_ticks("1 (x) S 1 2 3"), None);
        assert_eq!(parse_stat_ticks("no parenthesis"), None);
    }

    #[test]
    fn this_process_has_readable_cpu_clocks() {
        let pid = std::process::id();
        assert!(process_cpu(pid).is_ok());
        assert!(process_cpu_ticks(pid).is_ok());
        assert!(own_cpu().is_ok());
        let mark = CpuMark::now(Some(pid));
        let (server, own) = mark.since(&CpuMark::now(Some(pid)));
        assert!(server.is_some_and(|s| s >= 0.0) && own.is_some_and(|s| s >= 0.0));
    }
}
