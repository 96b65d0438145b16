#!/bin/bash
# The project's systemd units with the Ceph store, under a live systemd. Runs INSIDE the test VM
# booted with systemd as PID 1 and a NIC that systemd-networkd brings up at boot
# (tests/vm/systemd-ceph-run.sh), as vmtest.service, after the boot has mapped and mounted:
#   rbd/sdc1 from nbdtab (rados-nbdmap.service: store=, id=, keyring= in the entry),
#   rbd/sdc2 as rados-nbd@rbd-sdc2.service (--store/--id/--keyring in RADOS_NBD_MAP_OPTIONS),
# both ext4 mounted from fstab with _netdev. Checks that the units waited for
# network-online.target, the devices and mounts, the daemons' logs; writes files whose sums the
# host compares with `rbd export` after the poweroff (which also checks the shutdown order).
# Prints PASS/FAIL lines (also to /mnt/guest.out) and 'N passed, N failed'.
set -u
exec > >(tee /mnt/guest.out) 2>&1
source /mnt/lib.sh
U1=rados-nbdmap.service U2=rados-nbd@rbd-sdc2.service
show() { systemctl show -P "$2" "$1"; }
dev_of_mount() { findmnt -no SOURCE --mountpoint "$1" 2>/dev/null; }

echo "== systemd $(systemctl --version | head -1 | cut -d' ' -f2), PID 1 = $(cat /proc/1/comm), kernel $(uname -r)"
check "PID 1 is systemd" test "$(cat /proc/1/comm)" = systemd

# --- the network, then the maps ---------------------------------------------------------------
check "systemd-networkd-wait-online succeeded ($(show systemd-networkd-wait-online.service Result))" \
  test "$(show systemd-networkd-wait-online.service Result)" = success
check "network-online.target is active" systemctl is-active --quiet network-online.target
check "the guest has its address from networkd ($(ip -br -4 addr | grep -v '^lo' | tr -s ' ' | head -1))" \
  bash -c "ip -4 addr | grep -q ' ${GUEST_ADDR}/'"
online=$(show network-online.target ActiveEnterTimestampMonotonic)
for u in $U1 $U2; do
  started=$(show $u ExecMainStartTimestampMonotonic)
  check "$u started after network-online.target was reached (${online:-?} <= ${started:-?} us)" \
    test -n "$online" -a "${online:-0}" -gt 0 -a "${started:-0}" -ge "${online:-0}"
done
check "$U1 is active (nbdtab mapped)" systemctl is-active --quiet $U1
check "$U2 is active (Type=notify: READY once the device is usable)" systemctl is-active --quiet $U2
[ "$(systemctl is-active $U2)" = active ] || journalctl -b -u $U2 -o cat --no-pager | tail -15 | sed 's/^/    | /'
[ "$(systemctl is-active $U1)" = active ] || journalctl -b -u $U1 -o cat --no-pager | tail -15 | sed 's/^/    | /'

dev1=$(journalctl -b -u $U1 -o cat | sed -n 's|.*rbd/sdc1: mapped at \(/dev/nbd[0-9]*\).*|\1|p' | tail -1)
dev2=$(journalctl -b -u $U2 -o cat | sed -n 's|.*rbd/sdc2 mapped to \(/dev/nbd[0-9]*\) .*|\1|p' | tail -1)
check "rados-nbdmap mapped rbd/sdc1 (journal: ${dev1:-nothing})" test -n "$dev1"
check "rados-nbd@rbd-sdc2 mapped rbd/sdc2 (journal: ${dev2:-nothing})" test -n "$dev2"
check "/srv/sdc1 is mounted from ${dev1:-?}" test -n "$dev1" -a "$(dev_of_mount /srv/sdc1)" = "$dev1"
check "/srv/sdc2 is mounted from ${dev2:-?}" test -n "$dev2" -a "$(dev_of_mount /srv/sdc2)" = "$dev2"
for i in 1 2; do
  d=$([ $i = 1 ] && echo "$dev1" || echo "$dev2")
  check "udev named it: /dev/rados-nbd/rbd/sdc$i -> ${d:-?}" \
    test -n "$d" -a "$(readlink -f /dev/rados-nbd/rbd/sdc$i)" = "$d"
done
lm=$(rados-nbd list-mapped --format json 2>&1)
check "list-mapped (json) shows both images, served by the Ceph store" \
  bash -c "jq -e '[.[] | select((.image == \"sdc1\" or .image == \"sdc2\") and (.store | startswith(\"ceph:\")))] | length == 2' <<<'$lm' >/dev/null"
echo "$lm" | head -20 | sed 's/^/    | /'
check "the daemons log to journald (rbd/sdc2's map line)" \
  bash -c "journalctl -b -u $U2 -o cat | grep -q 'rbd/sdc2 mapped to'"

# --- data for the host to find in the cluster ------------------------------------------------
for i in 1 2; do
  head -c 3M /dev/urandom >/srv/sdc$i/data && sync /srv/sdc$i/data
  for j in 1 2 3; do head -c 64k /dev/urandom >/srv/sdc$i/f$j; done
done
sync
(cd /srv && sha256sum sdc1/data sdc1/f1 sdc1/f2 sdc1/f3 sdc2/data sdc2/f1 sdc2/f2 sdc2/f3) >/mnt/sums.txt
check "files written and recorded ($(wc -l </mnt/sums.txt) sums)" test "$(wc -l </mnt/sums.txt)" = 8
check "no I/O error on the devices, no ext4 error (kernel log)" \
  bash -c "! journalctl -b -k -o cat | grep -E '(nbd[0-9]|EXT4-fs).*(error|I/O)'"

t_summary
