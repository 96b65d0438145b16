#!/bin/bash
# Kernel-attach tests of Ceph images. Runs INSIDE the test VM (tests/vm/ceph-run.sh boots it
# with a NIC on a cluster of its own) as root, against the real nbd driver of Debian's kernel.
# Environment (set by ceph-run.sh): RADOS_NBD_BIN, CEPH_CONF (the cluster's config as the guest
# sees it), CEPH_NBD_ID/CEPH_NBD_KEYRING (the restricted client the daemon runs as; `rbd` runs
# as client.admin through the config's keyring), IMG and RAW (two images of pool rbd), OUT (a
# shared folder: checksums the host compares with `rbd export`), LOGDIR.
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
  if out=$("$@" 2>&1); then ok "$name"; else bad "$name"; echo "$out" | tail -20 | sed 's/^/    | /'; fi
}
map() { "${RN[@]}" map --log-file "$LOGDIR/daemon.log" "$@"; }
# mapped NAME IMAGE: map IMAGE into $dev and check that map printed a usable /dev/nbdX; on
# failure the suite ends here (everything after needs the device), with map's error.
mapped() {
  local t err
  t=$(date +%s%N)
  dev=$(map "$2" 2>/tmp/map.err)
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

# Every program linking Ceph's libraries takes seconds to start under emulation, so `rbd` runs
# in the guest only where the guest's view matters (the flags while mapped); the host checks
# the rest after the guest (tests/vm/ceph-run.sh: rbd export, flags, locks, object-map check).
echo "== setup (kernel $(uname -r), guest $(ip -4 -o addr show eth0 | awk '{print $4}'))"
modprobe "${MP[@]}" ext4 || bad setup "cannot load ext4"
mon=$(sed -n 's/^mon host = .*v2:\([0-9.]*\):\([0-9]*\).*/\1 \2/p' "$CEPH_CONF")
check "the guest reaches the monitor (${mon/ /:})" timeout 10 bash -c "exec 3<>/dev/tcp/${mon/ //}"

echo "== map a Ceph image, ext4, unmap"
mapped "map of a Ceph image prints a usable device" "rbd/$IMG"
check "rbd info (from the guest): object map invalid while mapped" flags_are "$IMG" "object map invalid,fast diff invalid"
check "list-mapped shows the Ceph image" bash -c \
  "'$B' list-mapped | grep -E '^[0-9]+ +rbd +- +$IMG +- +$dev +ceph:$CEPH_CONF\$'"
check "list-mapped --format json shows the Ceph image" bash -c \
  "'$B' list-mapped --format json | jq -e '.[] | select(.device == \"$dev\" and .pool == \"rbd\" and .namespace == \"\" and .image == \"$IMG\" and .snap == null and .store == \"ceph:$CEPH_CONF\" and (.id | type) == \"number\")'"
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

echo "== remap, fsck, read back"
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

echo "== raw writes through /dev/nbdX"
mapped "map $RAW" "rbd/$RAW"
check "dd $RAW_MB MiB of random data (O_DIRECT)" dd if=/dev/urandom of="$dev" bs=1M count="$RAW_MB" oflag=direct status=none
dd if="$dev" bs=1M count="$RAW_MB" iflag=direct status=none | md5sum | cut -d' ' -f1 >"$OUT/$RAW.md5"
check "unmap $RAW" "$B" unmap "$dev"

note "guest suite: $(($(date +%s) - T0)) s"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
