//! End-to-end relay tests on real loopback sockets, for both backends. The test plays the control
//! thread: it answers nothing, but reads `ToControl`, binds relay sockets and sends the table
//! commands. Every wait is a receive with a bounded timeout; nothing sleeps.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use uturn_dataplane::{
    AllocationId, Backend, BackendChoice, ChannelNumber, ClientTransport, DataPlane,
    DataPlaneConfig, DataPlaneError, DropReason, RelaySocket, ShardCommand, ShardCounters, ShardId,
    ToControl,
};
use uturn_proto::{
    Attribute, Class, Message, MessageBuilder, Method, PacketKind, TransactionId, classify,
};

const WAIT: Duration = Duration::from_secs(5);
/// How long to listen for a datagram that must not arrive.
const QUIET: Duration = Duration::from_millis(300);

fn config(backend: BackendChoice, threads: usize, listen: SocketAddr) -> DataPlaneConfig {
    DataPlaneConfig {
        listen: vec![listen],
        threads: Some(threads),
        backend,
        counters_interval: Duration::from_millis(20),
        ..DataPlaneConfig::default()
    }
}

fn udp(addr: &str) -> UdpSocket {
    let socket = UdpSocket::bind(addr).expect("bind test socket");
    socket.set_read_timeout(Some(WAIT)).expect("set timeout");
    socket
}

fn recv(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 4096];
    let (n, from) = socket
        .recv_from(&mut buf)
        .expect("datagram within the timeout");
    buf.truncate(n);
    (buf, from)
}

fn nothing_arrives(socket: &UdpSocket) -> bool {
    socket.set_read_timeout(Some(QUIET)).expect("set timeout");
    let mut buf = [0u8; 2048];
    let quiet = socket.recv_from(&mut buf).is_err();
    socket.set_read_timeout(Some(WAIT)).expect("set timeout");
    quiet
}

fn binding_request(tid: u8) -> Vec<u8> {
    let mut buf = vec![0u8; 128];
    let builder = MessageBuilder::new(
        &mut buf,
        Class::Request,
        Method::BINDING,
        TransactionId([tid; 12]),
    );
    let n = builder.finish();
    buf.truncate(n);
    buf
}

fn send_indication(peer: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let mut builder = MessageBuilder::new(
        &mut buf,
        Class::Indication,
        Method::SEND,
        TransactionId([7; 12]),
    );
    builder
        .attribute(&Attribute::XorPeerAddress(peer))
        .expect("room");
    builder.attribute(&Attribute::Data(data)).expect("room");
    let n = builder.finish();
    buf.truncate(n);
    buf
}

fn channel_data(channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Waits for the next `ToControl::Request`, skipping counters.
fn next_request(rx: &Receiver<ToControl>) -> (ShardId, SocketAddr, SocketAddr, Vec<u8>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left).expect("a request within the timeout") {
            ToControl::Request {
                shard,
                server,
                client,
                bytes,
                ..
            } => {
                return (shard, server, client, bytes);
            }
            _ => continue,
        }
    }
}

/// Waits for a counters report of `shard` that satisfies `pred`; returns it.
fn counters_until(
    rx: &Receiver<ToControl>,
    shard: ShardId,
    pred: impl Fn(&ShardCounters) -> bool,
) -> ShardCounters {
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(ToControl::Counters(c)) = rx.recv_timeout(left)
            && c.shard == shard
        {
            if pred(&c.shard_counters) {
                return c.shard_counters;
            }
            last = Some(c.shard_counters);
        }
    }
    panic!("counters never satisfied the condition; last report: {last:?}");
}

