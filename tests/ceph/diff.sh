#!/usr/bin/env bash
# `rados-nbd diff` and `rados-nbd du` against librbd's `rbd diff --whole-object` and
# `rbd du` on the same images: writes (rbd bench and python3-rbd), discards, a shrink and
# a grow between `rbd snap create`s, then every (from-snapshot, end) pair compared
# byte for byte. Both compute from the object maps alone (fast-diff); a corrupt snapshot
# map and a head flagged invalid make rados-nbd rebuild those maps from the objects, with
# the same answer. Runs against $CEPH_CONF like e2e.sh (tests/ceph/run.sh starts the
# cluster); directly: CEPH_CONF=... tests/ceph/diff.sh after `tests/ceph/cluster.sh start`.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh" ceph-diff
same() { [ "$1" = "$2" ] || { echo "got '$2', expected '$1'"; return 1; }; }
img=diff-$$
snaps=(s1 s2 s3 s4)

librbd() { # librbd PYTHON-STATEMENTS: run with `im` open on $img and `rnd` seeded
  $PY -c "
import rados, rbd, random
rnd = random.Random($RANDOM)
c = rados.Rados(conffile='$CEPH_CONF'); c.connect()
io = c.open_ioctx('rbd')
with rbd.Image(io, '$img') as im:
    $1
io.close(); c.shutdown()"
}
# Random writes and discards of random sizes, some whole objects (1 MiB), some partial.
churn() {
  librbd "
    size = im.size()
    for _ in range($1):
        off = rnd.randrange(0, size, 4096)
        n = min(rnd.choice([4096, 65536, 1 << 20]), size - off)
        if rnd.random() < $2:
            im.discard(off & ~((1 << 20) - 1), 1 << 20)
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
# Every pair: from the beginning or from each snapshot, to each later snapshot or the head.
# `compare_all rbd` compares with rbd diff and keeps rbd's answers in $work/ref; `compare_all
# ref` compares with those: with a map untrusted, rbd no longer answers from maps (it reads
# the objects' snapshot sets and gives extents inside objects), but ours must not change.
mkdir -p "$work/ref"
compare_all() { # compare_all rbd|ref
  local from end n=0 bad=0 o t
  for from in "" "${snaps[@]}"; do
    for end in "${snaps[@]/#/$img@}" "$img"; do
      local args=(--whole-object --format json ${from:+--from-snap "$from"} "$end")
      local ref="$work/ref/${from:-start}-${end#*@}"
      if [ "$1" = rbd ]; then
        t=$(theirs "${args[@]}") || continue # from newer than end: rbd refuses (below)
        echo "$t" >"$ref"
      else
        [ -e "$ref" ] || continue
        t=$(cat "$ref")
      fi
      o=$(ours "${args[@]}")
      n=$((n + 1))
      [ "$o" = "$t" ] || { bad=$((bad + 1)); echo "  ${from:-start} -> $end: ours $o"; echo "  ${from:-start} -> $end: $1  $t"; }
    done
  done
  echo "  ($n pairs compared with $1, $bad differ)"
  [ "$bad" = 0 ] && [ "$n" = 19 ]
}
check "diff --whole-object --format json equals rbd's for every (from, end) pair" compare_all rbd
check "the history is not trivial: some diffs list zero extents" bash -c \
  "rbd diff --whole-object --from-snap s1 $img --format json | jq -e 'any(.[]; .exists == \"false\")' >/dev/null"
check "the history is not trivial: s4 (nothing written since s3) differs from s3 by nothing" same "[]" \
  "$(ours --from-snap s3 --format json "$img@s4")"
check "plain output equals rbd diff --whole-object's" same \
  "$(theirs --whole-object --from-snap s2 "$img")" "$(ours --from-snap s2 "$img")"
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
  for a in "" "--from-snap s1" "--from-snap s2" "--merge-snapshots" "--from-snap s1 --merge-snapshots"; do
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
check "du --from-snap / --merge-snapshots, plain and json: rbd du's output byte for byte" du_options
check_fails "du --from-snap newer than the snapshot is refused" "${RN[@]}" du --from-snap s3 "$img@s2"
check "du: some snapshot uses less than it provisions (the deltas are real)" bash -c \
  "$RNQ du --format json $img | jq -e 'any(.images[]; .used_size < .provisioned_size and has(\"snapshot\"))' >/dev/null"

# An untrusted map is rebuilt from the objects, with the same answer: s2's map corrupt,
# then also the head flagged invalid (as after a crash of a writer).
id=$(rbd info "$img" --format json | jq -r .id)
s2id=$(rbd snap ls "$img" --format json | jq -r '.[] | select(.name == "s2") | .id')
s2map=$(printf 'rbd_object_map.%s.%016x' "$id" "$s2id")
rados -p rbd get "$s2map" "$work/s2map"
printf 'garbage' | rados -p rbd put "$s2map" -
: >"$work/diff.err"
check "a corrupt s2 map: every pair's diff is unchanged" compare_all ref
check "... and rados-nbd said it rebuilt s2's map" grep -q "rebuilding object map of .*@s2.*corrupt" "$work/diff.err"
# librbd, opening s2 and finding its map corrupt, flags the snapshot invalid; with the good
# map bytes back, the snapshot's own flags must still keep rados-nbd from trusting them.
rbd info "$img@s2" >/dev/null 2>&1
rados -p rbd put "$s2map" "$work/s2map"
check "setup: librbd flagged s2's map invalid" bash -c \
  "rbd info $img@s2 --format json | jq -e '.flags | index(\"fast diff invalid\")' >/dev/null"
: >"$work/diff.err"
check "s2 flagged invalid (its map intact): every pair's diff is unchanged" compare_all ref
check "... and rados-nbd rebuilt s2's map for its flags" \
  grep -q "rebuilding object map of .*@s2 .*flags it invalid" "$work/diff.err"
rbd object-map rebuild "$img@s2" >/dev/null 2>&1
: >"$work/diff.err"
check "s2 rebuilt by rbd: trusted again, unchanged diffs" compare_all ref
check "... with no map rebuilt" test ! -s "$work/diff.err"
printf '\x01\x00\x00\x00\x00\x00\x00\x00' >"$work/flags"
rados -p rbd setomapval "rbd_header.$id" flags --input-file "$work/flags"
check "setup: the head's map is flagged invalid" bash -c \
  "rbd info $img --format json | jq -e '.flags | index(\"object map invalid\")' >/dev/null"
: >"$work/diff.err"
check "a head map flagged invalid: every pair's diff is unchanged" compare_all ref
check "... and rados-nbd said it rebuilt the head's map" grep -q "rebuilding object map of rbd/$img (.*invalid" "$work/diff.err"
rbd object-map rebuild "$img" >/dev/null 2>&1

# Without fast-diff the maps cannot tell what changed since a snapshot: a diff from a
# snapshot is refused in one line; from the beginning it is what exists, as rbd says.
img2=$img-nofd
rbd create --size 8M --object-size 1M "$img2"
rbd feature disable "$img2" fast-diff
img=$img2 churn 6 0
rbd snap create "$img2@a" >/dev/null 2>&1
check "no fast-diff: diff from the beginning equals rbd's" same \
  "$(theirs --whole-object --format json "$img2")" "$(ours --format json "$img2")"
check_fails "no fast-diff: diff --from-snap is refused" "${RN[@]}" diff --from-snap a "$img2"
check "... naming fast-diff, in one line" bash -c \
  "o=\$($RNQ diff --from-snap a $img2 2>&1); [ \$(wc -l <<<\"\$o\") = 1 ] && grep -q fast-diff <<<\"\$o\""

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
rbd snap create "$c1@p" >/dev/null 2>&1
rbd clone "$c1@p" "$c2" --object-size 2M --stripe-unit 2M --stripe-count 1 --rbd-default-clone-format 2
rbd snap create "$c2@early" >/dev/null 2>&1
img=$c2 churn 4 0.3
clone_diffs() {
  local i bad=0
  for i in "$c1" "$c2" "$c2@early"; do
    [ "$(theirs --whole-object --format json "$i")" = "$(ours --format json "$i")" ] ||
      { bad=1; echo "  $i: ours $(ours --format json "$i")"; echo "  $i: rbd  $(theirs --whole-object --format json "$i")"; }
  done
  [ "$bad" = 0 ]
}
check "clones: diff from the beginning includes the ancestors' data exactly as rbd's" clone_diffs
check "clones: the grandchild's diff lists more than its own objects (the test is not trivial)" bash -c \
  "[ \$(rbd diff --whole-object --format json $c2 | jq length) -gt \$(rbd du --format json $c2 | jq '[.images[] | select(.name == \"$c2\" and (has(\"snapshot\") | not))][0].used_size / 2097152') ]"
check "clones: --from-snap lists only the clone's own changes, as rbd's" same \
  "$(theirs --whole-object --format json --from-snap early "$c2")" "$(ours --format json --from-snap early "$c2")"
rbd snap purge "$c2" >/dev/null 2>&1; rbd rm "$c2" >/dev/null 2>&1
rbd snap purge "$c1" >/dev/null 2>&1; rbd rm "$c1" >/dev/null 2>&1
rbd snap purge "$c0" >/dev/null 2>&1; rbd rm "$c0" >/dev/null 2>&1

rbd snap purge "$img" >/dev/null 2>&1
rbd snap purge "$img2" >/dev/null 2>&1
check "cleanup: rados-nbd rm" "${RN[@]}" rm "$img"
check "cleanup: rados-nbd rm (no fast-diff)" "${RN[@]}" rm "$img2"
t_summary
