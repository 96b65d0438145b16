#!/usr/bin/env bash
# ublk vs NBD transport of rados-nbd, side by side in one guest kernel (issue 19's bench):
# boots the 6.12 test VM (tests/vm/vm.sh, RADOS_NBD_VM_KERNEL=6.12), maps one directory-store
# image through each transport in turn and runs the same fio jobs on the device; the
# transports take turns job by job, the first one rotating each round. Writes
# bench/ublk-results.md (medians and ratios). Only ratios mean anything: the guest is emulated.
#
#   bench/ublk.sh [--rounds N] [--runtime SEC]      (RADOS_NBD_BIN=... to skip the build)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
rounds=2 runtime=8
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    *) echo "usage: bench/ublk.sh [--rounds N] [--runtime SEC]" >&2; exit 2 ;;
  esac
done
bin=${RADOS_NBD_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release -p rados-nbd --features ublk
  bin=$root/target/release/rados-nbd
fi
work=$(mktemp -d /tmp/rados-nbd-bench-ublk.XXXXXX)
objcopy --strip-debug "$bin" "$work/rados-nbd" 2>/dev/null || cp "$bin" "$work/rados-nbd"
cat >"$work/bench-guest.sh" <<G
set -u
cp /mnt/rados-nbd /tmp/rados-nbd; B=/tmp/rados-nbd
export RADOS_NBD_MODULES_ROOT=\$KMODS RADOS_NBD_STORE=/var/lib/bench
mkdir -p \$RADOS_NBD_STORE
echo "load at start: \$(cat /proc/loadavg)"
jobs="randwrite-new:randwrite:4k:32 randread-new:randread:4k:32 randwrite:randwrite:4k:32 randread:randread:4k:32 randread-qd1:randread:4k:1 write-1m:write:1M:8 read-1m:read:1M:8"
for r in \$(seq $rounds); do
  for t in nbd ublk; do \$B create --size 64G "b-\$t-\$r" >/dev/null; done
  for j in \$jobs; do
    name=\${j%%:*}; rest=\${j#*:}; rw=\${rest%%:*}; rest=\${rest#*:}; bs=\${rest%%:*}; qd=\${rest#*:}
    order="nbd ublk"; [ \$(((r + \${#name}) % 2)) -eq 0 ] && order="ublk nbd"
    for t in \$order; do
      dev=\$(\$B map --transport \$t "b-\$t-\$r")
      # "-new" jobs run on never-written areas of the image (8 GiB in, away from the filled part).
      off=0; case \$name in *-new) off=8G ;; *) off=0 ;; esac
      case \$name in randwrite|randread|randread-qd1) fio --name=fill --filename=\$dev --direct=1 --ioengine=libaio --rw=write --bs=1M --iodepth=8 --size=256M --offset=0 >/dev/null 2>&1 ;; esac
      pid=\$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' /run/rados-nbd/\${dev#/dev/}.json)
      c0=\$(awk '{print \$14 + \$15}' /proc/\$pid/stat)
      out=\$(fio --name=\$name --filename=\$dev --direct=1 --ioengine=libaio --rw=\$rw --bs=\$bs --iodepth=\$qd \
        --offset=\$off --size=256M --time_based --runtime=$runtime --ramp_time=1 --output-format=terse --terse-version=3 2>/dev/null)
      c1=\$(awk '{print \$14 + \$15}' /proc/\$pid/stat)
      [ -n "\$out" ] || { echo "FIO-FAILED \$r \$name \$t"; out="0;0;0;0;0;0;0;0"; }
      # terse v3: field 6 read KiB, 8 read IOPS, 47 write KiB, 49 write IOPS
      echo "RESULT \$r \$name \$t \$(echo "\$out" | awk -F';' '{print \$8 + \$49, \$7 + \$48}') \$((c1 - c0))"
      \$B unmap "\$dev" >/dev/null
    done
  done
  # The store is the guest's tmpfs (RAM): free it for the next round.
  for t in nbd ublk; do \$B rm "b-\$t-\$r" >/dev/null; done
done
G
echo "== booting the 6.12 VM ($rounds rounds, ${runtime} s jobs; work dir $work)"
RADOS_NBD_VM_KERNEL=6.12 VM_ROOT_CACHE=loose VM_MEM=${VM_MEM:-4096} tests/vm/vm.sh "$work/bench-guest.sh" "$work" >"$work/out.txt" 2>&1 || true
grep -E '^(RESULT|load|FIO-FAILED)' "$work/out.txt" | tee "$work/results.txt"
if grep -q FIO-FAILED "$work/results.txt"; then echo "a fio job failed; see $work/out.txt" >&2; exit 1; fi
/usr/bin/python3 - "$work/results.txt" "$rounds" "$runtime" >bench/ublk-results.md <<'PY'
import sys, statistics, collections, datetime, os
res = collections.defaultdict(list); cpu = collections.defaultdict(list); load = ""
for line in open(sys.argv[1]):
    f = line.split()
    if f[0] == "load":
        load = " ".join(f[3:]); continue
    _, r, name, t, iops, bw, ticks = f
    res[(name, t)].append(float(iops)); cpu[(name, t)].append(int(ticks) / 100 / max(float(bw) / 1048576 * int(sys.argv[3]), 1e-9))
names = []
for (n, _t) in res:
    if n not in names: names.append(n)
print(f"# ublk vs NBD transport of rados-nbd ({datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)\n")
print(f"One guest (Debian 6.12 kernel under TCG emulation, 2 vCPU), directory store on the guest's tmpfs, "
      f"fio libaio direct over 256 MiB, {sys.argv[3]} s jobs, {sys.argv[2]} rounds, medians; transports take turns job by job. "
      f"Shared, noisy host (load at start: {load}); compare ratios only. `bench/ublk.sh` writes this file.\n")
print("| job | NBD IOPS | ublk IOPS | ublk / NBD | NBD daemon CPU s/GiB | ublk daemon CPU s/GiB |")
print("|---|---|---|---|---|---|")
for n in names:
    a = statistics.median(res[(n, "nbd")]); b = statistics.median(res[(n, "ublk")])
    ca = statistics.median(cpu[(n, "nbd")]); cb = statistics.median(cpu[(n, "ublk")])
    print(f"| {n} | {a:.0f} | {b:.0f} | {b / a:.2f} | {ca:.2f} | {cb:.2f} |")
PY
cat bench/ublk-results.md
