#!/usr/bin/env bash
# Third-party WebRTC stack end to end: aiortc/aioice (PyPI, pinned in
# scripts/aiortc/requirements.txt, installed into scripts/aiortc/.venv) makes relay-only calls
# between two peers through uturn on loopback (scripts/aiortc/relay_call.py):
#   udp        TURN over UDP, long-term credentials
#   tcp        TURN over TCP, long-term credentials
#   rest-udp   TURN over UDP, TURN REST (shared-secret) credentials
#   rest-tcp   TURN over TCP, TURN REST credentials
# Each asserts: N data-channel messages each way in order; only relay candidates gathered; the
# nominated pair relay -> relay on both sides, each remote end the other side's relayed address;
# uturn's allocations API lists both relayed addresses under the user and transport, with
# packets counted each way.
#
# Usage: scripts/aiortc-e2e.sh [--keep-logs] [SCENARIO...]
# Env:   UTURN_BIN (default: release build of this checkout, built if unset).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

keep_logs=0
only=()
while [ $# -gt 0 ]; do
  case "$1" in
    --keep-logs) keep_logs=1; shift ;;
    udp|tcp|rest-udp|rest-tcp) only+=("$1"); shift ;;
    *) echo "usage: $0 [--keep-logs] [udp|tcp|rest-udp|rest-tcp ...]" >&2; exit 2 ;;
  esac
done

venv=scripts/aiortc/.venv
requirements=scripts/aiortc/requirements.txt
if ! cmp -s "$requirements" "$venv/installed-requirements.txt" 2>/dev/null; then
  echo "creating $venv with $requirements"
  rm -rf "$venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    echo "installing Debian package python3-venv"
    rm -rf "$venv"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/installed-requirements.txt"
fi

# shellcheck source=scripts/lib/uturn-ready.sh
. "$root/scripts/lib/uturn-ready.sh"
prepare_uturn_run

secret="aiortc-e2e-shared-secret"
password="aiortc-e2e-password"
# Counters published every 200 ms so that the allocations API shows packets during a call of
# a second or two.
cat >"$work/uturn.toml" <<TOML
[ops]
counters_interval_ms = 200
TOML

# Relay ports below Linux's ephemeral range (32768-60999): a relay bind that collides with some
# client's ephemeral port would fail and, after eight tries, answer 508. Each CI script has its
# own range (tests 20000-31999, browser 10000-11999, interop 12000-15999, aiortc 16000-16999,
# soak 17000-18999).
"$bin" --config "$work/uturn.toml" \
  --listen udp://127.0.0.1:0 --listen tcp://127.0.0.1:0 --relay-ip 127.0.0.1 --ports "${PORTS:-16000-16999}" \
  --realm aiortc-e2e.test --auth-secret "$secret" \
  --user "aiortc-udp:$password" --user "aiortc-tcp:$password" \
  --http 127.0.0.1:0 >"$work/uturn.out" 2>"$work/uturn.log" &
uturn_pid=$!

# Readiness and OS-assigned ports from uturn's "listening on ..." / "uturn is ready" lines
# (bounded: 20 s).
wait_for_uturn "$uturn_pid"

status=0
timeout 300 "$venv/bin/python" "$root/scripts/aiortc/relay_call.py" \
  --udp-port "$(port udp)" --tcp-port "$(port tcp)" --http "$(addr http)" \
  --password "$password" --secret "$secret" "${only[@]}" 2>"$work/python.log" || status=$?
if [ "$status" -ne 0 ]; then
  echo "aiortc-e2e: FAILED (status $status); Python's standard error:" >&2
  tail -60 "$work/python.log" >&2
  echo "--- uturn log (last 80 lines):" >&2
  tail -80 "$work/uturn.log" >&2
  exit 1
fi
echo "aiortc-e2e: all scenarios passed"
