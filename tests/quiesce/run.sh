#!/usr/bin/env bash
# `--quiesce` on the directory store (no kernel needed): `rados-nbd serve --quiesce
# --quiesce-hook HOOK` of an image, then `rados-nbd snap create` of it, which asks the
# serving daemon. HOOK is a test script that logs its arguments and fails when told to
# (a file next to it says which phase fails, or that it hangs). Checked: the hook runs
# `IMAGE quiesce` before and `IMAGE unquiesce` after the snapshot, and data written before
# is in the snapshot; a failing quiesce fails `snap create` with the hook and its exit
# status named, no snapshot is listed and no unquiesce follows (as rbd-nbd); a failing
# unquiesce keeps the snapshot; --ignore-quiesce-error and --skip-quiesce as rbd's; a hook
# that hangs is killed after RADOS_NBD_QUIESCE_HOOK_TIMEOUT_SECS and fails the snapshot;
# without --quiesce no hook runs. Each round twice, so a second quiesce after a failed
# one works too.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
work=$(mktemp -d /tmp/rados-nbd-quiesce.XXXXXX)
trap 'cleanup_pids; rm -rf "$work"' EXIT
export RADOS_NBD_STORE=$work/store
mkdir -p "$RADOS_NBD_STORE"
sock=$work/nbd.sock
hook=$work/hook.sh
log=$work/hook.log
# The hook: logs "ARGS", then fails its phase when $work/fail-PHASE exists, hangs when
# $work/hang exists.
cat >"$hook" <<HOOK
#!/bin/sh
echo "\$1 \$2" >>"$log"
[ -e "$work/hang" ] && exec sleep 600
if [ -e "$work/fail-\$2" ]; then echo "cannot \$2 \$1" >&2; exit 4; fi
exit 0
HOOK
chmod +x "$hook"

serve() {
  rm -f "$sock"
  spawn "$BIN" serve "$@" --socket "$sock" 2>>"$work/serve.log"
  SERVE_PID=$!
  wait_for_socket "$sock" 30
}
unserve() { stop_daemon "$SERVE_PID"; UNSERVE_RC=$?; rm -f "$sock"; }
snaps() { "$BIN" snap ls q1 --format json | jq -r '[.[].name] | join(" ")'; }
write() { # write BYTE: 1 MiB of BYTE at offset 0 through NBD
  $PY -c "
import nbd
h = nbd.NBD(); h.connect_uri('nbd+unix:///q1?socket=$sock')
h.pwrite(bytes([$1]) * (1 << 20), 0); h.flush(); h.shutdown()"
}
same() { [ "$1" = "$2" ] || { echo "got '$2', expected '$1'"; return 1; }; }
first_byte() { # first_byte IMAGE@SNAP: its first byte, read through a read-only serve
  local s2=$work/snap.sock pid b
  rm -f "$s2"
  spawn "$BIN" serve "$1" --socket "$s2" 2>>"$work/serve.log"; pid=$!
  wait_for_socket "$s2" 30 || { stop_daemon "$pid"; return 1; }
  b=$($PY -c "
import nbd
h = nbd.NBD(); h.connect_uri('nbd+unix:///${1%@*}?socket=$s2')
print(h.pread(1, 0)[0]); h.shutdown()")
  stop_daemon "$pid"; rm -f "$s2"
  echo "$b"
}

check "create image" "$BIN" create --size 16M q1
serve q1 --quiesce --quiesce-hook "$hook" || fail "serve --quiesce" "$(tail -3 "$work/serve.log")"
for round in 1 2; do
  : >"$log"
  check "round $round: write before the snapshot" write $((round * 10))
  check "round $round: snap create of the served image" "$BIN" snap create "q1@ok$round"
  check "round $round: the hook quiesced, then unquiesced" same "rbd/q1 quiesce|rbd/q1 unquiesce" "$(paste -sd'|' "$log")"

  : >"$log"; touch "$work/fail-quiesce"
  out=$("$BIN" snap create "q1@bad$round" 2>&1); rc=$?
  rm -f "$work/fail-quiesce"
  check "round $round: a failing quiesce fails snap create" test "$rc" != 0
  check "round $round: the error names the hook and its exit status" \
    bash -c "grep -q '$hook' <<<\"\$1\" && grep -q 'exit status 4' <<<\"\$1\" && grep -q 'no snapshot taken' <<<\"\$1\"" _ "$out"
  check "round $round: the hook's own message is in it" bash -c "grep -q 'cannot quiesce rbd/q1' <<<\"\$1\"" _ "$out"
  check "round $round: no unquiesce after a failed quiesce (as rbd-nbd)" same "rbd/q1 quiesce" "$(paste -sd'|' "$log")"

  : >"$log"; touch "$work/fail-unquiesce"
  check "round $round: a failing unquiesce keeps the snapshot" "$BIN" snap create "q1@unq$round"
  rm -f "$work/fail-unquiesce"
  check "round $round: quiesce, then the failed unquiesce ran" same "rbd/q1 quiesce|rbd/q1 unquiesce" "$(paste -sd'|' "$log")"

  : >"$log"; touch "$work/fail-quiesce"
  check "round $round: --ignore-quiesce-error takes it anyway" \
    "$BIN" snap create --ignore-quiesce-error "q1@ign$round"
  rm -f "$work/fail-quiesce"
  check "round $round: ... after the failed quiesce, with no unquiesce" same "rbd/q1 quiesce" "$(paste -sd'|' "$log")"

  : >"$log"
  check "round $round: --skip-quiesce" "$BIN" snap create --skip-quiesce "q1@skip$round"
  check "round $round: ... runs no hook" same "" "$(cat "$log")"
done
check "the hook-logged snapshots exist, the failed ones do not" same \
  "ok1 unq1 ign1 skip1 ok2 unq2 ign2 skip2" "$(snaps)"
# A hung hook: killed after the bound, the snapshot fails; the daemon still serves.
unserve
check "serve --quiesce stops cleanly" test "$UNSERVE_RC" = 0
: >"$log"; touch "$work/hang"
RADOS_NBD_QUIESCE_HOOK_TIMEOUT_SECS=2 serve q1 --quiesce --quiesce-hook "$hook" ||
  fail "serve --quiesce again" "$(tail -3 "$work/serve.log")"
out=$(timeout 120 "$BIN" snap create q1@hung 2>&1); rc=$?
rm -f "$work/hang"
check "a hook that hangs fails the snapshot (not the 120 s test bound)" test "$rc" != 0 -a "$rc" != 124
check "... saying it did not finish in time" bash -c "grep -q 'did not finish within 2 s' <<<\"\$1\"" _ "$out"
check "... and the daemon still takes snapshots" "$BIN" snap create q1@after
check "... with the hook" same "rbd/q1 quiesce|rbd/q1 quiesce|rbd/q1 unquiesce" "$(paste -sd'|' "$log")"
unserve
check "stops cleanly after the hung hook" test "$UNSERVE_RC" = 0
check "the snapshots taken hold the data written before them" same "10 20 20" \
  "$(first_byte q1@ok1) $(first_byte q1@ok2) $(first_byte q1@after)"
# Without --quiesce: no hook, snapshots as before.
: >"$log"
serve q1 || fail "serve without --quiesce" "$(tail -3 "$work/serve.log")"
check "without --quiesce: snap create" "$BIN" snap create q1@plain
check "... runs no hook" same "" "$(cat "$log")"
unserve
check "--quiesce-hook needs --quiesce" bash -c "! '$BIN' serve q1 --socket '$sock' --quiesce-hook '$hook' 2>/dev/null"
check "object-map check" "$BIN" object-map check q1
t_summary
