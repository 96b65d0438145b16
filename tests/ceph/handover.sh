#!/usr/bin/env bash
# Cooperative hand-over of the exclusive lock (issue 17), against the cluster named by
# $CEPH_CONF, with librbd clients as the other side: python3-rbd, fio's rbd engine,
# qemu-img, rbd bench. rados-nbd serves (by default it hands the lock over when asked and
# takes it back on its own client's next request); both sides write, and every write either
# side had acknowledged must read back, through both, with `rbd object-map check` and the
# flags right after close. `--exclusive` keeps the old refusal (rbd-nbd --exclusive).
# HANDOVER_ROUNDS (default 100) sets the alternating loop's rounds.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh" ceph-handover
NBDTOOL=("$PY" "$here/../reliability/nbdtool.py")
HO=("$PY" "$here/handover.py")
ROUNDS=${HANDOVER_ROUNDS:-100}
I=handover-$$
HALF=8192          # blocks of 4 KiB: 32 MiB, half of the 64 MiB image
log=$work/serve.log
# journal_check NAME JOURNAL SEED FIRST: every acked write of a journal reads back through
# the server (its block range: HALF blocks from FIRST).
journal_check() {
  local out
  if out=$("${NBDTOOL[@]}" journal-verify "$(uri "$I")" "$2" "$3" $HALF - "$4" 2>&1); then
    pass "$1 ($out)"
  else fail "$1" "$(tail -3 <<<"$out")"; fi
}
moves() { grep -c "$1" "$log"; }
# zero_image: the whole image zeroed through the server, so a journal check can tell the
# blocks its writer never reached (they must read as zeros) from earlier phases' data.
zero_image() {
  "$PY" -c "
import nbd
h = nbd.NBD(); h.connect_uri('$(uri "$I")')
for off in range(0, h.get_size(), 32 << 20):
    h.zero(min(32 << 20, h.get_size() - off), off)
h.flush(); h.shutdown()"
}

check "create a 64 MiB image with 1 MiB objects" "${RN[@]}" create --size 64M --object-size 1M "$I"
serve "$I"

# ------------------------------------------------------------------- alternating turns
# Each turn moves the lock: librbd writes (we hand over), the NBD client writes and reads
# what librbd wrote (we take it back and must have loaded librbd's map: a stale one would
# read zeros), librbd reads what we wrote.
before=$(moves "lock handed over")
check "alternating librbd and NBD writes, $ROUNDS rounds: every read matches what was written" \
  "${HO[@]}" alternate "$(uri "$I")" "$CEPH_CONF" rbd "$I" "$ROUNDS" 1 "$work/alt.raw"
handed=$(( $(moves "lock handed over") - before ))
check "the lock was handed over at least once a round ($handed times in $ROUNDS rounds)" \
  test "$handed" -ge "$ROUNDS"
check "each take-back loaded the map librbd left clean (none rebuilt)" bash -c \
  "grep -q 'lock taken back after .* loaded (left clean' '$log' && ! grep -q 'lock taken back after .* rebuilt' '$log'"
check "while served: reads back the alternating run's image" bash -c \
  "nbdcopy '$(uri "$I")' - | cmp - '$work/alt.raw'"

# ------------------------------------------------------------------- both writing at once
# Disjoint halves, many writes in flight on each side; every acknowledged write of both
# must be there afterwards.
both() { # both NAME LIBRBD-CMD...: the NBD journal writer on the lower half meanwhile
  local name=$1; shift
  zero_image || fail "$name: zeroing the image first"
  rm -f "$work/nbd.j"
  "${NBDTOOL[@]}" journal-write "$(uri "$I")" "$work/nbd.j" 10 7 $HALF 0 >"$work/nbdw.log" 2>&1 &
  local wpid=$!
  T_PIDS+=("$wpid")
  local out rc=0
  out=$("$@" 2>&1) || rc=$?
  wait "$wpid"; local wrc=$?
  forget_pid "$wpid"
  if [ $rc = 0 ]; then pass "$name: the librbd side finished"; else fail "$name: the librbd side" "$(tail -3 <<<"$out")"; fi
  if [ $wrc = 0 ] && grep -q "finished" "$work/nbdw.log"; then
    pass "$name: the NBD side finished ($(sed -n 's/^journal-write: //p' "$work/nbdw.log"))"
  else fail "$name: the NBD side" "$(tail -2 "$work/nbdw.log")"; fi
  journal_check "$name: every acked NBD write reads back" "$work/nbd.j" 7 0
}
rm -f "$work/rbd.j"
both "python3-rbd beside rados-nbd" \
  "${HO[@]}" librbd-journal "$CEPH_CONF" rbd "$I" 10 8 $HALF $HALF "$work/rbd.j"
