//! What a permission for uturn's own relay IP reaches, on a relay IP that is not loopback, in
//! a network namespace the test creates (SECURITY.md, peer policy, tier 1).
//!
//! Permissions are by IP (RFC 8656 §9), so relay to relay between two clients of one uturn
//! needs a permission for the relay IP itself. That permission must reach the relayed
//! addresses of live allocations and nothing else on the host: not a socket some other program
//! bound inside the relay range, not a kernel-chosen client port (the relay range overlaps the
//! kernel's ephemeral ports), not uturn's own listener (no loops). Inside the namespace the
//! ephemeral range is set to the relay range, so the kernel-chosen socket lies inside it for
//! certain.
//!
//! Needs root and `ip` (iproute2); otherwise every test here prints why it skipped.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd as _;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use uturn_e2e::{ANSWER_TIMEOUT, FORBIDDEN, Relayed, TurnClient, Uturn};
use uturn_proto::{Class, Method, TransactionId};

/// The relay IP inside the namespace (on a veth whose peer is in the namespace too: not
/// loopback, and nothing leaves the namespace).
const RELAY_IP: &str = "10.200.0.1";
/// The relay range, and the namespace's ephemeral port range.
const PORTS: (u16, u16) = (50000, 50999);
/// A UDP listener of uturn inside the relay range.
const LISTENER_IN_RANGE: u16 = 50500;
/// How long a test waits to conclude that something was *not* relayed.
const SILENCE: Duration = Duration::from_millis(400);
/// Allocations tried to find one on another shard than the first (two shards; the kernel
/// spreads clients over them by hash, so twenty tries all on one shard is a 1 in 2^19 event).
const SHARD_TRIES: usize = 20;

uturn_e2e::on_both_backends!(
    a_permission_for_the_relay_ip_reaches_live_allocations_and_nothing_else_on_it,
    a_channel_to_an_allocation_that_ended_reaches_nobody_who_takes_its_port,
);

