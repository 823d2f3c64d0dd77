#!/usr/bin/env bash
# Interop: Debian coturn's own test client (turnutils_uclient) against uturn, on loopback only.
#
# Scenarios, each required to deliver every message with 0% loss:
#   channels        -m 10 -n 1000      ChannelData both ways (uclient's default mode)
#   send            -m 10 -n 1000 -s   Send/Data indications
#   rest            -m 4  -n 200  -W   TURN REST (shared-secret) credentials
#   ipv6            -m 4  -n 200  -x   IPv6 relay address, client and peer on ::1
#   tcp             -m 10 -n 1000 -t   TURN over TCP (the bare listen address serves UDP and TCP)
#   tcp-send        -m 4  -n 200  -t -s   Send/Data indications over TCP
#   tls             -m 10 -n 1000 -t -S   TURN over TLS (tls:// listener, self-signed certificate)
#   auto-tcp        -m 4  -n 200  -t   plain TURN on the auto:// port
#   auto-tls        -m 4  -n 200  -t -S   TLS on the same auto:// port
# Without -c, uclient also makes an RTCP allocation per client with EVEN-PORT (R bit) and the
# RESERVATION-TOKEN it got back, so EVEN-PORT/RESERVATION-TOKEN are exercised too.
#
# Usage: scripts/interop-coturn.sh [--backend uring|mmsg] [--keep-logs]
# Env:   UTURN_BIN (default: target/release/uturn, built if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

backend=auto
keep_logs=0
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) backend="$2"; shift 2 ;;
    --keep-logs) keep_logs=1; shift ;;
    *) echo "usage: $0 [--backend uring|mmsg] [--keep-logs]" >&2; exit 2 ;;
  esac
done

if ! command -v turnutils_uclient >/dev/null 2>&1; then
  echo "installing Debian package coturn (turnutils_uclient, turnutils_peer)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq coturn >/dev/null
fi

if ! command -v openssl >/dev/null 2>&1; then
  echo "installing Debian package openssl (certificate for the TLS scenarios)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq openssl >/dev/null
fi

