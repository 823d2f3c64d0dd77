//! The peer policy (SECURITY.md) through the engine's CreatePermission and ChannelBind, on
//! IPv4 and IPv6 allocations, with and without allow-list entries, and uturn's own addresses:
//! on a relay IP only the relayed addresses of live allocations are peers.
//!
//! Send indications are relayed by the data plane only when the shard holds a permission for
//! the peer IP, and a shard learns permissions only from `SetPermission`: every row below
//! that is refused must therefore produce no `SetPermission` at all, which is what makes Send
//! to it impossible (the data plane's own re-check of uturn's relay IPs, whose permission
//! control grants for relay to relay, is tested in `dataplane::tables`).

mod common;

use common::*;
use uturn_engine::{EngineConfig, Event, Output, PeerDenied, TableChange};
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
    // uturn's own relay IPs: no port of them is a peer unless it is a live allocation's
    // relayed address (the test below), not even one inside the relay range.
    ("10.0.0.5:50000", Some(OwnAddress), Some(OwnAddress)),
    ("[2001:db8::5]:50000", Some(OwnAddress), Some(OwnAddress)),
    ("10.0.0.5:22", Some(OwnAddress), Some(OwnAddress)),
    ("[2001:db8::5]:3478", Some(OwnAddress), Some(OwnAddress)),
];

fn open_allow_list() -> EngineConfig {
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
    config: EngineConfig,
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

/// No loops: a peer equal to one of uturn's listening addresses is refused, inside the relay
/// range too (where a listener's port would otherwise look like another allocation's).
#[test]
fn a_peer_equal_to_a_listening_address_is_refused_whatever_the_port_range() {
    for (port_min, listener) in [(3000, "10.0.0.5:3478"), (49152, "10.0.0.5:50000")] {
        let mut config = config();
        config.relay.port_min = port_min;
        config.peers.allow_loopback = true;
        let mut h = Harness::new(config);
        h.engine
            .set_listener_addrs(&[listener.parse().unwrap(), "0.0.0.0:5349".parse().unwrap()]);
        let mut client = Client::new("198.51.100.1:5000");
        h.allocate(&mut client, 1, &[]);
        for (tid, peer) in [(2, listener), (3, "10.0.0.5:5349"), (4, "127.0.0.1:5349")] {
            assert_eq!(
                verdict(&mut h, &client, Method::CHANNEL_BIND, tid, peer),
                Some(OwnAddress),
                "{peer}"
            );
        }
        // Loopback is open here, so another loopback port is an ordinary peer.
        assert_eq!(
            verdict(&mut h, &client, Method::CHANNEL_BIND, 5, "127.0.0.1:5350"),
            None
        );
    }
}

/// On the relay IP the port decides: the relayed address of a live allocation is a peer, the
/// next free port of the relay range (a kernel-chosen client port of some other program,
/// say) is not, and an allocation's address stops being a peer once it is gone.
#[test]
fn only_live_relayed_addresses_of_a_relay_ip_are_peers_for_channel_bind() {
    let mut h = Harness::new(config());
    let mut browser = Client::new("198.51.100.1:5000");
    let mut bridge = Client::new("198.51.100.2:5000");
    h.allocate(&mut browser, 1, &[]);
    let (_, bridge_relays, _) = h.allocate(&mut bridge, 1, &[]);
    let bridge_addr = bridge_relays[0].advertised;
    let free = |offset: u16| {
        let port = bridge_addr.port().wrapping_add(offset).max(49152);
        std::net::SocketAddr::new(bridge_addr.ip(), port).to_string()
    };
    assert_eq!(
        verdict(
            &mut h,
            &browser,
            Method::CHANNEL_BIND,
            2,
            &bridge_addr.to_string()
        ),
        None
    );
    assert_eq!(
        verdict(&mut h, &browser, Method::CHANNEL_BIND, 3, &free(1)),
        Some(OwnAddress)
    );
    // Permissions are by IP (RFC 8656 §9): the relay IP stays admitted, its ports are the
    // data plane's to check per packet.
    let mut third = Client::new("198.51.100.3:5000");
    h.allocate(&mut third, 1, &[]);
    assert_eq!(
        verdict(&mut h, &third, Method::CREATE_PERMISSION, 4, &free(1)),
        None
    );
    h.engine.check_invariants(h.now);

    // The bridge leaves (Refresh with LIFETIME 0): its address is a free port from now on.
    let response = h.request(&bridge, Method::REFRESH, 5, &[Attribute::Lifetime(0)]);
    assert_eq!(response.code(), None);
    h.engine.check_invariants(h.now);
    assert_eq!(
        verdict(
            &mut h,
            &third,
            Method::CHANNEL_BIND,
            6,
            &bridge_addr.to_string()
        ),
        Some(OwnAddress)
    );
}

/// Behind a static NAT the relayed address clients see is the public one
/// (`relay.external_ips`); relay to relay through it works, and the public IP's other ports
/// are refused like the private IP's.
#[test]
fn the_advertised_address_of_a_live_allocation_is_a_peer_and_the_public_ips_other_ports_are_not() {
    let mut config = config();
    config.relay.relay_ips = vec!["10.0.0.5".parse().unwrap()];
    config.relay.external_ips = vec!["203.0.113.5/10.0.0.5".to_owned()];
    let mut h = Harness::new(config);
    let mut browser = Client::new("198.51.100.1:5000");
    let mut bridge = Client::new("198.51.100.2:5000");
    h.allocate(&mut browser, 1, &[]);
    let (_, bridge_relays, _) = h.allocate(&mut bridge, 1, &[]);
    let public = bridge_relays[0].advertised;
    assert_eq!(public.ip().to_string(), "203.0.113.5");
    assert_eq!(
        verdict(
            &mut h,
            &browser,
            Method::CHANNEL_BIND,
            2,
            &public.to_string()
        ),
        None
    );
    assert_eq!(
        verdict(
            &mut h,
            &browser,
            Method::CHANNEL_BIND,
            3,
            &bridge_relays[0].bound.to_string()
        ),
        None
    );
    assert_eq!(
        verdict(&mut h, &browser, Method::CHANNEL_BIND, 4, "203.0.113.5:22"),
        Some(OwnAddress)
    );
}

/// A reload replaces the lists but not what the engine knows of its own live addresses.
#[test]
fn a_reload_keeps_the_live_relayed_addresses() {
    let mut h = Harness::new(config());
    let mut browser = Client::new("198.51.100.1:5000");
    let mut bridge = Client::new("198.51.100.2:5000");
    h.allocate(&mut browser, 1, &[]);
    let (_, bridge_relays, _) = h.allocate(&mut bridge, 1, &[]);
    let mut reloaded = config();
    reloaded.peers.denied_peers = vec!["198.51.100.0/24".parse().unwrap()];
    h.engine
        .set_peer_policy(uturn_engine::PeerPolicy::from_config(&reloaded));
    assert!(h.drain().is_empty());
    h.engine.check_invariants(h.now);
    assert_eq!(
        verdict(
            &mut h,
            &browser,
            Method::CHANNEL_BIND,
            2,
            &bridge_relays[0].advertised.to_string()
        ),
        None
    );
}