/// Applies every command queued so far: a Transmit after them reaches the client only once the
/// shard has processed them (commands are FIFO).
fn barrier(plane: &DataPlane, shard: ShardId, server: SocketAddr, client: &UdpSocket, tag: u8) {
    let to = client.local_addr().expect("local addr");
    let bytes = vec![0xB0, tag];
    plane
        .send(
            shard,
            ShardCommand::Transmit {
                transport: ClientTransport::Udp,
                server,
                to,
                bytes: bytes.clone(),
            },
        )
        .expect("send");
    let (got, from) = recv(client);
    assert_eq!(got, bytes, "barrier datagram");
    assert_eq!(
        from, server,
        "Transmit leaves from the listener the client uses"
    );
}

/// Whether io_uring runs here. Where it does not (seccomp in a container,
/// `kernel.io_uring_disabled`), the io_uring tests check the fallback instead: `Uring` fails with
/// the reason and `Auto` runs the mmsg backend, quoting the same reason.
fn uring_available() -> bool {
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("literal");
    match DataPlane::start(config(BackendChoice::Uring, 1, listen)) {
        Ok((plane, _rx)) => {
            plane.shutdown();
            true
        }
        Err(DataPlaneError::UringUnavailable { reason }) => {
            eprintln!("io_uring unavailable here ({reason}); checking the fallback instead");
            let (plane, _rx) =
                DataPlane::start(config(BackendChoice::Auto, 1, listen)).expect("auto start");
            assert_eq!(plane.backend(), (Backend::Mmsg, reason.as_str()));
            plane.shutdown();
            false
        }
        Err(other) => panic!("unexpected start error: {other}"),
    }
}

