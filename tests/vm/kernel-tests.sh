#!/bin/bash
# Kernel-attach tests. Runs INSIDE the test VM (tests/vm/vm.sh) as root, against the real nbd
# driver of Debian's kernel, with the binary named by RADOS_NBD_BIN. Each check prints
# "PASS name" or "FAIL name"; the last line is "N passed, N failed"; the exit status is
# non-zero when anything failed.
set -u
B=${RADOS_NBD_BIN:?RADOS_NBD_BIN names the rados-nbd binary}
# The VM boots an unpacked kernel: modprobe (ours and the test's) needs its module root.
export RADOS_NBD_MODULES_ROOT=${KMODS:-}
MP=(); [ -n "${KMODS:-}" ] && MP=(-d "$KMODS")
# The store lives on the guest's tmpfs (fast, supports hole punching).
export RADOS_NBD_STORE=/var/lib/rados-nbd-test
POOLDIR=$RADOS_NBD_STORE/rbd
LOGDIR=${LOGDIR:-/mnt/logs}
mkdir -p "$RADOS_NBD_STORE" "$LOGDIR" /tmp/mnt
MNT=/tmp/mnt
pass=0
fail=0
T0=$(date +%s)

note() { echo "    $*"; }
ok() { echo "PASS $1"; pass=$((pass + 1)); }
bad() { echo "FAIL $1${2:+: $2}"; fail=$((fail + 1)); }
# check NAME COMMAND...: PASS when the command succeeds; its output is shown on failure.
check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then ok "$name"; else bad "$name"; echo "$out" | tail -20 | sed 's/^/    | /'; fi
}
# A daemon log per map so a failure can be traced.
map() { "$B" map --log-file "$LOGDIR/daemon.log" "$@"; }
pid_of() { sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "/run/rados-nbd/${1#/dev/}.json" 2>/dev/null; }
# The guest's init reaps orphans lazily, so a daemon that exited may linger as a zombie.
dead() { [ ! -d "/proc/$1" ] || grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
gone() { # pid: wait up to 30 s for it to exit
  local i
  for i in $(seq 300); do dead "$1" && return 0; sleep 0.1; done
  return 1
}
objects() { find "$POOLDIR" -maxdepth 1 -name 'rbd_data.*' -type f | wc -l; }
flags_of() { "$B" info "$1" --format json | sed -n 's/.*"flags": *\[\([^]]*\)\].*/\1/p'; }
dirty() { flags_of "$1" | grep -q 'object map invalid'; }
clean() { ! dirty "$1"; }
dev_size() { blockdev --getsize64 "$1"; }
write_files() { # dir: files of several sizes (some spanning objects) and many small ones
  dd if=/dev/urandom of="$1/big" bs=1M count=24 status=none &&
    dd if=/dev/urandom of="$1/odd" bs=1000 count=777 status=none &&
    mkdir -p "$1/small" &&
    for i in $(seq 60); do head -c $((i * 313)) /dev/urandom >"$1/small/f$i"; done &&
    (cd "$1" && find . -type f ! -name SUMS -print0 | sort -z | xargs -0 sha256sum >SUMS) && sync
}
verify_files() { (cd "$1" && sha256sum --quiet -c SUMS); }

echo "== setup (kernel $(uname -r)) (at $(($(date +%s) - T0)) s)"
modprobe "${MP[@]}" ext4 && modprobe "${MP[@]}" xfs || { bad setup "cannot load ext4/xfs"; }
if [ -e /sys/module/nbd ]; then note "nbd already loaded"; fi
check "create images" bash -c "'$B' create --size 1G rbd/ext && '$B' create --size 1G rbd/xfs && '$B' create --size 512M rbd/misc"

echo "== map, ext4, unmap, map again (at $(($(date +%s) - T0)) s)"
# rbd-nbd's spellings of the module parameters (--nbds-max/--max-part are the same options).
dev=$(map rbd/ext --nbds_max 8 --max_part 4)
if [ -b "$dev" ] && [ "$(dev_size "$dev")" = $((1 << 30)) ]; then ok "map prints a usable device ($dev, 1 GiB)"; else bad "map prints a usable device" "got '$dev'"; fi
check "module loaded with --nbds_max 8" test "$(cat /sys/module/nbd/parameters/nbds_max)" = 8
# The driver rounds max_part up to a power of two minus one: 4 becomes 7 (its default, 16,
# would show as 31).
check "module loaded with --max_part 4" test "$(cat /sys/module/nbd/parameters/max_part)" = 7
check "list-mapped shows the device" bash -c "'$B' list-mapped | grep -E '^[0-9]+ +rbd +ext +- +$dev +rados-nbd:dir:$RADOS_NBD_STORE:rbd/ext +dir:$RADOS_NBD_STORE +nbd\$'"
check "list-mapped --format json" bash -c "'$B' list-mapped --format json | grep -q '\"device\":\"$dev\"'"
check "list-mapped --format xml (rbd-nbd's shape)" bash -c "'$B' list-mapped --format xml | grep -q '<device><id>[0-9]*</id><pool>rbd</pool><namespace></namespace><image>ext</image><snap></snap><device>$dev</device>'"
check "image flagged dirty while mapped" dirty rbd/ext
check "daemon runs in its own session" bash -c "p=\$(sed -n 's/.*\"pid\": *\([0-9]*\).*/\1/p' /run/rados-nbd/${dev#/dev/}.json); [ \$(ps -o sid= -p \$p) = \$p ]"
p=$(pid_of "$dev")
note "daemon $(grep -E '^(VmLck|VmRSS|Threads)' /proc/$p/status | tr -s '\t ' ' ' | paste -sd, -), oom_score_adj $(cat /proc/$p/oom_score_adj)"
hardened() {
  grep -Eq '^VmLck:[[:space:]]+[1-9]' /proc/$p/status && [ "$(cat /proc/$p/oom_score_adj)" = -1000 ]
}
check "daemon memory locked, oom_score_adj -1000" hardened
# mlockall with MCL_ONFAULT locks what the daemon touches, without populating every mapping
# (thread stacks, malloc arenas): ~20 MiB resident here, ~180 MiB without it.
rss_kib=$(awk '/^VmRSS:/ {print $2}' /proc/$p/status)
check "daemon resident memory after map is modest (${rss_kib} KiB < 96 MiB: MCL_ONFAULT)" test "${rss_kib:-999999}" -lt $((96 << 10))
check "mkfs.ext4" mkfs.ext4 -q -F "$dev"
check "mount ext4" mount "$dev" $MNT
check "write files with checksums, sync" write_files $MNT
out=$("$B" unmap "$dev" 2>&1)
if [ $? -ne 0 ] && echo "$out" | grep -q mounted && mountpoint -q $MNT; then ok "unmap of a mounted device is refused"; note "$out"; else bad "unmap of a mounted device is refused" "$out"; fi
out=$("$B" unmap rbd/ext 2>&1)
if [ $? -ne 0 ] && echo "$out" | grep -q mounted; then ok "unmap by image spec of a mounted device is refused"; else bad "unmap by image spec of a mounted device is refused" "$out"; fi
check "fs still usable after the refused unmap" verify_files $MNT
check "umount" umount $MNT
pid=$(pid_of "$dev")
check "unmap" "$B" unmap "$dev"
check "daemon gone after unmap returns" dead "$pid"
check "state file removed" test ! -e "/run/rados-nbd/${dev#/dev/}.json"
check "device released (size 0)" test "$(cat /sys/block/${dev#/dev/}/size)" = 0
check "clean close cleared the dirty flag" clean rbd/ext
dev=$(map rbd/ext)
check "map again" test -b "$dev"
check "e2fsck clean" e2fsck -fn "$dev"
check "mount again" mount "$dev" $MNT
check "checksums match after remap" verify_files $MNT

echo "== fstrim removes data objects (at $(($(date +%s) - T0)) s)"
dd if=/dev/urandom of=$MNT/trimme bs=1M count=96 status=none conv=fsync
sync
n1=$(objects)
rm -f $MNT/trimme big
sync
fstrim -v $MNT | sed 's/^/    /'
sync
n2=$(objects)
note "data objects before $n1, after fstrim $n2"
if [ "$n2" -lt "$n1" ] && [ $((n1 - n2)) -ge 16 ]; then ok "fstrim removed data objects ($n1 -> $n2)"; else bad "fstrim removed data objects" "$n1 -> $n2"; fi
check "files intact after fstrim" verify_files $MNT
check "umount" umount $MNT
check "unmap by image spec" "$B" unmap rbd/ext
check "e2fsck after unmap/map" bash -c "d=\$('$B' map rbd/ext) && e2fsck -fn \$d && '$B' unmap \$d"

echo "== xfs (at $(($(date +%s) - T0)) s)"
dev=$(map rbd/xfs)
check "map xfs image" test -b "$dev"
check "mkfs.xfs" mkfs.xfs -q -f "$dev"
check "mount xfs" mount "$dev" $MNT
check "write files on xfs" write_files $MNT
check "umount xfs" umount $MNT
check "unmap xfs" "$B" unmap "$dev"
dev=$(map rbd/xfs)
check "remap xfs, xfs_repair -n clean" xfs_repair -n "$dev"
check "mount xfs again" mount "$dev" $MNT
check "xfs checksums match" verify_files $MNT
check "umount xfs again" umount $MNT
check "unmap xfs again" "$B" unmap "$dev"

echo "== SIGKILL leaves the image dirty; the next map repairs it (at $(($(date +%s) - T0)) s)"
dev=$(map rbd/ext)
mount "$dev" $MNT && echo persisted >$MNT/after-kill && sync && umount $MNT
pid=$(pid_of "$dev")
kill -9 "$pid"
gone "$pid"
check "killed daemon leaves 'object map invalid'" dirty rbd/ext
check "list-mapped still shows the orphaned device" bash -c "'$B' list-mapped | grep -q '$dev'"
check "unmap of a device whose daemon died" "$B" unmap "$dev"
check "device released after orphan unmap" test "$(cat /sys/block/${dev#/dev/}/size)" = 0
dev=$(map rbd/ext)
check "map after crash" test -b "$dev"
check "e2fsck clean after crash" e2fsck -fn "$dev"
check "data written before the kill survived" bash -c "mount $dev $MNT && grep -q persisted $MNT/after-kill && (cd $MNT && sha256sum --quiet -c SUMS); r=\$?; umount $MNT; exit \$r"
check "unmap after repair" "$B" unmap "$dev"
check "repaired map is clean after unmap" clean rbd/ext
if "$B" object-map check rbd/ext >/tmp/omc 2>&1; then ok "object-map check agrees with the objects"; else bad "object-map check agrees with the objects" "$(tail -3 /tmp/omc)"; fi

echo "== the next map re-attaches a crashed daemon's device (mounts survive) (at $(($(date +%s) - T0)) s)"
dev=$(map rbd/ext)
mount "$dev" $MNT && echo one >$MNT/crash-a && sync
pid=$(pid_of "$dev")
kill -9 "$pid"
gone "$pid"
dev2=$(map rbd/ext)
check "map after a crash re-attaches the same device" test "$dev2" = "$dev"
survived() { grep -q one $MNT/crash-a && echo two >$MNT/crash-b && sync && verify_files $MNT; }
check "mounted fs usable after the re-attach" survived
check "umount after re-attach" umount $MNT
check "unmap after re-attach" "$B" unmap "$dev"
check "image clean after re-attach and unmap" clean rbd/ext
check "e2fsck clean after crash and re-attach" bash -c "d=\$('$B' map rbd/ext) && e2fsck -fn \$d >/dev/null; r=\$?; '$B' unmap \$d; exit \$r"

echo "== a kept device goes to its own image only, renamed or not (at $(($(date +%s) - T0)) s)"
# The state file records the image's id: after a crash, the image renamed and a new one
# made under the old name, a map of that name must not put the new image under the
# mounted file system; an attach by the new name (and the device's cookie) takes it over.
dev=$(map rbd/ext)
mount "$dev" $MNT && echo three >$MNT/crash-c && sync
pid=$(pid_of "$dev")
kill -9 "$pid"
gone "$pid"
check "rename of the crashed daemon's image" "$B" rename rbd/ext rbd/ext-r
check "a new image takes the old name" "$B" create --size 64M rbd/ext
check "map of the old name refuses the kept device (another image has the name now)" bash -c \
  "! '$B' map --log-file '$LOGDIR/daemon.log' rbd/ext 2>/tmp/mapx.err && grep -q 'made anew since' /tmp/mapx.err"
check "... and leaves it as it was" bash -c "[ \"\$(cat /sys/block/${dev#/dev/}/size)\" != 0 ] && grep -q three $MNT/crash-c"
check "attach by the new name, with the device's cookie, takes it over" bash -c \
  "'$B' attach --log-file '$LOGDIR/daemon.log' --device '$dev' --cookie \"\$(cat /sys/block/${dev#/dev/}/backend)\" rbd/ext-r"
check "mounted fs usable after that attach" bash -c \
  "grep -q three $MNT/crash-c && echo four >$MNT/crash-d && sync && cd $MNT && sha256sum --quiet -c SUMS"
check "umount and unmap" bash -c "umount $MNT && '$B' unmap '$dev'"
check "image clean after that" clean rbd/ext-r
check "the new image goes, the old name back" bash -c "'$B' rm rbd/ext >/dev/null && '$B' rename rbd/ext-r rbd/ext"

echo "== SIGTERM and kernel-side disconnect close cleanly (at $(($(date +%s) - T0)) s)"
dev=$(map rbd/misc)
pid=$(pid_of "$dev")
dd if=/dev/urandom of="$dev" bs=1M count=8 status=none oflag=direct
kill -TERM "$pid"
if gone "$pid"; then ok "SIGTERM: daemon exits"; else bad "SIGTERM: daemon exits"; fi
check "SIGTERM: device released" test "$(cat /sys/block/${dev#/dev/}/size)" = 0
check "SIGTERM: image clean" clean rbd/misc
check "SIGTERM: state file removed" test ! -e "/run/rados-nbd/${dev#/dev/}.json"
dev=$(map rbd/misc)
pid=$(pid_of "$dev")
dd if=/dev/urandom of="$dev" bs=1M count=8 status=none oflag=direct
check "nbd-client -d" nbd-client -d "$dev"
if gone "$pid"; then ok "kernel-side disconnect: daemon exits"; else bad "kernel-side disconnect: daemon exits"; fi
check "kernel-side disconnect: image clean" clean rbd/misc
check "kernel-side disconnect: nothing listed" bash -c "! '$B' list-mapped | grep -q '$dev'"

echo "== detach / attach keeps a mounted file system (at $(($(date +%s) - T0)) s)"
dev=$(map rbd/ext --reattach-timeout 60)
check "mount before detach" mount "$dev" $MNT
echo before >$MNT/detach-a
sync
pid=$(pid_of "$dev")
check "detach" "$B" detach "$dev"
check "detach: old daemon gone" dead "$pid"
check "detach: image closed cleanly" clean rbd/ext
check "detach: device still configured" test "$(cat /sys/block/${dev#/dev/}/size)" != 0
check "list-mapped shows it detached" bash -c "'$B' list-mapped | grep -E '^detached +rbd +ext .*$dev'"
check "attach refuses another image" bash -c "! '$B' attach --device $dev rbd/misc"
# I/O issued while detached waits in the kernel until attach.
(dd if=/dev/urandom of=$MNT/during-detach bs=1M count=4 conv=fsync status=none && echo ok >/tmp/dd-during) &
ddpid=$!
sleep 1
check "attach" "$B" attach --device "$dev" rbd/ext --log-file "$LOGDIR/daemon.log"
wait $ddpid
check "I/O issued while detached completed after attach" test -s /tmp/dd-during
check "mounted fs usable after attach" bash -c "grep -q before $MNT/detach-a && echo after >$MNT/detach-b && sync && (cd $MNT && sha256sum --quiet -c SUMS)"
check "umount after attach" umount $MNT
check "unmap after attach" "$B" unmap "$dev"
check "files written across detach/attach persisted" bash -c "d=\$('$B' map rbd/ext) && e2fsck -fn \$d >/dev/null && mount \$d $MNT && grep -q after $MNT/detach-b && test -s $MNT/during-detach; r=\$?; umount $MNT; '$B' unmap \$d; exit \$r"

echo "== rbd-nbd's cookie: map --show-cookie / --cookie, attach --cookie, list-mapped (at $(($(date +%s) - T0)) s)"
"$B" create --size 64M rbd/ck >/dev/null
out=$(map rbd/ck --show-cookie)
dev=${out%% *} cookie=${out#* }
check "map --show-cookie prints the device, then its cookie" bash -c "[ -b '$dev' ] && [ -n '$cookie' ] && [ '$cookie' != '$out' ]"
check "the cookie is the kernel's backend identifier" test "$(cat /sys/block/${dev#/dev/}/backend 2>&1)" = "$cookie"
check "list-mapped shows the cookie (plain, json, xml)" bash -c \
  "'$B' list-mapped | grep -qE ' $dev +$cookie ' && '$B' list-mapped --format json | jq -e '.[] | select(.device == \"$dev\" and .cookie == \"$cookie\")' >/dev/null && '$B' list-mapped --format xml --pretty-format | grep -qx '  <cookie>$cookie</cookie>'"
check "unmap" "$B" unmap "$dev"
dev=$(map rbd/ck --cookie vm-42.disk0 --reattach-timeout 60)
check "map --cookie: the device has that cookie" test "$(cat /sys/block/${dev#/dev/}/backend 2>&1)" = vm-42.disk0
check "write before detach" dd if=/dev/urandom of=/tmp/ck.bin bs=1M count=2 status=none
check "write through the device" dd if=/tmp/ck.bin of="$dev" bs=1M oflag=direct status=none
check "resize with a named cookie: the device follows" bash -c \
  "'$B' resize --size 96M rbd/ck && for i in \$(seq 50); do [ \$(blockdev --getsize64 $dev) = $((96 << 20)) ] && exit 0; sleep 0.2; done; exit 1"
check "detach" "$B" detach "$dev"
out=$("$B" attach --device "$dev" --cookie vm-43.disk0 rbd/ck 2>&1)
if [ $? -ne 0 ] && echo "$out" | grep -q "cookie mismatch"; then ok "attach with another cookie refused (cookie mismatch)"; else bad "attach with another cookie refused (cookie mismatch)" "$out"; fi
out=$("$B" attach --device "$dev" --cookie vm-42.disk0 rbd/ext 2>&1)
if [ $? -ne 0 ] && echo "$out" | grep -Eq "(was mapped from|then named) rbd/ck"; then ok "attach with the device's cookie but another image refused"; else bad "attach with the device's cookie but another image refused" "$out"; fi
check "attach --cookie with the device's cookie" "$B" attach --device "$dev" --cookie vm-42.disk0 rbd/ck --log-file "$LOGDIR/daemon.log"
check "data written before the detach reads back" cmp -n $((2 << 20)) /tmp/ck.bin "$dev"
check "detach again" "$B" detach "$dev"
check "attach without --cookie takes the one recorded at map" "$B" attach --device "$dev" rbd/ck --log-file "$LOGDIR/daemon.log"
check "list-mapped keeps the named cookie" bash -c "'$B' list-mapped --format json | jq -e '.[] | select(.device == \"$dev\" and .cookie == \"vm-42.disk0\")' >/dev/null"
check "unmap after attach with a named cookie" "$B" unmap "$dev"
out=$("$B" map rbd/ck --encryption-format luks2 --encryption-passphrase-file /dev/null 2>&1)
if [ $? -ne 0 ] && echo "$out" | grep -q "no client-side encryption"; then ok "rbd-nbd's --encryption-format refused with a reason"; else bad "rbd-nbd's --encryption-format refused with a reason" "$out"; fi
check "--try-netlink is accepted" bash -c "d=\$('$B' map rbd/ck --try-netlink) && '$B' unmap \$d"

echo "== read-only, several connections, named device, ioctl fallback (at $(($(date +%s) - T0)) s)"
dev=$(map rbd/misc --read-only --device /dev/nbd5)
check "map --device /dev/nbd5 --read-only" test "$dev" = /dev/nbd5
check "read-only device" test "$(blockdev --getro "$dev")" = 1
check "writes refused on read-only" bash -c "! dd if=/dev/zero of=$dev bs=4k count=1 oflag=direct status=none 2>/dev/null"
out=$("$B" map rbd/misc --device /dev/nbd5 2>&1)
if [ $? -ne 0 ] && echo "$out" | grep -qi "in use"; then ok "mapping a busy device is refused"; else bad "mapping a busy device is refused" "$out"; fi
check "unmap read-only" "$B" unmap "$dev"
# The kernel makes one queue per connection, capped at the number of CPUs.
nq=$(nproc); [ "$nq" -gt 4 ] && nq=4
dev=$(map rbd/misc --connections 4)
check "map --connections 4 gives $nq kernel queues" test "$(ls /sys/block/${dev#/dev/}/mq | wc -l)" = "$nq"
par_io() {
  local i
  for i in 0 1 2 3; do
    dd if=/dev/urandom of=/tmp/p$i bs=1M count=4 status=none || return 1
    dd if=/tmp/p$i of="$dev" bs=1M seek=$((i * 8)) oflag=direct status=none &
  done
  wait
  for i in 0 1 2 3; do
    dd if="$dev" of=/tmp/q$i bs=1M skip=$((i * 8)) count=4 iflag=direct status=none &&
      cmp /tmp/p$i /tmp/q$i || return 1
  done
}
check "parallel I/O on 4 connections" par_io
check "unmap multi-connection" "$B" unmap "$dev"
dev=$(RADOS_NBD_FORCE_IOCTL=1 map rbd/misc)
check "ioctl fallback: map" test -b "$dev"
check "ioctl fallback: data readable" bash -c "dd if=$dev of=/tmp/r0 bs=1M count=4 iflag=direct status=none && cmp /tmp/p0 /tmp/r0"
check "ioctl fallback: detach refused" bash -c "! '$B' detach $dev"
check "ioctl fallback: unmap" "$B" unmap "$dev"
check "ioctl fallback: image clean" clean rbd/misc
dev=$(map rbd/misc)
mkfs.ext4 -q -F "$dev"
# A file system mounted only in another mount namespace (as a systemd unit with
# ProtectSystem= keeps one it saw mounted when it started): it is not in our mountinfo, yet
# it still writes to the device, so unmap must refuse and name who holds it.
mkdir -p /tmp/nsmnt
unshare -m --propagation private sh -c "mount $dev /tmp/nsmnt && echo x >/tmp/nsmnt/f && exec sleep 600" &
nspid=$!
for _ in $(seq 50); do grep -q " /tmp/nsmnt " /proc/$nspid/mountinfo 2>/dev/null && break; sleep 0.1; done
out=$("$B" unmap "$dev" 2>&1); rc=$?
if [ $rc -ne 0 ] && echo "$out" | grep -q "another mount namespace (that of pid $nspid, sleep)"; then
  ok "unmap refuses a device mounted only in another mount namespace, naming its pid"
else bad "unmap refuses a device mounted only in another mount namespace, naming its pid" "rc=$rc $out"; fi
check "... the device is still served" bash -c "'$B' list-mapped | grep -q '$dev'"
kill $nspid; wait $nspid 2>/dev/null
check "... and unmaps once that namespace is gone" "$B" unmap "$dev"
check "... the file it wrote there is in the image" bash -c "d=\$('$B' map rbd/misc) && mount \$d $MNT && grep -qx x $MNT/f; r=\$?; umount $MNT; '$B' unmap \$d; exit \$r"
dev=$(map rbd/misc)
mount "$dev" $MNT
pid=$(pid_of "$dev")
check "unmap --force of a mounted device" "$B" unmap --force "$dev"
forced() { dead "$pid" && clean rbd/misc; }
check "unmap --force: daemon gone, image clean" forced
umount -l $MNT 2>/dev/null
check "nothing left mapped" bash -c "[ -z \"\$('$B' list-mapped)\" ]"
dev=$(map rbd/misc)
out=$("$B" map rbd/misc 2>&1)
if [ $? -ne 0 ] && [ "$(echo "$out" | wc -l)" = 1 ]; then ok "second map of a mapped image is refused"; note "$out"; else bad "second map of a mapped image is refused" "$out"; fi
"$B" unmap "$dev"
"$B" map rbd/misc --foreground >/tmp/fg.out 2>/tmp/fg.err &
fgpid=$!
for i in $(seq 100); do [ -s /tmp/fg.out ] && break; sleep 0.1; done
dev=$(head -1 /tmp/fg.out)
fg_running() { [ -b "$dev" ] && kill -0 "$fgpid" && [ "$(pid_of "$dev")" = "$fgpid" ]; }
check "map --foreground prints the device and stays" fg_running
kill -INT $fgpid
wait $fgpid
fg_closed() { [ "$(cat "/sys/block/${dev#/dev/}/size")" = 0 ] && clean rbd/misc; }
check "map --foreground: SIGINT (Ctrl-C) unmaps cleanly" fg_closed
out=$("$B" map rbd/nosuch 2>&1)
if [ $? -ne 0 ] && [ "$(echo "$out" | wc -l)" = 1 ] && echo "$out" | grep -q nosuch; then ok "map of a missing image: one-line error"; note "$out"; else bad "map of a missing image: one-line error" "$out"; fi

echo "== request timeout, block size, partitions (at $(($(date +%s) - T0)) s)"
dev=$(map rbd/misc --io-timeout 42)
n=${dev#/dev/}
check "--io-timeout 42 is the queue's io_timeout (42000 ms)" test "$(cat /sys/block/$n/queue/io_timeout)" = 42000
check "logical block size 512" test "$(cat /sys/block/$n/queue/logical_block_size)" = 512
# One partition over the whole device; the kernel learns of it without udev (parted uses
# BLKPG, busybox fdisk BLKRRPART), and devtmpfs makes the node.
mkpart() {
  if command -v parted >/dev/null; then
    parted -s "$1" mklabel msdos mkpart primary 1MiB 100%
  else
    printf 'o\nn\np\n1\n\n\nw\n' | busybox fdisk "$1" >/dev/null
  fi
}
wait_node() { local i; for i in $(seq 100); do [ -b "$1" ] && return 0; sleep 0.05; done; return 1; }
check "partition table on the device" mkpart "$dev"
check "${dev}p1 appears (--max_part)" wait_node "${dev}p1"
check "mkfs.ext4 on ${dev}p1" mkfs.ext4 -q -F "${dev}p1"
check "mount ${dev}p1" mount "${dev}p1" $MNT
echo part >$MNT/part && sync
out=$("$B" unmap "$dev" 2>&1)
if [ $? -ne 0 ] && echo "$out" | grep -q "${n}p1 is mounted"; then ok "unmap refused while a partition is mounted"; note "$out"; else bad "unmap refused while a partition is mounted" "$out"; fi
check "umount ${dev}p1" umount $MNT
check "unmap after the partition is unmounted" "$B" unmap "$dev"
dev=$(map rbd/misc)
# The kernel scans the partition table at the first open after the connect; udev's probe
# does that on a real system, this read here.
dd if="$dev" of=/dev/null bs=4k count=1 status=none
part_again() { wait_node "${dev}p1" && mount "${dev}p1" $MNT && grep -q part $MNT/part; local r=$?; umount $MNT; return $r; }
check "the partition is found again on the next map" part_again
check "unmap partitioned device" "$B" unmap "$dev"
dev=$(RADOS_NBD_FORCE_IOCTL=1 map rbd/misc --io-timeout 7)
check "ioctl fallback: --io-timeout 7 is the queue's io_timeout" test "$(cat /sys/block/${dev#/dev/}/queue/io_timeout)" = 7000
check "ioctl fallback: logical block size 512" test "$(cat /sys/block/${dev#/dev/}/queue/logical_block_size)" = 512
check "ioctl fallback: unmap" "$B" unmap "$dev"

echo "== --exclusive (at $(($(date +%s) - T0)) s)"
# Only a shared image takes several writers, so only there does --exclusive change anything.
check "create a shared image" bash -c "'$B' create --size 64M rbd/shr && '$B' config rbd/shr shared=true"
dev=$(map rbd/shr --exclusive)
check "map --exclusive" test -b "$dev"
excl_io() {
  dd if=/dev/urandom of=/tmp/x1 bs=1M count=2 status=none &&
    dd if=/tmp/x1 of="$dev" bs=1M oflag=direct status=none &&
    dd if="$dev" of=/tmp/x2 bs=1M count=2 iflag=direct status=none && cmp /tmp/x1 /tmp/x2
}
check "--exclusive serves I/O" excl_io
out=$("$B" map rbd/shr 2>&1)
if [ $? -ne 0 ] && echo "$out" | grep -qi "in use"; then ok "a second writer is refused while --exclusive holds the image"; note "$out"; else bad "a second writer is refused while --exclusive holds the image" "$out"; [ -b "$out" ] && "$B" unmap "$out"; fi
check "unmap --exclusive" "$B" unmap "$dev"
d1=$(map rbd/shr)
d2=$(map rbd/shr)
check "without --exclusive the shared image maps twice" bash -c "[ -b '$d1' ] && [ -b '$d2' ] && [ '$d1' != '$d2' ]"
[ -b "$d1" ] && "$B" unmap "$d1"
[ -b "$d2" ] && "$B" unmap "$d2"

echo "== a failing close is reported by unmap and by the daemon's exit status (at $(($(date +%s) - T0)) s)"
# A store on a tiny tmpfs, filled up while mapped: the close cannot write the object map
# (ENOSPC), whatever root may do.
FULL=/tmp/fullstore
mkdir -p $FULL && mount -t tmpfs -o size=4m tmpfs $FULL
check "create an image on a small store" "$B" --store dir:$FULL create --size 64M rbd/full
fill() { dd if=/dev/zero of=$FULL/filler bs=64k status=none 2>/dev/null; ! dd if=/dev/zero of=$FULL/probe bs=4k count=1 status=none 2>/dev/null; }
full_dirty() { "$B" --store dir:$FULL info rbd/full --format json | grep -q 'object map invalid'; }
dev=$(map rbd/full --store dir:$FULL --pid-file /tmp/full.pid)
pid=$(pid_of "$dev")
check "pid file holds the daemon's pid" test "$(cat /tmp/full.pid 2>/dev/null)" = "$pid"
dd if=/dev/urandom of="$dev" bs=64k count=4 oflag=direct status=none
check "store file system full" fill
out=$("$B" unmap "$dev" 2>&1)
rc=$?
if [ $rc = 1 ] && [ "$(echo "$out" | wc -l)" = 1 ] && echo "$out" | grep -q "$dev (rbd/full)" && echo "$out" | grep -qi "no space left"; then
  ok "unmap exits 1 with one line naming device, image and failure"; note "$out"
else bad "unmap exits 1 with one line naming device, image and failure" "status $rc: $out"; fi
check "failed close: daemon gone" dead "$pid"
check "failed close: device released" test "$(cat /sys/block/${dev#/dev/}/size)" = 0
check "failed close: state file removed" test ! -e "/run/rados-nbd/${dev#/dev/}.json"
check "failed close: pid file removed" test ! -e /tmp/full.pid
check "the close result was read and removed" test ! -e "/run/rados-nbd/${dev#/dev/}.close-$pid.json"
rm -f $FULL/filler $FULL/probe
check "failed close leaves the image flagged dirty" full_dirty
# SIGTERM: the same failure makes a foreground daemon exit 1; with --log-file the log goes
# to the file while the device name still goes to stdout and the last error to stderr.
rm -f /tmp/fgl.log
"$B" --store dir:$FULL map rbd/full --foreground --log-file /tmp/fgl.log >/tmp/fgl.out 2>/tmp/fgl.err &
fgpid=$!
for i in $(seq 100); do [ -s /tmp/fgl.out ] && break; sleep 0.1; done
dev=$(head -1 /tmp/fgl.out)
check "map --foreground --log-file: the device on stdout" test -b "$dev"
check "map --foreground --log-file: the log in the file" grep -q "rbd/full mapped to $dev" /tmp/fgl.log
check "map --foreground --log-file: nothing on stderr" test ! -s /tmp/fgl.err
check "next map repaired the object map" grep -qi "rebuil" /tmp/fgl.log
check "store file system full again" fill
kill -TERM $fgpid
wait $fgpid
rc=$?
check "SIGTERM with a failing close: daemon exits 1" test "$rc" = 1
check "SIGTERM with a failing close: the error in the log file" grep -qi "no space left" /tmp/fgl.log
check "SIGTERM with a failing close: one error line on stderr" bash -c "[ \$(wc -l </tmp/fgl.err) = 1 ] && grep -qi 'rados-nbd: .*rbd/full.*no space left' /tmp/fgl.err"
note "stderr: $(cat /tmp/fgl.err)"
check "SIGTERM with a failing close: device released" test "$(cat /sys/block/${dev#/dev/}/size)" = 0
rm -f $FULL/filler $FULL/probe
dev=$(map rbd/full --store dir:$FULL)
check "map after the failed closes" test -b "$dev"
check "unmap with room again: clean close, exit 0" "$B" unmap "$dev"
full_clean() { ! full_dirty; }
check "image clean after a successful unmap" full_clean
check "object-map check agrees after the repair" "$B" --store dir:$FULL object-map check rbd/full
umount $FULL

echo "== the background daemon leaves the directory map ran in (at $(($(date +%s) - T0)) s)"
mkdir -p /tmp/cwdfs && mount -t tmpfs -o size=1m tmpfs /tmp/cwdfs && mkdir -p /tmp/cwdfs/sub
rm -f /tmp/cwd.pid /tmp/cwd.log
# Relative paths everywhere: --store dir:, RADOS_NBD_STORE, --pid-file, --log-file.
dev=$(cd /tmp/cwdfs/sub && "$B" --store dir:../../..$RADOS_NBD_STORE map rbd/misc --pid-file ../../cwd.pid --log-file ../../cwd.log)
dev2=$(cd /tmp/cwdfs/sub && RADOS_NBD_STORE=../../..$RADOS_NBD_STORE "$B" map rbd/xfs --log-file ../../cwd.log)
pid=$(pid_of "$dev")
pid2=$(pid_of "$dev2")
check "map from a relative store (dir: and RADOS_NBD_STORE)" test -b "$dev" -a -b "$dev2"
check "daemons run in /" bash -c "[ \$(readlink /proc/$pid/cwd) = / ] && [ \$(readlink /proc/$pid2/cwd) = / ]"
check "umount of the directory map ran in succeeds while mapped" umount /tmp/cwdfs
check "list-mapped shows the store absolute" bash -c "'$B' list-mapped | grep -E '$dev +[^ ]+ +dir:$RADOS_NBD_STORE +nbd\$' && '$B' list-mapped | grep -E '$dev2 +[^ ]+ +dir:$RADOS_NBD_STORE +nbd\$'"
check "relative --pid-file holds the daemon's pid" test "$(cat /tmp/cwd.pid 2>/dev/null)" = "$pid"
check "relative --log-file gets the log" grep -q "rbd/misc mapped to $dev" /tmp/cwd.log
check "the device serves I/O after the umount" bash -c "dd if=$dev of=/dev/null bs=1M count=4 iflag=direct status=none && dd if=/dev/zero of=$dev2 bs=1M count=1 oflag=direct status=none"
check "unmap (relative store)" "$B" unmap "$dev"
check "pid file removed after unmap" test ! -e /tmp/cwd.pid
check "unmap (relative RADOS_NBD_STORE)" "$B" unmap "$dev2"
both_clean() { clean rbd/misc && clean rbd/xfs; }
check "both images clean" both_clean
check "nothing left mapped at the end" bash -c "[ -z \"\$('$B' list-mapped)\" ]"

echo "== resize while mapped: the device follows, the file system grows (at $(($(date +%s) - T0)) s)"
check "create rbd/grow (64 MiB)" "$B" create --size 64M rbd/grow
dev=$(map rbd/grow)
mkfs.ext4 -q -F "$dev" && mount "$dev" $MNT && write_files $MNT
size_is() { # dev bytes: wait up to 5 s for the device to show that size
  local i
  for i in $(seq 50); do [ "$(dev_size "$1")" = "$2" ] && return 0; sleep 0.1; done
  echo "$1 is $(dev_size "$1") bytes, not $2"; return 1
}
check "rados-nbd resize --size 160M while mapped (the daemon does it)" "$B" resize --size 160M rbd/grow
check "the device follows: 160 MiB" size_is "$dev" $((160 << 20))
check "resize2fs grows the mounted ext4 online" resize2fs "$dev"
fs_kib() { df -k $MNT | awk 'NR == 2 { print $2 }'; }
check "df shows the grown file system" test "$(fs_kib)" -gt 120000
check "files written before the resize still verify" verify_files $MNT
# More than the old size, so it must land in the new space: 100 MiB, a random 4 MiB
# block repeated (random bytes are slow to make under emulation).
fill_new_space() { dd if=/dev/urandom of=/tmp/blk bs=1M count=4 status=none && for _ in $(seq 25); do cat /tmp/blk; done >$MNT/more && sync; }
check "the new space takes data" fill_new_space
(cd $MNT && sha256sum more >>SUMS)
umount $MNT
check "shrinking without --allow-shrink is refused, the device unchanged" \
  bash -c "! '$B' resize --size 32M rbd/grow 2>/dev/null && [ \$(blockdev --getsize64 $dev) = $((160 << 20)) ]"
check "unmap after the resize" "$B" unmap "$dev"
check "the image is 160 MiB, clean, its map right" bash -c \
  "'$B' info rbd/grow --format json | grep -q '\"size\": *$((160 << 20))' && '$B' object-map check rbd/grow"
dev=$(map rbd/grow)
check "map again: e2fsck clean" e2fsck -fn "$dev"
mount "$dev" $MNT
check "map again: every file verifies" verify_files $MNT
umount $MNT
check "unmap" "$B" unmap "$dev"
dev=$(RADOS_NBD_FORCE_IOCTL=1 map rbd/grow)
check "ioctl fallback: resize --size 200M while mapped" "$B" resize --size 200M rbd/grow
check "ioctl fallback: the device follows (NBD_SET_SIZE)" size_is "$dev" $((200 << 20))
check "ioctl fallback: unmap" "$B" unmap "$dev"
check "resized image clean" clean rbd/grow

# A clone mapped with --copy-on-read: reading an object it still reads from its parent
# copies it into the clone in the background; without the option reads copy nothing.
child_objects() { # image: its data objects on disk
  local id
  # By the block name prefix: a clone's JSON also carries its parent's "id".
  id=$("$B" info "$1" --format json | sed -n 's/.*"block_name_prefix": *"rbd_data\.\([^"]*\)".*/\1/p')
  find "$POOLDIR" -maxdepth 1 -name "rbd_data.$id.*" -type f | wc -l
}
"$B" create --size 64M rbd/cbase
head -c $((16 << 20)) /dev/urandom >/tmp/cbase.raw
dev=$(map rbd/cbase)
dd if=/tmp/cbase.raw of="$dev" bs=1M oflag=direct status=none
"$B" unmap "$dev"
"$B" snap create rbd/cbase@s >/dev/null
check "clone of a snapshot for copy-on-read" bash -c "'$B' clone rbd/cbase@s rbd/cplain && '$B' clone rbd/cbase@s rbd/ccor"
# (No process substitution: the guest has no /dev/fd.)
reads_parent() { dd if="$1" of=/tmp/cread.raw bs=1M count=16 iflag=direct status=none && cmp /tmp/cread.raw /tmp/cbase.raw; }
dev=$(map rbd/cplain)
check "a clone mapped without --copy-on-read reads its parent's data" reads_parent "$dev"
"$B" unmap "$dev"
check "... and copies nothing into the clone" test "$(child_objects rbd/cplain)" = 0
dev=$(map --copy-on-read rbd/ccor)
check "map --copy-on-read: reads return the parent's data" reads_parent "$dev"
copied() { local i; for i in $(seq 100); do [ "$(child_objects rbd/ccor)" = 4 ] && return 0; sleep 0.1; done; return 1; }
check "map --copy-on-read: the 4 objects read are copied into the clone" copied
check "map --copy-on-read: unmap" "$B" unmap "$dev"
check "map --copy-on-read: the clone's map is right after unmap" "$B" object-map check rbd/ccor
check "map --copy-on-read: the clone still reads the same bytes" \
  bash -c "d=\$('$B' map --read-only rbd/ccor) && dd if=\$d of=/tmp/cread.raw bs=1M count=16 iflag=direct status=none && cmp /tmp/cread.raw /tmp/cbase.raw; r=\$?; '$B' unmap \$d; exit \$r"

echo "== map --quiesce: a snapshot of a mounted ext4 is taken frozen (at $(($(date +%s) - T0)) s)"
# The shipped hook (packaging/rados-nbd_quiesce) behind a wrapper that logs its calls and,
# after a quiesce, whether the file system is frozen (a second freeze fails with EBUSY;
# one that succeeds is undone at once); /tmp/qfail makes the wrapper fail first.
QH=/mnt/rados-nbd_quiesce
if [ -x "$QH" ]; then
  cat >/tmp/qhook <<EOF
#!/bin/sh
echo "\$1 \$2" >>/tmp/qhook.log
[ -e /tmp/qfail ] && { echo "told to fail" >&2; exit 3; }
$QH "\$@" || exit \$?
if [ "\$2" = quiesce ]; then
  if fsfreeze -f $MNT 2>/dev/null; then fsfreeze -u $MNT; echo "not frozen" >>/tmp/qhook.log; else echo frozen >>/tmp/qhook.log; fi
fi
EOF
  chmod +x /tmp/qhook
  "$B" create --size 256M rbd/qz >/dev/null
  dev=$(map --quiesce --quiesce-hook /tmp/qhook rbd/qz)
  qlog() { paste -sd'|' /tmp/qhook.log 2>/dev/null; }
  mkfs.ext4 -q -F "$dev" && mount "$dev" $MNT && write_files $MNT
  # Written but not synced: only the freeze puts it in the snapshot.
  echo "unsynced" >$MNT/unsynced
  : >/tmp/qhook.log
  check "snap create of the mapped, mounted image" "$B" snap create rbd/qz@s1
  check "... the hook froze the mounted ext4, then thawed it" test "$(qlog)" = "$dev quiesce|frozen|$dev unquiesce"
  check "... the file system is writable after" bash -c "echo after >$MNT/after && sync"
  : >/tmp/qhook.log; touch /tmp/qfail
  check "a failing hook fails snap create" bash -c "! '$B' snap create rbd/qz@s2 2>/dev/null"
  rm -f /tmp/qfail
  check "... no snapshot, no unquiesce" bash -c "! '$B' snap ls rbd/qz | grep -qw s2 && [ \"\$(paste -sd'|' /tmp/qhook.log)\" = '$dev quiesce' ]"
  check "... the file system is still writable" bash -c "echo after2 >$MNT/after2 && sync"
  umount $MNT
  check "unmap --quiesce" "$B" unmap "$dev"
  snapfs() {
    local d r
    d=$(map --read-only rbd/qz@s1) || return 1
    e2fsck -fn "$d" >/tmp/fsck.out 2>&1; r=$?
    [ $r = 0 ] || cat /tmp/fsck.out
    if [ $r = 0 ]; then
      mount -o ro "$d" $MNT && verify_files $MNT && grep -q unsynced $MNT/unsynced; r=$?
      umount $MNT
    fi
    "$B" unmap "$d"
    return $r
  }
  check "the snapshot's ext4 is clean (e2fsck -fn) and holds every file, the unsynced one too" snapfs
else
  note "no $QH: quiesce case skipped"
fi

echo "== done in $(($(date +%s) - T0)) s"
if [ "$fail" -ne 0 ]; then
  echo "--- daemon log (last 40 lines)"
  tail -40 "$LOGDIR/daemon.log" 2>/dev/null
  echo "--- kernel log (nbd)"
  dmesg | grep -i nbd | tail -20
fi
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
