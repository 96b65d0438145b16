#!/bin/bash
# rados-nbd, rbd-nbd and krbd side by side in one guest kernel. Runs INSIDE the test VM
# (bench/kernel.sh boots it beside a throwaway cluster) as root.
# Environment (set by bench/kernel.sh): RADOS_NBD_BIN, CEPH_CONF (the guest's copy of the
# config), CEPH_NBD_ID/CEPH_NBD_KEYRING (the restricted client every peer runs as), PEERS (peer
# names, see map_PEER below), IMG_PEER for each (pool rbd, a fresh 1 TiB image), RUNTIME (s per
# fio job), ROUNDS, JOBS (job names, see job_args), OUT (shared folder for the results), LOGDIR.
#
# Writes $OUT/records.jsonl: one JSON line per measure (kind "job": a fio run of one peer; "map",
# "unmap", "prefill"), and $OUT/fio/*.json (fio's own output). bench/kernel.py reads them.
set -u
B=/tmp/rados-nbd
cp "${RADOS_NBD_BIN:?}" $B || exit 1
: "${CEPH_CONF:?}" "${PEERS:?}" "${RUNTIME:?}" "${ROUNDS:?}" "${JOBS:?}"
export CEPH_CONF
OUT=${OUT:-/mnt/out} LOGDIR=${LOGDIR:-/mnt/logs}
mkdir -p "$OUT/fio" "$LOGDIR"
REC=$OUT/records.jsonl
: >"$REC"
ID=(--id "${CEPH_NBD_ID:-nbd}" --keyring "${CEPH_NBD_KEYRING:?}")
GIB=$((1 << 30))
# Regions of each 1 TiB image: [0, WRITTEN_MIB (256 MiB)) written first (1 MiB writes) for the jobs on written
# data; first writes of round R from (64 + 96 R) GiB on, a 4 MiB stride (one object each, far more
# objects than any peer reaches in a job); reads of never-written areas over [512 GiB, 1 TiB).
WRITTEN=$((${WRITTEN_MIB:-256} << 20))

note() { echo "    $*"; }
die() { echo "FAIL $*"; echo "0 passed, 1 failed"; exit 1; }
now_ns() { date +%s%N; }
# The guest has no udev; the modules come from the unpacked kernel (KMODS). Loaded here,
# rbd-nbd and `rbd map` find them loaded and run no modprobe of their own.
MP=(); [ -n "${KMODS:-}" ] && MP=(-d "$KMODS")
modprobe "${MP[@]}" nbd nbds_max=16 || die "modprobe nbd"
modprobe "${MP[@]}" rbd || die "modprobe rbd"
# The ublk peer needs the 6.12 kernel (bench/kernel.sh boots it when that peer is asked for).
if [[ " $PEERS " == *" rados-nbd-ublk "* ]]; then modprobe "${MP[@]}" ublk_drv || die "modprobe ublk_drv"; fi

