#!/usr/bin/env bash
# `rados-nbd diff` and `rados-nbd du` against librbd's `rbd diff` and `rbd du` on the same
# images: writes (rbd bench and python3-rbd), discards (whole objects, partial, object
# tails), a shrink and a grow between `rbd snap create`s, then every (from-snapshot, end)
# pair compared byte for byte, with --whole-object (from the object maps alone, fast-diff)
# and without (exact extents, from the objects' snapshot sets); `du` and `du --exact`
# likewise. A corrupt snapshot map and a head flagged invalid make rados-nbd rebuild those
# maps from the objects, with the same answer. Runs against $CEPH_CONF like e2e.sh (tests/ceph/run.sh starts the
# cluster); directly: CEPH_CONF=... tests/ceph/diff.sh after `tests/ceph/cluster.sh start`.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh" ceph-diff
same() { [ "$1" = "$2" ] || { echo "got '$2', expected '$1'"; return 1; }; }
img=diff-$$
snaps=(s1 s2 s3 s4)

# The history is generated from DIFF_SH_SEED (each librbd call its own stream of it), so a
# run is repeatable and the "history is not trivial" checks below hold by construction
# (with a seed from $RANDOM they failed now and then: a random history may be trivial).
calls=0
librbd() { # librbd PYTHON-STATEMENTS: run with `im` open on $img and `rnd` seeded
  calls=$((calls + 1))
  $PY -c "
import rados, rbd, random
rnd = random.Random('${DIFF_SH_SEED:-2026}-$calls')
c = rados.Rados(conffile='$CEPH_CONF'); c.connect()
io = c.open_ioctx('rbd')
with rbd.Image(io, '$img') as im:
    $1
io.close(); c.shutdown()"
}
# Random writes and discards of random sizes: discards of whole objects (1 MiB), of an
# object's tail (a truncate) and inside one (zeros); writes of 512 B to 1 MiB, unaligned
# too, so objects of every size and overlaps of every shape occur.
churn() { # churn N DISCARD-SHARE [LIMIT]: N requests below LIMIT (default: the whole image)
  librbd "
    size = min(im.size(), ${3:-1 << 62})
    for _ in range($1):
        off = rnd.randrange(0, size, rnd.choice([512, 4096, 65536]))
        n = min(rnd.choice([512, 4096, 65536, 1 << 20]), size - off)
        r = rnd.random()
        obj = off & ~((1 << 20) - 1)
        if r < $2 * 0.5:
            im.discard(obj, 1 << 20)
        elif r < $2 * 0.75:
            im.discard(off, obj + (1 << 20) - off)
        elif r < $2:
            im.discard(off, n)
        else:
            im.write(bytes([rnd.randrange(1, 256)]) * n, off)"
}

# 1 MiB objects: 24 of them, so a few dozen requests leave some untouched, some written,
# some removed in each interval.
rbd create --size 24M --object-size 1M "$img"
rbd bench --io-type write --io-pattern rand --io-size 64K --io-total 4M "$img" >/dev/null 2>&1
rbd snap create "$img@s1" >/dev/null 2>&1
churn 12 0.4
rbd snap create "$img@s2" >/dev/null 2>&1
# A shrink then a grow: the objects past 14 MiB are gone, the image is larger than before.
rbd resize --allow-shrink --size 14M "$img" >/dev/null 2>&1
rbd resize --size 30M "$img" >/dev/null 2>&1
churn 10 0.3
rbd snap create "$img@s3" >/dev/null 2>&1
rbd snap create "$img@s4" >/dev/null 2>&1 # nothing written since s3
churn 16 0.5
check "setup: librbd's map is valid and flags clear" bash -c \
  "rbd object-map check $img >/dev/null 2>&1 && [ -z \"\$(rbd info $img --format json | jq -r '.flags | join(\",\")')\" ]"

ours() { "${RN[@]}" diff "$@" 2>>"$work/diff.err"; }
theirs() { rbd diff "$@" 2>/dev/null; }
# Every pair: from the beginning or from each snapshot, to each later snapshot or the
# head, with and without --whole-object, compared with rbd diff.
compare_all() {
  local from end w n=0 bad=0 o t
  for w in --whole-object ""; do
    for from in "" "${snaps[@]}"; do
      for end in "${snaps[@]/#/$img@}" "$img"; do
        local args=($w --format json ${from:+--from-snap "$from"} "$end")
        t=$(theirs "${args[@]}") || continue # from newer than end: rbd refuses (below)
        o=$(ours "${args[@]}")
        n=$((n + 1))
        [ "$o" = "$t" ] || { bad=$((bad + 1)); echo "  ${w:-exact} ${from:-start} -> $end: ours $o"; echo "  ${w:-exact} ${from:-start} -> $end: rbd  $t"; }
      done
    done
  done
  echo "  ($n pairs compared with rbd, $bad differ)"
  [ "$bad" = 0 ] && [ "$n" = 38 ]
}
check "diff [--whole-object] --format json equals rbd's for every (from, end) pair" compare_all
check "the history is not trivial: exact extents lie inside objects, some not at 0" bash -c \
  "rbd diff --from-snap s2 $img --format json | jq -e 'any(.[]; .offset % 1048576 != 0) and any(.[]; .length % 4096 != 0)' >/dev/null"
