//! End to end over UDP: the real `uturn` binary on 127.0.0.1 and ::1, driven by a TURN client
//! built on `uturn-proto`, relaying to UDP echo peers. Every scenario runs on both data-plane
//! backends (io_uring and recvmmsg/sendmmsg).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use uturn_e2e::{
    ANSWER_TIMEOUT, EchoPeer, FORBIDDEN, Relayed, TempConfig, TurnClient, Uturn, peer_socket,
    standard_args,
};
use uturn_proto::{AddressFamily, Attribute, Class, EvenPort, Message, Method, ReservationToken};

/// How long a test waits to conclude that something was *not* relayed.
const SILENCE: Duration = Duration::from_millis(400);

fn start(backend: &str, threads: usize, extra: &[&str]) -> Uturn {
    let mut args = standard_args(backend, threads);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Uturn::start(&refs)
}

uturn_e2e::on_both_backends!(
    allocate_is_challenged_with_401_then_succeeds,
    channel_data_flows_both_ways_through_an_echo_peer,
    send_and_data_indications_flow_both_ways,
    a_peer_without_permission_is_not_relayed,
    refresh_extends_and_lifetime_zero_deletes,
    permissions_expire_after_their_configured_lifetime,
    an_ipv6_relay_carries_channel_data,
    a_dual_stack_allocation_relays_to_both_families,
    even_port_reserves_the_next_port_for_the_token_holder,
    loopback_peers_are_forbidden_unless_allowed,
);

/// RFC 8656 §7.2: "the server MUST [...] challenge the request" that lacks credentials (401 with
/// REALM and NONCE); the authenticated retry succeeds with XOR-RELAYED-ADDRESS,
/// XOR-MAPPED-ADDRESS and LIFETIME.
fn allocate_is_challenged_with_401_then_succeeds(backend: &str) {
    let server = start(backend, 1, &[]);
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");

    let tid = uturn_proto::TransactionId([7; 12]);
    let request = client.build_request(
        Method::ALLOCATE,
        tid,
        &[Attribute::RequestedTransport(uturn_proto::Protocol::UDP)],
    );
    let challenge = client.transact(tid, &request);
    assert_eq!(challenge.error_code(), Some(401));
    let msg = challenge.message();
    assert_eq!(msg.realm().unwrap(), Some("e2e.test"));
    assert!(msg.nonce().unwrap().is_some_and(|n| !n.is_empty()));

    let allocation = client
        .allocate(&[])
        .expect("authenticated Allocate succeeds");
    assert_eq!(allocation.relayed.len(), 1);
    assert_eq!(allocation.relayed[0].ip().to_string(), "127.0.0.1");
    assert_eq!(allocation.mapped, client.local_addr());
    assert_eq!(allocation.lifetime_secs, 600, "RFC 8656 default lifetime");

    // A second Allocate from the same 5-tuple (new transaction) is 437.
    assert_eq!(client.allocate(&[]).unwrap_err(), 437);

    // A wrong password is refused.
    let mut intruder = TurnClient::new(server.listener(false), "alice", "not-the-password");
    assert_eq!(intruder.allocate(&[]).unwrap_err(), 401);
}

/// RFC 8656 §12: after ChannelBind, ChannelData from the client reaches the peer from the
/// relayed address, and the peer's datagrams come back as ChannelData on that channel.
fn channel_data_flows_both_ways_through_an_echo_peer(backend: &str) {
    let server = start(backend, 1, &[]);
    let peer = EchoPeer::start(false);
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    let allocation = client.allocate(&[]).unwrap();
    client.channel_bind(0x4000, peer.addr).unwrap();

    // Odd sizes check that no padding leaks into the payload either way.
    let payloads: Vec<Vec<u8>> = [1usize, 3, 4, 5, 100, 1200]
        .iter()
        .map(|&n| (0..n).map(|i| (i % 251) as u8).collect())
        .collect();
    for payload in &payloads {
        client.send_channel_data(0x4000, payload);
        let echoed = client
            .recv_relayed(ANSWER_TIMEOUT)
            .expect("echo comes back through the relay");
        assert_eq!(
            echoed,
            Relayed::ChannelData {
                channel: 0x4000,
                payload: payload.clone()
            }
        );
    }
    let seen = peer.seen();
    assert_eq!(seen.len(), payloads.len());
    for ((from, data), payload) in seen.iter().zip(&payloads) {
        assert_eq!(
            *from, allocation.relayed[0],
            "peer sees the relayed address"
        );
        assert_eq!(data, payload);
    }
}

