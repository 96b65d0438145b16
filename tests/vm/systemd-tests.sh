#!/bin/bash
# The project's systemd units under a live systemd. Runs INSIDE the test VM booted with systemd
# as PID 1 (tests/vm/vm.sh VM_INIT=systemd), as vmtest.service, after the boot has mapped and
# mounted what tests/vm/systemd-run.sh configured (rootfs/: the units, /usr/bin/rados-nbd,
# /etc/rados-nbd/nbdtab, /etc/fstab, /etc/default/rados-nbd with the directory store in /mnt).
#
#   BOOT=1: rbd/sd1 in nbdtab (rados-nbdmap.service), rbd/sd2 as rados-nbd@rbd-sd2.service
#           (Type=notify), both ext4 mounted from fstab with _netdev: mapped and mounted at
#           boot in that order, stable udev names, data written, `systemctl restart` of the
#           rados-nbd@ unit under a mounted, written file system, the daemons' logs in journald.
#   BOOT=2: the same plus a failing entry in nbdtab (rbd/sdmissing) and a rados-nbd@ unit of a
#           missing image: both reported failed, the boot not held up, the good ones mapped
#           and mounted, boot 1's data found; then kill -9 of the rados-nbd@ daemon under a
#           writer (Restart=on-failure re-attaches, nothing unmounted, nothing lost).
#   BOOT=3: (the 6.12 kernel, when the binary has the ublk transport) both images over ublk:
#           nbdtab's `transport=ublk` and a drop-in setting RADOS_NBD_IMAGE_OPTIONS for the
#           rados-nbd@ unit; udev's names for /dev/ublkbN, mounts from fstab, the earlier
#           boots' data found, `systemctl restart` and kill -9 as above.
# The host checks what the shutdowns left (clean images, data in them, unmount before unmap).
# Prints PASS/FAIL lines (also to /mnt/guest-BOOT.out) and 'N passed, N failed'.
set -u
exec > >(tee "/mnt/guest-$BOOT.out") 2>&1
source /mnt/lib.sh
SD1=rbd/sd1 SD2=rbd/sd2 U2=rados-nbd@rbd-sd2.service UMISS=rados-nbd@rbd-sdmissing.service
# Boot 3 maps both over ublk (nbdtab transport=ublk; a drop-in for the rados-nbd@ unit).
DEVRE='nbd[0-9]*'
[ "$BOOT" = 3 ] && DEVRE='ublkb[0-9]*'

show() { systemctl show -P "$2" "$1"; }
# mono UNIT PROP: a monotonic timestamp (µs) of a unit's state change.
mono() { show "$1" "$2"; }
dev_of_mount() { findmnt -no SOURCE --mountpoint "$1" 2>/dev/null; }

echo "== boot $BOOT: systemd $(systemctl --version | head -1 | cut -d' ' -f2), PID 1 = $(cat /proc/1/comm)"
check "PID 1 is systemd" test "$(cat /proc/1/comm)" = systemd

# --- boot 2: failing entries reported, the boot not held up -------------------------------------
# First, while the rados-nbd@ unit of the missing image has just made its one attempt (it
# must not retry; were it to, each attempt would cost seconds of emulated CPU).
if [ "$BOOT" = 2 ]; then
  check "systemctl is-failed rados-nbdmap.service (nbdtab lists a missing image)" systemctl is-failed --quiet rados-nbdmap.service
  st=$(systemctl status --no-pager -l -n 20 rados-nbdmap.service 2>&1)
  check "systemctl status rados-nbdmap.service names the failing entry" grep -q 'rbd/sdmissing: map failed' <<<"$st"
  echo "$st" | sed -n '1,4p'
  check "$UMISS is not active, its result is a failure ($(show $UMISS Result))" \
    test "$(systemctl is-active $UMISS)" != active -a "$(show $UMISS Result)" != success
  # A missing image can never be mapped: map exits 2 and RestartPreventExitStatus=2 keeps
  # Restart=on-failure from retrying it every 5 s forever. (The attempt takes ~10 s of
  # emulated CPU: read the status until it shows the result, at most 60 s.)
  for _ in $(seq 60); do
    st=$(systemctl status --no-pager -l -n 20 $UMISS 2>&1)
    grep -q 'Result: exit-code' <<<"$st" && break
    sleep 1
  done
  check "systemctl status $UMISS reports the failure (Result: exit-code)" grep -q 'Result: exit-code' <<<"$st"
  check "journalctl -u $UMISS has the daemon's error" \
    bash -c "journalctl -b -u $UMISS -o cat | grep -q 'rbd/sdmissing not found'"
  echo "$st" | sed -n '1,4p'
  sleep 7   # past RestartSec: a restart would have begun
  check "... exit status 2, not retried: failed, NRestarts 0 ($(show $UMISS ExecMainStatus), $(systemctl is-active $UMISS), $(show $UMISS NRestarts))" \
    test "$(show $UMISS ExecMainStatus)" = 2 -a "$(systemctl is-active $UMISS)" = failed -a "$(show $UMISS NRestarts)" = 0
  systemctl stop $UMISS