/// A network namespace named after this process, deleted when dropped (also on panic).
struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace with `lo` up, a veth pair (both ends inside) carrying
    /// [`RELAY_IP`] and the ephemeral port range set to [`PORTS`]. `Err` with the reason to
    /// skip when this host cannot have one (not root, no `ip`, namespaces refused); a
    /// namespace made but not set up is a failure.
    fn create(label: &str) -> Result<Self, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("not root (network namespaces need CAP_SYS_ADMIN)".into());
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("uturn-reach-{}-{n}-{label}", std::process::id());
        match Command::new("ip").arg("-V").output() {
            Ok(out) if out.status.success() => {}
            _ => return Err("`ip` (iproute2) is not available".into()),
        }
        // A namespace left by a killed run whose pid this process now has.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]).map_err(|e| format!("cannot create a namespace: {e}"))?;
        let netns = Self { name };
        let ns = netns.name.as_str();
        let ephemeral = format!("{} {}", PORTS.0, PORTS.1);
        let write_range = format!("echo {ephemeral} > /proc/sys/net/ipv4/ip_local_port_range");
        let cidr = format!("{RELAY_IP}/24");
        let steps: [&[&str]; 6] = [
            &["-n", ns, "link", "set", "lo", "up"],
            &[
                "-n", ns, "link", "add", "relay0", "type", "veth", "peer", "name", "relay1",
            ],
            &["-n", ns, "addr", "add", &cidr, "dev", "relay0"],
            &["-n", ns, "link", "set", "relay0", "up"],
            &["-n", ns, "link", "set", "relay1", "up"],
            &["netns", "exec", ns, "sh", "-c", &write_range],
        ];
        for step in steps {
            if let Err(e) = ip(step) {
                panic!("cannot set the namespace {ns} up: {e}");
            }
        }
        Ok(netns)
    }

    /// Runs `f` on a thread that has entered the namespace: its sockets, and the `uturn` it
    /// starts (a child inherits the network namespace of the thread that spawns it), live
    /// there. A panic in `f` is the test's.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            let thread = scope.spawn(|| {
                let file = std::fs::File::open(&path).expect("open the namespace");
                rustix::thread::move_into_link_name_space(
                    file.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .expect("setns into the namespace");
                f()
            });
            match thread.join() {
                Ok(value) => value,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("could not delete network namespace {}: {e}", self.name);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The namespace for one test, or `None` after printing why the test is skipped.
fn netns_or_skip(label: &str) -> Option<Netns> {
    match Netns::create(label) {
        Ok(netns) => Some(netns),
        Err(reason) => {
            println!("SKIPPED: {reason}");
            eprintln!("SKIPPED: {reason}");
            None
        }
    }
}

fn relay_ip() -> IpAddr {
    RELAY_IP.parse().expect("literal")
}

fn in_range(port: u16) -> bool {
    (PORTS.0..=PORTS.1).contains(&port)
}

/// uturn on [`RELAY_IP`] with the default peer policy (loopback not open), two shards, a
/// second UDP listener inside the relay range and counters published every 50 ms.
fn start(backend: &str) -> Uturn {
    let listen = format!("{RELAY_IP}:0");
    let listen_in_range = format!("{RELAY_IP}:{LISTENER_IN_RANGE}");
    let ports = format!("{}-{}", PORTS.0, PORTS.1);
    Uturn::start(&[
        "--listen",
        &listen,
        "--listen",
        &listen_in_range,
        "--relay-ip",
        RELAY_IP,
        "--ports",
        &ports,
        "--realm",
        "e2e.test",
        "--user",
        "alice:wonderland",
        "--unauthenticated-rate",
        "0",
        "--counters-interval-ms",
        "50",
        "--io",
        backend,
        "--threads",
        "2",
    ])
}

/// A socket on the relay IP that is not uturn's: on `port`, or the kernel's choice for 0.
fn host_socket(port: u16) -> UdpSocket {
    let socket = UdpSocket::bind(SocketAddr::new(relay_ip(), port))
        .unwrap_or_else(|e| panic!("bind {RELAY_IP}:{port}: {e}"));
    socket
        .set_read_timeout(Some(SILENCE))
        .expect("read timeout");
    socket
}

/// Whether `socket` receives anything within [`SILENCE`].
fn received_anything(socket: &UdpSocket) -> bool {
    let mut buf = [0u8; 1500];
    socket.recv_from(&mut buf).is_ok()
}

/// The shard uturn's admin API shows for the allocation whose relayed address is `relayed`.
fn shard_of(server: &Uturn, relayed: SocketAddr) -> u64 {
    let (status, body) = server.http("GET", "/api/v1/allocations", None);
    assert_eq!(status, 200, "{body}");
    let json: Value = serde_json::from_str(&body).expect("allocations JSON");
    let relayed = relayed.to_string();
    json["allocations"]
        .as_array()
        .expect("allocations list")
        .iter()
        .find(|a| {
            a["relayed"]
                .as_array()
                .is_some_and(|r| r.iter().any(|v| v.as_str() == Some(relayed.as_str())))
        })
        .and_then(|a| a["shard"].as_u64())
        .unwrap_or_else(|| panic!("no allocation relaying on {relayed}: {body}"))
}

/// A first client, and a second one whose allocation lives on the other shard (relay to
/// relay then crosses shards, which is what needs the shards to know each other's relayed
/// addresses). The clients tried on the way stay allocated.
fn two_clients_on_two_shards(
    server: &Uturn,
) -> (
    TurnClient,
    SocketAddr,
    TurnClient,
    SocketAddr,
    Vec<TurnClient>,
) {
    let listener = server.listener(false);
    let mut first = TurnClient::new(listener, "alice", "wonderland");
    let first_relay = first.allocate(&[]).expect("allocate").relayed[0];
    let first_shard = shard_of(server, first_relay);
    let mut tried = Vec::new();
    for _ in 0..SHARD_TRIES {
        let mut second = TurnClient::new(listener, "alice", "wonderland");
        let second_relay = second.allocate(&[]).expect("allocate").relayed[0];
        if shard_of(server, second_relay) != first_shard {
            return (first, first_relay, second, second_relay, tried);
        }
        tried.push(second);
    }
    panic!("{SHARD_TRIES} allocations all landed on shard {first_shard}");
}

/// Waits until the client's shard has applied every command control queued for it so far:
/// the answer to a Binding comes back through the same command queue.
fn sync(client: &mut TurnClient) {
    let response = client.request(Method::BINDING, &[]);
    assert_eq!(response.message().class(), Class::SuccessResponse);
}

/// A STUN Binding request, as a client would send it to a listener.
fn binding_request() -> Vec<u8> {
    let mut buf = vec![0u8; 64];
    let b = uturn_proto::MessageBuilder::new(
        &mut buf,
        Class::Request,
        Method::BINDING,
        TransactionId([7; 12]),
    );
    let len = b.finish();
    buf.truncate(len);
    buf
}

fn peer_denied(server: &Uturn, expected: f64) -> f64 {
    server.wait_metric(
        "uturn_dropped_packets_total",
        &[("reason", "peer_denied")],
        expected,
        Duration::from_secs(5),
    )
}

/// With a permission for the relay IP, a client reaches the other allocation (on another
/// shard) both ways, and nothing else on the relay IP: not a socket bound inside the relay
/// range, not a kernel-chosen port, not the listener inside the range. ChannelBind to those is
/// 403, Send indications and their datagrams are dropped and counted as `peer_denied`.
fn a_permission_for_the_relay_ip_reaches_live_allocations_and_nothing_else_on_it(backend: &str) {
    let Some(netns) = netns_or_skip(&format!("live-{backend}")) else {
        return;
    };
    // Build (or find) the binary outside the namespace.
    let _ = uturn_e2e::uturn_binary();
    netns.run(|| {
        // Other programs' sockets on the relay IP, inside the relay range, bound before
        // uturn takes any relay port.
        let bound = host_socket(PORTS.0 + 123);
        let ephemeral = host_socket(0);
        let bound_addr = bound.local_addr().expect("address");
        let ephemeral_addr = ephemeral.local_addr().expect("address");
        assert!(
            in_range(ephemeral_addr.port()),
            "the kernel chose {ephemeral_addr}, outside the namespace's ephemeral range"
        );
        let server = start(backend);
        let listener_in_range = SocketAddr::new(relay_ip(), LISTENER_IN_RANGE);
        assert!(server.listeners.contains(&listener_in_range));
        let (mut browser, browser_relay, mut bridge, bridge_relay, _others) =
            two_clients_on_two_shards(&server);
        assert_eq!(browser_relay.ip(), relay_ip());

        // Relay to relay across shards, both ways: ChannelData one way, Send/Data the other.
        browser
            .channel_bind(0x4000, bridge_relay)
            .expect("ChannelBind to the other allocation");
        bridge
            .create_permission(&[browser_relay])
            .expect("permission for the relay IP");
        browser.send_channel_data(0x4000, b"from the browser");
        assert_eq!(
            bridge.recv_relayed(ANSWER_TIMEOUT),
            Some(Relayed::Data {
                peer: browser_relay,
                payload: b"from the browser".to_vec()
            })
        );
        bridge.send_indication(browser_relay, b"from the bridge");
        assert_eq!(
            browser.recv_relayed(ANSWER_TIMEOUT),
            Some(Relayed::ChannelData {
                channel: 0x4000,
                payload: b"from the bridge".to_vec()
            })
        );

        // The permission (by IP) is there; the ports are refused where the port is known.
        for (channel, target) in [
            (0x4001, bound_addr),
            (0x4002, ephemeral_addr),
            (0x4003, listener_in_range),
        ] {
            assert_eq!(
                browser.channel_bind(channel, target),
                Err(FORBIDDEN),
                "ChannelBind to {target}"
            );
        }
        // Send indications to them, ChannelData on the refused channel, and the sockets'
        // own datagrams to the relayed address.
        browser.send_indication(bound_addr, b"to a socket in the relay range");
        browser.send_indication(ephemeral_addr, b"to a kernel-chosen port");
        browser.send_indication(listener_in_range, &binding_request());
        browser.send_channel_data(0x4001, b"on the refused channel");
        bound
            .send_to(b"from a socket in the relay range", browser_relay)
            .expect("send");
        ephemeral
            .send_to(b"from a kernel-chosen port", browser_relay)
            .expect("send");
        assert!(!received_anything(&bound), "{bound_addr} was reached");
        assert!(
            !received_anything(&ephemeral),
            "{ephemeral_addr} was reached"
        );
        assert_eq!(
            browser.recv_relayed(SILENCE),
            None,
            "something not an allocation was relayed to the client (the listener's answer?)"
        );
        // Three 403s counted by control, five datagrams dropped by the shards (three Send
        // indications, two datagrams from the host's sockets); the ChannelData on a channel
        // that was never bound is `no_channel`.
        assert_eq!(peer_denied(&server, 8.0), 8.0);
        let no_channel = server.wait_metric(
            "uturn_dropped_packets_total",
            &[("reason", "no_channel")],
            1.0,
            Duration::from_secs(5),
        );
        assert_eq!(no_channel, 1.0);
        // Relay to relay still works after all that.
        browser.send_channel_data(0x4000, b"still there");
        assert_eq!(
            bridge.recv_relayed(ANSWER_TIMEOUT),
            Some(Relayed::Data {
                peer: browser_relay,
                payload: b"still there".to_vec()
            })
        );
    });
}

/// A channel to another allocation outlives it (channels expire on their own clock), and its
/// port, free again, may be taken by any program on the host (it lies in the ephemeral
/// range). From the moment the allocation ends, ChannelData and Send indications to that
/// address, and datagrams from it, are dropped.
fn a_channel_to_an_allocation_that_ended_reaches_nobody_who_takes_its_port(backend: &str) {
    let Some(netns) = netns_or_skip(&format!("gone-{backend}")) else {
        return;
    };
    let _ = uturn_e2e::uturn_binary();
    netns.run(|| {
        let server = start(backend);
        let (mut browser, browser_relay, mut bridge, bridge_relay, _others) =
            two_clients_on_two_shards(&server);
        browser
            .channel_bind(0x4000, bridge_relay)
            .expect("ChannelBind to the other allocation");
        bridge
            .create_permission(&[browser_relay])
            .expect("permission");
        browser.send_channel_data(0x4000, b"while it lives");
        assert!(matches!(
            bridge.recv_relayed(ANSWER_TIMEOUT),
            Some(Relayed::Data { .. })
        ));

        assert_eq!(bridge.refresh(0), Ok(0), "the bridge leaves");
        sync(&mut browser);
        // Another program takes the port (it may take the shard a moment to close it).
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let squatter = loop {
            match UdpSocket::bind(bridge_relay) {
                Ok(socket) => break socket,
                Err(_) if Instant::now() < deadline => {
                    std::thread::park_timeout(Duration::from_millis(10));
                }
                Err(e) => panic!("the ended allocation's port stayed bound: {e}"),
            }
        };
        squatter
            .set_read_timeout(Some(SILENCE))
            .expect("read timeout");
        browser.send_channel_data(0x4000, b"after the end");
        browser.send_indication(bridge_relay, b"after the end");
        squatter
            .send_to(b"from the squatter", browser_relay)
            .expect("send");
        assert!(!received_anything(&squatter), "the squatter was reached");
        assert_eq!(
            browser.recv_relayed(SILENCE),
            None,
            "the squatter was relayed"
        );
        assert_eq!(peer_denied(&server, 3.0), 3.0);
    });
}
