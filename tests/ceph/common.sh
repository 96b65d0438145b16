# The head every Ceph suite shares (e2e.sh, cephx.sh, checkpoint.sh, snapmap.sh, namespaces.sh,
# fencing.sh). Source it as `source "$here/common.sh" NAME`; it runs against the cluster named
# by $CEPH_CONF (tests/ceph/run.sh starts one and sets it) and sets:
#   work   /tmp/rados-nbd-NAME.XXXXXX, removed at exit (KEEP_WORK=1 keeps it for a post-mortem)
#          after the processes the suite started are ended, by pid
#   RN     the daemon's command line; with cephx (tests/ceph/cluster.sh's default) the daemon
#          is the restricted client.nbd (mon 'profile rbd', osd 'profile rbd pool=rbd'), as a
#          real deployment would run it; the oracle tools (rbd, rados) are client.admin
#          through the config's keyring
#   RNQ    the same, quoted for `bash -c`
#   sock   the daemon's socket ($work/nbd.sock); MB
# and the helpers below.
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
: "${CEPH_CONF:?set CEPH_CONF (tests/ceph/run.sh does)}"
export CEPH_CONF
work=$(mktemp -d "/tmp/rados-nbd-$1.XXXXXX")
trap 'cleanup_pids; [ -n "${KEEP_WORK:-}" ] || rm -rf "$work"' EXIT
RN=("$BIN" --store "ceph:$CEPH_CONF")
if [ -n "${CEPH_NBD_KEYRING:-}" ]; then
  RN+=(--id "${CEPH_NBD_ID:-nbd}" --keyring "$CEPH_NBD_KEYRING")
fi
RNQ=$(printf '%q ' "${RN[@]}")
sock=$work/nbd.sock
MB=$((1 << 20))

# wait_serving SOCKET PID SECONDS: true once SOCKET appears, false when PID exits first or
# after SECONDS.
wait_serving() {
  local i
  for i in $(seq 1 $(($3 * 10))); do
    [ -S "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
# start_serve LOG SECONDS IMAGE [ARGS...]: `serve` on $sock in the background, its stderr
# appended to LOG, its pid in SERVE_PID; waits as wait_serving does.
start_serve() {
  local log=$1 secs=$2; shift 2
  rm -f "$sock"
  spawn "${RN[@]}" serve "$@" --socket "$sock" 2>>"$log"
  SERVE_PID=$!
  wait_serving "$sock" "$SERVE_PID" "$secs"
}
serve() { start_serve "$work/serve.log" 30 "$@"; } # serve IMAGE [ARGS...]
# Must not run in a subshell (`check` runs its command in one): `wait` needs the parent.
unserve() { stop_daemon "$SERVE_PID"; UNSERVE_RC=$?; rm -f "$sock"; }
check_unserve() { unserve; check "$1" test "$UNSERVE_RC" = 0; }
uri() { echo "nbd+unix:///$1?socket=$sock"; }
# The server checkpoints the map and clears the dirty flag when its last client leaves, so
# a suite keeps one client connected (as a VM's would) while it looks at the flags.
hold() { # hold IMAGE: keeps one NBD connection open until unhold
  rm -f "$work/hold.ready"
  $PY -c "
import nbd, os, time
h = nbd.NBD(); h.connect_uri('$(uri "$1")')
open('$work/hold.ready', 'w').close()
while os.path.exists('$work/hold.ready'): time.sleep(0.05)
h.shutdown()" &
  HOLD_PID=$!
  for _ in $(seq 1 300); do [ -e "$work/hold.ready" ] && return 0; sleep 0.1; done
  return 1
}
unhold() { rm -f "$work/hold.ready"; wait "$HOLD_PID" 2>/dev/null; }
sha() { sha256sum | cut -d' ' -f1; }
# The checks run their commands under `bash -c`: without this they would compare two
# empty strings (sha: command not found) and always pass.
export -f sha

# kill9 PID: kill -9 a daemon of ours and reap it.
kill9() { kill -9 "$1"; wait "$1" 2>/dev/null; forget_pid "$1"; }
# reopen LOG IMAGE [ARGS...]: the one open after a kill -9, with no retry loop: the dead
# daemon's watch lingers until the OSD times it out (osd_client_watch_timeout, 15 s on the
# test cluster), and the open waits for that (bounded), fences the dead daemon and breaks its
# stale lock. True once it serves (60 s at most), false when it exited first.
reopen() { local log=$1; shift; start_serve "$log" 60 "$@"; }
# drop_dead_watch IMAGE: after a kill -9 of the image's only watcher, blocklists the dead
# client's address (as librbd does when it breaks a lock) so the OSD drops its watch at once
# instead of after osd_client_watch_timeout; the reopen then finds a stale lock whose owner
# has no watch, and breaks it without waiting. For suites that test something else than that
# wait (e2e.sh and fencing.sh test the wait itself, with no help). The addresses go to
# DROPPED_WATCHES: `undrop_watches` removes them from the blocklist at the end.
DROPPED_WATCHES=()
drop_dead_watch() {
  local hdr addr _i
  hdr="rbd_header.$(rbd info "$1" --format json | jq -r .id)"
  for addr in $(rados -p rbd listwatchers "$hdr" | sed -n 's/^watcher=\([^ ]*\) .*/\1/p'); do
    ceph osd blocklist add "$addr" >/dev/null 2>&1 || { echo "ceph osd blocklist add $addr failed" >&2; return 1; }
    DROPPED_WATCHES+=("$addr")
  done
  for _i in $(seq 1 300); do
    [ -z "$(rados -p rbd listwatchers "$hdr")" ] && return 0
    sleep 0.1
  done
  echo "the watch of $1 is still there 30 s after blocklisting its client" >&2; return 1
}
undrop_watches() {
  local a
  for a in "${DROPPED_WATCHES[@]}"; do ceph osd blocklist rm "$a" >/dev/null 2>&1; done
  DROPPED_WATCHES=()
}
