#!/usr/bin/env bash
# Proxy benchmark: veer against nginx and HAProxy, and against no proxy at all (the floor), on
# one machine and in one run.
#
#   benches/proxy_bench.sh                      # REPS=3 DURATION=10s: about 10 minutes
#   REPS=1 DURATION=3s benches/proxy_bench.sh   # a smoke run: about 1.5 minutes
#
# What it does:
# - installs nginx, haproxy and wrk with apt-get when they are missing (services are not
#   started), and builds veer and the open-loop helper (benches/openloop.rs) with cargo;
# - starts two loopback upstreams (one small nginx instance, two ports, 200 with a 7-byte body:
#   "stable" / "canary") pinned to LOAD_CPU;
# - for each repetition, starts in turn direct (no proxy: the load goes straight to the stable
#   upstream), veer, nginx and HAProxy, each with one worker/thread, a 90/10 split with upstream
#   keep-alive and no access log, pinned to PROXY_CPU; the load generators run on LOAD_CPU;
# - measures for each: closed-loop throughput (wrk, 64 and 256 connections; h2load over
#   cleartext HTTP/2, 64 connections x 10 streams; wrk over HTTPS, 64 connections, the same
#   self-signed certificate for every proxy), the proxy's CPU
#   time per request (utime+stime of the proxy's processes from /proc, before/after each wrk
#   run, divided by the requests wrk reports), open-loop latency at 2k and 5k req/s with
#   coordinated-omission correction (benches/openloop.rs), RSS idle and RSS with IDLE_CONNS
#   idle keep-alive client connections;
# - prints a Markdown table of medians (min–max) and each peer's ratio to nginx.
#
# Environment:
#   REPS (3), DURATION (10s; whole seconds, per measurement), IDLE_CONNS (10000),
#   RATES ("2000 5000"), CONNS ("64 256"), PEERS ("direct veer nginx haproxy"),
#   PROXY_CPU (0), LOAD_CPU (1), BASE_PORT (27100; ports BASE_PORT+1 .. +13 are used),
#   WORKERS (1): workers of veer, nginx worker processes, HAProxy threads; with more than one,
#     PROXY_CPU and LOAD_CPU default to CPUs 0..WORKERS-1 for both (proxy and load share the
#     cores: compare throughput) and wrk runs WORKERS threads;
#   H2 (1): also measure cleartext HTTP/2 with h2load (H2_CONNS 64 connections, H2_STREAMS 10
#     streams each) against every proxy; nginx and HAProxy get a second, HTTP/2-only listener;
#   TLS (1): also measure HTTPS clients (wrk, TLS_CONNS 64 keep-alive connections) against
#     every proxy, on a third listener with a certificate made by openssl for the run;
#   NICE (-20): priority of every process it starts, so that other work on a shared machine
#     takes less of the proxy's CPU; 0 turns it off;
#   RT (1): during the open-loop latency runs the proxy, the upstreams and the generator run
#     SCHED_FIFO, so a neighbour's compile cannot add run-queue waits to the tail; 0 turns it off;
#   VEER_BIN: a prebuilt veer to measure instead of building this tree (before/after runs);
#   OPENLOOP_BIN: a prebuilt benches/openloop.rs;
#   OUT_DIR (target/proxy-bench): results.tsv (every measurement), table.md, logs/;
#   KEEP_WORK=1 keeps the temporary directory with the generated configurations.
#
# Everything listens on and connects to 127.0.0.1 only. Every process it starts is stopped on
# exit, whatever the exit path.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

REPS=${REPS:-3}
DURATION=${DURATION:-10s}
IDLE_CONNS=${IDLE_CONNS:-10000}
RATES=${RATES:-"2000 5000"}
CONNS=${CONNS:-"64 256"}
PEERS=${PEERS:-"direct veer nginx haproxy"}
WORKERS=${WORKERS:-1}
if [[ $WORKERS -gt 1 ]]; then
    PROXY_CPU=${PROXY_CPU:-0-$((WORKERS - 1))}
    LOAD_CPU=${LOAD_CPU:-0-$((WORKERS - 1))}
