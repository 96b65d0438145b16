# Shared helpers for the shell test suites. Source it; call `t_begin NAME` / `t_pass` / `t_fail MSG`
# or `check NAME CMD...`, and `t_summary` at the end (prints 'N passed, N failed').
# Every process a test starts is recorded by pid and ended by pid in `cleanup` (never by name).

T_PASS=${T_PASS:-0}; T_FAIL=${T_FAIL:-0}; T_FAILED_NAMES=()
T_PIDS=()
ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
BIN=${RADOS_NBD_BIN:-$ROOT/target/release/rados-nbd}
PY=/usr/bin/python3   # Debian's interpreter: python3-libnbd is installed for it only
# A test program that dies of SIGSEGV, SIGABRT, SIGBUS or SIGFPE prints the Python stack of every
# thread first (faulthandler), which run_counted shows: a crash inside python3-rbd or libnbd
# then names the call it was in (differential.py died once of a corrupted malloc heap with no
# output at all). No effect on a program that does not crash.
export PYTHONFAULTHANDLER=1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

pass() { T_PASS=$((T_PASS + 1)); echo "PASS $1"; }
fail() { T_FAIL=$((T_FAIL + 1)); T_FAILED_NAMES+=("$1"); echo "FAIL $1${2:+: $2}"; }

# check NAME CMD...: passes when CMD exits 0; shows its output when it fails.
check() {
  local name=$1; shift
  local out
  if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$(echo "$out" | tail -5)"; fi
}

# check_fails NAME CMD...: passes when CMD exits non-zero.
check_fails() {
  local name=$1; shift
  if "$@" >/dev/null 2>&1; then fail "$name" "expected failure, got success"; else pass "$name"; fi
}

# free_port: a TCP port nothing listens on, below the kernel's ephemeral range (so an
# outgoing connection of a test running beside this one, e.g. a Ceph client, cannot be
# holding it: CI once lost a check to a random port in 32768-60999 already in use).
free_port() {
  local lo p _
  lo=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  [ "$lo" -gt 12000 ] || lo=32768
  for _ in $(seq 1 100); do
    p=$((10000 + RANDOM % (lo - 10000)))
    ss -Htan "( sport = :$p or dport = :$p )" 2>/dev/null | grep -q . || { echo "$p"; return 0; }
  done
  echo "free_port: no free TCP port found below $lo" >&2; return 1
}

# Start a background process, remember its pid.
spawn() { "$@" & T_PIDS+=($!); }

cleanup_pids() {
  local p
  for p in "${T_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${T_PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  T_PIDS=()
}

# wait_for_socket PATH [SECONDS]
wait_for_socket() {
  local i
  for i in $(seq 1 $((${2:-10} * 10))); do [ -S "$1" ] && return 0; sleep 0.1; done
  echo "socket $1 did not appear" >&2; return 1
}

