//! The XDP router in a veth topology the test creates (see `uturn_e2e::netns`): ChannelData relayed
//! both ways by the program alone, everything else handed to the stack unchanged, and a
//! removed channel back on the slow path from the next packet. Needs root; skips with the
//! reason otherwise.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use uturn_e2e::netns::{Addrs, CLIENT_IF, RawUdp, SERVER_IF, Topology, V4, V6, skip_reason};
use uturn_xdp::{AttachMode, Channel, ChannelCounters, Limits, PassThrough, Reason, Router};

const LISTENER_PORT: u16 = 3478;
const RELAYED_PORT: u16 = 50_000;
const CLIENT_PORT: u16 = 40_001;
const PEER_PORT: u16 = 40_002;
const CHANNEL: u16 = 0x4001;
const SLOT: u32 = 5;
/// Every receive waits at most this long for the datagram the step sent.
const WAIT: Duration = Duration::from_secs(3);

fn skip() -> bool {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return true;
    }
    false
}

fn udp(addr: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind(addr).expect("bind udp");
    socket.set_read_timeout(Some(WAIT)).expect("timeout");
    socket
}

fn recv(socket: &UdpSocket, what: &str) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 2048];
    let (n, from) = socket
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("{what}: nothing within {WAIT:?} ({e})"));
    (buf[..n].to_vec(), from)
}

fn channel_data(channel: u16, payload: &[u8], padding: usize, length: Option<u16>) -> Vec<u8> {
    let len = length.unwrap_or(payload.len() as u16);
    let mut out = channel.to_be_bytes().to_vec();
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    out.extend(std::iter::repeat_n(0xee, padding));
    out
}

struct Server {
    router: Router,
    /// Bound on the listener: receives what the program passes to the stack.
    listener: UdpSocket,
    /// Bound on the relayed address: receives peer datagrams the program passes.
    relayed: UdpSocket,
}

struct Client {
    pass: PassThrough,
    client_rx: UdpSocket,
    client_tx: RawUdp,
    peer_rx: UdpSocket,
    peer_tx: RawUdp,
}

fn setup(topology: &Topology, addrs: Addrs, mode: AttachMode) -> (Server, Client, Channel) {
    let ch = Channel {
        client: SocketAddr::new(addrs.client, CLIENT_PORT),
        listener: SocketAddr::new(addrs.server, LISTENER_PORT),
        channel: CHANNEL,
        relayed: SocketAddr::new(addrs.server, RELAYED_PORT),
        peer: SocketAddr::new(addrs.peer, PEER_PORT),
        slot: SLOT,
    };
    let server = topology.run_in(&topology.server_ns, || {
        let mut router = Router::load(Limits::default()).expect("load the router");
        router.attach(SERVER_IF, mode).expect("attach the router");
        router.set_listeners(&[ch.listener]).expect("listeners");
        Server {
            router,
            listener: udp(ch.listener),
            relayed: udp(ch.relayed),
        }
    });
    let client = topology.run_in(&topology.client_ns, || Client {
        // The frames the router sends back with XDP_TX reach the client namespace only when
        // its veth runs XDP itself.
        pass: PassThrough::attach(CLIENT_IF, AttachMode::Native).expect("attach pass-through"),
        client_rx: udp(ch.client),
        client_tx: RawUdp::new(ch.client),
        peer_rx: udp(ch.peer),
        peer_tx: RawUdp::new(ch.peer),
    });
    (server, client, ch)
}

