#!/usr/bin/env bash
# A throwaway one-node Ceph cluster for tests, on 127.0.0.1 only (or CEPH_ADDR, below):
# one mon, one BlueStore OSD on a sparse file, pool "rbd" with size 1.
#
#   tests/ceph/cluster.sh start DIR   -> prints CEPH_CONF=DIR/ceph.conf
#   tests/ceph/cluster.sh stop DIR    -> stops the daemons by pid and waits for them
#
# Nothing is listened on outside loopback: every address in the config is 127.0.0.1 and
# ipv6 binding is off. CEPH_ADDR=A.B.C.D binds that one address instead: an address of a
# network namespace the caller made and runs this inside (tests/vm/ceph-run.sh: the test VM's
# tap), never a host interface. CEPH_MON_V1=1 gives the mon a msgr1 address too (port + 1),
# which the kernel's rbd client (krbd) needs.
#
# Auth is cephx, as on every real cluster (CEPH_AUTH=none turns it off). Keys are made with
# ceph-authtool before the mon's mkfs, which imports them all, so no `ceph auth` round trip
# is needed (cephx costs well under a second of the start):
#   DIR/keyring.mon            mon. (and a copy of every key below, for the mon's mkfs)
#   DIR/client.admin.keyring   client.admin, all caps; the [client] keyring of ceph.conf, so
#                              `rbd`/`rados`/`ceph -c DIR/ceph.conf` just work
#   DIR/client.nbd.keyring     client.nbd, restricted like a real rbd client:
#                              mon 'profile rbd', osd 'profile rbd pool=rbd'
#   DIR/osd0/keyring           osd.0
# With CEPH_AUTH=cephx (the default) start also prints CEPH_NBD_ID=nbd and
# CEPH_NBD_KEYRING=DIR/client.nbd.keyring.
# CEPH_EXTRA_CONF: more lines for the [global] section (settings that must hold before the
# first PG peers, e.g. tests/reliability/ceph-faults.sh's longer read lease).
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
dir=$(realpath -m "$2")
conf=$dir/ceph.conf

need() {
  for b in "$@"; do
    command -v "$b" >/dev/null 2>&1 || { echo "cluster.sh: $b not found (install ceph-mon ceph-osd ceph-common)" >&2; exit 3; }
  done
}

# Stop one daemon by the pid in its pid file: TERM, wait up to 10 s, then KILL and wait.
stop_pidfile() {
  local f=$1 pid i
  [ -f "$f" ] || return 0
  pid=$(cat "$f" 2>/dev/null || true)
  case $pid in ''|*[!0-9]*) rm -f "$f"; return 0 ;; esac
  # Only signal it if it is really a ceph daemon of this cluster (pid files can be stale).
  if ! grep -qs -- "$conf" "/proc/$pid/cmdline"; then rm -f "$f"; return 0; fi
  kill "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    kill -9 "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$f"
}

case $cmd in
start)
  need ceph-mon ceph-osd ceph monmaptool rbd
  if [ -e "$conf" ]; then echo "cluster.sh: $conf exists; stop and remove $dir first" >&2; exit 1; fi
  addr=${CEPH_ADDR:-127.0.0.1}
  case $addr in *[!0-9.]*|'') echo "cluster.sh: CEPH_ADDR must be an IPv4 address, not '$addr'" >&2; exit 2 ;; esac
  mkdir -p "$dir"/{mon,osd0,run,log}
  auth=${CEPH_AUTH:-cephx}
  case $auth in cephx|none) ;; *) echo "cluster.sh: CEPH_AUTH must be cephx or none, not $auth" >&2; exit 2 ;; esac
  fsid=$(cat /proc/sys/kernel/random/uuid)
  # A random free port so parallel test runs do not collide, below the kernel's ephemeral
  # range (an outgoing connection of another test cannot hold it); port+1 for v1 too.
  port=${CEPH_MON_PORT:-}
  if [ -z "$port" ]; then
    lo=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
    [ "$lo" -gt 12000 ] || lo=32768
    for _ in $(seq 1 100); do
      port=$((10000 + RANDOM % (lo - 10001)))
      ss -Htan "( sport = :$port or sport = :$((port + 1)) )" 2>/dev/null | grep -q . || break
    done
  fi
  monvec="v2:$addr:$port" monhost="v2:$addr:$port"
  if [ "${CEPH_MON_V1:-0}" = 1 ]; then
    monvec="v2:$addr:$port,v1:$addr:$((port + 1))" monhost="[$monvec]"
  fi
  cat >"$conf" <<CONF
