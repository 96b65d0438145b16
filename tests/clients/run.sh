#!/usr/bin/env bash
# End-to-end tests of `rados-nbd serve` on the embedded directory store, driven by real NBD
# clients from Debian (nbdinfo, nbdcopy, nbdsh, qemu-img, fio) and by a raw-socket script.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
work=$(mktemp -d /tmp/rados-nbd-clients.XXXXXX)
trap 'cleanup_pids; rm -rf "$work"' EXIT
export RADOS_NBD_STORE=$work/store
mkdir -p "$RADOS_NBD_STORE"
sock=$work/nbd.sock
uri="nbd+unix:///t1?socket=$sock"
OBJ=$((4 << 20)); SIZE=$((256 << 20))

serve() { spawn "$BIN" serve "$@"; SERVE_PID=$!; wait_for_socket "$sock"; }
unserve() { stop_daemon "$SERVE_PID"; rm -f "$sock"; }

check "--version names the release and the optional parts built in ($("$BIN" --version))" bash -c \
  "'$BIN' --version | grep -qxE 'rados-nbd [0-9]+\.[0-9]+\.[0-9]+[^ ]* \(stores: dir, (no )?ceph; transports: nbd, (no )?ublk\)'"
check "create image" "$BIN" create --size 256M t1
check "info shows the size" bash -c "'$BIN' info t1 --format json | jq -e '.size == $SIZE'"
check "RADOS_NBD_STORE takes a store URI too (dir:PATH), not a relative directory so named" \
  bash -c "cd '$work' && RADOS_NBD_STORE='dir:$RADOS_NBD_STORE' '$BIN' ls | grep -qx t1 && [ ! -e '$work/dir:' ]"
check "rename (mv) of an image nobody serves" bash -c \
  "'$BIN' create --size 8M rn1 && '$BIN' rename rn1 rn2 && '$BIN' ls | grep -qx rn2 && ! '$BIN' ls | grep -qx rn1 &&
   '$BIN' info rn2 >/dev/null && [ -e '$RADOS_NBD_STORE/rbd/rbd_id.rn2' ] && [ ! -e '$RADOS_NBD_STORE/rbd/rbd_id.rn1' ]"
# refused PATTERN CMD...: CMD fails, and what it says matches PATTERN.
refused() { local pat=$1 out; shift; out=$("$@" 2>&1) && return 1; grep -q "$pat" <<<"$out"; }
check "rename onto a name taken is refused" refused 'already exists' "$BIN" rename rn2 t1
check "rename of a missing image is refused" refused 'not found' "$BIN" rename nosuch x
check "mv to another pool is refused" refused 'across pools' "$BIN" mv rn2 p2/rn3
check "rename of a snapshot is refused" refused 'snapshot' "$BIN" rename rn2@s x
check "... rn2 is still there, and goes" bash -c "'$BIN' ls | grep -qx rn2 && '$BIN' rm rn2 >/dev/null"
# librbd's object-map limit (256 000 000 objects): rbd create --size 1P refuses, so do we.
check "create past the object map's limit is refused, as rbd create refuses it" \
  refused 'not compatible with object map' "$BIN" create --size 1P huge
check "... it fits with 8 MiB objects; a resize past the limit is refused" bash -c \
  "'$BIN' create --size 1P --object-size 8M huge && ! '$BIN' resize --size 3P huge 2>/dev/null &&
   '$BIN' info huge --format json | jq -e '.size == $((1 << 50))' >/dev/null && '$BIN' rm huge >/dev/null"

# A source file with data in objects 0, 5 and 10 (1 MiB at the start of each), holes elsewhere.
src=$work/src.raw
truncate -s $SIZE "$src"
for o in 0 5 10; do
  head -c $((1 << 20)) /dev/urandom | dd of="$src" bs=1M seek=$((o * 4)) conv=notrunc status=none
done

