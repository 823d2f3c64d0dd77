#!/usr/bin/env bash
# Real parts at uturn's stream edge, on loopback only:
#   shared-443  Debian's nginx serves HTTPS (expecting a PROXY v2 header) behind uturn's
#               auto:// port (forward_other_to + forward_proxy_protocol). curl from 127.0.0.7
#               through uturn gets nginx's page, and nginx's $proxy_protocol_addr, echoed in a
#               response header, is 127.0.0.7 (the browser, not uturn). Meanwhile coturn's
#               turnutils_uclient relays over TURN/TLS through the same port with 0% loss.
#   haproxy     Debian's HAProxy (TCP mode, send-proxy-v2) in front of a uturn that trusts
#               127.0.0.1 for PROXY headers; a TURN/TCP client bound to 127.0.0.7 allocates
#               through HAProxy, and both XOR-MAPPED-ADDRESS and /api/v1/allocations show
#               127.0.0.7 (HAProxy itself connects from 127.0.0.1).
# The listeners are on OS-chosen high ports, not 443.
#
# Usage: scripts/edge-e2e.sh [--backend uring|mmsg] [--keep-logs]
# Env:   UTURN_BIN (default: release build of this checkout, built if unset).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

backend=auto
keep_logs=0
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) backend="$2"; shift 2 ;;
    --keep-logs) keep_logs=1; shift ;;
    *) echo "usage: $0 [--backend uring|mmsg] [--keep-logs]" >&2; exit 2 ;;
  esac
done

missing=()
for tool in nginx:nginx haproxy:haproxy curl:curl openssl:openssl turnutils_uclient:coturn; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tool%%:*}" ] || missing+=("${tool##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian's packages start their own services where they can; ours run from this script only.
if command -v systemctl >/dev/null 2>&1; then
  systemctl stop nginx haproxy >/dev/null 2>&1 || true
fi
PATH="$PATH:/usr/sbin"

# shellcheck source=scripts/lib/uturn-ready.sh
source scripts/lib/uturn-ready.sh
prepare_uturn_run
pids=()
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  cleanup_uturn_run
}
trap stop_all EXIT

free_tcp_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
free_udp_port() {
  python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
failures=0
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj /CN=localhost -keyout "$work/key.pem" -out "$work/cert.pem" >/dev/null 2>&1

# ---- shared-443: nginx behind uturn's auto:// port ----
web_port=$(free_tcp_port)
mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<NGINX
worker_processes 1;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 64; }
http {
  access_log $work/nginx/access.log;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  server {
    listen 127.0.0.1:$web_port ssl proxy_protocol;
    ssl_certificate $work/cert.pem;
    ssl_certificate_key $work/key.pem;
    location / {
      add_header X-Proxy-Protocol-Addr \$proxy_protocol_addr always;
      default_type text/plain;
      return 200 "the conference web app, served by nginx behind uturn\n";
    }
  }
}
NGINX
nginx -c "$work/nginx/nginx.conf" -g 'daemon off;' >"$work/nginx/stdout.log" 2>&1 &
pids+=($!)

peer_port=$(free_udp_port)
turnutils_peer -L 127.0.0.1 -p "$peer_port" >"$work/peer.log" 2>&1 &
pids+=($!)

# Debian's turnutils_uclient picks RFC 5766 channel numbers (0x4000-0x7FFF).
cat >"$work/uturn.toml" <<TOML
[relay]
accept_rfc5766_channel_numbers = true
TOML
# Relay ports 19000-19999: each CI script has its own range (see scripts/interop-coturn.sh).
"$bin" --config "$work/uturn.toml" --listen 127.0.0.1:0 --listen auto://127.0.0.1:0 \
  --tls-cert "$work/cert.pem" --tls-key "$work/key.pem" \
  --forward-other-to "127.0.0.1:$web_port" --forward-proxy-protocol \
  --relay-ip 127.0.0.1 --ports 19000-19499 --realm edge.test --user edge:edge-password \
  --allow-loopback-peers --io "$backend" --threads 2 --http 127.0.0.1:0 \
  >"$work/uturn.out" 2>"$work/uturn.log" &
