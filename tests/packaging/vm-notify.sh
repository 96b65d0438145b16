#!/bin/bash
# Guest snippet for the kernel VM suite: what rados-nbd@.service (Type=notify) relies on.
# `map --foreground` must send READY=1 to $NOTIFY_SOCKET only once the device reads, and
# STOPPING=1 when SIGTERM starts the clean unmap; it then exits 0. The socket is in the
# abstract namespace, as systemd's often is. Needs the kernel code to call
# rados_nbd::notify::{ready,stopping} (see packaging/README.md).
#
#   W=$(mktemp -d /var/tmp/notify.XXXXXX); cp target/release/rados-nbd "$W"/
#   tests/vm/vm.sh tests/packaging/vm-notify.sh "$W" RADOS_NBD_BIN=/mnt/rados-nbd
# Prints PASS/FAIL lines and 'N passed, N failed'; exits non-zero when anything failed.
set -u
: "${RADOS_NBD_BIN:?RADOS_NBD_BIN=path of rados-nbd}"
W=${VM_WORK:-/mnt}/notify-test
rm -rf "$W"; mkdir -p "$W"
MP=(); [ -n "${KMODS:-}" ] && MP=(-d "$KMODS")
modprobe "${MP[@]}" nbd nbds_max=8 2>/dev/null
export RADOS_NBD_STORE=$W/store
if ! "$RADOS_NBD_BIN" create --size 16M rbd/n >/dev/null; then
  echo "FAIL notify-vm: create a test image"; echo "0 passed, 1 failed"; exit 1
fi
W=$W /usr/bin/python3 - <<'PY'
import os, signal, socket, subprocess, sys
W = os.environ["W"]; BIN = os.environ["RADOS_NBD_BIN"]
P = F = 0
def check(ok, name, why=""):
    global P, F
    if ok: P += 1; print(f"PASS notify-vm: {name}")
    else: F += 1; print(f"FAIL notify-vm: {name}{': ' + why if why else ''}")
name = f"rados-nbd-notify-{os.getpid()}"
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("\0" + name)
s.settimeout(60)
env = dict(os.environ, NOTIFY_SOCKET="@" + name)
log = open(os.path.join(W, "daemon.log"), "w")
p = subprocess.Popen([BIN, "map", "--foreground", "rbd/n"], env=env, stdout=subprocess.PIPE, stderr=log)
try:
    msg = s.recv(4096).decode()
except socket.timeout:
    msg = ""
check("READY=1" in msg.split("\n"), "READY=1 sent by map --foreground", repr(msg))
dev = msg.rsplit("mapped at ", 1)[-1].strip() if "mapped at " in msg else ""
n = -1
if dev.startswith("/dev/nbd"):
    fd = os.open(dev, os.O_RDONLY)
    n = len(os.pread(fd, 4096, 0)); os.close(fd)
check(n == 4096, f"the device ({dev or 'not named'}) reads when READY=1 arrives", f"read {n} bytes")
p.send_signal(signal.SIGTERM)
try:
    msg = s.recv(4096).decode()
except socket.timeout:
    msg = ""
check("STOPPING=1" in msg.split("\n"), "STOPPING=1 when SIGTERM starts the unmap", repr(msg))
try:
    rc = p.wait(120)
except subprocess.TimeoutExpired:
    p.kill(); rc = "timeout"
check(rc == 0, "clean exit after SIGTERM", f"status {rc}")
print(f"{P} passed, {F} failed")
sys.exit(1 if F else 0)
PY
