#!/usr/bin/env bash
# Fencing of a stale lock owner: a daemon that stopped answering (SIGSTOP, kill -9)
# must be blocklisted before its lock is broken, so that nothing it still has queued can land
# over the new owner's acknowledged writes. Against the cluster named by $CEPH_CONF (run by
# tests/ceph/run.sh; the cluster there has osd_client_watch_timeout = 15 s).
#
# Each round (FENCING_ROUNDS, 3 by default):
#   daemon A serves the image; a libnbd client writes P1 at X through A (acked); A is
#   SIGSTOPped; the same client queues a write of P_A at X (it sits in A's socket); daemon B
#   opens the image: in odd rounds only after the OSD dropped A's watch (the issue's exact
#   sequence), in even rounds at once (B must wait for the watch, then fence and break);
#   P_B is written at X through B and acked; A is SIGCONTed: its queued write must fail (EIO)
#   and X must hold P_B; A's address is in `ceph osd blocklist ls`; A says why in one line.
# Then kill -9: a new daemon opens the image of a killed one at once, within the bound, with
# no retry loop, and the data is intact.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
KEEP_WORK=${FENCING_KEEP:-}
# RN is the restricted client.nbd with cephx: its mon 'profile rbd' must allow a blocklist.
source "$here/common.sh" ceph-fencing
ROUNDS=${FENCING_ROUNDS:-3}
img=fence-a
rbd create --size 64M "$img"
hdr="rbd_header.$(rbd info "$img" --format json | jq -r .id)"
blocklisted=()

start_daemon() { # start_daemon NAME: serves $img on $work/NAME.sock, logs to $work/NAME.log
  rm -f "$work/$1.sock"
  "${RN[@]}" serve "$img" --socket "$work/$1.sock" 2>>"$work/$1.log" &
  T_PIDS+=($!)
  DPID=$!
}
wait_sock() { wait_serving "$work/$1.sock" "$2" "$3"; } # wait_sock NAME PID SECONDS
# Only our own processes, by pid; a stopped one must be continued to take SIGTERM.
end_daemon() { kill -CONT "$1" 2>/dev/null; stop_daemon "$1"; }
watch_gone() { # watch_gone ADDR: no watch of ADDR on the header any more
  ! rados -p rbd listwatchers "$hdr" | grep -qF "$1"
}
export -f watch_gone
export hdr

cat > "$work/client.py" <<'PY'
# client.py URI X P1 P_A APID WORK: P1 through A (acked), SIGSTOP A, queue P_A, wait for
# WORK/b.done, SIGCONT A, report what became of the queued write.
import nbd, os, signal, sys, time
uri, x, p1, pa, apid, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
h = nbd.NBD(); h.connect_uri(uri)
h.pwrite(bytes([p1]) * 65536, x)
os.kill(apid, signal.SIGSTOP)
# kill() returns before every thread of A has stopped: wait until they all have, or the
# write below could still be served before the stop.
def stopped():
    for t in os.listdir('/proc/%d/task' % apid):
        with open('/proc/%d/task/%s/stat' % (apid, t)) as f:
            if f.read().rsplit(')', 1)[1].split()[0] != 'T':
                return False
    return True
while not stopped():
    time.sleep(0.01)
c = h.aio_pwrite(bytes([pa]) * 65536, x)
h.poll(0)  # push it into the socket now
open(os.path.join(work, 'queued'), 'w').close()
while not os.path.exists(os.path.join(work, 'b.done')):
    time.sleep(0.05)
os.kill(apid, signal.SIGCONT)
deadline = time.time() + 60
result = 'pending'
while time.time() < deadline:
    try:
        if h.aio_command_completed(c):
            result = 'ok'
            break
    except nbd.Error as e:
        result = 'errno=%s' % (e.errno,)
        break
    h.poll(500)
print(result, flush=True)
PY

for r in $(seq 1 "$ROUNDS"); do
  rm -f "$work/queued" "$work/b.done" "$work/A.log" "$work/B.log"
  x=$(( (r * 5 + 1) * MB + 4096 * r ))
  p1=$((r * 3 + 1)); pa=$((r * 3 + 2)); pb=$((r * 3 + 3))
  late=$((r % 2))   # odd rounds: B starts after A's watch expired
  start_daemon A; apid=$DPID
  if ! wait_sock A "$apid" 30; then fail "round $r: daemon A serves" "$(tail -3 "$work/A.log")"; end_daemon "$apid"; continue; fi
  addr=$(rados -p rbd lock info "$hdr" rbd_lock | jq -r '.lockers[0].addr')
  $PY "$work/client.py" "nbd+unix:///$img?socket=$work/A.sock" "$x" "$p1" "$pa" "$apid" "$work" \
    >"$work/client.out" 2>&1 &
  cpid=$!
  for _ in $(seq 1 100); do [ -e "$work/queued" ] && break; sleep 0.1; done
  check "round $r: A stopped with a write of P_A queued in its socket" test -e "$work/queued"
  if [ "$late" = 1 ]; then
    # The issue's sequence: B comes after the OSD dropped A's watch.
    for _ in $(seq 1 600); do watch_gone "$addr" && break; sleep 0.1; done
    check "round $r: the OSD dropped stopped A's watch" watch_gone "$addr"
  fi
  t0=$(date +%s%N)
  start_daemon B; bpid=$DPID
  if wait_sock B "$bpid" 90; then
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    pass "round $r: B serves after $((ms / 1000)).$((ms % 1000 / 100)) s ($([ "$late" = 1 ] && echo "A's watch already gone" || echo "waited for A's watch"))"
  else
    fail "round $r: B serves" "$(tail -3 "$work/B.log")"
  fi
  if [ "$late" = 0 ]; then
    check "round $r: B said what it waits for (locker, address, bound)" \
      grep -q "waiting up to [0-9]* s for the OSD to drop its watch" "$work/B.log"
  fi
  check "round $r: B blocklisted A's address before breaking the lock" \
    grep -qF "blocklisting $addr first" "$work/B.log"
  check "round $r: ceph osd blocklist ls lists A ($addr)" \
    bash -c "ceph osd blocklist ls 2>/dev/null | grep -qF '$addr'"
  blocklisted+=("$addr")
  check "round $r: P_B written through B and acked" $PY -c "
