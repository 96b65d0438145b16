#!/usr/bin/env bash
# The Ceph OSD stopped mid-workload (issue 8): requests fail with EIO after the configured
# op timeout instead of hanging, the daemon survives and keeps accepting clients, I/O resumes
# when the OSD returns, and every acked write reads back (the journal of tests/reliability/
# nbdtool.py is the oracle). The OSD is frozen with SIGSTOP (its connections stay open, the
# worst case for a hang) and later thawed with SIGCONT; the throwaway one-node cluster comes
# from tests/ceph/cluster.sh. Skips, with a message, without Ceph or a ceph-enabled binary.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
for b in ceph-mon ceph-osd rbd rados ceph; do
  command -v "$b" >/dev/null || { echo "SKIP ceph faults: $b not installed"; exit 0; }
done
[ -f "$here/../ceph/cluster.sh" ] || { echo "SKIP ceph faults: tests/ceph/cluster.sh missing"; exit 0; }
if "$BIN" --store ceph: ls 2>&1 | grep -q "no Ceph support"; then
  echo "SKIP ceph faults: $BIN was built without feature ceph"; exit 0
fi
work=$(mktemp -d /tmp/rados-nbd-ceph-faults.XXXXXX)
OSD_PID=
finish() {
  [ -n "$OSD_PID" ] && kill -CONT "$OSD_PID" 2>/dev/null
  cleanup_pids
  bash "$here/../ceph/cluster.sh" stop "$work/cluster" >/dev/null 2>&1
  rm -rf "$work"
}
trap finish EXIT
if ! out=$(bash "$here/../ceph/cluster.sh" start "$work/cluster" 2>&1); then
  fail "start ceph cluster" "$(echo "$out" | tail -3)"; t_summary; exit 1
fi
export CEPH_CONF=$work/cluster/ceph.conf
OSD_PID=$(cat "$work/cluster/run/osd.0.pid")
TIMEOUT=${OP_TIMEOUT:-8}
# librados reads CEPH_ARGS (rados_conf_parse_env): the op timeout that turns a stopped OSD
# into EIO.
export CEPH_ARGS="--rados-osd-op-timeout $TIMEOUT"
RN=("$BIN" --store "ceph:$CEPH_CONF")
TOOL=("$PY" "$here/nbdtool.py")
sock=$work/nbd.sock
uri="nbd+unix:///faults?socket=$sock"
BLOCKS=8192

"${RN[@]}" create --size 64M faults >/dev/null || { fail "create image on ceph"; t_summary; exit 1; }
rm -f "$sock"
RUST_LOG=info "${RN[@]}" serve faults --socket "$sock" >"$work/serve.log" 2>&1 &
SERVE_PID=$!; T_PIDS+=("$SERVE_PID")
wait_for_socket "$sock" 60 || { fail "serve on ceph" "$(tail -3 "$work/serve.log")"; t_summary; exit 1; }

journal=$work/journal; : >"$journal"
"${TOOL[@]}" journal-write "$uri" "$journal" 120 1 $BLOCKS >"$work/writer.log" 2>&1 &
wpid=$!
sleep 4
kill -STOP "$OSD_PID"
t_stop=$(date +%s)
# The writer stops at its first failed request; it must fail, not hang.
for _ in $(seq 1 $(( (TIMEOUT + 30) * 10 ))); do kill -0 "$wpid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$wpid" 2>/dev/null; then
  fail "OSD stopped: requests fail instead of hanging" "writer still blocked $((TIMEOUT + 30)) s after SIGSTOP"
  kill "$wpid" 2>/dev/null
else
  took=$(( $(date +%s) - t_stop ))
  if grep -q "(EIO)" "$work/writer.log"; then
    pass "OSD stopped: writes fail with EIO after ${took} s (op timeout ${TIMEOUT} s): $(sed -n 's/^journal-write: //p' "$work/writer.log")"
  else fail "OSD stopped: EIO" "$(cat "$work/writer.log")"; fi
fi
wait "$wpid" 2>/dev/null
if kill -0 "$SERVE_PID" 2>/dev/null && nbdinfo --size "$uri" >/dev/null 2>&1; then
  pass "OSD stopped: daemon alive and accepting clients"
else fail "OSD stopped: daemon died or refuses clients" "$(tail -3 "$work/serve.log")"; fi

kill -CONT "$OSD_PID"
# I/O resumes: new writes are acked again (retry for a while: the OSD catches up first).
resumed=
for _ in $(seq 1 30); do
  if "${TOOL[@]}" journal-write "$uri" "$journal" 3 2 $BLOCKS >"$work/writer2.log" 2>&1 \
      && grep -q "acked writes, finished" "$work/writer2.log"; then resumed=1; break; fi
  sleep 2
done
if [ -n "$resumed" ]; then pass "OSD back: I/O resumes ($(sed -n 's/^journal-write: //p' "$work/writer2.log"))"
else fail "OSD back: I/O did not resume" "$(tail -2 "$work/writer2.log")"; fi
out=$("${TOOL[@]}" journal-verify "$uri" "$journal" 1 $BLOCKS 2>&1); rc=$?
if [ $rc -eq 0 ]; then pass "after recovery: every acked write reads back ($out)"
else fail "after recovery: acked writes lost" "$out"; fi
if stop_daemon "$SERVE_PID"; then pass "clean close after the OSD came back"; else fail "clean close after the OSD came back"; fi
check "rbd object-map check passes" rbd object-map check faults
t_summary