serve t1 --socket "$sock"
check "socket is mode 0600" test "$(stat -c %a "$sock")" = 600
check "nbdinfo sees the export size" bash -c "nbdinfo --json '$uri' | jq -e '.exports[0][\"export-size\"] == $SIZE'"
check "nbdinfo: multi-conn, trim, zero, fast-zero advertised" bash -c \
  "nbdinfo --json '$uri' | jq -e '.exports[0] | .can_multi_conn and .can_trim and .can_zero and .can_fast_zero and .can_flush and .can_fua and (.is_read_only|not)'"
check "fresh image maps as one hole" bash -c \
  "nbdinfo --json --map '$uri' | jq -e 'length == 1 and .[0].type == 3 and .[0].length == $SIZE'"

check "nbdcopy writes the source" nbdcopy --connections=4 "$src" "$uri"
check "qemu-img convert reads back identical data" bash -c \
  "qemu-img convert -f raw -O raw '$uri' '$work/out.raw' && cmp '$src' '$work/out.raw'"
check "qemu-img compare agrees" qemu-img compare -f raw -F raw "$src" "$uri"
# Data objects 0, 5, 10; every other object a hole.
want='[{"o":0,"l":4194304,"t":0},{"o":4194304,"l":16777216,"t":3},{"o":20971520,"l":4194304,"t":0},{"o":25165824,"l":16777216,"t":3},{"o":41943040,"l":4194304,"t":0},{"o":46137344,"l":222298112,"t":3}]'
got=$(nbdinfo --json --map "$uri" | jq -c '[.[] | {o: .offset, l: .length, t: .type}]')
if [ "$got" = "$want" ]; then pass "nbdinfo --map shows data exactly in objects 0, 5, 10"; else fail "nbdinfo --map" "got $got"; fi
check "only three data objects on disk" test "$(find "$RADOS_NBD_STORE" -name 'rbd_data.*' | wc -l)" = 3

# Structured reads of a hole come back as OFFSET_HOLE chunks (no data on the wire).
cat > "$work/holes.py" <<PY
import nbd, sys
h = nbd.NBD()
h.connect_uri("$uri")
assert h.get_structured_replies_negotiated()
kinds = []
def chunk(buf, offset, status, err):
    kinds.append(status)
    return 0
buf = h.pread_structured(1 << 20, 8 << 20, chunk)
assert buf == bytearray(1 << 20), "hole not zero"
assert kinds == [nbd.READ_HOLE], kinds
buf = h.pread_structured(4096, 0, chunk)
assert kinds[-1] == nbd.READ_DATA
h.shutdown()
PY
check "structured read of a hole is one OFFSET_HOLE chunk" "$PY" "$work/holes.py"

# Trim and zero through nbdsh: whole objects disappear, partial ranges read as zeros.
cat > "$work/trim.py" <<PY
import nbd
h = nbd.NBD()
h.connect_uri("$uri")
h.trim(4 << 20, 20 << 20)             # object 5, whole
h.zero(4096, 40 << 20, nbd.CMD_FLAG_FAST_ZERO)  # inside object 10
assert h.pread(4 << 20, 20 << 20) == bytearray(4 << 20)
assert h.pread(4096, 40 << 20) == bytearray(4096)
h.flush()
h.shutdown()
PY
check "trim whole object + fast zero inside an object" "$PY" "$work/trim.py"
check "trimmed object removed from the store" test "$(find "$RADOS_NBD_STORE" -name 'rbd_data.*' | wc -l)" = 2
dd if=/dev/zero of="$src" bs=1M seek=20 count=1 conv=notrunc status=none
dd if=/dev/zero of="$src" bs=4096 seek=$((40 * 256)) count=1 conv=notrunc status=none
check "image matches after trim/zero" qemu-img compare -f raw -F raw "$src" "$uri"

# fio with its own verification, over NBD, 4 jobs on 4 connections.
if fio --enghelp 2>/dev/null | grep -qw nbd; then
  check "fio --ioengine=nbd randwrite with verify" fio --name=verify --ioengine=nbd --uri="$uri" \
    --rw=randwrite --bs=4k --offset=128M --size=64M --iodepth=32 --verify=crc32c --verify_fatal=1 \
    --numjobs=1 --do_verify=1 --output=/dev/null
