//! Operator inputs to the engine: drain (508, or 300 with ALTERNATE-SERVER), deleting an
//! allocation, reloading REST secrets and the peer policy, and the full allocation snapshot.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use hmac::{Hmac, Mac};
use uturn_engine::{Event, Output, PeerDenied, PeerPolicy, TableChange};
use uturn_proto::{Attribute, ChannelNumber, Method};

fn rest_client(addr: &str, secret: &str) -> Client {
    let username = format!("{}:carol", WALL_UNIX_SECS + 3600);
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(username.as_bytes());
    let mut client = Client::new(addr);
    client.password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    client.username = username;
    client
}

#[test]
fn draining_answers_new_allocates_508_and_keeps_existing_allocations() {
    let mut h = Harness::new(config());
    let mut existing = Client::new("198.51.100.1:5000");
    let (alloc, _, _) = h.allocate(&mut existing, 1, &[]);

    h.engine.set_draining(true);
    assert!(h.engine.is_draining());
    let mut newcomer = Client::new("198.51.100.2:5000");
    h.challenge(&mut newcomer);
    let refused = h.request(&newcomer, Method::ALLOCATE, 2, &[udp()]);
    assert_eq!(refused.code(), Some(508));
    refused.message().verify_integrity(&newcomer.key()).unwrap();

    // The existing allocation refreshes and creates permissions as before.
    let refreshed = h.request(&existing, Method::REFRESH, 3, &[Attribute::Lifetime(600)]);
    assert_eq!(refreshed.code(), None);
    let permitted = h.request(
        &existing,
        Method::CREATE_PERMISSION,
        4,
        &[Attribute::XorPeerAddress(peer("203.0.113.9:7000"))],
    );
    assert_eq!(permitted.code(), None);
    assert_eq!(h.engine.allocation_count(), 1);
    assert_eq!(h.engine.allocations().next().map(|a| a.id), Some(alloc));

    h.engine.set_draining(false);
    h.allocate(&mut newcomer, 5, &[]);
    assert_eq!(h.engine.allocation_count(), 2);
}

#[test]
fn draining_with_alternates_answers_300_with_the_alternate_of_the_clients_family() {
    let mut config = config();
    config.alternate_servers = vec![peer("[2001:db8::7]:3478"), peer("192.0.2.7:3478")];
    let mut h = Harness::new(config);
    h.engine.set_draining(true);
    let mut client = Client::new("198.51.100.2:5000");
    h.challenge(&mut client);
    let redirected = h.request(&client, Method::ALLOCATE, 2, &[udp()]);
    assert_eq!(redirected.code(), Some(300));
    assert_eq!(
        redirected.message().alternate_server().unwrap(),
        Some(peer("192.0.2.7:3478"))
    );
    // RFC 8489 §10: a redirect after authentication is protected like any response.
    redirected
        .message()
        .verify_integrity(&client.key())
        .unwrap();
}

#[test]
fn deleting_an_allocation_removes_it_from_its_shard_and_frees_its_five_tuple() {
    let mut h = Harness::new(config());
    let mut client = Client::new("198.51.100.1:5000");
    let (alloc, _, _) = h.allocate(&mut client, 1, &[]);
    assert!(h.engine.delete_allocation(h.now, alloc));
    let outputs = h.drain();
    assert_eq!(
        tables(&outputs),
        vec![TableChange::RemoveAllocation { alloc }]
    );
    assert!(
        outputs.iter().any(
            |o| matches!(o, Output::Event(Event::AllocationRevoked { alloc: a }) if *a == alloc)
        )
    );
    assert_eq!(h.engine.allocation_count(), 0);
    assert!(!h.engine.delete_allocation(h.now, alloc), "gone already");
    assert!(h.drain().is_empty());
    h.engine.check_invariants(h.now);
    // The client may allocate again on the same 5-tuple.
    h.allocate(&mut client, 2, &[]);
}

