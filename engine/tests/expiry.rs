//! Expiry: allocations, permissions, channels and reservations disappear exactly when due.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use uturn_engine::{Event, Output, ShardId, TableChange};
use uturn_proto::{Attribute, ChannelNumber, EvenPort, Method};

const MS: Duration = Duration::from_millis(1);

/// RFC 8656 §3.2: "the default lifetime of an allocation is 10 minutes". An allocation exists
/// until the instant before its deadline and is gone at the deadline.
#[test]
fn an_allocation_expires_exactly_at_its_deadline() {
    let mut h = Harness::new(config());
    let mut client = Client::new("198.51.100.1:5000");
    let (alloc, _, _) = h.allocate(&mut client, 2, &[]);
    let deadline = h.now + Duration::from_secs(600);
    assert_eq!(h.engine.poll_timeout(), Some(deadline));
    assert_eq!(h.run_until(deadline - MS), []);
    assert_eq!(h.engine.allocation_count(), 1);
    h.engine.check_invariants(h.now);
    assert_eq!(
        h.run_until(deadline),
        [
            Output::Table {
                shard: ShardId(0),
                change: TableChange::RemoveAllocation { alloc }
            },
            Output::Event(Event::AllocationExpired { alloc }),
        ]
    );
    assert_eq!(h.engine.allocation_count(), 0);
    assert_eq!(h.engine.poll_timeout(), None);
    h.engine.check_invariants(h.now);
    // The 5-tuple has no allocation any more.
    h.challenge(&mut client);
    assert_eq!(
        h.request(&client, Method::REFRESH, 3, &[]).code(),
        Some(437)
    );
}

/// A spurious wake-up is harmless.
#[test]
fn handle_timeout_before_any_deadline_does_nothing() {
    let mut h = Harness::new(config());
    h.engine.handle_timeout(h.now);
    assert_eq!(h.drain(), []);
    let mut client = Client::new("198.51.100.1:5000");
    h.allocate(&mut client, 2, &[]);
    h.engine.handle_timeout(h.now + Duration::from_secs(1));
    assert_eq!(h.drain(), []);
}

/// RFC 8656 §8.2: a successful Refresh sets the time-to-expiry to the desired lifetime.
#[test]
fn a_refresh_moves_the_deadline() {
    let mut h = Harness::new(config());
    let mut client = Client::new("198.51.100.1:5000");
    let (alloc, _, _) = h.allocate(&mut client, 2, &[]);
    h.advance(Duration::from_secs(500));
    let outputs = h.send(client.tuple, &client.request(Method::REFRESH, 3, &[]));
    assert!(outputs.contains(&Output::Event(Event::AllocationRefreshed {
        alloc,
        lifetime_secs: 600
    })));
    let deadline = h.now + Duration::from_secs(600);
    assert_eq!(h.run_until(deadline - MS), []);
    assert_eq!(
        tables(&h.run_until(deadline)),
        [TableChange::RemoveAllocation { alloc }]
    );
}

/// RFC 8656 §9: "The Permission Lifetime MUST be 300 seconds (= 5 minutes)."
#[test]
fn a_permission_expires_exactly_after_300_seconds_and_a_refresh_extends_it() {
    let mut h = Harness::new(config());
    let mut client = Client::new("198.51.100.1:5000");
    let (alloc, _, _) = h.allocate(&mut client, 2, &[]);
    let peer_ip = "198.51.100.9".parse().unwrap();
    let attrs = [Attribute::XorPeerAddress(peer("198.51.100.9:7000"))];
    h.request(&client, Method::CREATE_PERMISSION, 3, &attrs);
    h.advance(Duration::from_secs(100));
    h.request(&client, Method::CREATE_PERMISSION, 4, &attrs);
    let deadline = h.now + Duration::from_secs(300);
    assert_eq!(h.run_until(deadline - MS), []);
    assert_eq!(
        h.run_until(deadline),
        [
            Output::Table {
                shard: ShardId(0),
                change: TableChange::RemovePermission { alloc, peer_ip }
            },
            Output::Event(Event::PermissionExpired { alloc, peer_ip }),
        ]
    );
    h.engine.check_invariants(h.now);
}

