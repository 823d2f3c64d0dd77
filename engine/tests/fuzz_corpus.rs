//! Replays the engine fuzz corpus (`engine/fuzz/corpus/engine/`) through the shared harness
//! on the stable toolchain, so CI covers it without cargo-fuzz, plus random scripts. Every
//! crash a fuzzing run finds is added to the corpus and so becomes a regression test here.

// A base instant (and, in the benchmark, timing) comes from the real clock here; the engine
// under test takes it as an input and never reads it (clippy.toml).
#![allow(clippy::disallowed_methods)]

use std::path::Path;
use std::time::Instant;

use proptest::prelude::*;

#[test]
fn every_engine_corpus_script_runs_without_breaking_an_invariant() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/engine");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "seed corpus in {}", dir.display());
    let base = Instant::now();
    let mut opened = 0;
    for file in files {
        let data = std::fs::read(&file).unwrap();
        opened += uturn_engine::fuzzing::engine(&data, base);
    }
    // The seeds authenticate with the nonce the engine issued, so they reach allocations.
    assert!(opened >= 4, "{opened} allocations opened by the seeds");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_engine_scripts_never_break_an_invariant(
        data in proptest::collection::vec(any::<u8>(), 0..400)
    ) {
        let _ = uturn_engine::fuzzing::engine(&data, Instant::now());
    }
}