check "the history is not trivial: some diffs list zero extents" bash -c \
  "rbd diff --whole-object --from-snap s1 $img --format json | jq -e 'any(.[]; .exists == \"false\")' >/dev/null"
check "the history is not trivial: s4 (nothing written since s3) differs from s3 by nothing" same "[]" \
  "$(ours --from-snap s3 --format json "$img@s4")"
check "plain output equals rbd diff --whole-object's" same \
  "$(theirs --whole-object --from-snap s2 "$img")" "$(ours --whole-object --from-snap s2 "$img")"
check "plain output equals rbd diff's (exact)" same \
  "$(theirs --from-snap s1 "$img@s3")" "$(ours --from-snap s1 "$img@s3")"
check "diff read no data object: no map was rebuilt" test ! -s "$work/diff.err"
check_fails "--from-snap newer than the end is refused" "${RN[@]}" diff --from-snap s3 "$img@s2"
check "... in one line" bash -c "[ \$($RNQ diff --from-snap s3 $img@s2 2>&1 | wc -l) = 1 ]"
check_fails "an unknown --from-snap is refused" "${RN[@]}" diff --from-snap nope "$img"

# du: a line per snapshot (what it holds that the one before does not) and the head.
du_images() { jq -cS '.images'; }
check "du --format json: every snapshot's and the head's used/provisioned equal rbd du's" same \
  "$(rbd du --format json "$img" 2>/dev/null | du_images)" \
  "$("${RN[@]}" du --format json "$img" | du_images)"
check "du IMAGE@s2 --format json: s1 and s2 only, equal to rbd du's" same \
  "$(rbd du --format json "$img@s2" 2>/dev/null | du_images)" \
  "$("${RN[@]}" du --format json "$img@s2" | du_images)"
check "du plain output equals rbd du's" same "$(rbd du "$img" 2>/dev/null)" "$("${RN[@]}" du "$img")"
du_options() { # every option set, both formats, the head and a snapshot: byte for byte
  local a f i bad=0 n=0
  for a in "" "--from-snap s1" "--from-snap s2" "--merge-snapshots" "--from-snap s1 --merge-snapshots" \
    "--exact" "--exact --from-snap s2" "--exact --merge-snapshots"; do
    for f in plain json; do
      for i in "$img" "$img@s2" "$img@s3"; do
        n=$((n + 1))
        # shellcheck disable=SC2086
        [ "$(rbd du $a --format $f "$i" 2>/dev/null)" = "$("${RN[@]}" du $a --format $f "$i" 2>>"$work/diff.err")" ] ||
          { bad=$((bad + 1)); echo "  du $a --format $f $i differs"; }
      done
    done
  done
  echo "  ($n combinations, $bad differ)"
  [ "$bad" = 0 ]
}
check "du [--exact] --from-snap / --merge-snapshots, plain and json: rbd du's output byte for byte" du_options
check "du --exact differs from du (the test is not trivial)" bash -c \
  "[ \"\$($RNQ du --exact --format json $img)\" != \"\$($RNQ du --format json $img)\" ]"
check_fails "du --from-snap newer than the snapshot is refused" "${RN[@]}" du --from-snap s3 "$img@s2"
check "du: some snapshot uses less than it provisions (the deltas are real)" bash -c \
  "$RNQ du --format json $img | jq -e 'any(.images[]; .used_size < .provisioned_size and has(\"snapshot\"))' >/dev/null"

