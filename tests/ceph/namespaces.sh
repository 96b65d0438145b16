#!/usr/bin/env bash
# RBD namespaces (`rbd namespace create POOL/NS`, ceph-csi's radosNamespace) against the
# cluster named by $CEPH_CONF: images addressed as POOL/NAMESPACE/IMAGE, served through the
# restricted client.nbd (osd 'profile rbd pool=rbd' covers the pool's namespaces), with
# Ceph's own tools (rbd, rados) as the oracle.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh" ceph-ns

rbd namespace create rbd/ns1
rbd create --size 64M rbd/ns1/img
# The same name in the default namespace: a different image.
rbd create --size 8M rbd/img
truncate -s $((64 * MB)) "$work/img.raw"
head -c $((8 * MB)) /dev/urandom | dd of="$work/img.raw" conv=notrunc status=none
head -c $MB /dev/urandom | dd of="$work/img.raw" bs=1M seek=40 conv=notrunc status=none
dd if="$work/img.raw" of="$work/img-40.raw" bs=1M skip=40 count=1 status=none

serve rbd/ns1/img
check "namespace image: served under its image name, 64 MiB" bash -c \
  "[ \"\$(nbdinfo --size '$(uri img)')\" = $((64 * MB)) ]"
check "namespace image: nbdcopy writes 8 MiB" nbdcopy --connections=4 \
  <(head -c $((8 * MB)) "$work/img.raw") "$(uri img)"
check "namespace image: nbdsh writes 1 MiB at 40 MiB" "$PY" -c "
import nbd
h = nbd.NBD(); h.connect_uri('$(uri img)')
h.pwrite(open('$work/img-40.raw','rb').read(), 40 << 20, nbd.CMD_FLAG_FUA)
h.shutdown()"
check "while served: the lock is on the header inside ns1" bash -c \
  "rbd lock ls rbd/ns1/img | grep -q 'auto [0-9]'"
unserve
check "namespace image: serve ends with exit 0" test "$UNSERVE_RC" = 0
check "after close: rbd export rbd/ns1/img equals what was written" bash -c \
  "[ \"\$(rbd export rbd/ns1/img - 2>/dev/null | sha)\" = \"\$(sha < '$work/img.raw')\" ]"
check "after close: rbd object-map check rbd/ns1/img passes" omap_check rbd/ns1/img
check "after close: object map not flagged invalid" bash -c "! rbd info rbd/ns1/img | grep -q invalid"
check "data objects live in RADOS namespace ns1" bash -c \
  "[ \"\$(rados -p rbd -N ns1 ls | grep -c '^rbd_data\.')\" = 3 ]"
# Other suites share the pool: look for this image's own objects only.
ns_id=$(rbd info rbd/ns1/img --format json | jq -r .id)
check "nothing of it in the default namespace" bash -c \
  "[ -n '$ns_id' ] && [ \"\$(rados -p rbd ls | grep -c '$ns_id')\" = 0 ]"
check "the default namespace's image of the same name is untouched (zeros)" bash -c \
  "[ \"\$(rbd export rbd/img - 2>/dev/null | sha)\" = \"\$(head -c $((8 * MB)) /dev/zero | sha)\" ]"
check "info rbd/ns1/img: namespace ns1, the id rbd reports" bash -c \
  "set -o pipefail; $RNQ info rbd/ns1/img --format json | jq -e --arg id \"\$(rbd info rbd/ns1/img --format json | jq -r .id)\" '.namespace == \"ns1\" and .id == \$id and .size == $((64 * MB))'"
check "info rbd/img: the default namespace's image" bash -c \
  "set -o pipefail; $RNQ info rbd/img --format json | jq -e '.namespace == \"\" and .size == $((8 * MB))'"
check "rados-nbd object-map check rbd/ns1/img agrees" "${RN[@]}" object-map check rbd/ns1/img

# Made by rados-nbd in the namespace: librbd opens it there.
check "create rbd/ns1/img2" "${RN[@]}" create --size 16M rbd/ns1/img2
check "ls rbd/ns1 lists both images" bash -c "[ \"\$($RNQ ls rbd/ns1 | tr '\n' ' ')\" = 'img img2 ' ]"
check "rbd ls rbd/ns1 lists img2" bash -c "rbd ls rbd/ns1 | grep -qx img2"
check "ls rbd lists the default namespace's img, not img2" bash -c \
  "$RNQ ls rbd >'$work/ls' && grep -qx img '$work/ls' && ! grep -qx img2 '$work/ls'"
head -c $((4 * MB)) /dev/urandom >"$work/img2.raw"
serve rbd/ns1/img2
check "img2: nbdcopy writes 4 MiB" nbdcopy "$work/img2.raw" "$(uri img2)"
unserve
check "img2: rbd export matches" bash -c \
  "[ \"\$(rbd export rbd/ns1/img2 - 2>/dev/null | head -c $((4 * MB)) | sha)\" = \"\$(sha < '$work/img2.raw')\" ]"
check "img2: rbd object-map check passes" omap_check rbd/ns1/img2
check "img2: rbd bench writes into it (librbd opens it read-write)" \
  rbd bench --io-type write --io-size 4K --io-total 64K rbd/ns1/img2
check "rm rbd/ns1/img2" "${RN[@]}" rm rbd/ns1/img2
check "rbd ls rbd/ns1 no longer lists img2" bash -c "! rbd ls rbd/ns1 | grep -qx img2"

# A namespace that does not exist: one line naming it, nothing written anywhere.
for cmd in "info rbd/nosuch/img" "create --size 1M rbd/nosuch/img" "ls rbd/nosuch"; do
  out=$("${RN[@]}" $cmd 2>&1); rc=$?
  if [ $rc -ne 0 ] && [ "$(echo "$out" | wc -l)" = 1 ] &&
    echo "$out" | grep -q 'namespace nosuch not found in pool rbd'; then
    pass "missing namespace: '$cmd' refused naming it"; else fail "missing namespace: '$cmd'" "rc=$rc: $out"; fi
done
check "missing namespace: no objects were made in it" bash -c "[ -z \"\$(rados -p rbd -N nosuch ls)\" ]"
check "the namespace can still be removed once empty" bash -c \
  "rbd rm rbd/ns1/img >/dev/null 2>&1 && rbd namespace rm rbd/ns1"

t_summary
