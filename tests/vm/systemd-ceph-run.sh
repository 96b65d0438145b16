#!/usr/bin/env bash
# The systemd units with the Ceph store, booted for real: the test VM boots systemd as PID 1
# (tests/vm/vm.sh VM_INIT=systemd) with a NIC on a tap inside a network namespace of its own,
# beside a throwaway one-node cluster bound to that namespace (tests/vm/ceph-ns.sh). As on a
# host whose images live in a cluster, systemd-networkd brings the NIC up at boot and
# systemd-networkd-wait-online holds network-online.target until it is up; the units are
# ordered after it, so they reach the cluster at their first try, and at shutdown they stop
# (unmount, flush, write the object map, clear the flag, release the lock) before the network.
#   rbd/sdc1 from nbdtab (rados-nbdmap.service; store=, id=, keyring= of a restricted Ceph user)
#   rbd/sdc2 as rados-nbd@rbd-sdc2.service (RADOS_NBD_MAP_OPTIONS in /etc/default/rados-nbd)
# both ext4 made on the host and imported with `rbd import`, mounted from fstab with _netdev;
# the guest (tests/vm/systemd-ceph-tests.sh) checks the order and writes files. After the
# poweroff the host checks the shutdown order in the journal the guest saved, and with Ceph's
# own tools: flags clean, no lock, no watcher, `rbd object-map check`, and `rbd export` of
# each image a clean ext4 holding every file the guest wrote.
#
#   tests/vm/systemd-ceph-run.sh [BINARY]      (or RADOS_NBD_BIN=BINARY ...)
#
# Skips (exit 0, says so) without qemu, systemd, the Ceph binaries, a ceph-enabled rados-nbd,
# or when the namespace cannot be made. KEEP_WORK=1 keeps the work folder (kept on failure too).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
source "$root/tests/lib.sh"
source "$here/ceph-ns.sh"
T0=$(date +%s)
skip() { echo "SKIP systemd tests with the Ceph store: $*; nothing was run"; exit 0; }

