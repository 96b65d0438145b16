#!/usr/bin/env bash
# Images whose data objects live in a separate pool (`rbd create --data-pool`; how images on
# erasure-coded pools are made: header and object map in a replicated pool, data in the EC
# one) against the cluster named by $CEPH_CONF, with Ceph's own tools (rbd, rados) as the
# oracle: made by rados-nbd and by rbd, served, snapshotted, rolled back, crashed and
# reopened, cloned (a plain child of a data-pool parent, and data-pool children), flattened
# and removed. First on a replicated data pool, then on an erasure-coded one (k=2, m=1) on
# three OSDs this suite starts itself, in a CRUSH root of their own so that no other pool
# moves onto them: refused without allow_ec_overwrites, as librbd refuses it, and served
# with it.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh" ceph-dp

dp=rbd-dp
ceph osd pool create "$dp" 8 >/dev/null 2>&1
ceph osd pool application enable "$dp" rbd >/dev/null 2>&1
# The daemon runs as a client restricted to the two pools, as a deployment would give it.
if [ -n "${CEPH_NBD_KEYRING:-}" ]; then
  ceph auth get-or-create client.nbd-dp mon 'profile rbd' \
    osd "profile rbd pool=rbd, profile rbd pool=$dp, profile rbd pool=rbd-ec" \
    -o "$work/nbd-dp.keyring" >/dev/null
  RN=("$BIN" --store "ceph:$CEPH_CONF" --id nbd-dp --keyring "$work/nbd-dp.keyring")
  RNQ=$(printf '%q ' "${RN[@]}")
fi
prefix_of() { rbd info "$1" --format json | jq -r .block_name_prefix; }
# count POOL PREFIX: how many objects of that prefix POOL holds.
count() { rados -p "$1" ls | grep -c "^$2\." ; }
# export_is IMAGE[@SNAP] FILE: rbd export of IMAGE equals FILE.
export_is() { [ "$(rbd export "$1" - 2>/dev/null | sha)" = "$(sha <"$2")" ]; }
export -f count export_is
# put FILE OFFSET LEN [SRC]: LEN random bytes (or SRC's) at OFFSET in the image served as
# the first name in $img and in the mirror FILE.
put() {
  local f=$1 off=$2 len=$3
  head -c "$len" /dev/urandom >"$work/chunk"
  dd if="$work/chunk" of="$f" bs=64K seek="$off" oflag=seek_bytes conv=notrunc status=none
  $PY -c "
import nbd
h = nbd.NBD(); h.connect_uri('$(uri "$img")')
h.pwrite(open('$work/chunk','rb').read(), $off, nbd.CMD_FLAG_FUA)
h.shutdown()"
}
# zap FILE OFFSET LEN: NBD trim of LEN bytes at OFFSET (whole objects here: they read as zeros
# afterwards, as librbd's discard of a whole object leaves them).
zap() {
  dd if=/dev/zero of="$1" bs=64K seek="$2" count="$3" iflag=count_bytes oflag=seek_bytes \
    conv=notrunc status=none
  $PY -c "
import nbd
h = nbd.NBD(); h.connect_uri('$(uri "$img")')
h.trim($3, $2); h.flush()
h.shutdown()"
}

# fill_served IMAGE MIB: serves the 64 MiB rbd/IMAGE (as $img), writes MIB MiB of random
# bytes at its start with nbdcopy, and starts its mirror $work/IMAGE.raw with them.
fill_served() {
  truncate -s $((64 * MB)) "$work/$1.raw"
  img=$1
  serve "rbd/$1"
  check "$1: nbdcopy writes $2 MiB" bash -c \
    "head -c $(($2 * MB)) /dev/urandom >'$work/w' && nbdcopy '$work/w' '$(uri "$1")'"
  dd if="$work/w" of="$work/$1.raw" conv=notrunc status=none
}

# --- made by rados-nbd: what rbd create --data-pool makes.
check "create --data-pool $dp rbd/dpa" "${RN[@]}" create --size 64M --data-pool "$dp" rbd/dpa
check "rbd info: data_pool $dp, the data-pool feature" bash -c \
  "rbd info rbd/dpa --format json | jq -e '.data_pool == \"$dp\" and (.features | index(\"data-pool\"))'"
pid=$(ceph osd pool ls detail --format json | jq -r '.[] | select(.pool_name == "rbd") | .pool_id')
check "the data objects' prefix carries the metadata pool's id, as librbd names it" bash -c \
  "[ \"\$(rbd info rbd/dpa --format json | jq -r .block_name_prefix)\" = \"rbd_data.$pid.\$(rbd info rbd/dpa --format json | jq -r .id)\" ]"
