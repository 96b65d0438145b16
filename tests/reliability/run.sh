#!/usr/bin/env bash
# Reliability and security tests of `rados-nbd serve` on the directory store:
# SIGKILL at random points of a write workload (20 times), of copy-ups into a clone (10
# times) and around snapshots (6 rounds), ENOSPC and EIO from the store's
# filesystem, 8 connections x QD 128 with fio verify, overlapping writers, hostile clients
# with the daemon's memory watched, the connection limit, loopback-only TCP, unix socket
# mode/group, export names, read-only exports, TLS.
# Uses ${RADOS_NBD_BIN:-target/release/rados-nbd}; installs nothing (tests/deps.sh does).
# Prints PASS/FAIL lines and 'N passed, N failed'; exits non-zero on any failure.
# Usage: tests/reliability/run.sh [SECTION...]
#   sections: kill clonekill snapkill enospc eio load hostile limits security
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
work=$(mktemp -d /tmp/rados-nbd-rel.XXXXXX)
MNT=
cleanup() {
  cleanup_pids
  if [ -n "$MNT" ]; then umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null; fi
  # RELIABILITY_KEEP=1: the work directory stays for a post-mortem when something failed.
  if [ -n "${RELIABILITY_KEEP:-}" ] && [ "$T_FAIL" -gt 0 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
TOOL=("$PY" "$here/nbdtool.py")
sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(kill clonekill snapkill enospc eio load hostile limits security)
want() { local s; for s in "${sections[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

if [ ! -x "$BIN" ]; then
  fail "rados-nbd binary" "$BIN is missing (cargo build --release)"; t_summary; exit 1
fi
export RADOS_NBD_STORE=$work/store
mkdir -p "$RADOS_NBD_STORE"
sock=$work/nbd.sock

# serve_bg LOG ARGS...: start `rados-nbd serve ARGS --socket $sock`, wait for the socket.
serve_bg() {
  local log=$1; shift
  rm -f "$sock"
  RUST_LOG=${RUST_LOG:-info} "$BIN" serve "$@" --socket "$sock" >"$log" 2>&1 &
  SERVE_PID=$!; T_PIDS+=("$SERVE_PID")
  wait_for_socket "$sock" 20 || { echo "--- $log"; tail -5 "$log"; return 1; }
}
# kill9 PID: SIGKILL and reap.
kill9() { kill -9 "$1" 2>/dev/null; wait "$1" 2>/dev/null; forget_pid "$1"; rm -f "$sock"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
uri_of() { echo "nbd+unix:///$1?socket=$sock"; }
# Captured first: with pipefail, `info | grep -q` would fail whenever grep stops reading early.
map_invalid() { local out; out=$("$BIN" info "$1" 2>&1) && [[ $out == *"object map invalid"* ]]; }

# ------------------------------------------------------------------------------------------
# SIGKILL at random points of a write workload, 20 times in a row. The client journals every
# write before sending it and when it is acknowledged; after each kill the next serve must
# rebuild the map and every acked write must read back.
if want kill; then
  img=crash
  BLOCKS=16384  # 64 MiB of 4 KiB blocks, over 1024 objects of 64 KiB
  "$BIN" create --size 128M --object-size 64K "$img" >/dev/null
  journal=$work/journal
  : >"$journal"
  total_ok=0
  for i in $(seq 1 20); do
    why=
    serve_bg "$work/kill-$i-a.log" "$img" || why="serve did not start"
    if [ -z "$why" ]; then
      "${TOOL[@]}" journal-write "$(uri_of $img)" "$journal" 30 "$i" $BLOCKS >"$work/writer-$i.log" 2>&1 &
      wpid=$!
      # A random point: from right after the socket appears to 2.5 s into the workload.
      sleep "$(awk -v r=$RANDOM 'BEGIN { printf "%.2f", r / 32768 * 2.5 }')"
      kill9 "$SERVE_PID"
      wait "$wpid"
      map_invalid "$img" || why="info does not show the map invalid after SIGKILL"
    fi
    if [ -z "$why" ] && [ $((i % 4)) -eq 0 ]; then
      # Every 4th time, also kill the next serve while it opens the image and rebuilds the
      # map (before its socket exists): the map must stay untrusted.
      rm -f "$sock"
      RUST_LOG=info "$BIN" serve "$img" --socket "$sock" >"$work/kill-$i-open.log" 2>&1 &
      opid=$!
      sleep "$(awk -v r=$RANDOM 'BEGIN { printf "%.3f", r / 32768 * 0.03 }')"
      kill -9 "$opid" 2>/dev/null; wait "$opid" 2>/dev/null; rm -f "$sock"
      map_invalid "$img" || why="killed during open: the map is no longer flagged invalid"
    fi
    if [ -z "$why" ]; then
      serve_bg "$work/kill-$i-b.log" "$img" || why="serve after the kill did not start"
    fi
    if [ -z "$why" ]; then
      # Rebuilt in the background while serving: its log line comes when it ends.
      wait_for_log "$work/kill-$i-b.log" "object map of .* rebuilt" 120 || why="serve after the kill did not rebuild the map"
    fi
    if [ -z "$why" ]; then
      # A kill right after the socket appeared can come before the first acknowledgement;
      # with nothing acked yet (round 1) there is nothing to check but the untouched
      # blocks. The whole workload's size is checked after the 20 rounds.
      if ! JOURNAL_EMPTY_OK=$(acked_none "$work/writer-$i.log") "${TOOL[@]}" journal-verify "$(uri_of $img)" "$journal" "$i" $BLOCKS >"$work/verify-$i.log" 2>&1; then
        why="acked writes lost: $(tail -3 "$work/verify-$i.log" | tr '\n' ' ')"
      fi
    fi
    if [ -z "$why" ]; then
      stop_daemon "$SERVE_PID" || why="SIGTERM after the rebuild did not exit 0"
      rm -f "$sock"
    fi
    if [ -z "$why" ]; then
      map_invalid "$img" && why="clean close left the map flagged invalid"
    fi
    if [ -z "$why" ]; then
      "$BIN" object-map check "$img" >"$work/check-$i.log" 2>&1 || why="object-map check failed: $(tail -2 "$work/check-$i.log")"
    fi
    if [ -z "$why" ]; then
      total_ok=$((total_ok + 1))
      extra=; [ $((i % 4)) -eq 0 ] && extra=" (and killed again during the rebuild)"
      pass "SIGKILL #$i$extra: map invalid, rebuilt on next serve, acked writes intact, clean close checks ($(sed -n 's/^journal-write: //p' "$work/writer-$i.log"))"
    else
      fail "SIGKILL #$i" "$why"
      cleanup_pids
    fi
  done
  # The oracle must bite: a block whose acked write is overwritten behind the journal's
  # back has to be reported.
  serve_bg "$work/kill-oracle.log" "$img"
  victim=$(awk '$1 == "A" { b = $2 } END { print b }' "$journal")
  nbdsh -u "$(uri_of $img)" -c "h.pwrite(b'\x5a' * 4096, $victim * 4096)"
  if "${TOOL[@]}" journal-verify "$(uri_of $img)" "$journal" 0 $BLOCKS >"$work/verify-oracle.log" 2>&1; then
    fail "journal oracle detects a lost write" "an overwritten block $victim went unnoticed"
  else pass "journal oracle detects a lost write (block $victim)"; fi
  stop_daemon "$SERVE_PID"
  acked=$(grep -c '^A ' "$journal")
  if [ "$acked" -gt 1000 ]; then pass "kill workload acked $acked block writes over 20 kills"
  else fail "kill workload too small" "only $acked acked block writes"; fi
fi

# ------------------------------------------------------------------------------------------
# SIGKILL in the middle of copy-ups: a clone of a parent full of random data takes small
# writes (each the first of its 64 KiB object, so a copy-up: parent's bytes + the write, in
# one step) and is killed at random points, 10 times. After each kill: the map is rebuilt,
# every acked write reads back, and every block no write reached reads as the parent's
# bytes (a torn copy-up would leave an object with the write and zeros around it). The
# clone has a snapshot from before its first write, so the copy-ups are deep ones: at the
# end that snapshot must read exactly the parent's bytes, and still after a deep flatten.
if want clonekill; then
  BLOCKS=16384  # 64 MiB of 4 KiB blocks, 1024 objects of 64 KiB
  head -c $((BLOCKS * 4096)) /dev/urandom >"$work/parent.raw"
  "$BIN" create --size 64M --object-size 64K cbase >/dev/null
  why=
  serve_bg "$work/cbase.log" cbase || why="serving the parent did not start"
  [ -n "$why" ] || nbdcopy "$work/parent.raw" "$(uri_of cbase)" || why="nbdcopy into the parent failed"
  [ -n "$why" ] || stop_daemon "$SERVE_PID" || why="stopping the parent's serve failed"
  [ -n "$why" ] || "$BIN" snap create cbase@s >/dev/null || why="snap create cbase@s failed"
  [ -n "$why" ] || "$BIN" clone cbase@s cchild >/dev/null || why="clone cbase@s cchild failed"
  # A snapshot of the clone before its first write: every copy-up below is then a deep one
  # (the parent's bytes kept for the snapshot too, before the head appears).
  [ -n "$why" ] || "$BIN" snap create cchild@pre >/dev/null || why="snap create cchild@pre failed"
  if [ -n "$why" ]; then fail "clone kill setup" "$why"; cleanup_pids
  else
    cj=$work/clone-journal
    : >"$cj"
    for i in $(seq 1 10); do
      why=
      serve_bg "$work/ckill-$i-a.log" cchild || why="serve did not start"
      if [ -z "$why" ]; then
        # The last object is left to the parent, so the oracle check below always has a
        # block no write reached (ten rounds of writes can cover every other block).
        "${TOOL[@]}" journal-write "$(uri_of cchild)" "$cj" 30 "$((100 + i))" $((BLOCKS - 16)) >"$work/cwriter-$i.log" 2>&1 &
        wpid=$!
        sleep "$(awk -v r=$RANDOM 'BEGIN { printf "%.2f", 0.2 + r / 32768 * 2.0 }')"
        kill9 "$SERVE_PID"
        wait "$wpid"
        map_invalid cchild || why="info does not show the map invalid after SIGKILL"
      fi
      [ -n "$why" ] || serve_bg "$work/ckill-$i-b.log" cchild || why="serve after the kill did not start"
      if [ -z "$why" ] && ! JOURNAL_EMPTY_OK=$(acked_none "$work/cwriter-$i.log") "${TOOL[@]}" journal-verify "$(uri_of cchild)" "$cj" "$i" $BLOCKS "$work/parent.raw" >"$work/cverify-$i.log" 2>&1; then
        why="after the kill: $(tail -4 "$work/cverify-$i.log" | tr '\n' ' ')"
      fi
      [ -n "$why" ] || stop_daemon "$SERVE_PID" || why="SIGTERM did not exit 0"
      rm -f "$sock"
      if [ -z "$why" ]; then
        "$BIN" object-map check cchild >"$work/ccheck-$i.log" 2>&1 || why="object-map check failed: $(tail -2 "$work/ccheck-$i.log")"
      fi
      if [ -z "$why" ]; then
        pass "clone SIGKILL #$i during copy-ups: acked writes intact, unwritten blocks are the parent's, map checks ($(sed -n 's/^journal-write: //p' "$work/cwriter-$i.log"))"
      else
        fail "clone SIGKILL #$i" "$why"; cleanup_pids
      fi
    done
    # The clone's snapshot through all the killed deep copy-ups: exactly the parent's bytes,
    # its map right; and after a flatten (deep-flatten, the default) the same without the
    # parent: the copy-ups gave it the parent's data, the flatten the rest.
    pre_is_parent() {
      serve_bg "$work/cpre.log" cchild@pre && nbdcopy "$(uri_of cchild)" "$work/pre.raw" \
        && cmp -s "$work/parent.raw" "$work/pre.raw"
      local rc=$?
      stop_daemon "$SERVE_PID"; rm -f "$sock" "$work/pre.raw"
      return $rc
    }
    if pre_is_parent && "$BIN" object-map check cchild@pre >"$work/cpre-check.log" 2>&1; then
      pass "clone kills: the clone's snapshot taken before them reads the parent's bytes, map checks"
    else fail "clone kills: the clone's snapshot" "differs from the parent, or its map check failed: $(tail -2 "$work/cpre-check.log")"; fi
    if "$BIN" flatten cchild >"$work/cflatten.log" 2>&1 && pre_is_parent \
      && ! "$BIN" info cchild@pre | grep -q "parent:" \
      && "$BIN" object-map check cchild@pre >"$work/cpre-check.log" 2>&1; then
      pass "clone kills: after flatten, the clone's snapshot has no parent and still reads its bytes"
    else fail "clone kills: flatten" "$(tail -2 "$work/cflatten.log" "$work/cpre-check.log")"; fi
    # The parent's snapshot is untouched by all of it, and the oracle bites: a block of the
    # parent changed behind the check's back must be reported.
    serve_bg "$work/cbase-snap.log" cbase@s && nbdcopy "$(uri_of cbase)" "$work/snap.raw" \
      && cmp -s "$work/parent.raw" "$work/snap.raw" && pass "clone kills: the parent snapshot is unchanged" \
      || fail "clone kills: the parent snapshot" "differs from what was written, or could not be read"
    stop_daemon "$SERVE_PID"; rm -f "$sock"
    # A block no write reached (its expected bytes changed in our copy of the parent).
    victim=$(awk -v n=$BLOCKS '{ w[$2] = 1 } END { for (b = 0; b < n; b++) if (!(b in w)) { print b; exit } }' "$cj")
    [ -n "$victim" ] || victim=$((BLOCKS - 1))
    printf 'X%.0s' $(seq 4096) | dd of="$work/parent.raw" bs=4096 seek="$victim" conv=notrunc status=none
    serve_bg "$work/ckill-oracle.log" cchild
    if "${TOOL[@]}" journal-verify "$(uri_of cchild)" "$cj" 0 $BLOCKS "$work/parent.raw" >"$work/cverify-oracle.log" 2>&1; then
      fail "clone oracle detects wrong parent bytes" "a changed parent block ($victim) went unnoticed"
    else pass "clone oracle detects a block that is not the parent's (block $victim)"; fi
    stop_daemon "$SERVE_PID"; rm -f "$sock"
  fi
fi

# ------------------------------------------------------------------------------------------
# SIGKILL around snapshots (directory store): each round takes a snapshot of the image at
# rest (its bytes saved as the reference), then kills the serving daemon at a random point
# of a write workload (every first write to an object after a snapshot copies the object's
# old version aside first), and kills a `snap rm` of an older snapshot at a random point.
# After each round: acked writes intact, every snapshot still listed holds exactly its
# reference bytes, a killed removal is finished (or not begun), the maps check.
if want snapkill; then
  BLOCKS=8192  # 32 MiB of 4 KiB blocks, 512 objects of 64 KiB
  head -c $((BLOCKS * 4096)) /dev/urandom >"$work/snapbase.raw"
  "$BIN" create --size 32M --object-size 64K simg >/dev/null
  why=
  serve_bg "$work/simg.log" simg || why="serving the image did not start"
  [ -n "$why" ] || nbdcopy "$work/snapbase.raw" "$(uri_of simg)" || why="nbdcopy failed"
  [ -n "$why" ] || stop_daemon "$SERVE_PID" || why="stopping the serve failed"
  rm -f "$sock"
  if [ -n "$why" ]; then fail "snapshot kill setup" "$why"; cleanup_pids
  else
    sj=$work/snap-journal
    : >"$sj"
    # snaps_match: every snapshot listed reads back as its reference.
    snap_exact() { # snap_exact NAME: its bytes are its reference's
      serve_bg "$work/sread-$1.log" "simg@$1" || { echo "serving simg@$1 failed"; return 1; }
      nbdcopy "$(uri_of simg)" "$work/sread.raw" || { echo "reading simg@$1 failed"; stop_daemon "$SERVE_PID"; return 1; }
      stop_daemon "$SERVE_PID"; rm -f "$sock"
      cmp -s "$work/sread.raw" "$work/snapref-$1.raw" || { echo "simg@$1 differs from its reference"; return 1; }
    }
    snaps_match() {
      local n
      for n in $("$BIN" snap ls --format json simg | "$PY" -c 'import json,sys; print(" ".join(s["name"] for s in json.load(sys.stdin)))'); do
        snap_exact "$n" || return 1
        "$BIN" object-map check "simg@$n" >/dev/null 2>&1 || { echo "object-map check simg@$n failed"; return 1; }
      done
    }
    for i in $(seq 1 "${SNAPKILL_ROUNDS:-6}"); do
      why=
      # The reference of the snapshot about to be taken: the image at rest now.
      serve_bg "$work/sref-$i.log" simg --read-only && nbdcopy "$(uri_of simg)" "$work/snapref-k$i.raw" \
        || why="reading the reference of k$i failed"
      stop_daemon "$SERVE_PID"; rm -f "$sock"
      [ -n "$why" ] || "$BIN" snap create "simg@k$i" >/dev/null 2>&1 || why="snap create k$i failed"
      [ -n "$why" ] || serve_bg "$work/skill-$i-a.log" simg || why="serve did not start"
      if [ -z "$why" ]; then
        "${TOOL[@]}" journal-write "$(uri_of simg)" "$sj" 30 "$((200 + i))" $BLOCKS >"$work/swriter-$i.log" 2>&1 &
        wpid=$!
        sleep "$(awk -v r=$RANDOM 'BEGIN { printf "%.2f", 0.2 + r / 32768 * 1.5 }')"
        kill9 "$SERVE_PID"
        wait "$wpid"
      fi
      # A removal killed at a random point, of the snapshot two rounds old.
      if [ -z "$why" ] && [ "$i" -ge 3 ]; then
        "$BIN" snap rm "simg@k$((i - 2))" >"$work/srm-$i.log" 2>&1 &
        rpid=$!
        sleep "$(awk -v r=$RANDOM 'BEGIN { printf "%.3f", r / 32768 * 0.05 }')"
        kill -9 "$rpid" 2>/dev/null; wait "$rpid" 2>/dev/null
        # Killed before the snapshot left the header, it is still there, whole, and the
        # next snapshot's map may already be corrected for its removal (EXISTS where it
        # said EXISTS_CLEAN: librbd's order too, which errs towards listing more in
        # diffs): removing it again, as the user would, completes it.
        if "$BIN" snap ls simg | awk '{ print $2 }' | grep -qx "k$((i - 2))"; then
          why=$(snap_exact "k$((i - 2))")
          [ -n "$why" ] || "$BIN" snap rm "simg@k$((i - 2))" >>"$work/srm-$i.log" 2>&1 || why="snap rm k$((i - 2)) again failed"
        fi
      fi
      [ -n "$why" ] || serve_bg "$work/skill-$i-b.log" simg || why="serve after the kill did not start"
      if [ -z "$why" ] && ! JOURNAL_EMPTY_OK=$(acked_none "$work/swriter-$i.log") "${TOOL[@]}" journal-verify "$(uri_of simg)" "$sj" "$i" $BLOCKS "$work/snapbase.raw" >"$work/sverify-$i.log" 2>&1; then
        why="after the kill: $(tail -4 "$work/sverify-$i.log" | tr '\n' ' ')"
      fi
      [ -n "$why" ] || stop_daemon "$SERVE_PID" || why="SIGTERM did not exit 0"
      rm -f "$sock"
      [ -n "$why" ] || "$BIN" object-map check simg >"$work/scheck-$i.log" 2>&1 || why="object-map check failed: $(tail -2 "$work/scheck-$i.log")"
      [ -n "$why" ] || why=$(snaps_match)
      if [ -z "$why" ]; then
        left=$("$BIN" snap ls simg | awk 'NR > 1 { printf "%s ", $2 }')
        pass "snapshot SIGKILL #$i: acked writes intact, snapshots [$left] exact, maps check ($(sed -n 's/^journal-write: //p' "$work/swriter-$i.log"))"
      else
        fail "snapshot SIGKILL #$i" "$why"; cleanup_pids
        [ -z "${RELIABILITY_KEEP:-}" ] || break  # the state as the failure left it
      fi
    done
    # The oracle bites: a reference that differs from its snapshot by one block is seen.
    n=$("$BIN" snap ls --format json simg | "$PY" -c 'import json,sys; print(json.load(sys.stdin)[-1]["name"])')
    printf 'X%.0s' $(seq 4096) | dd of="$work/snapref-$n.raw" bs=4096 seek=7 conv=notrunc status=none
    if out=$(snaps_match) ; then fail "snapshot oracle detects a changed block" "simg@$n passed with a changed reference"
    else pass "snapshot oracle detects a changed block ($out)"; fi
  fi
fi

# ------------------------------------------------------------------------------------------
# ENOSPC from the store's filesystem: an 8 MiB tmpfs.
if want enospc; then
  MNT=$work/full
  mkdir -p "$MNT"
  if mount -t tmpfs -o size=8m tmpfs "$MNT"; then
    (
      export RADOS_NBD_STORE=$MNT
      "$BIN" create --size 64M --object-size 1M small >/dev/null
      serve_bg "$work/enospc.log" small || exit 1
      "${TOOL[@]}" enospc "$(uri_of small)" >"$work/enospc.out" 2>&1
      rc=$?
      cat "$work/enospc.out" | sed 's/^/    /'
      if [ $rc -eq 0 ]; then pass "ENOSPC reaches the client; acked data intact; TRIM frees space"
      else fail "ENOSPC" "$(tail -2 "$work/enospc.out")"; fi
      if kill -0 "$SERVE_PID" 2>/dev/null && nbdinfo --size "$(uri_of small)" >/dev/null 2>&1; then
        pass "daemon keeps serving after ENOSPC"; else fail "daemon died after ENOSPC"; fi
      if stop_daemon "$SERVE_PID"; then pass "clean close on the once-full store"
      else fail "clean close on the once-full store" "$(tail -2 "$work/enospc.log")"; fi
      check "object-map check after ENOSPC" "$BIN" object-map check small
      echo "T_PASS=$T_PASS T_FAIL=$T_FAIL" >"$work/enospc.counts"
    )
    [ -f "$work/enospc.counts" ] && source "$work/enospc.counts"
    umount "$MNT" && MNT=
  else
    fail "ENOSPC" "could not mount an 8 MiB tmpfs (need root)"
  fi
fi

# ------------------------------------------------------------------------------------------
# EIO from the store: this kernel has no device-mapper (no dm `error` target), so an object
# file is replaced by a symlink to /proc/self/mem: the daemon opens its own memory (read and
# write, as it opens every object), and a read or a write at an offset below 4 MiB (never
# mapped) fails in the kernel with EIO.
if want eio; then
  # A store of its own, so object 3 below can only be this image's.
  export RADOS_NBD_STORE=$work/store-eio
  mkdir -p "$RADOS_NBD_STORE"
  "$BIN" create --size 16M --object-size 1M eio >/dev/null
  serve_bg "$work/eio-a.log" eio
  nbdsh -u "$(uri_of eio)" -c "h.pwrite(b'e' * 4096, 3 << 20); h.pwrite(b'z' * 4096, 0)" 2>/dev/null
  stop_daemon "$SERVE_PID"
  obj=$(find "$RADOS_NBD_STORE" -name 'rbd_data.*.0000000000000003' | head -1)
  if [ -n "$obj" ]; then
    cp "$obj" "$work/obj3.orig"
    rm -f "$obj" && ln -s /proc/self/mem "$obj"
    serve_bg "$work/eio-b.log" eio
    # Writes first: the object's file is not open yet, so the first write opens it.
    out=$("${TOOL[@]}" eio-write "$(uri_of eio)" $((3 << 20)) 2>&1); rc=$?
    if [ $rc -eq 0 ]; then pass "write EIO from the store reaches the client, unacknowledged: $out"
    else fail "write EIO" "$out"; fi
    out=$("${TOOL[@]}" eio "$(uri_of eio)" $((3 << 20)) 2>&1); rc=$?
    if [ $rc -eq 0 ]; then pass "read EIO from the store reaches the client; connection keeps serving"
    else fail "read EIO" "$out"; fi
    kill -0 "$SERVE_PID" 2>/dev/null && pass "daemon alive after EIO" || fail "daemon died after EIO"
    # The object whose write failed can never be made durable: FLUSH must say so rather
    # than promise durability, and the close must not call the image clean.
    check_fails "FLUSH after a failed write reports an error" nbdsh -u "$(uri_of eio)" -c "h.flush()"
    if stop_daemon "$SERVE_PID"; then fail "close after a failed write" "exited 0 (claimed a clean close)"
    elif grep -q "rados-nbd: closing rbd/eio: .*0000000000000003" "$work/eio-b.log"; then
      pass "close after a failed write: exit non-zero, one line naming the object"
    else fail "close after a failed write" "$(tail -2 "$work/eio-b.log")"; fi
    map_invalid eio && pass "map left flagged invalid after the failed close" || fail "map flagged invalid after the failed close"
    # The disk "repaired" (object 3's file put back): the next serve rebuilds the map, and
    # the writes acked around the EIOs (objects 0, on two connections) read back.
    rm -f "$obj" && cp "$work/obj3.orig" "$obj"
    serve_bg "$work/eio-c.log" eio
    wait_for_log "$work/eio-c.log" "object map of .* rebuilt" 120 && pass "next serve rebuilds the map" || fail "next serve rebuilds the map" "$(tail -2 "$work/eio-c.log")"
    check "writes acked around the EIOs read back after the rebuild" nbdsh -u "$(uri_of eio)" -c "
assert h.pread(4096, 0) == b'y' * 4096
assert h.pread(4096, 8192) == b'q' * 4096
assert h.pread(4096, 3 << 20) == b'e' * 4096"
    if stop_daemon "$SERVE_PID"; then pass "clean close once the store is healthy"
    else fail "clean close once the store is healthy" "$(tail -2 "$work/eio-c.log")"; fi
    check "object-map check after EIO" "$BIN" object-map check eio
  else
    fail "EIO" "object 3 was not written"
  fi
  export RADOS_NBD_STORE=$work/store
fi

# ------------------------------------------------------------------------------------------
# Load: 8 connections x QD 128 of mixed random I/O with fio's nbd engine and crc32c
# verification, each job on its own 64 MiB region; then overlapping writers.
if want load; then
  "$BIN" create --size 1G load >/dev/null
  serve_bg "$work/load.log" load
  # verify_backlog makes fio re-read and check what it wrote while the mix runs (a
  # scribbler on the region makes this fail: "verify: bad magic header").
  fio --name=load --ioengine=nbd --uri="$(uri_of load)" --numjobs=8 --iodepth=128 \
      --rw=randrw --rwmixread=30 --bsrange=4k-64k --size=64M --offset_increment=64M \
      --verify=crc32c --verify_backlog=512 --verify_fatal=1 --verify_state_save=0 --time_based --runtime=${LOAD_SECONDS:-20} \
      --group_reporting --output="$work/fio.out" >/dev/null 2>&1
  rc=$?
  if [ $rc -eq 0 ] && grep -q 'err= 0' "$work/fio.out" && ! grep -q '^verify:' "$work/fio.out"; then
    pass "fio 8 jobs x QD 128 randrw ${LOAD_SECONDS:-20} s with crc32c verify ($(grep -oE '(read|write): IOPS=[^,]+' "$work/fio.out" | tr '\n' ' '))"
  else
    fail "fio 8 x QD 128 verify" "rc=$rc $(grep -E 'err=|verify|error' "$work/fio.out" | head -3)"
  fi
  out=$("${TOOL[@]}" overlap "$(uri_of load)" 5 2>&1); rc=$?
  if [ $rc -eq 0 ]; then pass "overlapping writers on 4 connections: last acked write wins ($out)"
  else fail "overlapping writers" "$out"; fi
  if stop_daemon "$SERVE_PID"; then pass "clean close after load"; else fail "clean close after load"; fi
  check "object-map check after load" "$BIN" object-map check load
fi

# ------------------------------------------------------------------------------------------
# Hostile clients beyond tests/clients/raw_edge.py, while a canary client does I/O every
# 20 ms and the daemon's RSS is sampled.
if want hostile; then
  "$BIN" create --size 256M hostile >/dev/null
  # Above the 300 half-open connections held below (this case is about those, not about
  # the connection limit, which section `limits` tests).
  serve_bg "$work/hostile.log" hostile --max-connections 400
  # Real data in the first 128 MiB, so the unread 32 MiB READs hold real buffers.
  head -c $((128 << 20)) /dev/urandom >"$work/fill.raw"
  nbdcopy "$work/fill.raw" "$(uri_of hostile)" && rm -f "$work/fill.raw"
  base=$(rss_kib "$SERVE_PID")
  "${TOOL[@]}" canary "$(uri_of hostile)" 30 "$work/canary.out" &
  cpid=$!
  ( max=0; while kill -0 "$SERVE_PID" 2>/dev/null; do
      r=$(rss_kib "$SERVE_PID"); [ "${r:-0}" -gt "$max" ] && max=$r && echo "$max" >"$work/rss.max"
      sleep 0.1; done ) &
  rpid=$!
  # Two clients that pipeline 32 MiB reads and never read a reply, two that flood writes.
  "${TOOL[@]}" flood-unread "$sock" hostile 8 >"$work/flood1.out" 2>&1 &
  f1=$!
  "${TOOL[@]}" flood-unread "$sock" hostile 8 >"$work/flood2.out" 2>&1 &
  f2=$!
  "${TOOL[@]}" flood-writes "$sock" hostile 8 >"$work/flood3.out" 2>&1 &
  f3=$!
  "${TOOL[@]}" flood-writes "$sock" hostile 8 >"$work/flood4.out" 2>&1 &
  f4=$!
  wait $f1 $f2 $f3 $f4
  if grep -q 'times blocked' "$work/flood1.out" && grep -q 'times blocked' "$work/flood3.out"; then
    pass "flooding clients that never read replies: $(cat "$work/flood1.out"); $(cat "$work/flood3.out")"
  else fail "flooding clients" "$(cat "$work"/flood*.out | tail -4)"; fi
  out=$("${TOOL[@]}" huge "$sock" hostile 2>&1); rc=$?
  echo "$out" | grep -E '^(PASS|FAIL) ' | while read -r l; do echo "$l"; done
  T_PASS=$((T_PASS + $(echo "$out" | grep -c '^PASS '))); T_FAIL=$((T_FAIL + $(echo "$out" | grep -c '^FAIL ')))
  [ $rc -eq 0 ] || [ "$(echo "$out" | grep -c '^FAIL ')" -gt 0 ] || fail "4 GiB lengths" "$(echo "$out" | tail -3)"
  out=$("${TOOL[@]}" idle "$sock" 300 3 2>&1) && pass "300 silent half-open connections held ($out)" || fail "idle connections" "$out"
  check "served while 300 silent connections came and went" nbdinfo --size "$(uri_of hostile)"
  wait $cpid
  canary=$(cat "$work/canary.out" 2>/dev/null)
  case $canary in
    ok*) set -- $canary
         if [ "$2" -gt 100 ] && [ "$3" -lt 5000 ]; then pass "other client served throughout: $2 write+read rounds, worst ${3} ms"
         else fail "other client starved" "$canary"; fi ;;
    *) fail "other client failed during hostile clients" "$canary" ;;
  esac
  max=$(cat "$work/rss.max" 2>/dev/null || echo 0)
  # Four hostile connections, each allowed 64 MiB of buffered payloads/replies (the
  # protocol's max_buffered_bytes), plus the runtime: 4 x 64 + 128 MiB.
  bound=$(( (4 * 64 + 128) * 1024 ))
  if [ "$max" -gt 0 ] && [ "$max" -lt "$bound" ]; then
    pass "daemon RSS stayed bounded: peak $((max / 1024)) MiB (start $((base / 1024)) MiB, bound $((bound / 1024)) MiB)"
  else fail "daemon RSS unbounded" "peak ${max} KiB, bound ${bound} KiB"; fi
  if stop_daemon "$SERVE_PID"; then pass "clean close after hostile clients"; else fail "clean close after hostile clients"; fi
  kill "$rpid" 2>/dev/null; wait "$rpid" 2>/dev/null
fi

# ------------------------------------------------------------------------------------------
# The connection limit (--max-connections): clients beyond it are closed before the
# greeting, the others keep being served, a leaver's slot is reused.
if want limits; then
  "$BIN" create --size 32M lim >/dev/null
  serve_bg "$work/limit.log" lim --max-connections 4
  out=$("${TOOL[@]}" limit "$(uri_of lim)" "$sock" 4 2>&1); rc=$?
  if [ $rc -eq 0 ]; then pass "--max-connections 4: $out"; else fail "--max-connections 4" "$out"; fi
  n=$(grep -c 'refused a connection from unix socket: 4 clients already connected (--max-connections 4)' "$work/limit.log")
  # 53 refusals within a second or so: logged, but at most one line a second.
  if [ "$n" -ge 1 ] && [ "$n" -le 10 ]; then pass "refusals logged, rate-limited ($n lines for 53 refused clients)"
  else fail "refusals logged, rate-limited" "$n lines: $(grep refused "$work/limit.log" | tail -2)"; fi
  if stop_daemon "$SERVE_PID"; then pass "clean close after the connection limit"; else fail "clean close after the connection limit"; fi
  # The default (128): 150 raw clients at once, the first 128 get the greeting.
  serve_bg "$work/limit-default.log" lim
  out=$("$PY" - "$sock" <<'PY'
import socket, sys, time
socks, greeted, closed = [], 0, 0
for _ in range(150):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(5); s.connect(sys.argv[1])
    socks.append(s)
    g = s.recv(18)
    if len(g) >= 8 and g[:8] == b"NBDMAGIC": greeted += 1
    elif g == b"": closed += 1
print(greeted, closed)
PY
)
  [ "$out" = "128 22" ] && pass "default limit: 128 of 150 clients greeted, 22 closed" || fail "default limit 128" "greeted/closed: $out"
  # Their slots come back as the server sees each one go: retry for a few seconds.
  check "served again once those clients left" bash -c \
    "for i in \$(seq 1 50); do nbdinfo --size '$(uri_of lim)' && exit 0; sleep 0.1; done; exit 1"
  stop_daemon "$SERVE_PID"
fi

# ------------------------------------------------------------------------------------------
# Security: loopback TCP by default, export names, read-only exports, TLS.
if want security; then
  "$BIN" create --size 32M sec >/dev/null
  port=$(free_port)
  RUST_LOG=info "$BIN" serve sec --listen "$port" >"$work/tcp.log" 2>&1 &
  tpid=$!; T_PIDS+=("$tpid")
  for _ in $(seq 1 50); do ss -ltnH "sport = :$port" | grep -q . && break; sleep 0.1; done
  listen=$(ss -ltnH "sport = :$port" | awk '{print $4}' | tr '\n' ' ')
  if [ "$listen" = "127.0.0.1:$port " ]; then pass "--listen PORT binds 127.0.0.1 only ($listen)"
  else fail "--listen PORT binds loopback only" "listening on: $listen"; fi
  stop_daemon "$tpid"
  RUST_LOG=info "$BIN" serve sec --listen ":$port" >"$work/tcp2.log" 2>&1 &
  tpid=$!; T_PIDS+=("$tpid")
  for _ in $(seq 1 50); do ss -ltnH "sport = :$port" | grep -q . && break; sleep 0.1; done
  listen=$(ss -ltnH "sport = :$port" | awk '{print $4}' | tr '\n' ' ')
  [ "$listen" = "127.0.0.1:$port " ] && pass "--listen :PORT binds 127.0.0.1 only" || fail "--listen :PORT" "$listen"
  stop_daemon "$tpid"

  # Unix socket permissions: default 0600, --socket-mode/--socket-group applied as asked.
  serve_bg "$work/perm0.log" sec
  got=$(stat -c '%a %g' "$sock")
  [ "$got" = "600 $(id -g)" ] && pass "default socket: mode 0600, our group ($got)" || fail "default socket mode" "$got"
  stop_daemon "$SERVE_PID"
  grp=$(getent group 65534 | cut -d: -f1); grp=${grp:-65534}
  serve_bg "$work/perm1.log" sec --socket-mode 0660 --socket-group "$grp"
  got=$(stat -c '%a %g' "$sock")
  [ "$got" = "660 65534" ] && pass "--socket-mode 0660 --socket-group $grp: socket is $got" || fail "--socket-mode 0660 --socket-group $grp" "$got"
  stop_daemon "$SERVE_PID"
  serve_bg "$work/perm2.log" sec --socket-mode 640 --socket-group 4242
  got=$(stat -c '%a %g' "$sock")
  [ "$got" = "640 4242" ] && pass "numeric --socket-group 4242, --socket-mode 640: socket is $got" || fail "numeric group" "$got"
  stop_daemon "$SERVE_PID"
  before=$(find "$RADOS_NBD_STORE" -type f -printf '%p %s %T@\n' | sort | sha256sum)
  for bad in 0968 1777 rw-rw---- ""; do
    rm -f "$sock"
    out=$("$BIN" serve sec --socket "$sock" --socket-mode "$bad" 2>&1); rc=$?
    if [ $rc -ne 0 ] && [ "$(echo "$out" | wc -l)" = 1 ] && [[ $out == *--socket-mode* ]] && [ ! -e "$sock" ]; then
      pass "bad --socket-mode '$bad': one line, exit $rc, no socket"
    else fail "bad --socket-mode '$bad'" "rc=$rc: $out"; fi
  done
  out=$("$BIN" serve sec --socket "$sock" --socket-group no-such-group-rnbd 2>&1); rc=$?
  if [ $rc -ne 0 ] && [ "$(echo "$out" | wc -l)" = 1 ] && [[ $out == *'"no-such-group-rnbd"'* ]] && [ ! -e "$sock" ]; then
    pass "unknown --socket-group: one line naming it, exit $rc, no socket"
  else fail "unknown --socket-group" "rc=$rc: $out"; fi
  out=$("$BIN" serve sec --listen 1 --socket-mode 0666 2>&1); rc=$?
  [ $rc -ne 0 ] && [ "$(echo "$out" | wc -l)" = 1 ] && pass "--socket-mode without --socket refused" || fail "--socket-mode with --listen" "rc=$rc: $out"
  after=$(find "$RADOS_NBD_STORE" -type f -printf '%p %s %T@\n' | sort | sha256sum)
  check "bad socket flags changed nothing on disk" test "$before" = "$after"
  # Another user is really kept out or let in (root only: setpriv to nobody). The socket
  # goes in a directory everyone may enter, so only its own permissions decide.
  if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null; then
    pub=$work/pub; mkdir -p "$pub"; chmod 0711 "$work"; chmod 0755 "$pub"
    psock=$pub/nbd.sock; puri="nbd+unix:///sec?socket=$psock"
    as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
    as_other() { setpriv --reuid=65534 --regid=4243 --clear-groups "$@"; }
    pserve() {
      RUST_LOG=info "$BIN" serve sec --socket "$psock" "$@" >"$work/perm-u.log" 2>&1 &
      SERVE_PID=$!; T_PIDS+=("$SERVE_PID"); wait_for_socket "$psock" 20
    }
    pserve
    out=$(as_nobody nbdinfo --size "$puri" 2>&1)
    if [ $? -ne 0 ] && [[ $out == *"Permission denied"* ]]; then pass "0600: user nobody refused (Permission denied)"
    else fail "0600: user nobody refused" "$out"; fi
    check "0600: root (the owner) served" nbdinfo --size "$puri"
    stop_daemon "$SERVE_PID"
    pserve --socket-mode 0666
    check "0666: user nobody served" as_nobody nbdinfo --size "$puri"
    stop_daemon "$SERVE_PID"
    pserve --socket-mode 0660 --socket-group 65534
    check "0660 group 65534: user nobody in that group served" as_nobody nbdinfo --size "$puri"
    out=$(as_other nbdinfo --size "$puri" 2>&1)
    if [ $? -ne 0 ] && [[ $out == *"Permission denied"* ]]; then pass "0660 group 65534: user nobody in another group refused"
    else fail "0660: user in another group refused" "$out"; fi
    stop_daemon "$SERVE_PID"
    chmod 0700 "$work"
  else
    echo "SKIP socket permissions for another user: needs root and setpriv"
  fi

  serve_bg "$work/names.log" sec --export-name disk
  check_fails "unknown export name refused (GO)" nbdinfo "nbd+unix:///nosuch?socket=$sock"
  check "unknown export name closes the connection (EXPORT_NAME)" "${TOOL[@]}" export-name "$sock"
  check "the real export name is served" nbdinfo --size "nbd+unix:///disk?socket=$sock"
  stop_daemon "$SERVE_PID"

  serve_bg "$work/ro.log" sec --read-only
  out=$("${TOOL[@]}" ro-writes "$(uri_of sec)" 2>&1) && pass "read-only export: $(echo $out)" || fail "read-only export refuses writes" "$out"
  stop_daemon "$SERVE_PID"

  # TLS with a throwaway CA, server and client certificates (openssl), in the layout
  # libnbd's tls-certificates=DIR expects.
  pki=$work/pki; mkdir -p "$pki/anon"
  (
    cd "$pki" || exit 1
    o() { openssl "$@" >/dev/null 2>&1; }
    o req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca-key.pem \
      -out ca-cert.pem -days 2 -subj "/CN=rados-nbd test CA" &&
    o req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout server-key.pem \
      -out server.csr -subj "/CN=localhost" &&
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >srv.ext &&
    o x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
      -out server-cert.pem -days 2 -extfile srv.ext &&
    o req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout client-key.pem \
      -out client.csr -subj "/CN=client" &&
    printf 'extendedKeyUsage=clientAuth\n' >cli.ext &&
    o x509 -req -in client.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
      -out client-cert.pem -days 2 -extfile cli.ext &&
    cp ca-cert.pem anon/
  ) || fail "TLS certificates" "openssl failed"
  tls_uri() { echo "nbds+unix:///sec?socket=$sock&tls-certificates=$1"; }
  tlsf=(--tls-cert "$pki/server-cert.pem" --tls-key "$pki/server-key.pem")
  serve_bg "$work/tls-req.log" sec --tls=require "${tlsf[@]}" --tls-ca "$pki/ca-cert.pem"
  check "TLS require: nbdinfo over TLS with a client certificate" bash -c \
    "nbdinfo --json '$(tls_uri "$pki")' | jq -e '.TLS == true and .exports[0][\"export-size\"] == 33554432'"
  head -c $((1 << 20)) /dev/urandom >"$work/tls.in"
  check "TLS require: 1 MiB written and read back over TLS" bash -c \
    "timeout 120 nbdcopy '$work/tls.in' '$(tls_uri "$pki")' && timeout 120 nbdcopy '$(tls_uri "$pki")' - | head -c $((1 << 20)) | cmp - '$work/tls.in'"
  check_fails "TLS require: plain client refused" nbdinfo "$(uri_of sec)"
  check_fails "TLS require with --tls-ca: client without a certificate refused" nbdinfo "$(tls_uri "$pki/anon")"
  stop_daemon "$SERVE_PID"
  serve_bg "$work/tls-allow.log" sec --tls=allow "${tlsf[@]}"
  check "TLS allow: TLS client served" bash -c "nbdinfo --json '$(tls_uri "$pki/anon")' | jq -e '.TLS == true'"
  check "TLS allow: plain client served" bash -c "nbdinfo --json '$(uri_of sec)' | jq -e '.TLS == false'"
  stop_daemon "$SERVE_PID"
  before=$(find "$RADOS_NBD_STORE" -type f -printf '%p %s %T@\n' | sort | sha256sum)
  out=$("$BIN" serve sec --socket "$sock" --tls=require --tls-cert "$pki/nosuch.pem" --tls-key "$pki/server-key.pem" 2>&1); rc=$?
  if [ $rc -ne 0 ] && [ "$(echo "$out" | wc -l)" = 1 ] && echo "$out" | grep -q 'nosuch.pem'; then
    pass "missing certificate: one line naming the file, exit $rc"; else fail "missing certificate" "rc=$rc: $out"; fi
  out=$("$BIN" serve sec --socket "$sock" --tls=require 2>&1); rc=$?
  if [ $rc -ne 0 ] && [ "$(echo "$out" | wc -l)" = 1 ]; then pass "--tls=require without a certificate: one line, exit $rc"
  else fail "--tls=require without a certificate" "rc=$rc: $out"; fi
  after=$(find "$RADOS_NBD_STORE" -type f -printf '%p %s %T@\n' | sort | sha256sum)
  check "bad TLS flags changed nothing on disk" test "$before" = "$after"
fi

t_summary
