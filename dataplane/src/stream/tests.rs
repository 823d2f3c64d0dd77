//! Stream-layer tests that need more than one connection's bytes: a running data plane (real
//! shard threads, real loopback sockets) whose connections are made to panic through the
//! test-only hook ([`conn::TEST_PANIC_MAGIC`](super::conn::TEST_PANIC_MAGIC)), showing that the
//! panicking connection is closed and counted while the shard and every other connection and
//! allocation go on, on both backends; and the per-source connection cap.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use uturn_proto::{Class, MessageBuilder, Method, TransactionId};

use super::conn::TEST_PANIC_MAGIC;
use super::{StreamKind, StreamListen};
use crate::{
    AllocationId, BackendChoice, ChannelNumber, ClientTransport, DataPlane, DataPlaneConfig,
    DataPlaneError, RelaySocket, ShardCommand, ShardCounters, ShardId, ToControl,
};

const WAIT: Duration = Duration::from_secs(5);
const SHARD: ShardId = ShardId(0);

fn start(backend: BackendChoice) -> Option<(DataPlane, Receiver<ToControl>)> {
    let config = DataPlaneConfig {
        listen: vec!["127.0.0.1:0".parse().expect("literal")],
        stream_listen: vec![StreamListen {
            addr: "127.0.0.1:0".parse().expect("literal"),
            kind: StreamKind::Tcp,
        }],
        threads: Some(1),
        pin_threads: false,
        backend,
        counters_interval: Duration::from_millis(20),
        socket_recv_buffer_bytes: None,
        socket_send_buffer_bytes: None,
        ..DataPlaneConfig::default()
    };
    match DataPlane::start(config) {
        Ok(started) => Some(started),
        Err(DataPlaneError::UringUnavailable { reason }) => {
            eprintln!("skipped: io_uring is unavailable here ({reason}); mmsg runs the same test");
            None
        }
        Err(other) => panic!("data plane start: {other}"),
    }
}

fn binding(tid: u8) -> Vec<u8> {
    let mut buf = vec![0u8; 64];
    let n = MessageBuilder::new(
        &mut buf,
        Class::Request,
        Method::BINDING,
        TransactionId([tid; 12]),
    )
    .finish();
    buf.truncate(n);
    buf
}

/// ChannelData padded to 4, as over a stream (RFC 8656 §12.5).
fn channel_data(channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = channel.to_be_bytes().to_vec();
    frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    frame.extend_from_slice(payload);
    frame.resize(frame.len().next_multiple_of(4), 0);
    frame
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream
}

/// The next `Request` to control, skipping other messages.
fn next_request(rx: &Receiver<ToControl>) -> (ClientTransport, SocketAddr, Vec<u8>) {
    let deadline = Instant::now() + WAIT;
    while let Ok(message) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if let ToControl::Request {
            transport,
            client,
            bytes,
            ..
        } = message
        {
            return (transport, client, bytes);
        }
    }
    panic!("no request reached control within {WAIT:?}");
}

fn counters_until(
    rx: &Receiver<ToControl>,
    pred: impl Fn(&ShardCounters) -> bool,
) -> ShardCounters {
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    while let Ok(message) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if let ToControl::Counters(report) = message {
            if pred(&report.shard_counters) {
                return report.shard_counters;
            }
            last = Some(report.shard_counters);
        }
    }
    panic!("the counters never got there; last report: {last:?}");
}

/// Whether the server closed `stream` (EOF or reset) within [`WAIT`].
fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
    false
}

/// Reads one padded ChannelData frame from a stream.
fn read_channel_data(stream: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).expect("ChannelData header");
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let mut body = vec![0u8; len.next_multiple_of(4)];
    stream.read_exact(&mut body).expect("ChannelData body");
    body.truncate(len);
    (u16::from_be_bytes([header[0], header[1]]), body)
}

/// A TCP allocation installed the way control installs one, with a channel to `peer`.
struct TcpAllocation {
    stream: TcpStream,
    relay: SocketAddr,
    channel: u16,
}

fn tcp_allocation(
    plane: &DataPlane,
    alloc: u64,
    listener: SocketAddr,
    peer: SocketAddr,
    channel: u16,
) -> TcpAllocation {
    let stream = connect(listener);
    let relay = UdpSocket::bind("127.0.0.1:0").expect("relay socket");
    let relay_addr = relay.local_addr().expect("relay address");
    let alloc = AllocationId(alloc);
    let commands = [
        ShardCommand::OpenAllocation {
            alloc,
            transport: ClientTransport::Tcp,
            client_server: listener,
            client: stream.local_addr().expect("client address"),
            relays: vec![RelaySocket {
                socket: relay,
                addr: relay_addr,
            }],
            dont_fragment: false,
        },
        ShardCommand::SetPermission {
            alloc,
            peer_ip: peer.ip(),
        },
        ShardCommand::BindChannel {
            alloc,
            channel: ChannelNumber::new(channel).expect("valid channel"),
            peer,
        },
    ];
    for command in commands {
        plane.send(SHARD, command).expect("command");
    }
    TcpAllocation {
        stream,
        relay: relay_addr,
        channel,
    }
}

