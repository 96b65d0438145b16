#!/usr/bin/env bash
# Differential test against librbd (tests/ceph/differential.py): seeded random sequences of
# NBD operations on an image served by rados-nbd, the same operations through librbd on a
# twin image, compared with Ceph's own code each time a serve ends. Needs the cluster named by
# $CEPH_CONF (tests/ceph/run.sh starts one). DIFF_SEQS sets the budget (default 32 sequences,
# a few minutes); DIFF_SEED replays a run; `differential.py --long` is the bench-style mode.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
: "${CEPH_CONF:?set CEPH_CONF (tests/ceph/run.sh does)}"
export CEPH_CONF RADOS_NBD_BIN=$BIN
for m in rbd rados nbd; do
  "$PY" -c "import $m" 2>/dev/null || { fail "differential: python module $m missing (tests/deps.sh installs it)"; t_summary; exit 1; }
done
# The whole run is bounded: a hung client or server cannot stall the suite.
run_counted timeout -k 10 "${DIFF_TIMEOUT:-1500}" "$PY" -u "$here/differential.py" "$@"
t_summary
