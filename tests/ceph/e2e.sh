#!/usr/bin/env bash
# End-to-end tests of the Ceph store against the cluster named by $CEPH_CONF, with Ceph's
# own tools (rbd, rados) as the oracle and real NBD clients (nbdcopy, nbdsh) as writers.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh" ceph-e2e
ids=()
remember_id() { ids+=("$(rbd info "$1" --format json | jq -r .id)"); }
header_of() { echo "rbd_header.$(rbd info "$1" --format json | jq -r .id)"; }

# ---------------------------------------------------------------- an image made by rbd
rbd create --size 64M e2e-a
remember_id e2e-a
# Expected content: random data in objects 0..5 (24 MiB) and one MiB at 40 MiB.
truncate -s $((64 * MB)) "$work/a.raw"
head -c $((24 * MB)) /dev/urandom | dd of="$work/a.raw" conv=notrunc status=none
head -c $MB /dev/urandom | dd of="$work/a.raw" bs=1M seek=40 conv=notrunc status=none
dd if="$work/a.raw" of="$work/a-40.raw" bs=1M skip=40 count=1 status=none

# --exclusive: the lock is kept (by default it would be handed to a librbd client that
# asks, tests/ceph/handover.sh), so the refusal below is rbd-nbd --exclusive's.
serve e2e-a --exclusive
hold e2e-a
check "rbd-made image: nbdcopy writes 24 MiB" nbdcopy --connections=4 \
  <(head -c $((24 * MB)) "$work/a.raw") "$(uri e2e-a)"
check "rbd-made image: nbdsh writes 1 MiB at 40 MiB" $PY -c "
import nbd
h = nbd.NBD(); h.connect_uri('$(uri e2e-a)')
h.pwrite(open('$work/a-40.raw','rb').read(), 40 << 20, nbd.CMD_FLAG_FUA)
h.shutdown()"
check "while served: rbd info shows the object map invalid" \
  bash -c "rbd info e2e-a | grep -q 'flags: object map invalid, fast diff invalid'"
check "while served: rbd lock ls shows our lock (cookie auto <watch>)" \
  bash -c "rbd lock ls e2e-a | grep -q 'auto [0-9]'"
check "while served: rados lock info: rbd_lock exclusive, tag internal" bash -c \
  "rados -p rbd lock info $(header_of e2e-a) rbd_lock | jq -e '.type == \"exclusive\" and .tag == \"internal\" and (.lockers | length) == 1'"
check "while served: lock cookie matches our header watch" bash -c "
  c=\$(rados -p rbd lock info $(header_of e2e-a) rbd_lock | jq -r '.lockers[0].cookie' | cut -d' ' -f2)
  rados -p rbd listwatchers $(header_of e2e-a) | grep -q \"cookie=\$c\$\""
check_fails "while served with --exclusive: a librbd writer is refused (rbd bench)" \
  timeout 60 rbd bench --io-type write --io-total 4096 e2e-a
check "while served: the server logged whom it refused the lock (librbd's RequestLock decoded)" \
  bash -c "for _ in \$(seq 1 100); do grep -q 'refused the lock to client\.[0-9]* (watch [0-9]*)' '$work/serve.log' && exit 0; sleep 0.1; done; exit 1"
check "while served: reads back what was written" bash -c \
  "nbdcopy '$(uri e2e-a)' - | cmp - '$work/a.raw'"
unhold
check_unserve "SIGTERM: clean exit"
check "after close: flags clear" bash -c "rbd info e2e-a | grep -q 'flags: $'"
check "after close: no lock" bash -c "[ -z \"\$(rbd lock ls e2e-a)\" ]"
check "after close: rbd object-map check passes" omap_check e2e-a
check "after close: rbd export equals what was written" bash -c \
  "[ \"\$(rbd export e2e-a - 2>/dev/null | sha)\" = \"\$(sha < '$work/a.raw')\" ]"
check "after close: rbd du shows 7 objects used (28 MiB)" bash -c \
  "rbd du e2e-a --format json | jq -e '.images[0].used_size == $((28 * MB))'"

# ---------------------------------------------------------------- rados-nbd create
check "rados-nbd create" "${RN[@]}" create --size 1G e2e-b
remember_id e2e-b
check "rbd info shows our features (rbd create's defaults)" bash -c \
  "rbd info e2e-b | grep -q 'features: layering, exclusive-lock, object-map, fast-diff, deep-flatten$'"
check "rbd object-map check passes on a new image" omap_check e2e-b
check "rados-nbd ls lists it" bash -c "$RNQ ls | grep -qx e2e-b"
check "rados-nbd info reads it" bash -c \
  "$RNQ info e2e-b --format json | jq -e '.size == $((1 << 30))'"
check "rbd bench can write to it (librbd opens our image)" \
  rbd bench --io-type write --io-size 4K --io-total 64K --io-pattern rand e2e-b
