#!/usr/bin/env bash
# Clones against the cluster named by $CEPH_CONF, with Ceph's tools as the oracle:
#  - chains of depth 1, 2 and 8 made by `rbd clone` (formats 2 and 1), each level written
#    through rados-nbd (partial writes into parent-backed objects, discards of them),
#    open in rados-nbd (`info` names the parent and overlap as `rbd info` does), and after
#    close `rbd export` equals a model of the bytes, `rbd object-map check` passes, the
#    parents' snapshots are unchanged and `rbd flatten` keeps the bytes;
#  - a clone made by `rados-nbd clone` (formats 2 and 1) opens in `rbd info`, `rbd children`
#    and `rbd export` as its parent snapshot, and serves writes past the overlap;
#  - deep copy-ups into clones with a snapshot (rados-nbd flatten, first writes while
#    served): the snapshot's object map says the object exists, so after flatten
#    `rbd export CHILD@SNAP` is the parent snapshot's bytes and object-map checks pass.
#  - shrinking a clone with a snapshot (rados-nbd resize, rbd resize asking the owner)
#    leaves what librbd's shrink leaves (rbd du, rbd diff --whole-object), so a deep
#    flatten afterwards keeps the snapshot's bytes.
#  - copy-ups make objects as long as librbd's: twin children of generated depth-2 chains,
#    one written by librbd, one through rados-nbd, compared object by object (`rados stat`).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh" clones

# nbd_ops URI MODEL OP...: applies each OP through NBD and to the MODEL file alike.
# OP: w:OFF:LEN (random bytes), t:OFF:LEN (trim: reads as zeros afterwards), z:OFF:LEN.
cat >"$work/ops.py" <<'PYEOF'
import os, sys, nbd
uri, model = sys.argv[1], sys.argv[2]
h = nbd.NBD(); h.connect_uri(uri)
with open(model, 'r+b') as m:
    for op in sys.argv[3:]:
        k, off, n = op.split(':'); off, n = int(off), int(n)
        if k == 'w':
            d = os.urandom(n); h.pwrite(d, off)
        elif k == 't':
            h.trim(n, off); d = bytes(n)
        elif k == 'z':
            h.zero(n, off); d = bytes(n)
        else:
            raise SystemExit('bad op ' + op)
        m.seek(off); m.write(d)
h.flush(); h.shutdown()
PYEOF
export -f sha
nbd_ops() { "$PY" "$work/ops.py" "$@"; }
same_export() { # same_export SPEC FILE
  [ "$(rbd export "$1" - 2>/dev/null | sha)" = "$(sha <"$2")" ]
}
export -f same_export
# info_like_rbd IMAGE: the parent and overlap lines, and the json parent object, as rbd's.
info_like_rbd() {
  rbd info "$1" | grep -q '^.parent: ' &&
  [ "$("${RN[@]}" info "$1" 2>/dev/null | grep -E '^.(parent|overlap):')" = \
    "$(rbd info "$1" | grep -E '^.(parent|overlap):')" ] &&
  [ "$("${RN[@]}" info --format json "$1" 2>/dev/null | jq -cS .parent)" = \
    "$(rbd info --format json "$1" | jq -cS .parent)" ]
}

# The base: 32 MiB with data in some objects and holes elsewhere (4 MiB objects).
SIZE=$((32 * MB))
truncate -s $SIZE "$work/base.raw"
for at in 0 5 9 20; do
  head -c $((2 * MB)) /dev/urandom | dd of="$work/base.raw" bs=1M seek=$at conv=notrunc status=none
done
rbd import --image-feature layering,exclusive-lock,object-map,fast-diff,deep-flatten \
  "$work/base.raw" cbase >/dev/null 2>&1
rbd snap create cbase@s >/dev/null 2>&1
rbd snap protect cbase@s
base_sha=$(sha <"$work/base.raw")

# chain FORMAT DEPTH PREFIX: PREFIX1 .. PREFIXDEPTH, each a clone of the previous at @s,
# each level changed through rados-nbd first; the model of level k is $work/PREFIXk.raw.
chain() {
  local fmt=$1 depth=$2 p=$3 k parent=cbase@s prev=$work/base.raw
  for k in $(seq 1 "$depth"); do
    rbd clone --rbd-default-clone-format "$fmt" "$parent" "$p$k" || return 1
    cp "$prev" "$work/$p$k.raw"
    serve "$p$k" || return 1
    # A partial write into a parent-backed object, one into a hole of the parent, a trim
    # of part of a parent-backed object and of a whole one.
    local o=$(( (k % 4) * 4 * MB ))
    nbd_ops "$(uri "$p$k")" "$work/$p$k.raw" \
      "w:$((o + 4096 * k + 100)):$((64 * 1024))" "w:$((12 * MB + k * 8192)):4096" \
      "t:$((20 * MB + 65536 * k)):65536" "t:$((8 * MB)):$((4 * MB))" || { unserve; return 1; }
    unserve
    [ "$UNSERVE_RC" = 0 ] || return 1
    rbd snap create "$p$k@s" >/dev/null 2>&1
    [ "$fmt" = 1 ] && rbd snap protect "$p$k@s"
    parent=$p$k@s prev=$work/$p$k.raw
  done
}
for fmt in 2 1; do
  p=v${fmt}c
  # Not under `check`: serve/unserve must run in this shell (`wait` needs the parent).
  if chain "$fmt" 8 "$p" 2>>"$work/chain.log"; then
    pass "format $fmt: a chain of depth 8 made by rbd clone, each level written through rados-nbd"
  else
    fail "format $fmt: a chain of depth 8 made by rbd clone, each level written through rados-nbd" "$(tail -3 "$work/chain.log" "$work/serve.log")"
  fi
  for d in 1 2 8; do
    check "format $fmt depth $d: info shows parent and overlap as rbd info" info_like_rbd "$p$d"
    check "format $fmt depth $d: rbd export equals the model" same_export "$p$d" "$work/$p$d.raw"
    check "format $fmt depth $d: rbd object-map check passes" omap_check "$p$d"
    check "format $fmt depth $d: the parent snapshot is unchanged" same_export "$([ $d = 1 ] && echo cbase || echo $p$((d - 1)))@s" \
      "$([ $d = 1 ] && echo "$work/base.raw" || echo "$work/$p$((d - 1)).raw")"
  done
  check "format $fmt: the base snapshot is unchanged" bash -c "[ \"\$(rbd export cbase@s - 2>/dev/null | sha)\" = $base_sha ]"
  check "format $fmt depth 8: rbd flatten keeps the bytes" bash -c \
    "rbd flatten ${p}8 >/dev/null 2>&1 && same_export ${p}8 '$work/${p}8.raw' && ! rbd info ${p}8 | grep -q parent:"
done

# --- made by rados-nbd: librbd opens it as a clone of the snapshot.
# The clone format as rbd picks it (rbd_default_clone_format, auto by default): this
# cluster lets clients older than Mimic in (require_min_compat_client luminous), so auto is
# format 1, which an unprotected snapshot cannot have; rbd clone refuses it too. Then the
# client's own setting (CEPH_ARGS, as ceph.conf would give it) is followed.
rbd snap create cbase@u >/dev/null 2>&1
check "cluster allows pre-Mimic clients: rbd clone of an unprotected snapshot is refused (auto is format 1)" \
  bash -c "[ \"\$(ceph osd get-require-min-compat-client)\" = luminous ] && ! rbd clone cbase@u rbdauto 2>/dev/null"
check "... and so is rados-nbd clone (auto), saying why" bash -c \
  "! $RNQ clone cbase@u rnauto 2>'$work/auto.err' && grep -q 'Mimic' '$work/auto.err' && ! rbd info rnauto >/dev/null 2>&1"
check "rados-nbd clone with rbd_default_clone_format=2 in the client's config: format 2" bash -c \
  "CEPH_ARGS='--rbd-default-clone-format 2' $RNQ clone cbase@u rncfg && rbd info rncfg | grep -q 'op_features: clone-child' && rbd rm rncfg >/dev/null 2>&1"
check "rados-nbd clone --rbd-default-clone-format 2 of an unprotected snapshot" bash -c \
  "$RNQ clone --rbd-default-clone-format 2 cbase@u rn2 2>/dev/null"
check "rbd info rn2: parent rbd/cbase@u, overlap 32 MiB, clone-child" bash -c \
  "rbd info rn2 | grep -qx '.parent: rbd/cbase@u' && rbd info rn2 | grep -qx '.overlap: 32 MiB' && rbd info rn2 | grep -q 'op_features: clone-child'"
