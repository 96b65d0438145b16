#!/usr/bin/env bash
# One command for the benchmarks: bench/run.sh [--quick] [--only rados-nbd,nbdkit,...]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$HOME/.cargo/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
bash tests/deps.sh
[ -e /usr/lib/python3/dist-packages/matplotlib ] || { apt-get install -y -qq python3-matplotlib >/dev/null; }
cargo build --release -p rados-nbd
exec /usr/bin/python3 bench/bench.py "$@"