fi
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
BASE_PORT=${BASE_PORT:-27100}
OUT_DIR=${OUT_DIR:-$ROOT/target/proxy-bench}
OPENLOOP_CONNS=${OPENLOOP_CONNS:-64}
H2=${H2:-1}
H2_CONNS=${H2_CONNS:-64}
H2_STREAMS=${H2_STREAMS:-10}
TLS=${TLS:-1}
TLS_CONNS=${TLS_CONNS:-64}
NICE=${NICE:--20}
RT=${RT:-1}

DUR_S=${DURATION%s}
if ! [[ $DUR_S =~ ^[0-9]+$ && $DUR_S -ge 1 && $REPS =~ ^[0-9]+$ && $REPS -ge 1 && $WORKERS =~ ^[1-9][0-9]*$ ]]; then
    echo "proxy_bench: DURATION must be whole seconds (e.g. 10s), REPS and WORKERS positive integers" >&2
    exit 2
fi

UP_STABLE=$((BASE_PORT + 1))
UP_CANARY=$((BASE_PORT + 2))
PROXY_PORT=$((BASE_PORT + 10))
ADMIN_PORT=$((BASE_PORT + 11))
# Cleartext HTTP/2 (prior knowledge) for the peers that need a listener of its own for it;
# veer tells HTTP/2 from HTTP/1.1 by the first bytes on its one port.
H2_PORT=$((BASE_PORT + 12))
# HTTPS for every proxy (HTTP/1.1 keep-alive clients).
TLS_PORT=$((BASE_PORT + 13))
CLK_TCK=$(getconf CLK_TCK)

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

# --------------------------------------------------------------------------------------------
# Processes (see lib.sh for STARTED and the cleanup on exit)
# --------------------------------------------------------------------------------------------
# pin CPU CMD...: runs CMD pinned to CPU, at the benchmark's priority.
pin() {
    local cpu=$1
    shift
    nice -n "$NICE" taskset -c "$cpu" "$@"
}

# start CPU LOGFILE CMD...: runs CMD pinned to CPU in the background; sets PID.
start() {
    local cpu=$1 logfile=$2
    shift 2
    # Not through a function: $! must be the command itself, not a subshell around it.
    nice -n "$NICE" taskset -c "$cpu" "$@" >"$logfile" 2>&1 &
    PID=$!
    STARTED+=("$PID")
}

# stop PID: stops it and forgets it.
stop() {
    local pid=$1 kept=() p
    stop_tree "$pid"
    for p in "${STARTED[@]}"; do
        [[ $p == "$pid" ]] || kept+=("$p")
    done
    STARTED=("${kept[@]+"${kept[@]}"}")
}

# --------------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------
port_free() { [[ -z $(ss -Htln "sport = :$1") ]]; }

# The proxy's processes: PID and its children (nginx's worker).
# shellcheck disable=SC2046
tree() { echo "$1" $(pgrep -P "$1" 2>/dev/null || true); }

