#!/usr/bin/env bash
# Ceph end-to-end suite: starts a throwaway one-node cluster on 127.0.0.1 with cephx
# (tests/ceph/cluster.sh; CEPH_AUTH=none for one without auth), runs tests/ceph/e2e.sh and
# the other suites listed in `suites` below against it, stops it (by pid).
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
stop() { "$here/cluster.sh" stop "$work/cluster" >/dev/null 2>&1; rm -rf "$work"; }
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
rc=0
suites=(
  e2e.sh
  cephx.sh
  checkpoint.sh
  snapmap.sh
  diff.sh
  namespaces.sh
  fencing.sh
  differential.sh
  clones.sh
  snaps.sh
  owner_ops.sh
  quiesce.sh
  handover.sh
)
for s in "${suites[@]}"; do
  bash "$here/$s" 2>&1 | tee "$work/$s.out"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  T_PASS=$((T_PASS + $(grep -c '^PASS ' "$work/$s.out")))
  T_FAIL=$((T_FAIL + $(grep -c '^FAIL ' "$work/$s.out")))
done
echo "ceph suites (cluster, ${suites[*]}):"
t_summary && exit $rc