bin="${UTURN_BIN:-target/release/uturn}"
if [ -z "${UTURN_BIN:-}" ]; then
  cargo build --release --bin uturn
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$keep_logs" = 1 ]; then echo "logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# Free UDP ports from the OS (bound then released; loopback only).
free_port() {
  python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
free_tcp_port() {
  python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_STREAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
turn_port=$(free_port)
peer_port=$(free_port)
tls_port=$(free_tcp_port)
auto_port=$(free_tcp_port)
# A throwaway self-signed certificate for the TLS listeners (uclient does not verify it).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj /CN=localhost -keyout "$work/key.pem" -out "$work/cert.pem" >/dev/null 2>&1
secret="interop-shared-secret"

turnutils_peer -L 127.0.0.1 -L ::1 -p "$peer_port" >"$work/peer.log" 2>&1 &
pids+=($!)

# turnutils_uclient picks channel numbers in RFC 5766's range (0x4000-0x7FFF); RFC 8656 narrowed
# it to 0x4000-0x4FFF, so the legacy range is opened for this client.
cat >"$work/uturn.toml" <<TOML
[relay]
accept_rfc5766_channel_numbers = true
TOML

# Relay ports below Linux's ephemeral range (32768-60999): a relay bind that collides with some
# client's ephemeral port would fail and, after eight tries, answer 508. Each CI script has its
# own range (tests 20000-31999, browser 10000-11999, interop 12000-15999, aiortc 16000-16999,
# soak 17000-18999).
"$bin" --config "$work/uturn.toml" --listen "127.0.0.1:$turn_port" --listen "[::1]:$turn_port" \
  --listen "tls://127.0.0.1:$tls_port" --listen "auto://127.0.0.1:$auto_port" \
  --tls-cert "$work/cert.pem" --tls-key "$work/key.pem" \
  --relay-ip 127.0.0.1 --relay-ip ::1 --ports "${PORTS:-12000-15999}" --realm interop.test \
  --user interop:interop-password --auth-secret "$secret" --allow-loopback-peers \
  --io "$backend" --threads 2 --http 127.0.0.1:0 >"$work/uturn.log" 2>&1 &
uturn_pid=$!
pids+=($uturn_pid)

# Readiness: a STUN Binding answered on both addresses (bounded: 20 s).
ready=0
for _ in $(seq 1 100); do
  if ! kill -0 "$uturn_pid" 2>/dev/null; then break; fi
  if timeout 0.5 turnutils_stunclient -p "$turn_port" 127.0.0.1 >/dev/null 2>&1 &&
     timeout 0.5 turnutils_stunclient -p "$turn_port" ::1 >/dev/null 2>&1; then
    ready=1; break
  fi
  sleep 0.2
done
if [ "$ready" != 1 ]; then
  echo "FAIL: uturn did not answer STUN Binding on port $turn_port" >&2
  cat "$work/uturn.log" >&2
  exit 1
fi

failures=0
# run NAME EXPECTED_MSGS uclient-args...
run() {
  local name="$1" expected="$2"; shift 2
  local log="$work/uclient-$name.log" start end
  start=$(date +%s.%N)
  if ! timeout 120 turnutils_uclient "$@" >"$log" 2>&1; then
    echo "FAIL $name: turnutils_uclient exited non-zero or timed out" >&2
  fi
  end=$(date +%s.%N)
  local sent recv lost
  sent=$(sed -n 's/.*start_mclient: tot_send_msgs=\([0-9]*\), tot_recv_msgs=\([0-9]*\).*/\1/p' "$log" | tail -1)
  recv=$(sed -n 's/.*start_mclient: tot_send_msgs=\([0-9]*\), tot_recv_msgs=\([0-9]*\).*/\2/p' "$log" | tail -1)
  lost=$(sed -n 's/.*Total lost packets \([0-9]*\).*/\1/p' "$log" | tail -1)
  printf '%-9s sent=%-6s received=%-6s lost=%-4s expected=%s (%.1f s)\n' \
    "$name" "${sent:-?}" "${recv:-?}" "${lost:-?}" "$expected" "$(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')"
  if [ "${sent:-x}" != "$expected" ] || [ "${recv:-x}" != "$expected" ] || [ "${lost:-x}" != 0 ]; then
    echo "FAIL $name; last lines of its log:" >&2
    tail -15 "$log" >&2
    failures=$((failures + 1))
  fi
}

common=(-p "$turn_port" -r "$peer_port" -z 5)
run channels 10000 "${common[@]}" -u interop -w interop-password -e 127.0.0.1 -m 10 -n 1000 127.0.0.1
run send     10000 "${common[@]}" -u interop -w interop-password -e 127.0.0.1 -m 10 -n 1000 -s 127.0.0.1
run rest     800   "${common[@]}" -u restuser -W "$secret" -e 127.0.0.1 -m 4 -n 200 127.0.0.1
run ipv6     800   "${common[@]}" -u interop -w interop-password -e ::1 -m 4 -n 200 -x ::1
# TURN over TCP and TLS between client and server (the relay to the peer stays UDP). Without -p
# uclient would use 3478/5349, so every stream scenario names its port after the common flags.
user=(-u interop -w interop-password -e 127.0.0.1)
run tcp      10000 "${common[@]}" "${user[@]}" -m 10 -n 1000 -t 127.0.0.1
run tcp-send 800   "${common[@]}" "${user[@]}" -m 4 -n 200 -t -s 127.0.0.1
run tls      10000 "${common[@]}" "${user[@]}" -m 10 -n 1000 -t -S -p "$tls_port" 127.0.0.1
run auto-tcp 800   "${common[@]}" "${user[@]}" -m 4 -n 200 -t -p "$auto_port" 127.0.0.1
run auto-tls 800   "${common[@]}" "${user[@]}" -m 4 -n 200 -t -S -p "$auto_port" 127.0.0.1

if [ "$failures" -ne 0 ]; then
  echo "interop: $failures scenario(s) failed; uturn log:" >&2
  tail -50 "$work/uturn.log" >&2
  exit 1
fi
echo "interop: all scenarios passed with 0% loss (backend: $backend)"
