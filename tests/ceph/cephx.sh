#!/usr/bin/env bash
# cephx: the daemon authenticates as a restricted user (client.nbd: mon 'profile rbd',
# osd 'profile rbd pool=rbd') from a keyring file, serves and does I/O, and the secret key
# shows up nowhere: not in its stderr at its most verbose level (-vv, RUST_LOG=trace), not in
# librados' own log at high debug levels, not in /proc/PID/cmdline or environ, not in
# `info`/`ls`/`list-mapped` output, not in the one-line errors for a missing, unreadable,
# garbage or wrong keyring or a wrong id.
# Needs $CEPH_CONF and $CEPH_NBD_KEYRING (tests/ceph/run.sh passes what cluster.sh printed).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh" cephx
if [ -z "${CEPH_NBD_KEYRING:-}" ]; then
  echo "SKIP cephx suite: the cluster runs without auth (CEPH_AUTH=none)"; exit 0
fi
ID=${CEPH_NBD_ID:-nbd}
KR=$CEPH_NBD_KEYRING
# librados at high debug levels, into a file of ours (CEPH_ARGS is read by the daemon).
dbg_args() { echo "--debug-auth=30 --debug-monc=30 --debug-rados=20 --debug-ms=1 --log-file=$1"; }

# Every key that must never show: ours, the admin's, and the wrong one made below.
admin_kr=$(ceph-conf -c "$CEPH_CONF" -n client.admin --lookup keyring 2>/dev/null)
ceph-authtool --create-keyring "$work/wrong.keyring" --gen-key -n "client.$ID" >/dev/null
keyrings=("$KR" "$work/wrong.keyring")
[ -f "$admin_kr" ] && keyrings+=("$admin_kr")
# leaks FILE...: prints where a secret shows, in any form: the keyring's base64, the bare
# 16-byte secret as raw bytes, hex, or its own base64. Exit 0 = no leak.
cat > "$work/leaks.py" <<'PY'
import base64, re, sys
keyrings, files = sys.argv[1].split(":"), sys.argv[2:]
forms = []
for kr in keyrings:
    for m in re.finditer(rb"key\s*=\s*(\S+)", open(kr, "rb").read()):
        blob = base64.b64decode(m.group(1))          # type u16, created u64, len u16, secret
        secret = blob[12:12 + int.from_bytes(blob[10:12], "little")]
        forms += [m.group(1), secret, secret.hex().encode(), secret.hex().upper().encode(),
                  base64.b64encode(secret).rstrip(b"=")]
found = [f"{f}: {kr_form[:12]!r}..." for f in files for kr_form in forms
         if kr_form and kr_form in open(f, "rb").read()]
print("\n".join(found))
sys.exit(1 if found else 0)
PY
KRS=$(IFS=:; echo "${keyrings[*]}")
no_leak() { $PY "$work/leaks.py" "$KRS" "$@"; }

check "secret scan finds the key in the keyring itself (the scan can fail)" \
  bash -c "! $PY '$work/leaks.py' '$KRS' '$KR' >/dev/null"
printf 'log line %s\n' "$($PY -c "
import base64,re;b=base64.b64decode(re.search(r'key\s*=\s*(\S+)',open('$KR').read()).group(1));print(b[12:28].hex())")" \
  > "$work/hexleak.txt"
check "secret scan finds the bare secret written as hex" \
  bash -c "! $PY '$work/leaks.py' '$KRS' '$work/hexleak.txt' >/dev/null"

# Spelt out, not common.sh's RN: the options under test, at the most verbose level.
RN=("$BIN" -vv --store "ceph:$CEPH_CONF" --id "$ID" --keyring "$KR")

# ---------------------------------------------------------------- serve as client.nbd
rbd create --size 64M cx-a
head -c $((8 * MB)) /dev/urandom > "$work/a.raw"
truncate -s $((64 * MB)) "$work/a.raw"
rm -f "$sock"
RUST_LOG=trace CEPH_ARGS="$(dbg_args "$work/librados-serve.log")" \
  "${RN[@]}" serve cx-a --socket "$sock" >"$work/serve.out" 2>"$work/serve.err" &
SERVE_PID=$!; T_PIDS+=("$SERVE_PID")
if ! wait_for_socket "$sock" 60; then
  fail "serve as client.$ID with --keyring" "$(tail -3 "$work/serve.err")"; t_summary; exit 1
fi
pass "serve as client.$ID (mon 'profile rbd', osd 'profile rbd pool=rbd') with --keyring"
uri="nbd+unix:///cx-a?socket=$sock"
check "client.$ID: nbdcopy writes 8 MiB" nbdcopy "$work/a.raw" "$uri"
check "client.$ID: reads back what was written" bash -c "nbdcopy '$uri' - | cmp - '$work/a.raw'"
tr '\0' '\n' < "/proc/$SERVE_PID/cmdline" > "$work/cmdline"
tr '\0' '\n' < "/proc/$SERVE_PID/environ" > "$work/environ"
check "/proc/PID/cmdline is the daemon's (names the keyring path)" grep -qxF -- "$KR" "$work/cmdline"
check "no secret in /proc/PID/cmdline" no_leak "$work/cmdline"
check "no secret in /proc/PID/environ" no_leak "$work/environ"
RUST_LOG=trace "${RN[@]}" info cx-a >"$work/info.out" 2>&1
check "info as client.$ID works while served" grep -q "size 64 MiB" "$work/info.out"
RUST_LOG=trace "${RN[@]}" info cx-a --format json >"$work/info.json" 2>"$work/info.err"
check "info --format json as client.$ID" jq -e '.size == 67108864' "$work/info.json"
RUST_LOG=trace "${RN[@]}" ls >"$work/ls.out" 2>&1
check "ls as client.$ID lists the image" grep -qx cx-a "$work/ls.out"
RUST_LOG=trace "${RN[@]}" list-mapped >"$work/list-mapped.out" 2>&1
check "list-mapped with --id/--keyring runs" test $? = 0
RUST_LOG=trace "${RN[@]}" list-mapped --format json >"$work/list-mapped.json" 2>&1
check "no secret in info / ls / list-mapped output" no_leak \
  "$work/info.out" "$work/info.json" "$work/info.err" "$work/ls.out" \
  "$work/list-mapped.out" "$work/list-mapped.json"