journal_check "python3-rbd beside rados-nbd: every acked librbd write reads back through the server" \
  "$work/rbd.j" 8 $HALF

both "fio's rbd engine beside rados-nbd" \
  fio --name=ho --ioengine=rbd --clientname=admin --pool=rbd --rbdname="$I" \
    --rw=randwrite --bs=4k --iodepth=8 --offset=32M --size=32M \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --output="$work/fio.out"
check "fio's rbd engine: its data still verifies through the server afterwards" bash -c \
  "nbdcopy '$(uri "$I")' - | tail -c $((32 * MB)) | sha >'$work/fio-nbd.sha' && rbd export '$I' - 2>/dev/null | tail -c $((32 * MB)) | sha | cmp - '$work/fio-nbd.sha'"

head -c $((32 * MB)) /dev/urandom >"$work/q.raw"
both "qemu-img convert (librbd) beside rados-nbd" \
  qemu-img convert -n -f raw "$work/q.raw" --target-image-opts \
    "driver=raw,offset=$((32 * MB)),size=$((32 * MB)),file.driver=rbd,file.pool=rbd,file.image=$I,file.conf=$CEPH_CONF"
check "qemu-img convert: its 32 MiB read back through the server" bash -c \
  "nbdcopy '$(uri "$I")' - | tail -c $((32 * MB)) | cmp - '$work/q.raw'"

# rbd bench has no offset: one thread, sequential, 32 MiB writes exactly the lower half,
# so here the NBD writer takes the upper half.
rm -f "$work/nbd2.j"
zero_image || fail "rbd bench: zeroing the image first"
"${NBDTOOL[@]}" journal-write "$(uri "$I")" "$work/nbd2.j" 10 9 $HALF $HALF >"$work/nbdw2.log" 2>&1 &
wpid=$!; T_PIDS+=("$wpid")
check "rbd bench writes while rados-nbd serves and writes" \
  timeout 120 rbd bench --io-type write --io-pattern seq --io-threads 1 --io-size 64K --io-total 32M "$I"
wait "$wpid"; forget_pid "$wpid"
check "rbd bench beside rados-nbd: the NBD side finished" grep -q finished "$work/nbdw2.log"
journal_check "rbd bench beside rados-nbd: every acked NBD write reads back" "$work/nbd2.j" 9 $HALF

check "while served: the image through the server" bash -c "nbdcopy '$(uri "$I")' '$work/final.raw'"
check_unserve "SIGTERM after the hand-overs: clean exit"
check "after close: flags clear" bash -c "rbd info '$I' | grep -q 'flags: $'"
check "after close: no lock left" bash -c "[ -z \"\$(rbd lock ls '$I')\" ]"
check "after close: rbd object-map check passes" omap_check "$I"
check "after close: rbd export equals what the server served last" bash -c \
  "rbd export '$I' - 2>/dev/null | cmp - '$work/final.raw'"

# ------------------------------------------------------------------- --exclusive
serve "$I" --exclusive
check_fails "--exclusive: a librbd writer is refused (rbd bench)" \
  timeout 60 rbd bench --io-type write --io-total 4096 "$I"
check "--exclusive: the refusal is logged with the requester" \
  wait_for_log "$log" 'refused the lock to client\.[0-9]* (watch [0-9]*)' 10
check "--exclusive: still serving, lock still ours" bash -c \
  "nbdcopy '$(uri "$I")' - | cmp - '$work/final.raw' && rbd lock ls '$I' | grep -q 'auto [0-9]'"
check_unserve "--exclusive: clean exit"

# ------------------------------------------------------------------- the other owner resizes
# While librbd holds the lock it grows the image, then shrinks it back: we follow each
# header update at once, as librbd refreshes an image (a new connection sees the size),
# without taking the lock back.
from=$(($(wc -l <"$log") + 1))
serve "$I"
"$PY" - "$CEPH_CONF" "$I" "$work/grown" "$work/shrink" <<'EOF' &
import os, sys, time, rados, rbd
conf, name, grown, shrink = sys.argv[1:]
c = rados.Rados(conffile=conf); c.connect(); io = c.open_ioctx("rbd")
img = rbd.Image(io, name)
img.write(b"\x5a" * 4096, 0)    # takes the lock
img.resize(96 << 20)
open(grown, "w").close()
for _ in range(600):
    if os.path.exists(shrink):
        break
    time.sleep(0.1)
