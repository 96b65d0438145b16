#!/usr/bin/env bash
# Runs every test of rados-nbd: installs what is missing from Debian, checks formatting and lints,
# runs the Rust tests, then the end-to-end suites with real clients, a throwaway Ceph cluster and
# a real Linux kernel in qemu. Starts what it needs and stops it all. Ends with 'N passed, N failed'.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd); export ROOT
cd "$ROOT"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$HOME/.cargo/bin:$PATH
source tests/lib.sh
start=$(date +%s)
section() { echo; echo "=== $* ($(($(date +%s) - start)) s)"; }

section "dependencies"
bash tests/deps.sh || { echo "FAIL could not install test dependencies"; exit 1; }

features=()
[ -e /usr/include/rados/librados.h ] && features=(--all-features)

section "format and lints"
check "cargo fmt --check" cargo fmt --all -- --check
check "cargo clippy -D warnings" cargo clippy --workspace --all-targets "${features[@]}" -- -D warnings

section "build"
if ! cargo build --release --workspace "${features[@]}" 2>&1 | tail -3; then
  echo "FAIL release build"; exit 1
fi
export RADOS_NBD_BIN=$ROOT/target/release/rados-nbd

section "cargo test"
if cargo test --workspace "${features[@]}" 2>&1 | tee /tmp/rados-nbd-cargo-test.log | grep -E '^(test result|running|error|failures:|    [a-z_:]+$)'; then :; fi
if grep -q '^test result: FAILED' /tmp/rados-nbd-cargo-test.log || grep -q '^error' /tmp/rados-nbd-cargo-test.log; then
  # What failed and why, not only which test: CI keeps only this output.
  grep -A6 -E '^thread .* panicked at' /tmp/rados-nbd-cargo-test.log | grep -v '^stack backtrace' | head -60
  fail "cargo test"; else pass "cargo test"; fi

suite() {
  local name=$1; shift
  section "$name"
  local out rc
  out=$(mktemp)
  "$@" 2>&1 | tee "$out"; rc=${PIPESTATUS[0]}
  local p f
  p=$(grep -c '^PASS ' "$out"); f=$(grep -c '^FAIL ' "$out")
  T_PASS=$((T_PASS + p)); T_FAIL=$((T_FAIL + f))
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then fail "$name" "exited $rc"; fi
  rm -f "$out"
}

suite "real NBD clients (directory store)" bash tests/clients/run.sh
suite "quiesce hooks around snapshots (directory store)" bash tests/quiesce/run.sh
suite "reliability: crashes, ENOSPC/EIO, load, hostile clients, security" bash tests/reliability/run.sh
# The fuzzers need neither a cluster nor a VM, and the Ceph suites mostly wait (on the OSD,
# on watch and lock timeouts; much of the CPU is idle through them): the fuzz
# build and its 30 s run go beside them at the lowest CPU and disk priority, and are
# counted after. In a process group of their own, ended with the test command should it be
# stopped first (a background job of a script does not get the terminal's ^C).
fuzz_log=$(mktemp)
setsid ionice -c3 nice -n 19 bash fuzz/run.sh 30 >"$fuzz_log" 2>&1 &
fuzz_pid=$!
trap '[ -n "${fuzz_pid:-}" ] && kill -- "-$fuzz_pid" 2>/dev/null' EXIT
[ -f tests/ceph/run.sh ] && suite tests/ceph/run.sh bash tests/ceph/run.sh
fuzz_rc=0
wait "$fuzz_pid" || fuzz_rc=$?
fuzz_pid=
suite "fuzz: handshake, transmission, request parser (30 s, run beside the Ceph suites)" \
  bash -c 'cat "$1"; exit "$2"' fuzz "$fuzz_log" "$fuzz_rc"
rm -f "$fuzz_log"
for s in tests/vm/run.sh tests/packaging/run.sh; do
  [ -f "$s" ] && suite "$s" bash "$s"
done
# Skips itself without qemu or systemd.
suite "systemd units booted for real (VM with systemd as PID 1, directory store)" bash tests/vm/systemd-run.sh
# The 6.12 kernel (ublk); skips itself without qemu or a ublk-enabled binary.
suite "ublk transport (VM with the 6.12 kernel)" bash tests/vm/ublk-run.sh
# Skips itself without qemu, the Ceph binaries, a ceph-enabled binary or a network namespace.
suite "kernel devices of Ceph images (VM with a NIC, cluster in a namespace)" bash tests/vm/ceph-run.sh
# The same skips; the units' network-online ordering with a cluster only reachable over the NIC.
suite "systemd units with the Ceph store (VM with systemd as PID 1 and a NIC, cluster in a namespace)" bash tests/vm/systemd-ceph-run.sh
# Skips itself without the Ceph store (tests/ceph/cluster.sh, a ceph-enabled binary).
suite "ceph faults: OSD stopped mid-workload" bash tests/reliability/ceph-faults.sh

section "summary"
echo "took $(($(date +%s) - start)) s"
t_summary