# CPU ticks (utime+stime, all threads) of the proxy's processes.
cpu_ticks() {
    local p total=0 stat rest f
    for p in $(tree "$1"); do
        stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        rest=${stat##*) }
        read -r -a f <<<"$rest"
        # Fields after the command: state is field 3 of stat, utime 14 and stime 15.
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

# Resident memory of the proxy's processes, KiB.
rss_kib() {
    local p total=0 v
    for p in $(tree "$1"); do
        v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

RESULTS=
LOAD_START="?"
LOAD_END="?"
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$RESULTS"; }

# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------
write_nginx_conf() {
    local dir=$WORK/nginx-$1
    mkdir -p "$dir/tmp"
    cat >"$dir/nginx.conf" <<EOF
worker_processes $WORKERS;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
worker_rlimit_nofile $NOFILE;
events { worker_connections $((IDLE_CONNS + 2000)); }
http {
    access_log off;
    client_body_temp_path $dir/tmp;
    proxy_temp_path $dir/tmp;
    fastcgi_temp_path $dir/tmp;
    keepalive_timeout 300s;
    keepalive_requests 10000000;
    upstream app {
        server 127.0.0.1:$UP_STABLE weight=9;
        server 127.0.0.1:$UP_CANARY weight=1;
        keepalive 256;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$PROXY_PORT backlog=4096;
        listen 127.0.0.1:$H2_PORT http2 backlog=4096;
        listen 127.0.0.1:$TLS_PORT ssl backlog=4096;
        ssl_certificate $WORK/tls/cert.pem;
        ssl_certificate_key $WORK/tls/key.pem;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    echo "$dir/nginx.conf"
}

write_haproxy_conf() {
    local dir=$WORK/haproxy-$1
    mkdir -p "$dir"
    # No `log` line anywhere: no logging. HAProxy reserves two descriptors per connection;
    # `no strict-limits` lets it start when the open-file limit is below that (idle client
    # connections need only one).
    cat >"$dir/haproxy.cfg" <<EOF
global
    nbthread $WORKERS
    no strict-limits
    maxconn $((IDLE_CONNS + 2000))

defaults
    mode http
    maxconn $((IDLE_CONNS + 2000))
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-request 30s
    timeout http-keep-alive 300s
    http-reuse always

frontend bench
    bind 127.0.0.1:$PROXY_PORT
    bind 127.0.0.1:$H2_PORT proto h2
    bind 127.0.0.1:$TLS_PORT ssl crt $WORK/tls/combined.pem alpn http/1.1
    default_backend app

backend app
    balance roundrobin
    server stable 127.0.0.1:$UP_STABLE weight 90
    server canary 127.0.0.1:$UP_CANARY weight 10
EOF
    echo "$dir/haproxy.cfg"
}

# --------------------------------------------------------------------------------------------
# Peers: start_PEER REP sets PEER_PID (0 for direct) and TARGET (the port the load goes to).
# --------------------------------------------------------------------------------------------
start_direct() {
    PEER_PID=0
    TARGET=$UP_STABLE
    H2_TARGET=
    TLS_TARGET=
}

start_veer() {
    local conf
    conf=$WORK/veer-$1/veer.toml
    write_veer_conf "$conf" bench "workers = $WORKERS
max_connections = $((IDLE_CONNS + 2000))
tls_listen = \"127.0.0.1:$TLS_PORT\"
tls_cert = \"$WORK/tls/cert.pem\"
tls_key = \"$WORK/tls/key.pem\""
    "$VEER_BIN" check "$conf" >"$WORK/veer-$1/check.log" 2>&1 || die "veer check failed: $(cat "$WORK/veer-$1/check.log")"
    start "$PROXY_CPU" "$LOGS/veer-$1.log" "$VEER_BIN" run -c "$conf"
    PEER_PID=$PID
    TARGET=$PROXY_PORT
    H2_TARGET=$PROXY_PORT
    TLS_TARGET=$TLS_PORT
}

start_nginx() {
    local conf
    conf=$(write_nginx_conf "$1")
    start "$PROXY_CPU" "$LOGS/nginx-$1.log" nginx -p "$WORK/nginx-$1" -c "$conf" -e "$WORK/nginx-$1/error.log" -g 'daemon off;'
    PEER_PID=$PID
    TARGET=$PROXY_PORT
    H2_TARGET=$H2_PORT
    TLS_TARGET=$TLS_PORT
}

start_haproxy() {
    local conf
    conf=$(write_haproxy_conf "$1")
    haproxy -c -q -f "$conf" >"$LOGS/haproxy-check-$1.log" 2>&1 || die "haproxy config check failed: $(cat "$LOGS/haproxy-check-$1.log")"
    start "$PROXY_CPU" "$LOGS/haproxy-$1.log" haproxy -db -f "$conf"
    PEER_PID=$PID
    TARGET=$PROXY_PORT
    H2_TARGET=$H2_PORT
    TLS_TARGET=$TLS_PORT
}

# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------

# Share of the candidate in 200 sequential requests on one connection (the split check).
split_check() {
    local peer=$1 urls=() i body canary
    for i in $(seq 200); do urls+=("http://127.0.0.1:$TARGET/"); done
    body=$(curl -s --max-time 20 "${urls[@]}" || true)
    canary=$(grep -c '^canary$' <<<"$body" || true)
    record "$peer" split_pct "$(awk -v c="$canary" 'BEGIN { printf "%.1f", c / 2 }')"
}

# Busy and total jiffies of one CPU, from /proc/stat.
# CPUS is a taskset list: "1", "0,1" or "0-1".
cpu_jiffies() {
    local cpus=() part i
    for part in ${1//,/ }; do
        if [[ $part == *-* ]]; then
            for ((i = ${part%-*}; i <= ${part#*-}; i++)); do cpus+=("cpu$i"); done
        else
            cpus+=("cpu$part")
        fi
    done
    awk -v list="${cpus[*]}" 'BEGIN { n = split(list, l, " "); for (i = 1; i <= n; i++) want[l[i]] = 1 }
        $1 in want { for (i = 2; i <= 9; i++) { t += $i; if (i == 5 || i == 6) idle += $i } }
        END { print t - idle, t }' /proc/stat
}

# busy_pct BEFORE AFTER: share of the CPU's time spent busy between two cpu_jiffies readings.
busy_pct() {
    awk -v b="$1" -v a="$2" 'BEGIN { split(b, x, " "); split(a, y, " ");
        d = y[2] - x[2]; printf "%.0f", (d > 0 ? (y[1] - x[1]) / d * 100 : 0) }'
}

# wrk_run PEER CONNS [URL KEY]: closed-loop throughput and, for a proxy, its CPU per request,
# recorded as rps_KEY, cpu_KEY and own_KEY (KEY is CONNS for the plain HTTP runs).
wrk_run() {
    local peer=$1 conns=$2 url=${3:-http://127.0.0.1:$TARGET/} key=${4:-$2} out before=0 after=0 reqs rps errs c0 c1 l0 l1
    pin "$LOAD_CPU" timeout 30 wrk -t"$WORKERS" -c"$conns" -d1s "$url" >/dev/null 2>&1 || true
    if [[ $PEER_PID != 0 ]]; then before=$(cpu_ticks "$PEER_PID"); fi
    c0=$(cpu_jiffies "$PROXY_CPU")
    l0=$(cpu_jiffies "$LOAD_CPU")
    out=$(pin "$LOAD_CPU" timeout $((DUR_S + 30)) wrk -t"$WORKERS" -c"$conns" -d"${DUR_S}s" "$url" 2>&1) || true
    if [[ $PEER_PID != 0 ]]; then after=$(cpu_ticks "$PEER_PID"); fi
    c1=$(cpu_jiffies "$PROXY_CPU")
    l1=$(cpu_jiffies "$LOAD_CPU")
    printf '%s\n' "$out" >>"$LOGS/wrk-$peer.log"
    reqs=$(sed -n 's/^ *\([0-9]\+\) requests in .*/\1/p' <<<"$out")
    rps=$(sed -n 's/^Requests\/sec: *\([0-9.]\+\).*/\1/p' <<<"$out")
    errs=$(awk '/Non-2xx/ {n += $NF} /Socket errors/ {gsub(",", ""); n += $4 + $6 + $8 + $10} END {print n + 0}' <<<"$out")
    if [[ -z $reqs || -z $rps || $reqs -eq 0 ]]; then
        log "  wrk -c$conns $url: no result (see $LOGS/wrk-$peer.log)"
        return 0
    fi
    record "$peer" "rps_$key" "$rps"
    record "$peer" errors "$errs"
    local busy
    busy="CPU $PROXY_CPU busy $(busy_pct "$c0" "$c1")%, CPU $LOAD_CPU busy $(busy_pct "$l0" "$l1")%"
    if [[ $PEER_PID != 0 ]]; then
        local us own
        us=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.2f", t / hz * 1e6 / n }')
        own=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v d="$DUR_S" 'BEGIN { printf "%.0f", t / hz / d * 100 }')
        record "$peer" "cpu_$key" "$us"
        record "$peer" "own_$key" "$own"
        log "  wrk -c$conns $url: $rps req/s, $us µs CPU/req; $peer $own% of a CPU; $busy; errors $errs"
    else
        log "  wrk -c$conns $url: $rps req/s; $busy; errors $errs"
    fi
}

# h2load_run PEER: closed-loop cleartext HTTP/2 (prior knowledge), H2_CONNS connections with
# H2_STREAMS concurrent streams each, and the proxy's CPU per request.
h2load_run() {
    local peer=$1 out before after reqs rps us
    [[ -n $H2_TARGET && $PEER_PID != 0 ]] || return 0
    pin "$LOAD_CPU" timeout 30 h2load -c"$H2_CONNS" -m"$H2_STREAMS" -D 1 "http://127.0.0.1:$H2_TARGET/" >/dev/null 2>&1 || true
    before=$(cpu_ticks "$PEER_PID")
    out=$(pin "$LOAD_CPU" timeout $((DUR_S + 30)) h2load -c"$H2_CONNS" -m"$H2_STREAMS" -D "$DUR_S" "http://127.0.0.1:$H2_TARGET/" 2>&1) || true
    after=$(cpu_ticks "$PEER_PID")
    printf '%s\n' "$out" >>"$LOGS/h2load-$peer.log"
    # "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
    reqs=$(sed -n 's/^requests: .* \([0-9]\+\) succeeded.*/\1/p' <<<"$out")
    rps=$(sed -n 's/^finished in .*, \([0-9.]\+\) req\/s.*/\1/p' <<<"$out")
    if [[ -z $reqs || -z $rps || $reqs -eq 0 ]]; then
        log "  h2load: no result (see $LOGS/h2load-$peer.log)"
        return 0
    fi
    us=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.2f", t / hz * 1e6 / n }')
    record "$peer" rps_h2 "$rps"
    record "$peer" cpu_h2 "$us"
    record "$peer" errors "$(sed -n 's/^requests: .* \([0-9]\+\) failed.*/\1/p' <<<"$out")"
    log "  h2load -c$H2_CONNS -m$H2_STREAMS: $rps req/s, $us µs CPU/req"
}

# realtime on|off PID...: SCHED_FIFO (priority 1) for every thread of these processes and
# their children, or back to the normal scheduler (the nice value is kept).
realtime() {
    local mode=$1 p t
    shift
    [[ $RT == 1 ]] || return 0
    for p in "$@"; do
        [[ $p == 0 ]] && continue
        for t in $(tree "$p"); do
            if [[ $mode == on ]]; then
                chrt -f -a -p 1 "$t" >/dev/null 2>&1 || true
            else
                chrt -o -a -p 0 "$t" >/dev/null 2>&1 || true
            fi
        done
    done
}

# open_loop PEER RATE: latency at a fixed rate, from the scheduled send times.
open_loop() {
    local peer=$1 rate=$2 out k rt=()
    [[ $RT == 1 ]] && rt=(chrt -f 1)
    out=$(pin "$LOAD_CPU" timeout $((DUR_S + 40)) "${rt[@]}" "$OPENLOOP_BIN" rate "127.0.0.1:$TARGET" "$rate" "$DUR_S" "$OPENLOOP_CONNS" 1 2>&1) || true
    printf 'rate %s: %s\n' "$rate" "$out" >>"$LOGS/openloop-$peer.log"
    if ! [[ $out == *p99_us=* ]]; then
        log "  open loop $rate/s: no result: $out"
        return 0
    fi
    for k in p50 p99 p999 sched_lag_p99; do
        record "$peer" "${k}_$rate" "$(sed -n "s/.* ${k}_us=\([0-9.]*\).*/\1/p" <<<"$out")"
    done
    record "$peer" errors "$(sed -n 's/.* errors=\([0-9]*\).*/\1/p' <<<"$out")"
    log "  open loop $rate/s: $out"
}

# idle_conns PEER: RSS with IDLE_CONNS idle keep-alive connections (each has served one request).
idle_conns() {
    local peer=$1 before out pid i rss alive
    before=$(rss_kib "$PEER_PID")
    start "$LOAD_CPU" "$WORK/hold.out" "$OPENLOOP_BIN" hold "127.0.0.1:$TARGET" "$IDLE_CONNS" 60
    pid=$PID
    for i in $(seq 600); do
        grep -q '^ready' "$WORK/hold.out" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if ! grep -q '^ready' "$WORK/hold.out"; then
        log "  idle connections: helper did not get ready: $(tail -n 3 "$WORK/hold.out")"
        stop "$pid"
        return 0
    fi
    sleep 2
    rss=$(rss_kib "$PEER_PID")
    sleep 1.2
    alive=$(grep '^alive=' "$WORK/hold.out" | tail -n 1 | cut -d= -f2)
    out=$(grep '^ready' "$WORK/hold.out")
    stop "$pid"
    record "$peer" rss_conns_mib "$(awk -v k="$rss" 'BEGIN { printf "%.1f", k / 1024 }')"
    record "$peer" kib_per_conn "$(awk -v a="$rss" -v b="$before" -v n="$IDLE_CONNS" 'BEGIN { printf "%.1f", (a - b) / n }')"
    log "  $IDLE_CONNS idle connections: $out, alive=${alive:-?}; RSS $((before / 1024)) -> $((rss / 1024)) MiB"
    if [[ ${alive:-0} -lt $IDLE_CONNS ]]; then
        log "  warning: only ${alive:-0} of $IDLE_CONNS connections were still open"
    fi
}

# measure PEER REP: one peer's whole slot.
measure() {
    local peer=$1 rep=$2 c r
    log "rep $rep/$REPS: $peer"
    "start_$peer" "$rep"
    if ! wait_http "http://127.0.0.1:$TARGET/" 20; then
        log "  $peer did not answer on 127.0.0.1:$TARGET; last log lines:"
        tail -n 20 "$LOGS/$peer-$rep.log" >&2 || true
        die "$peer failed to start"
    fi
    if [[ $PEER_PID != 0 ]]; then
        sleep 0.5
        record "$peer" rss_idle_mib "$(awk -v k="$(rss_kib "$PEER_PID")" 'BEGIN { printf "%.1f", k / 1024 }')"
        split_check "$peer"
    fi
    for c in $CONNS; do wrk_run "$peer" "$c"; done
    [[ $H2 == 1 ]] && h2load_run "$peer"
    if [[ $TLS == 1 && -n $TLS_TARGET ]]; then wrk_run "$peer" "$TLS_CONNS" "https://127.0.0.1:$TLS_TARGET/" tls; fi
    realtime on "$PEER_PID" "$UPSTREAM_PID"
    for r in $RATES; do open_loop "$peer" "$r"; done
    realtime off "$PEER_PID" "$UPSTREAM_PID"
    if [[ $PEER_PID != 0 ]]; then
        if [[ $peer == veer ]]; then
            # The rollout must still be at 10%, and the metrics must have counted the traffic.
            curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/api/v1/routes/bench" >"$LOGS/veer-status-$rep.json" || true
            curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$LOGS/veer-metrics-$rep.txt" || true
            local phase weight
            phase=$(jq -r .phase "$LOGS/veer-status-$rep.json" 2>/dev/null || echo '?')
            weight=$(jq -r .candidate_weight "$LOGS/veer-status-$rep.json" 2>/dev/null || echo '?')
            log "  veer rollout: phase $phase, candidate weight $weight%"
            [[ $phase == progressing ]] || log "  warning: veer's rollout left the 10% step ($phase)"
        fi
        idle_conns "$peer"
        stop "$PEER_PID"
    fi
    port_free "$PROXY_PORT" || sleep 1
}

# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------

# stats PEER METRIC: "median min max n" of the recorded values, or nothing.
stats() {
    awk -F'\t' -v p="$1" -v m="$2" '$1 == p && $2 == m && $3 != "" { print $3 }' "$RESULTS" | sort -g |
        awk '{ v[NR] = $1 } END {
            if (NR == 0) exit
            med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            print med, v[1], v[NR], NR
        }'
}

fmt() { awk -v v="$1" -v d="$2" 'BEGIN { printf "%.*f", d, v }'; }

cell() {
    local s med min max n
    s=$(stats "$1" "$2")
    [[ -z $s ]] && { printf '—'; return; }
    read -r med min max n <<<"$s"
    if [[ $n -gt 1 ]]; then
        printf '%s (%s–%s)' "$(fmt "$med" "$3")" "$(fmt "$min" "$3")" "$(fmt "$max" "$3")"
    else
        fmt "$med" "$3"
    fi
}

ratio() {
    local a b
    a=$(stats "$1" "$2" | cut -d' ' -f1)
    b=$(stats nginx "$2" | cut -d' ' -f1)
    if [[ -z $a || -z $b ]] || awk -v b="$b" 'BEGIN { exit !(b == 0) }'; then
        printf '—'
    else
        awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f×", a / b }'
    fi
}

summary() {
    local peers others=() p row label metric digits
    read -r -a peers <<<"$PEERS"
    for p in "${peers[@]}"; do [[ $p == nginx ]] || others+=("$p"); done
    {
        echo "Proxy benchmark, $(date -u +%Y-%m-%d), REPS=$REPS DURATION=${DUR_S}s WORKERS=$WORKERS; proxy on CPU $PROXY_CPU, wrk/open-loop/upstreams on CPU $LOAD_CPU."
        echo "Medians (min–max) over $REPS repetition(s); ratios are median ÷ nginx median. Load average (1, 5, 15 min) at start $LOAD_START, at end $LOAD_END."
        echo
        row="| metric |"
        for p in "${peers[@]}"; do row+=" $p |"; done
        for p in "${others[@]}"; do [[ " ${peers[*]} " == *" nginx "* ]] && row+=" $p ÷ nginx |"; done
        echo "$row"
        row="|---|"
        for p in "${peers[@]}"; do row+="---|"; done
        for p in "${others[@]}"; do [[ " ${peers[*]} " == *" nginx "* ]] && row+="---|"; done
        echo "$row"
        local rows=()
        for c in $CONNS; do rows+=("rps_$c|throughput, $c conns (req/s)|0"); done
        for c in $CONNS; do rows+=("cpu_$c|**CPU per request**, $c conns (µs)|2"); done
        for c in $CONNS; do rows+=("own_$c|proxy's use of its CPU, $c conns (%)|0"); done
        if [[ $H2 == 1 ]]; then
            rows+=("rps_h2|HTTP/2 cleartext throughput, h2load c$H2_CONNS m$H2_STREAMS (req/s)|0"
                "cpu_h2|**CPU per request**, HTTP/2 cleartext (µs)|2")
        fi
        if [[ $TLS == 1 ]]; then
            rows+=("rps_tls|HTTPS throughput, $TLS_CONNS conns (req/s)|0"
                "cpu_tls|**CPU per request**, HTTPS, $TLS_CONNS conns (µs)|2")
        fi
        for r in $RATES; do
            rows+=("p50_$r|p50 at $r req/s (µs)|0" "p99_$r|p99 at $r req/s (µs)|0" "p999_$r|p99.9 at $r req/s (µs)|0"
                "sched_lag_p99_$r|(generator's own timer lag p99 at $r req/s, µs)|0")
        done
        rows+=("rss_idle_mib|RSS idle (MiB)|1" "rss_conns_mib|RSS with $IDLE_CONNS idle conns (MiB)|1"
            "kib_per_conn|KiB per idle conn|1" "split_pct|candidate share (%)|1")
        for spec in "${rows[@]}"; do
            IFS='|' read -r metric label digits <<<"$spec"
            row="| $label |"
            for p in "${peers[@]}"; do row+=" $(cell "$p" "$metric" "$digits") |"; done
            if [[ " ${peers[*]} " == *" nginx "* ]]; then
                for p in "${others[@]}"; do
                    if [[ $metric == own_* || $metric == sched_lag_* ]]; then
                        row+=" |"
                    else
                        row+=" $(ratio "$p" "$metric") |"
                    fi
                done
            fi
            echo "$row"
        done
        row="| errors (non-2xx + socket, all runs) |"
        for p in "${peers[@]}"; do
            row+=" $(awk -F'\t' -v p="$p" '$1 == p && $2 == "errors" { n += $3 } END { print n + 0 }' "$RESULTS") |"
        done
        for p in "${others[@]}"; do [[ " ${peers[*]} " == *" nginx "* ]] && row+=" |"; done
        echo "$row"
    } >"$OUT_DIR/table.md"
    cat "$OUT_DIR/table.md"
}

# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
main() {
    [[ $(nproc) -ge 2 ]] || log "warning: fewer than 2 CPUs; proxy and load share a CPU"
    ensure_packages nginx:nginx-light haproxy:haproxy wrk:wrk h2load:nghttp2-client taskset:util-linux chrt:util-linux curl:curl jq:jq \
        ss:iproute2 pgrep:procps openssl:openssl
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    if [[ -n $(nice -n "$NICE" true 2>&1) ]]; then
        log "warning: cannot run at nice $NICE; using 0"
        NICE=0
    fi
    if [[ $RT == 1 ]] && ! chrt -f 1 true 2>/dev/null; then
        log "warning: SCHED_FIFO is not allowed; open-loop latency runs at normal priority"
        RT=0
    fi
    NOFILE=$(ulimit -n)
    if [[ $NOFILE != unlimited && $((IDLE_CONNS + 500)) -gt $NOFILE ]]; then
        IDLE_CONNS=$((NOFILE - 500))
        log "warning: open-file limit $NOFILE; holding only $IDLE_CONNS idle connections"
    fi
    [[ $NOFILE == unlimited ]] && NOFILE=1048576
    build

    for p in $UP_STABLE $UP_CANARY $PROXY_PORT $ADMIN_PORT $H2_PORT $TLS_PORT; do
        port_free "$p" || die "127.0.0.1:$p is in use; set BASE_PORT to a free range"
    done

    WORK=$(mktemp -d /tmp/veer-proxy-bench.XXXXXX)
    mkdir -p "$OUT_DIR"
    LOGS=$OUT_DIR/logs
    rm -rf "$LOGS"
    mkdir -p "$LOGS"
    RESULTS=$OUT_DIR/results.tsv
    : >"$RESULTS"
    # One certificate for every proxy's HTTPS listener (the clients do not verify it).
    mkdir -p "$WORK/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
        -addext subjectAltName=IP:127.0.0.1,DNS:localhost \
        -keyout "$WORK/tls/key.pem" -out "$WORK/tls/cert.pem" >"$LOGS/openssl.log" 2>&1 ||
        die "openssl could not make a certificate: $(cat "$LOGS/openssl.log")"
    cat "$WORK/tls/cert.pem" "$WORK/tls/key.pem" >"$WORK/tls/combined.pem"

    log "versions: $(nginx -v 2>&1 | sed 's/.*: //'), $(haproxy -v | head -n 1 | cut -d' ' -f1-3), $(wrk -v 2>&1 | head -n 1 | cut -d' ' -f1-2), $("$VEER_BIN" --version) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo '+dirty'))"
    LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
    log "load average at start: $LOAD_START"

    write_upstream_conf "$WORK/upstream" "$NOFILE"
    start "$LOAD_CPU" "$LOGS/upstream.log" nginx -p "$WORK/upstream" -c "$WORK/upstream/nginx.conf" -e "$WORK/upstream/error.log" -g 'daemon off;'
    UPSTREAM_PID=$PID
    if ! wait_http "http://127.0.0.1:$UP_STABLE/" 10 || ! wait_http "http://127.0.0.1:$UP_CANARY/" 10; then
        die "upstreams did not start: $(cat "$WORK/upstream/error.log" 2>/dev/null)"
    fi

    local rep peer
    for ((rep = 1; rep <= REPS; rep++)); do
        for peer in $PEERS; do
            declare -F "start_$peer" >/dev/null || die "unknown peer $peer"
            measure "$peer" "$rep"
        done
    done
    LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
    log "load average at end: $LOAD_END"
    echo
    summary
    log "raw results: $RESULTS; logs: $LOGS; table: $OUT_DIR/table.md"
}

main "$@"
