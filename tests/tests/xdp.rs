//! The XDP fast path end to end: the real `uturn` in a server network namespace with
//! `relay.xdp = "native"` on its veth, a TURN client and a peer in the other namespace (see
//! `uturn_e2e::netns`). The metrics' `path` label proves which path relayed the datagrams.
//! Needs root; skips with the reason otherwise.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use uturn_e2e::netns::{Addrs, CLIENT_IF, SERVER_IF, Topology, V4, V6, skip_reason_for_sockets};
use uturn_e2e::{ANSWER_TIMEOUT, Relayed, TempConfig, TurnClient, Uturn};
use uturn_proto::{AddressFamily, Attribute};
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
    start_family(V4, xdp, relay_extra)
}

/// uturn on UDP and TCP listeners of `family`'s server address, a UDP client with an
/// allocation and channel `CHANNEL` bound to a UDP peer, all in the topology.
fn start_family(family: Addrs, xdp: &str, relay_extra: &str) -> Option<Setup> {
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
             [peers]\nallowed_peers = [\"10.200.0.0/24\", \"fd00:200::/64\"]\n"
        ),
    );
    let listen = SocketAddr::new(family.server, 3478).to_string();
    let listen_tcp = format!("tcp://{}", SocketAddr::new(family.server, 3479));
    let relay_ip = family.server.to_string();
    let server = Uturn::start_in_netns(
        &topology.server_ns,
        &[
            "--config",
            config.path(),
            "--listen",
            &listen,
            "--listen",
            &listen_tcp,
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
    let listener = server.listener(family.server.is_ipv6());
    let (pass, mut client, peer) = topology.run_in(&topology.client_ns, || {
        (
            PassThrough::attach(CLIENT_IF, AttachMode::Native)
                .expect("pass-through on the client veth"),
            TurnClient::new_on(
                SocketAddr::new(family.client, 0),
                listener,
                "alice",
                "wonderland",
            ),
            UdpSocket::bind(SocketAddr::new(family.peer, 0)).expect("peer socket"),
        )
    });
    peer.set_read_timeout(Some(ANSWER_TIMEOUT))
        .expect("timeout");
    // RFC 8656 §7.2: without REQUESTED-ADDRESS-FAMILY the relayed address is IPv4.
    let family_attr = if family.server.is_ipv6() {
        vec![Attribute::RequestedAddressFamily(AddressFamily::V6)]
    } else {
        Vec::new()
    };
    let allocation = client.allocate(&family_attr).expect("Allocate");
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
    relayed_packets_on(s, "udp", path, direction, expected)
}

/// `uturn_relayed_packets_total` for one transport, path and direction, once it reaches
/// `expected` (or the wait ends).
fn relayed_packets_on(
    s: &Setup,
    transport: &str,
    path: &str,
    direction: &str,
    expected: f64,
) -> f64 {
    let labels = [
        ("path", path),
        ("direction", direction),
        ("transport", transport),
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
    // The program's own counters: ROUNDS each way forwarded with XDP_TX, and the Allocate and
    // ChannelBind (STUN) passed on to the shards.
    let reason = |name: &str, expected: f64| {
        let labels = [("reason", name)];
        s.topology.run_in(&s.topology.server_ns, || {
            server.wait_metric(
                "uturn_xdp_packets_total",
                &labels,
                expected,
                COUNTERS_TIMEOUT,
            )
        })
    };
    assert_eq!(reason("tx_to_peer", n), n);
    assert_eq!(reason("tx_to_client", n), n);
    assert!(reason("pass_not_channel_data", 2.0) >= 2.0);

    let id = entry["id"].as_u64().expect("numeric id");
    let (status, body) = s.topology.run_in(&s.topology.server_ns, || {
        server.http("DELETE", &format!("/api/v1/allocations/{id}"), None)
    });
    assert_eq!(status, 200, "{body}");
    // The DELETE's answer comes after the engine's RemoveAllocation, which the control thread
    // mirrored into the maps first: no datagram after it meets a channel in the program. The
    // shards apply their own removal between two batches, a moment after the answer, so a
    // datagram sent in that moment may still be relayed by the socket path: wait (bounded)
    // until one is not, and check that the XDP path relayed none of them.
    s.peer
        .set_read_timeout(Some(Duration::from_millis(400)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    let stopped = (0..10).any(|_| {
        s.client.send_channel_data(CHANNEL, b"after delete");
        s.peer.recv_from(&mut buf).is_err()
    });
    assert!(
        stopped,
        "relayed 10 datagrams after the allocation was deleted"
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

/// The same over IPv6 (RFC 8656 §12 with RFC 8200 §8.1's mandatory UDP checksum): the
/// datagrams reach their sockets, so the program's checksum updates are right.
#[test]
fn with_xdp_native_ipv6_channel_data_takes_the_xdp_path() {
    let Some(mut s) = start_family(V6, "native", "") else {
        return;
    };
    exchange(&mut s, ROUNDS);
    let n = ROUNDS as f64;
    assert_eq!(relayed_packets(&s, "xdp", "to_peer", n), n);
    assert_eq!(relayed_packets(&s, "xdp", "to_client", n), n);
    assert_eq!(relayed_packets(&s, "socket", "to_peer", 0.0), 0.0);
}

/// Beside the fast path, what it passes on keeps working: Send indications and Data
/// indications (RFC 8656 §11) for a UDP client, and a TCP client's ChannelData (RFC 8656
/// §3.1), all on the sockets' path.
#[test]
fn with_xdp_send_indications_and_tcp_clients_keep_working() {
    let Some(mut s) = start("native", "") else {
        return;
    };
    let peer = s.peer.local_addr().expect("peer address");
    s.client.send_indication(peer, b"by indication");
    let mut buf = [0u8; 1500];
    let (n, from) = s
        .peer
        .recv_from(&mut buf)
        .expect("the peer receives the Send indication");
    assert_eq!((&buf[..n], from), (&b"by indication"[..], s.relayed));

    let tcp_listener = s.server.stream_listener("tcp", false);
    let mut tcp = s.topology.run_in(&s.topology.client_ns, || {
        TurnClient::new_tcp(tcp_listener, "alice", "wonderland")
    });
    let allocation = tcp.allocate(&[]).expect("Allocate over TCP");
    tcp.channel_bind(CHANNEL, peer)
        .expect("ChannelBind over TCP");
    tcp.send_channel_data(CHANNEL, b"over tcp");
    let (n, from) = s
        .peer
        .recv_from(&mut buf)
        .expect("the peer receives the TCP client's data");
    assert_eq!((&buf[..n], from), (&b"over tcp"[..], allocation.relayed[0]));
    s.peer
        .send_to(b"back over tcp", allocation.relayed[0])
        .expect("peer send");
    assert_eq!(
        tcp.recv_relayed(ANSWER_TIMEOUT),
        Some(Relayed::ChannelData {
            channel: CHANNEL,
            payload: b"back over tcp".to_vec()
        })
    );
    assert_eq!(
        relayed_packets_on(&s, "tcp", "socket", "to_client", 1.0),
        1.0
    );
    assert_eq!(relayed_packets(&s, "xdp", "to_peer", 0.0), 0.0);
}

/// Kills and reaps a helper process when dropped.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Interop: coturn's `turnutils_uclient` (channels, RFC 5766 numbering) against uturn with
/// the program attached, `turnutils_peer` echoing in the client namespace. Every message comes
/// back, and every one went through the XDP path.
#[test]
fn with_xdp_coturns_uclient_relays_over_channels_on_the_xdp_path() {
    use std::process::{Command, Stdio};
    for tool in ["turnutils_uclient", "turnutils_peer"] {
        if Command::new("which")
            .arg(tool)
            .output()
            .map_or(true, |o| !o.status.success())
        {
            eprintln!("SKIPPED: {tool} is not installed (Debian package coturn)");
            return;
        }
    }
    let Some(s) = start("native", "accept_rfc5766_channel_numbers = true") else {
        return;
    };
    const MESSAGES: usize = 2 * 200;
    let peer_port = "3480";
    let _peer = Reaped(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &s.topology.client_ns,
                "turnutils_peer",
                "-L",
            ])
            .arg(V4.peer.to_string())
            .args(["-p", peer_port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start turnutils_peer"),
    );
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &s.topology.client_ns,
            "timeout",
            "60",
            "turnutils_uclient",
        ])
        .args([
            "-p", "3478", "-r", peer_port, "-z", "5", "-m", "2", "-n", "200",
        ])
        .args(["-u", "alice", "-w", "wonderland", "-e"])
        .arg(V4.peer.to_string())
        .arg(V4.server.to_string())
        .output()
        .expect("run turnutils_uclient");
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let totals = log
        .lines()
        .filter_map(|l| l.split("tot_send_msgs=").nth(1))
        .next_back()
        .unwrap_or_else(|| panic!("no totals in turnutils_uclient's output:\n{log}"));
    let number = |key: &str| -> Option<usize> {
        totals
            .split(key)
            .nth(1)?
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let sent: Option<usize> = totals
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok());
    assert_eq!(sent, Some(MESSAGES), "{log}");
    assert_eq!(number("tot_recv_msgs="), Some(MESSAGES), "{log}");
    let n = MESSAGES as f64;
    assert_eq!(
        relayed_packets(&s, "xdp", "to_peer", n),
        n,
        "{}",
        s.server.log()
    );
    assert_eq!(relayed_packets(&s, "xdp", "to_client", n), n);
    assert_eq!(relayed_packets(&s, "socket", "to_peer", 0.0), 0.0);
}