# An untrusted map: librbd answers every diff that would read it from the objects' snap
# sets instead (--whole-object too, where a truncated object's tail is then "zero"), and
# so must we; which objects to ask, we take from the map rebuilt from the objects.
# s2's map corrupt, then flagged invalid, then the head flagged invalid (as after a
# crash of a writer). Each time also du, which goes the same way.
id=$(rbd info "$img" --format json | jq -r .id)
s2id=$(rbd snap ls "$img" --format json | jq -r '.[] | select(.name == "s2") | .id')
s2map=$(printf 'rbd_object_map.%s.%016x' "$id" "$s2id")
rados -p rbd get "$s2map" "$work/s2map"
printf 'garbage' | rados -p rbd put "$s2map" -
: >"$work/diff.err"
check "a corrupt s2 map: every pair's diff equals rbd's" compare_all
check "... du too" du_options
# (rbd, opening IMAGE@s2 for the first pair, may already have flagged it invalid.)
check "... and rados-nbd said it rebuilt s2's map" grep -qE "rebuilding object map of .*@s2 .*(corrupt|flags it invalid)" "$work/diff.err"
# librbd, opening s2 and finding its map corrupt, flags the snapshot invalid; with the good
# map bytes back, the snapshot's own flags must still keep rados-nbd from trusting them.
rbd info "$img@s2" >/dev/null 2>&1
rados -p rbd put "$s2map" "$work/s2map"
check "setup: librbd flagged s2's map invalid" bash -c \
  "rbd info $img@s2 --format json | jq -e '.flags | index(\"fast diff invalid\")' >/dev/null"
: >"$work/diff.err"
check "s2 flagged invalid (its map intact): every pair's diff equals rbd's" compare_all
check "... du too" du_options
check "... and du warns of it as rbd du does, word for word" bash -c \
  "w=\$(rbd du $img 2>&1 >/dev/null | grep ^warning); [ -n \"\$w\" ] && [ \"\$w\" = \"\$($RNQ du $img 2>&1 >/dev/null | grep ^warning)\" ]"
check "... and rados-nbd rebuilt s2's map for its flags" \
  grep -q "rebuilding object map of .*@s2 .*flags it invalid" "$work/diff.err"
rbd object-map rebuild "$img@s2" >/dev/null 2>&1
: >"$work/diff.err"
check "s2 rebuilt by rbd: trusted again, every pair's diff equals rbd's" compare_all
check "... with no map rebuilt" test ! -s "$work/diff.err"
printf '\x01\x00\x00\x00\x00\x00\x00\x00' >"$work/flags"
rados -p rbd setomapval "rbd_header.$id" flags --input-file "$work/flags"
check "setup: the head's map is flagged invalid" bash -c \
  "rbd info $img --format json | jq -e '.flags | index(\"object map invalid\")' >/dev/null"
: >"$work/diff.err"
check "a head map flagged invalid: every pair's diff equals rbd's" compare_all
check "... du too" du_options
check "... and rados-nbd said it rebuilt the head's map" grep -q "rebuilding object map of rbd/$img (.*invalid" "$work/diff.err"
rbd object-map rebuild "$img" >/dev/null 2>&1

# Without fast-diff the maps cannot tell what changed since a snapshot: like librbd,
# every diff and du then reads the snapshot sets of the objects the maps say exist.
img2=$img-nofd
rbd create --size 8M --object-size 1M "$img2"
rbd feature disable "$img2" fast-diff
img=$img2 churn 6 0
rbd snap create "$img2@a" >/dev/null 2>&1
img=$img2 churn 6 0.5
rbd snap create "$img2@b" >/dev/null 2>&1
img=$img2 churn 6 0.5
nofd_all() {
  local w a e bad=0
  for w in --whole-object ""; do
    for a in "" "--from-snap a" "--from-snap b"; do
      for e in "$img2@b" "$img2"; do
        # shellcheck disable=SC2086
        [ "$(theirs $w $a --format json "$e")" = "$(ours $w $a --format json "$e")" ] ||
          { bad=1; echo "  diff $w $a $e: ours $(ours $w $a --format json "$e")"; echo "  rbd  $(theirs $w $a --format json "$e")"; }
      done
    done
  done
  for a in "" "--exact" "--from-snap a"; do
    # shellcheck disable=SC2086
    [ "$(rbd du $a --format json "$img2" 2>/dev/null)" = "$("${RN[@]}" du $a --format json "$img2")" ] ||
      { bad=1; echo "  du $a differs"; }
  done
  [ "$bad" = 0 ]
}
check "no fast-diff: diff [--whole-object] [--from-snap] and du [--exact] equal rbd's" nofd_all
warnings() { "$@" 2>&1 >/dev/null | grep '^warning'; }
check "no fast-diff: du warns as rbd du does, word for word" same \
  "$(warnings rbd du "$img2")" "$(warnings "${RN[@]}" du "$img2")"
check "... and the diffs are not empty" bash -c \
  "[ \$($RNQ diff --from-snap a --format json $img2 | jq length) -gt 0 ]"

