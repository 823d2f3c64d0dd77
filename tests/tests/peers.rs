//! Issue 8 end to end: the peer policy of the real binary under its default configuration
//! (no `--allow-loopback-peers`). Everything runs on 127.0.0.1, which is uturn's relay IP
//! here: relay to relay must work through it, while every other port of 127.0.0.1 stays out
//! of reach.

use std::time::Duration;

use uturn_e2e::{ANSWER_TIMEOUT, EchoPeer, FORBIDDEN, Relayed, TurnClient, Uturn, standard_args};

/// How long a test waits to conclude that something was *not* relayed.
const SILENCE: Duration = Duration::from_millis(400);

fn start_default_policy(backend: &str) -> Uturn {
    let args: Vec<String> = standard_args(backend, 1)
        .into_iter()
        .filter(|a| a != "--allow-loopback-peers")
        .collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Uturn::start(&refs)
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn uring() {
                    super::$name("uring");
                }
                #[test]
                fn mmsg() {
                    super::$name("mmsg");
                }
            }
        )*
    };
}

on_both_backends!(
    two_allocations_on_one_server_relay_to_each_other_under_the_default_policy,
    the_relay_ip_is_reachable_on_relay_ports_only,
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
/// not open the host's other ports: ChannelBind to one is 403, a Send indication to one is
/// dropped and counted as `peer_denied`, and another loopback address stays refused.
fn the_relay_ip_is_reachable_on_relay_ports_only(backend: &str) {
    let server = start_default_policy(backend);
    let service = EchoPeer::start(false); // a local service on 127.0.0.1, outside the range
    let mut client = TurnClient::new(server.listener(false), "alice", "wonderland");
    client.allocate(&[]).unwrap();
    client.create_permission(&[service.addr]).unwrap();
    assert_eq!(client.channel_bind(0x4001, service.addr), Err(FORBIDDEN));
    assert_eq!(
        client.channel_bind(0x4002, server.listener(false)),
        Err(FORBIDDEN)
    );
    assert_eq!(
        client.create_permission(&["127.0.0.2:9".parse().unwrap()]),
        Err(FORBIDDEN)
    );
    for _ in 0..3 {
        client.send_indication(service.addr, b"knock knock");
    }
    assert_eq!(service.wait_for(1, SILENCE), 0, "a host port was reached");
    // Three 403s counted by control, three Send indications dropped by the shard.
    let denied = server.wait_metric(
        "uturn_dropped_packets_total",
        &[("reason", "peer_denied")],
        6.0,
        Duration::from_secs(5),
    );
    assert_eq!(denied, 6.0);
}