else
  echo "SKIP fio: this fio has no nbd engine"
fi
# Re-sync the oracle with what fio wrote, then discard fio's region again.
cat > "$work/discard.py" <<PY
import nbd
h = nbd.NBD()
h.connect_uri("$uri")
h.trim(64 << 20, 128 << 20)
h.flush()
h.shutdown()
PY
check "discard fio's region" "$PY" "$work/discard.py"

check "protocol edge cases (raw socket)" "$PY" "$here/raw_edge.py" "$sock" t1
check "past the end: TRIM/READ get EINVAL, WRITE/WRITE_ZEROES ENOSPC" "$PY" "$here/past_end.py" "$uri"
# The same script against nbdkit: the oracle for what the errors should be.
spawn nbdkit -f -U "$work/nbdkit.sock" memory 1M; NBDKIT_PID=$!
wait_for_socket "$work/nbdkit.sock"
check "past the end: nbdkit (oracle) answers the same" "$PY" "$here/past_end.py" "nbd+unix:///?socket=$work/nbdkit.sock"
stop_daemon "$NBDKIT_PID"

# raw_edge.py wrote this pattern at 8192: keep the oracle in step.
"$PY" -c "import sys; f=open(sys.argv[1],'r+b'); f.seek(8192); f.write(bytes(range(256))*16)" "$src"

# The dirty flag: set while a writer is connected, cleared (map checkpointed) when the
# last client leaves, even though the server keeps running.
hold() {  # hold FILE OFFSET: write FILE's bytes at OFFSET (no flush), report 'acked', stay connected
  # A fresh file each time: the redirection below truncates it in the forked child, which a
  # loaded machine may run after the poll below has already read the previous hold's
  # 'acked', and the caller would then go on (kill -9 the daemon) before this write was
  # even sent.
  rm -f "$work/hold.out"
  "$PY" -c "
import nbd, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.pwrite(open(sys.argv[2], 'rb').read(), int(sys.argv[3]))
print('acked', flush=True); time.sleep(600)" "$uri" "$1" "$2" > "$work/hold.out" 2>&1 &
  HOLD_PID=$!; T_PIDS+=($HOLD_PID)
  for _ in $(seq 1 100); do grep -q acked "$work/hold.out" 2>/dev/null && return 0; sleep 0.1; done
  return 1
}
flag_clear() { for _ in $(seq 1 100); do "$BIN" info t1 | grep -q invalid || return 0; sleep 0.1; done; return 1; }
printf 'h%.0s' $(seq 1 512) > "$work/h512"
# The checkpoint queued when the previous client left runs in its own task, possibly late
# on a loaded machine: after the writer below, clearing the flag it set (rightly: that
# checkpoint writes a map with the writer's object). Wait for it first, so the flag seen
# below is the one the writer's first map-changing write set again.
check "previous clients gone: flag cleared" flag_clear
if hold "$work/h512" $((200 << 20)); then pass "a writer connects and writes"; else fail "a writer connects and writes"; fi
"$PY" -c "import sys; f=open(sys.argv[1],'r+b'); f.seek(200 << 20); f.write(b'h' * 512)" "$src"
check "image flagged dirty while a writer is connected" bash -c "'$BIN' info t1 | grep -q 'object map invalid'"
kill "$HOLD_PID"; wait "$HOLD_PID" 2>/dev/null
check "last client gone: map checkpointed, flag cleared" flag_clear
check "object-map check passes while idle" "$BIN" object-map check t1

if stop_daemon "$SERVE_PID"; then pass "SIGTERM ends serve with exit 0"; else fail "SIGTERM ends serve with exit 0"; fi
rm -f "$sock"
check "clean close clears the dirty flag" bash -c "! '$BIN' info t1 | grep -q 'invalid'"
check "object-map check passes after clean close" "$BIN" object-map check t1
check "du counts three objects" bash -c "'$BIN' du t1 | grep -Eq '12 ?MiB'"

