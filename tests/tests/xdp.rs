//! The XDP fast path end to end: the real `uturn` in a server network namespace with
//! `relay.xdp = "native"` on its veth, a TURN client and a peer in the other namespace (see
//! `uturn_e2e::netns`). The metrics' `path` label proves which path relayed the datagrams.
//! Needs root; skips with the reason otherwise.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use uturn_e2e::netns::{CLIENT_IF, SERVER_IF, Topology, V4, skip_reason_for_sockets};
use uturn_e2e::{ANSWER_TIMEOUT, Relayed, TempConfig, TurnClient, Uturn};
use uturn_xdp::{AttachMode, PassThrough};

const COUNTERS_TIMEOUT: Duration = Duration::from_secs(10);
const ROUNDS: usize = 10;
const CHANNEL: u16 = 0x4000;

struct Setup {
    // Dropped in order: the server before the namespaces it runs in.
    server: Uturn,
    client: TurnClient,
    peer: UdpSocket,
    relayed: SocketAddr,
    _pass: PassThrough,
    _config: TempConfig,
    topology: Topology,
}

fn start(xdp: &str, relay_extra: &str) -> Option<Setup> {
    if let Some(reason) = skip_reason_for_sockets() {
        eprintln!("SKIPPED: {reason}");
        return None;
    }
    let topology = Topology::create("e2e");
    topology.enable_forwarding(&topology.server_ns, SERVER_IF);
    // The client's and the peer's sockets send full checksums, as from a real NIC.
    topology.disable_tx_checksum(&topology.client_ns, CLIENT_IF);
    let config = TempConfig::new(
        "xdp",
        &format!(
            "[relay]\nxdp = \"{xdp}\"\nxdp_interfaces = [\"{SERVER_IF}\"]\n{relay_extra}\n\
             [peers]\nallowed_peers = [\"10.200.0.0/24\"]\n"
        ),
    );
    let listen = format!("{}:3478", V4.server);
    let relay_ip = V4.server.to_string();
    let server = Uturn::start_in_netns(
        &topology.server_ns,
        &[
            "--config",
            config.path(),
            "--listen",
            &listen,
            "--relay-ip",
            &relay_ip,
            "--realm",
            "e2e.test",
            "--user",
            "alice:wonderland",
            "--unauthenticated-rate",
            "0",
            "--counters-interval-ms",
            "50",
            "--threads",
            "1",
        ],
    );
    let listener = server.listener(false);
    let (pass, mut client, peer) = topology.run_in(&topology.client_ns, || {
        (
            PassThrough::attach(CLIENT_IF, AttachMode::Native)
                .expect("pass-through on the client veth"),
            TurnClient::new_on(
                SocketAddr::new(V4.client, 0),
                listener,
                "alice",
                "wonderland",
            ),
            UdpSocket::bind(SocketAddr::new(V4.peer, 0)).expect("peer socket"),
        )
    });
    peer.set_read_timeout(Some(ANSWER_TIMEOUT))
        .expect("timeout");
    let allocation = client.allocate(&[]).expect("Allocate");
    client
        .channel_bind(CHANNEL, peer.local_addr().expect("peer address"))
        .expect("ChannelBind");
    Some(Setup {
        server,
        client,
        peer,
        relayed: allocation.relayed[0],
        _pass: pass,
        _config: config,
        topology,
    })
}

/// RFC 8656 §12: ChannelData both ways, whichever path relays it.
fn exchange(s: &mut Setup, rounds: usize) {
    let mut buf = [0u8; 1500];
    for i in 0..rounds {
        let payload = format!("to peer {i}");
        s.client.send_channel_data(CHANNEL, payload.as_bytes());
        let (n, from) = s
            .peer
            .recv_from(&mut buf)
            .expect("the peer receives the payload");
        assert_eq!((&buf[..n], from), (payload.as_bytes(), s.relayed));
        let reply = format!("to client {i}");
        s.peer
            .send_to(reply.as_bytes(), s.relayed)
            .expect("peer send");
        let relayed = s
            .client
            .recv_relayed(ANSWER_TIMEOUT)
            .expect("the client receives the reply");
        assert_eq!(
            relayed,
            Relayed::ChannelData {
                channel: CHANNEL,
                payload: reply.into_bytes()
            }
        );
    }
}

fn relayed_packets(s: &Setup, path: &str, direction: &str, expected: f64) -> f64 {
    let labels = [
        ("path", path),
        ("direction", direction),
        ("transport", "udp"),
    ];
    let server = &s.server;
    s.topology.run_in(&s.topology.server_ns, || {
        server.wait_metric(
            "uturn_relayed_packets_total",
            &labels,
            expected,
            COUNTERS_TIMEOUT,
        )
    })
}

