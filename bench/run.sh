#!/usr/bin/env bash
# One command for the benchmarks (see bench/README.md):
#   bench/run.sh [--quick] [--ceph] [--no-dir] [--rounds N] [--only PEER,...] [--jobs JOB,...]
#   bench/run.sh --report bench/results.json    (only rewrite results.md and ratios.png)
#   bench/run.sh --checkpoint-rtt [ROUNDS]       (only what --checkpoint-idle costs on Ceph)
#   bench/run.sh --clone-depth [--quick]         (only reads and copy-up through clone chains)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$HOME/.cargo/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
bash tests/deps.sh
# The chart needs matplotlib from Debian (the bench runs under /usr/bin/python3 for libnbd).
if ! /usr/bin/python3 -c 'import matplotlib' 2>/dev/null; then
  apt-get install -y -qq python3-matplotlib >/dev/null
fi
features=()
build=1
for a in "$@"; do
  [ "$a" = --ceph ] && features=(--features ceph)
  [ "$a" = --checkpoint-rtt ] && features=(--features ceph)
  [ "$a" = --clone-depth ] && features=(--features ceph)
  [ "$a" = --report ] && build=0
done
if [ "$build" = 1 ] && [ -z "${RADOS_NBD_BIN:-}" ]; then
  cargo build --release -p rados-nbd "${features[@]}"
fi
exec /usr/bin/python3 bench/bench.py "$@"
