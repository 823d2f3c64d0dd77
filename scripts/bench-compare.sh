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
#   STEP_SECS=1                 seconds per sweep step (and of the alloc run's window)
#   ALLOC_WORKERS=2 ALLOC_CONCURRENCY=128 ALLOC_SOURCES=2000
#                               the alloc workload's generator: worker threads, handshakes in
#                               flight in all, client source addresses (127.1.0.1 onwards, so
#                               that uturn's per-source limit of unauthenticated answers, 50/s,
#                               burst 100, sees a crowd of clients rather than one)
#   ENGINE_BENCH=0              1: also run the engine-alone criterion bench (allocate_handshake,
#                               pinned to SERVER_CPU; a release build of the bench first) and put
#                               its figure beside the alloc table; 0: quote the last result
#                               found under $CARGO_TARGET_DIR/criterion, or print the command
#   LATENCY_SECS=10             seconds of each latency step at half uturn's knee (uturn's,
#                               coturn's at its own, the forwarder's at uturn's): long enough
#                               that one stall of the machine cannot decide a p99
#   SEARCH_TICK_US=1000         the generator's event-loop period while a sweep searches for the
#                               knee (its clients then send several datagrams per turn, as one
#                               UDP GSO send, and it outlasts the servers); latency steps keep
#                               the 100 µs default
#   START_PPS=10000 MAX_PPS=1000000 FACTOR=1.6   sweep shape
#   SERVER_CPU=0 GEN_CPU=1      cores for the server and for the generator
#   IO=auto                     uturn's data-plane backend: auto, uring or mmsg
#   OUT=target/bench-compare    where JSON, Markdown and plots go
#   SKIP_BUILD=1                use the binaries already built
#   UTURN_BIN=/path/to/uturn    the uturn binary to measure (default: the one built here)
#   PAIRS=10 PAIR_SECS=2        after the sweeps, for small, audio and video: `uturn-bench pairs`
#                               at half uturn's median knee, uturn against the forwarder (the
#                               latency uturn adds) and against coturn (CPU per packet at equal
#                               rates), in alternating steps of PAIR_SECS, so that the machine's
#                               drift cancels out of the differences; PAIRS=0 skips them
#   PERF=1                      also profile each server (perf record -g) during one `small`
#                               step at PERF_PPS (default: half uturn's knee, else 50000) for
#                               PERF_SECS (3); top entries in $OUT/perf/SERVER-top.txt
#   METRICS_AB=1                instead of coturn and the forwarder: uturn with metrics on
#                               (its /metrics scraped once a second during each run) beside
#                               uturn --no-metrics, then CPU per relayed packet and knee of
#                               both with their ratio (issue 7: metrics must cost nothing
#                               measurable)
#   UTURN_B=/path/to/uturn      instead of coturn and the forwarder: this build of uturn beside
#                               another uturn binary (a previous commit's, built the same way),
#                               with the same summary as METRICS_AB: the before and after of a
#                               change to the packet path
# With the defaults the whole run takes ~14 minutes on a 2-core machine.
set -euo pipefail

cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
WORKLOADS=${WORKLOADS:-"small audio video churn alloc"}
STEP_SECS=${STEP_SECS:-1}
LATENCY_SECS=${LATENCY_SECS:-10}
SEARCH_TICK_US=${SEARCH_TICK_US:-1000}
START_PPS=${START_PPS:-10000}
MAX_PPS=${MAX_PPS:-1000000}
FACTOR=${FACTOR:-1.6}
SERVER_CPU=${SERVER_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
IO=${IO:-auto}
OUT=${OUT:-target/bench-compare}
PAIRS=${PAIRS:-10}
ALLOC_WORKERS=${ALLOC_WORKERS:-2}
ALLOC_CONCURRENCY=${ALLOC_CONCURRENCY:-128}
ALLOC_SOURCES=${ALLOC_SOURCES:-2000}
ENGINE_BENCH=${ENGINE_BENCH:-0}
PAIR_SECS=${PAIR_SECS:-2}
METRICS_AB=${METRICS_AB:-}
UTURN_B=${UTURN_B:-}
[[ -n "$METRICS_AB" && -n "$UTURN_B" ]] && { echo "METRICS_AB and UTURN_B are two different runs: pick one" >&2; exit 2; }
[[ -z "$UTURN_B" || -x "$UTURN_B" ]] || { echo "UTURN_B=$UTURN_B is not an executable" >&2; exit 2; }
# An A/B run (either kind) measures uturn against uturn only.
AB=${METRICS_AB:-$UTURN_B}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
USER_PASS="u1:p1"

log() { printf '[bench-compare] %s\n' "$*" >&2; }

if [[ -z "$AB" ]] && ! command -v turnserver >/dev/null 2>&1; then
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
UTURN=${UTURN_BIN:-$TARGET_DIR/release/uturn}
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

# Servers by label: address and pid.
declare -A ADDR SPID

# uturn: one shard, pinned. It prints its listener and "uturn is ready".
start_uturn() { # LABEL PORTS [EXTRA FLAGS...]; BIN=path overrides the binary
    local label=$1 ports=$2
    shift 2
    taskset -c "$SERVER_CPU" "${BIN:-$UTURN}" --listen 127.0.0.1:0 --relay-ip 127.0.0.1 --user "$USER_PASS" \
        --allow-loopback-peers --threads 1 --io "$IO" --ports "$ports" --http 127.0.0.1:0 "$@" \
        >"$OUT/logs/$label.out" 2>"$OUT/logs/$label.err" &
    SPID[$label]=$!
    PIDS+=("${SPID[$label]}")
    for _ in $(seq 100); do
        grep -q '^uturn is ready' "$OUT/logs/$label.out" 2>/dev/null && break
        sleep 0.1
    done
    grep -q '^uturn is ready' "$OUT/logs/$label.out" || { log "$label did not start:"; cat "$OUT/logs/$label.err" >&2; exit 1; }
    ADDR[$label]=$(sed -n 's/^listening on udp //p' "$OUT/logs/$label.out" | head -n1)
    log "$label ($IO) on ${ADDR[$label]}, pid ${SPID[$label]}, core $SERVER_CPU"
}
start_uturn uturn 10000-19999
SERVERS="uturn coturn"
if [[ -n "$METRICS_AB" ]]; then
    start_uturn uturn-nometrics 20000-29999 --no-metrics
    SERVERS="uturn uturn-nometrics"
    METRICS_URL="http://$(sed -n 's/^listening on http //p' "$OUT/logs/uturn.out" | head -n1)/metrics"
elif [[ -n "$UTURN_B" ]]; then
    BIN="$UTURN_B" start_uturn uturn-b 20000-29999
    SERVERS="uturn uturn-b"
fi

# What a Prometheus server does to uturn during the run: one scrape a second (on the
# generator's core), for as long as the process PID lives (bounded at one hour).
scrape_while() { # PID
    local scrapes=0
    for _ in $(seq 3600); do
        kill -0 "$1" 2>/dev/null || break
        if taskset -c "$GEN_CPU" curl -sf -o /dev/null "$METRICS_URL"; then
            scrapes=$((scrapes + 1))
        else
            log "scrape of $METRICS_URL failed"
        fi
        sleep 1
    done
    log "scraped $METRICS_URL $scrapes times"
}

# Runs the generator (arguments after the label) against server LABEL; with METRICS_AB, the
# metrics-on uturn is scraped meanwhile.
generate() { # LABEL ARGS...
    local label=$1
    shift
    if [[ -n "$METRICS_AB" && "$label" == uturn ]]; then
        "${GEN[@]}" "$@" &
        local gen=$!
        scrape_while "$gen" &
        local scraper=$!
        wait "$gen"
        wait "$scraper"
    else
        "${GEN[@]}" "$@"
    fi
}

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
if [[ -z "$AB" ]]; then
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
    ADDR[coturn]=$COTURN_ADDR
    SPID[coturn]=$COTURN_PID
fi

log "probes:"
for s in $SERVERS; do
    "$BENCH" probe "turn:${ADDR[$s]}" -u u1 -p p1 | sed "s/^/  $s /" >&2
done

GEN=(taskset -c "$GEN_CPU" "$BENCH")
SWEEP=(--start-pps "$START_PPS" --max-pps "$MAX_PPS" --factor "$FACTOR" --step-secs "$STEP_SECS"
    --latency-secs "$LATENCY_SECS" --search-tick-us "$SEARCH_TICK_US" -q)
start=$(date +%s)
for run in $(seq "$RUNS"); do
    for w in $WORKLOADS; do
        if [[ "$w" == alloc ]]; then
            for s in $SERVERS; do
                log "run $run/$RUNS: alloc on $s"
                generate "$s" alloc --server "${ADDR[$s]}" --server-pid "${SPID[$s]}" --label "$s" \
                    --duration "$STEP_SECS" --workers "$ALLOC_WORKERS" --concurrency "$ALLOC_CONCURRENCY" \
                    --sources "$ALLOC_SOURCES" -q --json "$OUT/json/$s-alloc-$run.json"
            done
            continue
        fi
        for s in $SERVERS; do
            log "run $run/$RUNS: sweep $w on $s"
            generate "$s" sweep --server "${ADDR[$s]}" --server-pid "${SPID[$s]}" --label "$s" \
                --workload "$w" "${SWEEP[@]}" --json "$OUT/json/$s-$w-$run.json"
        done
        [[ -n "$AB" ]] && continue
        log "run $run/$RUNS: sweep $w on the bare forwarder"
        # Its own half-knee step is skipped: the run below, at uturn's half knee, is the
        # latency reference.
        "${GEN[@]}" baseline --forwarder-cpu "$SERVER_CPU" --workload "$w" "${SWEEP[@]}" \
            --no-half-knee --json "$OUT/json/baseline-$w-$run.json"
        # The forwarder again at half uturn's loss-free rate: the reference for the latency
        # uturn adds at that rate.
        knee=$(sed -n 's/^  "knee_pps": \([0-9.]*\),$/\1/p' "$OUT/json/uturn-$w-$run.json")
        if [[ -n "$knee" ]]; then
            half=$(awk -v k="$knee" 'BEGIN { printf "%d", k / 2 }')
            log "run $run/$RUNS: $w on the bare forwarder at $half pps (half uturn's knee)"
            "${GEN[@]}" baseline --forwarder-cpu "$SERVER_CPU" --workload "$w" --rate "$half" \
                --duration "$LATENCY_SECS" -q --json "$OUT/json/baseline-half-$w-$run.json"
        fi
    done
done
log "measured in $(( $(date +%s) - start )) s"

# Interleaved pairs at half uturn's median knee: one run of each server minutes apart differs
# by what the machine did in between (p99s of one step swung 158-3,067 µs between runs), so
# the latency uturn adds over the forwarder, and its CPU per packet against coturn's at equal
# rates, are measured in alternating short steps and read as per-pair differences.
PAIRS_MD="$OUT/pairs.md"
: >"$PAIRS_MD"
if [[ -z "$AB" && "$PAIRS" -gt 0 ]]; then
    mkdir -p "$OUT/pairs"
    pairs_start=$(date +%s)
    for w in $WORKLOADS; do
        case "$w" in small | audio | video) ;; *) continue ;; esac
        knee=$(for f in "$OUT"/json/uturn-"$w"-*.json; do
            sed -n 's/^  "knee_pps": \([0-9.]*\),$/\1/p' "$f"
        done | sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }')
        [[ -n "$knee" ]] || { log "pairs: no knee for uturn in $w, skipped"; continue; }
        half=$(awk -v k="$knee" 'BEGIN { printf "%d", k / 2 }')
        for versus in forwarder coturn; do
            log "pairs: $w, uturn against $versus at $half pps, $PAIRS pairs of $PAIR_SECS s"
            vs=(--forwarder-cpu "$SERVER_CPU")
            [[ "$versus" == coturn ]] && vs=(--versus "${ADDR[coturn]}" --versus-pid "${SPID[coturn]}" --versus-label coturn)
            "${GEN[@]}" pairs --server "${ADDR[uturn]}" --server-pid "${SPID[uturn]}" --label uturn \
                "${vs[@]}" --workload "$w" --rate "$half" --pairs "$PAIRS" --pair-secs "$PAIR_SECS" \
                -q --json "$OUT/pairs/uturn-vs-$versus-$w.json" --markdown \
                >"$OUT/pairs/uturn-vs-$versus-$w.md" 2>>"$OUT/logs/pairs.log"
            tail -n 1 "$OUT/pairs/uturn-vs-$versus-$w.md" >>"$PAIRS_MD"
        done
    done
    log "pairs measured in $(( $(date +%s) - pairs_start )) s"