# wait_for_log FILE PATTERN [SECONDS]: a daemon's log line that comes later than its
# socket (the object map rebuilt in the background after a crash), waited for.
wait_for_log() {
  local i
  for i in $(seq 1 $((${3:-60} * 10))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "no '$2' in $1 after ${3:-60}s" >&2; return 1
}

# forget_pid PID: a process of ours that was reaped: cleanup_pids must not signal its pid,
# which the kernel may have given to another process since. (Exact matches only: a pattern
# substitution would cut 123 out of 41234 and leave 44.)
forget_pid() {
  local p keep=()
  for p in "${T_PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  T_PIDS=("${keep[@]}")
}

# Stop a daemon by pid with SIGTERM and wait for it to exit; returns its exit status.
stop_daemon() {
  local pid=$1 rc=0
  kill -TERM "$pid" 2>/dev/null || return 0
  wait "$pid" || rc=$?
  forget_pid "$pid"
  return $rc
}

# omap_check IMAGE[@SNAP]: Ceph's `rbd object-map check` exits 0 even when it finds the map
# wrong: it logs "object map error: ... marked as 3, but should be 1" and flags the map
# invalid. So a check is passed only when it logged no error and left the flags clean.
omap_check() {
  local out
  out=$(rbd object-map check "$1" 2>&1) || { echo "$out" | tail -3; return 1; }
  if grep -q "object map error" <<<"$out"; then
    grep "object map error" <<<"$out" | head -3; return 1
  fi
  if rbd info "$1" 2>/dev/null | grep -q "flags:.*invalid"; then
    echo "after rbd object-map check: $(rbd info "$1" | grep flags:)"; return 1
  fi
}
export -f omap_check

# acked_none LOG: 1 when the `nbdtool.py journal-write` whose output is LOG acked nothing
# (its server was killed before the first acknowledgement), else 0; passed to journal-verify
# as JOURNAL_EMPTY_OK, which otherwise refuses a journal with no acked write (a vacuous check).
acked_none() { if grep -q "after 0 acked writes\|could not connect" "$1"; then echo 1; else echo 0; fi; }

t_summary() {
  echo "${T_PASS} passed, ${T_FAIL} failed"
  [ "$T_FAIL" -eq 0 ]
}

# run_counted CMD...: runs a test program that prints its own `PASS ...`/`FAIL ...` lines and
# counts them here; its other lines are shown as they are. A non-zero exit without a FAIL line
# (a crash, a timeout) is a failure too.
run_counted() {
  local out rc line
  out=$(mktemp /tmp/rados-nbd-counted.XXXXXX)
  "$@" >"$out" 2>&1; rc=$?
  while IFS= read -r line; do
    case $line in
      "PASS "*) pass "${line#PASS }" ;;
      "FAIL "*) fail "${line#FAIL }" ;;
      *) echo "$line" ;;
    esac
  done <"$out"
  if [ "$rc" != 0 ] && ! grep -q '^FAIL ' "$out"; then
    # Name the program: the first script among the arguments (past `timeout -k 10 N PY`).
    local name=$1 a
    for a in "$@"; do case $a in *.py|*.sh) [ -f "$a" ] && { name=$a; break; } ;; esac; done
    fail "$(basename -- "$name")" "exit $rc: $(tail -3 "$out" | tr '\n' ' ')"
  fi
  rm -f "$out"
}

# again_if_crashed CMD...: runs CMD, a python test program; when that program itself died
# of SIGABRT or SIGSEGV with a "Fatal Python error" (PYTHONFAULTHANDLER's stacks) and no
# FAIL line, prints that run's output marked as such and runs CMD once more. Seen in
# tests/ceph/differential.py, which holds librbd and librados (python3-rbd, the twin
# image) for thousands of image opens: a corrupted malloc heap (exit 139), and a
# std::system_error thrown in a librados thread of the test process (exit 134, core:
# librados.so frames only). rados-nbd runs in processes of its own: its failures are
# FAIL lines or exits of those processes, and one that made librbd crash the same way
# every time would crash the second run too and fail. The same for a run that hung (exit
# 75 with a 'hung:' line: tests/diffops.py's watchdog; seen: librbd deadlocked in
# rbd_open_read_only on a mutex whose memory was garbage). Anything else passes through.
again_if_crashed() {
  local out rc
  out=$(mktemp /tmp/rados-nbd-crash.XXXXXX)
  "$@" >"$out" 2>&1; rc=$?
  if [ "$rc" = 75 ] && grep -q '^hung: ' "$out" && ! grep -q '^FAIL ' "$out"; then
    sed 's/^/  hung run: /' "$out"
    echo "note: the test program hung (its stacks above); running it once more"
    rm -f "$out"
    "$@"
    return
  fi
  if { [ "$rc" = 134 ] || [ "$rc" = 139 ]; } && grep -q '^Fatal Python error' "$out" \
      && ! grep -q '^FAIL ' "$out"; then
    sed 's/^/  crashed run: /' "$out"
    echo "note: the test program itself crashed (exit $rc; its stacks above are in python3-rbd," \
      "librados or libnbd, not rados-nbd); running it once more"
    rm -f "$out"
    "$@"
    return
  fi
  cat "$out"
  rm -f "$out"
  return "$rc"
}

