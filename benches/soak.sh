#!/usr/bin/env bash
# Soak: veer under a steady open-loop rate for a long time, with its resident memory (RSS) and
# open file descriptors sampled every second; prints their growth after the warm-up.
#
#   benches/soak.sh                               # 10 minutes at 1,000 req/s (the documented run)
#   DURATION=30 benches/soak.sh                   # a 30-second check that the script works
#
# What it does:
# - builds veer (cargo build --release) and the open-loop generator (benches/openloop.rs), unless
#   VEER_BIN / OPENLOOP_BIN name prebuilt ones; installs nginx with apt-get if it is missing (its
#   service is not started);
# - starts two loopback upstreams (one small nginx, two ports) and veer with one route whose
#   candidate holds at 10% for the whole run (one-hour step), so the control plane ticks, judges
#   and checkpoints its evidence all along;
# - sends RATE requests/s over CONNS keep-alive connections for DURATION seconds and samples
#   veer's VmRSS and open fds each second;
# - after the warm-up, compares the median of the first WINDOW samples with the median of the
#   last WINDOW samples: the goal is RSS flat within 5%, and the fd count flat: no new high in
#   the second half of the run after the warm-up (a pool that settles one connection higher is
#   not a leak; a leak keeps setting new highs).
#   Exits 1 when a goal is missed or any request failed (warm-up included).
#
# Environment:
#   DURATION (600, seconds), RATE (1000), CONNS (32), WARMUP (60, or a third of a shorter run),
#   WINDOW (30, or a quarter of what follows the warm-up), BASE_PORT (27300; ports +1, +2, +10,
#   +11), VEER_BIN, OPENLOOP_BIN, OUT_DIR (target/soak): samples.tsv (t, rss_kib, fds),
#   summary.txt, veer.log, load.log.
#
# Everything listens on and connects to 127.0.0.1 only. Every process it starts is stopped on
# exit, whatever the exit path.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DURATION=${DURATION:-600}
RATE=${RATE:-1000}
CONNS=${CONNS:-32}
BASE_PORT=${BASE_PORT:-27300}
OUT_DIR=${OUT_DIR:-$ROOT/target/soak}
for v in DURATION RATE CONNS BASE_PORT; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -ge 1 ]] || {
        echo "soak: $v must be a positive integer" >&2
        exit 2
    }
done
[[ $DURATION -ge 12 ]] || {
    echo "soak: DURATION must be at least 12 seconds" >&2
    exit 2
}
WARMUP=${WARMUP:-$((DURATION >= 180 ? 60 : DURATION / 3))}
WINDOW=${WINDOW:-$(((DURATION - WARMUP) / 4 < 30 ? (DURATION - WARMUP) / 4 : 30))}
[[ $WINDOW -ge 1 ]] || WINDOW=1

UP_STABLE=$((BASE_PORT + 1))
UP_CANARY=$((BASE_PORT + 2))
PROXY_PORT=$((BASE_PORT + 10))
ADMIN_PORT=$((BASE_PORT + 11))

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

STARTED=()
WORK=
cleanup() {
    local rc=$? i pid
    trap - EXIT INT TERM
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
        pid=${STARTED[i]}
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    [[ -n $WORK && -d $WORK ]] && rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ensure_nginx() {
    command -v nginx >/dev/null 2>&1 && return 0
    [[ $(id -u) -eq 0 ]] || die "nginx is missing; run as root or install it with apt-get"
    log "installing nginx-light with apt-get"
    local guard=
    # Debian starts a package's service on install unless policy-rc.d says no: say no.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        guard=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light
    } >&2 || rc=$?
    [[ -n $guard ]] && rm -f /usr/sbin/policy-rc.d
    [[ $rc -eq 0 ]] || die "apt-get install nginx-light failed"
}