fi

if [[ "${PERF:-0}" == 1 && -z "$AB" ]]; then
    # Where the server's time goes at a mid rate. Hardware cycle counters are often missing in
    # a VM (`perf stat -e cycles` says <not supported>); the cpu-clock software event samples
    # the same way there.
    mkdir -p "$OUT/perf"
    event=cycles
    perf stat -e cycles true 2>&1 | grep -q 'not supported' && event=cpu-clock
    knee=$(sed -n 's/^  "knee_pps": \([0-9.]*\),$/\1/p' "$OUT/json/uturn-small-1.json" 2>/dev/null || true)
    pps=${PERF_PPS:-$(awk -v k="${knee:-0}" 'BEGIN { printf "%d", (k > 0 ? k / 2 : 50000) }')}
    for s in uturn coturn; do
        addr=${ADDR[$s]} pid=${SPID[$s]}
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
                2>/dev/null | grep -v '^#' | grep -v '^$' | sed -n '1,40p'
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
    if [[ -n "$METRICS_AB" ]]; then
        echo "uturn: $(sed -n 's/.*backend="\([a-z_]*\)".*/\1/p' "$OUT/logs/uturn.err" | head -n1) backend, 1 shard, metrics on (scraped every second) and off (--no-metrics); server on core $SERVER_CPU, generator on core $GEN_CPU"
    elif [[ -n "$UTURN_B" ]]; then
        echo "uturn: $(sed -n 's/.*backend="\([a-z_]*\)".*/\1/p' "$OUT/logs/uturn.err" | head -n1) backend, 1 shard: A = $UTURN ($(git describe --always --dirty 2>/dev/null || echo '?')), B = $UTURN_B; server on core $SERVER_CPU, generator on core $GEN_CPU"
    else
        echo "uturn: $(sed -n 's/.*backend="\([a-z_]*\)".*/\1/p' "$OUT/logs/uturn.err" | head -n1) backend, 1 shard; coturn $(turnserver --version 2>/dev/null | head -n1), 1 relay thread; server on core $SERVER_CPU, generator on core $GEN_CPU"
    fi
    echo "Command: ${METRICS_AB:+METRICS_AB=1 }${UTURN_B:+UTURN_B=$UTURN_B }RUNS=$RUNS WORKLOADS=\"$WORKLOADS\" STEP_SECS=$STEP_SECS PAIRS=$PAIRS PAIR_SECS=$PAIR_SECS IO=$IO scripts/bench-compare.sh"
    if [[ -s "$PAIRS_MD" ]]; then
        echo
        echo "Interleaved pairs at half uturn's knee (medians of per-pair differences; tables in $OUT/pairs/):"
        echo
        sed 's/^/- /' "$PAIRS_MD"
    fi
} | tee -a "$OUT/results.md"

