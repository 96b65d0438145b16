#!/usr/bin/env bash
# Kernel-attach tests of Ceph images: the test VM (tests/vm/vm.sh) with a real NIC reaches a
# throwaway one-node cluster (tests/ceph/cluster.sh), maps Ceph images with `rados-nbd map` and
# runs tests/vm/ceph-kernel-tests.sh; meanwhile the host runs what the guest asks of a second
# client (`rbd resize`, `snap create`, `bench`, `export`), and checks the images with `rbd` after.
#
#   tests/vm/ceph-run.sh [BINARY]        (or RADOS_NBD_BIN=BINARY tests/vm/ceph-run.sh)
#
# The network exists only inside a namespace made here (tests/vm/ceph-ns.sh): a tap device at
# 10.77.0.1/24, the cluster bound to that address, qemu on the tap, the guest at 10.77.0.2.
# Nothing is bound to another address and no traffic leaves the namespace; the namespace, the
# tap, the cluster and the VM are gone at the end, on failure too. The kernel is fetched (once,
# from Debian) before the namespace exists: nothing inside it can reach a mirror.
#
# Skips (exit 0, says so) when qemu, the Ceph binaries or a ceph-enabled rados-nbd are missing,
# or the namespace cannot be made (not root, no tun). KEEP_WORK=1 keeps the work folder (kept on
# failure too); LAPS=1 shows the guest's time between checks; PARTS=ublk runs only the second
# boot (the ublk transport; for working on it), PARTS=nbd only the first.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
source "$root/tests/lib.sh"
source "$here/ceph-ns.sh"
T0=$(date +%s)
skip() { echo "SKIP kernel tests on Ceph images: $*; nothing was run"; exit 0; }