check "the data pool's overwrites were validated as librbd does (rbd_info)" bash -c \
  "[ \"\$(rados -p $dp get rbd_info -)\" = 'overwrite validated' ]"
check "info rbd/dpa shows the data pool where rbd info does (line after id)" bash -c \
  "diff <(rbd info rbd/dpa | sed -n '/id:/,/block_name_prefix/p') <($RNQ info rbd/dpa | sed -n '/id:/,/block_name_prefix/p')"
check "info --format json: data_pool" bash -c \
  "$RNQ info rbd/dpa --format json | jq -e '.data_pool == \"$dp\"'"
pa=$(prefix_of rbd/dpa)

fill_served dpa 16
put "$work/dpa.raw" $((40 * MB)) $MB
zap "$work/dpa.raw" $((4 * MB)) $((4 * MB))
check "snap create rbd/dpa@s1 while served" "${RN[@]}" snap create rbd/dpa@s1
cp "$work/dpa.raw" "$work/dpa-s1.raw"
# librbd allocates a snapshot's id in the data pool (whose OSDs keep and trim its clones):
# this suite is the pool's only user, so its snap_seq is s1's id.
check "s1's id was allocated in the data pool, as librbd does" bash -c \
  "[ \"\$(rbd snap ls rbd/dpa --format json | jq '.[] | select(.name == \"s1\") | .id')\" = \"\$(ceph osd pool ls detail --format json | jq '.[] | select(.pool_name == \"$dp\") | .snap_seq')\" ]"
put "$work/dpa.raw" 0 $MB
put "$work/dpa.raw" $((50 * MB)) $((64 * 1024))
check_unserve "dpa: serve ends with exit 0"
check "dpa: rbd export equals what was written" export_is rbd/dpa "$work/dpa.raw"
check "dpa@s1: rbd export equals the image when the snapshot was taken" \
  export_is rbd/dpa@s1 "$work/dpa-s1.raw"
check "dpa: rbd object-map check passes" omap_check rbd/dpa
check "dpa@s1: rbd object-map check passes" omap_check rbd/dpa@s1
check "dpa: no data object in the metadata pool" bash -c "[ \$(count rbd $pa) = 0 ]"
# Objects 0-3 and 10 at s1 (1 trimmed: removed), object 12 since; `rados ls` lists each
# object once (s1's copy of object 0 is a RADOS clone of it).
check "dpa: its data objects in $dp (objects 0, 2, 3, 10, 12)" bash -c \
  "[ \$(count $dp $pa) = 5 ]"
check "rbd diff --from-snap s1 and rados-nbd diff agree" bash -c \
  "diff <(rbd diff --from-snap s1 rbd/dpa --format json | jq -S .) <($RNQ diff --from-snap s1 rbd/dpa --format json | jq -S .)"
check "rbd diff --whole-object and rados-nbd's agree" bash -c \
  "diff <(rbd diff --whole-object rbd/dpa --format json | jq -S .) <($RNQ diff --whole-object rbd/dpa --format json | jq -S .)"
check "rbd du and rados-nbd du agree (head and s1)" bash -c \
  "diff <(rbd du rbd/dpa --format json | jq -S '.images | map({name, snapshot, provisioned_size, used_size})') <($RNQ du rbd/dpa --format json | jq -S '.images | map({name, snapshot, provisioned_size, used_size})')"
check "rados-nbd object-map check agrees" "${RN[@]}" object-map check rbd/dpa

# --- a crash: the map flagged invalid, the next open rebuilds it from the data pool.
# (One client held connected: when its last client leaves, serve checkpoints the map and
# clears the flag, which the kill could then find already done.)
serve rbd/dpa
hold dpa
put "$work/dpa.raw" $((20 * MB)) $MB
kill9 "$SERVE_PID"
unhold
check "after kill -9: rbd info shows the object map invalid" bash -c \
  "rbd info rbd/dpa | grep -q 'flags:.*object map invalid'"
check "the dead daemon's watch dropped" drop_dead_watch rbd/dpa
if reopen "$work/serve.log" rbd/dpa; then pass "reopen after kill -9"; else fail "reopen after kill -9" "$(tail -3 "$work/serve.log")"; fi
check "after reopen: the whole image reads back as written" bash -c \
  "[ \"\$(nbdcopy '$(uri dpa)' - | sha)\" = \"\$(sha <'$work/dpa.raw')\" ]"