img.resize(64 << 20)
img.close(); io.close(); c.shutdown()
EOF
rpid=$!; T_PIDS+=("$rpid")
for _ in $(seq 1 300); do [ -e "$work/grown" ] && break; sleep 0.1; done
check "the other owner's grow is followed while it holds the lock (log)" \
  wait_for_log "$log" "resized from $((64 * MB)) to $((96 * MB)) bytes by another client" 20
check "... a new connection sees the new size" bash -c "[ \"\$(nbdinfo --size '$(uri "$I")')\" = $((96 * MB)) ]"
touch "$work/shrink"
wait "$rpid"; forget_pid "$rpid"
check "the other owner's shrink is followed too" \
  wait_for_log "$log" "resized from $((96 * MB)) to $((64 * MB)) bytes by another client" 20
check "... without taking the lock back" bash -c "! tail -n +$from '$log' | grep -q 'lock taken back'"
check_unserve "after following the other owner's resizes: clean exit"

# ------------------------------------------------------------------- the other owner dies
# librbd takes the lock from us, writes, and is killed holding it. Our next write must wait
# for its watch to expire, fence it (blocklist) and break its lock, as at open, then reload
# its map (librbd keeps its map valid on disk) and find its data.
serve "$I"
"$PY" - "$CEPH_CONF" "$I" "$work/owner.ready" <<'EOF' &
import sys, time, rados, rbd
conf, name, ready = sys.argv[1:]
c = rados.Rados(conffile=conf); c.connect(); io = c.open_ioctx("rbd")
img = rbd.Image(io, name)
img.write(b"\x5a" * (1 << 20), 40 << 20)
open(ready, "w").close()
time.sleep(600)
EOF
opid=$!; T_PIDS+=("$opid")
for _ in $(seq 1 100); do [ -e "$work/owner.ready" ] && break; sleep 0.1; done
check "a librbd writer took the lock and wrote 1 MiB" test -e "$work/owner.ready"
kill9 "$opid"
t0=$(date +%s)
check "after the owner's kill -9: an NBD write succeeds (the dead owner fenced, its lock broken)" \
  "$PY" -c "
import nbd
h = nbd.NBD(); h.connect_uri('$(uri "$I")')
h.pwrite(b'\x33' * 65536, 0, nbd.CMD_FLAG_FUA)
assert h.pread(1 << 20, 40 << 20) == b'\x5a' * (1 << 20), 'the dead owner\'s acked write is missing'
h.shutdown()"
echo "  (the write waited $(( $(date +%s) - t0 )) s for the dead owner's watch to expire)"
check "the server blocklisted the dead owner before breaking its lock" \
  grep -q "blocklisting .* first (fencing it off)" "$log"
check_unserve "after taking the lock from a dead owner: clean exit"
check "after close: rbd object-map check passes" omap_check "$I"

# ------------------------------------------------------------------- live migration
# Two daemons, as on the two hosts of a migrating VM: the destination opens with
# --wait-for-lock, the source hands over (map written, flag cleared), the destination loads
# the map (no rebuild) and serves what the source wrote.
src_log=$work/src.log dst_log=$work/dst.log dsock=$work/dst.sock
start_serve "$src_log" 30 "$I"; SRC_PID=$SERVE_PID
check "migration: the source takes writes" "$PY" -c "
import nbd
h = nbd.NBD(); h.connect_uri('$(uri "$I")')
for i in range(64): h.pwrite(bytes([i]) * 65536, i << 20)
h.shutdown()"
# A plain second `serve` of the image in use opens as librbd (rbd-nbd) does: without the
# lock, reads without it (the source keeps it), its first write asks for it.
psock=$work/plain.sock p_log=$work/plain.log
spawn "${RN[@]}" serve "$I" --socket "$psock" 2>>"$p_log"
P_PID=$!
check "a plain second serve of the image in use serves" wait_serving "$psock" "$P_PID" 60
check "plain second serve: opened without the lock, saying who holds it" \
  grep -q "which is alive: serving without it" "$p_log"
check "plain second serve: reads the source's writes, and the source's newer ones, without the lock" "$PY" -c "
import nbd
a = nbd.NBD(); a.connect_uri('$(uri "$I")')
b = nbd.NBD(); b.connect_uri('nbd+unix:///$I?socket=$psock')
for i in range(64): assert b.pread(65536, i << 20) == bytes([i]) * 65536, i
a.pwrite(b'\xee' * 65536, 40 << 20, nbd.CMD_FLAG_FUA)
assert b.pread(65536, 40 << 20) == b'\xee' * 65536
assert b.pread(65536, 63 << 20) == bytes([63]) * 65536
a.pwrite(bytes([40]) * 65536, 40 << 20, nbd.CMD_FLAG_FUA)
a.shutdown(); b.shutdown()"
check "plain second serve: its reads left the lock with the source" bash -c \
  "! grep -q 'lock handed over' '$src_log' && ! grep -q 'lock taken back' '$p_log'"