build() {
    if [[ -z ${VEER_BIN:-} ]]; then
        log "cargo build --release"
        cargo build --release >&2
        VEER_BIN=$ROOT/target/release/veer
    fi
    [[ -x $VEER_BIN ]] || die "VEER_BIN=$VEER_BIN is not executable"
    if [[ -z ${OPENLOOP_BIN:-} ]]; then
        log "cargo build --release --bench openloop"
        OPENLOOP_BIN=$(cargo build --release --bench openloop --message-format=json |
            sed -n 's/.*"executable":"\([^"]*openloop[^"]*\)".*/\1/p' | tail -n 1)
    fi
    [[ -n $OPENLOOP_BIN && -x $OPENLOOP_BIN ]] || die "could not build benches/openloop.rs"
}

# wait_http URL SECONDS: polls URL until it answers 200.
wait_http() {
    local deadline=$((SECONDS + $2))
    until curl -fsS -o /dev/null "$1" 2>/dev/null; do
        [[ $SECONDS -lt $deadline ]] || return 1
        sleep 0.1
    done
}

# median FILE COLUMN FIRST_T LAST_T: the median of COLUMN over samples with FIRST_T <= t <= LAST_T.
median() {
    awk -v c="$2" -v a="$3" -v b="$4" 'NR > 1 && $1 >= a && $1 <= b { print $c }' "$1" | sort -n |
        awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

main() {
    command -v curl >/dev/null 2>&1 || die "curl is needed"
    ensure_nginx
    build
    mkdir -p "$OUT_DIR"
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/veer-soak.XXXXXX")
    mkdir -p "$WORK/upstream/tmp" "$WORK/veer"

    cat >"$WORK/upstream/nginx.conf" <<EOF
worker_processes 1;
pid $WORK/upstream/nginx.pid;
error_log $WORK/upstream/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/upstream/tmp;
    proxy_temp_path $WORK/upstream/tmp;
    fastcgi_temp_path $WORK/upstream/tmp;
    keepalive_timeout 300s;
    keepalive_requests 10000000;
    default_type text/plain;
    server { listen 127.0.0.1:$UP_STABLE; location / { return 200 "stable\n"; } }
    server { listen 127.0.0.1:$UP_CANARY; location / { return 200 "canary\n"; } }
}
EOF
    cat >"$WORK/veer/veer.toml" <<EOF
[server]
listen = "127.0.0.1:$PROXY_PORT"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[state]
dir = "$WORK/veer/state"

[[routes]]
name = "soak"

[routes.stable]
version = "v1"
endpoints = ["127.0.0.1:$UP_STABLE"]

[routes.candidate]
version = "v2"
endpoints = ["127.0.0.1:$UP_CANARY"]

[routes.rollout]
steps = [10, 100]
step_interval = "1h"
min_requests = 0
EOF

    nginx -p "$WORK/upstream" -c "$WORK/upstream/nginx.conf" -e "$WORK/upstream/error.log" -g 'daemon off;' \
        >"$OUT_DIR/upstream.log" 2>&1 &
    STARTED+=("$!")
    wait_http "http://127.0.0.1:$UP_STABLE/" 10 || die "upstreams did not start: $(cat "$WORK/upstream/error.log")"

    "$VEER_BIN" run -c "$WORK/veer/veer.toml" >"$OUT_DIR/veer.log" 2>&1 &
    local veer=$!
    STARTED+=("$veer")
    wait_http "http://127.0.0.1:$ADMIN_PORT/readyz" 20 || die "veer did not start: $(tail -n 5 "$OUT_DIR/veer.log")"

    log "soak: $RATE req/s over $CONNS connections for ${DURATION}s (warm-up ${WARMUP}s, windows of ${WINDOW}s); veer pid $veer"
    # Every request counts (no warm-up exclusion in the generator): latencies cover the whole run.
    "$OPENLOOP_BIN" rate "127.0.0.1:$PROXY_PORT" "$RATE" "$DURATION" "$CONNS" 0 >"$OUT_DIR/load.log" 2>&1 &
    local load=$!
    STARTED+=("$load")

    local samples=$OUT_DIR/samples.tsv start=$SECONDS t rss fds
    printf 't\trss_kib\tfds\n' >"$samples"
    # One sample a second while the load runs (bounded by DURATION + 30 s).
    while kill -0 "$load" 2>/dev/null && ((SECONDS - start <= DURATION + 30)); do
        t=$((SECONDS - start))
        kill -0 "$veer" 2>/dev/null || die "veer exited during the soak: $(tail -n 5 "$OUT_DIR/veer.log")"
        rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$veer/status")
        fds=$(find "/proc/$veer/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
        printf '%s\t%s\t%s\n' "$t" "$rss" "$fds" >>"$samples"
        if ((t % 60 == 0)); then log "t=${t}s rss=${rss} KiB fds=$fds"; fi
        sleep 1
    done
    local load_rc=0
    wait "$load" || load_rc=$?
    [[ $load_rc -eq 0 ]] || die "the load generator failed: $(cat "$OUT_DIR/load.log")"

    local last_t first_a first_b last_a rss0 rss1 fds0 fds1
    last_t=$(awk 'NR > 1 { t = $1 } END { print t }' "$samples")
    first_a=$WARMUP
    first_b=$((WARMUP + WINDOW - 1))
    last_a=$((last_t - WINDOW + 1))
    rss0=$(median "$samples" 2 "$first_a" "$first_b")
    rss1=$(median "$samples" 2 "$last_a" "$last_t")
    fds0=$(median "$samples" 3 "$first_a" "$first_b")
    fds1=$(median "$samples" 3 "$last_a" "$last_t")
    local rss_max fds_max fds_max1 fds_max2 half errors late load_line rss_pct rss_ok fds_ok
    # max FILE COLUMN FIRST_T LAST_T
    max() { awk -v c="$2" -v a="$3" -v b="$4" 'NR > 1 && $1 >= a && $1 <= b && $c > m { m = $c } END { print m + 0 }' "$1"; }
    half=$(((WARMUP + last_t) / 2))
    rss_max=$(max "$samples" 2 "$WARMUP" "$last_t")
    fds_max=$(max "$samples" 3 "$WARMUP" "$last_t")
    fds_max1=$(max "$samples" 3 "$WARMUP" "$half")
    fds_max2=$(max "$samples" 3 $((half + 1)) "$last_t")
    load_line=$(tail -n 1 "$OUT_DIR/load.log")
    errors=$(sed -n 's/.*errors=\([0-9]*\).*/\1/p' <<<"$load_line")
    late=$(sed -n 's/.*late=\([0-9]*\).*/\1/p' <<<"$load_line")
    rss_pct=$(awk -v a="$rss0" -v b="$rss1" 'BEGIN { printf "%+.1f", (b - a) * 100 / a }')
    rss_ok=$(awk -v a="$rss0" -v b="$rss1" 'BEGIN { print ((b - a) * 100 / a <= 5) ? "yes" : "NO" }')
    fds_ok=$(awk -v a="$fds_max1" -v b="$fds_max2" 'BEGIN { print (b <= a) ? "yes" : "NO" }')

    {
        echo "veer soak, $(date -u +%Y-%m-%d), $("$VEER_BIN" --version) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'))"
        echo "load: $RATE req/s over $CONNS connections for ${DURATION}s; $load_line"
        echo "warm-up ${WARMUP}s; medians of the first and last ${WINDOW}s after it:"
        echo "  RSS  ${rss0} KiB -> ${rss1} KiB (${rss_pct}%), max ${rss_max} KiB; flat within 5%: $rss_ok"
        echo "  fds  ${fds0} -> ${fds1}, max ${fds_max} (first half ${fds_max1}, second half ${fds_max2}); flat: $fds_ok"
        echo "  failed requests: ${errors:-?} (connections that never reported: ${late:-?})"
    } | tee "$OUT_DIR/summary.txt"
    [[ $rss_ok == yes && $fds_ok == yes && ${errors:-1} == 0 && ${late:-1} == 0 ]]
}

main "$@"