/// RFC 8656 §12: ChannelData on a bound channel goes to the peer from the relayed address
/// with the 4-byte header removed, and a peer's datagram comes to the client from the
/// listener as ChannelData; here the XDP program does both without the server's stack.
fn relays_bound_channels_and_passes_the_rest(addrs: Addrs, mode: AttachMode) {
    let topology = Topology::create(if addrs.client.is_ipv4() { "v4" } else { "v6" });
    topology.enable_forwarding(&topology.server_ns, SERVER_IF);
    let (mut server, client, ch) = setup(&topology, addrs, mode);
    server.router.insert_channel(&ch).expect("insert channel");

    // Client → peer.
    client.client_tx.send(
        ch.listener,
        &channel_data(CHANNEL, b"hello", 0, None),
        false,
    );
    assert_eq!(
        recv(&client.peer_rx, "peer, hello"),
        (b"hello".to_vec(), ch.relayed)
    );

    // RFC 8656 §12.5: over UDP the datagram may carry padding after the length the header
    // states; only the stated length is relayed. An odd length checks the checksum update.
    client
        .client_tx
        .send(ch.listener, &channel_data(CHANNEL, b"abc", 1, None), false);
    assert_eq!(
        recv(&client.peer_rx, "peer, padded"),
        (b"abc".to_vec(), ch.relayed)
    );

    // A datagram that arrives with a wrong UDP checksum leaves with a wrong one: the peer's
    // kernel drops it, so the next one is the first the peer sees.
    client
        .client_tx
        .send(ch.listener, &channel_data(CHANNEL, b"bad", 0, None), true);
    client
        .client_tx
        .send(ch.listener, &channel_data(CHANNEL, b"good", 0, None), false);
    assert_eq!(
        recv(&client.peer_rx, "peer, after corrupt"),
        (b"good".to_vec(), ch.relayed)
    );

    // Peer → client.
    client.peer_tx.send(ch.relayed, b"world!", false);
    let (bytes, from) = recv(&client.client_rx, "client, world");
    assert_eq!(from, ch.listener);
    assert_eq!(bytes, channel_data(CHANNEL, b"world!", 0, None));

    assert_eq!(
        server.router.channel_counters(SLOT).expect("counters"),
        ChannelCounters {
            to_peer_packets: 4,
            to_peer_bytes: 5 + 3 + 3 + 4,
            to_client_packets: 1,
            to_client_bytes: 6,
        }
    );
    let reasons = server.router.reason_counters().expect("reasons");
    assert_eq!(reasons.get(Reason::TxToPeer), 4, "{reasons:?}");
    assert_eq!(reasons.get(Reason::TxToClient), 1, "{reasons:?}");
    assert_eq!(reasons.forwarded(), 5);

    // Everything else reaches the stack unchanged. The first datagram the listener socket
    // receives is the STUN request: none of the relayed ones above went to the stack too.
    let stun = [
        0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ];
    client.client_tx.send(ch.listener, &stun, false);
    assert_eq!(
        recv(&server.listener, "listener, STUN"),
        (stun.to_vec(), ch.client)
    );
    let unknown = channel_data(0x4002, b"other", 0, None);
    client.client_tx.send(ch.listener, &unknown, false);
    assert_eq!(
        recv(&server.listener, "listener, unknown channel"),
        (unknown, ch.client)
    );
    // RFC 8656 §12.5: a length beyond the datagram is the slow path's to discard and count.
    let short = channel_data(CHANNEL, b"short", 0, Some(10));
    client.client_tx.send(ch.listener, &short, false);
    assert_eq!(
        recv(&server.listener, "listener, bad length"),
        (short, ch.client)
    );
    let reasons = server.router.reason_counters().expect("reasons");
    assert_eq!(reasons.get(Reason::PassNotChannelData), 1, "{reasons:?}");
    assert_eq!(reasons.get(Reason::PassUnknownChannel), 1, "{reasons:?}");
    assert_eq!(reasons.get(Reason::PassBadLength), 1, "{reasons:?}");

    // Unbound: from the next packet on, both directions go to the stack.
    server.router.remove_channel(&ch).expect("remove channel");
    let data = channel_data(CHANNEL, b"after", 0, None);
    client.client_tx.send(ch.listener, &data, false);
    assert_eq!(
        recv(&server.listener, "listener, after unbind"),
        (data, ch.client)
    );
    client.peer_tx.send(ch.relayed, b"late", false);
    assert_eq!(
        recv(&server.relayed, "relayed socket, after unbind"),
        (b"late".to_vec(), ch.peer)
    );
    let reasons = server.router.reason_counters().expect("reasons");
    assert_eq!(
        reasons.forwarded(),
        5,
        "nothing forwarded after the unbind: {reasons:?}"
    );
    assert_eq!(
        server
            .router
            .channel_counters(SLOT)
            .expect("counters")
            .to_peer_packets,
        4
    );
}

