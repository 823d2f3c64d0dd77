#!/usr/bin/env bash
# Real browser end to end: headless Chromium (Debian's package, driven by playwright-core from
# scripts/browser/) makes relay-only WebRTC calls between two RTCPeerConnections of one page
# through uturn, on loopback. Scenarios (scripts/browser/e2e.mjs):
#   udp    turn:127.0.0.1:PORT?transport=udp, long-term credentials
#   tcp    turn:127.0.0.1:PORT?transport=tcp
#   tls    turns:localhost:PORT?transport=tcp, certificate from a test CA in the browser's NSS db
#   rest   UDP with TURN REST (shared-secret) credentials
# Each asserts: N data-channel messages each way arrived in order; audio and video RTP packets
# received on both sides (getStats); the selected candidate pair is relay/relay on both sides
# over the scenario's transport; uturn's /api/v1/allocations lists both allocations (by the
# selected relayed addresses) and their packet counters grow each way between two reads; and,
# during the call, uturn's relay-usage page (GET / on the HTTP listener) opened in a second tab
# asks for the admin token, lists both allocations and shows their counters grow each way
# between two of its refreshes, with no script or Content-Security-Policy error; a screenshot of
# it is saved as $OUT/console-SCENARIO.png (OUT defaults to target/) and its path printed.
#   hints  two allocations made before the calls show the page's hints for real: one never
#          given a permission (a relay-only RTCPeerConnection with no remote side) gets "no
#          permission after N s"; one whose only remote candidate is that first allocation's
#          relayed address sends checks that never come back (uturn drops them at the allocation
#          without a permission) and gets "the peer's packets do not reach the relay: is the
#          relay port range open in the firewall?"; the idle-channel hint is checked on the
#          page's own logic (screenshot $OUT/console-hints.png).
#
# Usage: scripts/browser-e2e.sh [--keep-logs] [SCENARIO...]
# Env:   UTURN_BIN (default: release build of this checkout, built if unset).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

keep_logs=0
only=()
while [ $# -gt 0 ]; do
  case "$1" in
    --keep-logs) keep_logs=1; shift ;;
    udp|tcp|tls|rest|hints) only+=("$1"); shift ;;
    *) echo "usage: $0 [--keep-logs] [udp|tcp|tls|rest|hints ...]" >&2; exit 2 ;;
  esac
done

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v certutil >/dev/null 2>&1 || missing+=(libnss3-tools)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v node >/dev/null 2>&1 || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# playwright-core only (no browser download: it drives /usr/bin/chromium).
if [ ! -d scripts/browser/node_modules/playwright-core ]; then
  (cd scripts/browser && npm ci --no-audit --no-fund)
fi

# shellcheck source=scripts/lib/uturn-ready.sh
. "$root/scripts/lib/uturn-ready.sh"
prepare_uturn_run

# A test CA and a server certificate for "localhost" signed by it, made for this run only.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=uturn browser-e2e test CA" -addext basicConstraints=critical,CA:TRUE \
  -addext keyUsage=critical,keyCertSign,cRLSign \
  -keyout "$work/ca-key.pem" -out "$work/ca.pem" >/dev/null 2>&1
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
  -keyout "$work/key.pem" -out "$work/server.csr" >/dev/null 2>&1
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' >"$work/ext.cnf"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca-key.pem" \
  -CAcreateserial -days 1 -extfile "$work/ext.cnf" -out "$work/cert.pem" >/dev/null 2>&1

# Chromium on Linux takes user-added trust anchors from the NSS database in $HOME/.pki/nssdb:
# the browser runs with a throwaway HOME whose database trusts the test CA for TLS servers.
export HOME="$work/home"
mkdir -p "$HOME/.pki/nssdb"
certutil -d "sql:$HOME/.pki/nssdb" -N --empty-password
certutil -d "sql:$HOME/.pki/nssdb" -A -n "uturn browser-e2e test CA" -t "C,," -i "$work/ca.pem"

secret="browser-e2e-shared-secret"
password="browser-e2e-password"
# The admin API behind a token, as on a server whose listener is not on loopback: the
# relay-usage page must ask for it and send it.
http_token=$(openssl rand -hex 16)
shots="${OUT:-${CARGO_TARGET_DIR:-$root/target}}"
# Counters published every 200 ms so that two reads of the allocations API during a call of a
# few seconds see them move.
cat >"$work/uturn.toml" <<TOML
[ops]
counters_interval_ms = 200
http_token = "$http_token"
TOML

# Relay ports below Linux's ephemeral range (32768-60999): a relay bind that collides with some
# client's ephemeral port would fail and, after eight tries, answer 508. Each CI script has its
# own range (tests 20000-31999, browser 10000-11999, interop 12000-15999, aiortc 16000-16999,
# soak 17000-18999).
"$bin" --config "$work/uturn.toml" \
  --listen udp://127.0.0.1:0 --listen tcp://127.0.0.1:0 --listen tls://127.0.0.1:0 \
  --tls-cert "$work/cert.pem" --tls-key "$work/key.pem" --relay-ip 127.0.0.1 --ports "${PORTS:-10000-11999}" \
  --realm browser-e2e.test --auth-secret "$secret" \
  --user "chrome-udp:$password" --user "chrome-tcp:$password" --user "chrome-tls:$password" \
  --user "chrome-idle:$password" --user "chrome-oneway:$password" \
  --http 127.0.0.1:0 >"$work/uturn.out" 2>"$work/uturn.log" &
uturn_pid=$!

# Readiness and OS-assigned ports from uturn's own "listening on ..." / "uturn is ready" lines
# (bounded: 20 s).
wait_for_uturn "$uturn_pid"

only_json=null
if [ ${#only[@]} -gt 0 ]; then only_json=$(printf '"%s",' "${only[@]}"); only_json="[${only_json%,}]"; fi
mkdir -p "$work/profile"
cat >"$work/config.json" <<JSON
{
  "udpPort": $(port udp), "tcpPort": $(port tcp), "tlsPort": $(port tls), "http": "$(addr http)",
  "password": "$password", "secret": "$secret", "only": $only_json, "token": "$http_token",
  "screenshotDir": "$shots",
  "userDataDir": "$work/profile", "consoleLog": "$work/console.log", "resultsJson": "$work/results.json"
}
JSON

status=0
timeout 300 node "$root/scripts/browser/e2e.mjs" "$work/config.json" || status=$?
if [ "$status" -ne 0 ]; then
  echo "browser-e2e: FAILED (status $status); browser console:" >&2
  cat "$work/console.log" >&2 2>/dev/null || true
  echo "--- uturn log (last 80 lines):" >&2
  tail -80 "$work/uturn.log" >&2
  exit 1
fi
echo "browser-e2e: all scenarios passed"