check_unserve "dpa: reopened serve ends with exit 0"
check "after crash and reopen: rbd export equals" export_is rbd/dpa "$work/dpa.raw"
check "after crash and reopen: rbd object-map check passes" omap_check rbd/dpa
undrop_watches

# --- made by rbd: rados-nbd serves it and rbd reads what it wrote.
rbd create --size 32M --data-pool "$dp" rbd/dpl
rbd bench --io-type write --io-size 64K --io-total 8M --io-pattern rand rbd/dpl >/dev/null 2>&1
rbd export rbd/dpl "$work/dpl.raw" >/dev/null 2>&1
img=dpl
serve rbd/dpl
check "dpl (made by rbd): reads what rbd bench wrote" bash -c \
  "[ \"\$(nbdcopy '$(uri dpl)' - | sha)\" = \"\$(sha <'$work/dpl.raw')\" ]"
put "$work/dpl.raw" $((12 * MB)) $((3 * MB / 2))
zap "$work/dpl.raw" $((24 * MB)) $((4 * MB))
check_unserve "dpl: serve ends with exit 0"
check "dpl: rbd export equals" export_is rbd/dpl "$work/dpl.raw"
check "dpl: rbd object-map check passes" omap_check rbd/dpl
check "dpl: no data object in the metadata pool" bash -c "[ \$(count rbd $(prefix_of rbd/dpl)) = 0 ]"

# --- rollback: the snapshot's data comes back from the data pool's clones.
check "snap rollback rbd/dpa@s1" "${RN[@]}" snap rollback rbd/dpa@s1
check "after rollback: rbd export equals s1" export_is rbd/dpa "$work/dpa-s1.raw"
check "after rollback: rbd object-map check passes" omap_check rbd/dpa
cp "$work/dpa-s1.raw" "$work/dpa.raw"

# --- clones: a plain child reads its data-pool parent's objects (copy-up from the
# parent's data pool), children with a data pool of their own.
check "clone rbd/dpa@s1 rbd/dpc (no data pool)" "${RN[@]}" clone --rbd-default-clone-format 2 rbd/dpa@s1 rbd/dpc
check "dpc: no data pool (a clone does not inherit it, as rbd clone)" bash -c \
  "rbd info rbd/dpc --format json | jq -e '(has(\"data_pool\") | not) and (.features | index(\"data-pool\") | not)'"
cp "$work/dpa-s1.raw" "$work/dpc.raw"
img=dpc
serve rbd/dpc
check "dpc: reads its parent's snapshot" bash -c \
  "[ \"\$(nbdcopy '$(uri dpc)' - | sha)\" = \"\$(sha <'$work/dpc.raw')\" ]"
put "$work/dpc.raw" $((MB + 4096)) 8192
zap "$work/dpc.raw" $((8 * MB)) $((4 * MB))
put "$work/dpc.raw" $((41 * MB)) 4096
check_unserve "dpc: serve ends with exit 0"
check "dpc: rbd export equals (copy-up kept the parent's bytes around the writes)" \
  export_is rbd/dpc "$work/dpc.raw"
check "dpc: rbd object-map check passes" omap_check rbd/dpc
check "dpc: its objects in the metadata pool, none in $dp" bash -c \
  "p=\$(rbd info rbd/dpc --format json | jq -r .block_name_prefix); [ \$(count rbd \$p) = 3 ] && [ \$(count $dp \$p) = 0 ]"
check "dpa@s1 unchanged by the child's writes" export_is rbd/dpa@s1 "$work/dpa-s1.raw"

check "clone --data-pool $dp rbd/dpa@s1 rbd/dpd" "${RN[@]}" clone --rbd-default-clone-format 2 --data-pool "$dp" rbd/dpa@s1 rbd/dpd
check "dpd: rbd info shows data_pool $dp and the parent" bash -c \
  "rbd info rbd/dpd --format json | jq -e '.data_pool == \"$dp\" and .parent.image == \"dpa\"'"
cp "$work/dpa-s1.raw" "$work/dpd.raw"
img=dpd
serve rbd/dpd
put "$work/dpd.raw" $((10 * MB)) $((2 * MB))
zap "$work/dpd.raw" 0 $((4 * MB))
check_unserve "dpd: serve ends with exit 0"
check "dpd: rbd export equals" export_is rbd/dpd "$work/dpd.raw"
check "dpd: rbd object-map check passes" omap_check rbd/dpd
pd=$(prefix_of rbd/dpd)
check "dpd: its objects in $dp, none in the metadata pool" bash -c \
  "[ \$(count $dp $pd) = 2 ] && [ \$(count rbd $pd) = 0 ]"
