#!/bin/bash
# The ublk transport (`map --transport ublk`). Runs INSIDE the test VM booted with a kernel
# that has ublk (tests/vm/ublk-run.sh: Debian's 6.12, CONFIG_BLK_DEV_UBLK=m), as root, with the
# binary named by RADOS_NBD_BIN. "PASS name" / "FAIL name" per check; the last line is
# "N passed, N failed"; non-zero exit when anything failed.
set -u
B=${RADOS_NBD_BIN:?RADOS_NBD_BIN names the rados-nbd binary}
export RADOS_NBD_MODULES_ROOT=${KMODS:-}
MP=(); [ -n "${KMODS:-}" ] && MP=(-d "$KMODS")
export RADOS_NBD_STORE=/var/lib/rados-nbd-test
LOGDIR=${LOGDIR:-/mnt/logs}
mkdir -p "$RADOS_NBD_STORE" "$LOGDIR" /tmp/mnt
MNT=/tmp/mnt
pass=0 fail=0
T0=$(date +%s)
note() { echo "    $*"; }
ok() { echo "PASS $1"; pass=$((pass + 1)); }
bad() { echo "FAIL $1${2:+: $2}"; fail=$((fail + 1)); }
check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then ok "$name"; else bad "$name"; echo "$out" | tail -20 | sed 's/^/    | /'; fi
}
check_fails() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then bad "$name" "expected a failure, got success: $(echo "$out" | tail -3)"; else ok "$name"; fi
}
umap() { "$B" map --transport ublk --log-file "$LOGDIR/ublk-daemon.log" "$@"; }
pid_of() { sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "/run/rados-nbd/${1#/dev/}.json" 2>/dev/null; }
dead() { [ ! -d "/proc/$1" ] || grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
gone() { local i; for i in $(seq 300); do dead "$1" && return 0; sleep 0.1; done; return 1; }
flags_of() { "$B" info "$1" --format json | sed -n 's/.*"flags": *\[\([^]]*\)\].*/\1/p'; }
dirty() { flags_of "$1" | grep -q 'object map invalid'; }
clean() { ! dirty "$1"; }
ublkc_count() { ls /dev/ublkc* 2>/dev/null | wc -l; }

echo "== setup (kernel $(uname -r)) (at $(($(date +%s) - T0)) s)"
modprobe "${MP[@]}" ext4 && modprobe "${MP[@]}" xfs || bad setup "cannot load ext4/xfs"
check "create images" bash -c "'$B' create --size 1G rbd/u1 && '$B' create --size 256M rbd/u2"

echo "== no ublk driver: one clear line, nothing left behind (at $(($(date +%s) - T0)) s)"
# The module is not loaded yet; a module root without it makes the daemon's modprobe fail.
out=$(RADOS_NBD_MODULES_ROOT=/nonexistent "$B" map --transport ublk rbd/u1 2>&1); rc=$?
if [ $rc -ne 0 ] && echo "$out" | grep -q "no ublk driver" && echo "$out" | grep -q "NBD transport"; then
  ok "map --transport ublk without the driver: refused, suggests NBD"
else bad "map --transport ublk without the driver" "rc=$rc: $out"; fi
note "$out"
check "  nothing half-created (no /dev/ublkc*, no state file, image not flagged)" \
  bash -c "[ $(ublkc_count) -eq 0 ] && ! ls /run/rados-nbd/ublkb*.json 2>/dev/null && ! '$B' info rbd/u1 | grep -q invalid"

echo "== io_uring disabled (sysctl kernel.io_uring_disabled=2): one clear line, nothing left behind (at $(($(date +%s) - T0)) s)"
if [ -w /proc/sys/kernel/io_uring_disabled ]; then
  was=$(cat /proc/sys/kernel/io_uring_disabled)
  echo 2 >/proc/sys/kernel/io_uring_disabled
  out=$(umap rbd/u1 2>&1); rc=$?
  echo "$was" >/proc/sys/kernel/io_uring_disabled
  if [ $rc -ne 0 ] && [ "$(echo "$out" | grep -c .)" = 1 ] && echo "$out" | grep -q "io_uring is not available" &&
    echo "$out" | grep -q "NBD transport"; then
    ok "map --transport ublk without io_uring: refused in one line, suggests NBD"
  else bad "map --transport ublk without io_uring" "rc=$rc: $out"; fi
  note "$out"
  check "  nothing half-created (no /dev/ublkc*, no state file, image not flagged)" \
    bash -c "[ \$(ls /dev/ublkc* 2>/dev/null | wc -l) -eq 0 ] && ! ls /run/rados-nbd/ublkb*.json 2>/dev/null && ! '$B' info rbd/u1 | grep -q invalid"
else
  bad "io_uring disabled: kernel $(uname -r) has no sysctl kernel.io_uring_disabled (Linux 6.6+)"
fi

echo "== map, list-mapped, ext4, unmap, map again (at $(($(date +%s) - T0)) s)"
dev=$(umap rbd/u1); rc=$?
if [ $rc -eq 0 ] && [ -b "$dev" ] && [[ $dev == /dev/ublkb* ]]; then ok "map --transport ublk prints a /dev/ublkbN ($dev)"; else bad "map --transport ublk" "rc=$rc dev=$dev"; fi
check "the driver was loaded by map (RADOS_NBD_MODULES_ROOT)" test -e /dev/ublk-control
check "the device has the image's size" test "$(blockdev --getsize64 "$dev")" = $((1 << 30))
check "list-mapped shows the transport (plain)" bash -c "'$B' list-mapped | grep -E 'u1 +- +$dev .* ublk\$'"
check "list-mapped --format json: transport ublk" bash -c "'$B' list-mapped --format json | grep -q '\"transport\":\"ublk\"'"
check "list-mapped --format xml: transport ublk" bash -c "'$B' list-mapped --format xml | grep -q '<device>$dev</device>.*<transport>ublk</transport>'"
check "the image is flagged dirty while mapped" dirty rbd/u1
check "mkfs.ext4" mkfs.ext4 -q -F "$dev"
check "mount" mount "$dev" "$MNT"
check "write files" bash -c "dd if=/dev/urandom of=$MNT/big bs=1M count=24 status=none && (cd $MNT && sha256sum big > SUMS) && sync"
check "fstrim (discard) is served" fstrim -v "$MNT"
check "umount" umount "$MNT"
pid=$(pid_of "$dev")
check "unmap by image name" "$B" unmap rbd/u1
check "  the daemon exited" gone "$pid"
check "  the device is gone" bash -c "[ ! -e $dev ] && [ \$(ls /dev/ublkc* 2>/dev/null | wc -l) -eq 0 ]"
check "  no state file left" bash -c "! ls /run/rados-nbd/ublkb*.json 2>/dev/null"
check "  the image closed clean (flag cleared)" clean rbd/u1
check "  object map check passes" "$B" object-map check rbd/u1
dev=$(umap rbd/u1)
check "map again, mount, files intact" bash -c "mount $dev $MNT && (cd $MNT && sha256sum --quiet -c SUMS)"
check "e2fsck after umount is clean" bash -c "umount $MNT && e2fsck -fn $dev"
check "unmap by device" "$B" unmap "$dev"

echo "== raw I/O: fio verify, write-zeroes, discards, flush (at $(($(date +%s) - T0)) s)"
dev=$(umap rbd/u2 --queues 2 --queue-depth 32)
check "map with --queues 2 --queue-depth 32" test -b "$dev"
check "  two hardware queues" test "$(ls /sys/block/${dev#/dev/}/mq | wc -l)" = 2
check "fio randwrite 4k QD32 verify (crc32c)" fio --name=v --filename="$dev" --direct=1 --ioengine=libaio \
  --rw=randwrite --bs=4k --iodepth=32 --size=64M --verify=crc32c --verify_fatal=1 --eta=never --output=/tmp/fio-v.out
check "fio 1M sequential write+verify, QD8" fio --name=s --filename="$dev" --direct=1 --ioengine=libaio \
  --rw=write --bs=1M --iodepth=8 --offset=64M --size=96M --verify=crc32c --verify_fatal=1 --eta=never --output=/tmp/fio-s.out
check "blkdiscard -z (write zeroes) reads back zeros" bash -c \
  "blkdiscard -z -o 0 -l 8M $dev && cmp -n 8388608 $dev /dev/zero"
prefix=$("$B" info rbd/u2 --format json | sed -n 's/.*"block_name_prefix":"\([^"]*\)".*/\1/p')
objs() { find "$RADOS_NBD_STORE/rbd" -maxdepth 1 -name "$prefix.*" -type f | wc -l; }
note "objects of rbd/u2 before the discard: $(objs)"
check "blkdiscard of everything: every object of the image removed" bash -c \
  "[ -n '$prefix' ] && [ $(objs) -gt 0 ] && blkdiscard $dev && sync && [ \$(find $RADOS_NBD_STORE/rbd -maxdepth 1 -name '$prefix.*' -type f | wc -l) -eq 0 ]"
check "reads of discarded areas are zeros" cmp -n $((16 << 20)) "$dev" /dev/zero
check "unmap" "$B" unmap "$dev"

echo "== read-only maps and snapshots (at $(($(date +%s) - T0)) s)"
dev=$(umap rbd/u1)
check "write a pattern, then snapshot" bash -c "dd if=/dev/urandom of=$dev bs=1M count=4 oflag=direct status=none && '$B' snap create rbd/u1@s1"
sum_snap=$(head -c 4M "$dev" | sha256sum)
check "write over it after the snapshot" dd if=/dev/zero of="$dev" bs=1M count=4 oflag=direct status=none
check "unmap" "$B" unmap "$dev"
dev=$(umap rbd/u1@s1)
check "map IMAGE@SNAP: read-only device" test "$(blockdev --getro "$dev")" = 1
check "  it reads the snapshot's data" test "$(head -c 4M "$dev" | sha256sum)" = "$sum_snap"
check_fails "  writes are refused" dd if=/dev/zero of="$dev" bs=4k count=1 oflag=direct status=none
check "  list-mapped shows the snapshot" bash -c "'$B' list-mapped | grep -Eq 'u1 +s1 '"
check "unmap the snapshot" "$B" unmap "$dev"
dev=$(umap rbd/u1 --read-only)
check "map --read-only: read-only device" test "$(blockdev --getro "$dev")" = 1
check "  the image is not flagged" clean rbd/u1
check "unmap" "$B" unmap "$dev"

echo "== --device (at $(($(date +%s) - T0)) s)"
dev=$(umap rbd/u1 --device /dev/ublkb5)
check "map --device /dev/ublkb5 gives that device" test "$dev" = /dev/ublkb5
check_fails "a taken --device is refused" umap rbd/u2 --device /dev/ublkb5
check_fails "an nbd --device with --transport ublk is refused" umap rbd/u2 --device /dev/nbd0
check_fails "an invalid --device is refused" umap rbd/u2 --device /dev/ublkbX
check "unmap" "$B" unmap /dev/ublkb5

echo "== kill -9 under fio verify, then attach: nothing unmounted, nothing lost (at $(($(date +%s) - T0)) s)"
dev=$(umap rbd/u1)
mkfs.ext4 -q -F "$dev" && mount "$dev" "$MNT"
fio --name=k --directory="$MNT" --rw=randwrite --bs=4k --size=48M --iodepth=16 --ioengine=libaio \
  --direct=1 --verify=crc32c --verify_fatal=1 --time_based --runtime=20 --eta=never --output=/tmp/fio-k.out &
fio_pid=$!
sleep 6
pid=$(pid_of "$dev")
kill -9 "$pid"
gone "$pid"
check "after kill -9 the device stays" test -b "$dev"
check "  list-mapped still lists it (the kernel keeps it)" bash -c "'$B' list-mapped | grep -q '$dev'"
t0=$(date +%s%N)
check "attach --device takes the device over" "$B" attach --log-file "$LOGDIR/ublk-daemon.log" --device "$dev" rbd/u1
note "attach took $((($(date +%s%N) - t0) / 1000000)) ms"
wait "$fio_pid"; rc=$?
check "fio verify finished without an error across the kill" bash -c "[ $rc -eq 0 ] && ! grep -q 'err=' /tmp/fio-k.out || grep -q 'err= 0' /tmp/fio-k.out"
[ $rc -eq 0 ] || tail -20 /tmp/fio-k.out
check "  still mounted, writable" bash -c "mountpoint -q $MNT && echo x > $MNT/after && sync"

echo "== detach/attach under fio (a daemon upgrade) (at $(($(date +%s) - T0)) s)"
fio --name=d --directory="$MNT" --rw=randwrite --bs=4k --size=32M --iodepth=16 --ioengine=libaio \
  --direct=1 --verify=crc32c --verify_fatal=1 --time_based --runtime=16 --eta=never --output=/tmp/fio-d.out &
fio_pid=$!
sleep 5
check "detach" "$B" detach "$dev"
check "  the image closed clean while detached" clean rbd/u1
check "  list-mapped shows it detached" bash -c "'$B' list-mapped --format json | grep -q '\"state\":\"detached\"'"
check "attach" "$B" attach --log-file "$LOGDIR/ublk-daemon.log" --device "$dev" rbd/u1
wait "$fio_pid"; rc=$?
check "fio verify finished without an error across detach/attach" test $rc -eq 0
[ $rc -eq 0 ] || tail -20 /tmp/fio-d.out
check "umount, fsck clean" bash -c "umount $MNT && e2fsck -fn $dev"
check "unmap" "$B" unmap "$dev"
check "  clean close" clean rbd/u1
check "  object map check passes" "$B" object-map check rbd/u1

echo "== map after a crash with nobody attaching: map takes the kept device over (at $(($(date +%s) - T0)) s)"
dev=$(umap rbd/u2)
pid=$(pid_of "$dev")
kill -9 "$pid"; gone "$pid"
dev2=$(umap rbd/u2)
check "map of the same image takes over $dev" test "$dev2" = "$dev"
check "  and serves it" dd if="$dev" of=/dev/null bs=1M count=4 iflag=direct status=none
check "unmap" "$B" unmap "$dev"
dev=$(umap rbd/u2)
pid=$(pid_of "$dev")
kill -9 "$pid"; gone "$pid"
check "unmap of a device whose daemon died deletes it" bash -c "'$B' unmap $dev; [ ! -e $dev ]"

echo "took $(($(date +%s) - T0)) s"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