/// RFC 8656 §11: a Send indication reaches a permitted peer; the peer's answer comes back as a
/// Data indication carrying XOR-PEER-ADDRESS and DATA.
fn send_and_data_indications_flow_both_ways(backend: &str) {
    let server = start(backend, 1, &[]);
    let peer = EchoPeer::start(false);
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    client.allocate(&[]).unwrap();
    client.create_permission(&[peer.addr]).unwrap();
    for payload in [&b"a"[..], b"hello", b"seven b", &[0xAB; 1000]] {
        client.send_indication(peer.addr, payload);
        let echoed = client
            .recv_relayed(ANSWER_TIMEOUT)
            .expect("Data indication");
        assert_eq!(
            echoed,
            Relayed::Data {
                peer: peer.addr,
                payload: payload.to_vec()
            }
        );
    }
}

/// RFC 8656 §9: "the server [...] MUST NOT relay" data from a peer without a permission, and a
/// Send indication to such a peer is discarded.
fn a_peer_without_permission_is_not_relayed(backend: &str) {
    let server = start(backend, 1, &[]);
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    let allocation = client.allocate(&[]).unwrap();
    let stranger = peer_socket(false);
    stranger
        .send_to(b"let me in", allocation.relayed[0])
        .unwrap();
    assert_eq!(client.recv_relayed(SILENCE), None);

    client.send_indication(stranger.local_addr().unwrap(), b"not permitted");
    stranger
        .set_read_timeout(Some(SILENCE))
        .expect("set timeout");
    let mut buf = [0u8; 64];
    assert!(stranger.recv_from(&mut buf).is_err(), "nothing relayed");

    // Once permitted, the same peer gets through.
    client
        .create_permission(&[stranger.local_addr().unwrap()])
        .unwrap();
    stranger.send_to(b"now ok", allocation.relayed[0]).unwrap();
    assert_eq!(
        client.recv_relayed(ANSWER_TIMEOUT),
        Some(Relayed::Data {
            peer: stranger.local_addr().unwrap(),
            payload: b"now ok".to_vec()
        })
    );
}

/// RFC 8656 §8: Refresh sets a new lifetime (capped at the maximum, 3600 s by default); a
/// LIFETIME of 0 deletes the allocation at once, after which nothing is relayed and further
/// requests on it get 437.
fn refresh_extends_and_lifetime_zero_deletes(backend: &str) {
    let server = start(backend, 1, &[]);
    let peer = EchoPeer::start(false);
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    client.allocate(&[]).unwrap();
    client.channel_bind(0x4001, peer.addr).unwrap();
    assert_eq!(client.refresh(1200), Ok(1200));
    assert_eq!(client.refresh(86_400), Ok(3600), "capped at the maximum");

    client.send_channel_data(0x4001, b"before delete");
    assert!(client.recv_relayed(ANSWER_TIMEOUT).is_some());

    assert_eq!(client.refresh(0), Ok(0));
    client.send_channel_data(0x4001, b"after delete");
    assert_eq!(peer.wait_for(2, SILENCE), 1, "nothing relayed after delete");
    assert_eq!(client.refresh(600), Err(437));
}

/// RFC 8656 §9: a permission lasts its lifetime (300 s by default; 1 s here, from the config
/// file) unless refreshed; after that, the peer's datagrams are dropped.
fn permissions_expire_after_their_configured_lifetime(backend: &str) {
    let config = TempConfig::new(
        &format!("short-permissions-{backend}"),
        "[relay]\npermission_lifetime_secs = 1\n",
    );
    let server = start(backend, 1, &["--config", config.path()]);
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    let allocation = client.allocate(&[]).unwrap();
    let peer = peer_socket(false);
    let peer_addr = peer.local_addr().unwrap();
    client.create_permission(&[peer_addr]).unwrap();
    let permitted_at = Instant::now();

    peer.send_to(b"inside lifetime", allocation.relayed[0])
        .unwrap();
    assert!(matches!(
        client.recv_relayed(ANSWER_TIMEOUT),
        Some(Relayed::Data { .. })
    ));

    // Probe every 100 ms (bounded: 5 s) until the relay stops passing the peer's data.
    let mut expired_after = None;
    while permitted_at.elapsed() < Duration::from_secs(5) {
        peer.send_to(b"probe", allocation.relayed[0]).unwrap();
        if client.recv_relayed(Duration::from_millis(100)).is_none() {
            expired_after = Some(permitted_at.elapsed());
            break;
        }
    }
    let expired_after = expired_after.expect("the permission expired within 5 s");
    assert!(
        expired_after >= Duration::from_millis(900),
        "permission must live its full second, ended after {expired_after:?}"
    );
}

