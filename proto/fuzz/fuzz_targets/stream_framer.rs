//! Fuzz the TCP/TLS stream framer; the first input byte picks the chunk size. The logic lives
//! in `uturn_proto::fuzzing::stream_framer`. Run: `cargo +nightly fuzz run stream_framer`
//! from `proto/`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    uturn_proto::fuzzing::stream_framer(data);
});