#[test]
fn ipv4_channel_data_is_relayed_in_native_xdp_and_the_rest_passed() {
    if skip() {
        return;
    }
    relays_bound_channels_and_passes_the_rest(V4, AttachMode::Native);
}

#[test]
fn ipv6_channel_data_is_relayed_in_native_xdp_with_valid_udp_checksums() {
    if skip() {
        return;
    }
    relays_bound_channels_and_passes_the_rest(V6, AttachMode::Native);
}

#[test]
fn ipv4_channel_data_is_relayed_in_generic_xdp() {
    if skip() {
        return;
    }
    relays_bound_channels_and_passes_the_rest(V4, AttachMode::Generic);
}

/// Without forwarding on the interface the kernel's FIB lookup gives no next hop, so the
/// program leaves bound channels to the stack and counts why.
#[test]
fn with_forwarding_off_bound_channels_take_the_slow_path() {
    if skip() {
        return;
    }
    let topology = Topology::create("nofwd");
    let (mut server, client, ch) = setup(&topology, V4, AttachMode::Native);
    server.router.insert_channel(&ch).expect("insert channel");
    let data = channel_data(CHANNEL, b"slow", 0, None);
    client.client_tx.send(ch.listener, &data, false);
    assert_eq!(recv(&server.listener, "listener"), (data, ch.client));
    client.peer_tx.send(ch.relayed, b"slow too", false);
    assert_eq!(
        recv(&server.relayed, "relayed socket"),
        (b"slow too".to_vec(), ch.peer)
    );
    let reasons = server.router.reason_counters().expect("reasons");
    assert_eq!(reasons.get(Reason::PassForwardingOff), 2, "{reasons:?}");
    assert_eq!(reasons.forwarded(), 0);
}

#[test]
fn the_router_detaches_on_drop_and_is_never_attached_twice() {
    if skip() {
        return;
    }
    let topology = Topology::create("attach");
    let shown = || topology.ip_output(&topology.server_ns, &["link", "show", SERVER_IF]);
    topology.run_in(&topology.server_ns, || {
        let mut router = Router::load(Limits::default()).expect("load");
        router
            .attach(SERVER_IF, AttachMode::Native)
            .expect("attach");
        assert!(
            router.attach(SERVER_IF, AttachMode::Native).is_err(),
            "a second attach is refused"
        );
        let mut other = Router::load(Limits::default()).expect("load a second router");
        assert!(
            other.attach(SERVER_IF, AttachMode::Native).is_err(),
            "no stacking"
        );
        assert!(shown().contains("prog/xdp"), "{}", shown());
        drop(router);
        assert!(
            !shown().contains("prog/xdp"),
            "detached on drop: {}",
            shown()
        );
        other
            .attach(SERVER_IF, AttachMode::Native)
            .expect("attach after the first is gone");
        assert!(shown().contains("prog/xdp"));
    });
}

/// A uturn killed with SIGKILL cannot detach anything; the kernel does it when the BPF link's
/// last file descriptor closes, so the next process attaches afresh and nothing is stacked.
#[test]
fn a_killed_loader_leaves_no_program_attached() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    if skip() {
        return;
    }
    let topology = Topology::create("kill");
    let shown = || topology.ip_output(&topology.server_ns, &["link", "show", SERVER_IF]);
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--ignored",
            "--exact",
            "helper_attach_and_wait_to_be_killed",
            "--nocapture",
        ])
        .env(HELPER_NETNS, &topology.server_ns)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn helper");
    let stdout = child.stdout.take().expect("helper stdout");
    let attached = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.contains(HELPER_READY));
    assert!(attached, "the helper did not attach");
    assert!(shown().contains("prog/xdp"), "{}", shown());
    child.kill().expect("SIGKILL the helper");
    child.wait().expect("reap the helper");
    assert!(!shown().contains("prog/xdp"), "left behind: {}", shown());
    topology.run_in(&topology.server_ns, || {
        let mut router = Router::load(Limits::default()).expect("load");
        router
            .attach(SERVER_IF, AttachMode::Native)
            .expect("attach after the kill");
    });
}