stop_daemon "$SERVE_PID"; rc=$?
check "SIGTERM: clean exit" test "$rc" = 0
check "rbd export (client.admin) equals what client.$ID wrote" bash -c \
  "[ \"\$(rbd export cx-a - 2>/dev/null | sha)\" = \"\$(sha < '$work/a.raw')\" ]"
check "rbd object-map check passes" omap_check cx-a
# -vv/RUST_LOG=trace enables everything; the daemon's most detailed events are DEBUG.
check "the daemon logged at its most verbose level (the scan had something to read)" \
  bash -c "[ \$(grep -c ' DEBUG ' '$work/serve.err') -gt 10 ]"
check "librados logged cephx at debug-auth 30 (the scan had something to read)" \
  grep -q cephx "$work/librados-serve.log"
check "no secret in the daemon's stdout/stderr at -vv / RUST_LOG=trace" \
  no_leak "$work/serve.out" "$work/serve.err"
check "no secret in librados' own log at debug-auth 30 / debug-monc 30" \
  no_leak "$work/librados-serve.log"

# ---------------------------------------------------------------- bad credentials
# bad NAME NEEDLE ARGS...: `serve` must fail fast with exit != 0 and one line on stderr,
# "rados-nbd: ...", naming NEEDLE (the keyring path or the user), with no secret anywhere.
n=0
bad() {
  local name=$1 needle=$2; shift 2
  n=$((n + 1))
  local err=$work/bad$n.err lib=$work/librados-bad$n.log rc
  rm -f "$work/bad.sock"
  RUST_LOG=trace CEPH_ARGS="$(dbg_args "$lib")" timeout 120 \
    "$@" serve cx-a --socket "$work/bad.sock" >"$work/bad$n.out" 2>"$err"
  rc=$?
  local lines; lines=$(grep -c . "$err")
  if [ "$rc" = 0 ] || [ "$rc" = 124 ]; then fail "$name: exits non-zero, promptly" "exit $rc"
  elif [ "$lines" != 1 ] || ! grep -q '^rados-nbd: ' "$err"; then
    fail "$name: one line 'rados-nbd: ...' on stderr" "$(head -3 "$err")"
  elif ! grep -qF -- "$needle" "$err"; then fail "$name: the error names $needle" "$(cat "$err")"
  else pass "$name: exit $rc, one line naming $needle"; fi
  touch "$lib"
  check "$name: no secret in the error, stdout or librados' log" \
    no_leak "$err" "$work/bad$n.out" "$lib"
}
B=("$BIN" -vv --store "ceph:$CEPH_CONF")
bad "missing keyring" "$work/none.keyring" "${B[@]}" --id "$ID" --keyring "$work/none.keyring"
bad "keyring is a directory" "$work" "${B[@]}" --id "$ID" --keyring "$work"
cp "$KR" "$work/unreadable.keyring"; chmod 000 "$work/unreadable.keyring"
if [ "$(id -u)" != 0 ]; then
  bad "unreadable keyring" "$work/unreadable.keyring" \
    "${B[@]}" --id "$ID" --keyring "$work/unreadable.keyring"
elif command -v setpriv >/dev/null; then
  # root reads mode-000 files; without these capabilities it cannot.
  bad "unreadable keyring (root without CAP_DAC_*)" "$work/unreadable.keyring" \
    setpriv --bounding-set=-dac_override,-dac_read_search \
    "${B[@]}" --id "$ID" --keyring "$work/unreadable.keyring"
else
  echo "SKIP unreadable keyring: running as root and setpriv is missing"
fi
printf 'this is not a keyring\n' > "$work/garbage.keyring"
bad "garbage keyring" "$work/garbage.keyring" "${B[@]}" --id "$ID" --keyring "$work/garbage.keyring"
bad "wrong key for client.$ID" "$work/wrong.keyring" \
  "${B[@]}" --id "$ID" --keyring "$work/wrong.keyring"
bad "wrong key for client.$ID: the user is named" "client.$ID" \
  "${B[@]}" --id "$ID" --keyring "$work/wrong.keyring"
bad "unknown id" "client.nosuch" "${B[@]}" --id nosuch --keyring "$KR"
bad "no --keyring (the config's keyring holds no key for client.$ID)" "client.$ID" "${B[@]}" --id "$ID"

check "rados-nbd rm cx-a as client.$ID" "${RN[@]}" rm cx-a
t_summary
