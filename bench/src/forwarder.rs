//! The bare UDP forwarder: the physical-limit reference. It does what a TURN relay's fast
//! path does per packet, and nothing else: no authentication, no permissions, no timers.
//!
//! ```text
//! client ──ChannelData──► listener ──strip 4-byte header──► relay socket i ──► peer
//! client ◄──ChannelData── listener ◄──prepend header────── relay socket i ◄── peer
//! ```
//!
//! A client announces itself once with a hello (`UTBF` + the peer address as text) and gets
//! back `UTBF` + its relay address; the forwarder then keeps one relay socket per client. It
//! uses the same batching as the load generator (`recvmmsg`/`sendmmsg`, one epoll loop), so the
//! gap between it and a TURN server is the cost of TURN, not of a different I/O method.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use uturn_proto::{CHANNEL_DATA_HEADER_LEN, ChannelData, ChannelNumber, write_channel_data_header};

use crate::io::{BATCH, Batch, SLOT_LEN, bind_udp, enlarge_buffers};

const HELLO: &[u8; 4] = b"UTBF";
const LISTENER_TOKEN: u64 = u64::MAX;
/// Batches read from one ready socket per wakeup at most.
const RECV_BATCHES_PER_SOCKET: usize = 8;

/// Counters of a forwarder run.
#[derive(Debug, Default, Clone, Copy)]
pub struct ForwarderStats {
    /// Client datagrams forwarded to peers.
    pub to_peers: u64,
    /// Peer datagrams forwarded to clients.
    pub to_clients: u64,
    /// Datagrams dropped (unknown client, malformed, send failure, client limit).
    pub dropped: u64,
}

/// Runs the forwarder on `listen` until `stop` or `max_duration`, with at most `clients_max`
/// clients; calls `ready` with the bound address once it is serving.
pub fn run(
    listen: SocketAddr,
    clients_max: usize,
    max_duration: Duration,
    stop: &AtomicBool,
    ready: impl FnOnce(SocketAddr),
) -> std::io::Result<ForwarderStats> {
    let listener = UdpSocket::bind(listen)?;
    enlarge_buffers(&listener);
    listener.set_nonblocking(true)?;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    epoll.add(
        listener.as_fd(),
        EpollEvent::new(EpollFlags::EPOLLIN, LISTENER_TOKEN),
    )?;
    let mut by_client: HashMap<SocketAddr, usize> = HashMap::new();
    // relay socket, client address, peer address
    let mut relays: Vec<(UdpSocket, SocketAddr, SocketAddr)> = Vec::new();
    let mut stats = ForwarderStats::default();
    let (mut inbox, mut to_peer, mut to_client) = (Batch::new(), Batch::new(), Batch::new());
    let mut order: Vec<(usize, usize)> = Vec::with_capacity(BATCH);
    let mut events = vec![EpollEvent::empty(); 256];
    ready(listener.local_addr()?);
    let deadline = crate::instant_after(Instant::now(), max_duration);
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let n = epoll
            .wait(&mut events, EpollTimeout::from(100u16))
            .unwrap_or(0);
        for ev in &events[..n] {
            let token = ev.data();
            if token == LISTENER_TOKEN {
                for _ in 0..RECV_BATCHES_PER_SOCKET {
                    let got = inbox.recv(&listener).unwrap_or(0);
                    // Group by relay socket, so each sendmmsg carries one socket's share.
                    order.clear();
                    for i in 0..got {
                        let Some((bytes, Some(from))) = inbox.get(i) else {
                            continue;
                        };
                        if bytes.starts_with(HELLO) {
                            let reply = hello_reply(
                                bytes,
                                from,
                                clients_max,
                                &listener,
                                &epoll,
                                &mut by_client,
                                &mut relays,
                            );
                            if let Some(reply) = reply {
                                let _ = listener.send_to(&reply, from);
                            } else {
                                stats.dropped += 1;
                            }
                            continue;
                        }
                        match by_client.get(&from) {
                            Some(&r) => order.push((r, i)),
                            None => stats.dropped += 1,
                        }
                    }
                    order.sort_unstable();
                    let mut current = None;
                    for &(r, i) in &order {
                        if current != Some(r) {
                            if let Some(prev) = current {
                                flush_to_peer(&mut to_peer, &relays, prev, &mut stats);
                            }
                            current = Some(r);
                        }
                        let (Some((bytes, _)), Some((_, _, peer))) = (inbox.get(i), relays.get(r))
                        else {
                            continue;
                        };
                        match ChannelData::parse(bytes) {
                            Ok(cd) => {
                                to_peer.push(cd.payload(), Some(*peer));
                            }
                            Err(_) => stats.dropped += 1,
                        }
                    }
                    if let Some(prev) = current {
                        flush_to_peer(&mut to_peer, &relays, prev, &mut stats);
                    }
                    if got < BATCH {
                        break;
                    }
                }
            } else if let Some((socket, client, _)) = relays.get(token as usize) {
                for _ in 0..RECV_BATCHES_PER_SOCKET {
                    let got = inbox.recv(socket).unwrap_or(0);
                    for i in 0..got {
                        let Some((payload, _)) = inbox.get(i) else {
                            continue;
                        };
                        let Some(slot) = to_client.slot() else {
                            stats.dropped += 1;
                            continue;
                        };
                        let end = CHANNEL_DATA_HEADER_LEN + payload.len();
                        if end > SLOT_LEN
                            || write_channel_data_header(slot, ChannelNumber::MIN, payload.len())
                                .is_err()
                        {
                            stats.dropped += 1;
                            continue;
                        }
                        slot[CHANNEL_DATA_HEADER_LEN..end].copy_from_slice(payload);
                        to_client.commit(end, Some(*client));
                        if to_client.is_full() {
                            let (s, f) = to_client.send(&listener);
                            stats.to_clients += s;
                            stats.dropped += f;
                        }
                    }
                    if got < BATCH {
                        break;
                    }
                }
            }
        }
        let (s, f) = to_client.send(&listener);
        stats.to_clients += s;
        stats.dropped += f;
    }
    Ok(stats)
}

