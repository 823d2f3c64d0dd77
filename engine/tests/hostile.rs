//! Hostile input: arbitrary datagrams and mutated requests pushed through the public API never
//! panic the engine or break its invariants; and the engine source never reads the clock.

mod common;

use common::*;
use proptest::prelude::*;
use uturn_proto::{Attribute, ChannelNumber, Method};

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_datagrams_never_panic_the_engine(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut h = Harness::new(config());
        let client = Client::new("198.51.100.1:5000");
        let _ = h.send(client.tuple, &bytes);
        h.engine.check_invariants(h.now);
    }

    /// Valid authenticated requests with one byte flipped: each is answered or dropped, and
    /// the engine stays consistent.
    #[test]
    fn mutated_authenticated_requests_never_panic_the_engine(
        method in 0usize..4,
        position in any::<proptest::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let mut h = Harness::new(config());
        let mut client = Client::new("198.51.100.1:5000");
        h.allocate(&mut client, 1, &[]);
        let p = peer("198.51.100.9:7000");
        let channel = Attribute::ChannelNumber(ChannelNumber::new(0x4000).unwrap());
        let (method, attrs) = [
            (Method::ALLOCATE, vec![udp()]),
            (Method::REFRESH, vec![Attribute::Lifetime(0)]),
            (Method::CREATE_PERMISSION, vec![Attribute::XorPeerAddress(p)]),
            (Method::CHANNEL_BIND, vec![channel, Attribute::XorPeerAddress(p)]),
        ][method].clone();
        let mut bytes = client.request(method, 7, &attrs);
        let index = position.index(bytes.len());
        bytes[index] ^= flip;
        let _ = h.send(client.tuple, &bytes);
        h.engine.check_invariants(h.now);
    }
}

/// The engine is sans-IO: no clock reads, no sockets, no threads, no locks in its source.
#[test]
fn the_engine_source_reads_no_clock_and_does_no_io() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
    let banned = [
        "Instant::now()",
        "SystemTime::now()",
        "std::net::UdpSocket",
        "std::thread",
        "Mutex",
        "Arc<",
        "todo!(",
        "unimplemented!(",
    ];
    // The whole engine crate; the control thread and the binary (uturn-control) may do I/O.
    let files = [
        "lib.rs",
        "config.rs",
        "map.rs",
        "ratelimit.rs",
        "engine.rs",
        "allocation.rs",
        "auth/mod.rs",
        "auth/nonce.rs",
        "auth/credentials.rs",
        "ports.rs",
        "policy.rs",
        "timers.rs",
    ];
    let mut checked = 0;
    for file in files {
        let path = std::path::Path::new(dir).join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (number, line) in code.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for word in banned {
                assert!(
                    !line.contains(word),
                    "{}:{}: {word}",
                    path.display(),
                    number + 1
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} source files checked");
}
