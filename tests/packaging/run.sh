#!/usr/bin/env bash
# Packaging tests: builds the .deb, checks its contents and control data, runs
# `systemd-analyze verify` on every unit, tests the nbdtab script and the udev helper against a
# fake daemon/sysfs, installs the package on this machine (as root; else checks an extracted
# tree), runs `rados-nbd --version`, renders the man pages, loads the bash completion, and
# purges the package again. Prints PASS/FAIL lines and ends with 'N passed, N failed'.
#
# Uses $RADOS_NBD_BIN (a release binary, as tests/run-all.sh builds it) when set, else builds.
# The kernel-side nbdtab test (real map/unmap) is tests/packaging/vm-nbdtab.sh, run in the VM.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd); export ROOT
cd "$ROOT"
source tests/lib.sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$HOME/.cargo/bin:$PATH

WORK=$ROOT/tests/work/packaging
rm -rf "$WORK"; mkdir -p "$WORK"
skip() { echo "SKIP $*"; }

# --- tools ----------------------------------------------------------------------------------
need=()
for pair in "dpkg-shlibdeps dpkg-dev" "objdump binutils" "man man-db" "groff groff-base" \
            "systemd-analyze systemd" "findmnt util-linux"; do
  command -v "${pair%% *}" >/dev/null 2>&1 || need+=("${pair##* }")
done
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
  echo "packaging: installing from Debian: ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; }
fi

# --- build ------------------------------------------------------------------------------------
build_args=(--out "$WORK/out")
if [ -n "${RADOS_NBD_BIN:-}" ] && [ -x "$RADOS_NBD_BIN" ]; then build_args+=(--binary "$RADOS_NBD_BIN"); fi
if DEB=$(bash packaging/build-deb.sh "${build_args[@]}" 2>"$WORK/build.log" | tail -n1) && [ -f "$DEB" ]; then
  pass "package builds ($(basename "$DEB"))"
else
  fail "package builds" "$(tail -5 "$WORK/build.log")"
  t_summary; exit 1
fi
VERSION=$(cargo pkgid -p rados-nbd | sed -n 's/.*[#@]\([0-9][0-9A-Za-z.+~-]*\)$/\1/p')

