#!/usr/bin/env bash
# `--quiesce` on Ceph: `rados-nbd serve --quiesce --quiesce-hook HOOK` of an image, then
# `rbd snap create` of it (librbd asks us, the lock owner, to take it; we notify Quiesce
# to every watcher of the header, ourselves included, and our hook runs). HOOK is a test
# script that logs its arguments and fails when told to. Checked, twice each: the hook
# quiesces then unquiesces and the snapshot exists and holds what was written before it;
# a failing hook fails `rbd snap create` (EIO), no snapshot, no unquiesce;
# `--ignore-quiesce-error` takes it anyway; `--skip-quiesce` runs no hook; without
# --quiesce `rbd snap create` works and runs no hook; and the maps check clean after.
# Runs against $CEPH_CONF like e2e.sh (tests/ceph/run.sh starts the cluster).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh" ceph-quiesce
same() { [ "$1" = "$2" ] || { echo "got '$2', expected '$1'"; return 1; }; }
img=quiesce-$$
hook=$work/hook.sh
log=$work/hook.log
cat >"$hook" <<HOOK
#!/bin/sh
echo "\$1 \$2" >>"$log"
[ -e "$work/sleep-\$2" ] && sleep "\$(cat "$work/sleep-\$2")"
if [ -e "$work/fail-\$2" ]; then echo "cannot \$2 \$1" >&2; exit 4; fi
exit 0
HOOK
chmod +x "$hook"
snaps() { rbd snap ls "$img" --format json | jq -r '[.[].name] | join(" ")'; }
hooklog() { paste -sd'|' "$log" 2>/dev/null; }
# hook_ran EXPECTED: the hook log reads EXPECTED ("ARGS|ARGS..."), waiting up to 30 s for
# it: the unquiesce runs after Unquiesce is acked, so `rbd snap create` may return first.
hook_ran() {
  local i
  for i in $(seq 1 300); do [ "$(hooklog)" = "$1" ] && break; sleep 0.1; done
  same "$1" "$(hooklog)"
}
write() { # write BYTE: 1 MiB of BYTE at offset 0 through rados-nbd
  $PY -c "
import nbd
h = nbd.NBD(); h.connect_uri('$(uri "$img")')
h.pwrite(bytes([$1]) * (1 << 20), 0); h.flush(); h.shutdown()"
}
first_byte() { rbd export "$1" - 2>/dev/null | head -c 1 | od -An -tu1 | tr -d ' '; }
# rbd snap create ARGS: bounded (librbd's own waits are bounded too: 10 quiesce notifies
# of 5 s, the owner's answer 30 s).
snap_create() { timeout -k 5 180 rbd snap create "$@"; }

rbd create --size 32M "$img"
serve "$img" --quiesce --quiesce-hook "$hook" || fail "serve --quiesce" "$(tail -3 "$work/serve.log")"
for round in 1 2; do
  : >"$log"
  check "round $round: write through rados-nbd" write $((round * 10))
  check "round $round: rbd snap create of the served image" snap_create "$img@ok$round"
  check "round $round: the hook quiesced, then unquiesced" hook_ran "rbd/$img quiesce|rbd/$img unquiesce"

  : >"$log"; touch "$work/fail-quiesce"
  out=$(snap_create "$img@bad$round" 2>&1); rc=$?
  rm -f "$work/fail-quiesce"
  check "round $round: a failing hook fails rbd snap create" test "$rc" != 0 -a "$rc" != 124
  check "round $round: ... with EIO" bash -c "grep -q 'Input/output error' <<<\"\$1\"" _ "$out"
  check "round $round: ... after the quiesce, with no unquiesce (as rbd-nbd)" same "rbd/$img quiesce" "$(hooklog)"
  check "round $round: ... and the daemon says which hook failed how" \
    bash -c "grep -q \"quiesce hook \\\`$hook rbd/$img quiesce\\\` failed (exit status 4): cannot quiesce\" '$work/serve.log'"

  : >"$log"; touch "$work/fail-quiesce"
  check "round $round: --ignore-quiesce-error takes it anyway" snap_create --ignore-quiesce-error "$img@ign$round"
  rm -f "$work/fail-quiesce"
  check "round $round: ... after the failed quiesce, with no unquiesce" same "rbd/$img quiesce" "$(hooklog)"

  : >"$log"
  check "round $round: --skip-quiesce" snap_create --skip-quiesce "$img@skip$round"
  check "round $round: ... runs no hook" same "" "$(hooklog)"
done
check "the snapshots taken exist, the failed ones do not" same \
  "ok1 ign1 skip1 ok2 ign2 skip2" "$(snaps)"
check "rados-nbd snap ls agrees" same "ok1 ign1 skip1 ok2 ign2 skip2" \
  "$("${RN[@]}" snap ls "$img" --format json | jq -r '[.[].name] | join(" ")')"