[global]
fsid = $fsid
mon host = $monhost
mon initial members = a
public addr = $addr
cluster addr = $addr
ms bind ipv6 = false
auth cluster required = $auth
auth service required = $auth
auth client required = $auth
run dir = $dir/run
log file = $dir/log/\$name.log
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
# A dead client's watch (and so its stale lock) goes after 15 s instead of 30.
osd client watch timeout = 15
# A throwaway cluster on a shared disk: the monitor's default refusal to run below 5% free
# (it exits with ENOSPC) would stop the tests on a nearly full machine, not protect data.
mon data avail crit = 0
mon data avail warn = 0
${CEPH_EXTRA_CONF:-}
[client]
admin socket =
log file = $dir/log/client.log
keyring = $dir/client.admin.keyring
[mon]
mon data = $dir/mon
keyring = $dir/mon/keyring
mon cluster log file = $dir/log/cluster.log
[osd]
osd data = $dir/osd\$id
keyring = $dir/osd\$id/keyring
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 68719476736
bluestore fsck on mkfs = false
bluestore cache autotune = false
bluestore cache size = 268435456
osd memory target = 1073741824
osd max object name len = 256
osd max object namespace len = 64
CONF
  monmaptool --create --clobber --fsid "$fsid" --addv a "[$monvec]" "$dir/monmap" >/dev/null
  mkfs_keyring=()
  if [ "$auth" = cephx ]; then
    need ceph-authtool
    (
      umask 077
      kr() { ceph-authtool "$@" >/dev/null; }
      kr --create-keyring "$dir/keyring.mon" --gen-key -n mon. --cap mon 'allow *'
      kr --create-keyring "$dir/client.admin.keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *'
      kr --create-keyring "$dir/client.nbd.keyring" --gen-key -n client.nbd \
        --cap mon 'profile rbd' --cap osd 'profile rbd pool=rbd'
      kr --create-keyring "$dir/osd0/keyring" --gen-key -n osd.0 \
        --cap mon 'allow profile osd' --cap osd 'allow *' --cap mgr 'allow profile osd'
      for k in client.admin.keyring client.nbd.keyring osd0/keyring; do
        kr "$dir/keyring.mon" --import-keyring "$dir/$k"
      done
    ) || { echo "cluster.sh: ceph-authtool failed" >&2; exit 1; }
    mkfs_keyring=(--keyring "$dir/keyring.mon")
  fi
  ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" "${mkfs_keyring[@]}" >"$dir/log/mkfs-mon.out" 2>&1
  ceph-mon -c "$conf" -i a 2>>"$dir/log/stderr.log"
  ceph -c "$conf" osd create >/dev/null
  ceph-osd -c "$conf" -i 0 --mkfs >"$dir/log/mkfs-osd.out" 2>&1
  # No `osd crush add`: the OSD places itself in the CRUSH map when it starts.
  ceph-osd -c "$conf" -i 0 2>>"$dir/log/stderr.log"
  up=0
  for _ in $(seq 1 120); do
    if ceph -c "$conf" osd stat 2>/dev/null | grep -q "1 up"; then up=1; break; fi
    sleep 0.25
  done
  if [ $up != 1 ]; then echo "cluster.sh: osd.0 did not come up; see $dir/log" >&2; exit 1; fi
  # Size 1 comes from "osd pool default size"; pool init waits until the PGs are active.
  ceph -c "$conf" osd pool create rbd 8 >/dev/null 2>&1
  rbd -c "$conf" pool init rbd
  echo "CEPH_CONF=$conf"
  if [ "$auth" = cephx ]; then
    echo "CEPH_NBD_ID=nbd"
    echo "CEPH_NBD_KEYRING=$dir/client.nbd.keyring"
  fi
  ;;
stop)
  # OSD first so it does not wait on a mon that is already gone.
  stop_pidfile "$dir/run/osd.0.pid"
  stop_pidfile "$dir/run/mon.a.pid"
  ;;
*) usage ;;
esac
