#!/bin/bash
# Fuzz the NBD server for a bounded time: fuzz/run.sh [SECONDS] [TARGET...]
#   SECONDS  total budget, shared between the targets (default 60)
#   TARGET   handshake | transmission | request (default: all three)
# libFuzzer (libfuzzer-sys) on the stable toolchain: the coverage instrumentation that
# cargo-fuzz would ask nightly for is passed as plain -C flags. Seeds, a minimized corpus
# (cov-*) and past crashes come from protocol/tests/fuzz-corpus/<target>/; the growing corpus lives in
# fuzz/corpus/<target>/ (not checked in). A crash or hang fails the run and leaves its
# input in fuzz/artifacts/<target>/: copy it into protocol/tests/fuzz-corpus/<target>/ so
# `cargo test -p nbd-protocol --test fuzz_regressions` replays it from then on. To refresh
# the checked-in corpus after a long run: target/<triple>/release/<target> -merge=1
# -max_len=16384 NEWDIR corpus/<target> ../protocol/tests/fuzz-corpus/<target>, then copy
# NEWDIR's files in as cov-<sha1>.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(handshake transmission request)
case $secs in '' | *[!0-9]*) echo "fuzz/run.sh: SECONDS must be a number, got '$secs'" >&2; exit 2 ;; esac

triple=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# --target keeps the flags off build scripts and proc macros.
cargo build --release --target "$triple" --bins --quiet
per=$(( secs / ${#targets[@]} ))
[ "$per" -ge 1 ] || per=1
status=0; npass=0; nfail=0
for t in "${targets[@]}"; do
    seeds=../protocol/tests/fuzz-corpus/$t
    [ -d "$seeds" ] || { echo "fuzz/run.sh: unknown target $t" >&2; exit 2; }
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "== fuzzing $t for ${per}s"
    # -rss_limit_mb: a leak or unbounded buffering is a finding too.
    if ! "target/$triple/release/$t" "corpus/$t" "$seeds" \
        -max_total_time="$per" -timeout=20 -rss_limit_mb=2048 -max_len=131072 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 2>"artifacts/$t.log"; then
        status=1; nfail=$((nfail + 1))
        echo "FAIL fuzz $t: crash or hang, input in fuzz/artifacts/$t/ (log fuzz/artifacts/$t.log):"
        grep -E "ERROR|panicked|SUMMARY|Test unit written" "artifacts/$t.log" | head -20 || true
    else
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "artifacts/$t.log")
        cov=$(grep -oE 'cov: [0-9]+' "artifacts/$t.log" | tail -1)
        npass=$((npass + 1))
        echo "PASS fuzz $t: ${runs:-?} inputs, $cov, no crash"
    fi
done
echo "$npass passed, $nfail failed"
exit $status
