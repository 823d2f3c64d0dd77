//! Engine throughput on one core.
//!
//! - `allocate_handshake`: a full authenticated Allocate: the unauthenticated Allocate answered
//!   401 with a nonce, the authenticated Allocate (MESSAGE-INTEGRITY, static user) answered with
//!   `BindRelay`, then `handle_relay_bound(Ok)` producing OpenAllocation, events and the signed
//!   success response; every output drained. Only engine time is measured: the client's
//!   request building (and its HMAC) happens outside the timed sections; the `Instant::now`
//!   calls around the three engine sections are included. Each batch uses 1,000 new client
//!   5-tuples; between batches (untimed) the clock jumps an hour and `handle_timeout` expires
//!   them, so the engine never fills up.
//! - `permission_and_channel`: on an existing allocation, a CreatePermission for a new peer IP
//!   and a ChannelBind of a new channel to that peer, each installing table entries; one
//!   iteration is both requests. Allocations are set up untimed in a fresh engine per batch.

// A base instant (and, in the benchmark, timing) comes from the real clock here; the engine
// under test takes it as an input and never reads it (clippy.toml).
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use uturn_engine::config::UserConfig;
use uturn_engine::{Engine, EngineConfig, FiveTuple, Output, ShardId, Transport, UserTable};
use uturn_proto::{
    Attribute, ChannelNumber, Class, Message, MessageBuilder, Method, Protocol, TransactionId,
};

const BATCH: u64 = 1000;

fn config() -> EngineConfig {
    let mut config = EngineConfig::default();
    config.auth.users = vec![UserConfig {
        username: "alice".into(),
        password: Some("secret".into()),
        key: None,
    }];
    config.relay.relay_ips = vec!["10.0.0.5".parse().unwrap()];
    config
}

fn engine(now: Instant) -> Engine<SmallRng> {
    let config = config();
    let users = UserTable::from_users(&config.auth.realm, &config.auth.users).unwrap();
    Engine::new(&config, users, 1, now, SmallRng::seed_from_u64(7)).unwrap()
}

fn tuple(n: u64) -> FiveTuple {
    FiveTuple {
        transport: Transport::Udp,
        // One source address per client (198.18.0.0/15, the benchmarking range): clients that
        // shared one would meet the per-source budget of unauthenticated answers after the
        // first hundred, and the bench would measure refusals instead of handshakes.
        client: std::net::SocketAddr::new(
            std::net::Ipv4Addr::from(0xC612_0000u32 + (n & 0x1_ffff) as u32).into(),
            40_000 + (n >> 17) as u16,
        ),
        server: "192.0.2.1:3478".parse().unwrap(),
    }
}

fn tid(n: u64, salt: u8) -> TransactionId {
    let mut id = [salt; 12];
    id[..8].copy_from_slice(&n.to_be_bytes());
    TransactionId(id)
}

fn request(
    method: Method,
    id: TransactionId,
    attrs: &[Attribute<'_>],
    nonce: Option<&str>,
    key: &[u8],
) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    let mut b = MessageBuilder::new(&mut buf, Class::Request, method, id);
    for attr in attrs {
        b.attribute(attr).unwrap();
    }
    if let Some(nonce) = nonce {
        b.attribute(&Attribute::Username("alice")).unwrap();
        b.attribute(&Attribute::Realm("uturn")).unwrap();
        b.attribute(&Attribute::Nonce(nonce)).unwrap();
        b.message_integrity(key).unwrap();
    }
    let len = b.finish();
    buf.truncate(len);
    buf
}

fn nonce_of(outputs: &mut Vec<Output>) -> String {
    for output in outputs.drain(..) {
        if let Output::Transmit { bytes, .. } = output {
            return Message::parse(&bytes)
                .unwrap()
                .nonce()
                .unwrap()
                .unwrap()
                .to_owned();
        }
    }
    panic!("no response")
}

