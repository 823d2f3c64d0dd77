//! `alloc` mode: full authenticated allocations per second. Each worker thread repeats, on a
//! fresh 5-tuple: Allocate (answered 401), Allocate with credentials, then Refresh LIFETIME 0 so
//! the server's quotas and ports stay free. Only the two Allocate round trips are timed.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::cpu::CpuMark;
use crate::io::bind_udp;
use crate::load::local_ip_for;
use crate::stats::new_histogram;
use crate::turn::{TurnClient, TurnError};

/// Outcome of an `alloc` run.
#[derive(Debug)]
pub struct AllocRaw {
    /// Handshakes that ended in a relayed address.
    pub succeeded: u64,
    /// Handshakes that failed (error response or timeout).
    pub failed: u64,
    /// Wall time.
    pub wall: Duration,
    /// Handshake latency, ns.
    pub latency_ns: Histogram<u64>,
    /// Server CPU seconds, when its pid is known.
    pub server_cpu_secs: Option<f64>,
    /// Own CPU seconds.
    pub own_cpu_secs: Option<f64>,
    /// The first failure, for the report.
    pub first_error: Option<String>,
}

/// Sockets a thread keeps open after their allocation is deleted, so the OS does not hand
/// the same port out again at once: a server may keep a deleted allocation's 5-tuple for a
/// moment (coturn answers 437 on it), which would count the harness's port reuse as a failure.
const PORTS_HELD: usize = 512;

/// One full handshake and its deletion; returns the handshake's duration and the socket.
pub fn allocate_and_delete(
    server: SocketAddr,
    user: &str,
    pass: &str,
    n: u64,
) -> Result<Duration, TurnError> {
    allocate_and_delete_on(server, user, pass, n).map(|(took, _)| took)
}

/// One full handshake whose allocation is then left alone: the server must expire it by
/// itself (the soak checks that it does). The socket closes here, as a client that vanished.
pub fn allocate_and_abandon(
    server: SocketAddr,
    user: &str,
    pass: &str,
    n: u64,
) -> Result<Duration, TurnError> {
    let socket = bind_udp(client_ip(server, n))?;
    let mut client = TurnClient::udp(socket, server, user, pass)?;
    client.timeout = Duration::from_secs(2);
    let start = Instant::now();
    client.allocate()?;
    Ok(start.elapsed())
}

/// The client address of handshake `n`: over IPv4, spread over 127.1.0.1-127.1.249.250 so a
/// 5-tuple does not come back within seconds (the ephemeral ports of one address would be
/// reused after ~28,000 handshakes, and coturn keeps deleted 5-tuples for a while).
fn client_ip(server: SocketAddr, n: u64) -> IpAddr {
    match server {
        SocketAddr::V4(_) => {
            let a = ((n / 250) % 250) as u8;
            let b = (n % 250) as u8 + 1;
            IpAddr::V4(Ipv4Addr::new(127, 1, a, b))
        }
        SocketAddr::V6(_) => local_ip_for(server),
    }
}

fn allocate_and_delete_on(
    server: SocketAddr,
    user: &str,
    pass: &str,
    n: u64,
) -> Result<(Duration, UdpSocket), TurnError> {
    let socket = bind_udp(client_ip(server, n))?;
    let mut client = TurnClient::udp(socket, server, user, pass)?;
    client.timeout = Duration::from_secs(2);
    let start = Instant::now();
    client.allocate()?;
    let took = start.elapsed();
    client.delete()?;
    let socket = client
        .into_udp_socket()
        .ok_or_else(|| TurnError::Io(std::io::Error::other("not a UDP client")))?;
    Ok((took, socket))
}

/// Runs `concurrency` threads of allocate-and-delete for `duration`, at most `count_max`
/// handshakes in all; `tick` is called after each.
#[allow(clippy::too_many_arguments)]
pub fn run(
    server: SocketAddr,
    user: &str,
    pass: &str,
    concurrency: u32,
    duration: Duration,
    count_max: u64,
    server_pid: Option<u32>,
    stop: &AtomicBool,
    tick: &(dyn Fn() + Sync),
) -> AllocRaw {
    let before = CpuMark::now(server_pid);
    let start = Instant::now();
    let deadline = start + duration;
    let issued = std::sync::atomic::AtomicU64::new(0);
    let results: Vec<(u64, u64, Histogram<u64>, Option<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..concurrency.clamp(1, 256))
            .map(|_| {
                let issued = &issued;
                scope.spawn(move || {
                    let (mut ok, mut failed, mut hist, mut first_error) =
                        (0, 0, new_histogram(), None);
                    let mut held = VecDeque::with_capacity(PORTS_HELD);
                    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                        let n = issued.fetch_add(1, Ordering::Relaxed);
                        if n >= count_max {
                            break;
                        }
                        match allocate_and_delete_on(server, user, pass, n) {
                            Ok((took, socket)) => {
                                if held.len() == PORTS_HELD {
                                    held.pop_front();
                                }
                                held.push_back(socket);
                                ok += 1;
                                let _ = hist.record((took.as_nanos() as u64).max(1));
                            }
                            Err(e) => {
                                failed += 1;
                                first_error.get_or_insert_with(|| e.to_string());
                            }
                        }
                        tick();
                    }
                    (ok, failed, hist, first_error)
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let wall = start.elapsed();
    let (server_cpu_secs, own_cpu_secs) = before.since(&CpuMark::now(server_pid));
    let mut raw = AllocRaw {
        succeeded: 0,
        failed: 0,
        wall,
        latency_ns: new_histogram(),
        server_cpu_secs,
        own_cpu_secs,
        first_error: None,
    };
    for (ok, failed, hist, err) in results {
        raw.succeeded += ok;
        raw.failed += failed;
        let _ = raw.latency_ns.add(&hist);
        if raw.first_error.is_none() {
            raw.first_error = err;
        }
    }
    raw
}