const HELPER_NETNS: &str = "UTURN_XDP_TEST_NETNS";
const HELPER_READY: &str = "uturn-xdp helper attached";

/// Run by `a_killed_loader_leaves_no_program_attached` in a child process, never on its own.
#[test]
#[ignore = "a helper process of a_killed_loader_leaves_no_program_attached"]
fn helper_attach_and_wait_to_be_killed() {
    let Ok(ns) = std::env::var(HELPER_NETNS) else {
        eprintln!("SKIPPED: only runs as the child of a_killed_loader_leaves_no_program_attached");
        return;
    };
    let topology = Topology {
        client_ns: String::new(),
        server_ns: ns,
    };
    let router = topology.run_in(&topology.server_ns, || {
        let mut router = Router::load(Limits::default()).expect("load");
        router
            .attach(SERVER_IF, AttachMode::Native)
            .expect("attach");
        router
    });
    println!("{HELPER_READY}");
    // Blocks until the parent kills this process (or exits, closing stdin).
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(router);
    // The namespaces belong to the parent test.
    std::mem::forget(topology);
}

/// Not a check: measures the router's run time per packet with the kernel's BPF statistics
/// (`kernel.bpf_stats_enabled`, restored afterwards) over a bounded burst of ChannelData
/// client → peer and peer → client, and prints it. Run with
/// `cargo test -p uturn-xdp --test netns -- --ignored --nocapture measure_`.
#[test]
#[ignore = "a measurement, run by hand"]
fn measure_program_run_time_per_packet() {
    const PACKETS: usize = 20_000;
    if skip() {
        return;
    }
    let topology = Topology::create("measure");
    topology.enable_forwarding(&topology.server_ns, SERVER_IF);
    let (mut server, client, ch) = setup(&topology, V4, AttachMode::Native);
    server.router.insert_channel(&ch).expect("insert channel");
    let stats_path = "/proc/sys/kernel/bpf_stats_enabled";
    let before = std::fs::read_to_string(stats_path).expect("read bpf_stats_enabled");
    std::fs::write(stats_path, "1").expect("enable BPF statistics");
    let start = server.router.program_stats().expect("stats");
    let pass_start = client.pass.program_stats().expect("stats");
    let payload = [0x55u8; 160]; // an audio-sized datagram
    let data = channel_data(CHANNEL, &payload, 0, None);
    let mut received = [0usize; 2];
    for i in 0..PACKETS {
        if i % 2 == 0 {
            client.client_tx.send(ch.listener, &data, false);
        } else {
            client.peer_tx.send(ch.relayed, &payload, false);
        }
        // Keep the receive queues short: drain one datagram per datagram sent.
        let (socket, n) = if i % 2 == 0 {
            (&client.peer_rx, &mut received[0])
        } else {
            (&client.client_rx, &mut received[1])
        };
        let mut buf = [0u8; 2048];
        if socket.recv_from(&mut buf).is_ok() {
            *n += 1;
        }
    }
    let end = server.router.program_stats().expect("stats");
    let pass_end = client.pass.program_stats().expect("stats");
    std::fs::write(stats_path, before.trim()).expect("restore bpf_stats_enabled");
    let runs = end.run_count - start.run_count;
    let nanos = (end.run_time - start.run_time).as_nanos();
    let reasons = server.router.reason_counters().expect("reasons");
    println!(
        "program id {}: {runs} runs, {nanos} ns, {:.1} ns per run; forwarded {}, received {:?} \
         of {PACKETS}",
        end.id,
        nanos as f64 / runs.max(1) as f64,
        reasons.forwarded(),
        received,
    );
    let pass_runs = pass_end.run_count - pass_start.run_count;
    let pass_nanos = (pass_end.run_time - pass_start.run_time).as_nanos();
    println!(
        "for comparison, the client side's pass-through program: {pass_runs} runs, {:.1} ns per \
         run",
        pass_nanos as f64 / pass_runs.max(1) as f64
    );
    assert_eq!(
        received.iter().sum::<usize>(),
        PACKETS,
        "every datagram relayed"
    );
}
