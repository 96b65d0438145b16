#!/usr/bin/env bash
# Ceph end-to-end suite: starts a throwaway one-node cluster on 127.0.0.1
# (tests/ceph/cluster.sh), runs tests/ceph/e2e.sh against it, stops it (by pid).
# Skipped, with a message, when the Ceph binaries or the ceph-enabled binary are missing.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
for b in ceph-mon ceph-osd rbd rados; do
  command -v "$b" >/dev/null || { echo "SKIP ceph suite: $b not installed"; exit 0; }
done
if ! "$BIN" --store ceph: ls >/dev/null 2>&1 && "$BIN" --store ceph: ls 2>&1 | grep -q "no Ceph support"; then
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
pass "one-node cluster up in $((ms / 1000)).$((ms % 1000 / 100)) s"
export CEPH_CONF=$work/cluster/ceph.conf
bash "$here/e2e.sh"