fn scenario(backend: BackendChoice, threads: usize, ip: &str) {
    if backend == BackendChoice::Uring && !uring_available() {
        return;
    }
    if ip.starts_with('[')
        && let Err(error) = UdpSocket::bind(format!("{ip}:0"))
    {
        // Containers without IPv6 have no ::1; the data plane must then refuse to start.
        eprintln!("no IPv6 loopback here ({error}); checking the refusal instead");
        let listen: SocketAddr = format!("{ip}:0").parse().expect("literal");
        assert!(DataPlane::start(config(backend, threads, listen)).is_err());
        return;
    }
    let any = format!("{ip}:0");
    let listen: SocketAddr = any.parse().expect("literal");
    let (plane, rx) = DataPlane::start(config(backend, threads, listen)).expect("start");
    assert_eq!(plane.shard_count(), threads);
    let expected = if backend == BackendChoice::Uring {
        Backend::Uring
    } else {
        Backend::Mmsg
    };
    assert_eq!(plane.backend().0, expected);
    let server = plane.listener_addrs()[0];
    assert_ne!(server.port(), 0, "the listener port is resolved");

    // 1. A STUN request from a client reaches control with the 5-tuple.
    let client = udp(&any);
    let request = binding_request(1);
    client.send_to(&request, server).expect("send");
    let (shard, seen_server, seen_client, bytes) = next_request(&rx);
    assert_eq!(seen_server, server);
    assert_eq!(seen_client, client.local_addr().expect("addr"));
    assert_eq!(bytes, request);
    assert!(usize::from(shard.0) < threads);

    // 2. Control binds a relay and installs allocation, permission and channel.
    let relay = udp(&any);
    let relay_addr = relay.local_addr().expect("addr");
    let peer = udp(&any);
    let peer_addr = peer.local_addr().expect("addr");
    // Permissions are per IP (RFC 8656 §9), so a peer without one needs another address.
    let stranger = (ip == "127.0.0.1").then(|| udp("127.0.0.2:0"));
    let alloc = AllocationId(42);
    let channel = ChannelNumber::new(0x4001).expect("valid channel");
    plane
        .send(
            shard,
            ShardCommand::OpenAllocation {
                transport: ClientTransport::Udp,
                alloc,
                client_server: server,
                client: seen_client,
                relays: vec![RelaySocket {
                    socket: relay,
                    addr: relay_addr,
                }],
                dont_fragment: true,
            },
        )
        .expect("send");
    plane
        .send(
            shard,
            ShardCommand::SetPermission {
                alloc,
                peer_ip: peer_addr.ip(),
            },
        )
        .expect("send");
    plane
        .send(
            shard,
            ShardCommand::BindChannel {
                alloc,
                channel,
                peer: peer_addr,
            },
        )
        .expect("send");
    barrier(&plane, shard, server, &client, 1);

    // 3. ChannelData client→peer: the peer gets exactly the payload, from the relay address.
    let payload = b"hello peer, via channel".to_vec();
    client
        .send_to(&channel_data(0x4001, &payload), server)
        .expect("send");
    let (got, from) = recv(&peer);
    assert_eq!(got, payload);
    assert_eq!(from, relay_addr);

    // 4. peer→client with a channel bound: ChannelData with the right channel and payload.
    let reply = b"hello client, odd length".to_vec();
    peer.send_to(&reply, relay_addr).expect("send");
    let (got, from) = recv(&client);
    assert_eq!(from, server);
    assert_eq!(classify(&got), PacketKind::ChannelData);
    let cd = uturn_proto::ChannelData::parse(&got).expect("valid ChannelData");
    assert_eq!(cd.channel(), channel);
    assert_eq!(cd.payload(), &reply[..]);

    // 5. Send indication client→peer.
    let data = b"sent by indication".to_vec();
    client
        .send_to(&send_indication(peer_addr, &data), server)
        .expect("send");
    let (got, from) = recv(&peer);
    assert_eq!(got, data);
    assert_eq!(from, relay_addr);

    // 6. Without the channel, peer→client arrives as a Data indication.
    plane
        .send(shard, ShardCommand::UnbindChannel { alloc, channel })
        .expect("send");
    barrier(&plane, shard, server, &client, 2);
    let odd = b"data indication payload, 35 bytes!!".to_vec();
    peer.send_to(&odd, relay_addr).expect("send");
    let (got, _) = recv(&client);
    let message = Message::parse(&got).expect("a valid STUN message");
    assert_eq!(message.class(), Class::Indication);
    assert_eq!(message.method(), Method::DATA);
    let xor_peer = message
        .xor_peer_addresses()
        .next()
        .expect("XOR-PEER-ADDRESS")
        .expect("valid");
    assert_eq!(xor_peer, peer_addr);
    assert_eq!(message.data().expect("valid").expect("DATA"), &odd[..]);
    assert_eq!(got.len() % 4, 0, "padded to 4 bytes");

    // 7. A peer without permission is dropped and counted: another IP, then the permitted
    //    peer after RemovePermission.
    if let Some(stranger) = &stranger {
        stranger.send_to(b"let me in", relay_addr).expect("send");
        counters_until(&rx, shard, |c| c.drops.get(DropReason::NoPermission) >= 1);
        assert!(
            nothing_arrives(&client),
            "a peer without permission reaches nobody"
        );
    }
    let before = counters_until(&rx, shard, |_| true);
    plane
        .send(
            shard,
            ShardCommand::RemovePermission {
                alloc,
                peer_ip: peer_addr.ip(),
            },
        )
        .expect("send");
    barrier(&plane, shard, server, &client, 5);
    peer.send_to(b"permission gone", relay_addr).expect("send");
    let after = counters_until(&rx, shard, |c| {
        c.drops.get(DropReason::NoPermission) > before.drops.get(DropReason::NoPermission)
    });
    assert!(after.peer_datagrams > before.peer_datagrams);
    assert!(
        nothing_arrives(&client),
        "a peer without permission reaches nobody"
    );
    // Client→peer needs the permission too (RFC 8656 §11.2).
    client
        .send_to(&send_indication(peer_addr, b"no"), server)
        .expect("send");
    counters_until(&rx, shard, |c| {
        c.drops.get(DropReason::NoPermission) > after.drops.get(DropReason::NoPermission)
    });
    assert!(nothing_arrives(&peer));

    // 8. ChannelData on an unbound channel is dropped as no_channel.
    client
        .send_to(&channel_data(0x4001, b"x"), server)
        .expect("send");
    counters_until(&rx, shard, |c| c.drops.get(DropReason::NoChannel) >= 1);

    // 9. Per-allocation counters are reported.
    let deadline = Instant::now() + WAIT;
    let mut found = false;
    while !found && Instant::now() < deadline {
        if let Ok(ToControl::Counters(c)) = rx.recv_timeout(WAIT)
            && let Some((_, a)) = c.allocations.iter().find(|(id, _)| *id == alloc)
        {
            assert_eq!(a.to_peer_packets, 2);
            assert_eq!(a.to_peer_bytes, (payload.len() + data.len()) as u64);
            assert_eq!(a.to_client_packets, 2);
            assert_eq!(a.to_client_bytes, (reply.len() + odd.len()) as u64);
            found = true;
        }
    }
    assert!(found, "allocation counters reported");

    // 10. RemoveAllocation stops relaying in both directions.
    plane
        .send(shard, ShardCommand::RemoveAllocation { alloc })
        .expect("send");
    barrier(&plane, shard, server, &client, 3);
    client
        .send_to(&send_indication(peer_addr, b"gone"), server)
        .expect("send");
    counters_until(&rx, shard, |c| c.drops.get(DropReason::NoAllocation) >= 1);
    assert!(
        nothing_arrives(&peer),
        "nothing relayed after RemoveAllocation"
    );
    // The relay socket is closed: the address can be bound again.
    let deadline = Instant::now() + WAIT;
    let rebound = loop {
        match UdpSocket::bind(relay_addr) {
            Ok(s) => break Some(s),
            Err(_) if Instant::now() < deadline => {
                // Closing follows the cancel's completion; a Transmit round trip gives the
                // shard turns to finish it.
                barrier(&plane, shard, server, &client, 4);
            }
            Err(_) => break None,
        }
    };
    assert!(
        rebound.is_some(),
        "relay socket closed after RemoveAllocation"
    );

    plane.shutdown();
}