if b=$(cephns_missing jq e2fsck debugfs mkfs.ext4 objcopy); then skip "$b is not installed (tests/deps.sh)"; fi
[ -x /lib/systemd/systemd ] || skip "systemd is not installed (the guest boots this machine's root)"
[ -x /lib/systemd/systemd-networkd ] || skip "systemd-networkd is not installed (the guest's network at boot)"
cephns_suite_binary "${1:-}"
work=$(mktemp -d "${TMPDIR:-/tmp}/rados-nbd-vmsdceph.XXXXXX")
cleanup() {
  trap '' INT TERM
  cephns_teardown
  if [ -n "${KEEP_WORK:-}" ] || [ "$T_FAIL" -gt 0 ]; then
    rm -rf "$work/ceph/osd0" "$work/ceph/mon" "$work"/*.raw
    echo "work folder kept: $work"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cephns_prepare || { fail "fetch the test VM's kernel"; t_summary; exit 1; }
why=$(cephns_make) || skip "$why"
t=$(date +%s)
if ! cephns_cluster >"$work/cluster.out" 2>&1; then
  fail "start the cluster in the namespace" "$(tail -5 "$work/cluster.out")"; t_summary; exit 1
fi
pass "one-node cluster bound to $addr in namespace $ns (up in $(($(date +%s) - t)) s)"
check "the cluster listens on $addr only" listens_only_on_addr

echo "== images: ext4 made on the host, imported with rbd import"
for i in sdc1 sdc2; do
  truncate -s 64M "$work/$i.raw" && mkfs.ext4 -q -F -L $i "$work/$i.raw" &&
    rbd import --no-progress "$work/$i.raw" rbd/$i >/dev/null ||
    { fail "make rbd/$i"; t_summary; exit 1; }
  rm -f "$work/$i.raw"
done
has_map_features() {
  rbd info "$1" --format json | jq -e '.features | index("object-map") and index("fast-diff") and index("exclusive-lock")'
}
for i in sdc1 sdc2; do
  check "rbd/$i has librbd's default features (exclusive-lock, object-map, fast-diff)" has_map_features rbd/$i
done

# The package's files, as tests/vm/systemd-run.sh lays them (tests/vm/sd-rootfs.sh).
R=$work/rootfs
source "$here/sd-rootfs.sh"
objcopy --strip-debug "$bin" "$work/rados-nbd" 2>/dev/null || cp "$bin" "$work/rados-nbd"
sd_package_files "$work/rados-nbd"
# The admin's configuration: the cluster's config and a restricted user's keyring in /etc/ceph.
sd_inst 0644 "$work/ceph/guest.conf" /etc/ceph/ceph.conf
sd_inst 0600 "$work/ceph/client.nbd.keyring" /etc/ceph/ceph.client.nbd.keyring
K=/etc/ceph/ceph.client.nbd.keyring
{
  cat "$root/packaging/default"
  echo "RADOS_NBD_MAP_OPTIONS=--store ceph:/etc/ceph/ceph.conf --id nbd --keyring $K"
} >"$work/default"
sd_inst 0644 "$work/default" /etc/default/rados-nbd
# The entry names its own store and user (RADOS_NBD_MAP_OPTIONS comes first; these win).
sd_inst 0644 <(echo "rbd/sdc1  store=ceph:/etc/ceph/ceph.conf,id=nbd,keyring=$K") /etc/rados-nbd/nbdtab
mkdir -p "$R/srv/sdc1" "$R/srv/sdc2"
cat >"$R/etc/fstab" <<'FSTAB'
/dev/rados-nbd/rbd/sdc1  /srv/sdc1  ext4  _netdev,noatime  0 2
/dev/rados-nbd/rbd/sdc2  /srv/sdc2  ext4  _netdev,noatime  0 2
FSTAB
# The network as a host configures it: systemd-networkd, and its wait-online behind
# network-online.target (`systemctl enable systemd-networkd systemd-networkd-wait-online`).
GUEST_ADDR=$guest
mkdir -p "$R/etc/systemd/network"
cat >"$R/etc/systemd/network/10-vmtest.network" <<NET
[Match]
Type=ether

[Network]
Address=$GUEST_ADDR/24
NET
wants=$R/etc/systemd/system/vmtest.target.wants
mkdir -p "$wants" "$R/etc/systemd/system/network-online.target.wants"
ln -sfn /usr/lib/systemd/system/systemd-networkd.service "$wants/systemd-networkd.service"
ln -sfn /usr/lib/systemd/system/systemd-networkd-wait-online.service \
  "$R/etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service"
ln -sfn /usr/lib/systemd/system/rados-nbdmap.service "$wants/rados-nbdmap.service"
ln -sfn /usr/lib/systemd/system/rados-nbd@.service "$wants/rados-nbd@rbd-sdc2.service"
sd_journal_unit rados-nbdmap.service rados-nbd@rbd-sdc2.service
cp "$root/tests/lib.sh" "$work/lib.sh"

echo "== boot ($(($(date +%s) - T0)) s; guest $guest in $ns, work dir $work)"
t=$(date +%s)
VM_INIT=systemd VM_TIMEOUT=${VM_TIMEOUT:-900} cephns_boot "$here/systemd-ceph-tests.sh" \
  GUEST_ADDR="$GUEST_ADDR" >"$work/console.txt" 2>&1 &
# Waited for in the background so that SIGTERM/SIGINT end this script (and cleanup the VM) at once.
wait $!
rc=$?
check "the journal was saved at shutdown, after the rados-nbd units stopped" test -s "$work/journal.txt"
if [ -f "$work/guest.out" ]; then
  run_counted grep -v -E '^[0-9]+ passed, [0-9]+ failed$' "$work/guest.out"
else
  fail "the guest never ran the tests (status $rc)" "$(tail -20 "$work/console.txt")"
fi
check "the VM powered off by itself ($(($(date +%s) - t)) s)" grep -q 'reboot: Power down' "$work/console.txt"

echo "== after the poweroff"
c=$work/journal.txt
k=$c
[ -s "$work/dmesg.txt" ] && k=$work/dmesg.txt
line() { grep -nE "$1" "$c" | head -1 | cut -d: -f1; }
um1=$(line 'Unmounted .*/srv/sdc1')
unmap1=$(line 'rbd/sdc1: unmapped /dev/nbd')
um2=$(line 'Unmounted .*/srv/sdc2')
close2=$(line 'rbd/sdc2: /dev/nbd[0-9]* disconnected, image closed')
closed1=$(line 'rbd/sdc1: /dev/nbd[0-9]* disconnected, image closed')
net=$(line 'Stopping systemd-networkd.service')
check "/srv/sdc1 unmounted (line ${um1:-none}) before rados-nbdmap unmapped rbd/sdc1 (line ${unmap1:-none})" \
  test -n "$um1" -a -n "$unmap1" -a "${um1:-0}" -lt "${unmap1:-0}"
check "/srv/sdc2 unmounted (line ${um2:-none}) before rados-nbd@rbd-sdc2 closed rbd/sdc2 (line ${close2:-none})" \
  test -n "$um2" -a -n "$close2" -a "${um2:-0}" -lt "${close2:-0}"
check "both images closed (lines ${closed1:-none}, ${close2:-none}) before systemd-networkd stopped (line ${net:-none})" \
  test -n "$closed1" -a -n "$close2" -a -n "$net" -a "${closed1:-0}" -lt "${net:-0}" -a "${close2:-0}" -lt "${net:-0}"
check "no I/O error on an nbd device, no ext4 error" \
  bash -c "! grep -hE 'I/O error.* nbd[0-9]|EXT4-fs error \\(device nbd|Aborting journal on device nbd' '$c' '$k'"
for i in sdc1 sdc2; do
  check "rbd/$i: flags clean, no lock, no watcher (rbd info, lock ls, status)" idle rbd/$i
  check "rbd/$i: rbd object-map check passes" omap_check rbd/$i
  rbd export --no-progress rbd/$i "$work/$i.raw" >/dev/null 2>&1 || fail "rbd export rbd/$i"
  check "rbd export rbd/$i: e2fsck -fn is clean" e2fsck -fn "$work/$i.raw"
done
bad=0 total=0
while read -r sum f; do
  img=${f%%/*}; total=$((total + 1))
  [ "$(debugfs -R "cat /${f#*/}" "$work/$img.raw" 2>/dev/null | sha256sum | cut -d' ' -f1)" = "$sum" ] ||
    { bad=$((bad + 1)); echo "    $f differs"; }
done < <(cat "$work/sums.txt" 2>/dev/null)
check "the $total files the guest wrote are in rbd export of the images, byte for byte" test "$bad" = 0 -a "$total" -gt 0
echo "systemd tests with the Ceph store took $(($(date +%s) - T0)) s"
t_summary