check "rbd object-map check after librbd wrote" omap_check e2e-b
check "rados-nbd object-map check agrees" "${RN[@]}" object-map check e2e-b
# What rbd create takes from the configuration, rados-nbd create takes too: the client's
# rbd_default_features and rbd_default_order (CEPH_ARGS, as ceph.conf gives them), the
# pool's own (rbd config pool set, in a pool of this suite's, as client.admin: client.nbd
# may write pool rbd only), and --image-feature over both.
# Each image against its rbd-made twin: features and order equal.
same_layout() { # same_layout A B: rbd info's features and order equal
  local a b
  a=$(rbd info "$1" --format json | jq -c '[.features, .order]') &&
    b=$(rbd info "$2" --format json | jq -c '[.features, .order]') && [ "$a" = "$b" ] ||
    { echo "$1: $a, $2: $b"; return 1; }
}
export -f same_layout
cfg="--rbd-default-features 13 --rbd-default-order 20"
check "client config (features 13, order 20): as rbd create's (librbd adds fast-diff to object-map)" bash -c \
  "CEPH_ARGS='$cfg' $RNQ create --size 8M e2e-cf && CEPH_ARGS='$cfg' rbd create --size 8M e2e-cfr &&
   rbd info e2e-cf | grep -q 'features: layering, exclusive-lock, object-map, fast-diff\$' && same_layout e2e-cf e2e-cfr"
check "client config features 3 (layering, striping; default stripes): layering only, as rbd create's" bash -c \
  "CEPH_ARGS='--rbd-default-features 3' $RNQ create --size 8M e2e-f3 && CEPH_ARGS='--rbd-default-features 3' rbd create --size 8M e2e-f3r &&
   rbd info e2e-f3 | grep -q 'features: layering\$' && same_layout e2e-f3 e2e-f3r"
check "--image-feature over the configuration, as rbd's" bash -c \
  "CEPH_ARGS='$cfg' $RNQ create --size 8M --image-feature layering --image-feature deep-flatten e2e-if &&
   CEPH_ARGS='$cfg' rbd create --size 8M --image-feature layering,deep-flatten e2e-ifr && same_layout e2e-if e2e-ifr"
check "journaling asked for: refused, nothing made" bash -c \
  "! $RNQ create --size 8M --image-feature layering,exclusive-lock,journaling e2e-j 2>'$work/j.err' &&
   grep -q journaling '$work/j.err' && ! rbd info e2e-j >/dev/null 2>&1"
cp_=e2e-cfg-$$
ceph osd pool create "$cp_" 8 >/dev/null 2>&1 && rbd pool init "$cp_" && rbd config pool set "$cp_" rbd_default_order 21 &&
  rbd config pool set "$cp_" rbd_default_features 'layering,exclusive-lock'
