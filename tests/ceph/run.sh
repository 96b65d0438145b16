#!/usr/bin/env bash
# Ceph end-to-end suite: starts a throwaway one-node cluster on 127.0.0.1 with cephx
# (tests/ceph/cluster.sh; CEPH_AUTH=none for one without auth), runs tests/ceph/e2e.sh and
# the other suites listed in `suites` below against it, three at a time (CEPH_JOBS), stops it
# (by pid).
# Skipped, with a message, when the Ceph binaries or the ceph-enabled binary are missing.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
for b in ceph-mon ceph-osd rbd rados; do
  command -v "$b" >/dev/null || { echo "SKIP ceph suite: $b not installed"; exit 0; }
done
if ! has_ceph "$BIN"; then
  echo "SKIP ceph suite: $BIN was built without feature ceph"; exit 0
fi
work=$(mktemp -d /tmp/rados-nbd-ceph.XXXXXX)
# The suites still running (interrupted: the lanes below run in the background, which ignores
# SIGINT) are ended first, by the pids they left in $work/*.pid; their own traps stop theirs.
stop() {
  local f
  for f in "$work"/*.pid; do [ -e "$f" ] && kill "$(cat "$f")" 2>/dev/null; done
  "$here/cluster.sh" stop "$work/cluster" >/dev/null 2>&1; rm -rf "$work"
}
trap stop EXIT
t0=$(date +%s%N)
if ! out=$("$here/cluster.sh" start "$work/cluster" 2>&1); then
  fail "start ceph cluster" "$(echo "$out" | tail -5)"; exit 1
fi
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
pass "one-node cluster (auth: ${CEPH_AUTH:-cephx}) up in $((ms / 1000)).$((ms % 1000 / 100)) s"
export CEPH_CONF=$work/cluster/ceph.conf
# The restricted client the daemon runs as (printed by cluster.sh with cephx only).
CEPH_NBD_ID=$(sed -n 's/^CEPH_NBD_ID=//p' <<<"$out")
CEPH_NBD_KEYRING=$(sed -n 's/^CEPH_NBD_KEYRING=//p' <<<"$out")
export CEPH_NBD_ID CEPH_NBD_KEYRING
# Each suite prints its own 'N passed, N failed'; the last line is the total of this run.
# The suites share the cluster and the pool but not their images, and much of their time is
# waiting (for the OSD, a dead daemon's watch, a timeout under test; the 2-CPU machine was
# 70-80% idle with two at once): CEPH_JOBS (default 3) of them run at once, each taking the
# next of the list below when it ends: longest first, as timed with three at once (each
# suite 15-50% slower than with two, the whole stage 11.4 min instead of 15.3), so that
# the lanes end close together. A suite's output is printed
# whole when it ends. CEPH_JOBS=1 runs them one after the other, in this order.
rc=0
suites=(
  differential.sh
  clone_differential.sh
  owner_ops.sh
  datapool.sh
  clones.sh
  e2e.sh
  diff.sh
  snaps.sh
  handover.sh
  fencing.sh
  checkpoint.sh
  lockless.sh
  quiesce.sh
  namespaces.sh
  snapmap.sh
  cephx.sh
)
jobs=${CEPH_JOBS:-3}
case $jobs in ''|*[!0-9]*|0) echo "CEPH_JOBS must be a positive number, not '$jobs'"; exit 2 ;; esac
echo 0 >"$work/next"
# lane: runs the suite the shared counter names next until none is left.
lane() {
  local i s t0
  while :; do
    i=$( (flock 9; i=$(cat "$work/next"); echo $((i + 1)) >"$work/next"; echo "$i") 9>"$work/next.lock")
    [ "$i" -lt "${#suites[@]}" ] || return 0
    s=${suites[$i]}
    t0=$(date +%s)
    bash "$here/$s" >"$work/$s.out" 2>&1 &
    echo $! >"$work/$s.pid"
    wait $!
    echo $? >"$work/$s.rc"
    rm -f "$work/$s.pid"
    # One suite's output at a time, whole.
    (flock 9; cat "$work/$s.out"; echo "# $s: $(($(date +%s) - t0)) s") 9>"$work/print.lock"
  done
}
lanes=()
for _ in $(seq 1 "$jobs"); do lane & lanes+=($!); done
wait "${lanes[@]}"
for s in "${suites[@]}"; do
  [ "$(cat "$work/$s.rc" 2>/dev/null)" = 0 ] || { rc=1; [ -e "$work/$s.rc" ] || fail "$s did not run"; }
  T_PASS=$((T_PASS + $(cat "$work/$s.out" 2>/dev/null | grep -c '^PASS ')))
  T_FAIL=$((T_FAIL + $(cat "$work/$s.out" 2>/dev/null | grep -c '^FAIL ')))
done
echo "ceph suites (cluster, ${suites[*]}; $jobs at once):"
t_summary && exit $rc
