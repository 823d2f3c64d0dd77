# Sourced by the real-client scripts: picks the uturn binary, makes the run's work directory
# and its clean-up, waits for a uturn started in the background with its stdout in
# "$work/uturn.out" and stderr in "$work/uturn.log", and reads the OS-assigned addresses from
# its own "listening on KIND ADDR" lines.

# Sets `bin` (UTURN_BIN, else a release build of this checkout), `work` (a new temporary
# directory) and `uturn_pid` (empty until the caller starts uturn), and an EXIT trap that stops
# uturn and removes `work` unless `keep_logs` is 1.
prepare_uturn_run() {
  bin="${UTURN_BIN:-}"
  if [ -z "$bin" ]; then
    cargo build --release -p uturn-control --bin uturn
    bin="${CARGO_TARGET_DIR:-target}/release/uturn"
  fi
  work=$(mktemp -d)
  uturn_pid=
  trap cleanup_uturn_run EXIT
}

cleanup_uturn_run() {
  if [ -n "$uturn_pid" ]; then kill "$uturn_pid" 2>/dev/null || true; wait "$uturn_pid" 2>/dev/null || true; fi
  if [ "$keep_logs" = 1 ]; then echo "logs kept in $work"; else rm -rf "$work"; fi
}

# Waits (bounded: 20 s) until uturn PID prints "uturn is ready"; on failure prints its output
# and exits the calling script.
wait_for_uturn() { # PID
  local i
  for i in $(seq 1 200); do
    grep -q '^uturn is ready' "$work/uturn.out" && return 0
    kill -0 "$1" 2>/dev/null || break
    sleep 0.1
  done
  echo "FAIL: uturn did not become ready" >&2
  cat "$work/uturn.out" "$work/uturn.log" >&2
  exit 1
}

# The address of uturn's first listener of KIND (udp, tcp, tls, auto, http).
addr() { sed -n "s/^listening on $1 //p" "$work/uturn.out" | head -1; }
# Its port.
port() { addr "$1" | sed 's/.*://'; }