check "flatten rbd/dpd" "${RN[@]}" flatten rbd/dpd
check "dpd flattened: no parent, bytes unchanged" bash -c \
  "! rbd info rbd/dpd --format json | jq -e .parent >/dev/null && export_is rbd/dpd '$work/dpd.raw'"
check "dpd flattened: rbd object-map check passes" omap_check rbd/dpd
check "rm rbd/dpd" "${RN[@]}" rm rbd/dpd
check "rm: no object of dpd left in $dp or the metadata pool" bash -c \
  "[ \$(count $dp $pd) = 0 ] && [ \$(count rbd $pd) = 0 ]"

rbd clone --rbd-default-clone-format 2 --data-pool "$dp" rbd/dpa@s1 rbd/dpe
cp "$work/dpa-s1.raw" "$work/dpe.raw"
img=dpe
serve rbd/dpe
put "$work/dpe.raw" $((3 * MB)) $((2 * MB))
check_unserve "dpe (rbd clone --data-pool): serve ends with exit 0"
check "dpe: rbd export equals" export_is rbd/dpe "$work/dpe.raw"
check "dpe: rbd object-map check passes" omap_check rbd/dpe

# --- what cannot be done: refused in one line, nothing made.
out=$("${RN[@]}" create --size 8M --data-pool nosuch rbd/dpx 2>&1); rc=$?
if [ $rc -ne 0 ] && [ "$(echo "$out" | wc -l)" = 1 ] && grep -q "data pool nosuch" <<<"$out"; then
  pass "--data-pool nosuch: refused naming the pool"; else fail "--data-pool nosuch" "rc=$rc: $out"; fi
check "--data-pool nosuch: no image made (rbd ls, rbd_id)" bash -c \
  "! rbd ls rbd | grep -qx dpx && ! rados -p rbd stat rbd_id.dpx >/dev/null 2>&1"
check "--data-pool rbd (the image's own pool): no data-pool feature, as librbd" bash -c \
  "$RNQ create --size 8M --data-pool rbd rbd/dpy && rbd info rbd/dpy --format json | jq -e '(has(\"data_pool\") | not) and (.features | index(\"data-pool\") | not)'"
mkdir -p "$work/dir"
out=$("$BIN" --store "dir:$work/dir" create --size 8M --data-pool "$dp" rbd/x 2>&1); rc=$?
if [ $rc -ne 0 ] && grep -q "Ceph store feature" <<<"$out" &&
  [ -z "$("$BIN" --store "dir:$work/dir" ls rbd 2>/dev/null)" ]; then
  pass "dir store: --data-pool refused, says why"; else fail "dir store: --data-pool" "rc=$rc: $out"; fi

# A client with no caps on the data pool (client.nbd: pool rbd only) is refused at the open
# with a line naming the object it could not read, rather than serving zeros.
if [ -n "${CEPH_NBD_KEYRING:-}" ]; then
  out=$(timeout 60 "$BIN" --store "ceph:$CEPH_CONF" --id "${CEPH_NBD_ID:-nbd}" \
    --keyring "$CEPH_NBD_KEYRING" serve rbd/dpa --socket "$work/x.sock" 2>&1); rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -q "rbd_data\.$pid\..*Operation not permitted" <<<"$out"; then
    pass "no caps on the data pool: serve refused naming the data object"
  else fail "no caps on the data pool" "rc=$rc: $(tail -2 <<<"$out")"; fi
fi

