#!/usr/bin/env bash
# Run the fuzz targets (docs/reliability.md): build them, make the seed corpora from
# the reference models and data, then run each target in turn and print one line of
# figures per target. A crash or an out-of-memory (> 2 GiB) fails at once.
#
#   fuzz/run.sh SECONDS [TARGET...]              each target for SECONDS (CI: 60)
#   RUNS=10000000 fuzz/run.sh 3600 gguf_model    stop at RUNS inputs or SECONDS
#   FUZZ_SEED=1 fuzz/run.sh 60                   the same inputs on every run (CI)
#
# Hangs: libFuzzer's -timeout is wall-clock time, so on a busy machine (a build beside
# the fuzzer) a quick input can pass it. The fuzzer therefore runs in fork mode, which
# records such inputs (artifacts/TARGET/timeout-*) and goes on; afterwards each one is
# run again alone, and any input that still takes over 1 s fails the run.
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`),
# and the reference models (`python3 models/fetch.py`).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(gguf_model tokenizer chat_template saved_context gate_file server_request)
fi
runs=${RUNS:--1}
seed=()
if [ -n "${FUZZ_SEED:-}" ]; then
    seed=(-seed="$FUZZ_SEED")
fi
bin_dir=target/x86_64-unknown-linux-gnu/release

cargo +nightly fuzz build
cargo +nightly run --release --quiet --bin seeds

mkdir -p logs
# Known leaks that are not fastkv's to fix (see the file).
export LSAN_OPTIONS="suppressions=$PWD/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
for t in "${targets[@]}"; do
    log=logs/$t.log
    mkdir -p "artifacts/$t"
    stamp=$(mktemp)
    status=0
    cargo +nightly fuzz run "$t" "corpus/$t" -- \
        -fork=1 -ignore_timeouts=1 -ignore_ooms=0 -ignore_crashes=0 \
        -max_total_time="$secs" -runs="$runs" -timeout=1 -rss_limit_mb=2048 "${seed[@]}" \
        >"$log" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        echo "FAIL $t (exit $status): see fuzz/$log and fuzz/artifacts/$t/" >&2
        grep -E "ERROR|panicked|Test unit written" "$log" | head -5 >&2 || true
        rm -f "$stamp"
        exit 1
    fi
    # Inputs that passed the timeout under load: each must run in under 1 s alone.
    slow=0
    while IFS= read -r -d '' a; do
        slow=$((slow + 1))
        if ! "$bin_dir/$t" -timeout=1 -rss_limit_mb=2048 "$a" >"$log.rerun" 2>&1; then
            echo "FAIL $t: $a takes over 1 s (or crashes) when run alone" >&2
            tail -5 "$log.rerun" >&2
            rm -f "$stamp"
            exit 1
        fi
    done < <(find "artifacts/$t" -name 'timeout-*' -newer "$stamp" -print0)
    rm -f "$stamp" "$log.rerun"
    last=$(grep -E '^#[0-9]+: cov:' "$log" | tail -1)
    execs=$(sed -E 's/^#([0-9]+):.*/\1/' <<<"$last")
    rate=$(sed -E 's/.*exec\/s: ([0-9]+).*/\1/' <<<"$last")
    took=$(sed -E 's/.* time: ([0-9]+)s.*/\1/' <<<"$last")
    printf '%-15s %12s execs in %6s s (%s exec/s); %d slow under load, none over 1 s alone\n' \
        "$t" "${execs:-?}" "${took:-?}" "${rate:-?}" "$slow"
done
