//! Fuzz every datagram decoder of uturn-proto; the logic lives in
//! `uturn_proto::fuzzing::parse_message` so `proto/tests/fuzz_corpus.rs` replays the corpus on
//! stable. Run: `cargo +nightly fuzz run parse_message` from `proto/`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    uturn_proto::fuzzing::parse_message(data);
});
