#!/bin/bash
# Kernel-attach tests of Ceph images. Runs INSIDE the test VM (tests/vm/ceph-run.sh boots it
# with a NIC on a cluster of its own) as root, against the real nbd driver of Debian's kernel.
# Environment (set by ceph-run.sh): RADOS_NBD_BIN, CEPH_CONF (the cluster's config as the guest
# sees it), CEPH_NBD_ID/CEPH_NBD_KEYRING (the restricted client the daemon runs as; `rbd` runs
# as client.admin through the config's keyring), IMG, RAW, XFS, LIVE, BENCH (images of pool
# rbd, sizes *_MB), QUIESCE_HOOK (packaging/rados-nbd_quiesce), RPC (the folder through which
# `host` below asks ceph-run.sh to run `rbd` on the host: a second client), OUT (a shared
# folder: checksums the host compares with `rbd export`), LOGDIR.
# Each check prints "PASS name" or "FAIL name"; the last line is "N passed, N failed".
set -u
# The binary runs from the guest's tmpfs: from the 9p share every page it maps (and the daemon
# locks them all) would be one round trip under emulation: ~20 s per start instead of ~2.
B=/tmp/rados-nbd
cp "${RADOS_NBD_BIN:?RADOS_NBD_BIN names the rados-nbd binary}" $B || exit 1
: "${CEPH_CONF:?CEPH_CONF names the cluster config}"
export CEPH_CONF
export RADOS_NBD_MODULES_ROOT=${KMODS:-}
MP=(); [ -n "${KMODS:-}" ] && MP=(-d "$KMODS")
RN=("$B" --store "ceph:$CEPH_CONF")
[ -n "${CEPH_NBD_KEYRING:-}" ] && RN+=(--id "${CEPH_NBD_ID:-nbd}" --keyring "$CEPH_NBD_KEYRING")
IMG=${IMG:?} RAW=${RAW:?} RAW_MB=${RAW_MB:-16}
XFS=${XFS:?} LIVE=${LIVE:?} LIVE_MB=${LIVE_MB:?} LIVE_GROWN_MB=${LIVE_GROWN_MB:?} BENCH=${BENCH:?} BENCH_MB=${BENCH_MB:?}
QHOOK=${QUIESCE_HOOK:?QUIESCE_HOOK names packaging/rados-nbd_quiesce} RPC=${RPC:?RPC names the host request folder}
OUT=${OUT:-/mnt/out} LOGDIR=${LOGDIR:-/mnt/logs}
MNT=/tmp/mnt
mkdir -p "$OUT" "$LOGDIR" $MNT
pass=0 fail=0
T0=$(date +%s)

