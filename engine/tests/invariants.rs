//! Random sequences of requests from many clients, with time jumps and relay bind failures,
//! never break the engine's invariants: one allocation per 5-tuple, one owner per relay port,
//! a channel maps to one peer per allocation and back, everything expired is removed, quotas
//! hold. The shard tables rebuilt from the engine's `TableChange`s stay consistent too.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use uturn_engine::config::UserConfig;
use uturn_engine::{AllocationId, BindFailed, FiveTuple, Output, TableChange};
use uturn_proto::{
    AddressFamily, Attribute, AttributeType, ChannelNumber, EvenPort, Message, Method, RawAttribute,
};

const CLIENTS: usize = 6;
const PEERS: [&str; 6] = [
    "198.51.100.9:7000",
    "198.51.100.9:7001",
    "198.51.100.10:7000",
    "127.0.0.1:7000",
    "[2001:db8::9]:7000",
    "169.254.169.254:80",
];

#[derive(Debug, Clone)]
enum Op {
    Allocate {
        client: usize,
        shape: u8,
        lifetime: Option<u32>,
        bind_ok: Vec<bool>,
    },
    Refresh {
        client: usize,
        lifetime: Option<u32>,
    },
    CreatePermission {
        client: usize,
        peers: Vec<usize>,
    },
    ChannelBind {
        client: usize,
        channel: u16,
        peer: usize,
    },
    Advance {
        millis: u64,
    },
}

/// Mostly allowed IPv4 peers, sometimes an IPv6 or a denied one.
fn peer_index() -> impl Strategy<Value = usize> {
    prop_oneof![6 => 0..3usize, 1 => 3..PEERS.len()]
}

fn op() -> impl Strategy<Value = Op> {
    let client = 0..CLIENTS;
    prop_oneof![
        3 => (client.clone(), 0u8..6, proptest::option::of(prop_oneof![Just(0u32), Just(60), Just(1200), Just(7200)]), proptest::collection::vec(proptest::bool::weighted(0.8), 3))
            .prop_map(|(client, shape, lifetime, bind_ok)| Op::Allocate { client, shape, lifetime, bind_ok }),
        2 => (client.clone(), proptest::option::of(prop_oneof![Just(0u32), Just(60), Just(1200)]))
            .prop_map(|(client, lifetime)| Op::Refresh { client, lifetime }),
        3 => (client.clone(), proptest::collection::vec(peer_index(), 0..4))
            .prop_map(|(client, peers)| Op::CreatePermission { client, peers }),
        3 => (client, prop_oneof![Just(0x3FFFu16), 0x4000u16..0x4004, Just(0x5000)], peer_index())
            .prop_map(|(client, channel, peer)| Op::ChannelBind { client, channel, peer }),
        1 => prop_oneof![0u64..2_000, 29_000u64..31_000, 299_000u64..301_000, 599_000u64..700_000]
            .prop_map(|millis| Op::Advance { millis }),
    ]
}

/// The shard tables as the data plane would hold them.
#[derive(Default)]
struct Tables {
    allocations: HashMap<AllocationId, (FiveTuple, Vec<SocketAddr>)>,
    by_tuple: HashSet<FiveTuple>,
    relays: HashSet<SocketAddr>,
    permissions: HashSet<(AllocationId, IpAddr)>,
    channels: HashMap<(AllocationId, u16), SocketAddr>,
    peers: HashSet<(AllocationId, SocketAddr)>,
}

