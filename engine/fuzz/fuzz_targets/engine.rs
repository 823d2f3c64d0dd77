//! Fuzz the sans-IO engine with scripted request sequences from several clients against a
//! fake clock; the logic lives in `uturn_engine::fuzzing::engine` so
//! `engine/tests/fuzz_corpus.rs` replays the corpus on stable. Run: `scripts/fuzz.sh`.
#![no_main]

use std::sync::OnceLock;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let _ = uturn_engine::fuzzing::engine(data, *BASE.get_or_init(Instant::now));
});
