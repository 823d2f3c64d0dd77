//! The engine fuzz harness, shared by the cargo-fuzz target `engine` (`engine/fuzz/`) and the
//! stable test `engine/tests/fuzz_corpus.rs`, which replays the corpus on every `cargo test`.
//!
//! The input is a script: arbitrary request sequences from four clients (UDP over IPv4 and
//! IPv6, TCP, an IPv4-mapped source) against a fake clock. Each step is one opcode byte and
//! its operands, read through a cursor that yields zeros once the input runs out:
//! raw datagrams, authenticated requests built with the nonce the engine last issued to that
//! client (so the fuzzer gets past authentication), mutated requests, clock jumps, relay bind
//! results, connection closes, policy reloads, operator deletes and drain. After every step
//! the outputs are drained and [`Engine::check_invariants`] runs. Nothing here reads the
//! clock: the caller passes the starting instant.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use rand::SeedableRng;
use uturn_proto::{Attribute, ChannelNumber, Class, Message, MessageBuilder, Method, Protocol};

use crate::config::UserConfig;
use crate::{
    AllocationId, BindFailed, BindToken, Engine, EngineConfig, FiveTuple, Output, PeerPolicy,
    ShardId, Transport, UserTable,
};

const REALM: &str = "fuzz";
const USER: &str = "alice";
const PASSWORD: &str = "secret";
/// Steps per input, so one input cannot run for ever.
const STEPS_MAX: usize = 256;

/// Peers the scripted requests pick from: ordinary, denied in every form, private, and the
/// relay's own addresses.
const PEERS: [&str; 12] = [
    "203.0.113.9:4000",
    "[2001:db8:9::9]:4000",
    "127.0.0.1:22",
    "[::ffff:127.0.0.1]:80",
    "169.254.169.254:80",
    "[64:ff9b::a9fe:a9fe]:80",
    "10.1.2.3:4000",
    "0.0.0.0:1",
    "198.51.100.5:50001",
    "198.51.100.5:22",
    "[2001:db8::5]:50002",
    "224.0.0.1:5353",
];

/// Runs one script (see the module doc) and returns how many allocations it opened (so tests
/// can check the scripts get past authentication). Panics only when the engine breaks an
/// invariant.
pub fn engine(data: &[u8], base: Instant) -> usize {
    let mut config = EngineConfig::default();
    config.auth.realm = REALM.into();
    config.auth.users = vec![UserConfig {
        username: USER.into(),
        password: Some(PASSWORD.into()),
        key: None,
    }];
    config.relay.relay_ips = vec![
        "198.51.100.5"
            .parse()
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into()),
        "2001:db8::5"
            .parse()
            .unwrap_or(std::net::Ipv6Addr::LOCALHOST.into()),
    ];
    // A small range, so port exhaustion (508) is reachable.
    config.relay.port_min = 50000;
    config.relay.port_max = 50015;
    config.limits.allocations_per_user = 6;
    config.limits.permissions_per_allocation = 4;
    config.limits.channels_per_allocation = 4;
    config.limits.unauthenticated_burst = 40;
    config.limits.auth_failures_per_source_burst = 8;
    config.limits.rate_limit_slots = 8;
    let Ok(users) = UserTable::from_users(&config.auth.realm, &config.auth.users) else {
        return 0;
    };
    let rng = rand::rngs::SmallRng::seed_from_u64(u64::from(data.first().copied().unwrap_or(0)));
    let Ok(mut engine) = Engine::new(&config, users, 2, base, rng) else {
        return 0;
    };
    let Ok(key) = uturn_proto::long_term_key_md5(USER, REALM, PASSWORD) else {
        return 0;
    };
    let mut opened = 0usize;
    let server: SocketAddr = SocketAddr::from(([192, 0, 2, 1], 3478));
    let clients = [
        (Transport::Udp, SocketAddr::from(([203, 0, 113, 1], 5000))),
        (
            Transport::Udp,
            SocketAddr::new("2001:db8:1::1".parse().unwrap_or([0u16; 8].into()), 5000),
        ),
        (Transport::Tcp, SocketAddr::from(([203, 0, 113, 2], 6000))),
        (
            Transport::Udp,
            SocketAddr::new(
                "::ffff:203.0.113.3".parse().unwrap_or([0u16; 8].into()),
                7000,
            ),
        ),
    ]
    .map(|(transport, client)| FiveTuple {
        transport,
        client,
        server,
    });
    let mut nonces: [Option<String>; 4] = Default::default();
    let mut pending: Vec<BindToken> = Vec::new();
    let mut allocations: Vec<AllocationId> = Vec::new();
    let mut now = base;
    let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
    let mut cursor = Cursor { data, at: 1 };
    let mut tid: u32 = 0;

    for _ in 0..STEPS_MAX {
        if cursor.done() {
            break;
        }
        let op = cursor.byte();
        let c = usize::from(cursor.byte() % 4);
        let shard = ShardId(u16::from(c == 1));
        match op % 9 {
            0 => {
                let len = usize::from(cursor.byte());
                let bytes = cursor.take(len);
                engine.handle_message(now, wall, shard, clients[c], bytes);
            }
            1 | 2 | 8 => {
                tid = tid.wrapping_add(1);
                let mut bytes = request(&mut cursor, tid, nonces[c].as_deref(), &key);
                if op % 9 == 8 && !bytes.is_empty() {
                    // A mutated request: one byte flipped.
                    let at = usize::from(cursor.byte()) % bytes.len();
                    bytes[at] ^= cursor.byte() | 1;
                }
                engine.handle_message(now, wall, shard, clients[c], &bytes);
            }
            3 => {
                now += Duration::from_secs(u64::from(cursor.byte()) * 4);
                engine.handle_timeout(now);
            }
            4 => {
                if !pending.is_empty() {
                    let token = pending.remove(usize::from(cursor.byte()) % pending.len());
                    let result = if cursor.byte() % 4 == 0 {
                        Err(BindFailed)
                    } else {
                        Ok(())
                    };
                    engine.handle_relay_bound(now, token, result);
                }
            }
            5 => engine.handle_connection_closed(now, clients[c]),
            6 => {
                let mut reloaded = config.clone();
                if cursor.byte() % 2 == 0 {
                    reloaded.peers.allowed_peers = vec![
                        "10.0.0.0/8"
                            .parse()
                            .unwrap_or_else(|_| unreachable!("literal")),
                    ];
                }
                engine.set_peer_policy(PeerPolicy::from_config(&reloaded));
            }
            _ => {
                if cursor.byte() % 2 == 0 {
                    if let Some(alloc) =
                        allocations.get(usize::from(cursor.byte()) % allocations.len().max(1))
                    {
                        engine.delete_allocation(now, *alloc);
                    }
                } else {
                    engine.set_draining(!engine.is_draining());
                }
            }
        }
        while let Some(output) = engine.poll_output() {
            match output {
                Output::BindRelay { token, .. } => pending.push(token),
                Output::Transmit { to, bytes, .. } => {
                    if let Some(i) = clients.iter().position(|t| *t == to)
                        && let Ok(message) = Message::parse(&bytes)
                        && let Ok(Some(nonce)) = message.nonce()
                    {
                        nonces[i] = Some(nonce.to_owned());
                    }
                }
                Output::Table {
                    change: crate::TableChange::OpenAllocation { alloc, .. },
                    ..
                } => {
                    opened += 1;
                    allocations.push(alloc);
                }
                _ => {}
            }
        }
        // Keep the scripted state bounded too.
        pending.truncate(64);
        if allocations.len() > 64 {
            allocations.drain(..32);
        }
        engine.check_invariants(now);
    }
    opened
}

