//! The peer policy (issue 8, SECURITY.md) through the engine's CreatePermission and
//! ChannelBind, on IPv4 and IPv6 allocations, with and without allow-list entries.
//!
//! Send indications are relayed by the data plane only when the shard holds a permission for
//! the peer IP, and a shard learns permissions only from `SetPermission`: every row below
//! that is refused must therefore produce no `SetPermission` at all, which is what makes Send
//! to it impossible (the data plane's own re-check of uturn's relay ports is tested in
//! `dataplane::tables`).

mod common;

use common::*;
use uturn_control::{Config, Event, Output, PeerDenied, TableChange};
use uturn_proto::{AddressFamily, Attribute, ChannelNumber, Method};

use PeerDenied::*;

/// Peer, verdict under the default policy, verdict with `allowed_peers = ["0.0.0.0/0",
/// "::/0"]` (which opens private ranges and nothing of the always-denied set).
const TABLE: &[(&str, Option<PeerDenied>, Option<PeerDenied>)] = &[
    // Ordinary unicast.
    ("198.51.100.7:4000", None, None),
    ("[2001:db8:1::7]:4000", None, None),
    ("[::ffff:198.51.100.7]:4000", None, None),
    // Loopback, in every form (CVE-2026-27624: ::ffff:127.0.0.1).
    ("127.0.0.1:4000", Some(Loopback), Some(Loopback)),
    ("127.1.2.3:4000", Some(Loopback), Some(Loopback)),
    ("[::1]:4000", Some(Loopback), Some(Loopback)),
    ("[::ffff:127.0.0.1]:4000", Some(Loopback), Some(Loopback)),
    ("[::127.0.0.1]:4000", Some(Loopback), Some(Loopback)),
    ("[64:ff9b::7f00:1]:4000", Some(Loopback), Some(Loopback)),
    ("[2002:7f00:1::1]:4000", Some(Loopback), Some(Loopback)),
    (
        "[2001:0:c633:6401::80ff:fffe]:4000",
        Some(Loopback),
        Some(Loopback),
    ),
    // Unspecified and "this network" (CVE-2020-26262: 0.0.0.0 and [::]).
    ("0.0.0.0:4000", Some(Unspecified), Some(Unspecified)),
    ("[::]:4000", Some(Unspecified), Some(Unspecified)),
    ("0.1.2.3:4000", Some(ThisNetwork), Some(ThisNetwork)),
    (
        "[::ffff:0.0.0.0]:4000",
        Some(Unspecified),
        Some(Unspecified),
    ),
    // Link-local: the cloud metadata service 169.254.169.254.
    ("169.254.169.254:80", Some(LinkLocal), Some(LinkLocal)),
    (
        "[::ffff:169.254.169.254]:80",
        Some(LinkLocal),
        Some(LinkLocal),
    ),
    ("[64:ff9b::a9fe:a9fe]:80", Some(LinkLocal), Some(LinkLocal)),
    ("[2002:a9fe:a9fe::1]:80", Some(LinkLocal), Some(LinkLocal)),
    ("[fe80::1]:4000", Some(LinkLocal), Some(LinkLocal)),
    // Multicast, broadcast, 240/4.
    ("224.0.0.1:4000", Some(Multicast), Some(Multicast)),
    ("239.255.255.250:1900", Some(Multicast), Some(Multicast)),
    ("[ff02::1]:4000", Some(Multicast), Some(Multicast)),
    (
        "[::ffff:224.0.0.251]:5353",
        Some(Multicast),
        Some(Multicast),
    ),
    ("255.255.255.255:4000", Some(Broadcast), Some(Broadcast)),
    (
        "[::ffff:255.255.255.255]:4000",
        Some(Broadcast),
        Some(Broadcast),
    ),
    ("240.0.0.1:4000", Some(Reserved), Some(Reserved)),
    ("[64:ff9b::f000:1]:4000", Some(Reserved), Some(Reserved)),
    // Private ranges: denied by default, opened by the allow list.
    ("10.1.2.3:4000", Some(Private), None),
    ("172.16.5.4:4000", Some(Private), None),
    ("192.168.1.1:4000", Some(Private), None),
    ("100.64.0.1:4000", Some(Private), None),
    ("[fd00::1]:4000", Some(Private), None),
    ("[::ffff:192.168.1.1]:4000", Some(Private), None),
    ("[64:ff9b::a01:203]:4000", Some(Private), None),
    ("[2002:a01:203::1]:4000", Some(Private), None),
    // uturn's own relay addresses: relay ports only (relay to relay), never other ports.
    ("10.0.0.5:50000", None, None),
    ("[2001:db8::5]:50000", None, None),
    ("10.0.0.5:22", Some(OwnAddress), Some(OwnAddress)),
    ("[2001:db8::5]:3478", Some(OwnAddress), Some(OwnAddress)),
];

fn open_allow_list() -> Config {
    let mut config = config();
    config.peers.allowed_peers = vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
    config
}

