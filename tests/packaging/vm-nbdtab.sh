#!/bin/bash
# Guest snippet for the kernel VM suite: the nbdtab path (packaging/rados-nbdmap, what
# rados-nbdmap.service runs at boot and shutdown) against the real nbd driver. No systemd and no
# udevd run in the guest, so the unit's ordering and the /dev/rados-nbd links are not exercised
# here: the script logic, the real map/unmap, unmount-before-unmap and the udev helper are.
#
# Run from the host (tests/vm/vm.sh copies it into the guest as /mnt/guest.sh). The guest hides
# /tmp, /run, /var/tmp and /var/lib, so copy what it needs into the work dir (/mnt inside):
#   cp "$BIN" packaging/rados-nbdmap packaging/rados-nbd-udev "$WORK"/
#   tests/vm/vm.sh tests/packaging/vm-nbdtab.sh "$WORK" RADOS_NBD_BIN=/mnt/rados-nbd \
#     NBDMAP=/mnt/rados-nbdmap UDEVH=/mnt/rados-nbd-udev
# (or ROOT=<repository> instead of NBDMAP/UDEVH when the repository is outside those dirs).
# Prints PASS/FAIL lines and 'N passed, N failed'; exits non-zero when anything failed.
set -u
: "${RADOS_NBD_BIN:?RADOS_NBD_BIN=path of rados-nbd}"
BIN=$RADOS_NBD_BIN
NBDMAP=${NBDMAP:-${ROOT:?NBDMAP=path of rados-nbdmap, or ROOT=the repository}/packaging/rados-nbdmap}
UDEVH=${UDEVH:-$ROOT/packaging/rados-nbd-udev}
W=${VM_WORK:-/mnt}/nbdtab-test
P=0; F=0
pass() { P=$((P + 1)); echo "PASS nbdtab-vm: $1"; }
fail() { F=$((F + 1)); echo "FAIL nbdtab-vm: $1${2:+: $2}"; }
check() { local n=$1; shift; local o; if o=$("$@" 2>&1); then pass "$n"; else fail "$n" "$(echo "$o" | tail -3)"; fi; }

rm -rf "$W"; mkdir -p "$W/store" "$W/mnt"
export RADOS_NBD_STORE=$W/store   # the default dir store's path (not a URI)
export RADOS_NBD_NBDTAB=$W/nbdtab
export RADOS_NBD_BIN=$BIN
# The VM boots an unpacked kernel: modprobe needs its module root.
MP=(); [ -n "${KMODS:-}" ] && MP=(-d "$KMODS")
modprobe "${MP[@]}" nbd nbds_max=8 2>/dev/null
modprobe "${MP[@]}" ext4 || { fail "setup" "cannot load ext4"; echo "$P passed, $F failed"; exit 1; }

"$BIN" create --size 64M rbd/a >/dev/null && "$BIN" create --size 32M rbd/b >/dev/null ||
  { fail "create test images" "rados-nbd create failed"; echo "$P passed, $F failed"; exit 1; }
cat >"$RADOS_NBD_NBDTAB" <<'EOF'
# test nbdtab
rbd/a
rbd/missing
b      device=/dev/nbd5,timeout=60
EOF

RUN=${RADOS_NBD_RUN_DIR:-/run/rados-nbd}
dev_of() { # POOL/IMAGE -> /dev/nbdN, from the daemons' state files (the documented contract)
  local f
  for f in "$RUN"/nbd*.json; do
    [ -f "$f" ] || continue
    jq -r --arg s "$1" 'select((.pool + "/" + .image) == $s and .pid != 0) | .device' "$f" 2>/dev/null
  done | head -n1
}

