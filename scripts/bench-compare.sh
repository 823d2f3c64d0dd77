#!/usr/bin/env bash
# bench-compare.sh: uturn beside coturn and the bare forwarder, in one run, on this machine.
#
# The server under test is pinned to one core and the load generator to another (taskset), and
# the same named workloads run against uturn (one shard), coturn (one relay thread) and the
# bare UDP forwarder (the physical limit). It prints one Markdown table with ratios and writes
# SVG plots. coturn is installed with apt-get where missing. All traffic stays on 127.0.0.1.
#
# Parameters (environment variables):
#   RUNS=3                      runs of everything; the table shows the median run
#   WORKLOADS="small audio video churn alloc"   any subset, in any order
#   STEP_SECS=1                 seconds per sweep step (and of the alloc run)
#   START_PPS=10000 MAX_PPS=1000000 FACTOR=1.6   sweep shape
#   SERVER_CPU=0 GEN_CPU=1      cores for the server and for the generator
#   IO=auto                     uturn's data-plane backend: auto, uring or mmsg
#   OUT=target/bench-compare    where JSON, Markdown and plots go
#   SKIP_BUILD=1                use the binaries already built
#   PERF=1                      also profile each server (perf record -g) during one `small`
#                               step at PERF_PPS (default: half uturn's knee, else 50000) for
#                               PERF_SECS (3); top entries in $OUT/perf/SERVER-top.txt
# With the defaults the whole run stays under ~10 minutes on a 2-core machine.
set -euo pipefail

cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
WORKLOADS=${WORKLOADS:-"small audio video churn alloc"}
STEP_SECS=${STEP_SECS:-1}
START_PPS=${START_PPS:-10000}
MAX_PPS=${MAX_PPS:-1000000}
FACTOR=${FACTOR:-1.6}
SERVER_CPU=${SERVER_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
IO=${IO:-auto}
OUT=${OUT:-target/bench-compare}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
USER_PASS="u1:p1"

log() { printf '[bench-compare] %s\n' "$*" >&2; }

if ! command -v turnserver >/dev/null 2>&1; then
    log "coturn is missing: installing the Debian package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq coturn >/dev/null
fi
command -v taskset >/dev/null 2>&1 || { log "taskset (util-linux) is required"; exit 2; }

if [[ -z "${SKIP_BUILD:-}" ]]; then
    log "building uturn and uturn-bench (release)"
    cargo build --release -q -p uturn-control --bin uturn
    cargo build --release -q -p uturn-bench --bin uturn-bench
fi
UTURN="$TARGET_DIR/release/uturn"
BENCH="$TARGET_DIR/release/uturn-bench"
[[ -x "$UTURN" && -x "$BENCH" ]] || { log "binaries not found under $TARGET_DIR/release"; exit 2; }

rm -rf "$OUT"
mkdir -p "$OUT/json" "$OUT/logs"

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# uturn: one shard, pinned. It prints its listener and "uturn is ready".
taskset -c "$SERVER_CPU" "$UTURN" --listen 127.0.0.1:0 --relay-ip 127.0.0.1 --user "$USER_PASS" \
    --allow-loopback-peers --threads 1 --io "$IO" --ports 10000-19999 --http 127.0.0.1:0 \
    >"$OUT/logs/uturn.out" 2>"$OUT/logs/uturn.err" &
UTURN_PID=$!
PIDS+=("$UTURN_PID")
for _ in $(seq 100); do
    grep -q '^uturn is ready' "$OUT/logs/uturn.out" 2>/dev/null && break
    sleep 0.1
done
grep -q '^uturn is ready' "$OUT/logs/uturn.out" || { log "uturn did not start:"; cat "$OUT/logs/uturn.err" >&2; exit 1; }
UTURN_ADDR=$(sed -n 's/^listening on udp //p' "$OUT/logs/uturn.out" | head -n1)
log "uturn ($IO) on $UTURN_ADDR, pid $UTURN_PID, core $SERVER_CPU"

# A UDP port nobody listens on (coturn binds with SO_REUSEPORT, so a port shared with another
# server would silently split the load between the two).
free_udp_port() {
    local p
    for _ in $(seq 200); do
        p=$(( 36000 + RANDOM % 4000 ))
        if ! ss -Huln 2>/dev/null | awk '{print $4}' | grep -q ":$p\$"; then
            echo "$p"
            return
        fi
    done
    echo 35478
}
COTURN_PORT=${COTURN_PORT:-$(free_udp_port)}

# coturn: one relay thread, pinned, long-term credentials, loopback peers allowed.
taskset -c "$SERVER_CPU" turnserver -n --listening-ip=127.0.0.1 --listening-port="$COTURN_PORT" \
    --relay-ip=127.0.0.1 --min-port=20000 --max-port=29999 --user="$USER_PASS" --realm=bench \
    --lt-cred-mech --allow-loopback-peers --no-cli --no-tls --no-dtls --relay-threads=1 \
    --no-software-attribute --log-file=stdout ${COTURN_EXTRA:-} >"$OUT/logs/coturn.log" 2>&1 &
COTURN_PID=$!
PIDS+=("$COTURN_PID")
COTURN_ADDR="127.0.0.1:$COTURN_PORT"
for _ in $(seq 50); do
    "$BENCH" probe "turn:$COTURN_ADDR" -u u1 -p p1 --timeout 0.3 >/dev/null 2>&1 && break
    sleep 0.2
done
log "coturn on $COTURN_ADDR, pid $COTURN_PID, core $SERVER_CPU"

log "probes:"
"$BENCH" probe "turn:$UTURN_ADDR" -u u1 -p p1 | sed 's/^/  uturn  /' >&2
"$BENCH" probe "turn:$COTURN_ADDR" -u u1 -p p1 | sed 's/^/  coturn /' >&2

GEN=(taskset -c "$GEN_CPU" "$BENCH")
SWEEP=(--start-pps "$START_PPS" --max-pps "$MAX_PPS" --factor "$FACTOR" --step-secs "$STEP_SECS" -q)
start=$(date +%s)
for run in $(seq "$RUNS"); do
    for w in $WORKLOADS; do
        if [[ "$w" == alloc ]]; then
            for s in uturn coturn; do
                addr=$UTURN_ADDR pid=$UTURN_PID
                [[ $s == coturn ]] && addr=$COTURN_ADDR pid=$COTURN_PID
                log "run $run/$RUNS: alloc on $s"
                "${GEN[@]}" alloc --server "$addr" --server-pid "$pid" --label "$s" \
                    --duration "$STEP_SECS" --concurrency 4 -q --json "$OUT/json/$s-alloc-$run.json"
            done
            continue
        fi
        for s in uturn coturn; do
            addr=$UTURN_ADDR pid=$UTURN_PID
            [[ $s == coturn ]] && addr=$COTURN_ADDR pid=$COTURN_PID
            log "run $run/$RUNS: sweep $w on $s"
            "${GEN[@]}" sweep --server "$addr" --server-pid "$pid" --label "$s" --workload "$w" \
                "${SWEEP[@]}" --json "$OUT/json/$s-$w-$run.json"
        done
        log "run $run/$RUNS: sweep $w on the bare forwarder"
        "${GEN[@]}" baseline --forwarder-cpu "$SERVER_CPU" --workload "$w" "${SWEEP[@]}" \
            --json "$OUT/json/baseline-$w-$run.json"
        # The forwarder again at half uturn's loss-free rate: the reference for the latency
        # uturn adds at that rate.
        knee=$(sed -n 's/^  "knee_pps": \([0-9.]*\),$/\1/p' "$OUT/json/uturn-$w-$run.json")
        if [[ -n "$knee" ]]; then
            half=$(awk -v k="$knee" 'BEGIN { printf "%d", k / 2 }')
            log "run $run/$RUNS: $w on the bare forwarder at $half pps (half uturn's knee)"
            "${GEN[@]}" baseline --forwarder-cpu "$SERVER_CPU" --workload "$w" --rate "$half" \
                --duration "$STEP_SECS" -q --json "$OUT/json/baseline-half-$w-$run.json"
        fi
    done
done
log "measured in $(( $(date +%s) - start )) s"

if [[ "${PERF:-0}" == 1 ]]; then
    # Where the server's time goes at a mid rate. Hardware cycle counters are often missing in
    # a VM (`perf stat -e cycles` says <not supported>); the cpu-clock software event samples
    # the same way there.
    mkdir -p "$OUT/perf"
    event=cycles
    perf stat -e cycles true 2>&1 | grep -q 'not supported' && event=cpu-clock
    knee=$(sed -n 's/^  "knee_pps": \([0-9.]*\),$/\1/p' "$OUT/json/uturn-small-1.json" 2>/dev/null || true)
    pps=${PERF_PPS:-$(awk -v k="${knee:-0}" 'BEGIN { printf "%d", (k > 0 ? k / 2 : 50000) }')}
    for s in uturn coturn; do
        addr=$UTURN_ADDR pid=$UTURN_PID
        [[ $s == coturn ]] && addr=$COTURN_ADDR pid=$COTURN_PID
        log "perf: $s during small at $pps pps for ${PERF_SECS:-3} s ($event)"
        perf record -e "$event" -g -p "$pid" -o "$OUT/perf/$s.data" 2>"$OUT/logs/perf-$s.log" &
        perf_pid=$!
        "${GEN[@]}" run --server "$addr" --server-pid "$pid" --label "$s" --workload small \
            --rate "$pps" --duration "${PERF_SECS:-3}" -q --json "$OUT/perf/$s-run.json" \
            2>>"$OUT/logs/perf-$s.log"
        kill -INT "$perf_pid"
        wait "$perf_pid" || true
        {
            echo "# $s, workload small at $pps pps, perf record -e $event -g -p PID; perf report --no-children -g none"
            perf report -i "$OUT/perf/$s.data" --stdio --no-children -g none --percent-limit 0.3 \
                2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 40
        } >"$OUT/perf/$s-top.txt"
        perf report -i "$OUT/perf/$s.data" --stdio --no-children 2>/dev/null \
            >"$OUT/perf/$s-callgraph.txt" || true
    done
    log "perf: $OUT/perf/uturn-top.txt, $OUT/perf/coturn-top.txt (call graphs beside them)"
fi

"$BENCH" report "$OUT"/json/*.json --markdown "$OUT/results.md" --plots "$OUT/plots"
{
    echo
    echo "Machine: $(nproc) cores, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    echo "uturn: $(sed -n 's/.*backend="\([a-z_]*\)".*/\1/p' "$OUT/logs/uturn.err" | head -n1) backend, 1 shard; coturn $(turnserver --version 2>/dev/null | head -n1), 1 relay thread; server on core $SERVER_CPU, generator on core $GEN_CPU"
    echo "Command: RUNS=$RUNS WORKLOADS=\"$WORKLOADS\" STEP_SECS=$STEP_SECS IO=$IO scripts/bench-compare.sh"
} | tee -a "$OUT/results.md"
log "results: $OUT/results.md, plots: $OUT/plots/"
