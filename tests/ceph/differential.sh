#!/usr/bin/env bash
# Differential test against librbd (tests/ceph/differential.py): seeded random sequences of
# NBD operations on an image served by rados-nbd, the same operations through librbd on a
# twin image, compared with Ceph's own code each time a serve ends. Needs the cluster named by
# $CEPH_CONF (tests/ceph/run.sh starts one). DIFF_SEQS sets the budget (default 32 sequences,
# a few minutes), after the cases of tests/ceph/diff-cases; DIFF_SEED replays a run; `differential.py --long` is the bench-style mode.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
: "${CEPH_CONF:?set CEPH_CONF (tests/ceph/run.sh does)}"
export CEPH_CONF RADOS_NBD_BIN=$BIN
for m in rbd rados nbd; do
  "$PY" -c "import $m" 2>/dev/null || { fail "differential: python module $m missing (tests/deps.sh installs it)"; t_summary; exit 1; }
done
# First the cases earlier runs found (tests/ceph/diff-cases: clone-*.json with --clone,
# flat-*.json without), each replayed as it was minimised; then the seeded run. The whole
# run is bounded: a hung client or server cannot stall the suite.
kind=flat
for a in "$@"; do [ "$a" = --clone ] && kind=clone; done
for c in "$here"/diff-cases/$kind-*.json; do
  [ -e "$c" ] || continue
  run_counted again_if_crashed timeout -k 10 600 "$PY" -u "$here/differential.py" --replay "$c"
done
# The test process (python3-rbd, librados) has crashed by itself: see again_if_crashed.
run_counted again_if_crashed timeout -k 10 "${DIFF_TIMEOUT:-1500}" "$PY" -u "$here/differential.py" "$@"
t_summary