# SIGHUP (the terminal serve ran in went away) is a clean close too, with a writer connected.
serve t1 --socket "$sock"
if hold "$work/h512" $((220 << 20)); then pass "a writer writes a new object"; else fail "a writer writes a new object"; fi
"$PY" -c "import sys; f=open(sys.argv[1],'r+b'); f.seek(220 << 20); f.write(b'h' * 512)" "$src"
check "... the image is flagged dirty" bash -c "'$BIN' info t1 | grep -q 'object map invalid'"
kill -HUP "$SERVE_PID"; hup_rc=0; wait "$SERVE_PID" || hup_rc=$?; forget_pid "$SERVE_PID"; rm -f "$sock"
kill "$HOLD_PID" 2>/dev/null; wait "$HOLD_PID" 2>/dev/null
check "SIGHUP ends serve with exit 0" test "$hup_rc" = 0
check "... after a clean close: flag cleared, map checks" bash -c \
  "! '$BIN' info t1 | grep -q invalid && '$BIN' object-map check t1"

# Data survives a restart.
serve t1 --socket "$sock"
check "data intact after restart" qemu-img compare -f raw -F raw "$src" "$uri"
# Crash: kill -9 after acked writes. The flag stays set; the next open rebuilds the map.
head -c $((1 << 20)) /dev/urandom > "$work/chunk"
# qemu-img compare left: the checkpoint it queued clears the flag. Wait for it, or it may
# run after the write below (a loaded machine) and rightly clear the flag that write set,
# its map listing object 25: the flag check after the crash would then fail for no fault.
check "compare gone: map checkpointed, flag cleared" flag_clear
# A client still connected (no checkpoint can happen) writes into a new object (object 25:
# after a checkpoint only a map-changing write sets the flag again), is acked without a
# flush, and the daemon is killed.
if hold "$work/chunk" $((100 << 20)); then pass "acked write before crash (no flush)"; else fail "acked write before crash (no flush)"; fi
kill -9 "$SERVE_PID"; wait "$SERVE_PID" 2>/dev/null; rm -f "$sock"
kill "$HOLD_PID"; wait "$HOLD_PID" 2>/dev/null
# The acked write reached the store (the page cache outlives the process): if this fails,
# the write was never sent, and the checks below say nothing about the daemon.
check "acked write reached the store (object 25 exists)" \
  test -n "$(find "$RADOS_NBD_STORE" -name 'rbd_data.*.0000000000000019')"
dd if="$work/chunk" of="$src" bs=1M seek=100 conv=notrunc status=none
check "crashed daemon leaves object map invalid" bash -c "'$BIN' info t1 | grep -q 'object map invalid'"
serve t1 --socket "$sock"
check "after crash: acked data intact" qemu-img compare -f raw -F raw "$src" "$uri"
unserve
check "after crash + clean close: object-map check passes" "$BIN" object-map check t1
check "after crash + clean close: flag cleared" bash -c "! '$BIN' info t1 | grep -q 'invalid'"

# Read-only export: writes refused, flags untouched.
serve t1 --socket "$sock" --read-only
cat > "$work/ro.py" <<PY
import nbd
h = nbd.NBD()
h.connect_uri("$uri")
assert h.is_read_only()
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * 512, 0)
    raise SystemExit("write accepted on a read-only export")
except nbd.Error as e:
    assert e.errno in ("EPERM", "EROFS"), e.errno
PY
check "read-only export refuses writes with EPERM" "$PY" "$work/ro.py"
check "read-only open never sets the flag" bash -c "! '$BIN' info t1 | grep -q 'invalid'"
unserve

