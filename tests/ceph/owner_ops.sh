#!/usr/bin/env bash
# The lock owner's duties: while rados-nbd serves an image it holds the exclusive lock, so
# `rbd snap create`, `rbd snap rm`, `rbd flatten`, `rbd object-map rebuild`, `rbd rename` (and,
# for journaling images only, snap rename/protect/unprotect) are sent to it through the header
# watch, as to librbd's ImageWatcher. With Ceph's `rbd` as the oracle, while an NBD client
# is connected and writing: each request succeeds, a snapshot holds exactly the writes
# acknowledged before it (after a pause, and in the middle of a stream of writes), snap
# ls/rm/rename/protect/unprotect behave as rbd's own, a served clone is flattened (same
# bytes, no parent), the map rebuilt while served checks clean, `rbd sparsify` is done
# (zero objects removed, the map following), feature changes it does not do are refused
# promptly with a clear error, and after close `rbd object-map check` passes for the image and every
# snapshot. `rados-nbd snap create|rm` and `rados-nbd flatten` of an image another
# rados-nbd serves go through the owner the same way.
# Runs against $CEPH_CONF like e2e.sh (tests/ceph/run.sh starts the cluster).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh" ceph-owner
I=owner-$$
C=ownerc-$$
P=ownerp-$$
SIZE=$((32 * MB)) # 8 objects of 4 MiB
# Every rbd command is bounded: a request the owner neither does nor refuses would hang.
RBD=(timeout 120 rbd)
export RBD_T="timeout 120 rbd"

# put IMAGE REF SEED OFFSET LENGTH: random bytes (seeded) written at OFFSET through NBD,
# in 1 MiB writes, each acknowledged before the next, and into the local copy REF.
put() {
  $PY -c "
import nbd, random
r = random.Random($3)
data = r.randbytes($5)
h = nbd.NBD(); h.connect_uri('$(uri "$1")')
for o in range(0, $5, 1 << 20):
    h.pwrite(data[o:o + (1 << 20)], $4 + o)
h.shutdown()
with open('$2', 'r+b') as f:
    f.seek($4); f.write(data)"
}
exported_is() { # exported_is SPEC REF (exported: the checks run it under bash -c)
  rm -f "$OWNER_EXP"
  timeout 120 rbd export --no-progress "$1" "$OWNER_EXP" >/dev/null || return 1
  cmp "$OWNER_EXP" "$2"
}
export OWNER_EXP=$work/exp
export -f exported_is

# ------------------------------------------------------------ snapshots of a served image
rbd create --size $((SIZE / MB))M "$I"
truncate -s "$SIZE" "$work/ref"
serve "$I" || { fail "serve $I" "$(tail -3 "$work/serve.log")"; t_summary; exit 1; }
hold "$I"
check "an NBD client stays connected" test $? = 0
check "12 MiB written and acknowledged through NBD" put "$I" "$work/ref" 1 0 $((12 * MB))
cp "$work/ref" "$work/ref.s1"
check "rbd snap create IMG@s1 while served succeeds" "${RBD[@]}" snap create "$I@s1"
check "the daemon took it (log)" grep -q "created snapshot rbd/$I@s1" "$work/serve.log"
check "more written after the snapshot" put "$I" "$work/ref" 2 $((8 * MB)) $((12 * MB))
check "rbd export IMG@s1 equals exactly the writes acknowledged before it" \
  bash -c "exported_is '$I@s1' '$work/ref.s1'"
check "rbd export of the head equals every write" bash -c "exported_is '$I' '$work/ref'"
check_fails "rbd snap create of an existing name fails" "${RBD[@]}" snap create "$I@s1"

# A snapshot in the middle of a stream of writes: 64 KiB blocks written one after the
# other, each acknowledged before the next and logged once acknowledged. The snapshot
# must hold a prefix of the stream (nothing torn, nothing out of order) that includes
# every block acknowledged before `rbd snap create` started.
cat >"$work/stream.py" <<EOF
import nbd, os, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
log = open(sys.argv[2], 'w')
n = 0
while not os.path.exists(sys.argv[3]) and n < 256:
    h.pwrite(bytes([n % 251 + 1]) * 65536, (16 << 20) + n * 65536)
    log.write(f'{n}\n'); log.flush()
    n += 1
h.shutdown()
EOF
rm -f "$work/stream.stop"
: >"$work/stream.log"
$PY "$work/stream.py" "$(uri "$I")" "$work/stream.log" "$work/stream.stop" &
STREAM_PID=$!
for _ in $(seq 1 300); do [ "$(wc -l <"$work/stream.log" 2>/dev/null || echo 0)" -ge 8 ] && break; sleep 0.1; done
acked=$(wc -l <"$work/stream.log")
check "rbd snap create IMG@s2 during a stream of writes succeeds" "${RBD[@]}" snap create "$I@s2"
touch "$work/stream.stop"
wait "$STREAM_PID"
check "the stream's writes all succeeded" test $? = 0
total=$(wc -l <"$work/stream.log")
check "IMG@s2 holds a prefix of the stream with all $acked blocks acknowledged before it (of $total)" $PY -c "
import subprocess
subprocess.run(['timeout', '120', 'rbd', 'export', '--no-progress', '$I@s2', '$work/s2.raw'],
               check=True, capture_output=True)
s = open('$work/s2.raw', 'rb').read()
ref = open('$work/ref', 'rb').read()
k = 0
while k < $total and s[(16 << 20) + k * 65536:(16 << 20) + (k + 1) * 65536] == bytes([k % 251 + 1]) * 65536:
    k += 1
assert k >= $acked, f'only {k} blocks in the snapshot, {$acked} acknowledged before it'
end = (16 << 20) + k * 65536
assert s[:16 << 20] == ref[:16 << 20], 'the data before the stream differs'
assert s[end:] == ref[end:], f'blocks after the prefix of {k} are in the snapshot'
print(f'{k} blocks in the snapshot')"
# The head now has the stream too.
$PY -c "
with open('$work/ref', 'r+b') as f:
    for n in range($total):
        f.seek((16 << 20) + n * 65536); f.write(bytes([n % 251 + 1]) * 65536)"
check "rbd snap ls lists s1 and s2" bash -c \
  "[ \"\$(rbd snap ls '$I' --format json | jq -r '.[].name' | tr '\n' ' ')\" = 's1 s2 ' ]"

# rename/protect/unprotect: librbd does them itself unless journaling is on (they reach
# the owner then only); the owner must see the result (header refresh) for what follows.
check "rbd snap rename s1 -> s1r while served" "${RBD[@]}" snap rename "$I@s1" "$I@s1r"
check "rbd snap protect s1r while served" "${RBD[@]}" snap protect "$I@s1r"
check_fails "rbd snap rm of a protected snapshot fails" "${RBD[@]}" snap rm --no-progress "$I@s1r"
check "rbd snap unprotect s1r while served" "${RBD[@]}" snap unprotect "$I@s1r"
check "rbd snap rm s1r while served succeeds" "${RBD[@]}" snap rm --no-progress "$I@s1r"
check "the daemon removed it (log)" grep -q "removed snapshot rbd/$I@s1r" "$work/serve.log"
check "rbd snap ls lists s2 only" bash -c \
  "[ \"\$(rbd snap ls '$I' --format json | jq -r '.[].name' | tr '\n' ' ')\" = 's2 ' ]"
