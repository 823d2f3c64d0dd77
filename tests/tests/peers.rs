//! The peer policy of the real binary under its default configuration (no
//! `--allow-loopback-peers`). Everything runs on 127.0.0.1, which is uturn's relay IP here:
//! relay to relay must work through it, while every other port of 127.0.0.1 stays out of
//! reach, inside the relay range too (`netns_reach.rs` checks the same on a relay IP that is
//! not loopback).

use std::net::UdpSocket;
use std::time::Duration;

use uturn_e2e::{
    ANSWER_TIMEOUT, EchoPeer, FORBIDDEN, Relayed, TempConfig, TurnClient, Uturn, peer_socket,
    standard_args,
};
use uturn_proto::{Class, Method};

/// How long a test waits to conclude that something was *not* relayed.
const SILENCE: Duration = Duration::from_millis(400);

fn start_default_policy(backend: &str) -> Uturn {
    start_default_policy_with_ports(backend).0
}

/// The server and its relay port range.
fn start_default_policy_with_ports(backend: &str) -> (Uturn, (u16, u16)) {
    let args: Vec<String> = standard_args(backend, 1)
        .into_iter()
        .filter(|a| a != "--allow-loopback-peers")
        .collect();
    let ports = args
        .iter()
        .position(|a| a == "--ports")
        .and_then(|i| args.get(i + 1))
        .and_then(|range| range.split_once('-'))
        .and_then(|(low, high)| Some((low.parse().ok()?, high.parse().ok()?)))
        .expect("standard_args has --ports LOW-HIGH");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    (Uturn::start(&refs), ports)
}

/// A socket of another program on 127.0.0.1 inside the relay range `ports` (the first free
/// port from the top, where uturn's own allocations are least likely to be).
fn socket_in_relay_range(ports: (u16, u16)) -> UdpSocket {
    (ports.0..=ports.1)
        .rev()
        .find_map(|port| UdpSocket::bind(("127.0.0.1", port)).ok())
        .expect("a free port in the relay range")
}

uturn_e2e::on_both_backends!(
    two_allocations_on_one_server_relay_to_each_other_under_the_default_policy,
    the_relay_ip_is_reachable_at_live_relayed_addresses_only,
    a_peer_that_a_reload_denies_stops_relaying,
    a_reload_that_closes_loopback_reaches_the_shards_own_address_check,
);

/// A browser and the conferencing back end allocate on the same uturn and reach each other
/// through their relayed addresses: ChannelData one way, Send/Data indications the other.
fn two_allocations_on_one_server_relay_to_each_other_under_the_default_policy(backend: &str) {
    let server = start_default_policy(backend);
    let mut browser = TurnClient::new(server.listener(false), "alice", "wonderland");
    let mut bridge = TurnClient::new(server.listener(false), "alice", "wonderland");
    let browser_relay = browser.allocate(&[]).unwrap().relayed[0];
    let bridge_relay = bridge.allocate(&[]).unwrap().relayed[0];
    browser.channel_bind(0x4000, bridge_relay).unwrap();
    bridge.create_permission(&[browser_relay]).unwrap();

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
}

/// A permission for the relay IP (which relay to relay needs, permissions being per IP) does
/// not open the host's other ports, not even those inside the relay range that no allocation
/// holds: ChannelBind to one is 403, a Send indication to one and a datagram from one are
/// dropped and counted as `peer_denied`, and another loopback address stays refused.
fn the_relay_ip_is_reachable_at_live_relayed_addresses_only(backend: &str) {
    let (server, ports) = start_default_policy_with_ports(backend);
    let service = EchoPeer::start(false); // a local service on 127.0.0.1, outside the range
    let in_range = socket_in_relay_range(ports);
    in_range.set_read_timeout(Some(SILENCE)).expect("timeout");
    let in_range_addr = in_range.local_addr().expect("address");
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    let relayed = client.allocate(&[]).unwrap().relayed[0];
    client.create_permission(&[service.addr]).unwrap();
    assert_eq!(client.channel_bind(0x4001, service.addr), Err(FORBIDDEN));
    assert_eq!(
        client.channel_bind(0x4002, server.listener(false)),
        Err(FORBIDDEN)
    );
    assert_eq!(client.channel_bind(0x4003, in_range_addr), Err(FORBIDDEN));
    assert_eq!(
        client.create_permission(&["127.0.0.2:9".parse().unwrap()]),
        Err(FORBIDDEN)
    );
    for _ in 0..3 {
        client.send_indication(service.addr, b"knock knock");
    }
    client.send_indication(in_range_addr, b"knock knock");
    in_range.send_to(b"let me in", relayed).expect("send");
    assert_eq!(service.wait_for(1, SILENCE), 0, "a host port was reached");
    let mut buf = [0u8; 64];
    assert!(
        in_range.recv_from(&mut buf).is_err(),
        "a port in the relay range was reached"
    );
    assert_eq!(
        client.recv_relayed(SILENCE),
        None,
        "a host port was relayed"
    );
    // Four 403s counted by control, five datagrams dropped by the shard.
    let denied = server.wait_metric(
        "uturn_dropped_packets_total",
        &[("reason", "peer_denied")],
        9.0,
        Duration::from_secs(5),
    );
    assert_eq!(denied, 9.0);
}