/// Client → peer and peer → client through `allocation`; the shard may still be applying the
/// allocation's commands, so the first direction is retried (bounded).
fn assert_relays_both_ways(allocation: &mut TcpAllocation, peer: &UdpSocket, payload: &[u8]) {
    let frame = channel_data(allocation.channel, payload);
    let mut buf = [0u8; 2048];
    let mut arrived = None;
    for _ in 0..20 {
        allocation.stream.write_all(&frame).expect("client writes");
        peer.set_read_timeout(Some(Duration::from_millis(250)))
            .expect("timeout");
        if let Ok((n, from)) = peer.recv_from(&mut buf) {
            arrived = Some((buf[..n].to_vec(), from));
            break;
        }
    }
    let (got, from) = arrived.expect("the peer receives the client's ChannelData");
    assert_eq!((got.as_slice(), from), (payload, allocation.relay));
    peer.send_to(payload, allocation.relay)
        .expect("peer answers");
    assert_eq!(
        read_channel_data(&mut allocation.stream),
        (allocation.channel, payload.to_vec()),
        "the client receives the peer's datagram as ChannelData"
    );
}

fn a_panicking_connection_is_closed_and_counted_while_the_shard_goes_on(backend: BackendChoice) {
    let Some((plane, rx)) = start(backend) else {
        return;
    };
    let udp_listener = plane.listener_addrs()[0];
    let listener = plane.stream_listeners()[0].addr;
    let peer = UdpSocket::bind("127.0.0.1:0").expect("peer");
    let peer_addr = peer.local_addr().expect("peer address");
    let udp_client = UdpSocket::bind("127.0.0.1:0").expect("UDP client");

    // Before: a UDP client, a TCP client talking to control, a TCP allocation relaying.
    udp_client
        .send_to(&binding(1), udp_listener)
        .expect("UDP Binding");
    assert_eq!(next_request(&rx).0, ClientTransport::Udp);
    let mut talking = connect(listener);
    talking.write_all(&binding(2)).expect("TCP Binding");
    assert_eq!(
        next_request(&rx),
        (
            ClientTransport::Tcp,
            talking.local_addr().expect("address"),
            binding(2)
        )
    );
    let mut relaying = tcp_allocation(&plane, 1, listener, peer_addr, 0x4000);
    assert_relays_both_ways(&mut relaying, &peer, b"before");

    // A connection whose receive work panics is closed and counted.
    let mut doomed = connect(listener);
    doomed.write_all(TEST_PANIC_MAGIC).expect("write");
    assert!(
        closed_by_server(&mut doomed),
        "the panicking connection is closed"
    );
    let counters = counters_until(&rx, |c| c.connection_panics == 1);
    assert_eq!(counters.stream_closed, 1, "only that connection closed");

    // A connection whose send work (a relayed frame queued for it) panics, likewise.
    let mut victim = tcp_allocation(&plane, 2, listener, peer_addr, 0x4001);
    assert_relays_both_ways(&mut victim, &peer, b"victim");
    peer.send_to(TEST_PANIC_MAGIC, victim.relay)
        .expect("peer sends the trigger");
    assert!(
        closed_by_server(&mut victim.stream),
        "the connection whose frame panicked is closed"
    );
    let counters = counters_until(&rx, |c| c.connection_panics == 2);
    assert_eq!(counters.stream_closed, 2);

    // After: the same shard still serves everyone else.
    assert_relays_both_ways(&mut relaying, &peer, b"after");
    talking.write_all(&binding(3)).expect("TCP Binding");
    assert_eq!(next_request(&rx).2, binding(3));
    udp_client
        .send_to(&binding(4), udp_listener)
        .expect("UDP Binding");
    assert_eq!(next_request(&rx).2, binding(4));
    let mut fresh = connect(listener);
    fresh.write_all(&binding(5)).expect("a new connection");
    assert_eq!(next_request(&rx).2, binding(5));
    plane.shutdown();
}

#[test]
fn a_panicking_connection_is_closed_and_counted_while_the_shard_goes_on_mmsg() {
    a_panicking_connection_is_closed_and_counted_while_the_shard_goes_on(BackendChoice::Mmsg);
}

#[test]
fn a_panicking_connection_is_closed_and_counted_while_the_shard_goes_on_uring() {
    a_panicking_connection_is_closed_and_counted_while_the_shard_goes_on(BackendChoice::Uring);
}

/// Issue-8 limit, per source as the rate limits count it: the addresses of one IPv6 /64 share
/// one budget (one host owns the /64), another /64 has its own; IPv4 counts per address.
#[test]
fn the_per_source_connection_cap_counts_an_ipv6_slash_64_as_one_source() {
    let sources = super::SourceConnections::default();
    let ip = |text: &str| -> std::net::IpAddr { text.parse().expect("literal") };
    assert!(sources.try_add(ip("2001:db8:1:2::1"), 2));
    assert!(sources.try_add(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), 2));
    assert!(
        !sources.try_add(ip("2001:db8:1:2:1234::9"), 2),
        "a third address of the same /64 is over the cap"
    );
    assert!(
        sources.try_add(ip("2001:db8:1:3::1"), 2),
        "the next /64 is another source"
    );
    sources.remove(ip("2001:db8:1:2::1"));
    assert!(
        sources.try_add(ip("2001:db8:1:2::77"), 2),
        "closing any address of the /64 frees room for all of it"
    );
    assert!(sources.try_add(ip("192.0.2.1"), 1));
    assert!(!sources.try_add(ip("192.0.2.1"), 1));
    assert!(
        sources.try_add(ip("192.0.2.2"), 1),
        "IPv4 counts per address"
    );
}
