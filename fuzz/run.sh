#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time: `fuzz/run.sh`, or `FUZZ_SECONDS=600 fuzz/run.sh`.
#
# Installs cargo-fuzz with `cargo install` when it is missing. cargo-fuzz passes nightly-only flags
# (-Zsanitizer=address, ...); RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
# Each target's corpus is kept in fuzz/corpus/<target> between runs (config_parse is seeded
# from config/ and tests/config_corpus/). A crash leaves its input in fuzz/artifacts/<target>/
# and makes this script exit non-zero once every target has run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

seconds=${FUZZ_SECONDS:-60}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz/run.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

# admin_request starts a proxy whose state directory lives under TMPDIR: keep it in memory
# when possible (it fsyncs its journal) and remove it afterwards.
scratch=$(mktemp -d "$([[ -w /dev/shm ]] && echo /dev/shm || echo "${TMPDIR:-/tmp}")/veer-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

mkdir -p corpus/config_parse
for seed in ../config/*.toml ../tests/config_corpus/*; do
    if [[ $seed != *.md && $(stat -c %s "$seed") -le 16384 ]]; then
        cp "$seed" corpus/config_parse/
    fi
done

cargo fuzz build
failed=()
for target in $(cargo fuzz list); do
    mkdir -p "corpus/$target"
    log="$scratch/$target.log"
    # Config files run to a few KiB (the seeds are up to 16 KiB); requests stay at the default 4 KiB.
    max_len=4096
    if [[ $target == config_parse ]]; then
        max_len=16384
    fi
    echo "==> $target for ${seconds}s" >&2
    if TMPDIR=$scratch cargo fuzz run "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len="$max_len" -print_final_stats=1 \
        >"$log" 2>&1; then
        grep -E '^#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::peak_rss_mb' "$log" >&2
    else
        tail -n 60 "$log" >&2
        failed+=("$target")
    fi
done

if ((${#failed[@]})); then
    echo "fuzzing found problems in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "no crashes in ${seconds}s per target" >&2