# TCP on loopback.
# Port 0: the kernel picks a free port and the daemon names it (no race with other tests).
spawn "$BIN" serve t1 --listen 127.0.0.1:0 2>"$work/tcp.err"; SERVE_PID=$!
port=
for i in $(seq 1 300); do
  port=$(sed -n 's/.* on tcp:127\.0\.0\.1:\([0-9][0-9]*\) as export.*/\1/p' "$work/tcp.err")
  [ -n "$port" ] && break; sleep 0.1
done
check "--listen 127.0.0.1:0 names the port it got" test "${port:-0}" -gt 0
check "TCP on 127.0.0.1 serves the export" bash -c "test \"\$(nbdinfo --size nbd://127.0.0.1:$port/t1)\" = $SIZE"
stop_daemon "$SERVE_PID"

# TLS server keys as openssl makes them: every kind rustls/ring can sign with serves a TLS
# client; the others (RSA of 2432 bits, what older certtool made, as PKCS#1 like certtool
# writes it; RSA 8192; P-521) are refused in one line that says what the key is.
pki=$work/pki; mkdir -p "$pki"
o() { openssl "$@" >/dev/null 2>&1; }
o req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$pki/ca-key.pem" \
  -out "$pki/ca-cert.pem" -days 2 -subj "/CN=rados-nbd test CA" || fail "TLS: test CA" "openssl failed"
printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$pki/srv.ext"
tls_key() {  # tls_key NAME GENPKEY-ARGS...: NAME.key and NAME.crt signed by the CA
  local n=$1; shift
  o genpkey "$@" -out "$pki/$n.key" &&
    o req -new -key "$pki/$n.key" -out "$pki/$n.csr" -subj "/CN=localhost" &&
    o x509 -req -in "$pki/$n.csr" -CA "$pki/ca-cert.pem" -CAkey "$pki/ca-key.pem" \
      -CAcreateserial -out "$pki/$n.crt" -days 2 -extfile "$pki/srv.ext"
}
for bits in 2048 2432 3072 4096 8192; do
  tls_key rsa$bits -algorithm RSA -pkeyopt rsa_keygen_bits:$bits || fail "TLS: RSA $bits key" "openssl failed"
done
o rsa -traditional -in "$pki/rsa2432.key" -out "$pki/rsa2432.key" || fail "TLS: PKCS#1 key" "openssl failed"
for c in P-256 P-384 P-521; do
  tls_key ec$c -algorithm EC -pkeyopt ec_paramgen_curve:$c || fail "TLS: EC $c key" "openssl failed"
done
tls_key ed25519 -algorithm ED25519 || fail "TLS: Ed25519 key" "openssl failed"
tls_uri="nbds+unix:///t1?socket=$sock&tls-certificates=$pki"
for k in rsa2048 rsa3072 rsa4096 ecP-256 ecP-384 ed25519; do
  serve t1 --socket "$sock" --tls=require --tls-cert "$pki/$k.crt" --tls-key "$pki/$k.key"
  check "TLS with a $k server key: nbdinfo over TLS" bash -c \
    "nbdinfo --json '$tls_uri' | jq -e '.TLS == true and .exports[0][\"export-size\"] == $SIZE'"
  unserve