# CPU ticks (utime + stime) of a process, from /proc/PID/stat (fields 14 and 15).
proc_ticks() {
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  s=${s##*) }
  set -- $s
  echo $((${12} + ${13}))
}
# The guest's CPU ticks: "user nice system irq softirq busy" from /proc/stat's cpu line.
guest_ticks() {
  local c u n s i io irq sirq st
  read -r c u n s i io irq sirq st _ </proc/stat
  echo "$u $n $s $irq $sirq $((u + n + s + irq + sirq + st))"
}

# Context switches of a process (all its threads) and its thread count; the guest's, from /proc/stat.
proc_csw() {
  [ "$1" != 0 ] || { echo "0 0"; return; }
  cat /proc/"$1"/task/*/status 2>/dev/null |
    awk '/ctxt_switches/ {n += $2} /^Pid:/ {t++} END {print n + 0, t + 0}'
}
guest_csw() { awk '/^ctxt/ {print $2}' /proc/stat; }

declare -A DEV PID
# map_PEER IMAGE: prints the device; sets PID[PEER] (the serving daemon; none for krbd).
map_rados-nbd() {
  $B --store "ceph:$CEPH_CONF" "${ID[@]}" map --pid-file /tmp/rados-nbd.pid \
    --log-file "$LOGDIR/rados-nbd.log" "$1"
}
pid_rados-nbd() { cat /tmp/rados-nbd.pid; }
unmap_rados-nbd() { $B unmap "$1"; }
# Experimental peer: rados-nbd with write merging off (librbd's option, through CEPH_ARGS
# as for any Ceph client: store/ceph/merge.rs).
map_rados-nbd-nomerge() {
  CEPH_ARGS="--rbd_io_scheduler=none" $B --store "ceph:$CEPH_CONF" "${ID[@]}" map \
    --pid-file /tmp/rados-nbd-nomerge.pid --log-file "$LOGDIR/rados-nbd-nomerge.log" "$1"
}
pid_rados-nbd-nomerge() { cat /tmp/rados-nbd-nomerge.pid; }
unmap_rados-nbd-nomerge() { $B unmap "$1"; }
# rados-nbd-ublk: the same daemon on the ublk transport (issue 19; Linux 6.0+).
map_rados-nbd-ublk() {
  $B --store "ceph:$CEPH_CONF" "${ID[@]}" map --transport ublk --pid-file /tmp/rados-nbd-ublk.pid \
    --log-file "$LOGDIR/rados-nbd-ublk.log" "$1"
}
pid_rados-nbd-ublk() { cat /tmp/rados-nbd-ublk.pid; }
unmap_rados-nbd-ublk() { $B unmap "$1"; }
map_rbd-nbd() { rbd-nbd "${ID[@]}" map "rbd/$1" 2>>"$LOGDIR/rbd-nbd.err"; }
# The kernel's pid attribute is the thread that attached the socket: its process is the daemon.
pid_rbd-nbd() { awk '/^Tgid:/ {print $2}' "/proc/$(cat "/sys/block/${1#/dev/}/pid")/status"; }
unmap_rbd-nbd() { rbd-nbd unmap "$1"; }
# Experimental peer: rbd-nbd with librbd's I/O scheduler off (rbd_io_scheduler=none; its
# default, "simple", holds a write back while another to the same object is in flight and
# merges what queued up behind it into one OSD op).
map_rbd-nbd-nosched() { rbd-nbd "${ID[@]}" --rbd-io-scheduler none map "rbd/$1" 2>>"$LOGDIR/rbd-nbd.err"; }
pid_rbd-nbd-nosched() { pid_rbd-nbd "$1"; }
unmap_rbd-nbd-nosched() { rbd-nbd unmap "$1"; }
map_krbd() { rbd "${ID[@]}" map -o noudev "$1"; }
pid_krbd() { echo 0; }
unmap_krbd() { rbd unmap -o noudev "$1"; }
# Experimental peers, not in the default set (bench/kernel.sh --peers): `rados-nbd serve` on a unix socket in the guest,
# attached with nbd-client; rn-serve with serve's defaults, rn-serve-poll0 with --poll-max-us 0
# (`map` has no such option). Beside `rados-nbd map` they show what the daemon's polling costs.
serve_map() { # NAME POLL_US IMAGE
  local s=/tmp/$1.sock d i
  rm -f "$s"
  $B --store "ceph:$CEPH_CONF" "${ID[@]}" serve --socket "$s" --poll-max-us "$2" "$3" \
    >>"$LOGDIR/$1.log" 2>&1 </dev/null &
  echo $! >"/tmp/$1.pid"
  for i in $(seq 600); do [ -S "$s" ] && break; sleep 0.05; done
  for i in $(seq 8 15); do
    d=/dev/nbd$i
    [ "$(cat /sys/block/nbd$i/size)" = 0 ] || continue
    nbd-client -N "$3" -u "$s" "$d" >>"$LOGDIR/$1.log" 2>&1 || return 1
    echo "$d"
    return 0
  done
  return 1
}
serve_unmap() { # NAME DEV
  nbd-client -d "$2" >>"$LOGDIR/$1.log" 2>&1
  kill "$(cat "/tmp/$1.pid")"
}
# rados-nbd-c2: `rados-nbd map --connections 2` (two sockets and kernel queues; Ceph images are
# multi-connection safe).
map_rados-nbd-c2() {
  $B --store "ceph:$CEPH_CONF" "${ID[@]}" map --connections 2 --pid-file /tmp/rados-nbd-c2.pid \
    --log-file "$LOGDIR/rados-nbd-c2.log" "$1"
}
pid_rados-nbd-c2() { cat /tmp/rados-nbd-c2.pid; }
unmap_rados-nbd-c2() { $B unmap "$1"; }
map_rn-serve() { serve_map rn-serve 64 "$1"; }
pid_rn-serve() { cat /tmp/rn-serve.pid; }
unmap_rn-serve() { serve_unmap rn-serve "$1"; }
map_rn-serve-poll0() { serve_map rn-serve-poll0 0 "$1"; }
pid_rn-serve-poll0() { cat /tmp/rn-serve-poll0.pid; }
unmap_rn-serve-poll0() { serve_unmap rn-serve-poll0 "$1"; }

record() { echo "$*" >>"$REC"; }

# do_map PEER ROUND: map IMG_PEER, record the time; sets DEV and PID.
do_map() {
  local p=$1 img t d rss lck
  img=IMG_${p//-/_}
  img=${!img}
  t=$(now_ns)
  d=$("map_$p" "$img") || die "map $p $img: $d"
  t=$((($(now_ns) - t) / 1000))
  [ -b "$d" ] || die "map $p: no block device '$d'"
  DEV[$p]=$d
  PID[$p]=$("pid_$p" "$d")
  note "$p: $img on $d (pid ${PID[$p]}) in $((t / 1000)) ms"
  # The daemon's resident and locked memory just after the map (mlockall shows in VmLck).
  rss=0 lck=0
  if [ "${PID[$p]}" != 0 ]; then
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/${PID[$p]}/status")
    lck=$(awk '/^VmLck:/ {print $2}' "/proc/${PID[$p]}/status")
  fi
  record "{\"kind\":\"map\",\"peer\":\"$p\",\"round\":$2,\"us\":$t,\"rss_kib\":${rss:-0},\"locked_kib\":${lck:-0}}"
}
do_unmap() {
  local p=$1 t pid=${PID[$1]} i
  t=$(now_ns)
  "unmap_$p" "${DEV[$p]}" || die "unmap $p ${DEV[$p]}"
  # The daemon's exit is part of the unmap (rbd-nbd's unmap waits for it too).
  if [ "$pid" != 0 ]; then
    for i in $(seq 600); do
      [ -d "/proc/$pid" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null || break
      sleep 0.05
    done
  fi
  t=$((($(now_ns) - t) / 1000))
  note "$p: unmapped ${DEV[$p]} in $((t / 1000)) ms"
  record "{\"kind\":\"unmap\",\"peer\":\"$p\",\"round\":$2,\"us\":$t}"
}

# job_args JOB ROUND: fio arguments of a job (all: libaio, direct, on the device).
job_args() {
  case $1 in
    first-write-4k-qd32) echo "--rw=write:4092k --bs=4k --iodepth=32 --offset=$(((64 + 96 * $2) * GIB)) --size=$((96 * GIB))" ;;
    read-unwritten-4k-qd32) echo "--rw=randread --bs=4k --iodepth=32 --offset=$((512 * GIB)) --size=$((512 * GIB))" ;;
    randwrite-4k-qd1) echo "--rw=randwrite --bs=4k --iodepth=1 --size=$WRITTEN" ;;
    randwrite-4k-qd32) echo "--rw=randwrite --bs=4k --iodepth=32 --size=$WRITTEN" ;;
    randread-4k-qd1) echo "--rw=randread --bs=4k --iodepth=1 --size=$WRITTEN" ;;
    randread-4k-qd32) echo "--rw=randread --bs=4k --iodepth=32 --size=$WRITTEN" ;;
    seqwrite-1M-qd8) echo "--rw=write --bs=1M --iodepth=8 --size=$WRITTEN" ;;
    seqread-1M-qd8) echo "--rw=read --bs=1M --iodepth=8 --size=$WRITTEN" ;;
    # Side experiments (not in the default set): 1 MiB writes at another depth.
    seqwrite-1M-qd[0-9]*) echo "--rw=write --bs=1M --iodepth=${1#seqwrite-1M-qd} --size=$WRITTEN" ;;
    *) return 1 ;;
  esac
}

# run_fio PEER KIND JOB ROUND FIO-ARGS...: one fio run on PEER's device with the CPU it cost.
run_fio() {
  local p=$1 kind=$2 job=$3 r=$4 f c0 c1 g0 g1 t0 t1 la s0 s1 nthr x0 x1 y0 y1
  shift 4
  f=$OUT/fio/$kind-$job-r$r-$p.json
  # (No process substitution: the guest's /dev has no /dev/fd.)
  x0=$(proc_csw "${PID[$p]}")
  s0=${x0% *} nthr=${x0#* }
  y0=$(guest_csw)
  c0=$(proc_ticks "${PID[$p]}") g0=$(guest_ticks) t0=$(now_ns)
  fio --name="$job" --filename="${DEV[$p]}" --ioengine=libaio --direct=1 --norandommap \
    --randrepeat=0 --output-format=json --output="$f" "$@" >/dev/null 2>"$f.err" ||
    { note "fio $job on $p failed: $(tail -2 "$f.err")"; return 1; }
  c1=$(proc_ticks "${PID[$p]}") g1=$(guest_ticks) t1=$(now_ns)
  x1=$(proc_csw "${PID[$p]}")
  s1=${x1% *}
  y1=$(guest_csw)
  read -r la _ </proc/loadavg
  record "{\"kind\":\"$kind\",\"job\":\"$job\",\"peer\":\"$p\",\"round\":$r,\"fio\":\"${f#"$OUT"/}\",\"wall_us\":$((($t1 - t0) / 1000)),\"daemon_ticks\":$((c1 - c0)),\"guest_ticks0\":\"$g0\",\"guest_ticks1\":\"$g1\",\"guest_load1\":$la,\"daemon_csw\":$((s1 - s0)),\"daemon_threads\":$nthr,\"guest_csw\":$((y1 - y0))}"
}

# shellcheck disable=SC2206
peers=($PEERS) jobs=($JOBS)
np=${#peers[@]}
echo "== map (fresh 1 TiB images)"
for p in "${peers[@]}"; do do_map "$p" 0; done
echo "== prefill: the first $((WRITTEN >> 20)) MiB of each image, 1 MiB writes QD8 (objects never written before)"
for p in "${peers[@]}"; do
  run_fio "$p" prefill seqwrite-fresh-1M-qd8 0 --rw=write --bs=1M --iodepth=8 --size=$WRITTEN ||
    die "prefill $p"
  note "$p: prefilled"
done
for r in $(seq 0 $((ROUNDS - 1))); do
  echo "== round $((r + 1)) of $ROUNDS ($RUNTIME s per job)"
  for j in "${!jobs[@]}"; do
    job=${jobs[$j]}
    read -ra args <<<"$(job_args "$job" "$r")" || die "unknown job $job"
    line=
    # Peers take turns job by job; the first one rotates.
    for k in $(seq 0 $((np - 1))); do
      p=${peers[$(((r + j + k) % np))]}
      run_fio "$p" job "$job" "$r" --time_based --runtime="$RUNTIME" "${args[@]}" || continue
      line+=" $p $(jq -r '.jobs[0] | (.read.iops + .write.iops) | floor' "$OUT/fio/job-$job-r$r-$p.json")"
    done
    note "$job:$line"
  done
done
# PROFILE_JOBS: after the rounds, each of these jobs once more per peer under a system-wide
# flat profile of the guest (perf record -a -e cpu-clock; no call graphs: the daemons have no
# frame pointers), reported per program/library and per symbol into $OUT/profile-JOB-PEER.txt.
for job in ${PROFILE_JOBS:-}; do
  read -ra args <<<"$(job_args "$job" "$ROUNDS")" || die "unknown job $job"
  for p in "${peers[@]}"; do
    echo "== profile: $job on $p"
    f=$OUT/profile-$job-$p
    perf record -a ${PROFILE_GRAPH:+-g} -e cpu-clock -F 499 -o /tmp/perf.data -- \
      fio --name="$job" --filename="${DEV[$p]}" --ioengine=libaio --direct=1 --norandommap \
      --randrepeat=0 --time_based --runtime="$RUNTIME" --output-format=json --output="$f.fio.json" \
      "${args[@]}" >/dev/null 2>"$f.err" || { note "perf/fio failed: $(tail -2 "$f.err")"; continue; }
    {
      echo "# $job on $p: $(jq -r '.jobs[0] | (.read.iops + .write.iops) | floor' "$f.fio.json") IOPS under perf"
      echo "## by program and library (% of all guest samples, idle included)"
      perf report -i /tmp/perf.data --stdio --sort comm,dso --percent-limit 0.5 2>/dev/null | grep -v '^$'
      echo "## by symbol (top)"
      perf report -i /tmp/perf.data --stdio --sort comm,dso,sym --percent-limit 0.4 2>/dev/null | grep -v '^$' | head -80
      if [ -n "${PROFILE_GRAPH:-}" ]; then
        echo "## kernel call graphs of the busiest threads"
        perf report -i /tmp/perf.data --stdio --no-children --sort comm,sym -g caller,0.5,callee,function,percent --percent-limit 0.3 2>/dev/null | grep -v '^$' | head -900
      fi
    } >"$f.txt"
    rm -f /tmp/perf.data
  done
done
echo "== unmap, then map/unmap twice more"
for p in "${peers[@]}"; do do_unmap "$p" 0; done
for r in 1 2; do
  for p in "${peers[@]}"; do do_map "$p" "$r"; done
  for p in "${peers[@]}"; do do_unmap "$p" "$r"; done
done
echo "1 passed, 0 failed"
