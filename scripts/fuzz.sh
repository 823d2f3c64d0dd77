#!/usr/bin/env bash
# Runs every cargo-fuzz target of uturn for a given time each, seeded from the committed corpus
# (the test vectors and hand-written scripts), and fails if any target crashed.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]      # default 600 (10 minutes each; SECURITY.md)
#   FUZZ_TARGETS="engine" scripts/fuzz.sh 60  # a subset
#
# Targets: parse_message and stream_framer (proto/fuzz), engine (engine/fuzz: arbitrary
# request sequences from several clients against a fake clock), tls (dataplane/fuzz: byte
# streams cut at arbitrary points into a tls:// and an auto:// connection, through the
# connection code the shards run). cargo-fuzz needs nightly; when
# `cargo +nightly` is missing the script uses the stable toolchain with RUSTC_BOOTSTRAP=1,
# which works for these targets. New inputs go to fuzz/corpus-work/<target> (ignored by git);
# crashes to fuzz/artifacts/<target>/. Every crash becomes a regression test: fix it, then
# copy the input into fuzz/corpus/<target>/ (proto: name it *.invalid.bin if it must be
# refused), where `cargo test` replays it (proto/tests/fuzz_corpus.rs,
# engine/tests/fuzz_corpus.rs, dataplane/src/fuzzing.rs).
set -euo pipefail

seconds="${1:-600}"
root="$(cd "$(dirname "$0")/.." && pwd)"
targets="${FUZZ_TARGETS:-parse_message stream_framer engine tls}"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$root/target-fuzz}"

if ! command -v cargo-fuzz >/dev/null; then
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
    exit 2
fi
if cargo +nightly --version >/dev/null 2>&1; then
    cargo=(cargo +nightly)
else
    echo "no nightly toolchain: using stable with RUSTC_BOOTSTRAP=1" >&2
    export RUSTC_BOOTSTRAP=1
    cargo=(cargo)
fi

failed=0
for target in $targets; do
    case "$target" in
        parse_message | stream_framer) crate="$root/proto" ;;
        engine) crate="$root/engine" ;;
        tls) crate="$root/dataplane" ;;
        *) echo "unknown target $target" >&2; exit 2 ;;
    esac
    seeds="$crate/fuzz/corpus/$target"
    work="$crate/fuzz/corpus-work/$target"
    mkdir -p "$work"
    echo "== $target: $seconds s, seeds from ${seeds#"$root"/}"
    log="$(mktemp)"
    if ! (cd "$crate" && "${cargo[@]}" fuzz run "$target" "$work" "$seeds" -- \
        -max_total_time="$seconds" -print_final_stats=1 -max_len=4096) >"$log" 2>&1; then
        failed=1
        echo "!! $target crashed; inputs in ${crate#"$root"/}/fuzz/artifacts/$target/" >&2
    fi
    grep -E "stat::number_of_executed_units|stat::peak_rss_mb|Done [0-9]+ runs" "$log" || true
    tail -n 3 "$log"
    rm -f "$log"
done
exit "$failed"