fi

# --- what the boot did: mapped by the units, then mounted from fstab ------------------------
check "rados-nbdmap.service ran at boot" test "$(show rados-nbdmap.service ExecMainStartTimestampMonotonic)" != 0
dev1=$(journalctl -b -u rados-nbdmap.service -o cat | sed -n "s|.*$SD1: mapped at \(/dev/$DEVRE\).*|\1|p" | tail -1)
check "rados-nbdmap mapped $SD1 at boot (journal: mapped at ${dev1:-?})" test -n "$dev1"
check "/srv/sd1 is mounted at boot from $SD1's device ($(dev_of_mount /srv/sd1))" \
  test -n "$dev1" -a "$(dev_of_mount /srv/sd1)" = "$dev1"
check "udev named it: /dev/rados-nbd/$SD1 -> $dev1" test "$(readlink -f /dev/rados-nbd/$SD1)" = "$dev1"
# The mount waited for the map (Before=remote-fs-pre.target, _netdev): it started only after
# rados-nbdmap.service's `map` had finished (also when it failed on another entry: boot 2).
m1=$(systemd-escape -p --suffix=mount /srv/sd1)
check "$m1 started after rados-nbdmap.service had mapped" \
  test "$(mono "$m1" InactiveExitTimestampMonotonic)" -ge "$(mono rados-nbdmap.service ExecMainExitTimestampMonotonic)" \
  -a "$(mono rados-nbdmap.service ExecMainExitTimestampMonotonic)" -gt 0

check "$U2 is active (Type=$(show $U2 Type))" test "$(systemctl is-active $U2)" = active -a "$(show $U2 Type)" = notify
[ "$(systemctl is-active $U2)" = active ] || journalctl -b -u $U2 -o cat --no-pager | tail -15 | sed 's/^/    | /'
pid2=$(show $U2 MainPID)
dev2=$(journalctl -b -u $U2 -o cat | sed -n "s|.*$SD2 mapped to \(/dev/$DEVRE\) .*|\1|p" | tail -1)
check "$U2's main process is the serving daemon (pid $pid2, $(cat /proc/$pid2/comm 2>/dev/null))" \
  test "$(cat /proc/$pid2/comm 2>/dev/null)" = rados-nbd
check "/srv/sd2 is mounted at boot from $SD2's device (${dev2:-?})" \
  test -n "$dev2" -a "$(dev_of_mount /srv/sd2)" = "$dev2"
m2=$(systemd-escape -p --suffix=mount /srv/sd2)
# Type=notify: active means READY=1 came, which the daemon sends once the device reads.
check "$m2 started only after $U2 was ready (READY=1)" \
  test "$(mono "$m2" InactiveExitTimestampMonotonic)" -ge "$(mono $U2 ActiveEnterTimestampMonotonic)"
check "remote-fs.target reached (boot 2: despite the failing entries)" test "$(systemctl is-active remote-fs.target)" = active

# --- journald has the daemons' own log ----------------------------------------------------------
check "journalctl -u $U2 has the daemon's lines" \
  bash -c "journalctl -b -u $U2 -o cat | grep -q '$SD2 mapped to $dev2 '"
check "journalctl -u rados-nbdmap.service has the background daemon's lines (syslog)" \
  bash -c "journalctl -b -u rados-nbdmap.service -o cat | grep -q '$SD1 mapped to $dev1 '"
check "the daemon's lines carry its identifier (journalctl -t rados-nbd)" \
  bash -c "journalctl -b -t rados-nbd -o cat | grep -q '$SD1 mapped to'"