check_fails "rbd snap rm of a missing snapshot fails" "${RBD[@]}" snap rm --no-progress "$I@nope"
check "IMG@s2 unchanged by the removal" cmp <(rbd export --no-progress "$I@s2" - 2>/dev/null) "$work/s2.raw"
check "more writes after the removal" put "$I" "$work/ref" 3 $((4 * MB)) $((2 * MB))
check "rbd export of the head equals every write" bash -c "exported_is '$I' '$work/ref'"

# rados-nbd's own commands against the image served by another rados-nbd: through the
# lock owner, as rbd's.
cp "$work/ref" "$work/ref.c1"
check "rados-nbd snap create IMG@c1 of the served image succeeds" timeout 120 "${RN[@]}" snap create "$I@c1"
check "more written after it" put "$I" "$work/ref" 7 0 $((2 * MB))
check "rbd export IMG@c1 equals exactly the writes acknowledged before it" \
  bash -c "exported_is '$I@c1' '$work/ref.c1'"
check "rados-nbd snap create of an existing name fails, saying so" bash -c \
  "out=\$(timeout 120 ${RNQ} snap create '$I@c1' 2>&1) && exit 1; grep -q 'File exists' <<<\"\$out\""
check "rados-nbd snap protect IMG@c1 of the served image (asked of the owner)" \
  timeout 120 "${RN[@]}" snap protect "$I@c1"
check "... rbd sees it protected" bash -c \
  "[ \"\$(rbd snap ls '$I' --format json | jq -r '.[] | select(.name==\"c1\") | .protected')\" = true ]"
check "rados-nbd snap rename IMG@c1 IMG@c1r of the served image (asked of the owner)" \
  timeout 120 "${RN[@]}" snap rename "$I@c1" "$I@c1r"
check "rados-nbd snap unprotect IMG@c1r of the served image (asked of the owner)" \
  timeout 120 "${RN[@]}" snap unprotect "$I@c1r"
check "... rbd sees it renamed and unprotected" bash -c \
  "[ \"\$(rbd snap ls '$I' --format json | jq -r '.[] | select(.name==\"c1r\") | .protected')\" = false ]"
check "rados-nbd snap rename of a missing snapshot of the served image fails, saying so" bash -c \
  "out=\$(timeout 120 ${RNQ} snap rename '$I@nope' '$I@x' 2>&1) && exit 1; grep -q 'not found' <<<\"\$out\""
check "rados-nbd snap rename IMG@c1r IMG@c1 back" timeout 120 "${RN[@]}" snap rename "$I@c1r" "$I@c1"
check "rados-nbd snap rm IMG@c1 of the served image succeeds" timeout 120 "${RN[@]}" snap rm "$I@c1"
check "rados-nbd snap rm of a missing snapshot fails, saying so" bash -c \
  "out=\$(timeout 120 ${RNQ} snap rm '$I@c1' 2>&1) && exit 1; grep -q 'No such file' <<<\"\$out\""
check "rbd snap ls lists s2 only again" bash -c \
  "[ \"\$(rbd snap ls '$I' --format json | jq -r '.[].name' | tr '\n' ' ')\" = 's2 ' ]"