fn allocate_handshake(c: &mut Criterion) {
    let key = uturn_proto::long_term_key_md5("alice", "uturn", "secret").unwrap();
    let udp = [Attribute::RequestedTransport(Protocol::UDP)];
    let wall = SystemTime::now();
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(1));
    group.bench_function("allocate_handshake", |b| {
        b.iter_custom(|iterations| {
            let mut now = Instant::now();
            let mut engine = engine(now);
            let mut total = Duration::ZERO;
            let mut outputs = Vec::with_capacity(8);
            let mut n = 0u64;
            while n < iterations {
                let count = BATCH.min(iterations - n);
                for _ in 0..count {
                    let client = tuple(n);
                    let challenge = request(Method::ALLOCATE, tid(n, 1), &udp, None, &key);
                    let start = Instant::now();
                    engine.handle_message(now, wall, ShardId(0), client, &challenge);
                    while let Some(o) = engine.poll_output() {
                        outputs.push(o);
                    }
                    total += start.elapsed();
                    let nonce = nonce_of(&mut outputs);
                    let allocate = request(Method::ALLOCATE, tid(n, 2), &udp, Some(&nonce), &key);
                    let start = Instant::now();
                    engine.handle_message(now, wall, ShardId(0), client, &allocate);
                    let mut token = None;
                    while let Some(o) = engine.poll_output() {
                        if let Output::BindRelay { token: t, .. } = o {
                            token = Some(t);
                        }
                    }
                    engine.handle_relay_bound(now, token.unwrap(), Ok(()));
                    while let Some(o) = engine.poll_output() {
                        black_box(o);
                    }
                    total += start.elapsed();
                    n += 1;
                }
                assert_eq!(engine.allocation_count() as u64, count);
                now += Duration::from_secs(3601);
                engine.handle_timeout(now);
                while engine.poll_output().is_some() {}
            }
            total
        });
    });
    group.finish();
}

fn permission_and_channel(c: &mut Criterion) {
    let key = uturn_proto::long_term_key_md5("alice", "uturn", "secret").unwrap();
    let udp = [Attribute::RequestedTransport(Protocol::UDP)];
    let wall = SystemTime::now();
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(1));
    group.bench_function("permission_and_channel", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            let mut n = 0u64;
            while n < iterations {
                let count = BATCH.min(iterations - n);
                let now = Instant::now();
                let mut engine = engine(now);
                let mut requests = Vec::with_capacity(count as usize);
                for i in 0..count {
                    let client = tuple(i);
                    let challenge = request(Method::ALLOCATE, tid(i, 1), &udp, None, &key);
                    engine.handle_message(now, wall, ShardId(0), client, &challenge);
                    let mut outputs: Vec<Output> =
                        std::iter::from_fn(|| engine.poll_output()).collect();
                    let nonce = nonce_of(&mut outputs);
                    let allocate = request(Method::ALLOCATE, tid(i, 2), &udp, Some(&nonce), &key);
                    engine.handle_message(now, wall, ShardId(0), client, &allocate);
                    let token = std::iter::from_fn(|| engine.poll_output())
                        .find_map(|o| match o {
                            Output::BindRelay { token, .. } => Some(token),
                            _ => None,
                        })
                        .unwrap();
                    engine.handle_relay_bound(now, token, Ok(()));
                    while engine.poll_output().is_some() {}
                    let peer = std::net::SocketAddr::new(
                        std::net::Ipv4Addr::from(0xCB00_7100u32 + i as u32).into(),
                        7000,
                    );
                    let permission = request(
                        Method::CREATE_PERMISSION,
                        tid(i, 3),
                        &[Attribute::XorPeerAddress(peer)],
                        Some(&nonce),
                        &key,
                    );
                    let channel = Attribute::ChannelNumber(ChannelNumber::new(0x4000).unwrap());
                    let bind = request(
                        Method::CHANNEL_BIND,
                        tid(i, 4),
                        &[channel, Attribute::XorPeerAddress(peer)],
                        Some(&nonce),
                        &key,
                    );
                    requests.push((client, permission, bind));
                }
                let start = Instant::now();
                for (client, permission, bind) in &requests {
                    engine.handle_message(now, wall, ShardId(0), *client, permission);
                    while let Some(o) = engine.poll_output() {
                        black_box(o);
                    }
                    engine.handle_message(now, wall, ShardId(0), *client, bind);
                    while let Some(o) = engine.poll_output() {
                        black_box(o);
                    }
                }
                total += start.elapsed();
                n += count;
            }
            total
        });
    });
    group.finish();
}

criterion_group!(benches, allocate_handshake, permission_and_channel);
criterion_main!(benches);