/// One shard, counters published every 50 ms, the config file `config` (re-read on reload)
/// and `extra` flags over the standard ones minus those in `without`.
fn start_with_config(backend: &str, config: &TempConfig, without: &[&str]) -> Uturn {
    let mut args: Vec<String> = standard_args(backend, 1)
        .into_iter()
        .filter(|a| !without.contains(&a.as_str()))
        .collect();
    args.extend(["--config", config.path(), "--counters-interval-ms", "50"].map(str::to_owned));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Uturn::start(&refs)
}

/// Reloads through the API and waits until the client's shard has applied what the reload
/// sent it: commands to a shard are applied in order, so once the answer to a Binding sent
/// after the reload is back, the shard has every command queued before it.
fn reload_and_sync(server: &Uturn, client: &mut TurnClient) {
    let (status, body) = server.http("POST", "/api/v1/reload", None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("peers"), "{body}");
    let response = client.request(Method::BINDING, &[]);
    assert_eq!(response.message().class(), Class::SuccessResponse);
}

/// Issue 8: `denied_peers` is reloadable on a live allocation. A peer relaying through a
/// channel and a permission is denied by a reload; from then on ChannelData, Send
/// indications and the peer's datagrams are all dropped and counted.
fn a_peer_that_a_reload_denies_stops_relaying(backend: &str) {
    let config = TempConfig::new(&format!("reload-deny-{backend}"), "");
    let server = start_with_config(backend, &config, &[]);
    // 127.0.0.2: loopback but not the relay IP, so the lists judge it (loopback is open here).
    let peer = UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    peer.set_read_timeout(Some(ANSWER_TIMEOUT))
        .expect("timeout");
    let peer_addr = peer.local_addr().expect("peer address");
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    let relayed = client.allocate(&[]).expect("allocate").relayed[0];
    client
        .channel_bind(0x4000, peer_addr)
        .expect("channel to 127.0.0.2");
    client.send_channel_data(0x4000, b"before");
    let mut buf = [0u8; 64];
    let (n, _) = peer.recv_from(&mut buf).expect("relayed before the reload");
    assert_eq!(&buf[..n], b"before");
    peer.send_to(b"back", relayed).expect("send");
    assert_eq!(
        client.recv_relayed(ANSWER_TIMEOUT),
        Some(Relayed::ChannelData {
            channel: 0x4000,
            payload: b"back".to_vec()
        })
    );

    config.write("[peers]\ndenied_peers = [\"127.0.0.2/32\"]\n");
    reload_and_sync(&server, &mut client);
    client.send_channel_data(0x4000, b"after");
    client.send_indication(peer_addr, b"after");
    peer.send_to(b"after", relayed).expect("send");
    let no_channel = server.wait_metric(
        "uturn_dropped_packets_total",
        &[("reason", "no_channel")],
        1.0,
        Duration::from_secs(5),
    );
    let no_permission = server.wait_metric(
        "uturn_dropped_packets_total",
        &[("reason", "no_permission")],
        2.0,
        Duration::from_secs(5),
    );
    assert_eq!((no_channel, no_permission), (1.0, 2.0));
    peer.set_nonblocking(true).expect("nonblocking");
    assert!(
        peer.recv_from(&mut buf).is_err(),
        "the denied peer got data"
    );
    assert_eq!(
        client.recv_relayed(SILENCE),
        None,
        "the denied peer was relayed"
    );
}

/// The shards' own check of uturn's addresses follows a reload too. With loopback open
/// (`peers.allow_loopback` in the file), the relay IP 127.0.0.1 is a peer on any port; a
/// reload that closes loopback keeps the permission (the relay IP stays admitted for relay to
/// relay) but the shard must then refuse its ports that are not live relayed addresses, both
/// ways.
fn a_reload_that_closes_loopback_reaches_the_shards_own_address_check(backend: &str) {
    let config = TempConfig::new(
        &format!("reload-loopback-{backend}"),
        "[peers]\nallow_loopback = true\n",
    );
    let server = start_with_config(backend, &config, &["--allow-loopback-peers"]);
    // 127.0.0.1 on an ephemeral port: a local service outside the relay range.
    let service = peer_socket(false);
    let service_addr = service.local_addr().expect("service address");
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    let relayed = client.allocate(&[]).expect("allocate").relayed[0];
    client
        .create_permission(&[service_addr])
        .expect("permission");
    client.send_indication(service_addr, b"open");
    let mut buf = [0u8; 64];
    let (n, _) = service
        .recv_from(&mut buf)
        .expect("relayed while loopback is open");
    assert_eq!(&buf[..n], b"open");
    service.send_to(b"open", relayed).expect("send");
    assert!(
        matches!(
            client.recv_relayed(ANSWER_TIMEOUT),
            Some(Relayed::Data { .. })
        ),
        "relayed back while loopback is open"
    );

    config.write("[peers]\nallow_loopback = false\n");
    reload_and_sync(&server, &mut client);
    client.send_indication(service_addr, b"closed");
    service.send_to(b"closed", relayed).expect("send");
    let denied = server.wait_metric(
        "uturn_dropped_packets_total",
        &[("reason", "peer_denied")],
        2.0,
        Duration::from_secs(5),
    );
    assert_eq!(denied, 2.0, "the shard refused both directions");
    service.set_nonblocking(true).expect("nonblocking");
    assert!(service.recv_from(&mut buf).is_err(), "the service got data");
    assert_eq!(
        client.recv_relayed(SILENCE),
        None,
        "the service was relayed"
    );
}