impl Tables {
    fn apply(&mut self, change: &TableChange) {
        match change {
            TableChange::OpenAllocation {
                alloc,
                client,
                relays,
                ..
            } => {
                assert!(
                    self.by_tuple.insert(*client),
                    "two allocations on {client:?}"
                );
                for relay in relays {
                    assert!(
                        self.relays.insert(relay.bound),
                        "relay {} owned twice",
                        relay.bound
                    );
                }
                let bound = relays.iter().map(|r| r.bound).collect();
                assert!(self.allocations.insert(*alloc, (*client, bound)).is_none());
            }
            TableChange::SetPermission { alloc, peer_ip } => {
                assert!(self.allocations.contains_key(alloc));
                assert!(
                    self.permissions.insert((*alloc, *peer_ip)),
                    "permission set twice"
                );
            }
            TableChange::RemovePermission { alloc, peer_ip } => {
                assert!(
                    self.permissions.remove(&(*alloc, *peer_ip)),
                    "unknown permission removed"
                );
            }
            TableChange::BindChannel {
                alloc,
                channel,
                peer,
            } => {
                assert!(self.allocations.contains_key(alloc));
                assert!(
                    self.channels.insert((*alloc, *channel), *peer).is_none(),
                    "channel bound twice"
                );
                assert!(
                    self.peers.insert((*alloc, *peer)),
                    "peer bound to two channels"
                );
            }
            TableChange::UnbindChannel { alloc, channel } => {
                let peer = self
                    .channels
                    .remove(&(*alloc, *channel))
                    .expect("unknown channel");
                assert!(self.peers.remove(&(*alloc, peer)));
            }
            TableChange::RemoveAllocation { alloc } => {
                let (client, relays) = self.allocations.remove(alloc).expect("unknown allocation");
                self.by_tuple.remove(&client);
                for relay in relays {
                    self.relays.remove(&relay);
                }
                self.permissions.retain(|(a, _)| a != alloc);
                self.channels.retain(|(a, _), _| a != alloc);
                self.peers.retain(|(a, _)| a != alloc);
            }
        }
    }
}

struct World {
    h: Harness,
    clients: Vec<Client>,
    tables: Tables,
}

impl World {
    fn new() -> Self {
        let mut config = config();
        config.auth.users.push(UserConfig {
            username: "bob".into(),
            password: Some("pw".into()),
            key: None,
        });
        config.relay.port_min = 50000;
        config.relay.port_max = 50015;
        config.limits.allocations_per_user = 3;
        config.limits.allocations_total = 5;
        config.limits.permissions_per_allocation = 3;
        config.limits.channels_per_allocation = 2;
        let h = Harness::with_shards(config, 2);
        let clients = (0..CLIENTS)
            .map(|n| {
                let mut client = Client::new(&format!("198.51.100.{}:{}", 1 + n % 2, 5000 + n));
                if n % 3 == 2 {
                    client.username = "bob".into();
                    client.password = "pw".into();
                }
                if n % 2 == 1 {
                    client.mode = Mode::Sha256;
                }
                client
            })
            .collect();
        Self {
            h,
            clients,
            tables: Tables::default(),
        }
    }

    fn absorb(&mut self, outputs: &[Output], client: usize) -> Vec<uturn_engine::BindToken> {
        let mut tokens = Vec::new();
        for output in outputs {
            match output {
                Output::Table { change, .. } => self.tables.apply(change),
                Output::BindRelay { token, .. } => tokens.push(*token),
                Output::Transmit { bytes, .. } => {
                    let m = Message::parse(bytes).unwrap();
                    if let Ok(Some(nonce)) = m.nonce() {
                        self.clients[client].nonce = Some(nonce.to_owned());
                    }
                }
                Output::Event(_) | Output::ReleaseHeld { .. } => {}
            }
        }
        tokens
    }