# has_ceph BIN: whether BIN was built with the Ceph store. Probed with a config naming a
# loopback monitor and a keyring that does not exist, so a ceph-enabled build stops before any
# traffic (an empty config would send librados looking for monitors in DNS).
has_ceph() {
  local d out
  d=$(mktemp -d)
  printf '[global]\nmon host = v2:127.0.0.1:1\n' >"$d/probe.conf"
  out=$("$1" --store "ceph:$d/probe.conf" --keyring "$d/no-keyring" ls 2>&1)
  rm -rf "$d"
  ! grep -q "no Ceph support" <<<"$out"
}

# Ceph's own command-line clients can hang for good: in a CI run an `rbd info` of librados
# 16.2.15 never ended (seen with gdb: closing its image, while MonClient::tick reopened the
# monitor session, and ~MonConnection's AsyncConnection::mark_down waited on a mutex for
# good, as did a messenger worker and an io_context_pool thread), and the suite with it. So
# every `rbd` and `rados` the suites run (directly or in `bash -c`) is ended after
# CEPH_CALL_TIMEOUT seconds (default 600), saying so on stderr. A command that only reads
# (rbd info/ls/status/du/diff/export/children, snap ls, lock ls, object-map check,
# image-meta get/list; rados stat/ls/get/lssnap and omap, xattr and watcher reads) gets
# CEPH_READ_TIMEOUT (300 s) and, after such a hang, one more try; its output is held back
# until it finished, so a retry never doubles it. Defined only where the tool is installed
# (`command -v` keeps telling whether it is); in the caller's process group (--foreground),
# as the bare tool was.
ceph_call() {
  local tool=$1 t=${CEPH_CALL_TIMEOUT:-600} tries=1 out= rc w words=() skip=0 try
  shift
  for w in "$@"; do
    if [ "$skip" = 1 ]; then skip=0; continue; fi
    case $w in
      -p|--pool|-N|--namespace|-c|--conf|--id|-n|--name|-k|--keyring|--format|--snap|--image) skip=1 ;;
      -*) ;;
      *) words+=("$w") ;;
    esac
  done
  case "$tool ${words[0]:-} ${words[1]:-}" in
    "rbd info "*|"rbd ls "*|"rbd list "*|"rbd status "*|"rbd du "*|"rbd disk-usage "*|"rbd diff "*|\
    "rbd export "*|"rbd children "*|"rbd snap ls"|"rbd snap list"|"rbd lock ls"|"rbd lock list"|\
    "rbd object-map check"|"rbd image-meta get"|"rbd image-meta list"|\
    "rados stat "*|"rados ls "*|"rados get "*|"rados lssnap "*|"rados listomapvals "*|\
    "rados listomapkeys "*|"rados getomapval "*|"rados getomapheader "*|"rados listwatchers "*|\
    "rados getxattr "*|"rados listxattr "*)
      t=${CEPH_READ_TIMEOUT:-300} tries=2 out=$(mktemp) ;;
  esac
  for ((try = 1; try <= tries; try++)); do
    if [ -n "$out" ]; then
      timeout --foreground -k 10 "$t" "$tool" "$@" >"$out"; rc=$?
    else
      timeout --foreground -k 10 "$t" "$tool" "$@"; rc=$?
    fi
    [ "$rc" = 124 ] || [ "$rc" = 137 ] || break
    echo "tests/lib.sh: '$tool $*' did not finish in $t s (a hung Ceph client)," \
      "ended (try $try of $tries)" >&2
  done
  if [ -n "$out" ]; then cat "$out"; rm -f "$out"; fi
  return "$rc"
}
if type -P rbd >/dev/null 2>&1; then rbd() { ceph_call rbd "$@"; }; export -f rbd; fi
if type -P rados >/dev/null 2>&1; then rados() { ceph_call rados "$@"; }; export -f rados; fi
export -f ceph_call
