#!/usr/bin/env bash
# The ublk transport in a real kernel: boots bookworm-security's 6.12 kernel (Debian's stock
# 6.1 has no ublk: CONFIG_BLK_DEV_UBLK unset; 6.12 has it as a module) under
# qemu-system-x86_64 (tests/vm/vm.sh, RADOS_NBD_VM_KERNEL=6.12) and runs ublk-tests.sh in it.
#
#   tests/vm/ublk-run.sh [BINARY]        (or RADOS_NBD_BIN=BINARY tests/vm/ublk-run.sh)
#
# Skips (exit 0, says so) when qemu is missing or the binary was built without the ublk
# feature. Exit status: the guest tests' (99 when the VM never reported).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  echo "SKIP ublk tests: qemu-system-x86_64 is not installed; nothing was run"
  exit 0
fi
bin=${1:-${RADOS_NBD_BIN:-}}
if [ -z "$bin" ]; then
  echo "== building rados-nbd (release, feature ublk)"
  (cd "$root" && cargo build --release -p rados-nbd --features ublk)
  bin=$root/target/release/rados-nbd
fi
[ -x "$bin" ] || { echo "ublk-run.sh: $bin is not an executable" >&2; exit 2; }
# `--version` names the transports built in (the --transport option is there either way).
if ! "$bin" --version | grep -q 'transports: nbd, ublk'; then
  echo "SKIP ublk tests: $bin was built without the ublk transport ($("$bin" --version)); nothing was run"; exit 0
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/rados-nbd-vm-ublk.XXXXXX")
objcopy --strip-debug "$bin" "$work/rados-nbd" 2>/dev/null || cp "$bin" "$work/rados-nbd"
mkdir -p "$work/logs"
cp "$here/ublk-tests.sh" "$work/"
cat >"$work/guest.sh.in" <<'G'
cp /mnt/rados-nbd /tmp/rados-nbd && export RADOS_NBD_BIN=/tmp/rados-nbd
bash /mnt/ublk-tests.sh
G
echo "== booting the test VM with the 6.12 kernel (work dir $work)"
set +e
RADOS_NBD_VM_KERNEL=6.12 VM_ROOT_CACHE=loose "$here/vm.sh" "$work/guest.sh.in" "$work" \
  LOGDIR=/mnt/logs >"$work/vm-output.txt" 2>&1
rc=$?
set -e
grep -E '^(PASS|FAIL|==|    |took|[0-9]+ passed, [0-9]+ failed)' "$work/vm-output.txt" | grep -v '^== booting' || true
summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$work/vm-output.txt" | tail -1 || true)
if [ -z "$summary" ]; then
  echo "ublk tests: the VM did not finish (status $rc); full console in $work/vm-output.txt"
  tail -30 "$work/vm-output.txt"
  [ "$rc" -eq 0 ] && rc=99
  exit "$rc"
fi
echo "ublk tests: $summary (console and daemon log in $work)"
[ "$rc" -eq 0 ] && [ -z "${KEEP_WORK:-}" ] && rm -rf "$work"
exit "$rc"
