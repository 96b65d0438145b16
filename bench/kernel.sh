#!/usr/bin/env bash
# rados-nbd's kernel device beside Ceph's own rbd-nbd and the kernel's RBD client (krbd, `rbd
# map`), in ONE guest kernel against one throwaway cluster (issue 18; see bench/README.md):
#
#   bench/kernel.sh [--rounds N] [--runtime S] [--quick (1 round of 4 s, 64 MiB written)] [--peers "P ..."]
#                   [--jobs "J ..."] [--written MIB] [--profile "J ..."] [--out DIR]
#   bench/kernel.sh --peers "rados-nbd rados-nbd-ublk krbd" --out bench/kernel-ublk   (issue 19)
#   bench/kernel.sh --report bench/kernel-results.json   (only rewrite the .md and the chart)
#
# The test VM (tests/vm/vm.sh: Debian's 6.1 kernel under TCG, the host root shared read-only;
# 6.12 when the peers include rados-nbd-ublk, the ublk transport)
# gets a NIC on a tap inside a network namespace made here, beside a one-node cluster bound to
# that namespace's address (tests/vm/ceph-ns.sh, as tests/vm/ceph-run.sh); nothing leaves it.
# Each peer maps its own fresh 1 TiB image (same features); bench/kernel-guest.sh runs the fio
# jobs in the guest, peers taking turns job by job (the first one rotating), ROUNDS times;
# bench/kernel.py writes kernel-results.json, kernel-results.md and kernel-ratios.png (medians).
# Binary: RADOS_NBD_BIN (built with feature ceph), else a release build here.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
rounds=3 runtime=12 out=$here written=256 profile=
peers="rados-nbd rbd-nbd krbd"
jobs="first-write-4k-qd32 read-unwritten-4k-qd32 randwrite-4k-qd32 randwrite-4k-qd1 randread-4k-qd32 randread-4k-qd1 seqwrite-1M-qd8 seqread-1M-qd8"
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=$2; shift ;;
    --runtime) runtime=$2; shift ;;
    --quick) rounds=1 runtime=4 written=64 ;;
    --peers) peers=$2; shift ;;
    --jobs) jobs=$2; shift ;;
    --out) out=$2; shift ;;
    --written) written=$2; shift ;;
    --profile) profile=$2; shift ;;
    --report) exec /usr/bin/python3 "$here/kernel.py" --report "$2" --out "$out" ;;
    *) echo "usage: see the head of $0" >&2; exit 2 ;;
  esac
  shift
done

# What only this benchmark needs, from Debian: Ceph's rbd-nbd and matplotlib for the chart.
bash "$root/tests/deps.sh" || exit 1
pkgs=()
command -v rbd-nbd >/dev/null 2>&1 || pkgs+=(rbd-nbd)
/usr/bin/python3 -c 'import matplotlib' 2>/dev/null || pkgs+=(python3-matplotlib)
if [ ${#pkgs[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null || exit 1
fi

source "$root/tests/lib.sh"
source "$root/tests/vm/ceph-ns.sh"
if b=$(cephns_missing fio rbd-nbd); then echo "kernel.sh: $b is not installed" >&2; exit 1; fi
bin=$(cephns_binary)
rc=$?
case $rc in
  0) ;;
  3) echo "kernel.sh: ${RADOS_NBD_BIN:-rados-nbd} was built without feature ceph" >&2; exit 2 ;;
  *) exit "$rc" ;;