#[test]
fn uring_relays_with_one_shard_on_ipv4() {
    scenario(BackendChoice::Uring, 1, "127.0.0.1");
}

#[test]
fn uring_relays_with_two_shards_on_ipv4() {
    scenario(BackendChoice::Uring, 2, "127.0.0.1");
}

#[test]
fn uring_relays_on_ipv6() {
    scenario(BackendChoice::Uring, 1, "[::1]");
}

#[test]
fn mmsg_relays_with_one_shard_on_ipv4() {
    scenario(BackendChoice::Mmsg, 1, "127.0.0.1");
}

#[test]
fn mmsg_relays_with_two_shards_on_ipv4() {
    scenario(BackendChoice::Mmsg, 2, "127.0.0.1");
}

#[test]
fn mmsg_relays_on_ipv6() {
    scenario(BackendChoice::Mmsg, 1, "[::1]");
}

/// Hostile datagrams on the listener are counted, never fatal: the shard keeps serving.
fn hostile(backend: BackendChoice) {
    if backend == BackendChoice::Uring && !uring_available() {
        return;
    }
    let (plane, rx) = DataPlane::start(config(backend, 1, "127.0.0.1:0".parse().expect("literal")))
        .expect("start");
    let server = plane.listener_addrs()[0];
    let client = udp("127.0.0.1:0");
    let garbage: Vec<Vec<u8>> = vec![
        vec![],                             // empty datagram
        vec![0xFF; 40],                     // neither STUN nor ChannelData
        vec![0x40, 0x00],                   // ChannelData shorter than its header
        vec![0x40, 0x00, 0x00, 0x10, 1, 2], // ChannelData longer than the datagram
        vec![0x50, 0x00, 0x00, 0x00],       // reserved channel range
        send_indication("192.0.2.1:9".parse().expect("literal"), b"x")[..10].to_vec(),
        vec![0x40; 3000], // larger than a receive buffer (truncated)
    ];
    for datagram in &garbage {
        client.send_to(datagram, server).expect("send");
    }
    let counters = counters_until(&rx, ShardId(0), |c| {
        c.drops.get(DropReason::Malformed) + c.drops.get(DropReason::Truncated) >= 5
    });
    assert!(
        counters.drops.get(DropReason::Truncated) >= 1,
        "{counters:?}"
    );
    // Still alive: a request still reaches control.
    client.send_to(&binding_request(3), server).expect("send");
    next_request(&rx);
    plane.shutdown();
}