/// RFC 8656 §7.1: REQUESTED-ADDRESS-FAMILY IPv6 gets an IPv6 relayed address; ChannelData
/// flows through it to an IPv6 peer, with the client on ::1 as well.
fn an_ipv6_relay_carries_channel_data(backend: &str) {
    let server = start(backend, 1, &[]);
    let peer = EchoPeer::start(true);
    let mut client = TurnClient::new(server.listener(true), "alice", "wonderland");
    let allocation = client
        .allocate(&[Attribute::RequestedAddressFamily(AddressFamily::V6)])
        .unwrap();
    assert!(allocation.relayed[0].is_ipv6());
    client.channel_bind(0x4ABC, peer.addr).unwrap();
    client.send_channel_data(0x4ABC, b"over v6");
    assert_eq!(
        client.recv_relayed(ANSWER_TIMEOUT),
        Some(Relayed::ChannelData {
            channel: 0x4ABC,
            payload: b"over v6".to_vec()
        })
    );
    assert_eq!(peer.seen()[0].0, allocation.relayed[0]);
}

/// RFC 8656 §7.2: ADDITIONAL-ADDRESS-FAMILY IPv6 gives a dual-stack allocation with one IPv4
/// and one IPv6 relayed address, each relaying to peers of its family.
fn a_dual_stack_allocation_relays_to_both_families(backend: &str) {
    let server = start(backend, 1, &[]);
    let peer4 = EchoPeer::start(false);
    let peer6 = EchoPeer::start(true);
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    let allocation = client
        .allocate(&[Attribute::AdditionalAddressFamily(AddressFamily::V6)])
        .unwrap();
    let families: Vec<bool> = allocation.relayed.iter().map(SocketAddr::is_ipv6).collect();
    assert_eq!(families, vec![false, true]);
    client.create_permission(&[peer4.addr, peer6.addr]).unwrap();
    for peer in [&peer4, &peer6] {
        client.send_indication(peer.addr, b"both families");
        assert_eq!(
            client.recv_relayed(ANSWER_TIMEOUT),
            Some(Relayed::Data {
                peer: peer.addr,
                payload: b"both families".to_vec()
            })
        );
    }
    assert_eq!(peer4.seen()[0].0, allocation.relayed[0]);
    assert_eq!(peer6.seen()[0].0, allocation.relayed[1]);
}

/// RFC 8656 §7.2: EVEN-PORT with R set gives an even port and a RESERVATION-TOKEN; an Allocate
/// carrying that token gets the next-higher port. Meanwhile uturn holds that port with a socket
/// of its own, so no other program on the host can take it.
fn even_port_reserves_the_next_port_for_the_token_holder(backend: &str) {
    let server = start(backend, 1, &[]);
    let mut rtp = TurnClient::new(server.listener(false), "alice", "wonderland");
    let first = rtp
        .allocate(&[Attribute::EvenPort(EvenPort { reserve_next: true })])
        .unwrap();
    assert_eq!(first.relayed[0].port() % 2, 0, "even port");
    let token = first.reservation_token.expect("RESERVATION-TOKEN");
    let reserved = SocketAddr::new(first.relayed[0].ip(), first.relayed[0].port() + 1);
    let taken = std::net::UdpSocket::bind(reserved);
    assert_eq!(
        taken.as_ref().map_err(std::io::Error::kind).err(),
        Some(std::io::ErrorKind::AddrInUse),
        "the reserved port {reserved} is held by uturn: {taken:?}"
    );
    let mut rtcp = TurnClient::new(server.listener(false), "alice", "wonderland");
    let second = rtcp
        .allocate(&[Attribute::ReservationToken(ReservationToken(token))])
        .unwrap();
    assert_eq!(second.relayed[0].port(), first.relayed[0].port() + 1);
}