note() { echo "    $*"; }
TL=$(date +%s%N)
lap() { local n; n=$(date +%s%N); [ -z "${LAPS:-}" ] || echo "    [$(((n - TL) / 1000000)) ms]"; TL=$n; }
ok() { lap; echo "PASS $1"; pass=$((pass + 1)); }
bad() { lap; echo "FAIL $1${2:+: $2}"; fail=$((fail + 1)); }
check() { # check NAME COMMAND...: PASS when the command succeeds; its output shown on failure
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then ok "$name"; else bad "$name"; echo "$out" | tail -20 | sed 's/^/    | /'; return 1; fi
}
map() { "${RN[@]}" map --log-file "$LOGDIR/daemon.log" "$@"; }
# mapped NAME IMAGE [OPTION...]: map IMAGE into $dev and check that map printed a usable /dev/nbdX; on
# failure the suite ends here (everything after needs the device), with map's error.
mapped() {
  local t err
  t=$(date +%s%N)
  dev=$(map "${@:2}" 2>/tmp/map.err)
  if [[ $dev =~ ^/dev/nbd[0-9]+$ ]] && [ -b "$dev" ]; then
    ok "$1 ($dev, $(ms_since "$t") ms)"
    return 0
  fi
  err=$(tail -3 /tmp/map.err)
  bad "$1" "printed '$dev'${err:+; $err}"
  echo "$pass passed, $fail failed"
  exit 1
}
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }
flags() { rbd info "$1" --format json | jq -r '.flags | join(",")'; }
flags_are() { # IMAGE WANT: the image's flags as `rbd info` shows them
  local f
  f=$(flags "$1") || return 1
  [ "$f" = "$2" ] || { echo "flags of $1: '$f', want '$2'"; return 1; }
}
released() { [ "$(cat "/sys/block/${1#/dev/}/size")" = 0 ]; }
# host CMD ARG...: CMD (`rbd` or a check of ceph-run.sh, which lists them) run on the host,
# beside the cluster, as a second client of the images mapped here; its output and status.
host() {
  local r=$RPC/$(date +%s%N)-$BASHPID i
  printf '%s\n' "$@" >"$r.tmp" && mv "$r.tmp" "$r.req" || return 1
  for i in $(seq 1500); do [ -e "$r.rc" ] && break; sleep 0.1; done
  [ -e "$r.rc" ] || { echo "the host did not answer '$*' in 150 s"; return 124; }
  cat "$r.out"
  return "$(cat "$r.rc")"
}
state() { sed -n "s/.*\"$2\": *\([0-9]*\).*/\1/p" "/run/rados-nbd/${1#/dev/}.json" 2>/dev/null; }
# The guest's init reaps orphans lazily, so a daemon that exited may linger as a zombie.
dead() { [ ! -d "/proc/$1" ] || grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
gone() { local i; for i in $(seq 300); do dead "$1" && return 0; sleep 0.1; done; return 1; }
size_is() { # DEV BYTES: wait up to 10 s for the device to show that size
  local i
  for i in $(seq 100); do [ "$(blockdev --getsize64 "$1")" = "$2" ] && return 0; sleep 0.1; done
  echo "$1 is $(blockdev --getsize64 "$1") bytes, not $2"; return 1
}
write_files() { # DIR: a few files (one spanning objects) and their checksums, synced
  dd if=/dev/urandom of="$1/big" bs=1M count=6 status=none &&
    dd if=/dev/urandom of="$1/odd" bs=1000 count=777 status=none &&
    mkdir -p "$1/small" && for i in $(seq 20); do head -c $((i * 313)) /dev/urandom >"$1/small/f$i"; done &&
    (cd "$1" && find . -type f ! -name SUMS -print0 | sort -z | xargs -0 sha256sum >SUMS) && sync
}
unmapped() { # NAME DEV: unmap DEV, then the device is released
  check "$1" "$B" unmap "$2"
  check "... $2 released" released "$2"
}

# Every program linking Ceph's libraries takes seconds to start under emulation, so `rbd` runs
# in the guest only where the guest's view matters (the flags while mapped); the host checks
# the rest after the guest (tests/vm/ceph-run.sh: rbd export, flags, locks, object-map check).
echo "== setup (kernel $(uname -r), guest $(ip -4 -o addr show eth0 | awk '{print $4}')) (at $(($(date +%s) - T0)) s)"
modprobe "${MP[@]}" ext4 || bad setup "cannot load ext4"
mon=$(sed -n 's/^mon host = .*v2:\([0-9.]*\):\([0-9]*\).*/\1 \2/p' "$CEPH_CONF")
check "the guest reaches the monitor (${mon/ /:})" timeout 10 bash -c "exec 3<>/dev/tcp/${mon/ //}"

# PART=ublk (tests/vm/ceph-run.sh's second boot, with the 6.12 kernel that has ublk): the ublk
# transport of a Ceph image, then the end; the host compares `rbd export` and checks the maps.
if [ "${PART:-nbd}" = ublk ]; then
  UBLK=${UBLK:?UBLK names the image} UBLK_MB=${UBLK_MB:?}
  umapped() { # NAME IMAGE [OPTION...]: map --transport ublk into $dev; the suite ends on failure
    local t err
    t=$(date +%s%N)
    dev=$(map --transport ublk "${@:2}" 2>/tmp/map.err)
    if [[ $dev =~ ^/dev/ublkb[0-9]+$ ]] && [ -b "$dev" ]; then ok "$1 ($dev, $(ms_since "$t") ms)"; return 0; fi
    err=$(tail -3 /tmp/map.err)
    bad "$1" "printed '$dev'${err:+; $err}"
    echo "$pass passed, $fail failed"
    exit 1
  }
  ublk_gone() { local i; for i in $(seq 100); do [ ! -e "$1" ] && return 0; sleep 0.1; done; echo "$1 still exists"; return 1; }
  echo "== ublk transport of a Ceph image: map --exclusive, a second client refused"
  umapped "map --transport ublk --exclusive of a Ceph image prints /dev/ublkbN" "rbd/$UBLK" --exclusive
  check "... it has the image's size" test "$(blockdev --getsize64 "$dev")" = $((UBLK_MB << 20))
  check "rbd info (from the guest): object map invalid while mapped" flags_are "$UBLK" "object map invalid,fast diff invalid"
  check "list-mapped shows the Ceph image on ublk" bash -c \
    "'$B' list-mapped | grep -E '^[0-9]+ +rbd +$UBLK +- +$dev +ceph:$CEPH_CONF +ublk\$'"
  check "rbd bench --io-type write (host) is refused (EROFS: --exclusive)" host refused_bench "$UBLK"
  check "mkfs.ext4, mount" bash -c "mkfs.ext4 -q -F $dev && mount $dev $MNT"
  check "... write files (one spanning objects), sync" write_files $MNT
  echo "== kill -9 under fio verify; attach takes the ublk device over (mounted all along)"
  if command -v fio >/dev/null; then
    fio --name=k --directory=$MNT --rw=randwrite --bs=64k --size=4M --iodepth=8 --ioengine=libaio \
      --direct=1 --verify=crc32c --verify_fatal=1 --time_based --runtime=15 --eta=never --output=/tmp/fio-u.out &
    fiopid=$!
    sleep 5
    pid=$(state "$dev" pid)
    check "fio writing through the daemon (pid $pid)" kill -0 $fiopid
    kill -9 "$pid"
    check "kill -9: the daemon is gone" gone "$pid"
    check "... the kernel keeps $dev (user recovery)" test -b "$dev"
    t=$(date +%s%N)
    if ! check "attach --device $dev takes it over" "${RN[@]}" attach --device "$dev" --exclusive \
      --log-file "$LOGDIR/daemon.log" "rbd/$UBLK"; then
      # Nobody serves the device: fio would wait on it until the host's timeout. End here.
      echo "$pass passed, $fail failed"
      exit 1
    fi
    note "attach took $(ms_since "$t") ms"
    check "... after fencing the killed daemon: blocklisted, then its lock broken" \
      grep -q "breaking the stale exclusive lock of a dead owner: blocklisting" "$LOGDIR/daemon.log"
    wait $fiopid; frc=$?
    fio_ok() { [ "$frc" = 0 ] && grep -q 'err= 0' /tmp/fio-u.out || { echo "fio exit $frc"; tail -20 /tmp/fio-u.out; return 1; }; }
    check "fio verify across the kill and the attach: every block checks" fio_ok
  else
    bad "fio is not installed (tests/deps.sh): kill -9 under fio verify not run"
  fi
  check "still mounted; the files written before the kill match" bash -c "mountpoint -q $MNT && cd $MNT && sha256sum -c --quiet SUMS"
  check "umount, e2fsck clean" bash -c "umount $MNT && e2fsck -fn $dev"
  dd if="$dev" bs=1M iflag=direct status=none | md5sum | cut -d' ' -f1 >"$OUT/$UBLK.md5"
  check "unmap $dev" "$B" unmap "$dev"
  check "... the device is gone" ublk_gone "$dev"
  check "rbd info (from the guest): flags clean after unmap" flags_are "$UBLK" ""
  echo "== a snapshot of the Ceph image, mapped read-only on ublk"
  check "rbd snap create $UBLK@s1 (host)" host rbd snap create "$UBLK@s1"
  umapped "map --transport ublk of IMAGE@SNAP" "rbd/$UBLK@s1"
  check "... read-only" test "$(blockdev --getro "$dev")" = 1
  check "... it reads what the image held" test "$(dd if="$dev" bs=1M iflag=direct status=none | md5sum | cut -d' ' -f1)" = "$(cat "$OUT/$UBLK.md5")"
  check "unmap the snapshot" "$B" unmap "$dev"
  note "guest suite: $(($(date +%s) - T0)) s"
  echo "$pass passed, $fail failed"
  [ "$fail" -eq 0 ]
  exit
fi

echo "== map a Ceph image, ext4, unmap (at $(($(date +%s) - T0)) s)"
mapped "map of a Ceph image prints a usable device" "rbd/$IMG"
check "rbd info (from the guest): object map invalid while mapped" flags_are "$IMG" "object map invalid,fast diff invalid"
check "list-mapped shows the Ceph image" bash -c \
  "'$B' list-mapped | grep -E '^[0-9]+ +rbd +$IMG +- +$dev +rados-nbd:ceph:$CEPH_CONF:rbd/$IMG +ceph:$CEPH_CONF +nbd\$'"
check "list-mapped --format json shows the Ceph image" bash -c \
  "'$B' list-mapped --format json | jq -e '.[] | select(.device == \"$dev\" and .pool == \"rbd\" and .namespace == \"\" and .image == \"$IMG\" and .snap == \"\" and .store == \"ceph:$CEPH_CONF\" and (.id | type) == \"number\")'"
check "list-mapped --format xml shows the Ceph image (rbd-nbd's shape)" bash -c \
  "'$B' list-mapped --format xml | grep -q '<device><id>[0-9]*</id><pool>rbd</pool><namespace></namespace><image>$IMG</image><snap></snap><device>$dev</device>'"
check "mkfs.ext4" mkfs.ext4 -q -F "$dev"
check "mount" mount "$dev" $MNT
check "write a known file, sync" bash -c \
  "dd if=/dev/urandom of=$MNT/known bs=1M count=8 status=none && (cd $MNT && md5sum known >$OUT/known.md5) && sync"
check "umount" umount $MNT
t=$(date +%s%N)
check "unmap $dev" "$B" unmap "$dev"
note "unmap took $(ms_since "$t") ms"
check "device released" released "$dev"
check "rbd info (from the guest): flags clean after unmap" flags_are "$IMG" ""

echo "== remap, fsck, read back (at $(($(date +%s) - T0)) s)"
mapped "remap" "rbd/$IMG"
check "e2fsck clean" e2fsck -fn "$dev"
check "mount again, the known file matches" bash -c \
  "mount $dev $MNT && (cd $MNT && md5sum -c --quiet $OUT/known.md5); r=\$?; umount $MNT; exit \$r"
out=$("${RN[@]}" map "rbd/$RAW" --device "$dev" --log-file "$LOGDIR/refused.log" 2>&1)
if [ $? -ne 0 ] && grep -q "$dev" <<<"$out" && grep -qi "in use" <<<"$out"; then
  ok "map --device of a device already taken is refused"; note "$out"
else bad "map --device of a device already taken is refused" "$out"; fi
# It had opened the image before the kernel refused the device: it must close it cleanly.
check "the refused map closed $RAW cleanly (released its lock)" grep -q "released exclusive lock" "$LOGDIR/refused.log"
out=$(map "rbd/$RAW" --device /dev/sda 2>&1)
if [ $? -ne 0 ] && grep -q "/dev/sda" <<<"$out"; then ok "map --device of a non-nbd device is refused"; note "$out"
else bad "map --device of a non-nbd device is refused" "$out"; fi
# The whole device as the kernel reads it: the host compares `rbd export` with this.
md5sum <"$dev" | cut -d' ' -f1 >"$OUT/$IMG.md5"
check "unmap by image name (rbd/$IMG)" "$B" unmap "rbd/$IMG"
check "device released after unmap by name" released "$dev"
check "list-mapped empty after unmap" bash -c "[ -z \"\$('$B' list-mapped)\" ] && [ \"\$('$B' list-mapped --format json)\" = '[]' ]"

echo "== raw writes through /dev/nbdX (at $(($(date +%s) - T0)) s)"
# With rbd-nbd's spellings of the cluster options: -c CONF (the Ceph store), -n client.ID.
RN_USUAL=("${RN[@]}")
RN=("$B" -c "$CEPH_CONF")
[ -n "${CEPH_NBD_KEYRING:-}" ] && RN+=(-n "client.${CEPH_NBD_ID:-nbd}" --keyring "$CEPH_NBD_KEYRING")
mapped "map $RAW (as rbd-nbd: -c CONF -n client.ID)" "rbd/$RAW"
RN=("${RN_USUAL[@]}")
check "  -c CONF is the Ceph store of that file" bash -c \
  "'$B' list-mapped --format json | jq -e '.[] | select(.device == \"$dev\" and .store == \"ceph:$CEPH_CONF\")'"
check "dd $RAW_MB MiB of random data (O_DIRECT)" dd if=/dev/urandom of="$dev" bs=1M count="$RAW_MB" oflag=direct status=none
dd if="$dev" bs=1M count="$RAW_MB" iflag=direct status=none | md5sum | cut -d' ' -f1 >"$OUT/$RAW.md5"
check "unmap $RAW" "$B" unmap "$dev"

echo "== rbd-nbd's command lines, with only the tool's name changed (rbd-nbd is the oracle) (at $(($(date +%s) - T0)) s)"
# compat TOOL: map --try-netlink --show-cookie (rbd-nbd 16.2 uses the netlink interface, which
# cookies, detach and attach need, only when asked), list-mapped (json, pretty json, xml),
# detach, attach with a
# wrong cookie (refused) and with the right one, I/O, unmap by image name; what each step
# printed and whether it succeeded, with the device and the cookie (rbd-nbd's is random)
# written as DEV and COOKIE. The same lines must come out for both tools.
compat() {
  local t=("$1" -c "$CEPH_CONF") out dev cookie
  [ -n "${CEPH_NBD_KEYRING:-}" ] && t+=(--id "${CEPH_NBD_ID:-nbd}" --keyring "$CEPH_NBD_KEYRING")
  out=$("${t[@]}" map --try-netlink --show-cookie "rbd/$COMPAT" 2>/tmp/compat.err) || { echo "map failed: $(tail -2 /tmp/compat.err)"; return; }
  dev=${out%% *} cookie=${out#* }
  echo "map printed: $(echo "$out" | sed "s|$dev|DEV|; s|$cookie|COOKIE|")"
  echo "the cookie is the device's backend: $([ "$(cat "/sys/block/${dev#/dev/}/backend" 2>&1)" = "$cookie" ] && echo yes || echo no)"
  echo "list-mapped json: $("${t[@]}" list-mapped --format json | jq -c --arg d "$dev" --arg c "$cookie" \
    '[.[] | select(.device == $d) | {pool, namespace, image, snap, device: (.device == $d), cookie: (.cookie == $c), id: (.id | type)}]')"
  # The plain row as a script's awk sees it: the first six fields.
  echo "list-mapped plain fields: $("${t[@]}" list-mapped | grep " $dev " | sed "s|$dev|DEV|; s|$cookie|COOKIE|; s/^[0-9][0-9]*/N/" | awk '{print $1, $2, $3, $4, $5, $6}')"
  echo "list-mapped pretty xml (rbd-nbd's elements): $("${t[@]}" list-mapped --format xml --pretty-format | grep -vE '<(store|read_only|state|transport)>' | sed "s|$dev|DEV|; s|$cookie|COOKIE|; s|<id>[0-9]*</id>|<id>N</id>|" | tr '\n' '~')"
  echo "list-mapped xml, one line (rbd-nbd's elements): $("${t[@]}" list-mapped --format xml | sed -E 's#<(store|read_only|state|transport)>[^<]*</(store|read_only|state|transport)>##g' | sed "s|$dev|DEV|; s|$cookie|COOKIE|; s|<id>[0-9]*</id>|<id>N</id>|" | tr '\n' '~')"
  echo "list-mapped pretty json parses alike: $("${t[@]}" list-mapped --format json --pretty-format | jq -c --arg d "$dev" '[.[] | select(.device == $d) | .image]')"
  echo "list-mapped xml: $("${t[@]}" list-mapped --format xml | grep -o "<device><id>[0-9]*</id><pool>rbd</pool><namespace></namespace><image>$COMPAT</image><snap></snap><device>$dev</device><cookie>$cookie</cookie>" | sed "s|<id>[0-9]*</id>|<id>N</id>|; s|$dev|DEV|; s|$cookie|COOKIE|")"
  "${t[@]}" detach "$dev" >/dev/null 2>&1 && echo "detach: ok" || echo "detach: failed"
  "${t[@]}" attach --try-netlink --device "$dev" --cookie "not-$cookie" "rbd/$COMPAT" >/dev/null 2>&1 && echo "attach with a wrong cookie: accepted" || echo "attach with a wrong cookie: refused"
  "${t[@]}" attach --try-netlink --device "$dev" --cookie "$cookie" "rbd/$COMPAT" >/dev/null 2>/tmp/compat.err && echo "attach --cookie: ok" || echo "attach --cookie: failed: $(tail -1 /tmp/compat.err)"
  dd if=/dev/urandom of=/tmp/compat.bin bs=64k count=16 status=none
  dd if=/tmp/compat.bin of="$dev" bs=64k oflag=direct status=none && cmp -s -n $((1 << 20)) /tmp/compat.bin "$dev" && echo "I/O after attach: ok" || echo "I/O after attach: failed"
  "${t[@]}" unmap "rbd/$COMPAT" >/dev/null 2>&1 && echo "unmap by image name: ok" || echo "unmap by image name: failed"
  for _ in $(seq 100); do [ "$(cat "/sys/block/${dev#/dev/}/size")" = 0 ] && break; sleep 0.1; done
  echo "device released: $([ "$(cat "/sys/block/${dev#/dev/}/size")" = 0 ] && echo yes || echo no)"
}
if command -v rbd-nbd >/dev/null; then
  compat rbd-nbd >/tmp/compat.rbd-nbd
  compat "$B" >/tmp/compat.rados-nbd
  sed 's/^/    rbd-nbd: /' /tmp/compat.rbd-nbd
  if diff /tmp/compat.rbd-nbd /tmp/compat.rados-nbd >/tmp/compat.diff; then
    ok "rados-nbd answers rbd-nbd's command lines as rbd-nbd does"
  else
    bad "rados-nbd answers rbd-nbd's command lines as rbd-nbd does"; sed 's/^/    | /' /tmp/compat.diff
  fi
else
  echo "SKIP rbd-nbd's command lines: rbd-nbd is not installed (package rbd-nbd, tests/deps.sh)"
fi

echo "== xfs on a Ceph image (at $(($(date +%s) - T0)) s)"
if ! command -v mkfs.xfs >/dev/null || ! command -v xfs_repair >/dev/null; then
  echo "SKIP xfs on a Ceph image: mkfs.xfs/xfs_repair not installed (xfsprogs, tests/deps.sh)"
elif ! modprobe "${MP[@]}" xfs; then
  bad "load xfs"
else
  mapped "map $XFS" "rbd/$XFS"
  # -K: the image is new, nothing to discard first.
  check "mkfs.xfs" mkfs.xfs -q -K "$dev"
  check "mount xfs" mount "$dev" $MNT
  check "write files on xfs, sync" write_files $MNT
  check "umount xfs" umount $MNT
  check "xfs_repair -n clean" xfs_repair -n "$dev"
  check "mount xfs again, every file verifies" bash -c \
    "mount $dev $MNT && (cd $MNT && sha256sum --quiet -c SUMS); r=\$?; umount $MNT; exit \$r"
  unmapped "unmap $XFS" "$dev"
fi

echo "== kill -9 under fio verify; attach takes the device over (mounted all along) (at $(($(date +%s) - T0)) s)"
# The options the attach repeats. --reattach-timeout: the kernel keeps the device while the
# new daemon waits for the OSD to drop the killed one's watch (15 s here) before it fences it.
# --io-timeout: a request in flight at the kill is sent again (to the attached daemon) when it
# times out; with none set (0) the kernel waits for blk-mq's default 30 s first.
LOPT=(--reattach-timeout 120 --io-timeout 10 --quiesce --quiesce-hook "$QHOOK")
mapped "map $LIVE (--quiesce)" "rbd/$LIVE" "${LOPT[@]}"
mkfs_written() { mkfs.ext4 -q -F "$dev" && mount "$dev" $MNT && write_files $MNT; }
check "mkfs.ext4, mount, write files" mkfs_written
pid=$(state "$dev" pid)
n=${dev#/dev/}
writes() { awk '{print $5}' "/sys/block/$n/stat"; }
probe() { # 16 direct 64 KiB writes into the file system: how long they take, in ms
  local t
  t=$(date +%s%N)
  dd if=/dev/zero of=$MNT/probe bs=64k count=16 oflag=direct conv=notrunc status=none && ms_since "$t"
}
# paced_fio NAME FILE OUT: 2 MiB of 64 KiB random writes with crc32c headers, 50 ms apart
# (so that a kill or a detach lands among them; --rate would crawl after the stall), then
# every block read back and checked.
paced_fio() {
  fio --name="$1" --filename="$2" --size=2M --bs=64k --rw=randwrite --ioengine=libaio \
    --iodepth=4 --direct=1 --verify=crc32c --verify_fatal=1 --thinktime=50000 --verify_state_save=0 \
    --output="$3" >/dev/null 2>&1
}
if command -v fio >/dev/null; then
  p0=$(probe)
  w0=$(writes)
  paced_fio kill9 $MNT/fio.dat /tmp/fio.out &
  fiopid=$!
  for i in $(seq 300); do [ $(($(writes) - w0)) -ge 6 ] && break; sleep 0.1; done
  check "fio writing through the daemon (pid $pid)" kill -0 $fiopid
  kill -9 "$pid"
  check "kill -9: the daemon is gone" gone "$pid"
  check "... the kernel keeps the device for attach" test "$(cat /sys/block/$n/size)" != 0
  t=$(date +%s%N)
  check "attach --device $dev takes it over" "${RN[@]}" attach --device "$dev" "${LOPT[@]}" \
    --log-file "$LOGDIR/daemon.log" "rbd/$LIVE"
  note "attach took $(ms_since "$t") ms"
  check "... after fencing the killed daemon: blocklisted, then its lock broken" \
    grep -q "breaking the stale exclusive lock of a dead owner: blocklisting" "$LOGDIR/daemon.log"
  wait $fiopid
  frc=$?
  fio_ok() { [ "$frc" = 0 ] && grep -q 'err= 0' /tmp/fio.out || { echo "fio exit $frc"; cat /tmp/fio.out; return 1; }; }
  check "fio verify across the kill and the attach: every block checks" fio_ok
  note "16 direct 64 KiB writes: ${p0} ms before the kill, $(probe) ms after the attach"
  note "kernel: $(dmesg | grep "${dev#/dev/}" | grep -ciE 'timed out|stuck') request timeouts logged"
  note "fio: $(grep -oE '^ +(write|read): IOPS=[^,]*, BW=[^ ]*|run=[0-9-]+msec' /tmp/fio.out | tr -s ' ' | paste -sd' ')"
  new_daemon() { local p; p=$(state "$dev" pid); [ -n "$p" ] && [ "$p" != "$pid" ] && kill -0 "$p"; }
  check "... a new daemon serves the device" new_daemon
  check "... still mounted, the files written before the kill verify, new writes go in" bash -c \
    "mountpoint -q $MNT && (cd $MNT && sha256sum --quiet -c SUMS) && echo after >$MNT/after && sync"
else
  bad "fio is not installed (tests/deps.sh): kill -9 under fio verify not run"
fi

echo "== detach / attach under fio verify (a daemon upgrade), mounted all along (at $(($(date +%s) - T0)) s)"
if command -v fio >/dev/null; then
  pid=$(state "$dev" pid)
  w0=$(writes)
  fences=$(grep -c "breaking the stale exclusive lock" "$LOGDIR/daemon.log")
  paced_fio upgrade $MNT/fio2.dat /tmp/fio2.out &
  fiopid=$!
  for i in $(seq 300); do [ $(($(writes) - w0)) -ge 6 ] && break; sleep 0.1; done
  check "fio writing through the daemon (pid $pid)" kill -0 $fiopid
  t=$(date +%s%N)
  check "detach under load" "${RN[@]}" detach "$dev"
  check "... the old daemon exited" gone "$pid"
  check "... after closing the image cleanly (host: flags clear, no lock, no watcher)" host idle "$LIVE"
  check "... the kernel keeps the device (I/O waits in it)" test "$(cat /sys/block/$n/size)" != 0
  check "attach --device $dev: the new daemon takes it over" "${RN[@]}" attach --device "$dev" "${LOPT[@]}" \
    --log-file "$LOGDIR/daemon.log" "rbd/$LIVE"
  note "detach to attached: $(ms_since "$t") ms"
  wait $fiopid
  frc=$?
  fio2_ok() { [ "$frc" = 0 ] && grep -q 'err= 0' /tmp/fio2.out || { echo "fio exit $frc"; cat /tmp/fio2.out; return 1; }; }
  check "fio verify across the detach and the attach: every block checks" fio2_ok
  check "... no owner was fenced (the lock was released, not broken)" \
    test "$(grep -c "breaking the stale exclusive lock" "$LOGDIR/daemon.log")" = "$fences"
  check "... a new daemon serves the device" new_daemon
  check "... still mounted, the files verify, new writes go in" bash -c \
    "mountpoint -q $MNT && (cd $MNT && sha256sum --quiet -c SUMS) && echo upgraded >$MNT/upgraded && sync"
else
  bad "fio is not installed (tests/deps.sh): detach/attach under fio verify not run"
fi

echo "== rbd resize from the host while mounted; resize2fs (at $(($(date +%s) - T0)) s)"
check "rbd resize --size ${LIVE_GROWN_MB}M $LIVE (host)" host rbd resize --size "${LIVE_GROWN_MB}M" "$LIVE"
check "the device follows: $LIVE_GROWN_MB MiB" size_is "$dev" $((LIVE_GROWN_MB << 20))
fs_kib() { df -k $MNT | awk 'NR == 2 { print $2 }'; }
k0=$(fs_kib)
check "resize2fs grows the mounted ext4 online" resize2fs "$dev"
check "df shows the grown file system" test "$(fs_kib)" -gt $((k0 + (LIVE_GROWN_MB - LIVE_MB) * 1024 * 3 / 4))

echo "== rbd snap create from the host while mounted (map --quiesce: the hook freezes the fs) (at $(($(date +%s) - T0)) s)"
# Written but not synced: only the freeze puts it in the snapshot.
echo unsynced >$MNT/unsynced
check "rbd snap create $LIVE@s1 (host)" host rbd snap create "$LIVE@s1"
# The Unquiesce is acked at once (as librbd's watchers do) and the thaw runs after: `rbd snap
# create` may return first, and a write meanwhile waits for the thaw.
check "... the file system is writable after (thawed)" timeout 30 bash -c "echo thawed >$MNT/thawed && sync"
hooked() {
  local i
  for i in $(seq 100); do grep -q "said: unquiesce: $MNT ($dev)" "$LOGDIR/daemon.log" && break; sleep 0.1; done
  grep -q "said: quiesce: $MNT ($dev)" "$LOGDIR/daemon.log" && grep -q "said: unquiesce: $MNT ($dev)" "$LOGDIR/daemon.log" ||
    { grep "quiesce hook" "$LOGDIR/daemon.log"; return 1; }
}
check "... the daemon ran the hook: froze $MNT, then thawed it" hooked
check "the snapshot's export is a clean ext4 holding the unsynced file (host: rbd export, e2fsck -fn)" \
  host snap_fs "$LIVE@s1" unsynced unsynced
check "umount $LIVE" umount $MNT
unmapped "unmap $LIVE" "$dev"
check "$LIVE after unmap (host): flags clean, no lock, no watcher" host idle "$LIVE"
check "$LIVE after unmap (host): rbd object-map check passes" host omap_check "$LIVE"

echo "== read-only maps: --read-only and IMAGE@SNAP (at $(($(date +%s) - T0)) s)"
ro_write() { # DEV: a write through DEV fails with EPERM or EROFS
  local out
  out=$(dd if=/dev/zero of="$1" bs=4k count=1 oflag=direct status=none 2>&1) && { echo "dd wrote to $1"; return 1; }
  grep -Eq "Operation not permitted|Read-only file system" <<<"$out" || { echo "$out"; return 1; }
}
mapped "map --read-only $LIVE" "rbd/$LIVE" --read-only
check "read-only device (blockdev --getro)" test "$(blockdev --getro "$dev")" = 1
check "a write fails (EPERM/EROFS)" ro_write "$dev"
check "the image takes no lock, its flags stay clean (host)" host unlocked "$LIVE"
check "mount -o ro: every file verifies, the thawed one too" bash -c \
  "mount -o ro $dev $MNT && (cd $MNT && sha256sum --quiet -c SUMS) && grep -q thawed $MNT/thawed; r=\$?; umount $MNT; exit \$r"
unmapped "unmap the read-only map" "$dev"
mapped "map $LIVE@s1" "rbd/$LIVE@s1"
check "the snapshot's device is read-only" test "$(blockdev --getro "$dev")" = 1
check "a write fails (EPERM/EROFS)" ro_write "$dev"
snap_bytes() {
  local h g
  h=$(host export_md5 "$LIVE@s1") || { echo "$h"; return 1; }
  g=$(dd if="$dev" bs=1M iflag=direct status=none | md5sum | cut -d' ' -f1)
  [ "$g" = "$h" ] || { echo "the device reads $g, rbd export $LIVE@s1 $h"; return 1; }
}
check "the device reads the snapshot's bytes (md5 = host rbd export $LIVE@s1)" snap_bytes
check "its ext4 has the unsynced file, not the one written after the snapshot" bash -c \
  "mount -o ro $dev $MNT && grep -q unsynced $MNT/unsynced && [ ! -e $MNT/thawed ]; r=\$?; umount $MNT; exit \$r"
unmapped "unmap $LIVE@s1" "$dev"

echo "== a second client: rbd bench (host) beside a map; refused with --exclusive (at $(($(date +%s) - T0)) s)"
mapped "map $BENCH" "rbd/$BENCH"
for f in b1:8 b2:1 b3:1; do dd if=/dev/urandom of=/tmp/${f%:*}.raw bs=1M count=${f#*:} status=none; done
check "the guest writes 8 MiB (O_DIRECT)" dd if=/tmp/b1.raw of="$dev" bs=1M oflag=direct status=none
# The guest writes 1 MiB at 8 MiB while rbd bench writes the first MiB: the lock goes to
# and fro (rbd bench asks for it, the daemon's next write asks it back).
(dd if=/tmp/b2.raw of="$dev" bs=64k seek=128 oflag=direct status=none; echo $? >/tmp/b2.rc) &
ddpid=$!
check "rbd bench --io-type write 1 MiB (host) while mapped" host bench_write "$BENCH" 1M
wait $ddpid
check "... the guest's writes meanwhile completed" test "$(cat /tmp/b2.rc)" = 0
check "... the guest writes again after the bench" dd if=/tmp/b3.raw of="$dev" bs=64k seek=144 oflag=direct status=none
one_byte() { # FILE BYTES: the first BYTES of FILE are one byte repeated (rbd bench's pattern)
  local b
  b=$(head -c 1 "$1" | od -An -to1 | tr -d ' ')
  [ "$(head -c "$2" "$1" | tr -d "\\$b" | wc -c)" = 0 ] || { echo "the first $2 bytes are not rbd bench's (one byte repeated)"; return 1; }
}
both_writers() {
  dd if="$dev" of=/tmp/r.raw bs=1M count=10 iflag=direct status=none &&
    one_byte /tmp/r.raw $((1 << 20)) &&
    cmp -n $((7 << 20)) -i $((1 << 20)):$((1 << 20)) /tmp/r.raw /tmp/b1.raw &&
    cmp -n $((1 << 20)) -i $((8 << 20)):0 /tmp/r.raw /tmp/b2.raw &&
    cmp -n $((1 << 20)) -i $((9 << 20)):0 /tmp/r.raw /tmp/b3.raw
}
check "both writers' data is there: rbd bench's first MiB, the guest's 9 MiB after it" both_writers
unmapped "unmap $BENCH" "$dev"
mapped "map --exclusive $BENCH" "rbd/$BENCH" --exclusive
check "the guest writes (O_DIRECT)" dd if=/tmp/b3.raw of="$dev" bs=64k seek=160 oflag=direct status=none
check "rbd bench --io-type write (host) is refused (EROFS, as rbd-nbd --exclusive)" host refused_bench "$BENCH"
untouched() {
  dd if="$dev" of=/tmp/r2.raw bs=1M count=11 iflag=direct status=none &&
    cmp -n $((10 << 20)) /tmp/r.raw /tmp/r2.raw && cmp -n $((1 << 20)) -i $((10 << 20)):0 /tmp/r2.raw /tmp/b3.raw
}
check "... it wrote nothing; the guest's data is there" untouched
check "... the guest still writes" dd if=/tmp/b2.raw of="$dev" bs=64k seek=176 oflag=direct status=none
dd if="$dev" bs=1M iflag=direct status=none | md5sum | cut -d' ' -f1 >"$OUT/$BENCH.md5"
unmapped "unmap --exclusive $BENCH" "$dev"

note "guest suite: $(($(date +%s) - T0)) s"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