# --- contents ----------------------------------------------------------------------------------
dpkg-deb -c "$DEB" | awk '{print $6}' | sed 's|^\./|/|; s|/$||' >"$WORK/contents"
expected=(
  /usr/bin/rados-nbd
  /lib/systemd/system/rados-nbd@.service
  /lib/systemd/system/rados-nbdmap.service
  /lib/systemd/system/rados-nbd-serve@.socket
  /lib/systemd/system/rados-nbd-serve@.service
  /lib/udev/rules.d/60-rados-nbd.rules
  /usr/lib/rados-nbd/rados-nbdmap
  /usr/lib/rados-nbd/rados-nbd-udev
  /usr/libexec/rados-nbd/rados-nbd_quiesce
  /usr/lib/tmpfiles.d/rados-nbd.conf
  /etc/rados-nbd/rados-nbd.conf
  /etc/default/rados-nbd
  /etc/rados-nbd/nbdtab
  /var/lib/rados-nbd
  /usr/share/man/man8/rados-nbd.8.gz
  /usr/share/bash-completion/completions/rados-nbd
  /usr/share/zsh/vendor-completions/_rados-nbd
  /usr/share/fish/vendor_completions.d/rados-nbd.fish
  /usr/share/doc/rados-nbd/copyright
  /usr/share/doc/rados-nbd/changelog.Debian.gz
)
missing=()
for p in "${expected[@]}"; do grep -qxF "$p" "$WORK/contents" || missing+=("$p"); done
if [ ${#missing[@]} -eq 0 ]; then pass "package holds all ${#expected[@]} expected paths"
else fail "package holds all expected paths" "missing: ${missing[*]}"; fi
# One page per subcommand the binary has (generate is hidden and gets none).
dpkg-deb --fsys-tarfile "$DEB" | tar -xO ./usr/bin/rados-nbd >"$WORK/rados-nbd.bin"; chmod +x "$WORK/rados-nbd.bin"
for sub in map unmap list-mapped serve create info ls rm; do
  "$WORK/rados-nbd.bin" "$sub" --help >/dev/null 2>&1 || continue
  check "man page for '$sub'" grep -qxF "/usr/share/man/man8/rados-nbd-$sub.8.gz" "$WORK/contents"
done
check "no man page for the hidden generate command" bash -c "! grep -q 'rados-nbd-generate' '$WORK/contents'"
if dpkg-deb -c "$DEB" | grep -E ' \./usr/bin/rados-nbd$' | grep -q '^-rwxr-xr-x root/root'; then
  pass "binary is root-owned 0755"; else fail "binary is root-owned 0755"; fi

field() { dpkg-deb -f "$DEB" "$1"; }
check "control: Version is the workspace's ($VERSION-1)" test "$(field Version)" = "$VERSION-1"
check "control: Architecture is $(dpkg --print-architecture)" test "$(field Architecture)" = "$(dpkg --print-architecture)"
DEPENDS=$(field Depends)
check "control: Depends on libc6 with a version (from dpkg-shlibdeps)" grep -qE 'libc6 \(>= [0-9.]+\)' <<<"$DEPENDS"
# Not `grep -q`: under pipefail, grep quitting at the first match makes objdump die of SIGPIPE
# on its next write (its output is over 4 KiB), and the pipeline would read as "no match".
if objdump -p "$WORK/rados-nbd.bin" | grep 'NEEDED.*librados\.so' >/dev/null; then
  check "control: links librados -> Depends on librados2" grep -q 'librados2' <<<"$DEPENDS"
else
  check "control: no librados linked -> no librados2 in Depends" bash -c "! grep -q librados2 <<<'$DEPENDS'"
fi
dpkg-deb -e "$DEB" "$WORK/control"
check "conffiles: exactly /etc/default/rados-nbd, nbdtab, rados-nbd.conf" \
  test "$(sort "$WORK/control/conffiles" | tr '\n' ' ')" = "/etc/default/rados-nbd /etc/rados-nbd/nbdtab /etc/rados-nbd/rados-nbd.conf "
check "maintainer scripts parse (sh -n)" bash -c "for s in '$WORK'/control/{postinst,prerm,postrm}; do sh -n \"\$s\" || exit 1; done"
check "md5sums cover every file" bash -c \
  "cd '$WORK' && rm -rf x && mkdir x && dpkg-deb -x '$DEB' x && cd x && md5sum --quiet -c '$WORK/control/md5sums'"

# --- scratch root: scripts against a fake daemon, sysfs and run dir ------------------------------
XROOT=$WORK/root
dpkg-deb -x "$DEB" "$XROOT"
NBDMAP=$XROOT/usr/lib/rados-nbd/rados-nbdmap
UDEVH=$XROOT/usr/lib/rados-nbd/rados-nbd-udev

# The default quiesce hook, against fake lsblk/findmnt/fsfreeze: /dev/nbd9 mounted on
# /mnt/a, its partition nbd9p1 on "/mnt/b c"; fsfreeze logs and fails on $WORK/qfail's path.
QH=$XROOT/usr/libexec/rados-nbd/rados-nbd_quiesce
QF=$WORK/qfake; mkdir -p "$QF"
cat >"$QF/lsblk" <<'EOF'
#!/bin/sh
for a; do d=$a; done
[ "$d" = /dev/nbd9 ] || exit 32
printf '%s\n' /dev/nbd9 /dev/nbd9p1
EOF
cat >"$QF/findmnt" <<'EOF'
#!/bin/sh
case "$2" in /dev/nbd9) echo /mnt/a ;; /dev/nbd9p1) echo "/mnt/b c" ;; esac
EOF
cat >"$QF/fsfreeze" <<EOF
#!/bin/sh
echo "\$1 \$2" >>"$WORK/qlog"
[ "\$2" != "\$(cat "$WORK/qfail" 2>/dev/null)" ]
EOF
chmod +x "$QF"/*
qhook() { : >"$WORK/qlog"; PATH=$QF:$PATH "$QH" "$@" 2>/dev/null; echo "rc=$? $(paste -sd'|' "$WORK/qlog")"; }
check "quiesce hook: freezes the device's and its partitions' mounts" \
  test "$(qhook /dev/nbd9 quiesce)" = "rc=0 -f /mnt/a|-f /mnt/b c"
check "quiesce hook: unquiesce thaws them" test "$(qhook /dev/nbd9 unquiesce)" = "rc=0 -u /mnt/a|-u /mnt/b c"
echo "/mnt/b c" >"$WORK/qfail"
check "quiesce hook: a failed freeze thaws what it froze and fails" \
  test "$(qhook /dev/nbd9 quiesce)" = "rc=1 -f /mnt/a|-f /mnt/b c|-u /mnt/a"
rm -f "$WORK/qfail"
check "quiesce hook: nothing mounted (serve's POOL/IMAGE): nothing to do" test "$(qhook rbd/vm1 quiesce)" = "rc=0 "
check "quiesce hook: a bad command is refused" test "$(qhook /dev/nbd9 freeze)" = "rc=2 "

# udev helper
FS=$WORK/udev; mkdir -p "$FS/sys/block/nbd0" "$FS/sys/block/nbd3" "$FS/sys/block/nbd4" "$FS/sys/block/nbd5" "$FS/run"
mkdir -p "$FS/proc"   # no process entries: "cannot tell", as in another pid namespace
udevh() { RADOS_NBD_SYSFS=$FS/sys RADOS_NBD_PROC=$FS/proc RADOS_NBD_RUN_DIR=$FS/run RADOS_NBD_UDEV_WAIT=2 "$UDEVH" "$@"; }
echo "rados-nbd dir:/var/lib/rados-nbd rbd/vm1" >"$FS/sys/block/nbd0/backend"; echo 123 >"$FS/sys/block/nbd0/pid"
check "udev helper: name from the kernel's backend identifier (as earlier builds wrote it)" \
  test "$(udevh nbd0 | grep NAME=)" = "RADOS_NBD_NAME=rbd/vm1"
echo "rados-nbd:dir:/var/lib/rados-nbd:rbd/vm2" >"$FS/sys/block/nbd0/backend"
check "udev helper: name from the kernel's backend identifier" \
  test "$(udevh nbd0 | grep NAME=)" = "RADOS_NBD_NAME=rbd/vm2"
echo "rados-nbd:ceph:/etc/ceph/x:y.conf:p/a%3Ab%25@s%201" >"$FS/sys/block/nbd0/backend"
check "udev helper: the spec after the last ':', decoded (then made safe)" \
  test "$(udevh nbd0)" = $'RADOS_NBD_POOL=p\nRADOS_NBD_IMAGE=a_b_\nRADOS_NBD_SNAP=s_1\nRADOS_NBD_NAME=p/a_b_@s_1'
: >"$FS/sys/block/nbd3/backend"; echo 9 >"$FS/sys/block/nbd3/pid"
cat >"$FS/run/nbd3.json" <<'EOF'
{
  "pid": 4242,
  "pool": "backup",
  "image": "disk",
  "snap": "nightly",
  "device": "/dev/nbd3",
  "store": "dir:/srv/store",
  "read_only": true,
  "connections": 1,
  "netlink": false,
  "detached": false,
  "backend": null
}
EOF
out=$(udevh nbd3)
check "udev helper: pool/image@snap from the state file (ioctl path)" \
  test "$out" = $'RADOS_NBD_POOL=backup\nRADOS_NBD_IMAGE=disk\nRADOS_NBD_SNAP=nightly\nRADOS_NBD_NAME=backup/disk@nightly'
echo 5 >"$FS/sys/block/nbd4/pid"
( sleep 0.5; printf '{\n  "pid": 1,\n  "pool": "rbd",\n  "image": "late",\n  "snap": null,\n  "device": "/dev/nbd4"\n}\n' >"$FS/run/nbd4.json" ) &
check "udev helper: waits for a state file written after the connect event" \
  test "$(udevh nbd4 | grep NAME=)" = "RADOS_NBD_NAME=rbd/late"
wait
echo "rados-nbd dir:/x ../../etc/pa\$\$s@s" >"$FS/sys/block/nbd5/backend"; echo 5 >"$FS/sys/block/nbd5/pid"
check "udev helper: unsafe characters cannot leave /dev/rados-nbd" \
  test "$(udevh nbd5 | grep NAME=)" = "RADOS_NBD_NAME=_/.._etc_pa__s@s"
mkdir -p "$FS/sys/block/nbd7"
start=$(date +%s)
check "udev helper: silent for an nbd device that is not connected" test -z "$(udevh nbd7)"
check "udev helper: does not wait for a device that is not connected" test $(($(date +%s) - start)) -lt 2
# Connected by another NBD client (the kernel's pid attribute names it): no wait either.
mkdir -p "$FS/sys/block/nbd8" "$FS/proc/777"; echo 777 >"$FS/sys/block/nbd8/pid"
ln -s /usr/sbin/nbd-client "$FS/proc/777/exe"
start=$(date +%s)
check "udev helper: silent and immediate for a device nbd-client connected" test -z "$(udevh nbd8)"
check "udev helper: ...without waiting for a state file" test $(($(date +%s) - start)) -lt 2
mkdir -p "$FS/sys/block/nbd9" "$FS/proc/778"; echo 778 >"$FS/sys/block/nbd9/pid"
ln -s /usr/bin/rados-nbd "$FS/proc/778/exe"
( sleep 0.3; printf '{\n  "pid": 778,\n  "pool": "p",\n  "image": "ours",\n  "snap": null,\n  "device": "/dev/nbd9"\n}\n' >"$FS/run/nbd9.json" ) &
check "udev helper: waits when the kernel names a rados-nbd process" \
  test "$(udevh nbd9 | grep NAME=)" = "RADOS_NBD_NAME=p/ours"
wait
# ublk: no backend identifier, no pid attribute; the state file of a running daemon names it.
# (A /proc with a "1" entry: the helper can tell which daemons run.)
P2=$WORK/udev/proc2; mkdir -p "$P2/1" "$P2/4242" "$FS/sys/block/ublkb2" "$FS/sys/block/ublkb3" "$FS/sys/block/ublkb4"
udevu() { RADOS_NBD_SYSFS=$FS/sys RADOS_NBD_PROC=$P2 RADOS_NBD_RUN_DIR=$FS/run RADOS_NBD_UDEV_WAIT=2 "$UDEVH" "$@"; }
ustate() { printf '{\n  "pid": %s,\n  "pool": "%s",\n  "image": "%s",\n  "snap": %s,\n  "device": "/dev/%s",\n  "transport": "ublk"\n}\n' "$@"; }
ustate 4242 rbd u1 '"s1"' ublkb2 >"$FS/run/ublkb2.json"
check "udev helper: a ublk device named from its daemon's state file" \
  test "$(udevu ublkb2 | grep NAME=)" = "RADOS_NBD_NAME=rbd/u1@s1"
# A file left by a crashed daemon of an earlier ublkb3: not trusted; the new daemon's is.
ustate 999 rbd stale null ublkb3 >"$FS/run/ublkb3.json"
( sleep 0.5; ustate 4242 rbd fresh null ublkb3 >"$FS/run/ublkb3.json.new" && mv "$FS/run/ublkb3.json.new" "$FS/run/ublkb3.json" ) &
check "udev helper: ublk: a dead daemon's state file is not trusted, the new one's is" \
  test "$(udevu ublkb3 | grep NAME=)" = "RADOS_NBD_NAME=rbd/fresh"
wait
ustate 999 rbd stale null ublkb4 >"$FS/run/ublkb4.json"
check "udev helper: ublk: only a dead daemon's state file: no name" test -z "$(udevu ublkb4)"
start=$(date +%s)
check "udev helper: ublk: silent and immediate for a device that is gone" test -z "$(udevu ublkb6)"
check "udev helper: ...without waiting" test $(($(date +%s) - start)) -lt 2

# nbdtab script with a fake rados-nbd that records its arguments
FAKE=$WORK/fake; mkdir -p "$FAKE/run" "$FAKE/sys/block"
cat >"$FAKE/rados-nbd" <<'EOF'
#!/bin/bash
# Fake daemon CLI for the rados-nbdmap tests: map writes a state file like the real one.
echo "$*" >>"$FAKE_DIR/calls"
case $1 in
  map)
    spec=${!#}
    case $spec in *fail*) echo "rados-nbd: image $spec not found in dir:/x" >&2; exit 1 ;; esac
    k=nbd
    [[ " $* " == *" --transport ublk "* ]] && k=ublkb
    n=$(ls "$FAKE_DIR/run" | grep -c "^$k[0-9]*.json$")
    pool=${spec%%/*}; rest=${spec#*/}; image=${rest%%@*}; snap=null
    [[ $rest == *@* ]] && snap="\"${rest#*@}\""
    # An nbd device is connected while its pid attribute exists; a ublk device while it exists.
    mkdir -p "$FAKE_DIR/sys/block/$k$n"; [ $k = nbd ] && echo $$ >"$FAKE_DIR/sys/block/nbd$n/pid"
    printf '{\n  "pid": %s,\n  "pool": "%s",\n  "image": "%s",\n  "snap": %s,\n  "device": "/dev/%s%s"\n}\n' \
      "$FAKE_PID" "$pool" "$image" "$snap" "$k" "$n" >"$FAKE_DIR/run/$k$n.json"
    echo "/dev/$k$n" ;;
  unmap)
    d=${2#/dev/}; rm -f "$FAKE_DIR/run/$d.json" "$FAKE_DIR/sys/block/$d/pid"
    if [[ $d == ublkb* ]]; then rmdir "$FAKE_DIR/sys/block/$d"; fi ;;
esac
EOF
chmod +x "$FAKE/rados-nbd"
cat >"$FAKE/nbdtab" <<'EOF'
# comment line
rbd/failing
rbd/vm1
   vm2     read-only,device=/dev/nbd9,timeout=60   # trailing comment
pool/img@snap   ro=yes,exclusive=no,store=dir:/srv/x,connections=2,reattach-timeout=90
rbd/typo        readonly
rbd/later       noauto
rbd/extra  a=b  c
rbd/u1     transport=ublk,queues=2,queue-depth=64,quiesce,copy-on-read
rbd/badt   transport=iscsi
EOF
nbdmap() {
  FAKE_DIR=$FAKE FAKE_PID=$$ RADOS_NBD_BIN=$FAKE/rados-nbd RADOS_NBD_NBDTAB=$FAKE/nbdtab \
    RADOS_NBD_RUN_DIR=$FAKE/run RADOS_NBD_SYSFS=$FAKE/sys "$NBDMAP" "$@"
}
nbdmap map >"$WORK/nbdmap.out" 2>&1; rc=$?
check "nbdmap map: exit status 1 when some entries failed" test "$rc" = 1
check "nbdmap map: plain entry mapped" grep -qxF "map rbd/vm1" "$FAKE/calls"
check "nbdmap map: default pool rbd, options become flags" \
  grep -qxF "map --read-only --device /dev/nbd9 --timeout 60 rbd/vm2" "$FAKE/calls"
check "nbdmap map: key=yes/no booleans, valued options" \
  grep -qxF "map --read-only --store dir:/srv/x --connections 2 --reattach-timeout 90 pool/img@snap" "$FAKE/calls"
check "nbdmap map: a failing map is logged with the daemon's message" \
  grep -q "rbd/failing: map failed: rados-nbd: image rbd/failing not found" "$WORK/nbdmap.out"
check "nbdmap map: unknown option reported with its line, not mapped" bash -c \
  "grep -q \"nbdtab:6: rbd/typo: unknown option 'readonly'\" '$WORK/nbdmap.out' && ! grep -q typo '$FAKE/calls'"
check "nbdmap map: noauto entry skipped" bash -c "! grep -q later '$FAKE/calls'"
check "nbdmap map: malformed line reported" grep -q "nbdtab:8: expected 'IMAGESPEC \[OPTIONS\]'" "$WORK/nbdmap.out"
check "nbdmap map: transport=ublk and its options become flags; logged with /dev/ublkbN" bash -c \
  "grep -qxF 'map --transport ublk --queues 2 --queue-depth 64 --quiesce --copy-on-read rbd/u1' '$FAKE/calls' &&
   grep -q 'rbd/u1: mapped at /dev/ublkb0' '$WORK/nbdmap.out'"
check "nbdmap map: an unknown transport is reported, not mapped" bash -c \
  "grep -q \"nbdtab:10: rbd/badt: option 'transport=iscsi': transport is nbd or ublk\" '$WORK/nbdmap.out' && ! grep -q badt '$FAKE/calls'"
check "nbdmap map: entries after a failure still mapped (5 attempts, 4 mapped)" \
  test "$(grep -c '^map ' "$FAKE/calls") $(ls "$FAKE/run" | grep -cE '^(nbd|ublkb).*json$')" = "5 4"
check "nbdmap map: failure count reported" grep -q "4 failure(s)" "$WORK/nbdmap.out"
: >"$FAKE/calls"
nbdmap map >/dev/null 2>&1
check "nbdmap map again: already mapped images are not mapped twice" test "$(grep -c '^map ' "$FAKE/calls")" = 1
# An entry removed from nbdtab after boot is still unmapped at shutdown.
sed -i '/^rbd\/vm1$/d' "$FAKE/nbdtab"
: >"$FAKE/calls"
nbdmap unmap >"$WORK/nbdunmap.out" 2>&1; rc=$?
check "nbdmap unmap: exit 0" test "$rc" = 0
check "nbdmap unmap: every mapped image unmapped, last mapped first" \
  test "$(grep '^unmap' "$FAKE/calls" | tr '\n' ' ')" = "unmap /dev/ublkb0 unmap /dev/nbd2 unmap /dev/nbd1 unmap /dev/nbd0 "
check "nbdmap unmap: nothing left mapped" test -z "$(ls "$FAKE/run" | grep -E '^(nbd|ublkb).*json$')"
nbdmap check >"$WORK/nbdcheck.out" 2>&1; rc=$?
check "nbdmap check: prints the map command of each entry" \
  grep -qF "$FAKE/rados-nbd map --read-only --device /dev/nbd9 --timeout 60 rbd/vm2" "$WORK/nbdcheck.out"
check "nbdmap check: fails on the bad lines" test "$rc" = 1
# A Ceph user per entry (id=, keyring=, as in Ceph's rbdmap) and RADOS_NBD_MAP_OPTIONS from
# /etc/default/rados-nbd before each entry's own flags (the CLI lets the later one win).
printf '%s\n' 'rbd/c1  store=ceph:/etc/ceph/c.conf,id=nbd,keyring=/etc/ceph/ceph.client.nbd.keyring' 'rbd/c2' >"$FAKE/nbdtab2"
RADOS_NBD_MAP_OPTIONS="--store ceph:/etc/ceph/ceph.conf --timeout 30" FAKE_DIR=$FAKE FAKE_PID=$$ \
  RADOS_NBD_BIN=$FAKE/rados-nbd RADOS_NBD_NBDTAB=$FAKE/nbdtab2 RADOS_NBD_RUN_DIR=$FAKE/run \
  RADOS_NBD_SYSFS=$FAKE/sys "$NBDMAP" check >"$WORK/nbdcheck2.out" 2>&1; rc=$?
check "nbdmap check: id= and keyring= become --id and --keyring, after RADOS_NBD_MAP_OPTIONS" \
  grep -qxF "$FAKE/rados-nbd map --store ceph:/etc/ceph/ceph.conf --timeout 30 --store ceph:/etc/ceph/c.conf --id nbd --keyring /etc/ceph/ceph.client.nbd.keyring rbd/c1" "$WORK/nbdcheck2.out"
check "nbdmap check: an entry without options gets RADOS_NBD_MAP_OPTIONS alone (exit $rc)" \
  bash -c "grep -qxF '$FAKE/rados-nbd map --store ceph:/etc/ceph/ceph.conf --timeout 30 rbd/c2' '$WORK/nbdcheck2.out' && [ $rc = 0 ]"
: >"$FAKE/calls"
RADOS_NBD_MAP_OPTIONS="--store ceph:/etc/ceph/ceph.conf" FAKE_DIR=$FAKE FAKE_PID=$$ \
  RADOS_NBD_BIN=$FAKE/rados-nbd RADOS_NBD_NBDTAB=$FAKE/nbdtab2 RADOS_NBD_RUN_DIR=$FAKE/run \
  RADOS_NBD_SYSFS=$FAKE/sys "$NBDMAP" map >/dev/null 2>&1
check "nbdmap map: RADOS_NBD_MAP_OPTIONS reaches the map command" \
  grep -qxF "map --store ceph:/etc/ceph/ceph.conf rbd/c2" "$FAKE/calls"

# --- install on this machine ---------------------------------------------------------------------
INSTALLED=0
purge() { [ "$INSTALLED" = 1 ] && dpkg --purge rados-nbd >/dev/null 2>&1; INSTALLED=0; }
trap purge EXIT
if [ "$(id -u)" != 0 ]; then
  skip "install with dpkg: not root; the checks below run on the extracted tree"
  PREFIX=$XROOT
elif dpkg-query -W -f='${Status}' rados-nbd 2>/dev/null | grep -q 'install ok installed'; then
  skip "install with dpkg: a rados-nbd package is already installed here; not touching it"
  PREFIX=$XROOT
else
  if dpkg -i "$DEB" >"$WORK/dpkg-i.log" 2>&1; then
    INSTALLED=1; pass "dpkg -i installs the package"
  else
    fail "dpkg -i installs the package" "$(tail -5 "$WORK/dpkg-i.log")"
  fi
  PREFIX=
fi
if [ "$INSTALLED" = 1 ]; then
  check "dpkg reports it installed" bash -c "dpkg-query -W -f='\${Status}' rados-nbd | grep -q 'install ok installed'"
  check "dpkg --verify finds no changed file" bash -c "[ -z \"\$(dpkg --verify rados-nbd)\" ]"
  check "rados-nbdmap.service enabled by postinst" test -L /etc/systemd/system/multi-user.target.wants/rados-nbdmap.service
fi
version_ok() { local out; out=$("$PREFIX/usr/bin/rados-nbd" --version 2>&1) && [[ $out == *"$VERSION"* ]] || { echo "$out"; return 1; }; }
check "rados-nbd --version prints $VERSION" version_ok

# systemd-analyze verify: on the installed units (ExecStart resolvable, Documentation= man page
# present) or, uninstalled, on copies whose paths point into the extracted tree.
UNITS=(rados-nbd@.service rados-nbdmap.service rados-nbd-serve@.socket rados-nbd-serve@.service)
VDIR=$WORK/verify; mkdir -p "$VDIR"
for u in "${UNITS[@]}"; do
  if [ "$INSTALLED" = 1 ]; then
    upath=/lib/systemd/system/$u; man=yes
  else
    sed "s#/usr/bin/rados-nbd#$XROOT/usr/bin/rados-nbd#g; s#/usr/lib/rados-nbd/#$XROOT/usr/lib/rados-nbd/#g" \
      "$XROOT/lib/systemd/system/$u" >"$VDIR/$u"
    upath=$VDIR/$u; man=no
  fi
  (cd "$VDIR" && systemd-analyze verify --man=$man "$upath") >"$VDIR/$u.log" 2>&1; rc=$?
  # Only our own units' messages count: the host's other units may warn about anything.
  ours=$(grep -E 'rados-nbd' "$VDIR/$u.log" || true)
  if [ "$rc" = 0 ] && [ -z "$ours" ]; then pass "systemd-analyze verify $u"
  else fail "systemd-analyze verify $u" "rc=$rc ${ours:-$(tail -3 "$VDIR/$u.log")}"; fi
done
if [ "$INSTALLED" = 1 ]; then
  # Instances as an admin would start them: the escaped spec.
  inst=$(systemd-escape rbd/vm1)
  check "systemd-escape rbd/vm1 gives rados-nbd@rbd-vm1" test "$inst" = rbd-vm1
  (cd "$VDIR" && systemd-analyze verify "rados-nbd@$inst.service" "rados-nbd-serve@$inst.socket") >"$VDIR/inst.log" 2>&1
  check "systemd-analyze verify instances rados-nbd@$inst / rados-nbd-serve@$inst" \
    bash -c "! grep -q rados-nbd '$VDIR/inst.log'"
fi

# man pages
mandir=$PREFIX/usr/share/man/man8
# A dpkg path-exclude (minimal/container images drop /usr/share/man) must not fail the test.
if [ ! -e "$mandir/rados-nbd.8.gz" ]; then
  skip "installed man pages: excluded by dpkg configuration here; checking the package's copies"
  mandir=$XROOT/usr/share/man/man8
fi
for page in "$mandir"/rados-nbd*.8.gz; do
  name=$(basename "$page" .8.gz)
  check "man page $name renders without groff warnings" bash -c \
    "w=\$(zcat '$page' | groff -man -Tutf8 -ww -z 2>&1); [ -z \"\$w\" ] || { echo \"\$w\"; exit 1; }"
done
if [ "$INSTALLED" = 1 ] && [ "$mandir" = /usr/share/man/man8 ]; then
  check "man rados-nbd shows NAME and SYNOPSIS" bash -c \
    "out=\$(MANPAGER=cat MANWIDTH=80 man 8 rados-nbd 2>&1); grep -q '^NAME' <<<\"\$out\" && grep -q '^SYNOPSIS' <<<\"\$out\""
else
  check "man -l rados-nbd.8.gz shows NAME and SYNOPSIS" bash -c \
    "out=\$(MANPAGER=cat MANWIDTH=80 man -l '$mandir/rados-nbd.8.gz' 2>&1); grep -q '^NAME' <<<\"\$out\" && grep -q '^SYNOPSIS' <<<\"\$out\""
fi

# completions
BASHC=$PREFIX/usr/share/bash-completion/completions/rados-nbd
complete_words() { # complete_words WORD... : what bash would offer for the last word
  local cword=$(($# - 1)) words=("$@")
  bash -c 'source "$1"; shift
    f=$(complete -p rados-nbd | sed "s/.*-F \([^ ]*\).*/\1/")
    COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))
    "$f" rados-nbd "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
    echo "${COMPREPLY[*]}"' _ "$BASHC" "${words[@]}"
}
check "bash completion loads and registers rados-nbd" bash -c "source '$BASHC' && complete -p rados-nbd"
# serve and its --read-only are part of the CLI contract.
check "bash completion offers 'serve' for 'rados-nbd ser'" bash -c "[[ ' $(complete_words rados-nbd ser) ' == *' serve '* ]]"
check "bash completion offers --read-only after 'rados-nbd serve --rea'" \
  bash -c "[[ ' $(complete_words rados-nbd serve --rea) ' == *' --read-only '* ]]"
if command -v zsh >/dev/null 2>&1; then
  check "zsh completion parses" zsh -n "$PREFIX/usr/share/zsh/vendor-completions/_rados-nbd"
else skip "zsh completion: zsh not installed"; fi
if command -v fish >/dev/null 2>&1; then
  check "fish completion parses" fish -n "$PREFIX/usr/share/fish/vendor_completions.d/rados-nbd.fish"
else skip "fish completion: fish not installed"; fi

# The shipped daemon config must be one the daemon accepts (it rejects unknown keys).
RB=$PREFIX/usr/bin/rados-nbd
if "$RB" create --help >/dev/null 2>&1 && "$RB" --store "dir:$WORK/cfgstore" create --size 4M rbd/cfg >/dev/null 2>&1; then
  check "the daemon accepts the shipped /etc/rados-nbd/rados-nbd.conf" \
    env RADOS_NBD_CONFIG="$PREFIX/etc/rados-nbd/rados-nbd.conf" "$RB" --store "dir:$WORK/cfgstore" info rbd/cfg
  printf 'bogus_key = 1\n' >"$WORK/bad.conf"
  check_fails "...and would reject a bad one (the check above reads the file)" \
    env RADOS_NBD_CONFIG="$WORK/bad.conf" "$RB" --store "dir:$WORK/cfgstore" info rbd/cfg
else
  skip "daemon config check: the CLI has no create/info yet"
fi

# Socket activation end to end: systemd-socket-activate plays systemd (LISTEN_FDS=1, fd 3).
if command -v systemd-socket-activate >/dev/null 2>&1 && command -v nbdinfo >/dev/null 2>&1 &&
   "$PREFIX/usr/bin/rados-nbd" create --help >/dev/null 2>&1; then
  STORE=dir:$WORK/store; SOCK=$WORK/serve.sock
  if "$PREFIX/usr/bin/rados-nbd" --store "$STORE" create --size 8M rbd/sa >"$WORK/sa.log" 2>&1; then
    spawn systemd-socket-activate -l "$SOCK" \
      "$PREFIX/usr/bin/rados-nbd" --store "$STORE" serve rbd/sa 2>>"$WORK/sa.log"
    wait_for_socket "$SOCK" 10 2>/dev/null
    size=$(timeout 20 nbdinfo --size "nbd+unix:///?socket=$SOCK" 2>>"$WORK/sa.log")
    if [ "$size" = 8388608 ]; then pass "socket-activated serve answers on the inherited socket (LISTEN_FDS)"
    else fail "socket-activated serve answers on the inherited socket (LISTEN_FDS)" "$(tail -3 "$WORK/sa.log")"; fi
    cleanup_pids
  else
    fail "socket activation: create a test image" "$(tail -3 "$WORK/sa.log")"
  fi
else
  skip "socket activation: needs systemd-socket-activate, nbdinfo and the rados-nbd CLI"
fi

# --- purge --------------------------------------------------------------------------------------
if [ "$INSTALLED" = 1 ]; then
  if dpkg --purge rados-nbd >"$WORK/purge.log" 2>&1; then
    INSTALLED=0; pass "dpkg --purge removes the package"
  else
    fail "dpkg --purge removes the package" "$(tail -3 "$WORK/purge.log")"
  fi
  check "purge leaves no binary, unit, udev rule or conffile" bash -c \
    "! ls /usr/bin/rados-nbd /lib/systemd/system/rados-nbd@.service /lib/udev/rules.d/60-rados-nbd.rules /etc/rados-nbd /etc/default/rados-nbd 2>/dev/null | grep -q ."
  check "purge leaves no enablement symlink" bash -c \
    "! ls /etc/systemd/system/*/rados-nbdmap.service /etc/systemd/system/rados-nbdmap.service 2>/dev/null | grep -q ."
fi

t_summary
