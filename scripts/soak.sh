#!/usr/bin/env bash
# Soak test: runs uturn under churn and audio-like load for a given time, then checks that every
# allocation expired, no unexpected error counter moved, and resident memory came back within
# 5% of its level after a warm-up cycle (tests/examples/soak.rs has the details).
#
#   scripts/soak.sh [SECONDS]     # default 1800 (30 minutes); CI runs 60
#
# The load is uturn's own loop in tests/examples/soak.rs (the bench crate's CLI is not used
# yet). Everything runs on loopback.
set -euo pipefail

seconds="${1:-1800}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cargo build --release -p uturn-control --bin uturn
target="${CARGO_TARGET_DIR:-$root/target}"
UTURN_BIN="$target/release/uturn" \
    cargo run --release -p uturn-e2e --example soak -- "$seconds"