fn flush_to_peer(
    batch: &mut Batch,
    relays: &[(UdpSocket, SocketAddr, SocketAddr)],
    r: usize,
    stats: &mut ForwarderStats,
) {
    match relays.get(r) {
        Some((socket, _, _)) => {
            let (s, f) = batch.send(socket);
            stats.to_peers += s;
            stats.dropped += f;
        }
        None => batch.clear(),
    }
}

fn hello_reply(
    bytes: &[u8],
    from: SocketAddr,
    clients_max: usize,
    listener: &UdpSocket,
    epoll: &Epoll,
    by_client: &mut HashMap<SocketAddr, usize>,
    relays: &mut Vec<(UdpSocket, SocketAddr, SocketAddr)>,
) -> Option<Vec<u8>> {
    let peer: SocketAddr = std::str::from_utf8(bytes.get(HELLO.len()..)?)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // The forwarder only relays to loopback: it exists to be loaded on this machine.
    if !peer.ip().is_loopback() {
        return None;
    }
    let index = match by_client.get(&from) {
        Some(&i) => i,
        None => {
            if relays.len() >= clients_max {
                return None;
            }
            let socket = bind_udp(listener.local_addr().ok()?.ip()).ok()?;
            socket.set_nonblocking(true).ok()?;
            let i = relays.len();
            epoll
                .add(
                    socket.as_fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN, i as u64),
                )
                .ok()?;
            relays.push((socket, from, peer));
            by_client.insert(from, i);
            i
        }
    };
    let relay = relays.get(index)?.0.local_addr().ok()?;
    let mut reply = HELLO.to_vec();
    reply.extend_from_slice(relay.to_string().as_bytes());
    Some(reply)
}

/// The client side of the hello on a socket connected to the forwarder: announces `peer` and
/// returns the relay address (three tries, 200 ms each).
pub fn hello(socket: &UdpSocket, peer: SocketAddr) -> std::io::Result<SocketAddr> {
    let mut request = HELLO.to_vec();
    request.extend_from_slice(peer.to_string().as_bytes());
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf = [0u8; 128];
    for _ in 0..3 {
        socket.send(&request)?;
        match socket.recv(&mut buf) {
            Ok(n) => {
                let text = buf
                    .get(HELLO.len()..n)
                    .and_then(|b| std::str::from_utf8(b).ok());
                if let Some(addr) = text.and_then(|t| t.parse().ok()) {
                    return Ok(addr);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the forwarder did not answer the hello",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;

    #[test]
    fn the_forwarder_relays_both_ways_and_stops_when_told() {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                run(
                    SocketAddr::new(lo, 0),
                    4,
                    Duration::from_secs(20),
                    &stop,
                    |a| {
                        let _ = tx.send(a);
                    },
                )
            })
        };
        let server = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let client = UdpSocket::bind(SocketAddr::new(lo, 0)).unwrap();
        client.connect(server).unwrap();
        let peer = UdpSocket::bind(SocketAddr::new(lo, 0)).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let relay = hello(&client, peer.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 64];
        let n =
            uturn_proto::write_channel_data(&mut buf, ChannelNumber::MIN, b"ping", false).unwrap();
        client.send(&buf[..n]).unwrap();
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"ping"[..], relay));
        peer.send_to(b"pong", relay).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let n = client.recv(&mut buf).unwrap();
        assert_eq!(ChannelData::parse(&buf[..n]).unwrap().payload(), b"pong");
        stop.store(true, Ordering::Relaxed);
        let stats = handle.join().unwrap().unwrap();
        assert_eq!((stats.to_peers, stats.to_clients), (1, 1));
    }
}