#[test]
fn the_snapshot_shows_permissions_channels_expiry_and_request_counts() {
    let mut h = Harness::new(config());
    let mut client = Client::new("198.51.100.1:5000");
    let (alloc, relays, _) = h.allocate(&mut client, 1, &[]);
    let created = h.now;
    h.advance(Duration::from_secs(10));
    let bound = h.request(
        &client,
        Method::CHANNEL_BIND,
        2,
        &[
            Attribute::ChannelNumber(ChannelNumber::new(0x4001).unwrap()),
            Attribute::XorPeerAddress(peer("203.0.113.9:7000")),
        ],
    );
    assert_eq!(bound.code(), None);
    let refused = h.request(&client, Method::CREATE_PERMISSION, 3, &[]);
    assert_eq!(
        refused.code(),
        Some(400),
        "CreatePermission without XOR-PEER-ADDRESS"
    );

    let snapshots = h.engine.allocation_snapshots();
    assert_eq!(snapshots.len(), 1);
    let s = &snapshots[0];
    assert_eq!(s.id, alloc);
    assert_eq!(s.user, USER);
    assert_eq!(s.relays, relays);
    assert_eq!(s.created_at, created);
    assert_eq!(s.expires_at, created + Duration::from_secs(600));
    assert_eq!(
        s.permissions,
        vec![(
            peer("203.0.113.9:7000").ip(),
            h.now + Duration::from_secs(300)
        )]
    );
    assert_eq!(
        s.channels,
        vec![(
            0x4001,
            peer("203.0.113.9:7000"),
            h.now + Duration::from_secs(600)
        )]
    );
    assert_eq!((s.requests, s.errors), (3, 1));
}

#[test]
fn reloaded_rest_secrets_take_effect_for_new_requests() {
    let mut config = config();
    config.auth.secrets = vec!["old".into()];
    let mut h = Harness::new(config.clone());
    let mut before = rest_client("198.51.100.1:5000", "old");
    h.allocate(&mut before, 1, &[]);

    config.auth.secrets = vec!["new".into()];
    h.engine.reload_secrets(&config.auth).unwrap();
    let mut with_new = rest_client("198.51.100.2:5000", "new");
    h.allocate(&mut with_new, 1, &[]);
    let mut with_old = rest_client("198.51.100.3:5000", "old");
    h.challenge(&mut with_old);
    let refused = h.request(&with_old, Method::ALLOCATE, 2, &[udp()]);
    assert_eq!(refused.code(), Some(401));
    assert_eq!(h.engine.allocation_count(), 2, "existing allocations stay");

    // Turning REST off (or on) needs a restart: refused, the old secrets stay.
    config.auth.secrets.clear();
    assert!(h.engine.reload_secrets(&config.auth).is_err());
    let mut still = rest_client("198.51.100.4:5000", "new");
    h.allocate(&mut still, 1, &[]);
}

#[test]
fn a_reloaded_peer_policy_applies_to_new_permissions_and_revokes_refused_ones() {
    let mut config = config();
    let mut h = Harness::new(config.clone());
    let mut client = Client::new("198.51.100.1:5000");
    let (alloc, _, _) = h.allocate(&mut client, 1, &[]);
    let private = [Attribute::XorPeerAddress(peer("10.20.0.7:7000"))];
    let channel = Attribute::ChannelNumber(ChannelNumber::new(0x4001).unwrap());
    let denied = h.request(&client, Method::CREATE_PERMISSION, 2, &private);
    assert_eq!(denied.code(), Some(403));
    config.peers.allowed_peers = vec!["10.20.0.0/16".parse().unwrap()];
    h.engine.set_peer_policy(PeerPolicy::from_config(&config));
    let allowed = h.request(&client, Method::CREATE_PERMISSION, 3, &private);
    assert_eq!(allowed.code(), None);
    let bound = h.request(
        &client,
        Method::CHANNEL_BIND,
        4,
        &[channel, Attribute::XorPeerAddress(peer("10.20.0.7:7000"))],
    );
    assert_eq!(bound.code(), None);

    // Taking the network off the allow list revokes the permission and its channel at once.
    config.peers.allowed_peers.clear();
    h.engine.set_peer_policy(PeerPolicy::from_config(&config));
    let outputs = h.drain();
    let ip: std::net::IpAddr = "10.20.0.7".parse().unwrap();
    assert_eq!(
        tables(&outputs),
        vec![
            TableChange::UnbindChannel {
                alloc,
                channel: 0x4001
            },
            TableChange::RemovePermission { alloc, peer_ip: ip },
        ]
    );
    assert!(outputs.iter().any(|o| matches!(
        o,
        Output::Event(Event::PermissionRevoked {
            reason: PeerDenied::Private,
            ..
        })
    )));
    h.engine.check_invariants(h.now);
    let again = h.request(&client, Method::CREATE_PERMISSION, 5, &private);
    assert_eq!(again.code(), Some(403));
}
