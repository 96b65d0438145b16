#!/usr/bin/env bash
# Images without exclusive-lock, served read-write, and the lock features changed while
# served. Such an image has no lock owner for
# other clients to ask: `rbd resize`, `rbd snap create`, `rbd flatten` and `rbd feature`
# run in the rbd process itself and announce the change with a header update, which every
# librbd client (rbd-nbd's) follows. rados-nbd must follow it too: the served size (a
# shrink by another client must not let our clients write past the new end, leaving
# objects `rbd rm` never removes), the snapshot context, a flatten. And `rbd feature
# disable IMG exclusive-lock` of an image rados-nbd owns is done as librbd's owner does it
# (refused with EINVAL while object-map is on, done together with it), serving on
# lock-less; a twin held open by librbd (python3-rbd) is the oracle for the answers and
# the features left.
# Runs against $CEPH_CONF like e2e.sh (tests/ceph/run.sh starts the cluster).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh" ceph-lockless
L=lockless-$$
T=locklesst-$$
E=locklesse-$$
P=locklessp-$$
C=locklessc-$$
RBD=(timeout 120 rbd)

# put IMAGE REF SEED OFFSET LENGTH: seeded random bytes written at OFFSET through NBD and
# into the local copy REF (grown as needed).
put() {
  $PY -c "
import nbd, random
data = random.Random($3).randbytes($5)
h = nbd.NBD(); h.connect_uri('$(uri "$1")')
h.pwrite(data, $4)
h.shutdown()
with open('$2', 'r+b') as f:
    f.seek($4); f.write(data)"
}
nbd_size() { nbdinfo --size "$(uri "$1")"; }
# size_is IMAGE BYTES: the served size becomes BYTES within 10 s (the update is followed
# asynchronously, as librbd's refresh).
size_is() {
  local i
  for i in $(seq 1 100); do
    [ "$(nbd_size "$1")" = "$2" ] && return 0
    sleep 0.1
  done
  echo "served size $(nbd_size "$1"), wanted $2" >&2
  return 1
}
# resized IMAGE BYTES RBD-RESIZE-ARGS...: `rbd resize` (run by rbd itself), then the
# served size follows.
resized() {
  local img=$1 bytes=$2; shift 2
  "${RBD[@]}" resize --no-progress "$@" --size "$((bytes / MB))M" "$img" && size_is "$img" "$bytes"
}
# new_served IMAGE REF: a new 32 MiB image (default features), its zeroed local copy REF,
# served.
new_served() {
  rbd create --size 32M "$1"
  truncate -s $((32 * MB)) "$2"
  serve "$1" || fail "serve $1" "$(tail -3 "$work/serve.log")"
}
exported_is() { # exported_is SPEC REF
  rm -f "$work/exp"
  timeout 120 rbd export --no-progress "$1" "$work/exp" >/dev/null || return 1
  cmp "$work/exp" "$2"
}
# heads_from IMAGE N: the data objects of IMAGE at or past object number N whose head
# exists (a snapshot's clone of an object the shrink removed is listed too, and is the
# snapshot's).
heads_from() {
  local prefix
  prefix=$(rbd info "$1" --format json | jq -r .block_name_prefix)
  rados -p rbd ls | grep "^$prefix\." | while read -r o; do
    [ $((16#${o##*.})) -ge "$2" ] && rados -p rbd stat "$o" >/dev/null 2>&1 && echo "$o"
  done
}

# ------------------------------------------------------------ a layering-only image
rbd create --size 64M --image-feature layering "$L"
truncate -s $((64 * MB)) "$work/l.ref"
serve "$L" || { fail "serve $L" "$(tail -3 "$work/serve.log")"; t_summary; exit 1; }
check "layering-only image served; writes" put "$L" "$work/l.ref" 1 0 $((8 * MB))
check "rbd resize (done by rbd itself: no lock owner) grows the served size" resized "$L" $((128 * MB))
truncate -s $((128 * MB)) "$work/l.ref"
check "writes past the old end" put "$L" "$work/l.ref" 2 $((100 * MB)) $((4 * MB))
cp "$work/l.ref" "$work/l.s1"
check "rbd snap create (by rbd itself)" "${RBD[@]}" snap create --no-progress "$L@s1"
check "writes after the snapshot" put "$L" "$work/l.ref" 3 $((2 * MB)) $((4 * MB))
check "the snapshot holds exactly the writes before it (the snapshot context followed)" \
  exported_is "$L@s1" "$work/l.s1"
# The race librbd closes with its refresh-before-I/O: `rbd snap create` returns once every
# watcher acknowledged the update, and a write sent right after must already carry the new
# snapshot context (acked before our refresh, it would not: the snapshot silently holds
# the later bytes). Ten rounds on one open connection, each write sent as rbd returns.
check "snapshots by rbd, each followed at once by a write: each holds the bytes before it" $PY -c "
import nbd, subprocess, os
h = nbd.NBD(); h.connect_uri('$(uri "$L")')
bad = []
for r in range(10):
    h.pwrite(bytes([65 + r]) * 4096, 16 << 20)
    subprocess.run(['rbd', 'snap', 'create', '--no-progress', 'rbd/$L@r%d' % r], check=True)
    h.pwrite(b'z' * 4096, 16 << 20)
h.shutdown()
for r in range(10):
    out = subprocess.run(['rbd', 'export', '--no-progress', 'rbd/$L@r%d' % r, '-'],
                         check=True, capture_output=True).stdout
    if out[16 << 20:(16 << 20) + 4096] != bytes([65 + r]) * 4096:
        bad.append(r)
assert not bad, 'snapshots holding a later write: %s' % bad
"
$PY -c "
with open('$work/l.ref', 'r+b') as f: f.seek(16 << 20); f.write(b'z' * 4096)"
check "rbd resize --allow-shrink (by rbd itself) shrinks the served size" \
  resized "$L" $((24 * MB)) --allow-shrink
truncate -s $((24 * MB)) "$work/l.ref"
check "a write past the new end is refused" bash -c \
  "! $PY -c \"
import nbd
h = nbd.NBD(); h.connect_uri('$(uri "$L")')
h.pwrite(b'x' * 4096, 40 << 20)\" 2>/dev/null"
# The same race for a shrink: a client connected before it (told the old size) writes past
# the new end as `rbd resize` returns; refused, never an object past the end.
check "shrinks by rbd, each followed at once by a write past the new end: all refused" $PY -c "
import nbd, subprocess, time
ok = []
for r in range(5):
    subprocess.run(['rbd', 'resize', '--no-progress', '--size', '64M', 'rbd/$L'], check=True)
    for _ in range(100):
        h = nbd.NBD(); h.connect_uri('$(uri "$L")')
        if h.get_size() == 64 << 20:
            break
        h.shutdown(); time.sleep(0.1)
    assert h.get_size() == 64 << 20, 'the grow was not followed'
    subprocess.run(['rbd', 'resize', '--no-progress', '--allow-shrink', '--size', '24M', 'rbd/$L'], check=True)
    try:
        h.pwrite(b'y' * 4096, 40 << 20)
        ok.append(r)
    except nbd.Error:
        pass
    h.shutdown()
assert not ok, 'writes past the end acknowledged in rounds %s' % ok
"
check "no data object past the new end (rbd rm would leave it behind)" \
  test -z "$(heads_from "$L" 6)"
check "rbd export equals every write inside the new size" exported_is "$L" "$work/l.ref"
check_unserve "layering-only image: clean close"
check "after close, rbd export still equals" exported_is "$L" "$work/l.ref"
rbd snap purge --no-progress "$L" >/dev/null 2>&1
rbd rm --no-progress "$L" >/dev/null 2>&1

# ------------------------------------------------------------ exclusive-lock turned off while served
# The twin: the same features, held open and written by librbd (so it owns the lock),
# asked the same `rbd feature disable` requests.
rbd create --size 32M "$E"
rbd create --size 32M "$T"
truncate -s $((32 * MB)) "$work/e.ref"
rm -f "$work/twin.ready"
$PY -c "
import rados, rbd, os, time
c = rados.Rados(conffile=os.environ['CEPH_CONF']); c.connect()
io = c.open_ioctx('rbd')
img = rbd.Image(io, '$T')
img.write(b'x' * 4096, 0)
open('$work/twin.ready', 'w').close()
while os.path.exists('$work/twin.ready'):
    time.sleep(0.05)
img.close(); io.close(); c.shutdown()" &
TWIN_PID=$!
for _ in $(seq 1 300); do [ -e "$work/twin.ready" ] && break; sleep 0.1; done
check "the twin is open and owned by librbd" test -e "$work/twin.ready"
serve "$E" || fail "serve $E" "$(tail -3 "$work/serve.log")"
check "writes" put "$E" "$work/e.ref" 11 0 $((6 * MB))
answer() { # answer IMAGE FEATURES...: rbd feature disable's exit status, bounded
  timeout 60 rbd feature disable "$@" >/dev/null 2>&1
  echo $?
}
a_twin=$(answer "$T" exclusive-lock)
a_ours=$(answer "$E" exclusive-lock)
check "exclusive-lock alone while object-map is on: refused as librbd's owner refuses (twin $a_twin, ours $a_ours)" \
  bash -c "[ '$a_twin' = 22 ] && [ '$a_ours' = '$a_twin' ]"
a_twin=$(answer "$T" exclusive-lock object-map fast-diff)
a_ours=$(answer "$E" exclusive-lock object-map fast-diff)
check "exclusive-lock with object-map and fast-diff: done as librbd's owner does (twin $a_twin, ours $a_ours)" \
  bash -c "[ '$a_twin' = 0 ] && [ '$a_ours' = 0 ]"
feat() { rbd info "$1" --format json | jq -c '[.features, .flags]'; }
check "the features and flags left are the twin's ($(feat "$E"))" test "$(feat "$E")" = "$(feat "$T")"
check "no object map left" bash -c \
  "! rados -p rbd stat rbd_object_map.\$(rbd info '$E' --format json | jq -r .id) 2>/dev/null"
check "the daemon serves on, lock-less (log)" grep -q "served on without exclusive-lock" "$work/serve.log"
check "writes go on, new objects too" put "$E" "$work/e.ref" 12 $((20 * MB)) $((8 * MB))
check "rbd resize now by rbd itself: the served size follows" resized "$E" $((48 * MB))
truncate -s $((48 * MB)) "$work/e.ref"
check "rbd feature enable exclusive-lock (by rbd itself)" "${RBD[@]}" feature enable "$E" exclusive-lock
check "rbd feature enable object-map fast-diff: asked of us, the owner again, and done" \
  "${RBD[@]}" feature enable "$E" object-map fast-diff
check "writes with the map again" put "$E" "$work/e.ref" 13 $((40 * MB)) $((4 * MB))
check "rbd object-map check passes while served" timeout 120 rbd object-map check --no-progress "$E"
check_unserve "exclusive-lock off and on: clean close"
check "after close, rbd export equals every write" exported_is "$E" "$work/e.ref"
check "after close, rbd object-map check passes, flags clear" bash -c \
  "timeout 120 rbd object-map check --no-progress '$E' >/dev/null 2>&1 && [ \"\$(rbd info '$E' --format json | jq -r '.flags | length')\" = 0 ]"
rm -f "$work/twin.ready"
wait "$TWIN_PID" 2>/dev/null
rbd rm --no-progress "$E" >/dev/null 2>&1
rbd rm --no-progress "$T" >/dev/null 2>&1

# ------------------------------------------------------------ turned off by the lock's other holder
# A librbd client takes the lock from us (the hand-over), turns exclusive-lock off as its
# owner and closes; our next write takes the image back and serves on lock-less (before:
# refused, and the write failed).
H=locklessh-$$
new_served "$H" "$work/h.ref"
check "handed: writes" put "$H" "$work/h.ref" 41 0 $((4 * MB))
check "handed: a librbd client takes the lock, writes, turns exclusive-lock off and closes" $PY -c "
import rados, rbd, os
c = rados.Rados(conffile=os.environ['CEPH_CONF']); c.connect()
io = c.open_ioctx('rbd')
img = rbd.Image(io, '$H')
img.write(b'L' * 4096, 8 << 20)
assert img.is_exclusive_lock_owner()
img.update_features(rbd.RBD_FEATURE_EXCLUSIVE_LOCK | rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF, False)
img.close(); io.close(); c.shutdown()"
$PY -c "
with open('$work/h.ref', 'r+b') as f: f.seek(8 << 20); f.write(b'L' * 4096)"
check "handed: our next write takes the image back and is served lock-less" put "$H" "$work/h.ref" 42 $((12 * MB)) $((4 * MB))
check "handed: rbd resize by rbd itself is followed" resized "$H" $((40 * MB))
truncate -s $((40 * MB)) "$work/h.ref"
check "handed: writes past the old end" put "$H" "$work/h.ref" 43 $((36 * MB)) $((4 * MB))
check_unserve "handed: clean close"
check "handed: rbd export equals every write, both clients'" exported_is "$H" "$work/h.ref"
check "handed: the features the other owner left, no flags" test "$(feat "$H")" = '[["layering","deep-flatten"],[]]'
rbd rm --no-progress "$H" >/dev/null 2>&1

# ------------------------------------------------------------ journaling, switched on by rbd
# `rbd feature enable IMG journaling` is not asked of the owner: rbd takes the lock (we hand
# it over) and does it itself. rados-nbd writes no journal, so its writes are then refused
# (a journal missing them would be silently wrong for rbd-mirror), reads go on, and once
# journaling is off again the next write takes the lock back and is served.
J=locklessj-$$
new_served "$J" "$work/j.ref"
check "journaling: writes" put "$J" "$work/j.ref" 51 0 $((4 * MB))
check "journaling: rbd feature enable journaling (rbd takes the lock for it)" \
  "${RBD[@]}" feature enable "$J" journaling
check "journaling: our writes are refused meanwhile" bash -c "! $PY -c \"
import nbd
h = nbd.NBD(); h.connect_uri('$(uri "$J")')
h.pwrite(b'x' * 4096, 0)\" 2>/dev/null"
check "journaling: the daemon says why, once (log)" \
  test "$(grep -c "cannot take the lock back: .*journaling" "$work/serve.log")" = 1
check "journaling: reads go on" bash -c \
  "rm -f '$work/j.got' && nbdcopy '$(uri "$J")' '$work/j.got' && cmp '$work/j.got' '$work/j.ref'"
check "journaling: rbd feature disable journaling" "${RBD[@]}" feature disable "$J" journaling
check "journaling: our writes are served again" put "$J" "$work/j.ref" 52 $((8 * MB)) $((4 * MB))
check_unserve "journaling: clean close"
check "journaling: rbd export equals every acknowledged write" exported_is "$J" "$work/j.ref"
check "journaling: rbd object-map check passes" timeout 120 rbd object-map check --no-progress "$J"
rbd rm --no-progress "$J" >/dev/null 2>&1

# ------------------------------------------------------------ a lock-less clone flattened by rbd
# rbd flatten of a clone without exclusive-lock copies up in the rbd process and detaches
# the parent; the parent's snapshot can then go. The served clone must stop reading
# through the parent (objects neither has read zeros, not an error from a snapshot gone).
$PY -c "
import random
open('$work/p.ref', 'wb').write(random.Random(21).randbytes(8 << 20))"
rbd import --no-progress --image-feature layering "$work/p.ref" "$P" >/dev/null
rbd resize --no-progress --size 32M "$P" >/dev/null
truncate -s $((32 * MB)) "$work/p.ref"
rbd snap create --no-progress "$P@s"
rbd snap protect "$P@s"
rbd clone --image-feature layering "$P@s" "$C"
cp "$work/p.ref" "$work/c.ref"
serve "$C" || fail "serve $C" "$(tail -3 "$work/serve.log")"
check "clone: writes into parent-backed objects" put "$C" "$work/c.ref" 31 $((4 * MB - 4096)) 8192
check "clone: rbd flatten (by rbd itself)" "${RBD[@]}" flatten --no-progress "$C"
check "clone: the daemon follows the flatten (log)" bash -c \
  "for i in \$(seq 1 100); do grep -q 'flattened by another client' '$work/serve.log' && exit 0; sleep 0.1; done; exit 1"
check "clone: the parent's snapshot removed" bash -c \
  "rbd snap unprotect '$P@s' && rbd snap rm --no-progress '$P@s'"
check "clone: every byte reads as before, through NBD" bash -c \
  "rm -f '$work/c.got' && nbdcopy '$(uri "$C")' '$work/c.got' && cmp '$work/c.got' '$work/c.ref'"
check "clone: writes after the flatten" put "$C" "$work/c.ref" 32 $((20 * MB)) $((4 * MB))
check_unserve "clone: clean close"
check "clone: rbd export equals every write" exported_is "$C" "$work/c.ref"
rbd rm --no-progress "$C" >/dev/null 2>&1
rbd rm --no-progress "$P" >/dev/null 2>&1

t_summary