# Clones: from the beginning, an object the clone does not hold shows its ancestors' data
# (cut to the child's objects and to each overlap), as librbd's DiffIterate reports it.
# A chain of three with 4, 1 and 2 MiB objects; the middle one shrunk below its parent's
# size and grown again (the overlap stays shrunk), the grandchild snapshotted.
c0=$img-c0 c1=$img-c1 c2=$img-c2
rbd create --size 24M --object-size 4M "$c0"
img=$c0 churn 5 0
rbd snap create "$c0@p" >/dev/null 2>&1
rbd clone "$c0@p" "$c1" --object-size 1M --stripe-unit 1M --stripe-count 1 --rbd-default-clone-format 2
img=$c1 churn 6 0.3
rbd resize --allow-shrink --size 13M "$c1" >/dev/null 2>&1
rbd resize --size 20M "$c1" >/dev/null 2>&1
# Data at 16 MiB that only the ancestors hold: the grandchild writes below 10 MiB.
img=$c1 librbd "im.write(b'\\x5a' * 65536, 16 << 20)"
rbd snap create "$c1@p" >/dev/null 2>&1
rbd clone "$c1@p" "$c2" --object-size 2M --stripe-unit 2M --stripe-count 1 --rbd-default-clone-format 2
rbd snap create "$c2@early" >/dev/null 2>&1
img=$c2 churn 4 0.3 "10 << 20"
clone_diffs() {
  local i w bad=0
  for w in --whole-object ""; do
    for i in "$c1" "$c2" "$c2@early"; do
      # shellcheck disable=SC2086
      [ "$(theirs $w --format json "$i")" = "$(ours $w --format json "$i")" ] ||
        { bad=1; echo "  $w $i: ours $(ours $w --format json "$i")"; echo "  $w $i: rbd  $(theirs $w --format json "$i")"; }
    done
  done
  [ "$bad" = 0 ]
}
check "clones: diff [--whole-object] from the beginning includes the ancestors' data exactly as rbd's" clone_diffs
check "clones: the grandchild's diff lists its ancestors' data (the test is not trivial)" bash -c \
  "rbd diff --format json $c2 | jq -e 'any(.[]; .offset == $((16 << 20)) and .length == 65536)' >/dev/null"
check "clones: --from-snap lists only the clone's own changes, as rbd's" same \
  "$(theirs --whole-object --format json --from-snap early "$c2")" "$(ours --whole-object --format json --from-snap early "$c2")"
check "clones: ... also exact" same \
  "$(theirs --format json --from-snap early "$c2")" "$(ours --format json --from-snap early "$c2")"
rbd snap purge "$c2" >/dev/null 2>&1; rbd rm "$c2" >/dev/null 2>&1
rbd snap purge "$c1" >/dev/null 2>&1; rbd rm "$c1" >/dev/null 2>&1
rbd snap purge "$c0" >/dev/null 2>&1; rbd rm "$c0" >/dev/null 2>&1

# du without an image: every image of a pool (here a namespace of its own, so the suites
# running beside this one do not change the listing), with totals, as rbd du.
ns=du-$$
rbd namespace create "rbd/$ns"
rbd create --size 12M --object-size 1M "rbd/$ns/b"
rbd create --size 6M --object-size 1M "rbd/$ns/a"
rbd bench --io-type write --io-pattern rand --io-size 4K --io-total 2M "rbd/$ns/a" >/dev/null 2>&1
rbd snap create "rbd/$ns/a@s" >/dev/null 2>&1
rbd bench --io-type write --io-pattern seq --io-size 64K --io-total 3M "rbd/$ns/b" >/dev/null 2>&1
pool_du() {
  local a f bad=0
  for a in "" "--merge-snapshots" "--exact"; do
    for f in plain json; do
      # shellcheck disable=SC2086
      [ "$(rbd du --pool rbd --namespace "$ns" $a --format $f 2>/dev/null)" = "$("${RN[@]}" du --pool "rbd/$ns" $a --format $f 2>/dev/null)" ] ||
        { bad=1; echo "  du --pool $a --format $f differs:"; "${RN[@]}" du --pool "rbd/$ns" $a --format $f; }
    done
  done
  [ "$bad" = 0 ]
}
check "du of a whole pool (namespace), plain and json, --merge-snapshots, --exact: rbd du's output" pool_du
check "... which lists both images and the snapshot, with totals" bash -c \
  "$RNQ du --pool rbd/$ns --format json | jq -e '(.images | length) == 3 and .total_provisioned_size == $((18 << 20))' >/dev/null"
check_fails "du --pool with an image is refused" "${RN[@]}" du --pool rbd "rbd/$ns/a"
for i in a b; do rbd snap purge "rbd/$ns/$i" >/dev/null 2>&1; rbd rm "rbd/$ns/$i" >/dev/null 2>&1; done
rbd namespace remove "rbd/$ns"

rbd snap purge "$img" >/dev/null 2>&1
rbd snap purge "$img2" >/dev/null 2>&1
check "cleanup: rados-nbd rm" "${RN[@]}" rm "$img"
check "cleanup: rados-nbd rm (no fast-diff)" "${RN[@]}" rm "$img2"
t_summary