"$NBDMAP" map >"$W/map1.log" 2>&1; rc=$?
check "map: exit 1 because rbd/missing failed" test "$rc" = 1
check "map: the failure names the image" grep -q "rbd/missing: map failed" "$W/map1.log"
A=$(dev_of rbd/a); B=$(dev_of rbd/b)
check "map: rbd/a mapped" test -n "$A"
check "map: rbd/b (listed after the failing entry) mapped on the device nbdtab asked for" test "$B" = /dev/nbd5
if [ -n "$A" ]; then
  check "udev helper names the real device rbd/a" bash -c "$UDEVH ${A#/dev/} | grep -qx RADOS_NBD_NAME=rbd/a"
  mkfs.ext4 -q -F "$A" >/dev/null 2>&1 && mount "$A" "$W/mnt" &&
    head -c 3M /dev/urandom >"$W/mnt/data" && sha256sum <"$W/mnt/data" >"$W/sum" && sync
  check "mkfs.ext4 + mount + write on rbd/a" test -s "$W/sum"
fi

# The shutdown path: the filesystem is still mounted; unmap must unmount it first.
"$NBDMAP" unmap >"$W/unmap1.log" 2>&1; rc=$?
check "unmap: exit 0" test "$rc" = 0
if [ -s "$W/sum" ]; then
  check "unmap: the mounted filesystem was unmounted first" bash -c "! mountpoint -q '$W/mnt'"
fi
check "unmap: nothing left mapped" test -z "$(dev_of rbd/a)$(dev_of rbd/b)"

"$NBDMAP" map >"$W/map2.log" 2>&1
A=$(dev_of rbd/a)
if [ -z "$A" ]; then
  fail "map again: rbd/a" "$(tail -3 "$W/map2.log")"
elif ! mount "$A" "$W/mnt"; then
  fail "map again: mount rbd/a"
else
  check "map again: data survived the unmap/map cycle" bash -c "sha256sum <'$W/mnt/data' | cmp -s - '$W/sum'"
  umount "$W/mnt"
  check "fsck clean after the cycle" fsck.ext4 -fn "$A"
  mount "$A" "$W/mnt"
  # A busy filesystem is not pulled away: unmap fails for it and leaves it mapped.
  # Busy once a process works in it: wait for its cwd rather than a fixed second (a loaded
  # emulated guest can take longer than that to start it).
  ( cd "$W/mnt" && exec sleep 30 ) & busy=$!
  for _ in $(seq 1 100); do [ "$(readlink /proc/$busy/cwd)" = "$W/mnt" ] && break; sleep 0.1; done
  "$NBDMAP" unmap >"$W/unmap2.log" 2>&1; rc=$?
  check "unmap with a busy mount: exit 1, mount and device kept" \
    bash -c "[ $rc = 1 ] && mountpoint -q '$W/mnt' && [ '$(dev_of rbd/a)' = '$A' ]"
  check "unmap with a busy mount: the other image still unmapped" test -z "$(dev_of rbd/b)"
  kill "$busy" 2>/dev/null; wait "$busy" 2>/dev/null
  "$NBDMAP" unmap >"$W/unmap3.log" 2>&1; rc=$?
  check "unmap once no longer busy" bash -c "[ $rc = 0 ] && ! mountpoint -q '$W/mnt'"
fi

# The ioctl fallback gives the kernel no backend identifier: the udev helper then reads the
# daemon's state file.
if "$BIN" create --size 16M rbd/c >/dev/null && C=$(RADOS_NBD_FORCE_IOCTL=1 "$BIN" map rbd/c 2>"$W/mapc.log"); then
  check "udev helper names an ioctl-mapped device from the state file" \
    bash -c "[ -z \"\$(cat /sys/block/${C#/dev/}/backend 2>/dev/null)\" ] && $UDEVH ${C#/dev/} | grep -qx RADOS_NBD_NAME=rbd/c"
  "$BIN" unmap "$C" >/dev/null 2>&1
else
  fail "map rbd/c through the ioctl fallback" "$(tail -2 "$W/mapc.log")"
fi
"$NBDMAP" unmap-all >/dev/null 2>&1
echo "$P passed, $F failed"
[ "$F" = 0 ]
