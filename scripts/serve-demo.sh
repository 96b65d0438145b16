#!/usr/bin/env bash
# The main job: build rados-nbd, create an image in the embedded directory store (no cluster
# needed) and serve it over NBD on a unix socket until Ctrl-C (a clean close: the object map is
# written and the dirty flag cleared).
#   STORE (default ./demo-store), IMAGE (default demo), SIZE (default 10G; as rbd create --size: MiB unless a unit is given), SOCKET (default ./demo.sock)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$HOME/.cargo/bin:$PATH
STORE=${STORE:-$PWD/demo-store}; IMAGE=${IMAGE:-demo}; SIZE=${SIZE:-10G}; SOCKET=${SOCKET:-$PWD/demo.sock}
cargo build --release -p rados-nbd >&2
bin=$PWD/target/release/rados-nbd
mkdir -p "$STORE"
export RADOS_NBD_STORE=$STORE
"$bin" info "$IMAGE" >/dev/null 2>&1 || "$bin" create --size "$SIZE" "$IMAGE"
"$bin" info "$IMAGE"
cat >&2 <<MSG
Connect with any NBD client, for example:
  nbdinfo --map 'nbd+unix:///$IMAGE?socket=$SOCKET'
  qemu-img info 'nbd+unix:///$IMAGE?socket=$SOCKET'
  nbdcopy disk.raw 'nbd+unix:///$IMAGE?socket=$SOCKET'
MSG
exec "$bin" serve "$IMAGE" --socket "$SOCKET"