/// RFC 8656 §12: "a channel binding lasts for 10 minutes unless refreshed"; its permission
/// (installed by the ChannelBind) lasts 300 s.
#[test]
fn a_channel_expires_exactly_after_600_seconds_and_its_permission_after_300() {
    let mut h = Harness::new(config());
    let mut client = Client::new("198.51.100.1:5000");
    let (alloc, _, _) = h.allocate(&mut client, 2, &[Attribute::Lifetime(3600)]);
    let p = peer("198.51.100.9:7000");
    let attrs = [
        Attribute::ChannelNumber(ChannelNumber::new(0x4000).unwrap()),
        Attribute::XorPeerAddress(p),
    ];
    h.request(&client, Method::CHANNEL_BIND, 3, &attrs);
    let start = h.now;
    assert_eq!(h.run_until(start + Duration::from_secs(300) - MS), []);
    assert_eq!(
        tables(&h.run_until(start + Duration::from_secs(300))),
        [TableChange::RemovePermission {
            alloc,
            peer_ip: p.ip()
        }]
    );
    assert_eq!(h.run_until(start + Duration::from_secs(600) - MS), []);
    assert_eq!(
        h.run_until(start + Duration::from_secs(600)),
        [
            Output::Table {
                shard: ShardId(0),
                change: TableChange::UnbindChannel {
                    alloc,
                    channel: 0x4000
                }
            },
            Output::Event(Event::ChannelExpired {
                alloc,
                channel: 0x4000,
                peer: p
            }),
        ]
    );
    h.engine.check_invariants(h.now);
    // The channel number and the peer are free to bind again.
    h.challenge(&mut client);
    let other = [
        Attribute::ChannelNumber(ChannelNumber::new(0x4000).unwrap()),
        Attribute::XorPeerAddress(peer("198.51.100.9:7001")),
    ];
    assert_eq!(
        h.request(&client, Method::CHANNEL_BIND, 4, &other).code(),
        None
    );
}

/// RFC 8656 §7.2: "The server MUST hold this reservation for at least 30 seconds".
#[test]
fn a_reservation_expires_exactly_after_30_seconds() {
    let mut h = Harness::new(config());
    let mut client = Client::new("198.51.100.1:5000");
    let even_r = Attribute::EvenPort(EvenPort { reserve_next: true });
    let (_, relays, response) = h.allocate(&mut client, 2, &[even_r]);
    let token = response.message().reservation_token().unwrap().unwrap();
    let deadline = h.now + Duration::from_secs(30);
    assert_eq!(h.engine.poll_timeout(), Some(deadline));
    assert_eq!(h.run_until(deadline - MS), []);
    h.engine.check_invariants(h.now);
    let reserved = SocketAddr::new(relays[0].bound.ip(), relays[0].bound.port() + 1);
    assert_eq!(
        h.run_until(deadline),
        [
            Output::ReleaseHeld { addr: reserved },
            Output::Event(Event::ReservationExpired {
                port: reserved.port()
            })
        ]
    );
    h.engine.check_invariants(h.now);
    let mut late = Client::new("198.51.100.2:5000");
    h.challenge(&mut late);
    let attrs = [udp(), Attribute::ReservationToken(token)];
    assert_eq!(
        h.request(&late, Method::ALLOCATE, 2, &attrs).code(),
        Some(508)
    );
}

#[test]
fn an_expired_allocation_takes_its_permissions_and_channels_without_separate_removals() {
    let mut h = Harness::new(config());
    let mut client = Client::new("198.51.100.1:5000");
    let (alloc, _, _) = h.allocate(&mut client, 2, &[]);
    let p = peer("198.51.100.9:7000");
    let attrs = [
        Attribute::ChannelNumber(ChannelNumber::new(0x4000).unwrap()),
        Attribute::XorPeerAddress(p),
    ];
    h.advance(Duration::from_secs(599));
    h.request(&client, Method::CHANNEL_BIND, 3, &attrs);
    let deadline = h.now + Duration::from_secs(1);
    assert_eq!(
        tables(&h.run_until(deadline)),
        [TableChange::RemoveAllocation { alloc }]
    );
    assert_eq!(h.engine.poll_timeout(), None);
    h.engine.check_invariants(h.now);
}