check "rbd children cbase@u lists rn2; rados-nbd children agrees" bash -c \
  "[ \"\$(rbd children cbase@u)\" = rbd/rn2 ] && [ \"\$($RNQ children cbase@u)\" = rbd/rn2 ]"
check "rbd export rn2 equals the parent snapshot" same_export rn2 "$work/base.raw"
# As rbd clone does, the new child has its (empty) object map: it checks clean at once.
check "rbd object-map check rn2 right after rados-nbd clone; flags clear" bash -c \
  "rbd object-map check rn2 >/dev/null 2>&1 && [ -z \"\$(rbd info rn2 --format json | python3 -c 'import json,sys; print(json.load(sys.stdin).get(\"flags\") or \"\")')\" ]"
check "rados-nbd clone --rbd-default-clone-format 1 of an unprotected snapshot is refused" \
  bash -c "! $RNQ clone --rbd-default-clone-format 1 cbase@u rn1x 2>/dev/null && ! rbd info rn1x >/dev/null 2>&1"
check "rados-nbd clone --rbd-default-clone-format 1 of a protected snapshot" "${RN[@]}" clone --rbd-default-clone-format 1 cbase@s rn1
check "rbd children cbase@s lists rn1 (rbd_children)" bash -c "rbd children cbase@s | grep -qx rbd/rn1"
check "rbd export rn1 equals the parent snapshot" same_export rn1 "$work/base.raw"