/// By default uturn relays to no loopback address (CVE-2020-26262 class): without
/// `--allow-loopback-peers`, CreatePermission for loopback and unspecified addresses, including
/// the IPv4-mapped form of 127.0.0.1, is 403. The allocation is dual-stack so that IPv6 forms
/// reach the policy instead of failing the address-family check (443) first.
fn loopback_peers_are_forbidden_unless_allowed(backend: &str) {
    let args: Vec<String> = standard_args(backend, 1)
        .into_iter()
        .filter(|a| a != "--allow-loopback-peers")
        .collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Uturn::start(&refs);
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    client
        .allocate(&[Attribute::AdditionalAddressFamily(AddressFamily::V6)])
        .unwrap();
    // 127.0.0.1 and ::1 are the relay IPs here: a permission for it is admitted (relay to relay,
    // tests/peers.rs), but a channel to a port outside the relay range is not.
    assert_eq!(
        client.channel_bind(0x4000, "127.0.0.1:9".parse().unwrap()),
        Err(FORBIDDEN)
    );
    for peer in [
        "127.0.0.2:9",
        "[::ffff:127.0.0.1]:9",
        "[::2]:9",
        "0.0.0.0:9",
        "[::]:9",
        "169.254.169.254:80",
    ] {
        assert_eq!(
            client.create_permission(&[peer.parse().unwrap()]),
            Err(FORBIDDEN),
            "{peer}"
        );
    }
}

/// The scale check: 1,000 allocations spread over 2 shards, each relaying its own
/// traffic to its own channel and getting exactly its own bytes back. The round trips are
/// sequential, so nothing is lost to a burst on loopback and every allocation must answer.
#[test]
fn a_thousand_allocations_over_two_shards_each_relay_their_own_traffic() {
    for backend in uturn_e2e::BACKENDS {
        // 1,000 relay ports: a range of its own, away from the small slices other servers use.
        let args = uturn_e2e::with_relay_ports(standard_args(backend, 2), "14000-16999");
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = Uturn::start(&refs);
        let peer = EchoPeer::start(false);
        let mut clients: Vec<TurnClient> = (0..1000)
            .map(|_| TurnClient::new(server.listener(false), "alice", "wonderland"))
            .collect();
        let channel_of = |i: usize| 0x4000 + (i % 0x1000) as u16;
        for (i, client) in clients.iter_mut().enumerate() {
            client
                .allocate(&[])
                .unwrap_or_else(|code| panic!("{backend}: allocation {i}: {code}"));
            client.channel_bind(channel_of(i), peer.addr).unwrap();
        }
        for (i, client) in clients.iter_mut().enumerate() {
            let payload = (i as u32).to_be_bytes();
            client.send_channel_data(channel_of(i), &payload);
            assert_eq!(
                client.recv_relayed(ANSWER_TIMEOUT),
                Some(Relayed::ChannelData {
                    channel: channel_of(i),
                    payload: payload.to_vec(),
                }),
                "{backend}: allocation {i} did not get its own echo back"
            );
        }
        // SO_REUSEPORT hashes client 5-tuples over the shards; both must have taken some.
        let log = server.log();
        let created: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("allocation created"))
            .collect();
        assert_eq!(
            created.len(),
            1000,
            "{backend}: one creation logged per allocation"
        );
        for shard in ["shard=0", "shard=1"] {
            let n = created.iter().filter(|l| l.contains(shard)).count();
            assert!(n > 0, "{backend}: no allocation on {shard}");
        }
    }
}

/// Malformed datagrams get no answer and do not disturb the server: a valid Binding request
/// still gets its answer afterwards.
#[test]
fn malformed_datagrams_are_survived() {
    let server = start("auto", 1, &[]);
    let client = TurnClient::new(server.listener(false), "alice", "wonderland");
    let garbage: [&[u8]; 6] = [
        b"",
        &[0x00],
        &[0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xA4, 0x42],
        &[0x40, 0x00, 0xFF, 0xFF, 1, 2],
        &[0xFF; 100],
        &[
            0x01, 0x01, 0x00, 0x04, 0x21, 0x12, 0xA4, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0,
        ],
    ];
    for g in garbage {
        client.send_raw(g);
    }
    let mut client = client;
    let response = client.request(Method::BINDING, &[]);
    let msg: Message<'_> = response.message();
    assert_eq!(msg.class(), Class::SuccessResponse);
    assert_eq!(msg.xor_mapped_address().unwrap(), Some(client.local_addr()));
}