done
for k in rsa2432:"RSA key of 2432 bits" rsa8192:"RSA key of 8192 bits" ecP-521:"ECDSA key on P-521 curve"; do
  name=${k%%:*} what=${k#*:}
  out=$("$BIN" serve t1 --socket "$sock" --tls=require --tls-cert "$pki/$name.crt" --tls-key "$pki/$name.key" 2>&1); rc=$?
  if [ $rc -ne 0 ] && [ "$(echo "$out" | wc -l)" = 1 ] && echo "$out" | grep -q "$name.key: $what" &&
    echo "$out" | grep -q "2048, 3072 or 4096 bits"; then
    pass "TLS with a $name server key: refused in one line saying what the key is"
  else fail "TLS with a $name server key refused" "rc=$rc: $out"; fi
done

# Bad input: one clear line, non-zero exit, nothing changed.
before=$(find "$RADOS_NBD_STORE" -type f -printf '%p %s %T@\n' | sort | sha256sum)
out=$("$BIN" info nosuch 2>&1); rc=$?
if [ $rc -ne 0 ] && [ "$(echo "$out" | wc -l)" = 1 ] && echo "$out" | grep -q '^rados-nbd: .*nosuch'; then
  pass "missing image: one line naming it"; else fail "missing image" "rc=$rc out=$out"; fi
check_fails "bad size refused" "$BIN" create --size 12Q t2
check_fails "unknown store refused" "$BIN" --store nosuch:/x ls
check_fails "existing image not created twice" "$BIN" create --size 1M t1
# RBD namespaces exist on the Ceph store only: refused by name, not as a bad image name.
for cmd in "create --size 1M rbd/ns1/t1" "info rbd/ns1/t1" "ls rbd/ns1"; do
  out=$("$BIN" $cmd 2>&1); rc=$?
  if [ $rc -ne 0 ] && [ "$(echo "$out" | wc -l)" = 1 ] && echo "$out" | grep -q 'namespace ns1.*Ceph store only'; then
    pass "dir store: '$cmd' refused naming the namespace"; else fail "dir store: '$cmd'" "rc=$rc: $out"; fi
done
after=$(find "$RADOS_NBD_STORE" -type f -printf '%p %s %T@\n' | sort | sha256sum)
check "bad input changed nothing on disk" test "$before" = "$after"
check "rm removes the image" "$BIN" rm t1
check "rm leaves no data objects" test "$(find "$RADOS_NBD_STORE" -name 'rbd_*' | wc -l)" = "$(find "$RADOS_NBD_STORE" -name 'rbd_directory*' | wc -l)"

# Snapshots of a served image (`snap create` asks the serving daemon): exact while four
# clients write. The writers stop before the snapshots are read back.
check "create image for served snapshots" "$BIN" create --size 256M live
serve live --socket "$sock"
run_counted timeout -k 10 300 "$PY" -u "$here/snap_served.py" "$BIN" live "$sock" "$work/snap.sock" 5
unserve
check "object-map check after snapshots of the served image" "$BIN" object-map check live
check "snap ls lists the five served snapshots" bash -c "[ \"\$('$BIN' snap ls live --format json | jq length)\" = 5 ]"

# snap rm and flatten of a served clone ask the serving daemon too (its control socket):
# the clone keeps its bytes, loses its parent, and the parent's snapshot its child.
head -c $((16 << 20)) /dev/urandom >"$work/cp.raw"
check "create a parent for a served clone" "$BIN" create --size 16M cpar
serve cpar --socket "$sock"
check "write the parent" nbdcopy "$work/cp.raw" "nbd+unix:///cpar?socket=$sock"
unserve
check "snapshot and clone of it" bash -c "'$BIN' snap create cpar@s >/dev/null && '$BIN' clone cpar@s cchild"
check "children --snap-id (ids from snap ls) lists that snapshot's clones only" bash -c \
  "'$BIN' snap create cpar@s2 >/dev/null || exit 1
   id=\$('$BIN' snap ls cpar --format json | jq -r '.[] | select(.name == \"s\") | .id')
   id2=\$('$BIN' snap ls cpar --format json | jq -r '.[] | select(.name == \"s2\") | .id')
   [ \"\$('$BIN' children --snap-id \$id cpar)\" = rbd/cchild ] && [ -z \"\$('$BIN' children --snap-id \$id2 cpar)\" ] &&
     [ \"\$('$BIN' children cpar@s)\" = rbd/cchild ]; rc=\$?
   '$BIN' snap rm cpar@s2 >/dev/null; exit \$rc"
check "children of a missing snapshot id, or of a name and an id, is refused" bash -c \
  "! '$BIN' children --snap-id 999999 cpar 2>/dev/null && '$BIN' children --snap-id 1 cpar@s 2>&1 | grep -q 'both given'"
serve cchild --socket "$sock"
check "snap create of the served clone" "$BIN" snap create cchild@a
check "snap protect of the served clone's snapshot (asked of the daemon)" "$BIN" snap protect cchild@a
check "snap rename of the served clone's snapshot (asked of the daemon)" "$BIN" snap rename cchild@a cchild@b
check "snap unprotect of the served clone's snapshot (asked of the daemon)" "$BIN" snap unprotect cchild@b
check "... renamed and unprotected" bash -c \
  "[ \"\$('$BIN' snap ls cchild --format json | jq -r '.[0].name + \" \" + .[0].protected')\" = 'b false' ]"
check "snap rename back (asked of the daemon)" "$BIN" snap rename cchild@b cchild@a
check "snap rm of the served clone's snapshot (asked of the daemon)" "$BIN" snap rm cchild@a
check "... the snapshot is gone" bash -c "[ \"\$('$BIN' snap ls cchild --format json | jq length)\" = 0 ]"
check "snap rm of a missing snapshot of a served image fails" bash -c "! '$BIN' snap rm cchild@nosuch 2>/dev/null"
check "object-map rebuild of the served clone (asked of the daemon)" bash -c \
  "'$BIN' object-map rebuild cchild | grep -q 'rebuilt by the process serving it'"
check "flatten of the served clone (asked of the daemon)" "$BIN" flatten cchild
check "... the served clone reads the parent's bytes" bash -c \
  "nbdcopy 'nbd+unix:///cchild?socket=$sock' '$work/cc.raw' && cmp '$work/cc.raw' '$work/cp.raw'"
# rename (`mv`) of a served image asks the daemon too; it keeps serving it under the
# export name it started with.
check "rename of the served image (asked of the daemon)" "$BIN" rename cchild cchild-r
check "... ls shows the new name only, info opens it" bash -c \
  "'$BIN' ls | grep -qx cchild-r && ! '$BIN' ls | grep -qx cchild && '$BIN' info cchild-r >/dev/null"
check "... still served: writes and reads through NBD" bash -c \
  "nbdsh -u 'nbd+unix:///cchild?socket=$sock' -c 'h.pwrite(b\"r\" * 4096, 0); h.flush(); assert h.pread(4096, 0) == b\"r\" * 4096'"
check "rename onto a name taken is refused by the daemon, saying so" bash -c \
  "out=\$('$BIN' rename cchild-r cpar 2>&1) && exit 1; grep -q 'already exists' <<<\"\$out\""
check "mv of the served image back (asked of the daemon)" "$BIN" mv cchild-r cchild
# What the clone must read from now on (checked below, after it is served again).
printf 'r%.0s' $(seq 1 4096) | dd of="$work/cp.raw" conv=notrunc 2>/dev/null
unserve
check "... no parent left, and the parent snapshot has no child" bash -c \
  "! '$BIN' info cchild | grep -q parent: && [ -z \"\$('$BIN' children cpar@s)\" ]"
check "... its map checks after the serve" "$BIN" object-map check cchild
check "the parent can go once the clone is flat" bash -c "'$BIN' snap rm cpar@s >/dev/null && '$BIN' rm cpar >/dev/null"
serve cchild --socket "$sock"
check "... and the clone keeps the bytes on its own" bash -c \
  "nbdcopy 'nbd+unix:///cchild?socket=$sock' '$work/cc.raw' && cmp '$work/cc.raw' '$work/cp.raw'"
unserve
# Names as rbd takes them (anything but / and @): an image, a snapshot and a clone named with
# white space, quotes and Unicode, served, snapshotted and renamed while served, read back.
run_counted timeout -k 10 300 "$PY" -u "$here/odd_names.py" "$work" -- "$BIN"

# The directory store against an in-memory model: seeded sequences of writes, trims, zeroes,
# closes, kill -9s, resizes and read-only opens, shared with the Ceph differential test
# (tests/diffops.py). DIFF_SEQS sets the budget; `dir_model.py --long` the bench-style mode.
run_counted timeout -k 10 "${DIFF_TIMEOUT:-900}" "$PY" -u "$here/dir_model.py"

t_summary