/// With `relay.xdp = "native"`, bound channels are relayed by the program: every datagram
/// counts on `path="xdp"` and none on the sockets; the allocations API shows them; deleting
/// the allocation stops relaying from the next packet (the maps follow the engine).
#[test]
fn with_xdp_native_channel_data_takes_the_xdp_path_and_stops_with_the_allocation() {
    let Some(mut s) = start("native", "") else {
        return;
    };
    assert!(
        s.server.log().contains("XDP fast path attached"),
        "{}",
        s.server.log()
    );
    exchange(&mut s, ROUNDS);
    let n = ROUNDS as f64;
    assert_eq!(relayed_packets(&s, "xdp", "to_peer", n), n);
    assert_eq!(relayed_packets(&s, "xdp", "to_client", n), n);
    assert_eq!(relayed_packets(&s, "socket", "to_peer", 0.0), 0.0);
    assert_eq!(relayed_packets(&s, "socket", "to_client", 0.0), 0.0);

    let json = |body: &str| serde_json::from_str::<serde_json::Value>(body).expect("JSON");
    let server = &s.server;
    let deadline = Instant::now() + COUNTERS_TIMEOUT;
    let entry = loop {
        let (status, body) = s.topology.run_in(&s.topology.server_ns, || {
            server.http("GET", "/api/v1/allocations", None)
        });
        assert_eq!(status, 200, "{body}");
        let entry = json(&body)["allocations"][0].clone();
        if entry["to_client"]["packets"] == ROUNDS || Instant::now() >= deadline {
            break entry;
        }
        std::thread::park_timeout(Duration::from_millis(20));
    };
    assert_eq!(entry["to_peer"]["packets"], ROUNDS, "{entry}");
    assert_eq!(entry["to_client"]["packets"], ROUNDS, "{entry}");

    let id = entry["id"].as_u64().expect("numeric id");
    let (status, body) = s.topology.run_in(&s.topology.server_ns, || {
        server.http("DELETE", &format!("/api/v1/allocations/{id}"), None)
    });
    assert_eq!(status, 200, "{body}");
    // The DELETE's answer comes after the engine's RemoveAllocation, which the control thread
    // mirrored into the maps first: the next datagram meets no channel in the program.
    s.client.send_channel_data(CHANNEL, b"after delete");
    s.peer
        .set_read_timeout(Some(Duration::from_millis(400)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    assert!(
        s.peer.recv_from(&mut buf).is_err(),
        "relayed after the allocation was deleted"
    );
    assert_eq!(relayed_packets(&s, "xdp", "to_peer", n), n);
}

/// With `relay.xdp = "off"` the same exchange runs on the sockets alone.
#[test]
fn with_xdp_off_channel_data_takes_the_socket_path() {
    let Some(mut s) = start("off", "") else {
        return;
    };
    assert!(!s.server.log().contains("XDP fast path attached"));
    exchange(&mut s, ROUNDS);
    let n = ROUNDS as f64;
    assert_eq!(relayed_packets(&s, "socket", "to_peer", n), n);
    assert_eq!(relayed_packets(&s, "socket", "to_client", n), n);
    assert_eq!(relayed_packets(&s, "xdp", "to_peer", 0.0), 0.0);
}

/// RFC 8656 §9: a peer without a permission gets nothing to the client, also with the program
/// attached (its datagram meets no channel there and the shard drops it); the permitted peer's
/// next datagram is the first the client receives.
#[test]
fn with_xdp_a_peer_without_permission_never_reaches_the_client() {
    let Some(mut s) = start("native", "") else {
        return;
    };
    let stranger = s.topology.run_in(&s.topology.client_ns, || {
        UdpSocket::bind(SocketAddr::new(V4.client, 0)).expect("stranger socket")
    });
    stranger
        .send_to(b"not permitted", s.relayed)
        .expect("stranger send");
    s.peer.send_to(b"permitted", s.relayed).expect("peer send");
    assert_eq!(
        s.client.recv_relayed(ANSWER_TIMEOUT),
        Some(Relayed::ChannelData {
            channel: CHANNEL,
            payload: b"permitted".to_vec()
        })
    );
    assert_eq!(relayed_packets(&s, "xdp", "to_client", 1.0), 1.0);
}

/// RFC 8656 §12: a channel binding that expires ends the fast path at once. The permission
/// (longer-lived) still stands, so the peer's next datagram reaches the client as a Data
/// indication from the shards, and ChannelData on the expired channel is not relayed.
#[test]
fn with_xdp_an_expired_channel_falls_back_to_the_slow_path_at_once() {
    let Some(mut s) = start("native", "channel_lifetime_secs = 2") else {
        return;
    };
    exchange(&mut s, 1);
    assert!(
        s.server
            .wait_for_log("ChannelExpired", Duration::from_secs(10)),
        "the channel did not expire: {}",
        s.server.log()
    );
    let peer = s.peer.local_addr().expect("peer address");
    s.peer
        .send_to(b"after expiry", s.relayed)
        .expect("peer send");
    assert_eq!(
        s.client.recv_relayed(ANSWER_TIMEOUT),
        Some(Relayed::Data {
            peer,
            payload: b"after expiry".to_vec()
        })
    );
    s.client
        .send_channel_data(CHANNEL, b"on an expired channel");
    s.peer
        .set_read_timeout(Some(Duration::from_millis(400)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    assert!(
        s.peer.recv_from(&mut buf).is_err(),
        "relayed on an expired channel"
    );
    assert_eq!(relayed_packets(&s, "xdp", "to_client", 1.0), 1.0);
    assert_eq!(relayed_packets(&s, "socket", "to_client", 1.0), 1.0);
}
