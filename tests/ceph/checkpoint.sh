#!/usr/bin/env bash
# `serve --checkpoint-idle`: while still served, after a quiet period the map is written and
# the flags cleared, so Ceph's tools (rbd du/diff, object-map check) trust it; the next
# map-changing write sets the flags again; a kill -9 after a checkpoint costs no rebuild.
# Against the cluster named by $CEPH_CONF (tests/ceph/run.sh sets it).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh" ceph-ckpt
img=ckpt-$$
uri=$(uri "$img")

flags() { rbd info "$img" --format json | jq -c .flags; }
clear_flags() { [ "$(flags)" = "[]" ]; }
set_flags() { [ "$(flags)" = '["object map invalid","fast diff invalid"]' ]; }
# The objects the map on disk says exist (rbd diff trusts it when the flags are clear)
# against the data objects in the pool.
map_matches_objects() {
  local id from_map from_pool
  id=$(rbd info "$img" --format json | jq -r .id)
  from_map=$(rbd diff --whole-object "$img" --format json | jq -r '.[] | .offset / 4194304 | floor' | sort -n)
  from_pool=$(rados -p rbd ls | sed -n "s/^rbd_data\.$id\.//p" | while read -r h; do echo $((16#$h)); done | sort -n)
  [ "$from_map" = "$from_pool" ] || { echo "map: $from_map; pool: $from_pool"; return 1; }
}
export img
export -f flags clear_flags set_flags
# wait_clear SECONDS: until rbd info shows no flags
wait_clear() {
  local i
  for i in $(seq 1 $(($1 * 4))); do clear_flags && return 0; sleep 0.25; done
  echo "flags still $(flags)"; return 1
}
# A client that stays connected for the whole test: the last client leaving checkpoints
# too, and that must not be what clears the flags here.
cat > "$work/client.py" <<'PY'
import nbd, os, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
cmd = sys.argv[2]
# Commands arrive as files "<n>.cmd" ("write OFF" / "trim OFF LEN"); "<n>.done" answers.
n = 0
open(os.path.join(cmd, "ready"), "w").close()
while True:
    p = os.path.join(cmd, f"{n}.cmd")
    if not os.path.exists(p):
        time.sleep(0.02); continue
    a = open(p).read().split()
    if a[0] == "quit":
        break
    if a[0] == "write":
        h.pwrite(bytes([n % 250 + 1]) * 4096, int(a[1]))
    elif a[0] == "trim":
        h.trim(int(a[2]), int(a[1]))
    open(os.path.join(cmd, f"{n}.done"), "w").close()
    n += 1
h.shutdown()
PY
mkdir -p "$work/cmd"
CMD_N=0
send() { # send CMD...: runs it on the held connection, waits until it is acknowledged
  echo "$*" > "$work/cmd/next"
  mv "$work/cmd/next" "$work/cmd/$CMD_N.cmd"   # whole, never half-written
  local i
  for i in $(seq 1 600); do
    [ -e "$work/cmd/$CMD_N.done" ] && { CMD_N=$((CMD_N + 1)); return 0; }
    sleep 0.05
  done
  echo "no answer to $*"; return 1
}
do_send() { # do_send NAME CMD...: send, as a check
  local name=$1; shift
  if send "$@"; then pass "$name"; else fail "$name"; fi
}

rbd create --size 1T "$img"
# 2 s: long enough that `rbd info` right after a first write still sees the flags set.
# RUST_LOG=info: the log is searched for what the opens did.
RUST_LOG=info start_serve "$work/serve.log" 60 "$img" --checkpoint-idle 2
$PY "$work/client.py" "$uri" "$work/cmd" 2>>"$work/client.log" &
CLIENT_PID=$!; T_PIDS+=("$CLIENT_PID")
for _ in $(seq 1 100); do [ -e "$work/cmd/ready" ] && break; sleep 0.1; done

do_send "checkpoint-idle: a write to object 0" write 0
do_send "checkpoint-idle: a write to object 1" write $((4 * MB + 4096))
check "checkpoint-idle: flags set right after the first writes" set_flags
check "checkpoint-idle: flags clear after 2 idle seconds, still served" wait_clear 10
check "checkpoint-idle: the daemon still serves (same pid)" kill -0 "$SERVE_PID"
# (`rbd object-map check` needs the exclusive lock, which the serving daemon refuses to
# hand over: instead the map that librbd reads, through fast-diff, is compared with the
# objects that exist.)
check "checkpoint-idle: the map on disk lists exactly the objects that exist" map_matches_objects
# With the flags clear, rbd du uses fast-diff: whole objects (4 MiB each), at once.
t0=$(date +%s%N)
check "checkpoint-idle: rbd du counts the 2 objects (fast-diff)" bash -c \
  "rbd du $img --format json 2>$work/du.err | jq -e '.images[0].used_size == $((8 * MB))'"
du_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
check "checkpoint-idle: rbd du gave no fast-diff warning" bash -c "! grep -qi 'fast-diff' $work/du.err"
echo "     (rbd du of the served 1 TiB image: ${du_ms} ms)"
check "checkpoint-idle: rbd diff lists objects 0 and 1" bash -c \
  "rbd diff --whole-object $img --format json | jq -e '[.[] | (.offset / $((4 * MB)) | floor)] | unique == [0, 1]'"
do_send "checkpoint-idle: a write to an existing object" write 8192
check "checkpoint-idle: ...and the flags stay clear" clear_flags
do_send "checkpoint-idle: a trim of a nonexistent object" trim $((20 * MB)) $((4 * MB))
check "checkpoint-idle: ...and the flags stay clear" clear_flags
do_send "checkpoint-idle: a write to a new object" write $((40 * MB))
check "checkpoint-idle: ...set the flags again before it was acknowledged" set_flags
check "checkpoint-idle: cleared again when idle" wait_clear 10
check "checkpoint-idle: rbd du counts 3 objects" bash -c \
  "rbd du $img --format json 2>/dev/null | jq -e '.images[0].used_size == $((12 * MB))'"
do_send "checkpoint-idle: a whole-object trim (a removal)" trim $((40 * MB)) $((4 * MB))
check "checkpoint-idle: ...set the flags" set_flags
check "checkpoint-idle: cleared again when idle (after the removal)" wait_clear 10
check "checkpoint-idle: the map on disk still matches the objects" map_matches_objects
check "checkpoint-idle: rbd du counts 2 objects again" bash -c \
  "rbd du $img --format json 2>/dev/null | jq -e '.images[0].used_size == $((8 * MB))'"

# A crash after a checkpoint with nothing map-changing since: the map on disk is right.
sleep 1
kill9 "$SERVE_PID"
kill "$CLIENT_PID" 2>/dev/null; wait "$CLIENT_PID" 2>/dev/null; forget_pid "$CLIENT_PID"
check "kill -9 after a checkpoint: flags still clear" clear_flags
check "kill -9 after a checkpoint: the map on disk matches the objects" map_matches_objects
# The wait for the dead watch is e2e.sh's and fencing.sh's business: blocklisted by hand.
drop_dead_watch "$img" || fail "kill -9 after a checkpoint: drop the dead daemon's watch"
: > "$work/serve.log"
RUST_LOG=info reopen "$work/serve.log" "$img"
check "kill -9 after a checkpoint: the next open serves" test $? = 0
check "kill -9 after a checkpoint: the reopen broke the stale lock" grep -q "stale" "$work/serve.log"
check "kill -9 after a checkpoint: the map was loaded, not rebuilt" bash -c \
  "! grep -qi 'rebuil' $work/serve.log"
check "kill -9 after a checkpoint: the data is there" $PY -c "
import nbd
h = nbd.NBD(); h.connect_uri('$uri')
assert h.pread(4096, 0) == bytes([1]) * 4096
assert h.pread(4096, 8192) == bytes([3]) * 4096
assert h.pread(4096, $((4 * MB + 4096))) == bytes([2]) * 4096
assert h.pread(4096, $((40 * MB))) == bytes(4096)
h.shutdown()"
stop_daemon "$SERVE_PID"
check "clean close after the reopen" test $? = 0
# Only now: librbd's check takes the lock (it would also break the dead daemon's lock,
# and repair a wrong map, before our reopen could show it loaded the map as it was).
check "after close: flags clear, object-map check passes" bash -c \
  "[ \"\$(rbd info $img --format json | jq -c .flags)\" = '[]' ] && omap_check $img"
rbd rm --no-progress "$img" >/dev/null 2>&1
undrop_watches
t_summary