# The allocation rate of each server, in one table: medians over the runs of allocations per
# second, server CPU per allocation, handshake p50 and p99, and the generator's own CPU (when
# it used all its cores, the rate is the generator's limit, at least); then the engine alone
# (the protocol work of one handshake, no sockets), the floor of the server's CPU per
# allocation.
case " $WORKLOADS " in *" alloc "*) ALLOC_SUMMARY=1 ;; *) ALLOC_SUMMARY= ;; esac
if [[ -n "$ALLOC_SUMMARY" ]] && command -v jq >/dev/null 2>&1; then
    median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print "" }'; }
    alloc_median() { # LABEL JQ-EXPRESSION
        jq -r ".alloc | $2 // empty" "$OUT"/json/"$1"-alloc-*.json 2>/dev/null | median
    }
    # The engine-alone bench: control/benches/engine.rs, or engine/benches/engine.rs once the
    # engine has its own crate.
    engine_pkg=
    for dir in engine control; do
        if [[ -f "$dir/benches/engine.rs" ]]; then
            engine_pkg=$(sed -n 's/^name = "\(.*\)"/\1/p' "$dir/Cargo.toml" | head -n1)
            break
        fi
    done
    engine_cmd="taskset -c $SERVER_CPU cargo bench -p ${engine_pkg:-uturn-control} --bench engine -- allocate_handshake --noplot"
    estimates="$TARGET_DIR/criterion/engine/allocate_handshake/new/estimates.json"
    if [[ "$ENGINE_BENCH" == 1 && -n "$engine_pkg" ]]; then
        log "engine alone: $engine_cmd"
        taskset -c "$SERVER_CPU" cargo bench -q -p "$engine_pkg" --bench engine -- allocate_handshake --noplot \
            >"$OUT/logs/engine-bench.log" 2>&1 || log "the engine bench failed: $OUT/logs/engine-bench.log"
    fi
    engine_line="engine alone: not measured in this run; measure it with \`$engine_cmd\` (or ENGINE_BENCH=1)"
    if [[ -f "$estimates" ]]; then
        ns=$(jq -r '.median.point_estimate' "$estimates")
        when=$(date -u -r "$estimates" '+%Y-%m-%d %H:%M UTC')
        engine_line=$(awk -v ns="$ns" -v when="$when" -v cmd="$engine_cmd" 'BEGIN {
            printf "engine alone (criterion allocate_handshake, median, measured %s by `%s`): %.2f µs per allocation, %.0f per second of one core", when, cmd, ns / 1000, 1e9 / ns }')
    fi
    {
        echo
        echo "| alloc (medians of $RUNS runs) | alloc/s | server CPU µs/alloc | handshake p50 µs | p99 µs | generator CPU | failed |"
        echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        for s in $SERVERS; do
            ls "$OUT"/json/"$s"-alloc-*.json >/dev/null 2>&1 || continue
            rate=$(alloc_median "$s" '.per_sec')
            cpu=$(alloc_median "$s" '.server_cpu_us_per_allocation')
            p50=$(alloc_median "$s" '.latency.p50_us')
            p99=$(alloc_median "$s" '.latency.p99_us')
            gen=$(alloc_median "$s" '.own_cpu_cores')
            sat=$(jq -r '.alloc.generator_saturated' "$OUT"/json/"$s"-alloc-*.json | grep -c true || true)
            failed=$(alloc_median "$s" '.failed')
            awk -v s="$s" -v r="$rate" -v c="$cpu" -v a="$p50" -v b="$p99" -v g="$gen" -v sat="$sat" -v f="$failed" 'BEGIN {
                printf "| %s | %.0f | %.1f | %.0f | %.0f | %.0f %% of a core%s | %s |\n", s, r, c, a, b, g * 100,
                    (sat > 0 ? sprintf(" (saturated in %d runs)", sat) : ""), f }'
        done
        if [[ -n "$(alloc_median uturn '.per_sec')" && -n "$(alloc_median coturn '.per_sec' 2>/dev/null)" ]]; then
            awk -v u="$(alloc_median uturn '.per_sec')" -v c="$(alloc_median coturn '.per_sec')" 'BEGIN {
                if (c > 0) printf "\nuturn ÷ coturn, allocations per second: %.2f×\n", u / c }'
        fi
        echo
        echo "$engine_line"
        echo "alloc generator: $ALLOC_WORKERS workers, $ALLOC_CONCURRENCY handshakes in flight, $ALLOC_SOURCES source addresses, ${STEP_SECS} s windows, on core $GEN_CPU"
    } | tee -a "$OUT/results.md"