# --- an erasure-coded data pool.
ec=rbd-ec
# The CRUSH root, erasure-code profile and rule are this run's own: on a cluster a run
# used before, an old root holds that run's dead OSDs, and a rule of the pool's name would
# be reused with it (the pool's PGs then wait on dead OSDs).
ecroot=rbdnbd-ec-$$
# start_ec_osds: three more OSDs (ours: spawned in the foreground, ended at exit by pid),
# under CRUSH root $ecroot, one host each; true once all are up.
start_ec_osds() {
  local n id d
  for n in 1 2 3; do
    id=$(ceph osd create) || return 1
    d=$work/osd$id
    mkdir -p "$d"
    if [ -n "${CEPH_NBD_KEYRING:-}" ]; then
      ceph auth get-or-create "osd.$id" mon 'allow profile osd' osd 'allow *' \
        mgr 'allow profile osd' -o "$d/keyring" >/dev/null || return 1
    fi
    ceph-osd -c "$CEPH_CONF" -i "$id" --osd-data "$d" --keyring "$d/keyring" --mkfs \
      >"$d/mkfs.log" 2>&1 || { tail -3 "$d/mkfs.log"; return 1; }
    spawn ceph-osd -f -c "$CEPH_CONF" -i "$id" --osd-data "$d" --keyring "$d/keyring" \
      --crush-location "root=$ecroot host=$ecroot-$id" 2>>"$d/stderr.log"
    EC_IDS+=("$id")
  done
  for _ in $(seq 1 240); do
    [ "$(ceph osd dump --format json | jq --argjson ids "[$(IFS=,; echo "${EC_IDS[*]}")]" \
      '[.osds[] | select(.up == 1 and (.osd as $o | $ids | index($o)))] | length')" = 3 ] && return 0
    sleep 0.25
  done
  echo "the EC OSDs ${EC_IDS[*]} did not come up" >&2; return 1
}
EC_IDS=()
ec_up=0
# Not under `check` nor `$(...)`: a subshell would lose the OSDs' pids (ended at exit).
if start_ec_osds 2>"$work/ec-osds.err"; then
  pass "three OSDs of our own for an EC pool (CRUSH root $ecroot)"
  ceph osd erasure-code-profile set "$ecroot" k=2 m=1 crush-root="$ecroot" \
    crush-failure-domain=osd >/dev/null 2>&1
  ceph osd crush rule create-erasure "$ecroot" "$ecroot" >/dev/null 2>&1
  ceph osd pool create "$ec" 8 8 erasure "$ecroot" "$ecroot" >/dev/null 2>&1
  ceph osd pool application enable "$ec" rbd >/dev/null 2>&1
  if ceph osd pool ls | grep -qx "$ec"; then
    pass "EC pool $ec (k=2, m=1) made"; ec_up=1
  else fail "EC pool $ec (k=2, m=1) made"; fi
else
  fail "three OSDs of our own for an EC pool" "$(tail -3 "$work/ec-osds.err")"
fi
if [ $ec_up = 1 ]; then
  out=$("${RN[@]}" create --size 64M --data-pool "$ec" rbd/ec1 2>&1); rc=$?
  if [ $rc -ne 0 ] && [ "$(echo "$out" | wc -l)" = 1 ] && grep -q "allow_ec_overwrites" <<<"$out"; then
    pass "EC pool without overwrites: create --data-pool refused, naming allow_ec_overwrites"
  else fail "EC pool without overwrites: create --data-pool" "rc=$rc: $out"; fi
  check "EC pool without overwrites: no image made" bash -c \
    "! rbd ls rbd | grep -qx ec1 && ! rados -p rbd stat rbd_id.ec1 >/dev/null 2>&1"
  # A plain write of a new rbd_info would have passed on this pool (a new object is an
  # append) and marked it validated for librbd too.
  check "EC pool without overwrites: rbd_info left as librbd leaves it (validate)" bash -c \
    "[ \"\$(rados -p $ec get rbd_info -)\" = validate ]"
  check "EC pool without overwrites: rbd create --data-pool refuses it too" bash -c \
    "! rbd create --size 8M --data-pool $ec rbd/ec0 2>/dev/null"
  ceph osd pool set "$ec" allow_ec_overwrites true >/dev/null 2>&1
  check "allow_ec_overwrites: create --data-pool $ec rbd/ec1" \
    "${RN[@]}" create --size 64M --data-pool "$ec" rbd/ec1
  check "allow_ec_overwrites: rbd_info overwrite validated" bash -c \
    "[ \"\$(rados -p $ec get rbd_info -)\" = 'overwrite validated' ]"
  fill_served ec1 12
  put "$work/ec1.raw" $((3 * 4096)) 4096
  put "$work/ec1.raw" 100000 65536
  zap "$work/ec1.raw" $((4 * MB)) $((4 * MB))
  check "snap create rbd/ec1@s1 while served" "${RN[@]}" snap create rbd/ec1@s1
  cp "$work/ec1.raw" "$work/ec1-s1.raw"
  put "$work/ec1.raw" 5000 70000
  put "$work/ec1.raw" $((30 * MB)) $MB
  check_unserve "ec1: serve ends with exit 0"
  check "ec1: rbd export equals" export_is rbd/ec1 "$work/ec1.raw"
  check "ec1@s1: rbd export equals" export_is rbd/ec1@s1 "$work/ec1-s1.raw"
  check "ec1: rbd object-map check passes" omap_check rbd/ec1
  check "ec1@s1: rbd object-map check passes" omap_check rbd/ec1@s1
  check "ec1: its data objects (0, 2, 7) in $ec" bash -c "[ \$(count $ec $(prefix_of rbd/ec1)) = 3 ]"
  check "clone --data-pool $ec rbd/ec1@s1 rbd/ec1c" \
    "${RN[@]}" clone --rbd-default-clone-format 2 --data-pool "$ec" rbd/ec1@s1 rbd/ec1c
  cp "$work/ec1-s1.raw" "$work/ec1c.raw"
  img=ec1c
  serve rbd/ec1c
  put "$work/ec1c.raw" $((2 * MB)) 512
  zap "$work/ec1c.raw" $((8 * MB)) $((4 * MB))
  check_unserve "ec1c: serve ends with exit 0"
  check "ec1c: rbd export equals (copy-up from the EC parent)" export_is rbd/ec1c "$work/ec1c.raw"
  check "ec1c: rbd object-map check passes" omap_check rbd/ec1c
  check "flatten rbd/ec1c" "${RN[@]}" flatten rbd/ec1c
  check "ec1c flattened: bytes unchanged, rbd object-map check passes" bash -c \
    "export_is rbd/ec1c '$work/ec1c.raw' && omap_check rbd/ec1c"
  pc=$(prefix_of rbd/ec1c)
  check "rm rbd/ec1c: nothing of it left in $ec" bash -c \
    "$RNQ rm rbd/ec1c && [ \$(count $ec $pc) = 0 ]"