/// What the engine did with one request naming `peer`: the refusal reason (403 with a
/// PeerDenied event) or `None` (success, with a SetPermission for the peer IP).
fn verdict(
    h: &mut Harness,
    client: &Client,
    method: Method,
    tid: u8,
    peer: &str,
) -> Option<PeerDenied> {
    let addr = common::peer(peer);
    let channel = Attribute::ChannelNumber(ChannelNumber::new(0x4000 + u16::from(tid)).unwrap());
    let attrs = match method {
        Method::CHANNEL_BIND => vec![channel, Attribute::XorPeerAddress(addr)],
        _ => vec![Attribute::XorPeerAddress(addr)],
    };
    let outputs = h.send(client.tuple, &client.request(method, tid, &attrs));
    let denied = outputs.iter().find_map(|o| match o {
        Output::Event(Event::PeerDenied {
            peer_ip, reason, ..
        }) => {
            assert_eq!(*peer_ip, addr.ip());
            Some(*reason)
        }
        _ => None,
    });
    let installed = tables(&outputs).iter().any(|change| {
        matches!(change, TableChange::SetPermission { peer_ip, .. } if *peer_ip == addr.ip())
    });
    let dump = format!("{outputs:#?}");
    let response = single_response(outputs);
    match denied {
        Some(_) => {
            assert_eq!(response.code(), Some(403), "{peer} {method:?}");
            assert!(
                !installed,
                "{peer}: a refused peer reached the shard's permissions"
            );
        }
        None => {
            assert_eq!(response.code(), None, "{peer} {method:?}");
            assert!(installed, "{peer}: no SetPermission in {dump}");
        }
    }
    denied
}

fn run_table(
    config: Config,
    column: impl Fn(&(&str, Option<PeerDenied>, Option<PeerDenied>)) -> Option<PeerDenied>,
) {
    for row in TABLE {
        let (peer, ..) = *row;
        let expected = column(row);
        let v6 = peer.starts_with('[');
        for method in [Method::CREATE_PERMISSION, Method::CHANNEL_BIND] {
            let mut h = Harness::new(config.clone());
            let mut client = Client::new("198.51.100.1:5000");
            let family = if v6 {
                AddressFamily::V6
            } else {
                AddressFamily::V4
            };
            h.allocate(&mut client, 1, &[Attribute::RequestedAddressFamily(family)]);
            // CreatePermission is by IP only (RFC 8656 §9): a relay IP passes there and its
            // port is checked on ChannelBind and per packet.
            let expected = match (method, expected) {
                (Method::CREATE_PERMISSION, Some(OwnAddress)) => None,
                (_, other) => other,
            };
            assert_eq!(
                verdict(&mut h, &client, method, 2, peer),
                expected,
                "{peer} {method:?}"
            );
            h.engine.check_invariants(h.now);
        }
    }
}

#[test]
fn every_range_and_embedding_gets_its_verdict_under_the_default_policy() {
    run_table(config(), |row| row.1);
}

#[test]
fn an_allow_list_opens_private_ranges_but_never_the_always_denied_set() {
    run_table(open_allow_list(), |row| row.2);
}

#[test]
fn a_denied_peers_entry_refuses_an_ordinary_address_unless_the_allow_list_names_it() {
    let mut config = config();
    config.peers.denied_peers = vec!["198.51.100.0/24".parse().unwrap()];
    config.peers.allowed_peers = vec!["198.51.100.9/32".parse().unwrap()];
    let mut h = Harness::new(config);
    let mut client = Client::new("203.0.113.1:5000");
    h.allocate(&mut client, 1, &[]);
    assert_eq!(
        verdict(
            &mut h,
            &client,
            Method::CREATE_PERMISSION,
            2,
            "198.51.100.7:4000"
        ),
        Some(Configured)
    );
    assert_eq!(
        verdict(
            &mut h,
            &client,
            Method::CREATE_PERMISSION,
            3,
            "198.51.100.9:4000"
        ),
        None
    );
}

/// Relay to relay: a browser and the conferencing back end allocating on the same uturn
/// reach each other through their relayed addresses, with the default policy (the relay IP
/// here is private, which the default otherwise refuses).
#[test]
fn two_allocations_on_the_same_server_relay_to_each_other_under_the_default_policy() {
    let mut h = Harness::new(config());
    let mut browser = Client::new("198.51.100.1:5000");
    let mut bridge = Client::new("198.51.100.2:5000");
    let (_, browser_relays, _) = h.allocate(&mut browser, 1, &[]);
    let (_, bridge_relays, _) = h.allocate(&mut bridge, 1, &[]);
    let to_bridge = bridge_relays[0].advertised.to_string();
    let to_browser = browser_relays[0].advertised.to_string();
    assert_eq!(
        verdict(&mut h, &browser, Method::CREATE_PERMISSION, 2, &to_bridge),
        None
    );
    assert_eq!(
        verdict(&mut h, &bridge, Method::CHANNEL_BIND, 2, &to_browser),
        None
    );
}

/// A peer equal to one of uturn's listening addresses is refused: no loops.
#[test]
fn a_peer_equal_to_a_listening_address_is_refused() {
    let mut config = config();
    config.relay.port_min = 3000;
    let mut h = Harness::new(config);
    h.engine
        .set_listener_addrs(&["10.0.0.5:3478".parse().unwrap()]);
    let mut client = Client::new("198.51.100.1:5000");
    h.allocate(&mut client, 1, &[]);
    assert_eq!(
        verdict(&mut h, &client, Method::CHANNEL_BIND, 2, "10.0.0.5:3478"),
        Some(OwnAddress)
    );
    assert_eq!(
        verdict(&mut h, &client, Method::CHANNEL_BIND, 3, "10.0.0.5:3479"),
        None
    );
}