# rados-nbd flatten (the detach is this store's) of clones without snapshots, format 1
# (rn1) and 2 (rnf): the bytes stay, rbd sees no parent, the parent forgets the child.
check "rados-nbd clone cbase@u rnf" "${RN[@]}" clone --rbd-default-clone-format 2 cbase@u rnf
for c in rn1:cbase@s rnf:cbase@u; do
  img=${c%%:*} par=${c#*:}
  check "$img: rados-nbd flatten keeps the bytes" bash -c \
    "$RNQ flatten $img >/dev/null 2>&1 && same_export $img '$work/base.raw'"
  check "$img: after rados-nbd flatten, rbd info shows no parent, no clone-child" bash -c \
    "rbd info $img >'$work/i' && ! grep -q parent: '$work/i' && ! grep -q clone-child '$work/i'"
  check "$img: after rados-nbd flatten, rbd children $par no longer lists it" bash -c \
    "! rbd children $par | grep -qx rbd/$img"
  check "$img: after rados-nbd flatten, rbd object-map check passes" omap_check "$img"
done

# A clone with a snapshot (deep-flatten, fast-diff): a deep copy-up puts the parent's data
# in RADOS for the snapshot too, so the snapshot's object map must say it exists —
# librbd trusts it, and once the snapshot has no parent reads zeros where it says
# NONEXISTENT. By flatten (dsf), and by first writes of a served clone (dsw): partial and
# full-object writes and a whole-object trim into parent-backed objects, then a flatten.
cfeat=layering,exclusive-lock,object-map,fast-diff,deep-flatten
for img in dsf dsw; do
  rbd clone --rbd-default-clone-format 2 --image-feature $cfeat cbase@u $img >/dev/null 2>&1 &&
    rbd snap create $img@c1 >/dev/null 2>&1 || fail "$img: rbd clone and snap create" ""
done
check "dsf: rados-nbd flatten of a clone with a snapshot" bash -c "$RNQ flatten dsf >/dev/null 2>&1"
cp "$work/base.raw" "$work/dsw.raw"
if serve dsw; then
  pass "serve dsw (a clone with a snapshot)"
  check "dsw: first writes and a trim into parent-backed objects" nbd_ops "$(uri dsw)" \
    "$work/dsw.raw" "w:4096:5000" "w:$((20 * MB)):$((4 * MB))" "t:$((8 * MB)):$((4 * MB))"
  check_unserve "dsw: serve ends with exit 0"
else
  fail "serve dsw (a clone with a snapshot)" "$(tail -3 "$work/serve.log")"
fi
check "dsw: rbd export equals the model" same_export dsw "$work/dsw.raw"
check "dsw: rbd flatten" bash -c "rbd flatten dsw >/dev/null 2>&1"
for img in dsf dsw; do
  check "$img: rbd info shows no parent (the snapshot let go too)" bash -c \
    "! rbd info $img | grep -q parent: && ! rbd info $img@c1 | grep -q parent:"
  check "$img@c1: rbd export equals the parent snapshot" same_export $img@c1 "$work/base.raw"
  check "$img@c1: rbd object-map check passes" omap_check $img@c1
  check "$img: rbd object-map check passes" omap_check $img
done
check "dsf: rbd export equals the parent snapshot" same_export dsf "$work/base.raw"
check "dsw: rbd export still equals the model" same_export dsw "$work/dsw.raw"

# Shrinking a clone with a snapshot, against librbd's twin: before the objects past the new
# end go, librbd's TrimRequest copies up those the clone lacks inside the overlap (deeply:
# the snapshot gets the parent's bytes) and the object the new end cuts. Without that, a
# flatten (deep-flatten: the snapshot lets go of the parent) left the snapshot reading
# zeros past the new end (seen before the fix). 10 MiB cuts object 2 (parent data 9-11
# MiB); objects 3-7 past it hold parent data in 5. Shrunk by `rados-nbd resize` (srn), by
# `rbd resize` asking our owner (srs), and by librbd itself (slb).
for img in srn srs slb; do
  rbd clone --rbd-default-clone-format 2 --image-feature $cfeat cbase@u $img >/dev/null 2>&1 &&
    rbd snap create $img@c1 >/dev/null 2>&1 || fail "$img: rbd clone and snap create" ""
done
check "srn: rados-nbd resize --allow-shrink of a clone with a snapshot" \
  bash -c "$RNQ resize --size 10M --allow-shrink srn >/dev/null 2>&1"
if serve srs; then
  check "srs: rbd resize --allow-shrink asks the serving rados-nbd" \
    bash -c "rbd resize --size 10M --allow-shrink --no-progress srs >/dev/null 2>&1"
  check_unserve "srs: serve ends with exit 0"
else
  fail "serve srs" "$(tail -3 "$work/serve.log")"
fi
rbd resize --size 10M --allow-shrink --no-progress slb >/dev/null 2>&1
head -c $((10 * MB)) "$work/base.raw" >"$work/s10.raw"
du_of() { rbd du "$1" 2>/dev/null | sed "s/^$1/IMG/"; }
wo_diff() { rbd diff --whole-object --format json "$1"; }
export -f du_of wo_diff
for img in srn srs; do
  check "$img: rbd du (per snapshot) as librbd's shrink leaves it" \
    bash -c "[ \"\$(du_of $img)\" = \"\$(du_of slb)\" ]"
  check "$img: rbd diff --whole-object of the head and the snapshot as librbd's" bash -c \
    "[ \"\$(wo_diff $img)\" = \"\$(wo_diff slb)\" ] && [ \"\$(wo_diff $img@c1)\" = \"\$(wo_diff slb@c1)\" ]"
done
for img in srn srs slb; do
  check "$img: rbd flatten after the shrink" bash -c "rbd flatten --no-progress $img >/dev/null 2>&1"
  check "$img@c1: rbd export equals the parent snapshot after the flatten" \
    same_export $img@c1 "$work/base.raw"
  check "$img: rbd export equals the parent's first 10 MiB" same_export $img "$work/s10.raw"
  check "$img, $img@c1: rbd object-map check passes" bash -c "omap_check $img && omap_check $img@c1"
done

# Across RBD namespaces (format 2 only): the child in namespace cns names its parent in the
# default one, serves through the restricted client, and is listed as rbd lists it.
rbd namespace create rbd/cns
check "rados-nbd clone into another namespace" "${RN[@]}" clone --rbd-default-clone-format 2 cbase@u rbd/cns/xns
check "rbd info rbd/cns/xns: parent rbd/cbase@u" bash -c "rbd info rbd/cns/xns | grep -qx '.parent: rbd/cbase@u'"
check "info rbd/cns/xns shows the parent as rbd info" info_like_rbd rbd/cns/xns
check "rbd export rbd/cns/xns equals the parent snapshot" same_export rbd/cns/xns "$work/base.raw"
check "children cbase@u: as rbd children (pool, namespace, name order)" bash -c \
  "[ \"\$($RNQ children cbase@u)\" = \"\$(rbd children cbase@u)\" ] && [ \"\$(rbd children cbase@u | wc -l)\" = 2 ]"
check "children --format json: as rbd's" bash -c \
  "[ \"\$($RNQ children --format json cbase@u | jq -cS .)\" = \"\$(rbd children --format json cbase@u | jq -cS .)\" ]"
check "format 1 across namespaces is refused" bash -c "! $RNQ clone --rbd-default-clone-format 1 cbase@s rbd/cns/x1 2>/dev/null"
rbd rm rbd/cns/xns >/dev/null 2>&1
rbd namespace rm rbd/cns

# Served: writes and trims into parent-backed objects, and past the overlap once grown.
cp "$work/base.raw" "$work/rn2.raw"
rbd resize --size 40M rn2 >/dev/null 2>&1
truncate -s $((40 * MB)) "$work/rn2.raw"
if serve rn2; then
  pass "serve rn2 (grown to 40 MiB)"
  check "rn2: writes and trims through NBD" nbd_ops "$(uri rn2)" "$work/rn2.raw" \
    "w:$((MB + 3)):5000" "t:$((4 * MB)):$((4 * MB))" "t:$((20 * MB + 4096)):8192" \
    "w:$((33 * MB)):$((2 * MB))" "z:$((9 * MB)):4096"
  check_unserve "rn2: serve ends with exit 0"
else
  fail "serve rn2 (grown to 40 MiB)" "$(tail -3 "$work/serve.log")"
fi
check "rn2: rbd export equals the model" same_export rn2 "$work/rn2.raw"
check "rn2: rbd object-map check passes" omap_check rn2
check "rn2: the parent snapshot is unchanged" bash -c "[ \"\$(rbd export cbase@u - 2>/dev/null | sha)\" = $base_sha ]"
check "rn2: rbd flatten keeps the bytes" bash -c \
  "rbd flatten rn2 >/dev/null 2>&1 && same_export rn2 '$work/rn2.raw' && [ -z \"\$(rbd children cbase@u)\" ]"

# Striping with one object per stripe (the plain layout): what `rbd clone --object-size 4M`
# makes of a parent with 1 MiB objects (the parent's stripe unit, count 1). rados-nbd's
# clone makes the same header, and serves such a clone, rbd's or its own, as the plain
# layout it is: copy-ups of parts of four parent objects, a trim, a write past a parent
# object boundary, against a model and librbd's map check.
rbd create --size 8M --object-size 1M tst_$$ >/dev/null 2>&1 &&
  rbd bench --io-type write --io-size 64K --io-total 2M --io-pattern rand tst_$$ >/dev/null 2>&1 &&
  rbd snap create tst_$$@s >/dev/null 2>&1 && rbd export tst_$$@s "$work/tst.raw" >/dev/null 2>&1
rbd clone --rbd-default-clone-format 2 --object-size 4M tst_$$@s tstr_$$
"${RN[@]}" clone --rbd-default-clone-format 2 --object-size 4M tst_$$@s tstn_$$ 2>/dev/null
stripes() { rbd info --format json "$1" | jq -cS '{features, order, stripe_unit, stripe_count}'; }
check "clone --object-size 4M of a 1 MiB parent: striped as rbd clone makes it (unit 1 MiB, count 1)" bash -c \
  "[ \"\$(stripes tstr_$$)\" = \"\$(stripes tstn_$$)\" ] && [ \"\$(rbd info --format json tstn_$$ | jq .stripe_unit)\" = 1048576 ]"
check "info of a striped clone: stripe unit and count as rbd info (plain, json)" bash -c \
  "[ \"\$($RNQ info tstr_$$ | grep stripe)\" = \"\$(rbd info tstr_$$ | grep stripe)\" ] && [ \"\$($RNQ info --format json tstr_$$ | jq -c '[.stripe_unit, .stripe_count]')\" = '[1048576,1]' ]"
for img in tstr_$$ tstn_$$; do
  cp "$work/tst.raw" "$work/$img.raw"
  if serve "$img"; then
    check "$img: copy-ups, a trim and writes through NBD" nbd_ops "$(uri "$img")" "$work/$img.raw" \
      "w:$((MB - 4096)):8192" "w:$((5 * MB + 512)):1000" "t:$((4 * MB)):$((4 * MB))" "w:$((2 * MB + 4096)):$((MB + 4096))"
    check_unserve "$img: serve ends with exit 0"
  else
    fail "serve $img (striped, count 1)" "$(tail -3 "$work/serve.log")"
  fi
  check "$img: rbd export equals the model" same_export "$img" "$work/$img.raw"
  check "$img: rbd object-map check passes" omap_check "$img"
  check "$img: diff (extents, whole objects; plain, json) as rbd diff" bash -c \
    "for a in '' --whole-object; do [ \"\$($RNQ diff \$a $img)\" = \"\$(rbd diff \$a $img)\" ] && [ \"\$($RNQ diff \$a --format json $img)\" = \"\$(rbd diff \$a --format json $img)\" ] || exit 1; done"
done
# ls -l (and its JSON): the striped clones and their parent's snapshot as rbd ls -l, one
# of them locked by a serve (LOCK excl).
serve tstr_$$ && hold tstr_$$
# Both list every image of the pool, which the suites running beside this one create and
# remove meanwhile (rbd ls -l opens each; one that vanishes or fails to open mid-walk can
# cut rbd's own output short): up to three tries, and the two listings shown on failure.
ls_like_rbd() {
  local try ours theirs oj tj
  for try in 1 2 3; do
    ours=$($RNQ ls -l | grep -E "^(tst|tstr|tstn)_$$[@ ]")
    theirs=$(rbd ls -l 2>/dev/null | grep -E "^(tst|tstr|tstn)_$$[@ ]")
    oj=$($RNQ ls -l --format json | jq -cS "[.[] | select(.image | test(\"^tst[rn]?_$$\$\"))]")
    tj=$(rbd ls -l --format json 2>/dev/null | jq -cS "[.[] | select(.image | test(\"^tst[rn]?_$$\$\"))]")
    if [ "$ours" = "$theirs" ] && [ "$oj" = "$tj" ] && grep -E "^tstr_$$ " <<<"$theirs" | grep -q ' excl *$' &&
      grep -qE "^tst_$$@s " <<<"$theirs"; then
      return 0
    fi
    sleep 1
  done
  # One line each: `check` shows the last five.
  printf 'ours: %s\nrbd: %s\nours (json): %s\nrbd (json): %s\n' "$(tr '\n' '|' <<<"$ours")" \
    "$(tr '\n' '|' <<<"$theirs")" "$oj" "$tj" >&2
  return 1
}
check "ls -l: images, snapshots, parents, lock as rbd ls -l (plain, json)" ls_like_rbd
unhold; unserve
# clone --image-feature / --stripe-unit / --stripe-count: the child rbd clone makes of the
# same parent (features, order, stripe unit and count), or a refusal where rbd refuses.
clone_like_rbd() {
  local r1 r2
  rbd clone --rbd-default-clone-format 2 "$@" tst_$$@s tcq_$$ >/dev/null 2>&1; r1=$?
  "${RN[@]}" clone --rbd-default-clone-format 2 "$@" tst_$$@s tcqn_$$ >/dev/null 2>&1; r2=$?
  [ "$(stripes tcq_$$ 2>/dev/null)" = "$(stripes tcqn_$$ 2>/dev/null)" ] &&
    { [ $r1 = 0 ] && [ $r2 = 0 ] || { [ $r1 != 0 ] && [ $r2 != 0 ]; }; }
  local ok=$?
  rbd rm tcq_$$ >/dev/null 2>&1; rbd rm tcqn_$$ >/dev/null 2>&1
  return $ok
}
for args in "--image-feature layering,exclusive-lock,object-map" "--image-feature layering" \
  "--image-feature exclusive-lock" "--stripe-unit 512K --stripe-count 1" "--stripe-unit 512K" \
  "--object-size 2M" "--object-size 2M --stripe-unit 2M --stripe-count 1" "--object-size 512K" \
  "--object-size 512K --stripe-unit 512K --stripe-count 1"; do
  # shellcheck disable=SC2086
  check "clone $args: as rbd clone" clone_like_rbd $args
done
rbd rm tstr_$$ >/dev/null 2>&1; rbd rm tstn_$$ >/dev/null 2>&1
rbd snap purge tst_$$ >/dev/null 2>&1; rbd rm tst_$$ >/dev/null 2>&1
# create --stripe-unit with --stripe-count 1: the header rbd create makes; more than one
# object per stripe, or a unit that is no factor of the object size, refused.
rbd create --size 8M --stripe-unit 64K --stripe-count 1 tsc_$$
"${RN[@]}" create --size 8M --stripe-unit 64K --stripe-count 1 tscn_$$ 2>/dev/null
check "create --stripe-unit 64K --stripe-count 1: the header rbd create makes" bash -c \
  "[ \"\$(stripes tsc_$$)\" = \"\$(stripes tscn_$$)\" ] && [ \"\$(rbd info --format json tscn_$$ | jq .stripe_unit)\" = 65536 ]"
check_fails "create --stripe-count 2: refused (not served)" "${RN[@]}" create --size 8M --stripe-unit 64K --stripe-count 2 tscx_$$
check_fails "create --stripe-unit 3K: refused (no factor of the object size)" "${RN[@]}" create --size 8M --stripe-unit 3K --stripe-count 1 tscx_$$
check "the refused creates left no image" bash -c "! rbd info tscx_$$ >/dev/null 2>&1"
rbd rm tsc_$$ >/dev/null 2>&1; rbd rm tscn_$$ >/dev/null 2>&1

# kill -9 in the middle of copy-ups, a few rounds (the dead daemon is blocklisted before each
# reopen, see drop_dead_watch): every acked write reads back, every block no write reached is
# the parent's (a torn copy-up would show the write with zeros around it), the map checks,
# and librbd reads the same bytes as we serve.
rbd clone --rbd-default-clone-format 2 cbase@s ck >/dev/null 2>&1
TOOL=("$PY" "$here/../reliability/nbdtool.py")
BLOCKS=$((SIZE / 4096))
: >"$work/ck.journal"
for i in 1 2 3; do
  why=
  serve ck || why="serve did not start: $(tail -2 "$work/serve.log")"
  if [ -z "$why" ]; then
    "${TOOL[@]}" journal-write "$(uri ck)" "$work/ck.journal" 30 "$((200 + i))" $BLOCKS >"$work/ck-w$i.log" 2>&1 &
    wpid=$!
    sleep "$(awk -v r=$RANDOM 'BEGIN { printf "%.2f", 0.5 + r / 32768 * 2.0 }')"
    kill9 "$SERVE_PID"; rm -f "$sock"
    wait "$wpid"
    # What is tested here is the copy-ups, not the wait for the dead watch (e2e.sh,
    # fencing.sh): the dead daemon is blocklisted by hand so that the reopen need not wait.
    drop_dead_watch ck || why="could not drop the dead daemon's watch"
    [ -n "$why" ] || reopen "$work/ck-r$i.log" ck || why="reopen after the kill failed: $(tail -2 "$work/ck-r$i.log")"
  fi
  if [ -z "$why" ] && ! JOURNAL_EMPTY_OK=$(acked_none "$work/ck-w$i.log") "${TOOL[@]}" journal-verify "$(uri ck)" "$work/ck.journal" "$i" $BLOCKS "$work/base.raw" >"$work/ck-v$i.log" 2>&1; then
    why="$(tail -4 "$work/ck-v$i.log" | tr '\n' ' ')"
  fi
  if [ -z "$why" ]; then
    nbdcopy "$(uri ck)" "$work/ck.raw" || why="nbdcopy of what we serve failed"
  fi
  unserve
  [ -n "$why" ] || omap_check ck || why="rbd object-map check ck failed"
  [ -n "$why" ] || same_export ck "$work/ck.raw" || why="rbd export ck differs from what rados-nbd served"
  if [ -z "$why" ]; then
    pass "ck: kill -9 #$i during copy-ups: acked writes intact, unwritten blocks the parent's, map checks, librbd reads the same ($(sed -n 's/^journal-write: //p' "$work/ck-w$i.log"))"
  else
    fail "ck: kill -9 #$i during copy-ups" "$why"
  fi
done
undrop_watches
check "ck: the parent snapshot is unchanged" bash -c "[ \"\$(rbd export cbase@s - 2>/dev/null | sha)\" = $base_sha ]"

# A parent snapshot that format-2 clones use: `snap rm` moves it to the trash as librbd
# does (never removing its data or map under the clones), `snap ls` hides it unless --all,
# the clones keep reading it; `rm` of a clone detaches it from the parent; the snapshot
# goes with its last clone (here a flatten).
rbd create --size 8M --object-size 1M trp_$$
rbd bench --io-type write --io-size 64K --io-total 3M --io-pattern rand trp_$$ >/dev/null 2>&1
rbd snap create trp_$$@s >/dev/null 2>&1
rbd export trp_$$@s "$work/trp_$$-s.raw" >/dev/null 2>&1
rbd clone trp_$$@s trc1_$$ --rbd-default-clone-format 2
rbd clone trp_$$@s trc2_$$ --rbd-default-clone-format 2
check "trash: snap rm of a snapshot with clones succeeds" "${RN[@]}" snap rm trp_$$@s
check "trash: the snapshot is in the trash namespace, as rbd says" bash -c \
  "rbd snap ls --all --format json trp_$$ | jq -e 'length == 1 and .[0].namespace.type == \"trash\" and .[0].namespace.original_name == \"s\"' >/dev/null"
check "trash: its map is kept (the object map object of the snapshot is there)" bash -c \
  "rados -p rbd stat \$(printf 'rbd_object_map.%s.%016x' \$(rbd info --format json trp_$$ | jq -r .id) \$(rbd snap ls --all --format json trp_$$ | jq -r '.[0].id')) >/dev/null"
check "trash: snap ls hides it, snap ls --all shows it as rbd's (plain, json)" bash -c \
  "[ -z \"\$($RNQ snap ls trp_$$)\" ] && [ \"\$($RNQ snap ls --all trp_$$)\" = \"\$(rbd snap ls --all trp_$$)\" ] && [ \"\$($RNQ snap ls --all --format json trp_$$)\" = \"\$(rbd snap ls --all --format json trp_$$)\" ]"
check "trash: du and diff of the parent equal rbd's (the trashed snapshot is not listed)" bash -c \
  "[ \"\$($RNQ du --format json trp_$$)\" = \"\$(rbd du --format json trp_$$ 2>/dev/null)\" ] && [ \"\$($RNQ diff --whole-object --format json trp_$$)\" = \"\$(rbd diff --whole-object --format json trp_$$)\" ] && [ \"\$($RNQ diff --format json trp_$$)\" = \"\$(rbd diff --format json trp_$$)\" ]"
check "trash: the clones still read the snapshot's bytes" same_export trc1_$$ "$work/trp_$$-s.raw"
check "trash: info of a clone names the trashed parent as rbd's" bash -c \
  "[ \"\$($RNQ info trc1_$$ | grep parent)\" = \"\$(rbd info trc1_$$ | grep parent)\" ]"
check_fails "trash: the trashed snapshot cannot be named" "${RN[@]}" snap rm "trp_$$@$(rbd snap ls --all --format json trp_$$ | jq -r '.[0].name')"
check "trash: rados-nbd rm of a clone detaches it from its parent" bash -c \
  "$RNQ rm trc2_$$ && [ \"\$(rbd children --snap-id \$(rbd snap ls --all --format json trp_$$ | jq -r '.[0].id') trp_$$ 2>&1)\" = 'rbd/trc1_$$' ]"
check "trash: the snapshot stays while a clone uses it" bash -c "[ \$(rbd snap ls --all --format json trp_$$ | jq length) = 1 ]"
check "trash: flatten of the last clone removes the trashed snapshot" bash -c \
  "$RNQ flatten trc1_$$ && [ \$(rbd snap ls --all --format json trp_$$ | jq length) = 0 ]"
check "trash: the parent has no clone left (op features cleared), its map checks" bash -c \
  "[ -z \"\$(rbd info --format json trp_$$ | jq -r '.op_features | join(\",\")')\" ] && rbd object-map check trp_$$ >/dev/null 2>&1"
check "trash: the flattened clone kept the bytes" same_export trc1_$$ "$work/trp_$$-s.raw"
rbd rm trc1_$$ >/dev/null 2>&1; rbd rm trp_$$ >/dev/null 2>&1
# The same while rados-nbd serves the parent (it holds the lock, so librbd asks it): `rbd
# snap rm` moves the snapshot to the trash through the owner, and `rbd rm` of the last
# clone (librbd's DetachChildRequest) asks the owner to remove the trashed snapshot, which
# librbd's owner does and we used to refuse (EBUSY), leaving it in the trash.
rbd create --size 8M --object-size 1M tsp_$$
rbd bench --io-type write --io-size 64K --io-total 1M --io-pattern rand tsp_$$ >/dev/null 2>&1
rbd snap create tsp_$$@s >/dev/null 2>&1
rbd clone tsp_$$@s tsc1_$$ --rbd-default-clone-format 2
rbd clone tsp_$$@s tsc2_$$ --rbd-default-clone-format 2
if serve tsp_$$; then
  pass "served parent: serve tsp"
  check "served parent: rbd snap rm of a snapshot with clones trashes it (asked of us)" bash -c \
    "rbd snap rm tsp_$$@s >/dev/null 2>&1 && rbd snap ls --all --format json tsp_$$ | jq -e 'length == 1 and .[0].namespace.type == \"trash\"' >/dev/null"
  check "served parent: rbd rm of one clone keeps the trashed snapshot (the other uses it)" bash -c \
    "rbd rm tsc2_$$ >/dev/null 2>&1 && [ \$(rbd snap ls --all --format json tsp_$$ | jq length) = 1 ]"
  # librbd asks us (we hold the lock) to remove the trashed snapshot a clone still uses:
  # librbd's owner answers EBUSY, and so must we (answering 0 would report a removal that
  # did not happen).
  busy_trash_rm() {
    /usr/bin/python3 -c '
import sys, rados, rbd
c = rados.Rados(conffile=sys.argv[1]); c.connect(); io = c.open_ioctx("rbd")
img = rbd.Image(io, sys.argv[2])
try:
    img.remove_snap_by_id(int(sys.argv[3]))
    sys.exit("the removal succeeded")
except rbd.ImageBusy:
    pass
finally:
    img.close(); io.close(); c.shutdown()
' "$CEPH_CONF" "$1" "$(rbd snap ls --all --format json "$1" | jq -r '.[0].id')" &&
      [ "$(rbd snap ls --all --format json "$1" | jq length)" = 1 ]
  }
  export -f busy_trash_rm
  check "served parent: librbd's removal of the trashed snapshot a clone still uses gets EBUSY from us" busy_trash_rm tsp_$$
  check "served parent: rbd rm of the last clone removes the trashed snapshot through us" bash -c \
    "rbd rm tsc1_$$ >/dev/null 2>&1 && [ \$(rbd snap ls --all --format json tsp_$$ | jq length) = 0 ]"
  check "served parent: the daemon did the removal" grep -q "tsp_$$@.*(a group, mirror or trashed one) asked by another client" "$work/serve.log"
  check_unserve "served parent: serve ends with exit 0"
  check "served parent: flags clear, no op features left, the map checks" bash -c \
    "[ \"\$(rbd info --format json tsp_$$ | jq -c '[.flags, .op_features]')\" = '[[],[]]' ] && rbd object-map check tsp_$$ >/dev/null 2>&1"
else
  fail "served parent: serve tsp" "$(tail -3 "$work/serve.log")"
fi
rbd rm tsc1_$$ >/dev/null 2>&1; rbd rm tsc2_$$ >/dev/null 2>&1; rbd snap purge tsp_$$ >/dev/null 2>&1; rbd rm tsp_$$ >/dev/null 2>&1
# The other way round: librbd (python3-rbd) holds the parent's lock, and rados-nbd removes
# the last clone. rados-nbd asks librbd's owner to remove the trashed snapshot, naming it
# as librbd's DetachChildRequest does (its trash namespace and UUID name); it used
# to leave it in the trash with a warning.
rbd create --size 8M --object-size 1M tlp_$$
rbd snap create tlp_$$@s >/dev/null 2>&1
rbd clone tlp_$$@s tlc_$$ --rbd-default-clone-format 2
rbd snap rm tlp_$$@s >/dev/null 2>&1
rm -f "$work/tlp.held"
spawn python3 -c '
import os, sys, time, rados, rbd
c = rados.Rados(conffile=sys.argv[1]); c.connect(); io = c.open_ioctx("rbd")
img = rbd.Image(io, sys.argv[2])
img.write(b"x" * 4096, 0)  # takes the exclusive lock
open(sys.argv[3], "w").close()
while os.path.exists(sys.argv[3]):
    time.sleep(0.1)
img.close(); io.close(); c.shutdown()
' "$CEPH_CONF" tlp_$$ "$work/tlp.held"
holder=$!
for _ in $(seq 1 300); do [ -e "$work/tlp.held" ] && break; sleep 0.1; done
check "librbd owner: librbd holds the parent's lock, its snapshot is in the trash" bash -c \
  "[ -e '$work/tlp.held' ] && rbd lock ls tlp_$$ | grep -q auto && rbd snap ls --all --format json tlp_$$ | jq -e 'length == 1 and .[0].namespace.type == \"trash\"' >/dev/null"
check "librbd owner: rados-nbd rm of the last clone has librbd's owner remove the trashed snapshot" bash -c \
  "$RNQ rm tlc_$$ 2>'$work/tlc.err' && [ \$(rbd snap ls --all --format json tlp_$$ | jq length) = 0 ] && ! grep -q 'stays in the trash' '$work/tlc.err'"
rm -f "$work/tlp.held"; wait "$holder" 2>/dev/null; forget_pid "$holder"
check "librbd owner: the parent's map checks" rbd object-map check tlp_$$
rbd rm tlc_$$ >/dev/null 2>&1; rbd snap purge tlp_$$ >/dev/null 2>&1; rbd rm tlp_$$ >/dev/null 2>&1
# A format-1 clone removed by rados-nbd: the parent forgets it, so it can be unprotected.
rbd create --size 4M trp1_$$ && rbd snap create trp1_$$@p >/dev/null 2>&1 && rbd snap protect trp1_$$@p
rbd clone trp1_$$@p tr1c_$$ --rbd-default-clone-format 1
check "format 1: rados-nbd rm of a clone removes it from rbd_children" bash -c \
  "$RNQ rm tr1c_$$ && [ -z \"\$(rbd children trp1_$$@p 2>&1)\" ] && rbd snap unprotect trp1_$$@p"
rbd snap purge trp1_$$ >/dev/null 2>&1; rbd rm trp1_$$ >/dev/null 2>&1
# A parent image moved to the trash (rbd trash mv): info of its clone names it as rbd info
# does, `parent: rbd/NAME@SNAP (trash ID)`, JSON "trash": true.
rbd create --size 4M tpi_$$ && rbd snap create tpi_$$@s >/dev/null 2>&1 &&
  rbd clone --rbd-default-clone-format 2 tpi_$$@s tpic_$$ && rbd trash mv tpi_$$
trashed_parent_info() {
  info_like_rbd "$1" && rbd info "$1" | grep -q '(trash ' &&
    "${RN[@]}" info --format json "$1" 2>/dev/null | jq -e --arg p "$2" '.parent.trash == true and .parent.image == $p' >/dev/null
}
check "info of a clone whose parent is in the trash: as rbd info (plain, json)" trashed_parent_info tpic_$$ tpi_$$
rbd rm tpic_$$ >/dev/null 2>&1
tid=$(rbd trash ls --format json | jq -r --arg n "tpi_$$" '.[] | select(.name == $n) | .id')
[ -n "$tid" ] && rbd trash restore "$tid" >/dev/null 2>&1
rbd snap purge tpi_$$ >/dev/null 2>&1; rbd rm tpi_$$ >/dev/null 2>&1
# A clone in the trash is not listed by rbd children (only with --all): nor by ours.
rbd create --size 4M tch_$$ && rbd snap create tch_$$@s >/dev/null 2>&1
rbd clone --rbd-default-clone-format 2 tch_$$@s tchc_$$ && rbd clone --rbd-default-clone-format 2 tch_$$@s tchd_$$ &&
  rbd trash mv tchd_$$
check "children leaves out a clone in the trash, as rbd children" bash -c \
  "[ \"\$($RNQ children tch_$$@s)\" = \"\$(rbd children tch_$$@s)\" ] && [ \"\$(rbd children tch_$$@s)\" = rbd/tchc_$$ ]"
# children IMAGE (every snapshot's clones, a removed snapshot's in the trash namespace
# too), --all (the trashed clone, with its id), --descendants (a clone of a clone, named to
# sort before the others): each as rbd's, plain and JSON.
rbd snap create tch_$$@t >/dev/null 2>&1 && rbd clone --rbd-default-clone-format 2 tch_$$@t tche_$$ &&
  rbd snap rm tch_$$@t >/dev/null 2>&1 && rbd snap create tchc_$$@g >/dev/null 2>&1 &&
  rbd clone --rbd-default-clone-format 2 tchc_$$@g a_tchg_$$
children_like_rbd() {
  local a
  for a in "tch_$$" "tch_$$ --all" "tch_$$ --descendants" "tch_$$@s -a --descendants" "tchc_$$"; do
    # shellcheck disable=SC2086
    [ "$($RNQ children $a)" = "$(rbd children $a)" ] &&
      [ "$($RNQ children --format json $a)" = "$(rbd children --format json $a)" ] || return 1
  done
  # What it should list, not only the same as rbd: the trashed snapshot's clone, the
  # trashed clone with its id, the grandchild first.
  [ "$(rbd children --all --descendants tch_$$ | wc -l)" = 4 ] &&
    rbd children --all tch_$$ | grep -qx "rbd/tchd_$$ (trash [0-9a-f]*)" &&
    [ "$(rbd children --descendants tch_$$ | head -1)" = "rbd/a_tchg_$$" ]
}
check "children IMAGE, --all, --descendants: as rbd children (plain, json)" children_like_rbd
# children --snap-id: a snapshot by its id, the trashed one (no name reaches it) included;
# an id the image lacks, and a name with an id, refused by both.
children_by_id_like_rbd() {
  local t s a
  t=$(rbd snap ls --all --format json tch_$$ | jq -r '.[] | select(.namespace.type == "trash") | .id')
  s=$(rbd snap ls --format json tch_$$ | jq -r '.[] | select(.name == "s") | .id')
  [ -n "$t" ] && [ -n "$s" ] || { echo "no ids: trashed '$t', s '$s'"; return 1; }
  for a in "--snap-id $t tch_$$" "--snap-id $s --all tch_$$" "--snap-id $s --descendants tch_$$"; do
    # shellcheck disable=SC2086
    [ "$($RNQ children $a)" = "$(rbd children $a)" ] &&
      [ "$($RNQ children --format json $a)" = "$(rbd children --format json $a)" ] ||
      { echo "children $a: ours '$($RNQ children $a 2>&1)', rbd's '$(rbd children $a 2>&1)'"; return 1; }
  done
  [ "$(rbd children --snap-id "$t" tch_$$)" = rbd/tche_$$ ] &&
    ! rbd children --snap-id 999999 tch_$$ >/dev/null 2>&1 &&
    ! $RNQ children --snap-id 999999 tch_$$ >/dev/null 2>&1 &&
    ! rbd children --snap-id "$s" tch_$$@s >/dev/null 2>&1 &&
    ! $RNQ children --snap-id "$s" tch_$$@s >/dev/null 2>&1
}
check "children --snap-id (a trashed snapshot, --all, --descendants; a missing id): as rbd children" children_by_id_like_rbd
# children of a parent rados-nbd would not serve (stripe count 2): listed as rbd lists them.
rbd create --size 8M --stripe-unit 64K --stripe-count 2 tfp_$$ && rbd snap create tfp_$$@s >/dev/null 2>&1 &&
  rbd clone --rbd-default-clone-format 2 tfp_$$@s tfpc_$$
check "children of a snapshot of an image not served here (stripe count 2): as rbd children" bash -c \
  "[ \"\$($RNQ children tfp_$$@s)\" = rbd/tfpc_$$ ] && [ \"\$($RNQ children tfp_$$)\" = \"\$(rbd children tfp_$$)\" ]"
rbd rm tfpc_$$ >/dev/null 2>&1; rbd snap purge tfp_$$ >/dev/null 2>&1; rbd rm tfp_$$ >/dev/null 2>&1
rbd rm a_tchg_$$ >/dev/null 2>&1; rbd snap purge tchc_$$ >/dev/null 2>&1; rbd rm tche_$$ >/dev/null 2>&1
tid=$(rbd trash ls --format json | jq -r --arg n "tchd_$$" '.[] | select(.name == $n) | .id')
[ -n "$tid" ] && rbd trash rm "$tid" >/dev/null 2>&1
rbd rm tchc_$$ >/dev/null 2>&1; rbd snap purge tch_$$ >/dev/null 2>&1; rbd rm tch_$$ >/dev/null 2>&1
# Unprotect, as librbd's: refused while a format-1 clone is recorded in any pool's
# rbd_children (here another pool's), allowed with format-2 clones only (they do not need
# the snapshot protected; rbd unprotects it too).
op=clones-other-$$
ceph osd pool create "$op" 8 >/dev/null 2>&1 && rbd pool init "$op"
rbd create --size 4M tup_$$ && rbd snap create tup_$$@p >/dev/null 2>&1 && rbd snap protect tup_$$@p
rbd clone tup_$$@p "$op/tupc1_$$" --rbd-default-clone-format 1
check "unprotect refused with a format-1 clone in another pool (rbd refuses it too)" bash -c \
  "! $RNQ snap unprotect tup_$$@p 2>'$work/tup.err' && grep -q 'format-1 clone.*$op' '$work/tup.err' &&
   rbd info tup_$$@p | grep -q 'protected: True' && ! rbd snap unprotect tup_$$@p 2>/dev/null"
rbd rm "$op/tupc1_$$" >/dev/null 2>&1
rbd clone tup_$$@p tupc2_$$ --rbd-default-clone-format 2
rbd clone tup_$$@p "$op/tupc3_$$" --rbd-default-clone-format 2
check "unprotect with format-2 clones only: done, as rbd does it" bash -c \
  "$RNQ snap unprotect tup_$$@p && rbd info tup_$$@p | grep -q 'protected: False' &&
   [ \"\$(rbd children tup_$$@p | sort | tr '\n' ' ')\" = '$op/tupc3_$$ rbd/tupc2_$$ ' ]"
rbd rm tupc2_$$ >/dev/null 2>&1; rbd rm "$op/tupc3_$$" >/dev/null 2>&1
rbd snap purge tup_$$ >/dev/null 2>&1; rbd rm tup_$$ >/dev/null 2>&1
# The pool's rbd_default_clone_format wins over the command line's, as in rbd (librbd puts
# the pool's settings over the client's configuration, command line included).
rbd create --size 4M "$op/tcf_$$" && rbd snap create "$op/tcf_$$@u" >/dev/null 2>&1
# (As client.admin: the restricted client may use pool rbd only.)
RNA=$(printf '%q ' "$BIN" --store "ceph:$CEPH_CONF")
rbd config pool set "$op" rbd_default_clone_format 1
check "pool says clone format 1: clone --rbd-default-clone-format 2 of an unprotected snapshot refused, by rbd and rados-nbd" \
  bash -c "! rbd clone --rbd-default-clone-format 2 $op/tcf_$$@u $op/tcfr_$$ 2>/dev/null &&
    ! $RNA clone --rbd-default-clone-format 2 $op/tcf_$$@u $op/tcfn_$$ 2>'$work/tcf.err' &&
    grep -q 'not protected' '$work/tcf.err' && ! rbd info $op/tcfn_$$ >/dev/null 2>&1"
rbd config pool set "$op" rbd_default_clone_format 2
check "pool says clone format 2: clone --rbd-default-clone-format 1 of an unprotected snapshot is format 2, for rbd and rados-nbd" \
  bash -c "rbd clone --rbd-default-clone-format 1 $op/tcf_$$@u $op/tcfr_$$ && $RNA clone --rbd-default-clone-format 1 $op/tcf_$$@u $op/tcfn_$$ &&
    rbd info $op/tcfr_$$ | grep -q 'op_features: clone-child' && rbd info $op/tcfn_$$ | grep -q 'op_features: clone-child'"
rbd rm "$op/tcfr_$$" >/dev/null 2>&1; rbd rm "$op/tcfn_$$" >/dev/null 2>&1
rbd snap purge "$op/tcf_$$" >/dev/null 2>&1; rbd rm "$op/tcf_$$" >/dev/null 2>&1
ceph osd pool rm "$op" "$op" --yes-i-really-really-mean-it >/dev/null 2>&1

# A parent image in the trash waiting for its last clone (source USER_PARENT), as librbd
# does it: `rm` of an image whose snapshots are all trashed (kept for clones) is refused
# unless rbd_move_parent_to_trash_on_remove is set (CEPH_ARGS, or the pool's `rbd config
# pool set`), then moves it to the trash as `rbd rm` does; the last clone's removal or
# flatten removes the parent's snapshot, then the parent, then up the chain (librbd's
# DetachChildRequest). Chains tg <- tp <- tc, each parent's snapshot trashed.
trash_chain() { # trash_chain TAG: makes tg_TAG <- tp_TAG <- tc_TAG, snapshots trashed
  rbd create --size 8M --object-size 1M tg_$1 &&
  rbd bench --io-type write --io-size 64K --io-total 2M --io-pattern rand tg_$1 >/dev/null 2>&1 &&
  rbd snap create tg_$1@s >/dev/null 2>&1 &&
  rbd clone tg_$1@s tp_$1 --rbd-default-clone-format 2 &&
  rbd bench --io-type write --io-size 64K --io-total 1M --io-pattern rand tp_$1 >/dev/null 2>&1 &&
  rbd snap create tp_$1@s >/dev/null 2>&1 &&
  rbd clone tp_$1@s tc_$1 --rbd-default-clone-format 2 &&
  rbd snap rm tg_$1@s >/dev/null 2>&1 && rbd snap rm tp_$1@s >/dev/null 2>&1 &&
  rbd export tc_$1 "$work/tc_$1.raw" >/dev/null 2>&1
}
# in_trash TAG NAMES...: exactly these of the chain are in the trash, each as USER_PARENT.
in_trash() {
  local tag=$1; shift
  [ "$(rbd trash ls --all --long --format json | jq -r --arg t "_$tag" \
      '[.[] | select(.name | endswith($t)) | .name + ":" + .source] | sort | join(" ")')" = \
    "$(for n in "$@"; do echo "${n}_$tag:USER_PARENT"; done | sort | paste -sd' ')" ]
}
# gone TAG: no object of the chain's parents is left (header, data, maps, id, directory).
gone() {
  [ -z "$(rbd trash ls --all --format json | jq -r --arg t "_$1" '.[] | select(.name | endswith($t)) | .id')" ] &&
  ! rbd ls | grep -qx "t[gp]_$1" &&
  for id in $(cat "$work/ids_$1"); do ! rados -p rbd ls | grep -q "$id" || return 1; done
}
export -f in_trash gone
trash_chain a$$
cat /dev/null >"$work/ids_a$$"
for n in tg tp; do rbd info --format json ${n}_a$$ | jq -r .id >>"$work/ids_a$$"; done
check_fails "parent trash: rm of an image whose snapshots are trashed for clones is refused by default" \
  "${RN[@]}" rm tg_a$$
check "parent trash: the refusal says why, as rbd's" bash -c \
  "$RNQ rm tg_a$$ 2>&1 | grep -q 'has snapshots with linked clones' && rbd ls | grep -qx tg_a$$"
check "parent trash: with rbd_move_parent_to_trash_on_remove (CEPH_ARGS) rm moves it to the trash as USER_PARENT" bash -c \
  "CEPH_ARGS=--rbd_move_parent_to_trash_on_remove=true $RNQ rm tg_a$$ && in_trash a$$ tg && ! rbd ls | grep -qx tg_a$$"
rbd config pool set rbd rbd_move_parent_to_trash_on_remove true
check "parent trash: the pool's own setting (rbd config pool set) does the same" bash -c \
  "$RNQ rm tp_a$$ && in_trash a$$ tg tp"
rbd config pool remove rbd rbd_move_parent_to_trash_on_remove
check "parent trash: rbd trash ls --long shows them as rbd's own (source, expiry, parent)" bash -c \
  "rbd trash ls --all --long | grep -E '^[0-9a-f]+ +tp_a$$ +USER_PARENT .* expired at .* rbd/tg_a$$@' >/dev/null"
check "parent trash: the clone still reads through the trashed chain" same_export tc_a$$ "$work/tc_a$$.raw"
check "parent trash: rm of the last clone removes the chain's snapshots and both parents" bash -c \
  "$RNQ rm tc_a$$ && gone a$$"
trash_chain b$$
cat /dev/null >"$work/ids_b$$"
for n in tg tp; do rbd info --format json ${n}_b$$ | jq -r .id >>"$work/ids_b$$"; done
rbd rm --rbd_move_parent_to_trash_on_remove=true tg_b$$ >/dev/null 2>&1
rbd rm --rbd_move_parent_to_trash_on_remove=true tp_b$$ >/dev/null 2>&1
check "parent trash: parents moved by rbd rm are there as USER_PARENT" in_trash b$$ tg tp
check "parent trash: flatten of the last clone removes them (rbd's trash entries)" bash -c \
  "$RNQ flatten tc_b$$ && gone b$$"
check "parent trash: the flattened clone kept the bytes" same_export tc_b$$ "$work/tc_b$$.raw"
rbd rm tc_b$$ >/dev/null 2>&1
trash_chain c$$
cat /dev/null >"$work/ids_c$$"
for n in tg tp; do rbd info --format json ${n}_c$$ | jq -r .id >>"$work/ids_c$$"; done
CEPH_ARGS=--rbd_move_parent_to_trash_on_remove=true $RNQ rm tg_c$$ 2>/dev/null
CEPH_ARGS=--rbd_move_parent_to_trash_on_remove=true $RNQ rm tp_c$$ 2>/dev/null
check "parent trash: librbd removes parents that rados-nbd put in the trash (rbd rm of the last clone)" bash -c \
  "in_trash c$$ tg tp && rbd rm tc_c$$ >/dev/null 2>&1 && gone c$$"

# A trashed snapshot that no clone uses any more but that could not go with its last
# clone (the parent was served by shared writers, which hold no exclusive lock and take no
# owner requests, when the clone was removed): `rm` of the parent removes it first and
# then the parent, as librbd's PreRemoveRequest does (before: refused for "snapshots with
# linked clones" that had none).
rbd create --size 8M --object-size 1M tor_$$
rbd snap create tor_$$@s >/dev/null 2>&1
rbd clone tor_$$@s torc_$$ --rbd-default-clone-format 2
rbd snap rm tor_$$@s >/dev/null 2>&1
"${RN[@]}" config tor_$$ shared=true
if serve tor_$$; then
  check "orphan trash: rm of the last clone while its parent is served (shared) succeeds" "${RN[@]}" rm torc_$$
  check "orphan trash: the parent's trashed snapshot stayed (no owner to remove it), with no clone" bash -c \
    "rbd snap ls --all --format json tor_$$ | jq -e 'length == 1 and .[0].namespace.type == \"trash\"' >/dev/null"
  unserve
  check "orphan trash: rm of the parent removes the orphan snapshot and the parent" bash -c \
    "$RNQ config tor_$$ shared=false >/dev/null && $RNQ rm tor_$$ && ! rbd ls | grep -qx tor_$$ && ! rbd trash ls --all | grep -qw tor_$$"
else
  fail "orphan trash: serve tor_$$" "$(tail -3 "$work/serve.log")"
fi
rbd rm torc_$$ >/dev/null 2>&1; rbd snap purge tor_$$ >/dev/null 2>&1; rbd rm tor_$$ >/dev/null 2>&1

# Copy-up lengths as librbd's, on generated depth-2 chains (64 KiB objects): twin children
# of one middle snapshot, one written by librbd, one through rados-nbd, the same writes;
# then each child object's size (`rados stat`) and the bytes must agree. librbd 16 reads
# the copy-up data through the child's parent: sparse where the parent has the object,
# dense (zeros included, up to the parent's own overlap) where it reads the parent's parent
# (before the fix ours stopped at the base's data: 53248 bytes where librbd wrote 65536);
# without snapshots, less what the change overwrites, and nothing when the rest is zeros.
cat >"$work/culen.py" <<'PYEOF'
import os, random, sys, rados, rbd
mode, seed = sys.argv[1], int(sys.argv[2])
O, N = 1 << 16, 6
feat = (rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK |
        rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF)
r = random.Random(seed)
# The chain: the base's data, the middle's own writes and a cut of its overlap (a shrink
# and a grow back), a cut of the children's overlap, then the children's writes.
base = [(r.randrange(N * O - 4096), r.randrange(1, 40000)) for _ in range(r.randrange(3, 7))]
mid = [(r.randrange(N * O - 4096), r.randrange(1, 20000)) for _ in range(r.randrange(0, 3))]
mid_cut = r.choice([None, r.randrange(O, N * O)])
child_cut = r.choice([None, None, r.randrange(O, N * O)])
writes = [('w', off, min(r.randrange(1, 8192), N * O - off))
          for off in (r.randrange(N * O - 512) for _ in range(r.randrange(3, 9)))]
# Then writes and zeros over whole base extents (a stream of its own): without snapshots
# librbd leaves what a change overwrites out of the copy-up, and copies nothing up when
# the rest is all zeros (the object is then as long as the change, or empty).
r2 = random.Random(seed * 7919 + 1)
for off, n in r2.sample(base, min(2, len(base))):
    a = max(0, off - r2.randrange(0, 3000))
    b = min(N * O, off + n + r2.randrange(0, 3000))
    writes.append((r2.choice('wz'), a, b - a))
def data(i, n): return bytes([(i * 37 + 11) % 251 + 1]) * n
names = {k: 'cul%d%s' % (seed, k) for k in ('b', 'm', 'lib', 'our')}
cl = rados.Rados(conffile=os.environ['CEPH_CONF']); cl.connect()
io = cl.open_ioctx('rbd')
def prefix(img):
    with rbd.Image(io, img, read_only=True) as im:
        return im.block_name_prefix()
def size_of(img):
    with rbd.Image(io, img, read_only=True) as im:
        return im.size()
if mode == 'setup':
    R = rbd.RBD()
    R.create(io, names['b'], N * O, order=16, old_format=False, features=feat)
    with rbd.Image(io, names['b']) as im:
        for i, (off, n) in enumerate(base):
            im.write(data(i, min(n, N * O - off)), off)
        im.create_snap('s'); im.protect_snap('s')
    R.clone(io, names['b'], 's', io, names['m'], features=feat, order=16)
    with rbd.Image(io, names['m']) as im:
        if mid_cut:
            im.resize(mid_cut); im.resize(N * O)
        for i, (off, n) in enumerate(mid):
            im.write(data(i + 50, min(n, N * O - off)), off)
        im.create_snap('s'); im.protect_snap('s')
    for k in ('lib', 'our'):
        R.clone(io, names['m'], 's', io, names[k], features=feat, order=16)
        if child_cut:
            with rbd.Image(io, names[k]) as im:
                im.resize(child_cut); im.resize(N * O)
    with rbd.Image(io, names['lib']) as im:
        for i, (k, off, n) in enumerate(writes):
            if k == 'w':
                im.write(data(i + 100, n), off)
            else:
                im.write_zeroes(off, n)
    print(names['our'])
elif mode == 'nbd':
    import nbd
    h = nbd.NBD(); h.connect_uri(sys.argv[3])
    for i, (k, off, n) in enumerate(writes):
        if k == 'w':
            h.pwrite(data(i + 100, n), off)
        else:
            h.zero(n, off)
    h.flush(); h.shutdown()
elif mode == 'compare':
    bad = []
    pl, po = prefix(names['lib']), prefix(names['our'])
    for o in range(N):
        sz = []
        for p in (pl, po):
            try:
                sz.append(io.stat('%s.%016x' % (p, o))[0])
            except rados.ObjectNotFound:
                sz.append(None)
        if sz[0] != sz[1]:
            bad.append('object %d: librbd %s, ours %s' % (o, sz[0], sz[1]))
    reads = []
    for k in ('lib', 'our'):
        with rbd.Image(io, names[k], read_only=True) as im:
            reads.append(im.read(0, N * O))
    if reads[0] != reads[1]:
        bad.append('the bytes differ')
    if bad:
        print('seed %d (mid_cut %s child_cut %s): %s' % (seed, mid_cut, child_cut, '; '.join(bad)))
        sys.exit(1)
elif mode == 'clean':
    R = rbd.RBD()
    for k in ('lib', 'our', 'm', 'b'):
        try:
            with rbd.Image(io, names[k]) as im:
                for sn in list(im.list_snaps()):
                    im.unprotect_snap(sn['name'])
                    im.remove_snap(sn['name'])
            R.remove(io, names[k])
        except rbd.ImageNotFound:
            pass
PYEOF
for seed in 1 2 3 4 5; do
  why=
  our=$("$PY" "$work/culen.py" setup $seed 2>"$work/culen.err") || why="setup: $(tail -2 "$work/culen.err")"
  if [ -z "$why" ] && serve "$our"; then
    "$PY" "$work/culen.py" nbd $seed "$(uri "$our")" 2>"$work/culen.err" || why="writes: $(tail -2 "$work/culen.err")"
    unserve
  elif [ -z "$why" ]; then
    why="serve: $(tail -2 "$work/serve.log")"
  fi
  [ -z "$why" ] && { why=$("$PY" "$work/culen.py" compare $seed 2>&1) && why=; }
  if [ -z "$why" ]; then pass "copy-up lengths (depth 2, seed $seed): each object as long as librbd's twin's, same bytes"
  else fail "copy-up lengths (depth 2, seed $seed): each object as long as librbd's twin's, same bytes" "$why"; fi
  "$PY" "$work/culen.py" clean $seed >/dev/null 2>&1
done

# A map that claims an object the clone lacks: librbd marks an object EXISTS before its
# copy-up and never takes the mark back when the copy-up fails or its client dies (made
# here by removing the objects behind the map's back, the flag left clear). librbd's writes
# assert that the object exists and copy up when it does not; rados-nbd checks such a claim
# at the first change. Twin clones, the same changes (a partial write into each claimed
# object, a partial trim of one, a write into a claimed object the clone does have):
# librbd's twin (python3-rbd) and ours (NBD) export the same bytes, the model's.
cat >"$work/claim.py" <<'PYEOF'
import sys, rados, rbd
how, name = sys.argv[1], sys.argv[2]
MB = 1 << 20
def data(n, seed):
    return bytes((seed * 7 + i * 13) % 251 for i in range(n))
ops = [('w', 1 * MB + 4096, 4096, 1), ('t', 4 * MB + 65536, 131072, 0), ('w', 8 * MB + 100, 512, 2)]
if how == 'model':
    with open(name, 'r+b') as m:
        for k, off, n, seed in ops:
            m.seek(off); m.write(data(n, seed) if k == 'w' else bytes(n))
elif how == 'claim':
    # written by librbd (objects 0, 1, 2 copied up), objects 0 and 1 then removed
    c = rados.Rados(conffile=''); c.conf_read_file(); c.connect()
    io = c.open_ioctx('rbd')
    with rbd.Image(io, name) as img:
        for objno in (0, 1, 2):
            img.write(b'c', objno * 4 * MB + 3 * MB)
        prefix = img.stat()['block_name_prefix']
    for objno in (0, 1):
        io.remove_object('%s.%016x' % (prefix, objno))
    io.close(); c.shutdown()
elif how == 'librbd':
    c = rados.Rados(conffile=''); c.conf_read_file(); c.connect()
    io = c.open_ioctx('rbd')
    with rbd.Image(io, name) as img:
        for k, off, n, seed in ops:
            if k == 'w':
                img.write(data(n, seed), off)
            else:
                img.discard(off, n)
    io.close(); c.shutdown()
else:  # nbd URI
    import nbd
    h = nbd.NBD(); h.connect_uri(name)
    for k, off, n, seed in ops:
        if k == 'w':
            h.pwrite(data(n, seed), off)
        else:
            h.trim(n, off)
    h.flush(); h.shutdown()
PYEOF
cp "$work/base.raw" "$work/claim.raw"
for t in 0 1 2; do printf c | dd of="$work/claim.raw" bs=1 seek=$((t * 4 * MB + 3 * MB)) conv=notrunc status=none; done
# Objects 0 and 1 as the claims leave them to a reader: the parent's bytes (the copied-up
# 'c' went with the removed objects).
for t in 0 1; do dd if="$work/base.raw" of="$work/claim.raw" bs=1 skip=$((t * 4 * MB + 3 * MB)) \
  seek=$((t * 4 * MB + 3 * MB)) count=1 conv=notrunc status=none; done
"$PY" "$work/claim.py" model "$work/claim.raw"
why=
for t in clm clt; do
  rbd clone cbase@s $t$$ && "$PY" "$work/claim.py" claim $t$$ || why="making $t$$"
done
[ -z "$why" ] && { "$PY" "$work/claim.py" librbd clt$$ || why="librbd's changes"; }
if [ -z "$why" ] && serve clm$$; then
  "$PY" "$work/claim.py" nbd "$(uri clm$$)" || why="our changes"
  unserve
elif [ -z "$why" ]; then why="serve: $(tail -2 "$work/serve.log")"; fi
check "over-claiming map: the setup (twins, claims, changes) went through${why:+ ($why)}" test -z "$why"
check "over-claiming map: librbd's twin exports the model (the parent's bytes around the changes)" \
  same_export clt$$ "$work/claim.raw"
check "over-claiming map: ours exports the same bytes as librbd's twin" same_export clm$$ "$work/claim.raw"
check "over-claiming map: the map we left checks clean" rbd object-map check clm$$
check "over-claiming map: the daemon says what it found (log)" \
  grep -q "object 0 is marked in the object map but is not in the store" "$work/serve.log"
rbd rm clm$$ >/dev/null 2>&1; rbd rm clt$$ >/dev/null 2>&1

# Leave the pool as we found it (other suites share it): each chain from its leaf up, and
# cbase's other children, at once (each removal mostly waits for the cluster), then cbase.
rm_images() {
  local i
  for i in "$@"; do
    rbd snap unprotect "$i@s" >/dev/null 2>&1
    rbd snap purge "$i" >/dev/null 2>&1
    rbd rm "$i" >/dev/null 2>&1
  done
}
rms=()
rm_images ck dsf dsw srn srs slb & rms+=($!)
rm_images rn2 rn1 rnf & rms+=($!)
rm_images $(for k in 8 7 6 5 4 3 2 1; do echo v2c$k; done) & rms+=($!)
rm_images $(for k in 8 7 6 5 4 3 2 1; do echo v1c$k; done) & rms+=($!)
wait "${rms[@]}"
rbd snap unprotect cbase@s >/dev/null 2>&1
rbd snap purge cbase >/dev/null 2>&1
rbd rm cbase >/dev/null 2>&1
t_summary
