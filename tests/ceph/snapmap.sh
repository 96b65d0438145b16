#!/usr/bin/env bash
# Object maps rebuilt on an image with snapshots: a rebuild must give each object
# the state librbd computes from its snap set, so objects not written since the newest
# snapshot are EXISTS_CLEAN, and objects removed from the head since are NONEXISTENT.
# Otherwise `rbd object-map check` invalidates the map and `rbd diff --from-snap` lists
# every object. Runs against $CEPH_CONF like e2e.sh (tests/ceph/run.sh starts the cluster).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh" ceph-snapmap
same() { [ "$1" = "$2" ] || { echo "got '$2', expected '$1'"; return 1; }; }
img=snapmap-$$

# The head's object map object, byte for byte, as hex.
map_hex() { rados -p rbd get "rbd_object_map.$id" - | od -An -tx1 -v | tr -d ' \n'; }
flags() { rbd info "$img" --format json | jq -r '.flags | join(",")'; }
# Object numbers `rbd diff --whole-object --from-snap s1` reports, as "n:type" (data/zero).
diff_objs() {
  rbd diff --whole-object --from-snap s1 "$img" --format json |
    jq -r '[.[] | "\(.offset / (4 * 1048576) | floor):\(.exists | if . == "true" or . == true then "data" else "zero" end)"] | join(" ")'
}

rbd create --size 32M "$img"   # 8 objects of 4 MiB; layering, exclusive-lock, object-map, fast-diff
id=$(rbd info "$img" --format json | jq -r .id)
# Objects 0..3 written by librbd, then the snapshot; since it, object 2 removed from the
# head by librbd (only its clone remains, yet a pool listing still names it) ...
librbd() { # librbd PYTHON-STATEMENTS: run with `im` open on the image
  $PY -c "
import rados, rbd
c = rados.Rados(conffile='$CEPH_CONF'); c.connect()
io = c.open_ioctx('rbd')
with rbd.Image(io, '$img') as im:
    $1
io.close(); c.shutdown()"
}
librbd "[im.write(bytes([o + 1]) * (4 << 20), o << 22) for o in range(4)]"
rbd snap create "$img@s1" >/dev/null 2>&1
librbd "im.discard(8 << 20, 4 << 20)"
check "setup: librbd's own map is valid and flags clear" bash -c \
  "rbd object-map check $img >/dev/null 2>&1 && [ -z \"\$(rbd info $img --format json | jq -r '.flags | join(\",\")')\" ]"
check "setup: rbd diff --from-snap s1 has object 2 removed" same "2:zero" "$(diff_objs)"
good=$(map_hex)

# ... then object 1 rewritten and object 5 created through rados-nbd, which is killed
# while its client is still connected (the last client leaving would store the map and
# clear the flags), so the map on disk stays stale and flagged.
serve "$img"
$PY -c "
import nbd, time
h = nbd.NBD(); h.connect_uri('nbd+unix:///$img?socket=$sock')
h.pwrite(b'\x11' * 65536, 4 << 20, nbd.CMD_FLAG_FUA)
h.pwrite(b'\x55' * 65536, 20 << 20, nbd.CMD_FLAG_FUA)
open('$work/written', 'w').close()
time.sleep(600)" 2>/dev/null &
writer=$!; T_PIDS+=("$writer")
for _ in $(seq 1 100); do [ -e "$work/written" ] && break; sleep 0.1; done
check "rados-nbd wrote objects 1 and 5 (acked)" test -e "$work/written"
kill9 "$SERVE_PID"
kill "$writer" 2>/dev/null; wait "$writer" 2>/dev/null
check "after kill -9: the map is flagged invalid" bash -c "rbd info $img | grep -q 'object map invalid'"

# The reopen rebuilds the map; a clean close stores it and clears the flags. (The wait for
# the dead watch is e2e.sh's and fencing.sh's business: blocklisted by hand.)
drop_dead_watch "$img" || fail "after kill -9: drop the dead daemon's watch"
reopen "$work/reopen.log" "$img"
check "reopen after the crash serves" test $? = 0
# Rebuilt in the background while serving: its log line comes when it ends.
wait_for_log "$work/reopen.log" "object map of .* rebuilt: " 120
check "reopen rebuilt the map and counted the clean objects" \
  same "4 of 8 objects exist (2 of them clean: unchanged since the last snapshot)" \
  "$(sed -n 's/.*object map of .* rebuilt: //p' "$work/reopen.log" | tail -1)"
stop_daemon "$SERVE_PID"
check "clean close after the rebuild" test $? = 0
served=$(map_hex)
check "rebuilt by serve: flags clear" test -z "$(flags)"
# Before rbd's check: once a map is flagged invalid, rbd diff no longer trusts it.
check "rebuilt by serve: rbd diff --from-snap s1 has objects 1, 5 changed and 2 removed" \
  same "1:data 2:zero 5:data" "$(diff_objs)"
check "rebuilt by serve: rbd object-map check passes" omap_check "$img"
check "rebuilt by serve: flags still clear after rbd's check (it invalidates on a mismatch)" \
  test -z "$(flags)"
check "rados-nbd object-map check agrees (head)" "${RN[@]}" object-map check "$img"
check "rados-nbd object-map check agrees (@s1, from the snap sets at s1)" \
  "${RN[@]}" object-map check "$img@s1"

# librbd's rebuild of the same image is the reference, byte for byte.
rbd object-map rebuild "$img" >/dev/null 2>&1
librbds=$(map_hex)
check "rbd object-map rebuild gives the same map bytes as our rebuild" same "$librbds" "$served"
check "the map differs from the pre-crash one (objects 1 and 5 changed)" test "$served" != "$good"

# `rados-nbd object-map rebuild` computes the same, from a stale map (the pre-crash one).
$PY -c "import sys; sys.stdout.buffer.write(bytes.fromhex('$good'))" |
  rados -p rbd put "rbd_object_map.$id" -
check_fails "rados-nbd object-map check finds the stale map" "${RN[@]}" object-map check "$img"
check "rados-nbd object-map rebuild" "${RN[@]}" object-map rebuild "$img"
check "rados-nbd object-map rebuild: same bytes as librbd's" same "$librbds" "$(map_hex)"
check "rados-nbd object-map rebuild: flags clear" test -z "$(flags)"
check "rados-nbd object-map rebuild: rbd object-map check passes and leaves flags clear" \
  bash -c "rbd object-map check $img >/dev/null 2>&1 && [ -z \"\$(rbd info $img --format json | jq -r '.flags | join(\",\")')\" ]"

rbd snap purge "$img" >/dev/null 2>&1
check "cleanup: rados-nbd rm" "${RN[@]}" rm "$img"
undrop_watches
t_summary
