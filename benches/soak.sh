#!/usr/bin/env bash
# Soak: veer under a steady open-loop rate for a long time, with its resident memory (RSS) and
# open file descriptors sampled every second; prints their growth after the warm-up.
#
#   benches/soak.sh                               # 10 minutes at 1,000 req/s (the documented run)
#   DURATION=30 benches/soak.sh                   # a 30-second check that the script works
#
# What it does:
# - builds veer (cargo build --release) and the open-loop generator (benches/openloop.rs), unless
#   VEER_BIN / OPENLOOP_BIN name prebuilt ones; installs nginx and curl with apt-get if they are
#   missing (services are not started);
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

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

# median FILE COLUMN FIRST_T LAST_T: the median of COLUMN over samples with FIRST_T <= t <= LAST_T.
median() {
    awk -v c="$2" -v a="$3" -v b="$4" 'NR > 1 && $1 >= a && $1 <= b { print $c }' "$1" | sort -n |
        awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

main() {
    ensure_packages nginx:nginx-light curl:curl
    build
    mkdir -p "$OUT_DIR"
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/veer-soak.XXXXXX")

    write_upstream_conf "$WORK/upstream" 4096
    write_veer_conf "$WORK/veer/veer.toml" soak

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