uturn_pid=$!
wait_for_uturn "$uturn_pid"
auto=$(addr auto)
auto_port=${auto##*:}
http=$(addr http)
for _ in $(seq 1 100); do
  [ -s "$work/nginx/nginx.pid" ] && break
  sleep 0.1
done

# TURN/TLS through the shared port while the web page is fetched through it.
timeout 120 turnutils_uclient -t -S -p "$auto_port" -r "$peer_port" -z 5 -u edge -w edge-password \
  -e 127.0.0.1 -m 4 -n 300 127.0.0.1 >"$work/uclient.log" 2>&1 &
uclient=$!
pids+=($uclient)
page_ok=0
for i in 1 2 3; do
  if curl -sk --interface 127.0.0.7 --max-time 10 -D "$work/headers-$i" -o "$work/body-$i" \
    --resolve "meet.edge.test:$auto_port:127.0.0.1" "https://meet.edge.test:$auto_port/"; then
    if grep -q "served by nginx behind uturn" "$work/body-$i" &&
       grep -qi '^X-Proxy-Protocol-Addr: 127.0.0.7' "$work/headers-$i"; then
      page_ok=$((page_ok + 1))
    fi
  fi
done
echo "shared-443: $page_ok/3 pages through uturn with nginx's \$proxy_protocol_addr = 127.0.0.7"
[ "$page_ok" = 3 ] || { fail "the page through uturn (headers: $(cat "$work/headers-1" 2>/dev/null))"; cat "$work/nginx/error.log" >&2 || true; }
wait "$uclient" || true
sent=$(sed -n 's/.*tot_send_msgs=\([0-9]*\), tot_recv_msgs=\([0-9]*\).*/\1/p' "$work/uclient.log" | tail -1)
recv=$(sed -n 's/.*tot_send_msgs=\([0-9]*\), tot_recv_msgs=\([0-9]*\).*/\2/p' "$work/uclient.log" | tail -1)
lost=$(sed -n 's/.*Total lost packets \([0-9]*\).*/\1/p' "$work/uclient.log" | tail -1)
echo "shared-443: TURN/TLS on the same port sent=${sent:-?} received=${recv:-?} lost=${lost:-?} (expected 1200)"
if [ "${sent:-x}" != 1200 ] || [ "${recv:-x}" != 1200 ] || [ "${lost:-x}" != 0 ]; then
  fail "turnutils_uclient over TLS on the shared port"; tail -15 "$work/uclient.log" >&2
fi
forwarded=$(curl -s "http://$http/metrics" | awk '/^uturn_forwarded_connections_total/ { s += $2 } END { print s + 0 }')
echo "shared-443: uturn_forwarded_connections_total = $forwarded"
[ "$forwarded" -ge 3 ] || fail "the passthrough was not counted (expected >= 3)"
kill "$uturn_pid" 2>/dev/null || true
wait "$uturn_pid" 2>/dev/null || true
uturn_pid=

# ---- haproxy: send-proxy-v2 in front of uturn ----
cat >"$work/uturn.out" </dev/null
"$bin" --listen 127.0.0.1:0 --listen tcp://127.0.0.1:0 --proxy-protocol-from 127.0.0.1/32 \
  --relay-ip 127.0.0.1 --ports 19500-19999 --realm edge.test --user edge:edge-password \
  --allow-loopback-peers --io "$backend" --threads 2 --http 127.0.0.1:0 \
  >"$work/uturn.out" 2>"$work/uturn.log" &
uturn_pid=$!
wait_for_uturn "$uturn_pid"
tcp=$(addr tcp)
http=$(addr http)
front_port=$(free_tcp_port)
cat >"$work/haproxy.cfg" <<HAPROXY
global
  log stderr format short local0 warning
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend turn
  bind 127.0.0.1:$front_port
  default_backend uturn
backend uturn
  server u1 $tcp send-proxy-v2
HAPROXY
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  python3 -c "import socket,sys; s=socket.socket(); s.settimeout(0.2); sys.exit(s.connect_ex(('127.0.0.1',$front_port)))" && break
  sleep 0.1
done
mkfifo "$work/hold"
python3 scripts/edge/turn-tcp-allocate.py 127.0.0.7 127.0.0.1 "$front_port" edge edge-password 30 \
  <"$work/hold" >"$work/client.out" 2>"$work/client.err" &
client=$!
pids+=($client)
exec 9>"$work/hold"
for _ in $(seq 1 100); do
  grep -q '^mapped' "$work/client.out" && break
  kill -0 "$client" 2>/dev/null || break
  sleep 0.1
done
mapped=$(sed -n 's/^mapped //p' "$work/client.out")
echo "haproxy: XOR-MAPPED-ADDRESS through HAProxy = ${mapped:-none}"
case "$mapped" in 127.0.0.7:*) ;; *) fail "XOR-MAPPED-ADDRESS is not the client's ($(cat "$work/client.err"))" ;; esac
api=$(curl -s "http://$http/api/v1/allocations")
if [ -n "$mapped" ] && grep -q "\"$mapped\"" <<<"$api"; then
  echo "haproxy: /api/v1/allocations lists the allocation of $mapped"
else
  fail "/api/v1/allocations does not show $mapped: $api"
fi
exec 9>&-
wait "$client" 2>/dev/null || true

if [ "$failures" -ne 0 ]; then
  echo "edge-e2e: $failures check(s) failed; uturn log:" >&2
  tail -30 "$work/uturn.log" >&2
  exit 1
fi
echo "edge-e2e: nginx behind the shared port and HAProxy in front both passed (backend: $backend)"