# Two snapshot takers at once (two Quiesce requests, as two notifiers would send them):
# the sessions run one after the other, as librbd's QuiesceWatchers queue them; the
# second hook runs only after the first session's unquiesce, never beside it.
: >"$log"; echo 2 >"$work/sleep-quiesce"
check "two quiesce sessions at once: both acked" "$PY" - "$CEPH_CONF" \
  "rbd_header.$(rbd info "$img" --format json | jq -r .id)" <<'PY'
import struct, sys, threading
import rados
conf, oid = sys.argv[1:]
c = rados.Rados(conffile=conf); c.connect(); io = c.open_ioctx("rbd")
# librbd's QuiescePayload / UnquiescePayload: ENCODE_START(7,1) { u32 op, AsyncRequestId }.
# python3-rados takes the payload as str (sent UTF-8 encoded): every byte here is ASCII.
def msg(op, rid):
    b = bytes([7, 1]) + struct.pack("<IIQQQ", 28, op, 0x1234, 1, rid)
    assert max(b) < 128
    return b.decode("ascii")
errors = []
def session(rid):
    try:
        io.notify(oid, msg(18, rid), 30000)   # quiesce: acked once our hook is done
        io.notify(oid, msg(19, rid), 5000)    # unquiesce
    except Exception as e:
        errors.append(f"session {rid}: {e}")
ts = [threading.Thread(target=session, args=(r,)) for r in (1, 2)]
for t in ts: t.start()
for t in ts: t.join()
io.close(); c.shutdown()
sys.exit("; ".join(errors) or None)
PY
rm -f "$work/sleep-quiesce"
check "... their hooks ran one session after the other (no quiesce beside another)" \
  hook_ran "rbd/$img quiesce|rbd/$img unquiesce|rbd/$img quiesce|rbd/$img unquiesce"
check "writes after the snapshots still work" write 99
check_unserve "serve --quiesce stops cleanly"
check "each snapshot holds what was written before it" same "10 20 99" \
  "$(first_byte "$img@ok1") $(first_byte "$img@ok2") $(first_byte "$img")"
check "object-map check of the head" omap_check "$img"
for s in ok1 ok2 skip2; do check "object-map check of @$s" omap_check "$img@$s"; done

# A hook slower than librbd's notify timeout (5 s): librbd sends the quiesce again while
# it runs; the hook runs once and its result answers the repeat. One that outlives our
# bound (RADOS_NBD_QUIESCE_HOOK_TIMEOUT_SECS) is killed and fails the snapshot.
export RADOS_NBD_QUIESCE_HOOK_TIMEOUT_SECS=9
serve "$img" --quiesce --quiesce-hook "$hook" || fail "serve --quiesce (9 s hook bound)" "$(tail -3 "$work/serve.log")"
unset RADOS_NBD_QUIESCE_HOOK_TIMEOUT_SECS
: >"$log"; echo 6 >"$work/sleep-quiesce"
check "a 6 s hook (librbd repeats its 5 s quiesce notify): rbd snap create waits for it" snap_create "$img@slow"
check "... the hook quiesced once, then unquiesced" hook_ran "rbd/$img quiesce|rbd/$img unquiesce"
: >"$log"; echo 60 >"$work/sleep-quiesce"
out=$(snap_create "$img@hung" 2>&1); rc=$?
rm -f "$work/sleep-quiesce"
check "a hook that outlives the 9 s bound fails rbd snap create" test "$rc" != 0 -a "$rc" != 124
# EIO, not ETIMEDOUT: librbd would re-send the whole request on ETIMEDOUT, again and again.
check "... with EIO (not ETIMEDOUT, which librbd would re-send)" bash -c "grep -q 'Input/output error' <<<\"\$1\" || { echo \"\$1\"; false; }" _ "$out"
# On failure, the daemon's account of the requests (which ids asked, which hook runs).
check "... after one quiesce and no unquiesce" bash -c \
  '[ "$1" = "$2" ] || { echo "got '"'"'$2'"'"', expected '"'"'$1'"'"'"; grep -E "quiesce|snapshot|asked by" "$3" | tail -20; false; }' \
  _ "rbd/$img quiesce" "$(hooklog)" "$work/serve.log"
check "... and the daemon says so" bash -c "grep -q 'did not finish within 9 s' '$work/serve.log'"
check "the slow snapshot exists, the hung one does not" bash -c \
  "rbd snap ls $img | grep -qw slow && ! rbd snap ls $img | grep -qw hung"
check_unserve "serve --quiesce stops cleanly after the hung hook"

# Without --quiesce: rbd snap create of the served image works and runs no hook.
: >"$log"
serve "$img" || fail "serve without --quiesce" "$(tail -3 "$work/serve.log")"
check "without --quiesce: rbd snap create of the served image" snap_create "$img@plain"
check "... runs no hook" same "" "$(hooklog)"
check "... and exists" bash -c "rbd snap ls $img | grep -qw plain"
check_unserve "serve stops cleanly"
rbd snap purge "$img" >/dev/null 2>&1
rbd rm "$img" >/dev/null 2>&1
t_summary