fi

# A against B (metrics on against off, or this build against UTURN_B), per workload: the median
# over the runs of server CPU per relayed packet at the knee step (per allocation for alloc) and
# of the knee (allocations per second).
if [[ -n "$AB" ]]; then
    command -v jq >/dev/null 2>&1 || { log "jq is required for the A/B summary"; exit 2; }
    if [[ -n "$METRICS_AB" ]]; then
        b_label=uturn-nometrics a_name="metrics on" b_name=off
    else
        b_label=uturn-b a_name="A (this build)" b_name="B"
    fi
    median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print "" }'; }
    figures() { # LABEL WORKLOAD -> "cpu rate"
        local files=("$OUT"/json/"$1"-"$2"-*.json) cpu rate
        # The knee step of each run, as `uturn-bench report` picks it (else its last step).
        cpu=$(jq -r 'if .alloc then .alloc.server_cpu_us_per_allocation * 1000
            else (.knee_pps as $k | (first(.steps[] | select(.target_pps == $k)) // .steps[-1])
                  .server_cpu_ns_per_packet) end // empty' "${files[@]}" | median)
        rate=$(jq -r 'if .alloc then .alloc.per_sec else .knee_pps end // empty' "${files[@]}" | median)
        echo "${cpu:-nan} ${rate:-nan}"
    }
    {
        echo
        echo "| workload | CPU ns/unit, $a_name | $b_name | A ÷ B | knee (alloc: /s), A | B | A ÷ B |"
        echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        for w in $WORKLOADS; do
            read -r con ron <<<"$(figures uturn "$w")"
            read -r coff roff <<<"$(figures "$b_label" "$w")"
            awk -v w="$w" -v a="$con" -v b="$coff" -v c="$ron" -v d="$roff" 'BEGIN {
                r1 = (b > 0) ? sprintf("%.3f", a / b) : "n/a"; r2 = (d > 0) ? sprintf("%.3f", c / d) : "n/a"
                printf "| %s | %.0f | %.0f | %s | %.0f | %.0f | %s |\n", w, a, b, r1, c, d, r2 }'
        done
        echo
        echo "Unit: ns of server CPU per relayed packet at the knee step; per allocation for alloc."
    } | tee -a "$OUT/results.md"
fi
log "results: $OUT/results.md, plots: $OUT/plots/"