# ------------------------------------------------------------ object map rebuild, refusals
check "rbd object-map rebuild while served succeeds" "${RBD[@]}" object-map rebuild --no-progress "$I"
check "the daemon rebuilt it (log)" grep -q "object map of rbd/$I rebuilt" "$work/serve.log"
check "rados-nbd object-map rebuild of the served image asks the owner too" bash -c \
  "timeout 120 ${RNQ} object-map rebuild '$I' | grep -q 'rebuilt by the process serving it' &&
   [ \"\$(grep -c 'object map of rbd/$I rebuilt' '$work/serve.log')\" -ge 2 ]"
check "writes after the rebuild" put "$I" "$work/ref" 4 $((28 * MB)) $((4 * MB))
# Image metadata: librbd 16.2 sends `rbd image-meta set|remove` and `rbd config image
# set|rm` of a locked image to the lock owner (op 20), which sets the key itself.
check "rbd image-meta set while served succeeds" "${RBD[@]}" image-meta set "$I" owner-key "v 1"
check "... rbd image-meta get reads it back" bash -c \
  "[ \"\$(rbd image-meta get '$I' owner-key)\" = 'v 1' ]"
check "the daemon set it (log)" grep -q "image-meta set owner-key asked by" "$work/serve.log"
check "rbd config image set while served succeeds" "${RBD[@]}" config image set "$I" rbd_cache false
check "... rbd config image get reads it back" bash -c \
  "[ \"\$(rbd config image get '$I' rbd_cache)\" = false ]"
check "rbd config image rm and rbd image-meta remove while served succeed" bash -c \
  "$RBD_T config image rm '$I' rbd_cache && $RBD_T image-meta remove '$I' owner-key"
check "... both keys gone" bash -c \
  "! rbd image-meta get '$I' owner-key 2>/dev/null && ! rbd image-meta get '$I' conf_rbd_cache 2>/dev/null"
out=$(timeout 60 rbd image-meta remove "$I" owner-key 2>&1)
rc=$?
check "rbd image-meta remove of a missing key fails as with librbd's owner ($rc: $(tail -1 <<<"$out"))" \
  bash -c "[ $rc = 2 ]"
check "writes after the metadata changes" put "$I" "$work/ref" 5 $((24 * MB)) $((1 * MB))
# rbd rename: librbd 16.2 asks the owner (journaling or not), which renames the image and
# keeps its lock; so do we. The NBD export keeps the name it was served under, as
# rbd-nbd's list-mapped keeps its command line's.
# A directory entry's string, nothing when there is none (through a file: the value
# starts with its length, NUL bytes included, and rados says "No such key" on stdout).
dir_val() {
  local f rc
  f=$(mktemp)
  rados -p rbd getomapval rbd_directory "$1" "$f" >/dev/null 2>&1 && tail -c +5 "$f"
  rc=$?
  rm -f "$f"
  return $rc
}
id_of() { dir_val "name_$1"; }
export -f dir_val
export -f id_of
ID_I=$(id_of "$I")
LOCKER_I=$(rbd lock ls --format json "$I" | jq -c '[.[].locker]')
out=$(timeout 60 rbd rename "$I" "$I-renamed" 2>&1)
rc=$?
check "rbd rename while served succeeds ($rc: $(tail -1 <<<"$out"))" bash -c \
  "[ $rc = 0 ] && rbd info '$I-renamed' >/dev/null && ! rbd info '$I' >/dev/null 2>&1"
check "... the daemon did it (log)" grep -q "rename to $I-renamed asked by another client (image opened as rbd/$I)" "$work/serve.log"
check "... as librbd leaves it: the directory maps both ways, one id object" bash -c \
  "[ -n '$ID_I' ] && [ \"\$(id_of '$I-renamed')\" = '$ID_I' ] && [ -z \"\$(id_of '$I')\" ] &&
   [ \"\$(dir_val 'id_$ID_I')\" = '$I-renamed' ] &&
   [ \"\$(rados -p rbd ls | grep -c '^rbd_id\.$I')\" = 1 ] && rados -p rbd stat 'rbd_id.$I-renamed' >/dev/null"
check "... the lock stays with the daemon (the same locker as before the rename)" bash -c \
  "[ '$LOCKER_I' != '[]' ] && [ \"\$(rbd lock ls --format json '$I-renamed' | jq -c '[.[].locker]')\" = '$LOCKER_I' ]"
check "writes after the rename" put "$I" "$work/ref" 6 $((20 * MB)) $((1 * MB))
check "... rbd export of the new name has every write" bash -c "exported_is '$I-renamed' '$work/ref'"
rbd create --size 1M "$I-taken"
out=$(timeout 60 rbd rename "$I-renamed" "$I-taken" 2>&1)
rc=$?
check "rbd rename onto a name taken fails with EEXIST (rbd's own check, before it asks the owner) ($rc: $(tail -1 <<<"$out"))" \
  bash -c "[ $rc = 17 ] && rbd info '$I-renamed' >/dev/null"
check "rados-nbd rename onto a name taken fails too, saying so" bash -c \
  "out=\$(timeout 120 ${RNQ} rename '$I-renamed' '$I-taken' 2>&1) && exit 1; grep -q 'could not rename to $I-taken: File exists' <<<\"\$out\""
rbd rm --no-progress "$I-taken" >/dev/null 2>&1
check "rados-nbd rename of the served image back (asked of the owner)" \
  timeout 120 "${RN[@]}" rename "$I-renamed" "$I"
check "... rbd sees the old name again, and the daemon did it (log)" bash -c \
  "rbd info '$I' >/dev/null && ! rbd info '$I-renamed' >/dev/null 2>&1 &&
   grep -q 'rename to $I asked by another client (image opened as rbd/$I)' '$work/serve.log' &&
   grep -q 'renamed rbd/$I-renamed to $I' '$work/serve.log'"
check "rados-nbd rename across pools is refused, saying so" bash -c \
  "out=\$(${RNQ} rename '$I' 'other/$I' 2>&1) && exit 1; grep -q 'across pools' <<<\"\$out\""
# Bounded: a request the owner neither does nor refuses would hang (124 from timeout).
# exclusive-lock goes only after object-map (librbd's owner answers EINVAL; lockless.sh
# turns it off with object-map, and has journaling, which rbd turns on itself).
out=$(timeout 60 rbd feature disable "$I" exclusive-lock 2>&1)
rc=$?
check "rbd feature disable exclusive-lock while object-map is on is refused as librbd's owner refuses it ($rc: $(tail -1 <<<"$out"))" \
  bash -c "[ $rc = 22 ] && grep -q 'Invalid argument' <<<'$out'"
check "... and the features are unchanged" bash -c \
  "rbd info '$I' --format json | jq -e '.features | index(\"exclusive-lock\")' >/dev/null"
check "the daemon says why (log)" grep -q "exclusive-lock cannot be disabled while object-map" "$work/serve.log"
out=$(timeout 60 rbd feature enable "$I" object-map fast-diff 2>&1)
rc=$?
check "rbd feature enable of features already on fails, not a hang ($rc: $(tail -1 <<<"$out"))" \
  bash -c "[ $rc != 0 ] && [ $rc != 124 ]"
# Sparsify: zeros written as data (one whole object of them, and the tail of another) are
# given back: the all-zero object removed and its map entry with it, the other truncated;
# the bytes read the same.
check "sparsify: zeros written as data into objects 5 and 6 (the second: its tail only)" $PY -c "
import nbd
h = nbd.NBD(); h.connect_uri('$(uri "$I")')
h.pwrite(bytes(4 << 20), 20 << 20)
h.pwrite(b'\\x77' * (1 << 20), 24 << 20); h.pwrite(bytes(3 << 20), 25 << 20)
h.shutdown()
with open('$work/ref', 'r+b') as f:
    f.seek(20 << 20); f.write(bytes(4 << 20))
    f.seek(24 << 20); f.write(b'\\x77' * (1 << 20) + bytes(3 << 20))"
obj() { echo "rbd_data.$(rbd info "$I" --format json | jq -r .id).$(printf %016x "$1")"; }
check "sparsify: objects 5 and 6 exist before" bash -c "rados -p rbd stat $(obj 5) && rados -p rbd stat $(obj 6)"
check "rbd sparsify while served succeeds (done by the owner)" "${RBD[@]}" sparsify --no-progress "$I"
check "the daemon sparsified it (log)" grep -q "sparsified rbd/$I" "$work/serve.log"
check "sparsify: the all-zero object 5 is gone, object 6 cut to its data (1 MiB)" bash -c \
  "! rados -p rbd stat $(obj 5) 2>/dev/null && rados -p rbd stat $(obj 6) | grep -q 'size 1048576'"
check "sparsify: the bytes read the same through the server" bash -c \
  "nbdcopy '$(uri "$I")' - | cmp - '$work/ref'"
unhold
check_unserve "clean close after the owner's work"
check "after close: rbd export of the head equals every write" bash -c "exported_is '$I' '$work/ref'"
# The sparsify marked every object it left EXISTS, as librbd's does, those it left uncut
# since IMG@s2 too, which the check wants EXISTS_CLEAN (librbd's own map fails it the same
# way): nothing else may be wrong, and once rebuilt the map checks.
check "after close: rbd object-map check of the head finds nothing but the sparsify's EXISTS marks (marked as 1, but should be 3)" \
  bash -c "! rbd object-map check '$I' 2>&1 | grep 'object map error' | grep -v 'marked as 1, but should be 3'"
check "after close: rbd object-map rebuild, then the check of the head passes" bash -c \
  "rbd object-map rebuild --no-progress '$I' && omap_check '$I'"
check "after close: rbd object-map check IMG@s2 passes" omap_check "$I@s2"
check "after close: the flags are clear" bash -c \
  "[ \"\$(rbd info '$I' --format json | jq -r '.flags | length')\" = 0 ]"

# ------------------------------------------------------------ flatten of a served clone
head -c $((16 * MB)) /dev/urandom >"$work/p.raw"
truncate -s "$SIZE" "$work/p.raw"
rbd import --no-progress "$work/p.raw" "$P" >/dev/null 2>&1
rbd snap create "$P@base" >/dev/null 2>&1
# A format-2 clone (no protection needed) whose parent snapshot is then removed: librbd
# keeps it in the trash while the clone uses it, and removes it when the owner flattens.
rbd clone --rbd-default-clone-format 2 "$P@base" "$C"
cp "$work/p.raw" "$work/c.ref"
serve "$C" || { fail "serve $C" "$(tail -3 "$work/serve.log")"; }
hold "$C"
check "flatten: an NBD client stays connected to the clone" test $? = 0
check "flatten: writes to the clone (copy-up of part of an object)" put "$C" "$work/c.ref" 5 $((6 * MB)) $((1 * MB))
check "flatten: rbd export before equals parent + writes" bash -c "exported_is '$C' '$work/c.ref'"
check "flatten: rbd snap rm of the parent's snapshot moves it to the trash (the clone uses it)" bash -c \
  "rbd snap rm --no-progress '$P@base' >/dev/null 2>&1 &&
   rbd snap ls --all --format json '$P' | jq -e 'length == 1 and .[0].namespace.type == \"trash\"' >/dev/null"
check "flatten: rbd flatten of the served clone succeeds" "${RBD[@]}" flatten --no-progress "$C"
check "flatten: the daemon did it (log)" grep -q "flattened rbd/$C" "$work/serve.log"
check "flatten: rbd info shows no parent" bash -c "! rbd info '$C' --format json | jq -e .parent >/dev/null"
check "flatten: rbd export after equals before" bash -c "exported_is '$C' '$work/c.ref'"
check "flatten: writes after the flatten" put "$C" "$work/c.ref" 6 $((2 * MB)) $((1 * MB))
check "flatten: the parent's trashed snapshot went with its last clone (as librbd's owner removes it)" bash -c \
  "[ \"\$(rbd snap ls --all --format json '$P' | jq length)\" = 0 ]"
check "flatten: rbd flatten again fails (no parent)" bash -c "! ${RBD_T} flatten --no-progress '$C' 2>/dev/null"
unhold
check_unserve "flatten: clean close"
check "flatten: after close, rbd export equals every write" bash -c "exported_is '$C' '$work/c.ref'"
check "flatten: after close, rbd object-map check passes" omap_check "$C"

# rados-nbd flatten of a clone another rados-nbd serves.
rbd snap create "$P@base2" >/dev/null 2>&1
rbd snap protect "$P@base2"
rbd clone "$P@base2" "$C-2"
cp "$work/p.raw" "$work/c2.ref"
serve "$C-2" || { fail "serve $C-2" "$(tail -3 "$work/serve.log")"; }
check "flatten: writes to a second clone" put "$C-2" "$work/c2.ref" 8 $((9 * MB)) $((3 * MB))
check "flatten: rados-nbd flatten of the clone another rados-nbd serves succeeds" \
  timeout 120 "${RN[@]}" flatten "$C-2"
check "flatten: rbd info shows no parent" bash -c "! rbd info '$C-2' --format json | jq -e .parent >/dev/null"
check "flatten: rbd export equals parent + writes" bash -c "exported_is '$C-2' '$work/c2.ref'"
check_unserve "flatten: clean close of the second clone"
check "flatten: after close, rbd object-map check passes" omap_check "$C-2"
rbd snap unprotect "$P@base2" >/dev/null 2>&1
rbd snap rm --no-progress "$P@base2" >/dev/null 2>&1

# wait_owner_flatten IMAGE: until the daemon has taken another client's flatten request.
wait_owner_flatten() {
  for _ in $(seq 1 200); do
    grep -q "flatten of rbd/$1 asked by another client" "$work/serve.log" && return 0
    sleep 0.05
  done
}
# librbd_write IMAGE: python3-rbd opens IMAGE, writes 4 KiB of 0x5a at 8 MiB (asking the
# holder for the lock), and closes it.
librbd_write() {
  $PY -c "
import rados, rbd
c = rados.Rados(conffile='$CEPH_CONF'); c.connect(); io = c.open_ioctx('rbd')
with rbd.Image(io, '$1') as im:
    im.write(b'\x5a' * 4096, 8 << 20)
"
}
# with_librbd_write SRC DST: DST is SRC with librbd_write's bytes.
with_librbd_write() {
  cp "$1" "$2"
  printf '\x5a%.0s' $(seq 1 4096) | dd of="$2" bs=1 seek=$((8 << 20)) conv=notrunc status=none
}

# A snapshot asked while the owner flattens a large clone is taken at once, beside the
# flatten (as librbd's owner runs them), not after it: the flatten copies up 1 GiB object
# by object, and `rbd snap create` returns while it still runs. Both exact afterwards.
# So do a shrink, an object map rebuild and a grow (librbd runs operations of different
# kinds side by side): the shrink cuts the clone's last object off (1020 MiB) and lowers
# the overlap, so the flatten must not copy that object up when it gets there; after the
# grow it reads as zeros, in `rbd export` of the head, while the snapshot keeps 1020 MiB.
P3=ownerp3-$$
C3=ownerc3-$$
rbd create --size 1G "$P3"
rbd bench --io-type write --io-size 4M --io-total 1G --io-pattern seq "$P3" >/dev/null 2>&1
rbd snap create "$P3@s" >/dev/null 2>&1
rbd clone --rbd-default-clone-format 2 "$P3@s" "$C3"
rbd export --no-progress "$C3" "$work/c3.ref" >/dev/null 2>&1
serve "$C3" || { fail "serve $C3" "$(tail -3 "$work/serve.log")"; }
"${RBD[@]}" flatten --no-progress "$C3" >/dev/null 2>&1 &
flat_pid=$!
wait_owner_flatten "$C3"
check "flatten + resize: rbd resize --allow-shrink to 1020 MiB during the flatten succeeds" \
  "${RBD[@]}" resize --no-progress --allow-shrink --size 1020M "$C3"
check "flatten + rebuild: rbd object-map rebuild during the flatten succeeds" \
  "${RBD[@]}" object-map rebuild --no-progress "$C3"
check "flatten + snapshot: rbd snap create during the flatten succeeds" "${RBD[@]}" snap create "$C3@during"
check "flatten + resize: rbd resize to 1536 MiB during the flatten succeeds" \
  "${RBD[@]}" resize --no-progress --size 1536M "$C3"
check "flatten + others: ... and all returned while the flatten still ran" kill -0 $flat_pid
wait $flat_pid
check "flatten + others: the flatten succeeded" test $? = 0
check "flatten + others: rbd info shows no parent, 1536 MiB" bash -c \
  "! rbd info '$C3' --format json | jq -e .parent >/dev/null && [ \$(rbd info '$C3' --format json | jq .size) = $((1536 * MB)) ]"
head -c $((1020 * MB)) "$work/c3.ref" >"$work/c3s.ref"
cp "$work/c3s.ref" "$work/c3g.ref" && truncate -s $((1536 * MB)) "$work/c3g.ref"
check "flatten + others: rbd export of the snapshot is the clone's first 1020 MiB" bash -c \
  "exported_is '$C3@during' '$work/c3s.ref'"
check "flatten + others: rbd export of the head is those, then zeros (the cut object not copied up)" bash -c \
  "exported_is '$C3' '$work/c3g.ref'"
check_unserve "flatten + others: clean close"
check "flatten + others: after close, rbd object-map check passes (head and snapshot)" bash -c \
  "omap_check '$C3' && omap_check '$C3@during'"
# Another client asking for the lock during the owner's flatten gets it at once, as from
# librbd's owner: the flatten stops at the next object and its asker (rbd flatten) hears
# ERESTART and carries on with the lock's new holder; here python3-rbd writes 4 KiB and
# closes, so `rbd flatten` takes the free lock and finishes the copy-ups itself.
C4=ownerc4-$$
rbd clone --rbd-default-clone-format 2 "$P3@s" "$C4"
serve "$C4" || { fail "serve $C4" "$(tail -3 "$work/serve.log")"; }
"${RBD[@]}" flatten --no-progress "$C4" >"$work/flat4.out" 2>&1 &
flat_pid=$!
wait_owner_flatten "$C4"
sleep 0.3
check "flatten + hand-over: a librbd client's write during the flatten gets the lock and lands" librbd_write "$C4"
check "flatten + hand-over: ... while the flatten still ran (it did not wait for it)" kill -0 $flat_pid
wait $flat_pid
check "flatten + hand-over: rbd flatten succeeded (carried on after ERESTART)" test $? = 0
check "flatten + hand-over: the daemon stopped for the hand-over (log)" \
  grep -q "interrupted: the exclusive lock goes to another client" "$work/serve.log"
check "flatten + hand-over: rbd info shows no parent" bash -c "! rbd info '$C4' --format json | jq -e .parent >/dev/null"
with_librbd_write "$work/c3.ref" "$work/c4.ref"
check "flatten + hand-over: written through NBD after it (the daemon takes the lock back)" \
  put "$C4" "$work/c4.ref" 31 $((12 * MB)) $((1 * MB))
check "flatten + hand-over: rbd export equals the parent's bytes and both writes" bash -c "exported_is '$C4' '$work/c4.ref'"
check_unserve "flatten + hand-over: clean close"
check "flatten + hand-over: after close, rbd object-map check passes" omap_check "$C4"
rbd rm "$C4" >/dev/null 2>&1
# The same with rados-nbd as the asker: on ERESTART it asks again, and with the lock
# then free it flattens the clone itself.
C5=ownerc5-$$
rbd clone --rbd-default-clone-format 2 "$P3@s" "$C5"
serve "$C5" || { fail "serve $C5" "$(tail -3 "$work/serve.log")"; }
timeout 300 "${RN[@]}" flatten "$C5" >"$work/flat5.out" 2>&1 &
flat_pid=$!
wait_owner_flatten "$C5"
sleep 0.3
librbd_write "$C5"
wait $flat_pid
flat_rc=$?
check "flatten + hand-over: rados-nbd flatten interrupted by a hand-over starts again and succeeds" \
  bash -c "[ $flat_rc = 0 ] && ! rbd info '$C5' --format json | jq -e .parent >/dev/null"
check "flatten + hand-over: ... and says so" grep -q "starting again\|asking again" "$work/flat5.out"
with_librbd_write "$work/c3.ref" "$work/c5.ref"
check "flatten + hand-over: rbd export equals the parent's bytes and the write" bash -c \
  "exported_is '$C5' '$work/c5.ref'"
check_unserve "flatten + hand-over: clean close of the second"
check "flatten + hand-over: after close, rbd object-map check passes" omap_check "$C5"
rbd rm "$C5" >/dev/null 2>&1
# A shrink during `rbd sparsify` of the 1 GiB parent (the owner's sparsify goes object by
# object, as a flatten): it cuts the last object off, and the sparsify, there later, must
# leave what is now past the end alone. The head's bytes are its snapshot's (c3.ref).
serve "$P3" || { fail "serve $P3" "$(tail -3 "$work/serve.log")"; }
"${RBD[@]}" sparsify --no-progress "$P3" >"$work/sp3.out" 2>&1 &
sp_pid=$!
for _ in $(seq 1 200); do
  grep -q "sparsify of rbd/$P3 " "$work/serve.log" && break
  sleep 0.05
done
check "sparsify + resize: rbd resize --allow-shrink to 1020 MiB during the sparsify succeeds" \
  "${RBD[@]}" resize --no-progress --allow-shrink --size 1020M "$P3"
check "sparsify + resize: ... and returned while the sparsify still ran" kill -0 $sp_pid
wait $sp_pid
check "sparsify + resize: the sparsify succeeded" test $? = 0
check "sparsify + resize: rbd export of the head is the first 1020 MiB" bash -c \
  "exported_is '$P3' '$work/c3s.ref'"
p3last="rbd_data.$(rbd info "$P3" --format json | jq -r .id).00000000000000ff"
check "sparsify + resize: the head's object past the new end is gone (rados stat $p3last)" \
  bash -c "! rados -p rbd stat $p3last"
check_unserve "sparsify + resize: clean close"
# (Every object the sparsify left is EXISTS, as librbd's owner marks it, where the check
# wants EXISTS_CLEAN since $P3@s: that and nothing else, as above.)
check "sparsify + resize: after close, rbd object-map check finds nothing but the sparsify's EXISTS marks" \
  bash -c "! rbd object-map check '$P3' 2>&1 | grep 'object map error' | grep -v 'marked as 1, but should be 3'"
rbd snap purge "$C3" >/dev/null 2>&1; rbd rm "$C3" >/dev/null 2>&1
rbd snap purge "$P3" >/dev/null 2>&1; rbd rm "$P3" >/dev/null 2>&1

# ------------------------------------------------------------ group snapshots
# `rbd group snap create` of a group holding a served image: librbd 16 takes each image's
# lock for the snapshot (we hand it over, and take it back at the next write); the image's
# group snapshot holds every write acknowledged before it. `rbd group snap rm` asks the
# owner to remove its part (a snapshot in the group namespace).
G=ownerg-$$
GR=ownergrp-$$
rbd create --size $((SIZE / MB))M "$G"
truncate -s "$SIZE" "$work/g.ref"
serve "$G" || { fail "serve $G" "$(tail -3 "$work/serve.log")"; }
hold "$G"
put "$G" "$work/g.ref" 21 0 $((4 * MB))
rbd group create "$GR"
rbd group image add "$GR" "$G"
check "group: rbd group snap create of a group with a served image succeeds" "${RBD[@]}" group snap create "$GR@gs"
cp "$work/g.ref" "$work/g-gs.ref"
check "group: written after it (the daemon takes the lock back)" put "$G" "$work/g.ref" 22 $((2 * MB)) $((4 * MB))
check "group: rbd group snap ls says it is complete" bash -c \
  "rbd group snap ls --format json '$GR' | jq -e 'length == 1 and .[0].state == \"ok\"' >/dev/null"
check "group: the image's group snapshot holds exactly the writes acknowledged before it" $PY -c "
import rados, rbd
c = rados.Rados(conffile='$CEPH_CONF'); c.connect(); io = c.open_ioctx('rbd')
with rbd.Image(io, '$G', read_only=True) as im:
    s = [x for x in im.list_snaps() if x['namespace'] == rbd.RBD_SNAP_NAMESPACE_TYPE_GROUP]
    assert len(s) == 1 and s[0]['group']['snap_name'] == 'gs', s
    im.set_snap_by_id(s[0]['id'])
    assert im.read(0, $SIZE) == open('$work/g-gs.ref', 'rb').read(), 'bytes differ'
"
check "group: rados-nbd snap ls --all shows the group snapshot as rbd's (plain, json)" bash -c \
  "[ \"\$($RNQ snap ls --all '$G')\" = \"\$(rbd snap ls --all '$G')\" ] &&
   [ \"\$($RNQ snap ls --all --format json '$G')\" = \"\$(rbd snap ls --all --format json '$G')\" ] &&
   $RNQ snap ls --all '$G' | grep -q 'group (rbd/$GR@gs)'"
check "group: rbd group snap rm while served succeeds" "${RBD[@]}" group snap rm "$GR@gs"
check "group: the daemon removed the image's part (log)" grep -q "removal of snapshot rbd/$G@.group.* (a group, mirror or trashed one)" "$work/serve.log"
check "group: the image has no snapshot left" bash -c \
  "[ \"\$(rbd snap ls --all --format json '$G' | jq length)\" = 0 ]"
check "group: rbd export of the head equals every write" bash -c "exported_is '$G' '$work/g.ref'"
unhold
check_unserve "group: clean close"
check "group: after close, rbd object-map check passes" omap_check "$G"
rbd group image rm "$GR" "$G" >/dev/null 2>&1; rbd group rm "$GR" >/dev/null 2>&1
rbd rm "$G" >/dev/null 2>&1

# ------------------------------------------------------------ mirror snapshots
# `rbd mirror image enable IMG snapshot` of a served image asks the owner for the first
# primary mirror snapshot (mirror namespace); `rbd mirror image disable` asks it to remove
# it. Both done, the snapshot holding exactly the writes acknowledged before it.
M=ownerm-$$
rbd create --size $((SIZE / MB))M "$M"
truncate -s "$SIZE" "$work/m.ref"
serve "$M" || { fail "serve $M" "$(tail -3 "$work/serve.log")"; }
hold "$M"
put "$M" "$work/m.ref" 41 0 $((3 * MB))
rbd mirror pool enable rbd image
check "mirror: rbd mirror image enable (snapshot mode) of a served image succeeds" \
  "${RBD[@]}" mirror image enable "$M" snapshot
cp "$work/m.ref" "$work/m-snap.ref"
check "mirror: written after it" put "$M" "$work/m.ref" 42 $((1 * MB)) $((3 * MB))
check "mirror: the primary mirror snapshot holds exactly the writes acknowledged before it" $PY -c "
import rados, rbd
c = rados.Rados(conffile='$CEPH_CONF'); c.connect(); io = c.open_ioctx('rbd')
with rbd.Image(io, '$M', read_only=True) as im:
    s = [x for x in im.list_snaps() if x['namespace'] == rbd.RBD_SNAP_NAMESPACE_TYPE_MIRROR]
    assert len(s) == 1, s
    im.set_snap_by_id(s[0]['id'])
    assert im.read(0, $SIZE) == open('$work/m-snap.ref', 'rb').read(), 'bytes differ'
"
# With a peer (recorded only: nothing connects to it), `rbd mirror image snapshot` of the
# served image asks the owner for a mirror snapshot naming that peer (librbd then removes
# the first one, which no peer needs).
peer=$(timeout 60 rbd mirror pool peer add rbd client.admin@nowhere 2>/dev/null)
check "mirror: rbd mirror image snapshot of the served image (a peer recorded)" bash -c \
  "[ -n '$peer' ] && timeout 120 ${RBD_T} mirror image snapshot '$M' >/dev/null"
# snap ls --all names the mirror snapshots as rbd does (state and peers; json fields).
check "mirror: snap ls --all shows the mirror snapshot as rbd snap ls --all" bash -c \
  "[ \"\$($RNQ snap ls --all '$M' | grep -o 'mirror (.*')\" = \"\$(rbd snap ls --all '$M' | grep -o 'mirror (.*')\" ] &&
   rbd snap ls --all '$M' | grep -q 'mirror (primary peer_uuids:\[$peer\])'"
check "mirror: snap ls --all --format json: the namespace object as rbd's" bash -c \
  "[ \"\$($RNQ snap ls --all --format json '$M' | jq -c '.[].namespace')\" = \"\$(rbd snap ls --all --format json '$M' | jq -c '.[].namespace')\" ]"
check "mirror: rbd mirror image disable of the served image succeeds, its snapshot removed" bash -c \
  "${RBD_T} mirror image disable '$M' >/dev/null && [ \"\$(rbd snap ls --all --format json '$M' | jq length)\" = 0 ]"
[ -n "$peer" ] && rbd mirror pool peer remove rbd "$peer"
rbd mirror pool disable rbd
check "mirror: rbd export of the head equals every write" bash -c "exported_is '$M' '$work/m.ref'"
unhold
check_unserve "mirror: clean close"
check "mirror: after close, rbd object-map check passes" omap_check "$M"
rbd rm "$M" >/dev/null 2>&1

# ------------------------------------------------------------ feature changes
# fast-diff and object-map turned off and on again by the owner while a client is connected
# and writing: off, the maps are gone and the flags clear; on again, the map is built from
# the objects (librbd would leave it flagged invalid until a rebuild); either way rbd's
# export and object-map check agree at the end.
F=ownerf-$$
rbd create --size $((SIZE / MB))M "$F"
truncate -s "$SIZE" "$work/f.ref"
serve "$F" || fail "features: serve" "$(tail -3 "$work/serve.log")"
hold "$F"
check "features: writes" put "$F" "$work/f.ref" 21 $((2 * MB)) $((6 * MB))
# Disabling fast-diff turns object-map off too, as librbd's owner does (the client asks for
# fast-diff alone).
check "features: rbd feature disable fast-diff while served" "${RBD[@]}" feature disable "$F" fast-diff
check "features: rbd info shows neither, the flags clear, no map object left" bash -c \
  "rbd info '$F' --format json | jq -e '(.features | index(\"object-map\")) == null and (.features | index(\"fast-diff\")) == null and (.flags | length) == 0' >/dev/null && ! rados -p rbd stat rbd_object_map.\$(rbd info '$F' --format json | jq -r .id) 2>/dev/null"
check "features: writes without a map (new objects too)" put "$F" "$work/f.ref" 22 $((20 * MB)) $((8 * MB))
check "features: rbd export equals every write" bash -c "exported_is '$F' '$work/f.ref'"
check "features: rbd feature enable object-map fast-diff while served" \
  "${RBD[@]}" feature enable "$F" object-map fast-diff
check "features: rbd info shows both, and the map valid (flags clear)" bash -c \
  "rbd info '$F' --format json | jq -e '(.features | index(\"object-map\")) != null and (.features | index(\"fast-diff\")) != null and (.flags | length) == 0' >/dev/null"
check "features: the map built by the owner checks while served" omap_check "$F"
check "features: writes with the map again" put "$F" "$work/f.ref" 23 $((12 * MB)) $((4 * MB))
unhold
check_unserve "features: clean close"
check "features: after close, rbd export equals every write" bash -c "exported_is '$F' '$work/f.ref'"
check "features: after close, rbd object-map check passes" omap_check "$F"
rbd rm --no-progress "$F" >/dev/null 2>&1

# ------------------------------------------------------------ kill -9 during a request
# The owner killed at a random point of `rbd snap create` and of `rbd snap rm`: rbd ends
# (never hangs: we did it, or librbd, once our dead watch is gone, breaks our lock and does
# it itself, or it fails), and after the next serve, whatever happened: every snapshot
# that exists holds exactly the writes acknowledged before it, the head every write,
# and after a clean close the head's map checks, as does every snapshot map not flagged
# invalid. OWNER_KILL_ROUNDS rounds (default 1; each costs a minute or two of watch
# timeouts).
K=ownerk-$$
rbd create --size $((SIZE / MB))M "$K"
truncate -s "$SIZE" "$work/k.ref"
kserve() { start_serve "$work/kserve.log" 120 "${1:-$K}"; }
snaps_of() { rbd snap ls "$1" --format json | jq -r '.[].name' | tr '\n' ' '; }
# kill_during NAME LOG IMAGE RBD-ARGS...: `rbd RBD-ARGS` in the background, the owner
# killed at a random point of it (up to 0.6 s in), then: rbd must end (not hang), and the
# image is served again. Once rbd ended, the dead daemon is blocklisted by hand if its watch
# is still there (drop_dead_watch: the reopen's wait for it is e2e.sh's and fencing.sh's
# business), so the next serve need not wait it out. RBD_RC holds rbd's exit status.
kill_during() {
  local name=$1 log=$2 img=$3; shift 3
  timeout 300 rbd "$@" >"$log" 2>&1 &
  local rpid=$!
  sleep "$(awk -v x=$RANDOM 'BEGIN { printf "%.2f", x / 32768 * 0.6 }')"
  kill9 "$SERVE_PID"; rm -f "$sock"
  wait "$rpid"; RBD_RC=$?
  check "$name ends after the owner is killed (rc $RBD_RC, not a hang)" test "$RBD_RC" != 124
  drop_dead_watch "$img" || fail "$name: drop the dead owner's watch"
  kserve "$img" || { fail "$name: serve after the kill" "$(tail -3 "$work/kserve.log")"; return 1; }
}
for r in $(seq 1 "${OWNER_KILL_ROUNDS:-1}"); do
  kserve || { fail "kill round $r: serve" "$(tail -3 "$work/kserve.log")"; break; }
  check "kill round $r: writes acknowledged" put "$K" "$work/k.ref" $((100 + r)) $(( (r % 6) * 4 * MB )) $((8 * MB))
  # A snapshot taken through the owner as usual, removed below while the owner is killed.
  cp "$work/k.ref" "$work/k.ref.pre$r"
  check "kill round $r: rbd snap create pre$r" "${RBD[@]}" snap create "$K@pre$r"
  check "kill round $r: writes after it" put "$K" "$work/k.ref" $((300 + r)) $(( ((r + 1) % 6) * 4 * MB )) $((4 * MB))
  cp "$work/k.ref" "$work/k.ref.k$r"
  kill_during "kill round $r: rbd snap create" "$work/kc-$r.log" "$K" snap create "$K@k$r" || break
  if [[ " $(snaps_of "$K") " == *" k$r "* ]]; then
    check "kill round $r: snapshot k$r exists and holds exactly the writes before it" \
      bash -c "exported_is '$K@k$r' '$work/k.ref.k$r'"
  else
    pass "kill round $r: snapshot k$r was not taken (rbd: $(tail -1 "$work/kc-$r.log" | cut -c1-80))"
  fi
  check "kill round $r: the head holds every write" bash -c "exported_is '$K' '$work/k.ref'"
  check "kill round $r: more writes after the restart" put "$K" "$work/k.ref" $((200 + r)) $(( ((r + 3) % 6) * 4 * MB )) $((4 * MB))
  victim=pre$r
  if [[ " $(snaps_of "$K") " == *" $victim "* ]]; then
    kill_during "kill round $r: rbd snap rm" "$work/kr-$r.log" "$K" snap rm --no-progress "$K@$victim" || break
  fi
  for n in $(snaps_of "$K"); do
    check "kill round $r: snapshot $n still exact" bash -c "exported_is '$K@$n' '$work/k.ref.$n'"
  done
  check "kill round $r: the head still holds every write" bash -c "exported_is '$K' '$work/k.ref'"
  check_unserve "kill round $r: clean close after the kills"
  check "kill round $r: after close, rbd object-map check of the head passes, flags clear" bash -c \
    "rbd object-map check '$K' >/dev/null 2>&1 && [ \"\$(rbd info '$K' --format json | jq -r '.flags | length')\" = 0 ]"
  for n in $(snaps_of "$K"); do
    if [ "$(rbd info "$K@$n" --format json | jq -r '.flags | length')" = 0 ]; then
      check "kill round $r: snapshot $n's map (trusted: flags clear) checks" omap_check "$K@$n"
    fi
  done
done
rbd snap purge --no-progress "$K" >/dev/null 2>&1
rbd rm --no-progress "$K" >/dev/null 2>&1

# The owner killed during `rbd flatten` of a served clone, then during `rbd object-map
# rebuild`: whatever was done, the clone reads parent + writes, a flatten that rbd reports
# done left no parent, one not done is finished by the next owner, and the maps check.
rbd snap create "$P@basek" >/dev/null 2>&1
rbd snap protect "$P@basek"
KC=ownerc-k-$$
rbd clone "$P@basek" "$KC"
cp "$work/p.raw" "$work/kc.ref"
if kserve "$KC"; then
  check "kill during flatten: writes to the clone" put "$KC" "$work/kc.ref" 11 $((5 * MB)) $((3 * MB))
  if kill_during "kill during flatten: rbd flatten" "$work/kf.log" "$KC" flatten --no-progress "$KC"; then
    check "kill during flatten: the clone reads parent + writes" bash -c "exported_is '$KC' '$work/kc.ref'"
    if [ "$RBD_RC" = 0 ]; then
      check "kill during flatten: rbd said done, and the clone has no parent" bash -c \
        "! rbd info '$KC' --format json | jq -e .parent >/dev/null"
    elif rbd info "$KC" --format json | jq -e .parent >/dev/null; then
      check "kill during flatten: rbd flatten again, through the new owner" \
        "${RBD[@]}" flatten --no-progress "$KC"
    fi
    check "kill during flatten: after it, the clone reads parent + writes" bash -c "exported_is '$KC' '$work/kc.ref'"
    check "kill during flatten: more writes" put "$KC" "$work/kc.ref" 12 $((1 * MB)) $((2 * MB))
    if kill_during "kill during object-map rebuild: rbd object-map rebuild" "$work/kb.log" "$KC" \
      object-map rebuild --no-progress "$KC"; then
      check "kill during object-map rebuild: the image reads every write" bash -c "exported_is '$KC' '$work/kc.ref'"
      # The rest of the owner's requests, each killed once: zeros to sparsify first.
      check "kill during sparsify: zeros written as data (object 4)" $PY -c "
import nbd
h = nbd.NBD(); h.connect_uri('$(uri "$KC")')
h.pwrite(bytes(4 << 20), 16 << 20); h.shutdown()
with open('$work/kc.ref', 'r+b') as f:
    f.seek(16 << 20); f.write(bytes(4 << 20))"
      kill_during "kill during sparsify: rbd sparsify" "$work/ks.log" "$KC" sparsify --no-progress "$KC" &&
        check "kill during sparsify: the image reads every write" bash -c "exported_is '$KC' '$work/kc.ref'"
      kill_during "kill during feature disable: rbd feature disable fast-diff" "$work/kx.log" "$KC" \
        feature disable "$KC" fast-diff &&
        check "kill during feature disable: the image reads every write" bash -c "exported_is '$KC' '$work/kc.ref'"
      kill_during "kill during resize: rbd resize to 48 MiB" "$work/kz.log" "$KC" \
        resize --no-progress --size 48M "$KC" &&
        check "kill during resize: the size is the old or the new one, the bytes kept" bash -c \
          "s=\$(rbd info '$KC' --format json | jq -r .size); { [ \$s = $SIZE ] || [ \$s = $((48 * MB)) ]; } && [ \"\$(rbd export --no-progress '$KC' - 2>/dev/null | head -c $SIZE | sha)\" = \"\$(sha <'$work/kc.ref')\" ]"
      check_unserve "kill during the owner's requests: clean close"
      # Disabling fast-diff turns object-map off too (librbd's owner and ours), whoever
      # finished it once our owner was killed.
      # (On failure: the flags and features left, and the daemon's last lines.)
      check "kill during flatten, rebuild, sparsify, feature change, resize: after close, flags clear, the map (if still on) checks" bash -c \
        "[ \"\$(rbd info '$KC' --format json | jq -r '.flags | length')\" = 0 ] && { ! rbd info '$KC' --format json | jq -e '.features | index(\"object-map\")' >/dev/null || omap_check '$KC'; } ||
         { rbd info '$KC' --format json | jq -c '{flags, features}'; grep -v ' DEBUG ' '$work/kserve.log' | tail -3; false; }"
    fi
  fi
else
  fail "kill during flatten: serve" "$(tail -3 "$work/kserve.log")"
fi
rbd rm --no-progress "$KC" >/dev/null 2>&1
rbd snap unprotect "$P@basek" >/dev/null 2>&1
rbd snap rm --no-progress "$P@basek" >/dev/null 2>&1

# rbd object-map rebuild of a served image without object-map: librbd's owner answers
# EINVAL and keeps its lock; so must we (an answer read as EOPNOTSUPP would make rbd take
# the lock and try itself, the lock then away from the daemon until its next write).
N=ownern-$$
rbd create --size 8M --image-feature layering,exclusive-lock "$N"
truncate -s $((8 * MB)) "$work/n.ref"
if serve "$N"; then
  check "no-map image: a write through NBD" put "$N" "$work/n.ref" 21 0 $((1 * MB))
  out=$(timeout 60 rbd object-map rebuild --no-progress "$N" 2>&1)
  rc=$?
  check "rbd object-map rebuild of a served image without object-map: EINVAL, as librbd's owner ($rc: $(tail -1 <<<"$out"))" \
    bash -c "[ $rc = 22 ] && [ \"\$(rbd lock ls --format json '$N' | jq length)\" = 1 ]"
  check_unserve "no-map image: clean close"
else
  fail "serve $N" "$(tail -3 "$work/serve.log")"
fi
rbd rm --no-progress "$N" >/dev/null 2>&1

# A librbd client holding the lock (python3-rbd, after a write): `rados-nbd rename` asks
# it, as `rbd rename` does, so its in-memory name follows: the second rename, which that
# client performs from the name it knows, works only if the first one went through it.
L=ownerl-$$
rbd create --size 8M "$L"
rm -f "$work/l.ready"
$PY -c "
import os, time, rados, rbd
c = rados.Rados(conffile='$CEPH_CONF'); c.connect(); io = c.open_ioctx('rbd')
img = rbd.Image(io, '$L'); img.write(b'x' * 4096, 0)
open('$work/l.ready', 'w').close()
while os.path.exists('$work/l.ready'): time.sleep(0.05)
img.write(b'y' * 4096, 4096)
img.close(); io.close(); c.shutdown()" &
LPID=$!
for _ in $(seq 1 300); do [ -e "$work/l.ready" ] && break; sleep 0.1; done
check "a librbd client holds the lock of $L" bash -c \
  "[ -e '$work/l.ready' ] && [ \"\$(rbd lock ls --format json '$L' | jq length)\" = 1 ]"
check "rados-nbd rename of an image a librbd client holds (asked of it)" \
  timeout 120 "${RN[@]}" rename "$L" "$L-r"
check "... rbd sees the new name, the lock still the librbd client's" bash -c \
  "rbd info '$L-r' >/dev/null && ! rbd info '$L' >/dev/null 2>&1 &&
   [ \"\$(rbd lock ls --format json '$L-r' | jq length)\" = 1 ]"
check "... rbd rename back, done by that client from the name it now knows" \
  "${RBD[@]}" rename "$L-r" "$L"
check "... rbd sees the first name again" bash -c "rbd info '$L' >/dev/null && ! rbd info '$L-r' >/dev/null 2>&1"
rm -f "$work/l.ready"
wait "$LPID"
check "... the librbd client wrote on after both renames and closed cleanly" test $? = 0
check "... rbd export has both its writes" bash -c \
  "[ \"\$(rbd export --no-progress '$L' - 2>/dev/null | head -c 8192 | sha)\" = \
     \"\$($PY -c 'import sys; sys.stdout.buffer.write(b\"x\" * 4096 + b\"y\" * 4096)' | sha)\" ]"
rbd rm --no-progress "$L" >/dev/null 2>&1

rbd snap purge --no-progress "$I" >/dev/null 2>&1
for i in "$I" "$C" "$C-2" "$P"; do rbd rm --no-progress "$i" >/dev/null 2>&1; done
check "test images removed" bash -c "! rbd ls | grep -q '^owner[cp]*-$$\$'"
undrop_watches
t_summary
