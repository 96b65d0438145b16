#!/usr/bin/env bash
# Kernel-attach tests in a real Linux kernel: builds rados-nbd (release), boots Debian's stock
# kernel under qemu-system-x86_64 (software emulation, no network) and runs kernel-tests.sh in
# it against the fresh binary.
#
#   tests/vm/run.sh [BINARY]        (or RADOS_NBD_BIN=BINARY tests/vm/run.sh)
#
# Skips (exit 0, says so) when qemu-system-x86_64 is not installed. Exit status: that of the
# guest tests (non-zero on any failure, 99 when the VM never reported).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  echo "SKIP kernel tests: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86); nothing was run"
  exit 0
fi

bin=${1:-${RADOS_NBD_BIN:-}}
if [ -z "$bin" ]; then
  echo "== building rados-nbd (release)"
  (cd "$root" && cargo build --release -p rados-nbd)
  bin=$root/target/release/rados-nbd
fi
[ -x "$bin" ] || { echo "run.sh: $bin is not an executable" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/rados-nbd-vm.XXXXXX")
# The guest sees the host root read-only but hides /tmp, /run, /var/tmp and /var/lib behind
# its own tmpfs, so the binary is copied into the shared work folder (/mnt in the guest),
# without its debug info (90 MB -> 17 MB), and from there into the guest's tmpfs: run from
# the 9p share, every page it maps is one round trip under emulation.
objcopy --strip-debug "$bin" "$work/rados-nbd" 2>/dev/null || cp "$bin" "$work/rados-nbd"
mkdir -p "$work/logs"
# One boot runs our suite, then the packaging guest snippets (nbdtab script, udev helper,
# systemd notify) when the tree has them; the last line sums them all.
suites=(kernel-tests.sh)
cp "$here/kernel-tests.sh" "$work/"
for f in "$root"/tests/packaging/vm-*.sh; do
  [ -f "$f" ] && cp "$f" "$work/" && suites+=("$(basename "$f")")
done
for f in rados-nbdmap rados-nbd-udev rados-nbd_quiesce; do
  [ -f "$root/packaging/$f" ] && cp "$root/packaging/$f" "$work/"
done
cat >"$work/all-suites.sh" <<SUITES
cp /mnt/rados-nbd /tmp/rados-nbd && export RADOS_NBD_BIN=/tmp/rados-nbd
tp=0; tf=0
for t in ${suites[*]}; do
  echo "== guest suite \$t"
  NBDMAP=/mnt/rados-nbdmap UDEVH=/mnt/rados-nbd-udev bash /mnt/\$t >/tmp/suite.out 2>&1
  r=\$?
  cat /tmp/suite.out
  p=\$(grep -c '^PASS' /tmp/suite.out); f=\$(grep -c '^FAIL' /tmp/suite.out)
  if [ \$r -ne 0 ] && [ \$f -eq 0 ]; then echo "FAIL \$t exited \$r"; f=1; fi
  tp=\$((tp + p)); tf=\$((tf + f))
done
echo "\$tp passed, \$tf failed"
[ \$tf -eq 0 ]
SUITES
echo "== booting the test VM (work dir $work; suites: ${suites[*]})"
set +e
# The host root does not change while the VM runs: cached in the guest (vm.sh VM_ROOT_CACHE).
VM_ROOT_CACHE=loose "$here/vm.sh" "$work/all-suites.sh" "$work" RADOS_NBD_BIN=/mnt/rados-nbd LOGDIR=/mnt/logs >"$work/vm-output.txt" 2>&1
rc=$?
set -e
# The console interleaves the kernel's boot noise; show the test lines.
grep -E '^(PASS|FAIL|==|    |---|[0-9]+ passed, [0-9]+ failed|GUEST-EXIT)' "$work/vm-output.txt" | grep -v '^== booting' || true
summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$work/vm-output.txt" | tail -1 || true)
if [ -z "$summary" ]; then
  echo "kernel tests: the VM did not finish (status $rc); full console in $work/vm-output.txt"
  tail -30 "$work/vm-output.txt"
  [ "$rc" -eq 0 ] && rc=99
  exit "$rc"
fi
echo "kernel tests: $summary (console and daemon log in $work)"
exit "$rc"