/// An authenticated request (when a nonce is known) whose method and attributes come from the
/// input.
fn request(cursor: &mut Cursor<'_>, tid: u32, nonce: Option<&str>, key: &[u8]) -> Vec<u8> {
    let method = [
        Method::ALLOCATE,
        Method::REFRESH,
        Method::CREATE_PERMISSION,
        Method::CHANNEL_BIND,
        Method::BINDING,
    ][usize::from(cursor.byte()) % 5];
    let mut transaction = [0u8; 12];
    transaction[..4].copy_from_slice(&tid.to_be_bytes());
    let mut buf = [0u8; 512];
    let mut b = MessageBuilder::new(
        &mut buf,
        Class::Request,
        method,
        uturn_proto::TransactionId(transaction),
    );
    let flags = cursor.byte();
    let peer: SocketAddr = PEERS[usize::from(cursor.byte()) % PEERS.len()]
        .parse()
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    if method == Method::ALLOCATE && flags & 1 == 0 {
        let _ = b.attribute(&Attribute::RequestedTransport(Protocol::UDP));
    }
    if flags & 2 != 0 {
        let _ = b.attribute(&Attribute::Lifetime(u32::from(cursor.byte()) * 30));
    }
    if flags & 4 != 0 || matches!(method, Method::CREATE_PERMISSION | Method::CHANNEL_BIND) {
        let _ = b.attribute(&Attribute::XorPeerAddress(peer));
    }
    if flags & 8 != 0 || method == Method::CHANNEL_BIND {
        let number = 0x4000 + u16::from(cursor.byte() % 8) + u16::from(flags & 0x80) * 0x40;
        if let Some(channel) = ChannelNumber::new(number) {
            let _ = b.attribute(&Attribute::ChannelNumber(channel));
        }
    }
    if flags & 16 != 0 {
        let family = if flags & 32 != 0 {
            uturn_proto::AddressFamily::V6
        } else {
            uturn_proto::AddressFamily::V4
        };
        let _ = b.attribute(&Attribute::RequestedAddressFamily(family));
    }
    if let Some(nonce) = nonce
        && flags & 64 == 0
    {
        let _ = b.attribute(&Attribute::Username(USER));
        let _ = b.attribute(&Attribute::Realm(REALM));
        let _ = b.attribute(&Attribute::Nonce(nonce));
        let _ = b.message_integrity(key);
    }
    let len = b.finish();
    buf[..len].to_vec()
}

/// Reads the script; past the end every read is zero.
struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn done(&self) -> bool {
        self.at >= self.data.len()
    }

    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at = self.at.saturating_add(1);
        b
    }

    fn take(&mut self, len: usize) -> &'a [u8] {
        let start = self.at.min(self.data.len());
        let end = start.saturating_add(len).min(self.data.len());
        self.at = self.at.saturating_add(len);
        &self.data[start..end]
    }
}