check "plain second serve: its first write takes the lock, the source then reads it without" "$PY" -c "
import nbd
b = nbd.NBD(); b.connect_uri('nbd+unix:///$I?socket=$psock')
b.pwrite(b'\xcc' * 65536, 41 << 20, nbd.CMD_FLAG_FUA)
a = nbd.NBD(); a.connect_uri('$(uri "$I")')
assert a.pread(65536, 41 << 20) == b'\xcc' * 65536
a.pwrite(bytes([41]) * 65536, 41 << 20, nbd.CMD_FLAG_FUA)
assert b.pread(65536, 41 << 20) == bytes([41]) * 65536
a.shutdown(); b.shutdown()"
check "plain second serve: the lock moved there and back, the map loaded each time (no rebuild)" bash -c \
  "grep -q 'lock taken back after .* loaded' '$p_log' && grep -q 'lock taken back after .* loaded' '$src_log' && ! grep -q rebuil '$p_log' '$src_log'"
stop_daemon "$P_PID"; check "plain second serve: exits cleanly without the lock" test $? = 0
rm -f "$psock"
# The migration's checks read the source's log from here (appended to: truncating is safe).
: >"$src_log"
# The source changes its map, its client still connected (the flag set, as while any VM
# runs; the last client's disconnect would checkpoint it clean): the destination reads the
# header before it has the lock, and must read it again once it has (the flag cleared by
# the hand-over), or it would rebuild the map.
spawn "$PY" -c "
import nbd, os, time
h = nbd.NBD(); h.connect_uri('$(uri "$I")')
h.trim(1 << 20, 60 << 20)
h.pwrite(bytes([60]) * 65536, 60 << 20, nbd.CMD_FLAG_FUA)
open('$work/dirty.ready', 'w').close()
end = time.time() + 120
while not os.path.exists('$dsock') and time.time() < end: time.sleep(0.1)
h.shutdown()"
HOLD_PID=$!
check "migration: the source changes its map (its flag set while its client stays)" bash -c \
  "for _ in \$(seq 1 300); do [ -e '$work/dirty.ready' ] && break; sleep 0.1; done; rbd info '$I' | grep -q 'flags: object map invalid'"
spawn "${RN[@]}" serve "$I" --wait-for-lock --socket "$dsock" 2>>"$dst_log"
DST_PID=$!
check "migration: the destination (--wait-for-lock) serves" wait_serving "$dsock" "$DST_PID" 60
wait "$HOLD_PID"
check "migration: the source handed the lock over" grep -q "lock handed over after" "$src_log"
check "migration: the destination loaded the map the source left (no rebuild)" bash -c \
  "grep -q 'acquired exclusive lock in' '$dst_log' && ! grep -q 'rebuilding object map' '$dst_log'"
check "migration: the destination serves the source's writes and takes its own" "$PY" -c "
import nbd
h = nbd.NBD(); h.connect_uri('nbd+unix:///$I?socket=$dsock')
for i in range(64): assert h.pread(65536, i << 20) == bytes([i]) * 65536, i
h.pwrite(b'\xdd' * 65536, 50 << 20, nbd.CMD_FLAG_FUA)
h.shutdown()"
stop_daemon "$SRC_PID"; check "migration: the source exits cleanly without the lock" test $? = 0
check "migration: the source did not take the lock back" bash -c "! grep -q 'took the exclusive lock back' '$src_log'"
stop_daemon "$DST_PID"; check "migration: the destination exits cleanly" test $? = 0
rm -f "$dsock"
check "after the migration: flags clear, no lock" bash -c \
  "rbd info '$I' | grep -q 'flags: $' && [ -z \"\$(rbd lock ls '$I')\" ]"
check "after the migration: rbd object-map check passes" omap_check "$I"
serve "$I" --exclusive
check "--wait-for-lock against an --exclusive owner fails, saying it refuses" bash -c \
  "out=\$(RADOS_NBD_LOCK_WAIT_SECS=20 ${RNQ} serve '$I' --wait-for-lock --socket '$dsock' 2>&1); rc=\$?; [ \$rc != 0 ] && grep -q 'refuses to hand the exclusive lock over' <<<\"\$out\" || { echo \"rc=\$rc \$out\"; exit 1; }"
check_unserve "--exclusive owner: clean exit"

rbd rm --no-progress "$I" >/dev/null 2>&1
check "test image removed" bash -c "! rbd ls | grep -qx '$I'"
t_summary
