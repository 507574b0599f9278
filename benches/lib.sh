# shellcheck shell=bash
# Shared by benches/proxy_bench.sh and benches/soak.sh (sourced, not run): logging, the
# processes a benchmark starts and their cleanup, package installs, builds, probes, and the
# configurations of the loopback upstreams and of veer.
#
# The sourcing script sets ROOT, and before calling the configuration helpers UP_STABLE,
# UP_CANARY, PROXY_PORT and ADMIN_PORT.

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# --------------------------------------------------------------------------------------------
# Processes: everything started is recorded in STARTED and stopped on exit; WORK, the
# temporary directory, is removed (kept with KEEP_WORK=1).
# --------------------------------------------------------------------------------------------
STARTED=()
WORK=

# stop_tree PID: stops PID and its children (nginx's workers): TERM, then KILL after 5 s.
stop_tree() {
    local pid=$1 kids i
    kill -0 "$pid" 2>/dev/null || return 0
    kids=$(pgrep -P "$pid" 2>/dev/null || true)
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    # shellcheck disable=SC2086
    kill -KILL "$pid" $kids 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? pid i
    trap - EXIT INT TERM
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
        pid=${STARTED[i]}
        stop_tree "$pid"
    done
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ ${KEEP_WORK:-0} == 1 ]]; then
            log "kept $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --------------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------------

# ensure_packages COMMAND:PACKAGE...: installs with apt-get the packages of the commands that
# are missing, without starting their services.
ensure_packages() {
    local missing=() pair guard=
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; run as root or install them with apt-get"
    log "installing ${missing[*]} with apt-get"
    # Debian starts a package's service on install unless policy-rc.d says no: say no.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        guard=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    } >&2 || rc=$?
    [[ -n $guard ]] && rm -f /usr/sbin/policy-rc.d
    [[ $rc -eq 0 ]] || die "apt-get install ${missing[*]} failed"
}

# build: sets VEER_BIN and OPENLOOP_BIN, building with cargo what the environment does not
# name already.
build() {
    if [[ -n ${VEER_BIN:-} ]]; then
        [[ -x $VEER_BIN ]] || die "VEER_BIN=$VEER_BIN is not executable"
    else
        log "cargo build --release"
        cargo build --release >&2
        VEER_BIN=$ROOT/target/release/veer
    fi
    if [[ -z ${OPENLOOP_BIN:-} ]]; then
        log "cargo build --release --bench openloop"
        OPENLOOP_BIN=$(cargo build --release --bench openloop --message-format=json |
            sed -n 's/.*"executable":"\([^"]*openloop[^"]*\)".*/\1/p' | tail -n 1)
    fi
    [[ -n $OPENLOOP_BIN && -x $OPENLOOP_BIN ]] || die "could not build benches/openloop.rs"
}

# wait_http URL [SECONDS]: polls URL until it answers 200.
wait_http() {
    local url=$1 limit=${2:-20} i
    for ((i = 0; i < limit * 10; i++)); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true) == 200 ]] && return 0
        sleep 0.1
    done
    return 1
}

# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------

# write_upstream_conf DIR NOFILE: one nginx, two ports, answering 200 with "stable\n" on
# UP_STABLE and "canary\n" on UP_CANARY; its config is DIR/nginx.conf.
write_upstream_conf() {
    local dir=$1
    mkdir -p "$dir/tmp"
    cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
worker_rlimit_nofile $2;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/tmp;
    proxy_temp_path $dir/tmp;
    fastcgi_temp_path $dir/tmp;
    keepalive_timeout 300s;
    keepalive_requests 10000000;
    default_type text/plain;
    server {
        listen 127.0.0.1:$UP_STABLE backlog=4096;
        location / { return 200 "stable\n"; }
    }
    server {
        listen 127.0.0.1:$UP_CANARY backlog=4096;
        location / { return 200 "canary\n"; }
    }
}
EOF
}

# write_veer_conf FILE ROUTE [SERVER_KEYS]: a veer config on PROXY_PORT and ADMIN_PORT (state
# next to FILE) with one route over the two upstreams whose candidate holds at 10% for the
# whole run: the next step is an hour away, and steps need no minimum of requests.
write_veer_conf() {
    local file=$1 state
    state=$(dirname "$file")/state
    mkdir -p "$state"
    cat >"$file" <<EOF
[server]
listen = "127.0.0.1:$PROXY_PORT"
${3:-}

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[state]
dir = "$state"

[[routes]]
name = "$2"

[routes.stable]
version = "stable"
endpoints = ["127.0.0.1:$UP_STABLE"]

[routes.candidate]
version = "canary"
endpoints = ["127.0.0.1:$UP_CANARY"]

[routes.rollout]
steps = [10, 100]
step_interval = "1h"
min_requests = 0
EOF
}
