#!/usr/bin/env bash
# fuzz-smoke: builds every fuzz target and runs each for N seconds (default 30), each on one
# core, as many at once as there are cores (FUZZ_PARALLEL to change), starting from the
# committed seeds in corpus/<target>/. New corpus
# entries go to a temporary directory, so the committed seeds stay as they are. Prints
# executions and time per target; exits non-zero if any target crashed, hung, leaked or
# ran out of memory, with the reproducing input under fuzz/artifacts/<target>/.
#
# Usage: fuzz/smoke.sh [seconds] [target...]
set -euo pipefail

seconds=${1:-30}
shift || true
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}

command -v cargo-fuzz >/dev/null || { echo "fuzz-smoke: cargo-fuzz is missing; cargo install cargo-fuzz" >&2; exit 2; }
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)

cargo fuzz build >&2

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The targets' disk images and sockets, removed with the rest.
export EMBER_FUZZ_SCRATCH="$work/scratch"
mkdir -p "$EMBER_FUZZ_SCRATCH"
parallel=${FUZZ_PARALLEL:-$(nproc)}

# Runs one target; its table row goes to $work/<target>.row, and a crash leaves
# $work/<target>.failed.
run_one() {
    local target=$1 log="$work/$1.log" status=0 runs secs rate result
    mkdir -p "$work/$target" "artifacts/$target"
    # -timeout: an input that runs for 10 s is a hang, reported like a crash.
    cargo fuzz run "$target" "$work/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="artifacts/$target/" >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    if [ "$status" -eq 0 ]; then
        result=ok
    else
        result="CRASH (exit $status; log: artifacts/$target/smoke.log)"
        cp "$log" "artifacts/$target/smoke.log"
        touch "$work/$target.failed"
    fi
    printf '%-16s %12s %8s %10s  %s\n' "$target" "${runs:-?}" "${secs:-?}" "${rate:-?}" "$result" \
        >"$work/$target.row"
}

for target in "${targets[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do wait -n || true; done
    run_one "$target" &
done
wait

failed=()
printf '%-16s %12s %8s %10s  %s\n' target executions seconds exec/s result
for target in "${targets[@]}"; do
    cat "$work/$target.row" 2>/dev/null || printf '%-16s  no result\n' "$target"
    if [ -e "$work/$target.failed" ] || [ ! -e "$work/$target.row" ]; then
        failed+=("$target")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz-smoke: crashes in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz-smoke: ${#targets[@]} targets, no crashes"