esac
# Peer rados-nbd-ublk (rados-nbd's ublk transport, issue 19): the guest boots Debian's 6.12
# kernel (6.1 has no ublk) for every peer, and the binary needs feature ublk.
guest_kernel=6.1
if [[ " $peers " == *" rados-nbd-ublk "* ]]; then
  "$bin" --version 2>/dev/null | grep -q 'transports: nbd, ublk' ||
    { echo "kernel.sh: $bin was built without feature ublk (peer rados-nbd-ublk)" >&2; exit 2; }
  export RADOS_NBD_VM_KERNEL=6.12
  guest_kernel=6.12
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/rados-nbd-kbench.XXXXXX")
cleanup() {
  trap '' INT TERM
  [ -n "${load_pid:-}" ] && kill "$load_pid" 2>/dev/null
  cephns_teardown
  if [ -n "${KEEP_WORK:-}" ] || [ "${ok:-0}" != 1 ]; then
    rm -rf "$work/ceph/osd0" "$work/ceph/mon" "$work/rados-nbd"
    echo "work folder kept: $work"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cephns_prepare || exit 1
why=$(cephns_make) || { echo "kernel.sh: $why" >&2; exit 1; }
# krbd speaks msgr1 only: the mon gets a v1 address too.
CEPH_MON_V1=1 cephns_cluster >"$work/cluster.out" 2>&1 || { tail -5 "$work/cluster.out"; exit 1; }
listens_only_on_addr || { echo "kernel.sh: the cluster listens outside $addr" >&2; exit 1; }
features=layering,exclusive-lock,object-map,fast-diff,deep-flatten
envs=()
for p in $peers; do
  img=kbench-$p
  rbd create --size 1T --image-feature "$features" "$img" || exit 1
  envs+=("IMG_${p//-/_}=$img")
done
objcopy --strip-debug "$bin" "$work/rados-nbd" 2>/dev/null || cp "$bin" "$work/rados-nbd"
mkdir -p "$work/out" "$work/logs"
{
  echo "{\"date\": \"$(date -u '+%Y-%m-%d %H:%M:%S UTC')\", \"cpu\": \"$(lscpu | sed -n 's/^Model name: *//p' | head -1)\","
  echo " \"ncpu\": $(nproc), \"mem_gib\": $(awk '/MemTotal/ {printf "%.1f", $2 / 1048576}' /proc/meminfo),"
  echo " \"host_kernel\": \"$(uname -r)\", \"fio\": \"$(fio --version)\","
  echo " \"rbd_nbd\": \"$(rbd-nbd --version 2>/dev/null | awk '{print $3}')\","
  echo " \"rados_nbd\": \"$("$bin" --version 2>/dev/null | head -1)\", \"rados_nbd_sha256\": \"$(sha256sum "$bin" | cut -c1-16)\","
  echo " \"runtime_s\": $runtime, \"rounds\": $rounds, \"written_mib\": $written, \"image_features\": \"$features\","
  echo " \"peers\": \"$peers\", \"guest_kernel\": \"$guest_kernel\", \"vm_cpus\": ${VM_CPUS:-2}, \"vm_mem_mib\": ${VM_MEM:-2048}}"
} >"$work/out/machine.json"
# The host's load average while the guest runs (the machine is shared): one line per 10 s.
(while :; do echo "$(date +%s) $(cat /proc/loadavg)"; sleep 10; done) >"$work/out/load.txt" &
load_pid=$!
echo "== booting the test VM in $ns (work dir $work): peers $peers, $rounds rounds of $runtime s jobs"
VM_TIMEOUT=${VM_TIMEOUT:-7200} cephns_boot "$here/kernel-guest.sh" \
  RADOS_NBD_BIN=/mnt/rados-nbd CEPH_CONF=/mnt/ceph/guest.conf CEPH_NBD_ID=nbd \
  CEPH_NBD_KEYRING=/mnt/ceph/client.nbd.keyring PEERS="$peers" JOBS="$jobs" \
  RUNTIME="$runtime" ROUNDS="$rounds" WRITTEN_MIB="$written" PROFILE_JOBS="$profile" PROFILE_GRAPH="${PROFILE_GRAPH:-}" OUT=/mnt/out LOGDIR=/mnt/logs "${envs[@]}" \
  >"$work/vm-output.txt" 2>&1 &
wait $!
rc=$?
kill "$load_pid" 2>/dev/null
load_pid=
grep -E '^(PASS|FAIL|==|    |vm.sh:|GUEST-EXIT)' "$work/vm-output.txt"
if [ "$rc" != 0 ]; then
  echo "kernel.sh: the guest failed (status $rc); console in $work/vm-output.txt"
  tail -20 "$work/vm-output.txt"
  exit 1
fi
for p in $peers; do
  rbd info "kbench-$p" --format json | jq -c '{name, flags}'
done
if [ -n "$profile" ]; then
  mkdir -p "$out/kernel-profile"
  cp "$work"/out/profile-*.txt "$out/kernel-profile/" 2>/dev/null
fi
/usr/bin/python3 "$here/kernel.py" --raw "$work/out" --out "$out" && ok=1