import nbd
h = nbd.NBD(); h.connect_uri('nbd+unix:///$img?socket=$work/B.sock')
h.pwrite(bytes([$pb]) * 65536, $x, nbd.CMD_FLAG_FUA)
h.shutdown()"
  touch "$work/b.done"
  wait "$cpid"
  res=$(tail -1 "$work/client.out")
  check "round $r: A's queued write failed with EIO (got: $res)" test "$res" = "errno=EIO"
  check "round $r: X holds P_B, read through B" $PY -c "
import nbd
h = nbd.NBD(); h.connect_uri('nbd+unix:///$img?socket=$work/B.sock')
got = h.pread(65536, $x)
assert got == bytes([$pb]) * 65536, 'X holds %d, not P_B=%d' % (got[0], $pb)
h.shutdown()"
  check "round $r: A logged one error line saying it was fenced" \
    test "$(grep -c 'lost the exclusive lock (blocklisted by the cluster)' "$work/A.log")" = 1
  # At X (an object A wrote) and at 60 MiB (never written: A's map alone would say zeros).
  check "round $r: reads through fenced A fail with EIO" $PY -c "
import nbd
h = nbd.NBD(); h.connect_uri('nbd+unix:///$img?socket=$work/A.sock')
for off in ($x, 60 << 20):
    try:
        h.pread(4096, off)
    except nbd.Error as e:
        assert e.errno == 'EIO', e
    else:
        raise SystemExit('read at %d through fenced A succeeded' % off)"
  # A exits on SIGTERM without hanging (its close sends nothing; it reports the lost lock).
  t1=$(date +%s)
  end_daemon "$apid"
  check "round $r: fenced A exits on SIGTERM within 15 s" test $(( $(date +%s) - t1 )) -le 15
  end_daemon "$bpid"; brc=$?
  check "round $r: B closes cleanly" test "$brc" = 0
  check "round $r: rbd export: X holds P_B after both closed" bash -c "
    rbd export $img - 2>/dev/null | $PY -c 'import sys; d = sys.stdin.buffer.read(); assert d[$x:$x + 65536] == bytes([$pb]) * 65536'"
done
check "rbd object-map check passes after the rounds" omap_check "$img"

# ---------------------------------------------------------------- kill -9, then reopen at once
start_daemon C; cpid=$DPID
if wait_sock C "$cpid" 30; then
  head -c $((8 * MB)) /dev/urandom > "$work/k.raw"
  check "kill -9: 8 MiB written through C" nbdcopy "$work/k.raw" "nbd+unix:///$img?socket=$work/C.sock"
  kill9 "$cpid"
  t0=$(date +%s%N)
  start_daemon D; dpid=$DPID
  if wait_sock D "$dpid" 90; then
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    pass "kill -9: the next open serves after $((ms / 1000)).$((ms % 1000 / 100)) s, without a retry"
    check "kill -9: within the bound (45 s)" test "$ms" -le 45000
  else
    fail "kill -9: the next open serves" "$(tail -3 "$work/D.log")"
  fi
  check "kill -9: D logged its wait for the dead watch" grep -q "waiting up to" "$work/D.log"
  check "kill -9: D fenced the dead daemon" grep -q "blocklisting .* first" "$work/D.log"
  check "kill -9: the data is intact, read through D" bash -c \
    "nbdcopy 'nbd+unix:///$img?socket=$work/D.sock' - | head -c $((8 * MB)) | cmp -s - '$work/k.raw'"
  end_daemon "$dpid"; drc=$?
  check "kill -9: D closes cleanly" test "$drc" = 0
  check "kill -9: rbd export has the data" bash -c \
    "rbd export $img - 2>/dev/null | head -c $((8 * MB)) | cmp -s - '$work/k.raw'"
  blocklisted+=($(sed -n 's/.*blocklisting \([^ ]*\) first.*/\1/p' "$work/D.log"))
else
  fail "kill -9: daemon C serves" "$(tail -3 "$work/C.log")"
fi

for a in "${blocklisted[@]}"; do ceph osd blocklist rm "$a" >/dev/null 2>&1; done
rbd rm "$img" >/dev/null 2>&1
t_summary
