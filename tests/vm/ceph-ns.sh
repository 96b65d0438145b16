# The test VM beside a throwaway Ceph cluster, inside a network namespace of its own. Sourced by
# tests/vm/ceph-run.sh (the kernel suites on Ceph images) and bench/kernel.sh (rados-nbd, rbd-nbd
# and krbd side by side in one guest kernel).
#
# The network exists only inside the namespace made here: a tap device at $addr/24
# (10.77.0.1), the cluster (tests/ceph/cluster.sh) bound to that address, qemu on the tap, the
# guest at $guest (10.77.0.2). Nothing is bound to another address and no traffic leaves the
# namespace. The kernel is fetched (once, from Debian) before the namespace exists: nothing
# inside it can reach a mirror.
#
# The caller sets `work` (its work folder; the cluster goes to $work/ceph) and then:
#   cephns_missing [CMD...]   prints the first command missing (qemu, Ceph, ip, CMD...); 1 if none
#   cephns_binary [BINARY]    prints the rados-nbd to test (see below; before `work` is needed)
#   cephns_suite_binary [BINARY]   the same for a test suite, into $bin: calls the caller's
#                             `skip` when the binary lacks feature ceph, exits on any other failure
#   cephns_prepare            fetches the VM's kernel (before the namespace)
#   cephns_make               makes the namespace and its tap; on failure prints why, returns 1
#   cephns_cluster            starts the cluster in it (CEPH_MON_V1 etc. passed on), exports
#                             CEPH_CONF and writes $work/ceph/guest.conf (the guest's paths)
#   cephns_boot SCRIPT NAME=VALUE...   tests/vm/vm.sh SCRIPT $work ... on the tap, in the namespace
#   cephns_teardown           stops the cluster, ends what still runs in the namespace, removes it
# and may use nsx (run in the namespace), rbd (the host's rbd, in the namespace, bounded),
# listens_only_on_addr and idle.
cephns_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cephns_root=$(cd "$cephns_dir/../.." && pwd)
ns=${ns:-rados-nbd-vm-$$}
addr=10.77.0.1 guest=10.77.0.2

nsx() { ip netns exec "$ns" "$@"; }
# `rbd` on the host runs inside the namespace (the cluster has no other address); omap_check
# (tests/lib.sh) calls this one too. Bounded: rbd waits forever for a cluster that is gone.
rbd() { nsx timeout 120 /usr/bin/rbd "$@"; }
# tests/lib.sh exports its own rbd to `bash -c` children; this one needs nsx, which they lack.
export -fn rbd
listens_only_on_addr() { ! nsx ss -Hltnu | awk '{print $5}' | grep -v "^$addr:" | grep .; }
# idle IMAGE: what a clean close leaves: flags clean (no "object map invalid"), no lock, no
# watcher.
idle() {
  local f l
  f=$(rbd info "$1" --format json | jq -r '.flags[]') && [ -z "$f" ] || { echo "flags: $f"; return 1; }
  l=$(rbd lock ls "$1") && [ -z "$l" ] || { echo "locks: $l"; return 1; }
  rbd status "$1" | grep -q 'Watchers: none' || { rbd status "$1"; return 1; }
}

cephns_missing() {
  local b
  for b in qemu-system-x86_64 ceph-mon ceph-osd rbd ip "$@"; do
    command -v "$b" >/dev/null 2>&1 || { echo "$b"; return 0; }
  done
  return 1
}

# cephns_binary [BINARY]: prints the rados-nbd binary to use: BINARY, else $RADOS_NBD_BIN, else
# a release build with feature ceph made here (its output on stderr). Returns 1 when the build
# fails, 2 (saying why on stderr) when the binary is not an executable, 3 (silently: callers
# skip or refuse as fits them) when it was built without feature ceph.
cephns_binary() {
  local bin=${1:-${RADOS_NBD_BIN:-}}
  if [ -z "$bin" ]; then
    echo "== building rados-nbd (release, feature ceph)" >&2
    (cd "$cephns_root" && cargo build --release -p rados-nbd --features ceph) >&2 || return 1
    bin=$cephns_root/target/release/rados-nbd
  fi
  [ -x "$bin" ] || { echo "$bin is not an executable" >&2; return 2; }
  has_ceph "$bin" || return 3
  echo "$bin"
}

cephns_suite_binary() {
  local rc
  bin=$(cephns_binary "${1:-}")
  rc=$?
  case $rc in
    0) ;;
    3) skip "${1:-${RADOS_NBD_BIN:-rados-nbd}} was built without feature ceph" ;;
    *) exit "$rc" ;;
  esac
}

cephns_prepare() { bash "$cephns_dir/vm.sh" --prepare; }

cephns_make() {
  ip netns add "$ns" 2>"$work/netns.err" || {
    echo "cannot make a network namespace ($(head -1 "$work/netns.err"))"
    return 1
  }
  # From here on, cephns_teardown removes the namespace (and its tap) whatever happens.
  if ! { nsx ip link set lo up && nsx ip tuntap add dev tap0 mode tap &&
    nsx ip addr add "$addr/24" dev tap0 && nsx ip link set tap0 up; } 2>"$work/netns.err"; then
    echo "cannot make a tap device in the namespace ($(head -1 "$work/netns.err"))"
    return 1
  fi
}

cephns_cluster() {
  CEPH_ADDR=$addr nsx "$cephns_root/tests/ceph/cluster.sh" start "$work/ceph" || return 1
  export CEPH_CONF=$work/ceph/ceph.conf
  # The guest sees the work folder at /mnt: its copy of the config names the files there.
  sed "s#$work#/mnt#g" "$CEPH_CONF" >"$work/ceph/guest.conf"
}

cephns_boot() {
  local script=$1
  shift
  VM_TAP=tap0 VM_GUEST_ADDR=$guest/24 VM_ROOT_CACHE=${VM_ROOT_CACHE:-loose} \
    nsx bash "$cephns_dir/vm.sh" "$script" "$work" "$@"
}

cephns_teardown() {
  local p
  [ -f "$work/ceph/ceph.conf" ] && "$cephns_root/tests/ceph/cluster.sh" stop "$work/ceph" >/dev/null 2>&1
  # Whatever still runs in the namespace was started by the caller (qemu after an interrupt).
  if ip netns pids "$ns" >/dev/null 2>&1; then
    for p in $(ip netns pids "$ns"); do kill "$p" 2>/dev/null; done
    sleep 0.5
    for p in $(ip netns pids "$ns"); do kill -9 "$p" 2>/dev/null; done
    nsx ip link del tap0 2>/dev/null
    ip netns del "$ns" 2>/dev/null
  fi
  return 0
}