check "the pool's rbd config (order 21, layering and exclusive-lock): as rbd create's" bash -c \
  "'$BIN' --store 'ceph:$CEPH_CONF' create --size 8M $cp_/pc && rbd create --size 8M $cp_/pcr && same_layout $cp_/pc $cp_/pcr &&
   [ \"\$(rbd info $cp_/pc --format json | jq -c '[.features, .order]')\" = '[[\"layering\",\"exclusive-lock\"],21]' ]"
for i in e2e-cf e2e-cfr e2e-f3 e2e-f3r e2e-if e2e-ifr $cp_/pc $cp_/pcr; do rbd rm "$i" >/dev/null 2>&1; done
ceph osd pool rm "$cp_" "$cp_" --yes-i-really-really-mean-it >/dev/null 2>&1

# ---------------------------------------------------------------- kill -9 while writing
rbd create --size 256M e2e-k
remember_id e2e-k
serve e2e-k
cat > "$work/writer.py" <<PY
import nbd, os, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
log = open(sys.argv[2], 'w')
i = 0
while True:
    off = (i * 1048576 * 3 + 4096 * (i % 7)) % (256 << 20)
    pat = bytes([i % 250 + 1]) * 4096
    try:
        h.pwrite(pat, off)
    except Exception:
        break
    log.write(f"{off} {i % 250 + 1}\n"); log.flush()   # only acked writes are logged
    i += 1
PY
$PY "$work/writer.py" "$(uri e2e-k)" "$work/acked.log" 2>/dev/null &
writer=$!
for _ in $(seq 1 100); do
  [ -f "$work/acked.log" ] && [ "$(wc -l < "$work/acked.log")" -ge 150 ] && break; sleep 0.1
done
kill9 "$SERVE_PID"
wait "$writer" 2>/dev/null
acked=$(wc -l < "$work/acked.log")
check "kill -9: writes were acked before the kill ($acked)" test "$acked" -ge 20
check "kill -9: rbd info shows the object map invalid" \
  bash -c "rbd info e2e-k | grep -q 'object map invalid'"
reopen "$work/reopen.log" e2e-k
check "kill -9: the next open breaks the stale lock and serves" test $? = 0
check "kill -9: the reopen said it broke a stale lock" grep -q "stale" "$work/reopen.log"
check "kill -9: the reopen rebuilt the map" grep -qi "rebuil" "$work/reopen.log"
check "kill -9: every acked write is there" $PY -c "
import nbd
h = nbd.NBD(); h.connect_uri('$(uri e2e-k)')
last = {}
for line in open('$work/acked.log'):
    off, v = map(int, line.split()); last[off] = v
for off, v in last.items():
    got = h.pread(4096, off)
    assert got == bytes([v]) * 4096, f'offset {off}: lost acked write'
h.shutdown()"
check_unserve "kill -9: clean close after reopen"
check "kill -9: rbd object-map check passes" omap_check e2e-k
check "kill -9: flags clear" bash -c "rbd info e2e-k | grep -q 'flags: $'"

# ---------------------------------------------------------------- snapshots by rbd
rbd create --size 32M e2e-s
remember_id e2e-s
head -c $((12 * MB)) /dev/urandom > "$work/s1.raw"; truncate -s $((32 * MB)) "$work/s1.raw"
serve e2e-s
check "snapshot: first content written" nbdcopy "$work/s1.raw" "$(uri e2e-s)"
check_unserve "snapshot: clean close before the snapshot"
rbd snap create e2e-s@s1 >/dev/null 2>&1
cp "$work/s1.raw" "$work/s2.raw"
head -c $((8 * MB)) /dev/urandom | dd of="$work/s2.raw" bs=1M seek=4 conv=notrunc status=none
head -c $MB /dev/urandom | dd of="$work/s2.raw" bs=1M seek=20 conv=notrunc status=none
serve e2e-s
# Only the changed ranges (4..12 MiB, 20..21 MiB) are written, so `rbd diff` can check them.
check "snapshot: head overwritten through rados-nbd" $PY -c "
import nbd
h = nbd.NBD(); h.connect_uri('$(uri e2e-s)')
src = open('$work/s2.raw', 'rb').read()
for a, b in ((4 << 20, 12 << 20), (20 << 20, 21 << 20)):
    for off in range(a, b, 1 << 20):
        h.pwrite(src[off:off + (1 << 20)], off)
h.flush(); h.shutdown()"
check_unserve "snapshot: clean close"
check "snapshot: rbd export @s1 still equals the pre-snapshot content" bash -c \
  "[ \"\$(rbd export e2e-s@s1 - 2>/dev/null | sha)\" = \"\$(sha < '$work/s1.raw')\" ]"
check "snapshot: rbd export of the head equals the new content" bash -c \
  "[ \"\$(rbd export e2e-s - 2>/dev/null | sha)\" = \"\$(sha < '$work/s2.raw')\" ]"
check "snapshot: rbd object-map check (head)" omap_check e2e-s
check "snapshot: rbd object-map check (@s1)" omap_check e2e-s@s1
check "snapshot: rbd diff from s1 lists exactly objects 1, 2 and 5" bash -c \
  "rbd diff --from-snap s1 e2e-s --format json | jq -e '[.[] | (.offset / $((4 * MB)) | floor)] | unique == [1, 2, 5]'"
serve e2e-s@s1
snapuri="nbd+unix:///?socket=$sock"
check "snapshot: rados-nbd serves IMAGE@SNAP with the old content" bash -c \
  "nbdcopy '$snapuri' - | cmp - '$work/s1.raw'"
check "snapshot: IMAGE@SNAP is read-only" bash -c "nbdinfo --json '$snapuri' | jq -e '.exports[0].is_read_only'"
check "snapshot: serving a snapshot leaves the flags alone" bash -c "rbd info e2e-s | grep -q 'flags: $'"
check "snapshot: serving a snapshot takes no lock" bash -c "[ -z \"\$(rbd lock ls e2e-s)\" ]"
check_unserve "snapshot: clean close of the snapshot server"

# ---------------------------------------------------------------- client-side encryption
# `rbd encryption format` leaves no mark in the header: librbd writes a LUKS header at offset
# 0 with the data aligned to the object size. Where that offset is one object (LUKS1 on 4 MiB
# objects, LUKS2 on 32 MiB objects) the refusal names librbd; a LUKS volume with cryptsetup's
# layout (which is also librbd's LUKS2 on objects up to 16 MiB) is refused too, as either,
# until --allow-encrypted says it is to be served raw.
printf 'e2e-secret' > "$work/pass"
refusal() { # refusal IMAGE VERSION [DATA_OFFSET]: the one line serve must print
  local who="it is encrypted by librbd (rbd encryption format, LUKS$2)"
  [ -n "${3:-}" ] && who="it starts with a LUKS$2 header (data at $3 bytes), made by \`rbd encryption format\` or by cryptsetup on the device, which cannot be told apart"
  echo "rados-nbd: image rbd/$1 not served: $who; rados-nbd has no client-side encryption and would serve ciphertext; pass --allow-encrypted to serve the raw LUKS volume (right for a volume cryptsetup made on the device)"
}
refused() { # refused NAME IMAGE VERSION DATA_OFFSET|- [SERVE ARGS...]: serve exits 1 with that line
  local name=$1 img=$2 v=$3 off=$4 out rc; shift 4
  [ "$off" = - ] && off=
  rm -f "$sock"
  out=$(timeout 60 "${RN[@]}" serve "$img" "$@" --socket "$sock" 2>&1); rc=$?
  if [ "$rc" = 1 ] && [ "$out" = "$(refusal "$img" "$v" "$off")" ] && [ ! -e "$sock" ]; then
    pass "$name"
  else
    fail "$name" "exit $rc: $(echo "$out" | tail -3)"
  fi
}
rbd create --size 64M e2e-l1
rbd create --size 96M --object-size 32M e2e-l2
rbd create --size 64M e2e-l2d
check "encryption: rbd encryption format luks1 (4 MiB objects)" \
  timeout 120 rbd encryption format e2e-l1 luks1 "$work/pass"
check "encryption: rbd encryption format luks2 (32 MiB objects)" \
  timeout 120 rbd encryption format e2e-l2 luks2 "$work/pass"
check "encryption: rbd encryption format luks2 (4 MiB objects)" \
  timeout 120 rbd encryption format e2e-l2d luks2 "$work/pass"
rbd snap create e2e-l1@s >/dev/null 2>&1
refused "encryption: LUKS1 by librbd: serve refuses with one line, exit 1" e2e-l1 1 -
refused "encryption: LUKS1 by librbd: serve --read-only refuses too" e2e-l1 1 - --read-only
refused "encryption: LUKS1 by librbd: serve IMAGE@SNAP refuses too" e2e-l1@s 1 -
check "encryption: the refused read-write open left no lock and clear flags" bash -c \
  "[ -z \"\$(rbd lock ls e2e-l1)\" ] && rbd info e2e-l1 | grep -q 'flags: $'"
refused "encryption: LUKS2 by librbd (32 MiB objects): serve refuses with one line, exit 1" e2e-l2 2 -
serve e2e-l2 --allow-encrypted
check "encryption: --allow-encrypted serves the raw volume (nbdinfo)" nbdinfo "$(uri e2e-l2)"
check "encryption: --allow-encrypted: the first 32 MiB are librbd's raw bytes (LUKS header)" bash -c "
  set -e
  nbdcopy '$(uri e2e-l2)' - | head -c $((32 * MB)) > '$work/l2.head'
  [ \"\$(head -c 4 '$work/l2.head')\" = LUKS ]
  rbd export e2e-l2 - 2>/dev/null | head -c $((32 * MB)) | cmp - '$work/l2.head'"
check_unserve "encryption: --allow-encrypted: clean close"
check "encryption: --allow-encrypted: the log says what is served" \
  grep -q "e2e-l2 starts with a LUKS2 header (data offset 33554432); serving the raw LUKS volume" "$work/serve.log"
# LUKS2 by librbd on objects up to 16 MiB puts its data at 16 MiB, exactly where
# `cryptsetup luksFormat` does: the two cannot be told apart, so the refusal names both.
refused "encryption: LUKS2 by librbd on 4 MiB objects (the default) is refused too, naming both makers" \
  e2e-l2d 2 16777216
# LUKS volumes made on the device by cryptsetup (its default offsets: LUKS1 2 MiB, LUKS2
# 16 MiB), imported with `rbd import`: refused the same way, served raw when allowed.
$PY - "$work" <<'PY'
import json, sys
work = sys.argv[1]
def luks1(sectors):
    h = bytearray(592)
    h[0:6] = b'LUKS\xba\xbe'; h[6:8] = (1).to_bytes(2, 'big')
    h[8:11] = b'aes'; h[40:51] = b'xts-plain64'; h[72:78] = b'sha256'
    h[104:108] = sectors.to_bytes(4, 'big'); h[108:112] = (64).to_bytes(4, 'big')
    return bytes(h)
def luks2(offset):
    h = bytearray(16384)
    h[0:6] = b'LUKS\xba\xbe'; h[6:8] = (2).to_bytes(2, 'big')
    h[8:16] = (16384).to_bytes(8, 'big'); h[16:24] = (3).to_bytes(8, 'big')
    h[72:78] = b'sha256'
    j = json.dumps({"keyslots": {}, "tokens": {}, "digests": {},
                    "segments": {"0": {"type": "crypt", "offset": str(offset), "size": "dynamic",
                                       "iv_tweak": "0", "encryption": "aes-xts-plain64",
                                       "sector_size": 4096}},
                    "config": {"json_size": "12288", "keyslots_size": "16744448"}}).encode()
    h[4096:4096 + len(j)] = j
    return bytes(h)
for name, head in (("cs1", luks1(4096)), ("cs2", luks2(16 << 20))):
    with open(f"{work}/{name}.raw", "wb") as f:
        f.write(head); f.write(bytes(range(256)) * 4096); f.truncate(32 << 20)
PY
for v in 1 2; do
  rbd import --no-progress "$work/cs$v.raw" "e2e-cs$v" >/dev/null 2>&1
  off=$((v == 1 ? 2 * MB : 16 * MB))
  refused "encryption: LUKS$v with cryptsetup's default offset (rbd import) is refused without --allow-encrypted" \
    "e2e-cs$v" "$v" "$off"
  serve "e2e-cs$v" --allow-encrypted
  check "encryption: LUKS$v with cryptsetup's offset, --allow-encrypted: served byte for byte" \
    bash -c "nbdcopy '$(uri "e2e-cs$v")' - | cmp - '$work/cs$v.raw'"
  check_unserve "encryption: LUKS$v with cryptsetup's offset: clean close"
done
rbd snap purge e2e-l1 >/dev/null 2>&1
for i in e2e-l1 e2e-l2 e2e-l2d e2e-cs1 e2e-cs2; do rbd rm --no-progress "$i" >/dev/null 2>&1; done
check "encryption: test images removed" bash -c "! rbd ls | grep -q '^e2e-\(l\|cs\)'"

# ---------------------------------------------------------------- resize while served
# `rbd resize` of an image we hold goes to us as the lock owner (a Resize notification);
# we carry it out and answer AsyncComplete, as librbd's owner would.
rbd create --size 32M e2e-r
head -c $((32 * MB)) /dev/urandom > "$work/r.raw"
serve e2e-r
hold e2e-r
check "resize: 32 MiB written" nbdcopy "$work/r.raw" "$(uri e2e-r)"
check "resize: rbd resize --size 64M while we serve it succeeds" \
  timeout 60 rbd resize --no-progress --size 64M e2e-r
check "resize: rbd info shows 64 MiB" bash -c "rbd info e2e-r --format json | jq -e '.size == $((64 * MB))'"
check "resize: a new NBD connection sees 64 MiB" \
  bash -c "[ \"\$(nbdinfo --size '$(uri e2e-r)')\" = $((64 * MB)) ]"
check "resize: the new space is writable and reads back" $PY -c "
import nbd
h = nbd.NBD(); h.connect_uri('$(uri e2e-r)')
h.pwrite(b'grown' * 100, 60 << 20, nbd.CMD_FLAG_FUA)
assert h.pread(500, 60 << 20) == b'grown' * 100
h.shutdown()"
check "resize: the daemon did it (log)" grep -q "resized rbd/e2e-r from $((32 * MB)) to $((64 * MB)) bytes" "$work/serve.log"
check_fails "resize: shrinking without --allow-shrink is refused" \
  timeout 60 rbd resize --no-progress --size 22M e2e-r
check "resize: rbd resize --size 22M --allow-shrink while a client is connected; its writes past the new end fail" $PY -c "
import nbd, subprocess
h = nbd.NBD(); h.connect_uri('$(uri e2e-r)')
assert h.get_size() == 64 << 20
subprocess.run(['timeout', '60', 'rbd', 'resize', '--no-progress', '--size', '22M',
                '--allow-shrink', 'e2e-r'], check=True)
try:
    h.pwrite(b'x' * 512, 30 << 20)
    raise SystemExit('a write past the new end succeeded')
except nbd.Error as e:
    assert 'ENOSPC' in str(e), e
assert h.pread(512, 0) == open('$work/r.raw', 'rb').read(512)
h.shutdown()"
check "resize: objects past 22 MiB removed (6 data objects left)" bash -c "
  [ \$(rados -p rbd ls | grep -c \"^rbd_data.\$(rbd info e2e-r --format json | jq -r .id)\\.\") = 6 ]"
check "resize: rados-nbd resize of an image served elsewhere goes through the server" \
  timeout 60 "${RN[@]}" resize --size 40M e2e-r
check "resize: rbd info shows 40 MiB" bash -c "rbd info e2e-r --format json | jq -e '.size == $((40 * MB))'"
check "resize: rados-nbd resize --allow-shrink back to 22 MiB, through the server" \
  timeout 60 "${RN[@]}" resize --allow-shrink --size 22M e2e-r
unhold
check_unserve "resize: clean close after resizes"
check "resize: rbd object-map check passes" omap_check e2e-r
check "resize: flags clear after the clean close" bash -c "rbd info e2e-r | grep -q 'flags: $'"
check "resize: rbd export = the first 22 MiB written" bash -c \
  "[ \"\$(rbd export --no-progress e2e-r - | sha)\" = \"\$(head -c $((22 * MB)) '$work/r.raw' | sha)\" ]"
check "resize: rados-nbd resize of an idle Ceph image grows it" "${RN[@]}" resize --size 32M e2e-r
check "resize: the cut-off tail reads as zeros after growing again" bash -c \
  "[ \"\$(rbd export --no-progress e2e-r - | tail -c $((10 * MB)) | tr -d '\\0' | wc -c)\" = 0 ]"
check "resize: rbd object-map check after our offline resize" omap_check e2e-r
# The differential test found `rados-nbd resize` dying of SIGSEGV at exit in ~5% of runs:
# the cluster connection was shut down while the header watch's task still had a refresh
# out. 100 runs in a row (~10 s) all end with exit 0.
check "resize: 100 offline resizes in a row, none crashes at exit" bash -c "
  for i in \$(seq 100); do
    ${RNQ} resize --allow-shrink --size \$(( i % 2 ? 30 : 32 ))M e2e-r >/dev/null 2>&1 || { echo \"run \$i: exit \$?\"; exit 1; }
  done"
rbd rm --no-progress e2e-r >/dev/null 2>&1

# ---------------------------------------------------------------- fast-diff after partial discards
# Zeroing part of an object that is unchanged since the newest snapshot
# (EXISTS_CLEAN) changes its bytes; librbd marks it EXISTS, so `rbd diff --whole-object
# --from-snap` and an incremental backup (`rbd export-diff --whole-object`) see it.
rbd create --size 32M e2e-fd
head -c $((24 * MB)) /dev/urandom > "$work/fd.raw"; truncate -s $((32 * MB)) "$work/fd.raw"
serve e2e-fd
check "fast-diff: 24 MiB written" nbdcopy "$work/fd.raw" "$(uri e2e-fd)"
check_unserve "fast-diff: clean close before the snapshot"
rbd snap create e2e-fd@s1 >/dev/null 2>&1
rbd export --no-progress e2e-fd@s1 "$work/fd-s1.raw" >/dev/null 2>&1
serve e2e-fd
# Object 1: TRIM of 4 KiB; 2: WRITE_ZEROES; 3: WRITE_ZEROES with NO_HOLE; 4: a whole-object
# TRIM (removed); 0 and 5 untouched.
check "fast-diff: partial trim, zero, zero NO_HOLE and a whole-object trim" $PY -c "
import nbd
h = nbd.NBD(); h.connect_uri('$(uri e2e-fd)')
h.trim(4096, (4 << 20) + 8192)
h.zero(4096, (8 << 20) + 65536)
h.zero(512, (12 << 20) + 3, nbd.CMD_FLAG_NO_HOLE)
h.trim(4 << 20, 16 << 20)
h.flush(); h.shutdown()"
check_unserve "fast-diff: clean close"
check "fast-diff: rbd diff --whole-object --from-snap lists exactly objects 1-4" bash -c \
  "rbd diff --whole-object --from-snap s1 e2e-fd --format json | jq -e '[.[] | (.offset / $((4 * MB)) | floor)] | unique == [1, 2, 3, 4]'"
rbd create --size 32M e2e-fdb
check "fast-diff: an incremental backup (export-diff --whole-object) restores the head" bash -c "
  rbd import-diff --no-progress <(rbd export-diff --no-progress e2e-fd@s1 -) e2e-fdb &&
  rbd export-diff --no-progress --whole-object --from-snap s1 e2e-fd '$work/fd.diff' &&
  rbd import-diff --no-progress '$work/fd.diff' e2e-fdb &&
  [ \"\$(rbd export --no-progress e2e-fdb - | sha)\" = \"\$(rbd export --no-progress e2e-fd - | sha)\" ]"
# After the diff and the backup: a check that finds the map wrong flags it invalid, and the diff would
# then take the slow exact path.
check "fast-diff: rbd object-map check after partial discards" omap_check e2e-fd
rbd snap purge e2e-fdb >/dev/null 2>&1; rbd rm --no-progress e2e-fdb >/dev/null 2>&1
rbd snap purge e2e-fd >/dev/null 2>&1; rbd rm --no-progress e2e-fd >/dev/null 2>&1

# ---------------------------------------------------------------- a read-only server beside a writer
# `serve --read-only IMAGE` holds no lock, so another client may write the image
# meanwhile; objects created after it opened must read as what was written, not as holes.
rbd create --size 32M e2e-ro
serve e2e-ro
ro_sock=$work/ro.sock
rm -f "$ro_sock"
spawn "${RN[@]}" serve e2e-ro --read-only --socket "$ro_sock" 2>>"$work/serve-ro.log"
RO_PID=$!
wait_for_socket "$ro_sock" 30
head -c $MB /dev/urandom > "$work/ro-new.raw"
check "read-only beside a writer: the writer creates object 5 after the reader opened" $PY -c "
import nbd
h = nbd.NBD(); h.connect_uri('$(uri e2e-ro)')
h.pwrite(open('$work/ro-new.raw','rb').read(), 20 << 20, nbd.CMD_FLAG_FUA); h.shutdown()"
check "read-only beside a writer: the reader reads the new data" $PY -c "
import nbd
h = nbd.NBD(); h.connect_uri('nbd+unix:///e2e-ro?socket=$ro_sock')
assert h.pread(1 << 20, 20 << 20) == open('$work/ro-new.raw','rb').read(), 'read zeros or stale data'
h.shutdown()"
stop_daemon "$RO_PID"; RO_RC=$?
check "read-only beside a writer: the reader closes cleanly" test "$RO_RC" = 0
check_unserve "read-only beside a writer: the writer closes cleanly"
check "read-only beside a writer: rbd object-map check" omap_check e2e-ro
rbd rm --no-progress e2e-ro >/dev/null 2>&1

# ---------------------------------------------------------------- header timestamps
# librbd moves the header's modify_timestamp at a write, discard or zeroing (not a flush),
# and its access_timestamp at a read (of the image; of each ancestor a read through a clone,
# or a copy-up, reaches), once rbd_mtime_update_interval / rbd_atime_update_interval seconds
# (60 by default, 0 = never) have passed since the stamp last moved. Each case runs on an
# image served by rados-nbd and on a twin used through librbd (python3-rbd); which stamps
# moved must be the same for both, and what is expected.
stamp() { # stamp IMAGE modify|access: seconds since the epoch, or "missing"
  local t
  t=$(rbd info "$1" --format json | jq -er ".$2_timestamp") && date -d "$t" +%s || echo missing
}
stamps() { echo "$(stamp "$1" modify) $(stamp "$1" access)"; }
# nbd_io IMAGE OP [OFFSET]: one 4 KiB request (read, write, trim, zero) or a flush, through
# the served socket; rbd_io the same through librbd.
nbd_io() {
  $PY -c "
import nbd, sys
op, off = sys.argv[1], int(sys.argv[2])
h = nbd.NBD(); h.connect_uri('$(uri "$1")')
{'read': lambda: h.pread(4096, off), 'write': lambda: h.pwrite(b'x' * 4096, off),
 'trim': lambda: h.trim(4096, off), 'zero': lambda: h.zero(4096, off),
 'flush': lambda: h.flush()}[op]()
h.shutdown()" "$2" "${3:-0}"
}
rbd_io() {
  $PY -c "
import rados, rbd, sys
name, op, off = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = rados.Rados(conffile='$CEPH_CONF'); c.connect()
io = c.open_ioctx('rbd')
with rbd.Image(io, name) as im:
    {'read': lambda: im.read(off, 4096), 'write': lambda: im.write(b'x' * 4096, off),
     'trim': lambda: im.discard(off, 4096), 'zero': lambda: im.write_zeroes(off, 4096),
     'flush': lambda: im.flush()}[op]()
io.close(); c.shutdown()" "$1" "$2" "${3:-0}"
}
moved() { # moved BEFORE AFTER: "modify", "access", "modify access", "none", or "missing ..."
  case "$1 $2" in *missing*) echo "missing stamps ($1 -> $2)"; return ;; esac
  local b=($1) a=($2) out=()
  [ "${a[0]}" != "${b[0]}" ] && out+=(modify)
  [ "${a[1]}" != "${b[1]}" ] && out+=(access)
  echo "${out[*]:-none}"
}
# ts_case NAME EXPECTED OP OURS TWIN [WATCH_OURS WATCH_TWIN] [OFFSET]: OP on OURS (served)
# and TWIN (librbd); which stamps of WATCH_* (default: the images themselves) moved must be
# EXPECTED for both.
ts_case() {
  local w1=${6:-$4} w2=${7:-$5} b1 b2 m1 m2
  b1=$(stamps "$w1"); b2=$(stamps "$w2")
  serve "$4"
  nbd_io "$4" "$3" "${8:-0}"
  unserve
  rbd_io "$5" "$3" "${8:-0}"
  m1=$(moved "$b1" "$(stamps "$w1")"); m2=$(moved "$b2" "$(stamps "$w2")")
  check "timestamps, $1: $2 moved (rados-nbd: $m1, librbd: $m2)" \
    test "$m1" = "$2" -a "$m2" = "$2"
}
for i in e2e-t1 e2e-t1-twin e2e-t0 e2e-t0-twin e2e-t60 e2e-t60-twin; do
  rbd create --size 16M "$i"
done
for i in e2e-t1 e2e-t1-twin; do
  rbd config image set "$i" rbd_mtime_update_interval 1
  rbd config image set "$i" rbd_atime_update_interval 1
done
# Off in the pool's settings, for the pool's images that say nothing themselves.
rbd config pool set rbd rbd_mtime_update_interval 0
rbd config pool set rbd rbd_atime_update_interval 0
sleep 2.1
ts_case "intervals 1 s, a flush" none flush e2e-t1 e2e-t1-twin
ts_case "intervals 1 s, a write" modify write e2e-t1 e2e-t1-twin
ts_case "intervals 0 (pool setting), a write" none write e2e-t0 e2e-t0-twin
rbd config pool rm rbd rbd_mtime_update_interval
rbd config pool rm rbd rbd_atime_update_interval
ts_case "default intervals (60 s), a write 2 s after create" none write e2e-t60 e2e-t60-twin
sleep 2.1
ts_case "intervals 1 s, a read" access read e2e-t1 e2e-t1-twin
ts_case "intervals 1 s, a discard" modify trim e2e-t1 e2e-t1-twin
sleep 2.1
ts_case "intervals 1 s, a zeroing" modify zero e2e-t1 e2e-t1-twin
# Through a clone (format 2): a copy-up and a read the child cannot answer reach the parent
# (its access stamp moves); a read the child answers does not.
for i in e2e-t1 e2e-t1-twin; do
  rbd snap create --no-progress "$i@s"
  rbd clone --rbd-default-clone-format 2 "$i@s" "$i-c"
done
sleep 2.1
ts_case "a write through a clone (copy-up): the parent's" access write e2e-t1-c e2e-t1-twin-c \
  e2e-t1 e2e-t1-twin 4096
sleep 2.1
ts_case "a read the clone answers: the parent's" none read e2e-t1-c e2e-t1-twin-c \
  e2e-t1 e2e-t1-twin 4096
ts_case "a read the clone cannot answer: the parent's" access read e2e-t1-c e2e-t1-twin-c \
  e2e-t1 e2e-t1-twin $((8 * MB))
check "info shows the three timestamps and op features as rbd info (plain and JSON)" bash -c "
  for i in e2e-t1 e2e-t1-c; do
    diff <(rbd info \$i | grep -E '_timestamp|op_features') \
      <($RNQ info \$i | grep -E '_timestamp|op_features') || exit 1
    diff <(rbd info \$i --format json | jq -S '{op_features, create_timestamp, access_timestamp, modify_timestamp}') \
      <($RNQ info \$i --format json | jq -S '{op_features, create_timestamp, access_timestamp, modify_timestamp}') || exit 1
  done"
for i in e2e-t1 e2e-t1-twin; do
  rbd rm --no-progress "$i-c" >/dev/null 2>&1
  rbd snap purge --no-progress "$i" >/dev/null 2>&1
done
for i in e2e-t1 e2e-t1-twin e2e-t0 e2e-t0-twin e2e-t60 e2e-t60-twin; do
  rbd rm --no-progress "$i" >/dev/null 2>&1
done

# ---------------------------------------------------------------- shrink: the boundary object
# A shrink ending inside an object zeroes it from the new end to the old end only (librbd's
# TrimRequest "clean boundary"): never to the object's end, which would be a truncate that
# lengthens a short object (and with a snapshot clones it, so `rbd diff --from-snap` lists
# zeros). Plain image and clone, with and without a snapshot: rados-nbd's shrink and
# librbd's, on twins, must leave the objects as long and the diffs the same.
obj_len() { # obj_len IMAGE OBJNO: the data object's length, or "none"
  local pfx
  pfx=$(rbd info "$1" --format json | jq -r .block_name_prefix)
  rados -p rbd stat "$(printf '%s.%016x' "$pfx" "$2")" 2>/dev/null | sed -n 's/.* size \([0-9]*\).*/\1/p' | grep . || echo none
}
shrink_case() { # shrink_case NAME clone|plain snap|nosnap [unwritten]
  local w i
  for w in o t; do
    i=e2e-sh-$w
    if [ "$2" = clone ]; then
      rbd create --size 6M "$i-p" && rbd snap create --no-progress "$i-p@p"
      rbd clone --rbd-default-clone-format 2 "$i-p@p" "$i"
    else
      rbd create --size 6M "$i"
    fi
    [ "${4:-}" = unwritten ] || rbd_io "$i" write $((4 * MB + 8192))
    [ "$3" = snap ] && rbd snap create --no-progress "$i@s"
  done
  "${RN[@]}" resize --allow-shrink --size 5M e2e-sh-o >/dev/null 2>&1
  rbd resize --allow-shrink --size 5M --no-progress e2e-sh-t >/dev/null 2>&1
  local ours theirs
  ours="$(obj_len e2e-sh-o 1) | $(rbd diff e2e-sh-o | tr '\n' ' ')"
  theirs="$(obj_len e2e-sh-t 1) | $(rbd diff e2e-sh-t | tr '\n' ' ')"
  if [ "$3" = snap ]; then
    ours+=" | $(rbd diff --from-snap s e2e-sh-o | tr '\n' ' ')"
    theirs+=" | $(rbd diff --from-snap s e2e-sh-t | tr '\n' ' ')"
  fi
  check "shrink 6M -> 5M, $1: object 1's length and rbd diff as librbd's twin (rados-nbd: $ours; librbd: $theirs)" \
    bash -c "[ '$ours' = '$theirs' ] && [ \"\$(rbd export e2e-sh-o - 2>/dev/null | sha)\" = \"\$(rbd export e2e-sh-t - 2>/dev/null | sha)\" ]"
  for w in o t; do
    rbd snap purge --no-progress "e2e-sh-$w" >/dev/null 2>&1; rbd rm --no-progress "e2e-sh-$w" >/dev/null 2>&1
    rbd snap purge --no-progress "e2e-sh-$w-p" >/dev/null 2>&1; rbd rm --no-progress "e2e-sh-$w-p" >/dev/null 2>&1
  done
}
export -f sha
shrink_case "plain image" plain nosnap
shrink_case "plain image with a snapshot" plain snap
shrink_case "clone" clone nosnap
shrink_case "clone with a snapshot" clone snap
shrink_case "clone, the boundary object unwritten" clone nosnap unwritten

# ---------------------------------------------------------------- names as rbd takes them
# An image made by `rbd create` with white space, quotes and Unicode in its name, with a
# snapshot and a clone named likewise: served, renamed while served, read back, and checked
# with rbd (ls, snap ls, children, info, export, object-map check).
run_counted timeout -k 10 600 "$PY" -u "$here/../clients/odd_names.py" "$work" --ceph -- "${RN[@]}"

# ---------------------------------------------------------------- cleanup through rados-nbd
rbd snap purge e2e-s >/dev/null 2>&1
for i in e2e-a e2e-b e2e-k e2e-s; do
  check "rados-nbd rm $i" "${RN[@]}" rm "$i"
done
# e2e-s had snapshots: the OSD trims their clones in the background, and an object whose
# head is gone is listed until its last clone is trimmed. Give that up to 60 s; past that
# (the differential suites beside this one queue many trims ahead of ours: seen to take over
# 180 s), what is still listed must be such an object: a data object whose head is gone
# (`rados stat` reads the head), waiting for the OSD's snap trimmer, not for rados-nbd.
for _ in $(seq 1 120); do
  left=$(rados -p rbd ls | grep -F -e "${ids[0]}" -e "${ids[1]}" -e "${ids[2]}" -e "${ids[3]}" -e "rbd_id.e2e-")
  [ -z "$left" ] && break
  sleep 0.5
done
heads_left() { # heads_left NAME...: those that still have a head, or are not data objects
  local o
  for o in "$@"; do
    case $o in rbd_data.*) rados -p rbd stat "$o" >/dev/null 2>&1 && echo "$o" ;; *) echo "$o" ;; esac
  done
}
export -f heads_left
check "rados-nbd rm leaves no object of the removed images (only clones the OSD has yet to trim)" \
  bash -c 'l=$(heads_left "$@"); [ -z "$l" ] || { echo "left: $(echo $l | head -c 300)"; false; }' _ $left

t_summary