if b=$(cephns_missing); then skip "$b is not installed (tests/deps.sh)"; fi
cephns_suite_binary "${1:-}"
work=$(mktemp -d "${TMPDIR:-/tmp}/rados-nbd-vmceph.XXXXXX")
IMG=vmceph-ext IMG_MB=32 RAW=vmceph-raw RAW_MB=16
# XFS: 320 MiB (mkfs.xfs refuses less than 300 MB); LIVE: ext4 killed under fio, resized,
# snapshotted; BENCH: written by the guest and by `rbd bench` from the host.
XFS=vmceph-xfs LIVE=vmceph-live LIVE_MB=24 LIVE_GROWN_MB=32 BENCH=vmceph-bench BENCH_MB=16
# rbd-nbd's command lines, run by rbd-nbd and by rados-nbd in turn (the oracle of "change one word").
COMPAT=vmceph-compat
# UBLK: the ublk transport's image, served by a second boot with the 6.12 kernel (Debian's 6.1
# has no ublk) when the binary was built with feature ublk.
UBLK=vmceph-ublk UBLK_MB=48
ublk=
"$bin" --version 2>/dev/null | grep -q 'transports: nbd, ublk' && ublk=1
PARTS=${PARTS:-nbd ublk}
nbd=
[[ " $PARTS " == *" nbd "* ]] && nbd=1
[[ " $PARTS " == *" ublk "* ]] || ublk=
cleanup() {
  # A second SIGTERM/SIGINT must not cut the cleanup short (the trap below would exit here).
  trap '' INT TERM
  [ -n "${rpc_pid:-}" ] && kill "$rpc_pid" 2>/dev/null
  cephns_teardown
  if [ -n "${KEEP_WORK:-}" ] || [ "$T_FAIL" -gt 0 ]; then
    # Keep the logs and the console for a post-mortem, not the cluster's 64 GiB sparse store.
    rm -rf "$work/ceph/osd0" "$work/ceph/mon" "$work/rados-nbd"
    echo "work folder kept: $work"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The kernel comes from Debian's mirror: fetch it before the namespace exists.
cephns_prepare || { fail "fetch the test VM's kernel"; t_summary; exit 1; }
if [ -n "$ublk" ]; then
  RADOS_NBD_VM_KERNEL=6.12 cephns_prepare || { fail "fetch the 6.12 kernel (ublk)"; t_summary; exit 1; }
fi

# From here on, cleanup removes the namespace (and its tap) whatever happens.
why=$(cephns_make) || skip "$why"

t=$(date +%s)
if ! cephns_cluster >"$work/cluster.out" 2>&1; then
  fail "start the cluster in the namespace" "$(tail -5 "$work/cluster.out")"; t_summary; exit 1
fi
pass "one-node cluster bound to $addr in namespace $ns (up in $(($(date +%s) - t)) s)"
check "the cluster listens on $addr only" listens_only_on_addr
check "create $IMG ($IMG_MB MiB), $RAW ($RAW_MB MiB), $XFS, $LIVE, $BENCH with rbd" \
  eval "rbd create --size ${IMG_MB}M $IMG && rbd create --size ${RAW_MB}M $RAW &&
    rbd create --size 320M $XFS && rbd create --size ${LIVE_MB}M $LIVE && rbd create --size ${BENCH_MB}M $BENCH &&
    rbd create --size ${UBLK_MB}M $UBLK && rbd create --size 16M $COMPAT"

# What the guest asks of the host while it runs (ceph-kernel-tests.sh `host`): a second
# client beside its map (`rbd resize`, `rbd snap create`, `rbd bench`, `rbd export`) and the
# checks below. A request is a file $work/rpc/ID.req, one word a line, whose first word must
# be one of these functions; the answer is ID.out (its output) and then ID.rc (its status).
unlocked() { # IMAGE: flags clean, no lock (a read-only map's)
  local f l
  f=$(rbd info "$1" --format json | jq -r '.flags[]') && [ -z "$f" ] || { echo "flags: $f"; return 1; }
  l=$(rbd lock ls "$1") && [ -z "$l" ] || { echo "locks: $l"; return 1; }
}
export_md5() { # IMAGE[@SNAP]: the md5 of `rbd export`
  local s
  s=$(rbd export "$1" - 2>/dev/null | md5sum) || { echo "rbd export $1 failed"; return 1; }
  echo "${s%% *}"
}
snap_fs() { # IMAGE@SNAP FILE TEXT: the snapshot's export is a clean ext4 (e2fsck -fn) with FILE holding TEXT
  local f=$work/snap.raw r=0 got
  rbd export "$1" "$f" >/dev/null 2>&1 || { echo "rbd export $1 failed"; return 1; }
  e2fsck -fn "$f" >"$work/snap-fsck.txt" 2>&1 || { echo "e2fsck -fn of rbd export $1:"; tail -8 "$work/snap-fsck.txt"; r=1; }
  if [ $r = 0 ]; then
    got=$(debugfs -R "cat /$2" "$f" 2>/dev/null)
    [ "$got" = "$3" ] || { echo "/$2 in the snapshot: '$got', want '$3'"; r=1; }
  fi
  rm -f "$f"
  return $r
}
bench_write() { # IMAGE BYTES: rbd bench --io-type write of BYTES from offset 0, 64 KiB at a time
  # (One thread: with N, thread i writes from i/N of the image.)
  rbd bench --io-type write --io-size 64K --io-threads 1 --io-total "$2" --io-pattern seq "$1"
}
refused_bench() { # IMAGE: a 64 KiB rbd bench write fails at once with EROFS (the lock refused)
  local rc=0
  nsx timeout 30 /usr/bin/rbd bench --io-type write --io-size 64K --io-total 64K "$1" >"$work/bench.out" 2>&1 || rc=$?
  if [ $rc = 0 ] || ! grep -q "bench failed: (30) Read-only file system" "$work/bench.out"; then
    echo "rbd bench: exit $rc"; tail -3 "$work/bench.out"; return 1
  fi
}
host_requests() {
  local r n a
  while :; do
    for r in "$work"/rpc/*.req; do
      [ -e "$r" ] || continue
      n=${r%.req}
      mapfile -t a <"$r"
      rm -f "$r"
      case ${a[0]:-} in
        rbd | idle | unlocked | omap_check | export_md5 | snap_fs | bench_write | refused_bench)
          ("${a[@]}") >"$n.out" 2>&1 </dev/null; echo $? >"$n.st" ;;
        *) echo "ceph-run.sh: the guest may not run '${a[0]:-}'" >"$n.out"; echo 127 >"$n.st" ;;
      esac
      mv "$n.st" "$n.rc"
    done
    sleep 0.1
  done
}

# Without its debug info (a release build here: 90 MB, 17 MB without): the guest copies it to
# its tmpfs.
objcopy --strip-debug "$bin" "$work/rados-nbd" 2>/dev/null || cp "$bin" "$work/rados-nbd"
cp "$here/ceph-kernel-tests.sh" "$root/packaging/rados-nbd_quiesce" "$work/"
mkdir -p "$work/out" "$work/logs" "$work/rpc"
host_requests &
rpc_pid=$!
# guest_results FILE STATUS: the console interleaves the kernel's boot noise; show the test
# lines and count them.
guest_results() {
  grep -E '^(PASS|FAIL|==|    |vm.sh:|GUEST-EXIT)' "$1"
  T_PASS=$((T_PASS + $(grep -c '^PASS ' "$1")))
  T_FAIL=$((T_FAIL + $(grep -c '^FAIL ' "$1")))
  if ! grep -qE '^[0-9]+ passed, [0-9]+ failed' "$1"; then
    fail "the guest suite did not finish (status $2)" "console in $1"
    tail -30 "$1"
  fi
}
if [ -n "$nbd" ]; then
  echo "== booting the test VM in $ns (guest $guest; work dir $work)"
  VM_ROOT_CACHE=loose cephns_boot "$work/ceph-kernel-tests.sh" \
    RADOS_NBD_BIN=/mnt/rados-nbd CEPH_CONF=/mnt/ceph/guest.conf CEPH_NBD_ID=nbd \
    CEPH_NBD_KEYRING=/mnt/ceph/client.nbd.keyring IMG=$IMG RAW=$RAW RAW_MB=$RAW_MB \
    XFS=$XFS LIVE=$LIVE LIVE_MB=$LIVE_MB LIVE_GROWN_MB=$LIVE_GROWN_MB BENCH=$BENCH BENCH_MB=$BENCH_MB \
    COMPAT=$COMPAT QUIESCE_HOOK=/mnt/rados-nbd_quiesce RPC=/mnt/rpc \
    OUT=/mnt/out LOGDIR=/mnt/logs LAPS="${LAPS:-}" >"$work/vm-output.txt" 2>&1 &
  # Waited for in the background so that SIGTERM/SIGINT end this script (and cleanup ends the VM)
  # at once, not after the guest.
  wait $!
  rc=$?
  guest_results "$work/vm-output.txt" $rc
fi
if [ -n "$ublk" ]; then
  echo "== booting the test VM again, with the 6.12 kernel: the ublk transport of a Ceph image"
  VM_ROOT_CACHE=loose RADOS_NBD_VM_KERNEL=6.12 cephns_boot "$work/ceph-kernel-tests.sh" PART=ublk \
    RADOS_NBD_BIN=/mnt/rados-nbd CEPH_CONF=/mnt/ceph/guest.conf CEPH_NBD_ID=nbd \
    CEPH_NBD_KEYRING=/mnt/ceph/client.nbd.keyring IMG=$IMG RAW=$RAW RAW_MB=$RAW_MB \
    XFS=$XFS LIVE=$LIVE LIVE_MB=$LIVE_MB LIVE_GROWN_MB=$LIVE_GROWN_MB BENCH=$BENCH BENCH_MB=$BENCH_MB \
    UBLK=$UBLK UBLK_MB=$UBLK_MB QUIESCE_HOOK=/mnt/rados-nbd_quiesce RPC=/mnt/rpc \
    OUT=/mnt/out LOGDIR=/mnt/logs LAPS="${LAPS:-}" >"$work/vm-ublk-output.txt" 2>&1 &
  wait $!
  rc=$?
  guest_results "$work/vm-ublk-output.txt" $rc
else
  echo "    (no ublk boot: PARTS=$PARTS, or $bin has no --transport: built without feature ublk)"
fi
kill "$rpc_pid" 2>/dev/null
wait "$rpc_pid" 2>/dev/null
rpc_pid=

echo "== on the host, after the guest"
same_sum() { # IMAGE SUMFILE BYTES: the first BYTES of `rbd export IMAGE` hash to SUMFILE
  local want got
  want=$(cat "$2" 2>/dev/null) || { echo "no $2 from the guest"; return 1; }
  got=$(rbd export "$1" - 2>/dev/null | head -c "$3" | md5sum | cut -d' ' -f1)
  [ -n "$want" ] && [ "$got" = "$want" ] || { echo "rbd export $1: $got, the guest read $want"; return 1; }
}
imgs=
if [ -n "$nbd" ]; then
  check "rbd export of $IMG equals what the guest read from its device" \
    same_sum "$IMG" "$work/out/$IMG.md5" $((IMG_MB << 20))
  check "rbd export of $RAW equals the $RAW_MB MiB the guest wrote with dd" \
    same_sum "$RAW" "$work/out/$RAW.md5" $((RAW_MB << 20))
  check "rbd export of $BENCH equals what the guest read (its writes and rbd bench's)" \
    same_sum "$BENCH" "$work/out/$BENCH.md5" $((BENCH_MB << 20))
  check "$LIVE is $LIVE_GROWN_MB MiB (rbd resize while mapped)" \
    eval "[ \"\$(rbd info $LIVE --format json | jq .size)\" = $((LIVE_GROWN_MB << 20)) ]"
  check "$LIVE@s1: rbd object-map check passes" omap_check "$LIVE@s1"
  imgs="$IMG $RAW $XFS $LIVE $BENCH $COMPAT"
fi
if [ -n "$ublk" ]; then
  check "rbd export of $UBLK equals what the guest read from its ublk device" \
    same_sum "$UBLK" "$work/out/$UBLK.md5" $((UBLK_MB << 20))
  check "rbd export of $UBLK@s1 equals it too" same_sum "$UBLK@s1" "$work/out/$UBLK.md5" $((UBLK_MB << 20))
  check "$UBLK@s1: rbd object-map check passes" omap_check "$UBLK@s1"
  imgs="$imgs $UBLK"
fi
for i in $imgs; do
  check "$i: flags clean, no lock, no watcher" idle "$i"
  check "$i: rbd object-map check passes" omap_check "$i"
done

echo "kernel tests on Ceph images: took $(($(date +%s) - T0)) s"
t_summary