sums=/mnt/sums.txt
write_data() {
  # --- data for the host (and the later boots) to find ------------------------------------------
  for d in sd1 sd2; do
    head -c 6M /dev/urandom >/srv/$d/data && sync /srv/$d/data
  done
  (cd /srv && sha256sum sd1/data sd2/data) >$sums
}
restart_test() {
  # --- systemctl restart of a mapping with its file system mounted and written ---------------
  mid() { awk -v m="$1" '$5 == m {print $1}' /proc/self/mountinfo; }
  mid0=$(mid /srv/sd2)
  rm -f /tmp/stop-writer
  # A writer running through the restart: each file written and fsync'ed, one every 0.2 s.
  (i=0; while [ ! -e /tmp/stop-writer ]; do
     i=$((i + 1)); head -c 64k /dev/urandom >/srv/sd2/w$BOOT.$i && sync /srv/sd2/w$BOOT.$i || echo "writer: file $i failed"
     sleep 0.2
   done; echo "writer: $i files") >/tmp/writer.log 2>&1 &
  wpid=$!
  sleep 2
  t0=$(date +%s.%N)
  restart_out=$(timeout 120 systemctl restart $U2 2>&1); rrc=$?
  t1=$(date +%s.%N)
  check "systemctl restart $U2 succeeds ($(awk "BEGIN{printf \"%.1f\", $t1 - $t0}") s)" test "$rrc" = 0 -a "$(systemctl is-active $U2)" = active
  [ "$rrc" = 0 ] || echo "$restart_out"
  sleep 2; touch /tmp/stop-writer; wait $wpid
  pid2b=$(show $U2 MainPID)
  check "a new daemon serves $SD2 (pid $pid2 -> $pid2b)" test "$pid2b" != "$pid2" -a "$(cat /proc/$pid2b/comm 2>/dev/null)" = rados-nbd
  # A daemon with a mount namespace of its own, made while /srv/sd2 is mounted, would keep
  # that file system alive after the shutdown unmounts it (see rados-nbd@.service).
  check "the new daemon shares the host's mount namespace (no private copy of /srv/sd2)" \
    test "$(readlink /proc/$pid2b/ns/mnt)" = "$(readlink /proc/1/ns/mnt)"
  check "/srv/sd2 stayed mounted through the restart (same mount, same $dev2)" \
    test "$(mid /srv/sd2)" = "$mid0" -a "$(dev_of_mount /srv/sd2)" = "$dev2"
  check "the new daemon re-attached $dev2 (journal)" \
    bash -c "journalctl -b -u $U2 -o cat | grep -q '$SD2 re-attached to $dev2 '"
  check "the writer never failed across the restart ($(tail -1 /tmp/writer.log))" \
    bash -c "! grep -q failed /tmp/writer.log"
  check "no I/O error on $dev2 or in ext4 (kernel log)" \
    bash -c "! journalctl -b -k -o cat | grep -E '(${dev2#/dev/}|EXT4-fs).*(error|I/O)'"
  (cd /srv && sha256sum sd2/w$BOOT.*) >>$sums
  sync; echo 3 >/proc/sys/vm/drop_caches
  check "everything written before and during the restart reads back" bash -c "cd /srv && sha256sum -c --quiet $sums"
  check "the file system is writable after the restart" \
    bash -c "head -c 1M /dev/urandom >/srv/sd2/after$BOOT && sync /srv/sd2/after$BOOT && cd /srv && sha256sum sd2/after$BOOT >>$sums"
}
data_here() {
  # --- boot 2, 3: the earlier boots' data here, fsck'ed at boot ----------------------------
  check "the earlier boots' data (and what was written across restarts and crashes) is here" bash -c "cd /srv && sha256sum -c --quiet $sums"
  for d in sd1 sd2; do
    check "fsck-clean mount of /srv/$d at boot (systemd-fsck ran: $(show "systemd-fsck@$(systemd-escape -p /dev/rados-nbd/rbd/$d).service" Result))" \
      test "$(show "systemd-fsck@$(systemd-escape -p /dev/rados-nbd/rbd/$d).service" Result)" = success
  done
  head -c 2M /dev/urandom >/srv/sd1/boot$BOOT && sync /srv/sd1/boot$BOOT && (cd /srv && sha256sum sd1/boot$BOOT >>$sums)
}
crash_test() {
  # --- a crash: kill -9 of the rados-nbd@ daemon under a writer ------------------------------
  # Restart=on-failure starts it again after RestartSec; its `map` finds the device the kernel
  # kept (nbd: --reattach-timeout, 30 s; ublk: user recovery, until a daemon takes it over)
  # and re-attaches it. The default --io-timeout 0 lets the
  # kernel wait for the daemon instead of failing the requests in flight: the file system
  # stays mounted and the writer sees no error. ExecStop does nothing for a dead daemon.
  dev2=$(dev_of_mount /srv/sd2)
  mid0=$(awk '$5 == "/srv/sd2" {print $1}' /proc/self/mountinfo)
  n0=$(show $U2 NRestarts)
  rm -f /tmp/stop-writer
  (i=0; while [ ! -e /tmp/stop-writer ]; do
     i=$((i + 1)); head -c 64k /dev/urandom >/srv/sd2/c$BOOT.$i && sync /srv/sd2/c$BOOT.$i || echo "writer: file $i failed"
     sleep 0.2
   done; echo "writer: $i files") >/tmp/writer2.log 2>&1 &
  wpid=$!
  sleep 2
  pidc=$(show $U2 MainPID)
  # (kill -9 0 would end this script's whole process group.)
  if [ "$pidc" = 0 ] || [ -z "$pidc" ]; then
    fail "kill -9 of the daemon: $U2 has no main process to kill"
    touch /tmp/stop-writer; wait $wpid
    return
  fi
  kill -9 "$pidc"
  for _ in $(seq 90); do
    p=$(show $U2 MainPID)
    [ "$p" != 0 ] && [ "$p" != "$pidc" ] && [ "$(systemctl is-active $U2)" = active ] && break
    sleep 1
  done
  check "kill -9 of the daemon (pid $pidc): systemd restarted $U2 (NRestarts $n0 -> $(show $U2 NRestarts), pid $(show $U2 MainPID))" \
    test "$(systemctl is-active $U2)" = active -a "$(show $U2 MainPID)" != "$pidc" -a "$(show $U2 NRestarts)" -gt "$n0"
  check "... the restarted daemon re-attached $dev2 (journal)" \
    bash -c "journalctl -b -u $U2 -o cat | grep -q '$SD2 re-attached to $dev2 '"
  sleep 2; touch /tmp/stop-writer; wait $wpid
  check "... /srv/sd2 stayed mounted through the crash (same mount, same $dev2)" \
    test "$(awk '$5 == "/srv/sd2" {print $1}' /proc/self/mountinfo)" = "$mid0" -a "$(dev_of_mount /srv/sd2)" = "$dev2"
  check "... the writer never failed ($(tail -1 /tmp/writer2.log))" bash -c "! grep -q failed /tmp/writer2.log"
  check "... no I/O error on $dev2 or in ext4 (kernel log)" \
    bash -c "! journalctl -b -k -o cat | grep -E '(${dev2#/dev/}|EXT4-fs).*(error|I/O)'"
  (cd /srv && sha256sum sd2/c$BOOT.*) >>$sums
  sync; echo 3 >/proc/sys/vm/drop_caches
  check "... everything written before and across the crash reads back" bash -c "cd /srv && sha256sum -c --quiet $sums"
}
serve_socket_test() {
  # --- rados-nbd-serve@rbd-sd3.socket: socket activation for userspace NBD clients -----------
  # Started after the mounts above: a service with a mount namespace of its own made now
  # would keep /srv/sd1 and /srv/sd2 alive in it past their unmap at shutdown.
  local S=rados-nbd-serve@rbd-sd3 sock=/run/rados-nbd/serve/rbd-sd3.sock uri pid
  uri="nbd+unix:///?socket=$sock"
  check "$S.socket listens at boot ($sock)" test "$(systemctl is-active $S.socket)" = active -a -S "$sock"
  check "... $S.service is not started before a client connects" test "$(systemctl is-active $S.service)" != active
  check "nbdinfo --size over the socket: the image's 16 MiB" test "$(nbdinfo --size "$uri" 2>&1)" = $((16 << 20))
  check "... the first connection started $S.service" test "$(systemctl is-active $S.service)" = active
  pid=$(show $S.service MainPID)
  check "... its daemon has no mount namespace of its own (pid $pid)" \
    test "$(readlink /proc/$pid/ns/mnt)" = "$(readlink /proc/1/ns/mnt)"
  check "nbdcopy reads what the host wrote" \
    bash -c "[ \"\$(nbdcopy '$uri' - | md5sum | cut -d' ' -f1)\" = \"\$(cat /mnt/sd3.md5)\" ]"
  head -c 16M /dev/urandom >/tmp/sd3.new
  check "nbdcopy writes 16 MiB through the socket" nbdcopy /tmp/sd3.new "$uri"
  md5sum </tmp/sd3.new | cut -d' ' -f1 >/mnt/sd3-guest.md5
  systemctl stop $S.service
  check "systemctl stop $S.service: the image closed clean (rados-nbd info: no flags)" \
    bash -c "RADOS_NBD_STORE=/mnt/store rados-nbd info rbd/sd3 | grep -qE '^[[:space:]]*flags:[[:space:]]*\$'"
  check "... the socket still listens; the next client starts it again and reads the new data" \
    bash -c "[ \"\$(nbdcopy '$uri' - | md5sum | cut -d' ' -f1)\" = \"\$(cat /mnt/sd3-guest.md5)\" ] && systemctl is-active --quiet $S.service"
}
# Boot 1 writes and restarts; boot 2 (nbd) and boot 3 (ublk) find it all, boot 3 restarts too,
# and both crash the rados-nbd@ daemon.
case $BOOT in
  1) write_data; restart_test; serve_socket_test ;;
  2) data_here; crash_test ;;
  3) data_here; restart_test; crash_test ;;
esac
echo "== units at the end of boot $BOOT"
systemctl list-units --no-pager --plain --all 'rados-nbd*' 'srv-*' | head -12
t_summary