#[test]
fn uring_survives_hostile_datagrams() {
    hostile(BackendChoice::Uring);
}

#[test]
fn mmsg_survives_hostile_datagrams() {
    hostile(BackendChoice::Mmsg);
}

#[test]
fn auto_backend_reports_a_reason() {
    let (plane, _rx) = DataPlane::start(config(
        BackendChoice::Auto,
        1,
        "127.0.0.1:0".parse().expect("literal"),
    ))
    .expect("start");
    let (backend, reason) = plane.backend();
    assert!(!reason.is_empty());
    assert!(!backend.name().is_empty());
    plane.shutdown();
}

#[test]
fn every_shard_binds_the_same_resolved_port() {
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("literal");
    let (plane, rx) = DataPlane::start(config(BackendChoice::Mmsg, 3, listen)).expect("start");
    let server = plane.listener_addrs()[0];
    // Clients from many source ports land on shards by SO_REUSEPORT hash; all reach control.
    let mut shards = std::collections::HashSet::new();
    for i in 0..24u8 {
        let client = udp("127.0.0.1:0");
        client.send_to(&binding_request(i), server).expect("send");
        let (shard, seen_server, _, _) = next_request(&rx);
        assert_eq!(seen_server, server);
        shards.insert(shard);
    }
    // 24 source ports all hashing to one of 3 shards has probability 3^-23.
    assert!(
        shards.len() > 1,
        "several shards serve the one port: {shards:?}"
    );
    plane.shutdown();
}

#[test]
fn a_bad_config_is_refused_with_a_reason() {
    let mut bad = config(
        BackendChoice::Mmsg,
        1,
        "127.0.0.1:0".parse().expect("literal"),
    );
    bad.buffer_size = 16;
    let error = DataPlane::start(bad).expect_err("too small buffers");
    assert!(error.to_string().contains("buffer_size"), "{error}");
}

#[test]
fn binding_a_taken_address_names_the_address_and_shard() {
    let taken = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let error = DataPlane::start(config(BackendChoice::Mmsg, 1, addr)).expect_err("in use");
    let text = error.to_string();
    assert!(
        text.contains(&addr.to_string()) && text.contains("shard 0"),
        "{text}"
    );
}