    fn send(&mut self, client: usize, method: Method, attrs: &[Attribute<'_>]) {
        if self.clients[client].nonce.is_none() {
            let bytes = self.clients[client].request(Method::ALLOCATE, 99, &[udp()]);
            let outputs = self.h.send(self.clients[client].tuple, &bytes);
            self.absorb(&outputs, client);
        }
        let tid = (self.h.now - self.h.base).as_millis() as u8;
        let bytes = self.clients[client].request(method, tid, attrs);
        let outputs = self.h.send(self.clients[client].tuple, &bytes);
        let tokens = self.absorb(&outputs, client);
        assert!(tokens.is_empty() || method == Method::ALLOCATE);
    }

    fn check(&self) {
        self.h.engine.check_invariants(self.h.now);
        assert_eq!(
            self.tables.allocations.len(),
            self.h.engine.allocation_count()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn random_request_sequences_keep_every_invariant(ops in proptest::collection::vec(op(), 1..60)) {
        let mut world = World::new();
        for op in ops {
            match op {
                Op::Allocate { client, shape, lifetime, bind_ok } => {
                    let mut attrs = vec![udp()];
                    match shape {
                        1 => attrs.push(Attribute::EvenPort(EvenPort { reserve_next: false })),
                        2 => attrs.push(Attribute::EvenPort(EvenPort { reserve_next: true })),
                        3 => attrs.push(Attribute::AdditionalAddressFamily(AddressFamily::V6)),
                        4 => attrs.push(Attribute::RequestedAddressFamily(AddressFamily::V6)),
                        _ => {}
                    }
                    if let Some(lifetime) = lifetime {
                        attrs.push(Attribute::Lifetime(lifetime));
                    }
                    if world.clients[client].nonce.is_none() {
                        world.send(client, Method::BINDING, &[]);
                    }
                    let tid = (world.h.now - world.h.base).as_millis() as u8;
                    let bytes = world.clients[client].request(Method::ALLOCATE, tid, &attrs);
                    let outputs = world.h.send(world.clients[client].tuple, &bytes);
                    let mut tokens = world.absorb(&outputs, client);
                    world.check();
                    let mut results = bind_ok.into_iter().chain(std::iter::repeat(true));
                    while let Some(token) = tokens.pop() {
                        let ok = results.next().unwrap_or(true);
                        let result = if ok { Ok(()) } else { Err(BindFailed) };
                        world.h.engine.handle_relay_bound(world.h.now, token, result);
                        let outputs = world.h.drain();
                        tokens.extend(world.absorb(&outputs, client));
                        world.check();
                    }
                }
                Op::Refresh { client, lifetime } => {
                    let attrs: Vec<_> = lifetime.map(Attribute::Lifetime).into_iter().collect();
                    world.send(client, Method::REFRESH, &attrs);
                }
                Op::CreatePermission { client, peers } => {
                    let attrs: Vec<_> = peers.iter().map(|p| Attribute::XorPeerAddress(peer(PEERS[*p]))).collect();
                    world.send(client, Method::CREATE_PERMISSION, &attrs);
                }
                Op::ChannelBind { client, channel, peer: p } => {
                    let number = match ChannelNumber::new(channel) {
                        Some(number) => Attribute::ChannelNumber(number),
                        None => {
                            let bytes: &'static [u8] = Box::leak(Box::new([(channel >> 8) as u8, channel as u8, 0, 0]));
                            Attribute::Other(RawAttribute { ty: AttributeType::CHANNEL_NUMBER, value: bytes })
                        }
                    };
                    world.send(client, Method::CHANNEL_BIND, &[number, Attribute::XorPeerAddress(peer(PEERS[p]))]);
                }
                Op::Advance { millis } => {
                    let target = world.h.now + Duration::from_millis(millis);
                    // Wake at every deadline on the way, as the shell would, then at the target.
                    while let Some(deadline) = world.h.engine.poll_timeout() {
                        if deadline > target {
                            break;
                        }
                        let outputs = world.h.run_until(deadline);
                        world.absorb(&outputs, 0);
                        world.check();
                    }
                    let outputs = world.h.run_until(target);
                    world.absorb(&outputs, 0);
                }
            }
            world.check();
        }
        // Long after everything: all gone.
        let end = world.h.now + Duration::from_secs(4000);
        let outputs = world.h.run_until(end);
        world.absorb(&outputs, 0);
        world.check();
        prop_assert_eq!(world.h.engine.allocation_count(), 0);
        prop_assert!(world.tables.allocations.is_empty() && world.tables.permissions.is_empty());
        prop_assert!(world.tables.channels.is_empty());
        prop_assert_eq!(world.h.engine.poll_timeout(), None);
    }
}