fi

# Generated sequences on data-pool images (tests/ceph/differential.py with DIFF_DATA_POOL:
# twins made by librbd with --data-pool, one served by rados-nbd), flat and clone chains, a
# few of each here (DP_DIFF_SEQS, default 4; longer campaigns by hand).
dseqs=${DP_DIFF_SEQS:-4}
dclient=()
[ -n "${CEPH_NBD_KEYRING:-}" ] && dclient=(CEPH_NBD_ID=nbd-dp CEPH_NBD_KEYRING="$work/nbd-dp.keyring")
# First the EC cases earlier runs found (tests/ceph/diff-cases/ec-*.json): a shrink of a
# clone with a snapshot copies up through a sparse read past the end of an ancestor's
# object, which librados' C++ decoder failed with EIO on an EC pool.
if [ $ec_up = 1 ]; then
  for c in "$here"/diff-cases/ec-*.json; do
    run_counted again_if_crashed env "${dclient[@]}" RADOS_NBD_BIN="$BIN" DIFF_DATA_POOL="$ec" DIFF_PREFIX=dpdiff \
      timeout -k 10 600 "$PY" -u "$here/differential.py" --replay "$c"
  done
fi
# The flat ones on the replicated data pool, the clone ones on the EC pool when it is up.
cpool=$dp; [ $ec_up = 1 ] && cpool=$ec
run_counted again_if_crashed env "${dclient[@]}" RADOS_NBD_BIN="$BIN" DIFF_DATA_POOL="$dp" DIFF_PREFIX=dpdiff \
  timeout -k 10 600 "$PY" -u "$here/differential.py" --seqs "$dseqs" --seed 4100
run_counted again_if_crashed env "${dclient[@]}" RADOS_NBD_BIN="$BIN" DIFF_DATA_POOL="$cpool" DIFF_PREFIX=dpdiff \
  DIFF_CLONE_DEPTHS=1,2 timeout -k 10 600 "$PY" -u "$here/differential.py" --clone --seqs "$dseqs" --seed 11100

# The suite's images go; the pool is this suite's own.
for i in dpe dpc dpl dpy; do rbd rm "rbd/$i" >/dev/null 2>&1; done
for i in dpa ec1; do rbd snap purge "rbd/$i" >/dev/null 2>&1; rbd rm "rbd/$i" >/dev/null 2>&1; done
# The EC pool goes before its OSDs (ended at exit), so nothing waits on it, and the rule
# and profile with it; the OSDs stay in the map, down, under this run's root.
if [ $ec_up = 1 ]; then
  ceph osd pool rm "$ec" "$ec" --yes-i-really-really-mean-it >/dev/null 2>&1
  ceph osd crush rule rm "$ecroot" >/dev/null 2>&1
  ceph osd erasure-code-profile rm "$ecroot" >/dev/null 2>&1
fi
t_summary