/// Blasts ChannelData and checks the books balance: every datagram the shard received was
/// relayed or dropped for a counted reason, and the peer got at most what was relayed.
fn blast(backend: BackendChoice, starved: bool) {
    if backend == BackendChoice::Uring && !uring_available() {
        return;
    }
    const PACKETS: usize = 5_000;
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("literal");
    let mut cfg = config(backend, 1, listen);
    // Small batches and slots push the loop through its full-queue paths; a starved pool (two
    // receive buffers) makes io_uring's multishot receive end with ENOBUFS again and again.
    cfg.batch_size = 16;
    cfg.send_slots = if starved { 1 } else { 64 };
    cfg.recv_buffers_free = if starved { 1 } else { 64 };
    let (plane, rx) = DataPlane::start(cfg).expect("start");
    let server = plane.listener_addrs()[0];
    let client = udp("127.0.0.1:0");
    client.send_to(&binding_request(9), server).expect("send");
    let (shard, _, client_addr, _) = next_request(&rx);
    let relay = udp("127.0.0.1:0");
    let relay_addr = relay.local_addr().expect("addr");
    let peer = socket2::Socket::from(udp("127.0.0.1:0"));
    let _ = peer.set_recv_buffer_size(8 << 20);
    let peer: UdpSocket = peer.into();
    let peer_addr = peer.local_addr().expect("addr");
    let alloc = AllocationId(7);
    let channel = ChannelNumber::new(0x4000).expect("valid");
    plane
        .send(
            shard,
            ShardCommand::OpenAllocation {
                transport: ClientTransport::Udp,
                alloc,
                client_server: server,
                client: client_addr,
                relays: vec![RelaySocket {
                    socket: relay,
                    addr: relay_addr,
                }],
                dont_fragment: false,
            },
        )
        .expect("send");
    plane
        .send(
            shard,
            ShardCommand::SetPermission {
                alloc,
                peer_ip: peer_addr.ip(),
            },
        )
        .expect("send");
    plane
        .send(
            shard,
            ShardCommand::BindChannel {
                alloc,
                channel,
                peer: peer_addr,
            },
        )
        .expect("send");
    barrier(&plane, shard, server, &client, 1);

    let receiver = std::thread::spawn(move || {
        peer.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let mut buf = [0u8; 2048];
        let mut got = 0usize;
        // Ends after half a second without traffic, or when everything arrived.
        while got < PACKETS && peer.recv_from(&mut buf).is_ok() {
            got += 1;
        }
        got
    });
    let payload = [0x5Au8; 200];
    let frame = channel_data(0x4000, &payload);
    for _ in 0..PACKETS {
        client.send_to(&frame, server).expect("send");
    }
    let got = receiver.join().expect("receiver thread");
    // Settle: wait until the shard has accounted for every datagram it received.
    let counters = counters_until(&rx, shard, |c| {
        c.client_datagrams > got as u64
            && c.to_peer_packets + c.drops.total() + c.requests == c.client_datagrams
    });
    let received = counters.client_datagrams - 1; // minus the Binding request
    let relayed = counters.to_peer_packets;
    eprintln!(
        "{backend:?}: sent {PACKETS}, shard received {received}, relayed {relayed}, dropped {:?}, \
         peer got {got}, turns {}, max completions/turn {}, sq-full submits {}",
        counters.drops,
        counters.loop_turns,
        counters.completions_per_turn_max,
        counters.sq_full_submits
    );
    assert!(received <= PACKETS as u64);
    assert_eq!(
        relayed + counters.drops.total(),
        received,
        "every datagram relayed or counted"
    );
    assert!(
        got as u64 <= relayed,
        "the peer cannot get more than was relayed"
    );
    assert!(
        got >= PACKETS / 2,
        "most datagrams arrive on loopback ({got} of {PACKETS})"
    );
    assert!(
        counters.completions_per_turn_max > 1,
        "many packets are handled per turn"
    );
    plane.shutdown();
}

#[test]
fn uring_relays_a_blast_and_the_counts_add_up() {
    blast(BackendChoice::Uring, false);
}

#[test]
fn mmsg_relays_a_blast_and_the_counts_add_up() {
    blast(BackendChoice::Mmsg, false);
}

#[test]
fn uring_keeps_relaying_when_the_buffer_ring_runs_dry() {
    blast(BackendChoice::Uring, true);
}

#[test]
fn mmsg_keeps_relaying_with_one_send_slot() {
    blast(BackendChoice::Mmsg, true);
}

#[test]
fn shutdown_joins_every_shard_and_frees_the_port() {
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("literal");
    for backend in [BackendChoice::Uring, BackendChoice::Mmsg] {
        if backend == BackendChoice::Uring && !uring_available() {
            continue;
        }
        let (plane, rx) = DataPlane::start(config(backend, 2, listen)).expect("start");
        let server = plane.listener_addrs()[0];
        plane.shutdown();
        // Every shard dropped its sender: the channel disconnects once drained.
        let deadline = Instant::now() + WAIT;
        while rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
        {}
        assert!(rx.recv_timeout(Duration::ZERO).is_err());
        UdpSocket::bind(server).expect("listener closed, port free again");
    }
}
