//! Fuzz a stream connection as a shard runs it: arbitrary bytes, cut into reads at arbitrary
//! points (the first two input bytes seed the cuts), into a `tls://` and an `auto://`
//! connection. The logic lives in `uturn_dataplane::fuzzing::tls`, so the unit test
//! `fuzzing::tests::every_tls_corpus_seed_survives_both_connections` replays the corpus on
//! stable. Run: `scripts/fuzz.sh` (or `FUZZ_TARGETS=tls scripts/fuzz.sh 600`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = uturn_dataplane::fuzzing::tls(data);
});
