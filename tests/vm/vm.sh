#!/usr/bin/env bash
# Boot Debian's stock kernel under qemu-system-x86_64 (software emulation, no network unless
# VM_TAP) with this machine's root file system shared read-only, and run one guest script in it
# as root.
#
#   vm.sh GUEST_SCRIPT WORKDIR [NAME=VALUE ...]
#   vm.sh --prepare       fetch the kernel and build the initramfs (once), boot nothing
#
# WORKDIR is shared read-write and appears at /mnt in the guest; GUEST_SCRIPT is copied there.
# NAME=VALUE pairs are exported to the guest script, plus KMODS (the unpacked kernel's root, for
# `modprobe -d`). Prints the guest console; exits with the guest script's status (99 when the
# guest never reported one: crash, hang, timeout).
#
# VM_TAP=TAP gives the guest a virtio-net NIC on the existing tap device TAP (made by the caller,
# normally inside a network namespace of its own, tests/vm/ceph-run.sh): the guest loads
# virtio_net and takes VM_GUEST_ADDR (default 10.77.0.2/24) on eth0 before the script runs.
# With VM_INIT=systemd the guest's own systemd brings the NIC up instead, from what the caller
# put in WORKDIR/rootfs/ (a systemd-networkd .network file, networkd and its wait-online
# enabled: tests/vm/systemd-ceph-run.sh), so that network-online.target means what it means
# on a host. Without VM_TAP the guest has no network at all (`-nic none`). The kernel must be
# in the cache before qemu runs somewhere without a route to Debian's mirror: `vm.sh
# --prepare` first.
#
# VM_ROOT_CACHE=loose mounts the host root with 9p's page cache: without it every page a program
# maps from the host is one 9p round trip per fault, which costs ~30 s of emulated kernel time
# to start a program linking Ceph's libraries (`rbd --version`: 29 s, with it 1-4 s). Only for
# a host root that does not change while the VM runs; the work folder is never cached.
#
# VM_INIT=systemd boots systemd as PID 1 instead of running the script from the initramfs: the
# host root (read-only 9p) is the lower layer of an overlay with a tmpfs upper layer; before
# systemd starts, WORKDIR/rootfs/ (when the caller made one) is copied over that root (units,
# /etc files, binaries), and the kernel's modules are linked at /usr/lib/modules/KVER so plain
# `modprobe` and udev find them. The script runs as vmtest.service (After=basic.target
# remote-fs.target, output on the console and in the journal) in vmtest.target, which pulls in
# basic.target and remote-fs.target and whatever rootfs/ links into vmtest.target.wants/ (the
# test's stand-in for multi-user.target); the guest powers off when the script ends, through a
# normal systemd shutdown. When this machine has systemd but not udev, Debian's systemd and
# udev packages are unpacked (not installed) into the cache and laid under the overlay as a
# second lower layer, so the guest runs a matching systemd + systemd-udevd pair. VM_APPEND adds
# to the kernel command line (e.g. systemd.journald.forward_to_console=1).
#
# Why this shape: the host kernel has no nbd driver and a KVM guest hangs on this machine kind,
# so the tests need a kernel we do not install; TCG boots Debian's kernel in ~2 s. The kernel
# and a tiny busybox initramfs are built once and cached outside /tmp, /run, /var/tmp and
# /var/lib, which the guest hides behind its own tmpfs.
set -euo pipefail
prepare=
if [ "${1:-}" = --prepare ]; then
  prepare=1
else
  script=$(realpath "${1:?usage: vm.sh GUEST_SCRIPT WORKDIR [NAME=VALUE ...]}")
  work=$(realpath -m "${2:?usage: vm.sh GUEST_SCRIPT WORKDIR [NAME=VALUE ...]}")
  shift 2
fi
# RADOS_NBD_VM_KERNEL=6.12 boots bookworm-security's 6.12 kernel instead of the stock 6.1 one:
# it has ublk (CONFIG_BLK_DEV_UBLK=m; 6.1 has it unset), for the ublk suites. Its own cache.
case ${RADOS_NBD_VM_KERNEL:-} in
  '') kmeta=linux-image-amd64 cache_default=/var/cache/rados-nbd-test-vm ;;
  6.12) kmeta=linux-image-6.12-amd64 cache_default=/var/cache/rados-nbd-test-vm-6.12 ;;
  *) echo "vm.sh: RADOS_NBD_VM_KERNEL must be empty or 6.12, not '$RADOS_NBD_VM_KERNEL'" >&2; exit 2 ;;
esac
cache=${RADOS_NBD_VM_CACHE:-$cache_default}

need() { # command package
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "vm.sh: installing $2 (for $1)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}
need qemu-system-x86_64 qemu-system-x86
need busybox busybox-static
need cpio cpio
need depmod kmod

# The modules the initramfs needs to reach the 9p shares, in load order.
initrd_mods="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci netfs fscache 9pnet 9pnet_virtio 9p"

# Bumped whenever the init below changes: a cache built by an older vm.sh gets a new initramfs
# (the kernel is kept).
initrd_version=2

build_cache() {
  local tmp pkg kver
  tmp=$(mktemp -d "$cache.build.XXXXXX")
  chmod 755 "$tmp"  # apt-get download runs as _apt and must be able to write here
  pkg=$(apt-cache depends "$kmeta" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$pkg" ] || { echo "vm.sh: cannot find the kernel package $kmeta depends on" >&2; exit 98; }
  echo "vm.sh: fetching $pkg into $cache (once)" >&2
  (cd "$tmp" && apt-get download -qq "$pkg" && dpkg-deb -x "$pkg"_*.deb kroot && rm -f "$pkg"_*.deb)
  kver=$(ls "$tmp/kroot/lib/modules")
  depmod -b "$tmp/kroot" "$kver"
  cp "$tmp/kroot/boot/vmlinuz-$kver" "$tmp/vmlinuz"
  build_initrd "$tmp"
  echo "$kver" >"$tmp/kver"
  rm -rf "$cache"
  mv "$tmp" "$cache"
}

# build_initrd DIR: DIR/initrd.gz from DIR/kroot's modules, replaced atomically (another
# vm.sh may be booting from it).
build_initrd() {
  local dir=$1 tmp m f
  tmp=$(mktemp -d "$dir/initrd.build.XXXXXX")
  mkdir -p "$tmp/bin" "$tmp/mod" "$tmp/proc" "$tmp/sys" "$tmp/dev" "$tmp/host"
  cp "$(command -v busybox)" "$tmp/bin/busybox"
  mods=
  for m in $initrd_mods; do
    f=$(find "$dir/kroot/lib/modules" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -1)
    if [ -z "$f" ]; then
      # 6.12 merged fscache into netfs; a module that is built in is not needed either.
      grep -q "/$m.ko" "$dir/kroot/lib/modules"/*/modules.builtin 2>/dev/null || [ "$m" = fscache ] ||
        { echo "vm.sh: module $m not in the kernel package" >&2; exit 98; }
      continue
    fi
    # busybox insmod takes plain .ko only (6.12's modules are xz-compressed).
    case $f in
      *.xz) xz -dc "$f" >"$tmp/mod/$m.ko" ;;
      *.zst) zstd -qdc "$f" >"$tmp/mod/$m.ko" ;;
      *) cp "$f" "$tmp/mod/$m.ko" ;;
    esac
    mods="$mods $m"
  done
  # vm_rootcache (from the kernel command line, which passes unknown NAME=VALUE to init's
  # environment): the 9p cache mode of the host root, VM_ROOT_CACHE below.
  cat >"$tmp/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $mods; do insmod /mod/\$m.ko || echo "init: insmod \$m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000\${vm_rootcache:+,cache=\$vm_rootcache} hostroot /host
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 work /host/mnt
mount --bind /dev /host/dev
mount -t devpts devpts /host/dev/pts 2>/dev/null
mount --bind /proc /host/proc
mount --bind /sys /host/sys
mount -t debugfs debugfs /host/sys/kernel/debug 2>/dev/null
for d in tmp run var/tmp var/lib; do mount -t tmpfs tmpfs /host/\$d; done
chroot /host /bin/bash -c 'cd /mnt && exec /bin/bash /mnt/guest.sh'
rc=\$?
echo "\$rc" >/host/mnt/guest-rc
echo "GUEST-EXIT=\$rc"
sync
poweroff -f
INIT
  chmod +x "$tmp/init"
  (cd "$tmp" && find . | cpio -o -H newc 2>/dev/null | gzip -1) >"$tmp.gz"
  rm -rf "$tmp"
  mv "$tmp.gz" "$dir/initrd.gz"
  echo "$initrd_version" >"$dir/initrd.version"
}

# The systemd flavour of the initramfs: the same modules plus overlay, and an init that
# switch_roots into systemd (VM_INIT=systemd above). Bumped like initrd_version.
initrd_systemd_version=3

build_initrd_systemd() {
  local dir=$1 tmp f kver
  kver=$(cat "$dir/kver")
  tmp=$(mktemp -d "$dir/initrd.build.XXXXXX")
  (cd "$tmp" && gzip -dc "$dir/initrd.gz" | cpio -id --quiet)
  f=$(find "$dir/kroot/lib/modules" -name overlay.ko -o -name overlay.ko.xz -o -name overlay.ko.zst | head -1)
  [ -n "$f" ] || { echo "vm.sh: module overlay not in the kernel package" >&2; exit 98; }
  case $f in *.xz) xz -dc "$f" >"$tmp/mod/overlay.ko" ;; *.zst) zstd -qdc "$f" >"$tmp/mod/overlay.ko" ;; *) cp "$f" "$tmp/mod/overlay.ko" ;; esac
  mkdir -p "$tmp/lower" "$tmp/sdroot" "$tmp/upper" "$tmp/newroot"
  # vm_sdroot=1 (kernel command line): the 9p share "sdroot" (the unpacked systemd + udev
  # packages) is laid between the overlay's tmpfs and the host root. Its own share, not a path
  # of the host root's: overlayfs refuses lower layers inside one another.
  cat >"$tmp/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $initrd_mods overlay; do insmod /mod/\$m.ko || echo "init: insmod \$m failed"; done
die() { echo "init: \$*"; echo "GUEST-EXIT=98"; poweroff -f; }
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000\${vm_rootcache:+,cache=\$vm_rootcache} hostroot /lower || die "cannot mount the host root"
mount -t tmpfs -o mode=0755 upper /upper && mkdir -p /upper/u /upper/w
lower=/lower
if [ -n "\${vm_sdroot:-}" ]; then
  mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000\${vm_rootcache:+,cache=\$vm_rootcache} sdroot /sdroot || die "cannot mount sdroot"
  lower=/sdroot:/lower
fi
mount -t overlay overlay -o lowerdir=\$lower,upperdir=/upper/u,workdir=/upper/w /newroot || die "cannot mount the overlay"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 work /newroot/mnt || die "cannot mount the work folder"
# The host's /tmp (gigabytes of build trees) is not the guest's: systemd-tmpfiles' boot-time
# clean of it took minutes over 9p.
for d in tmp var/tmp; do mount -t tmpfs -o mode=1777 tmpfs /newroot/\$d; done
mkdir -p /newroot/usr/lib/modules
ln -sfn $dir/kroot/lib/modules/$kver /newroot/usr/lib/modules/$kver
[ -d /newroot/mnt/rootfs ] && { cp -a /newroot/mnt/rootfs/. /newroot/ || die "cannot copy rootfs/"; }
mkdir -p /newroot/etc/systemd/system
cat >/newroot/etc/systemd/system/vmtest.service <<'U'
[Unit]
Description=the test script (tests/vm/vm.sh VM_INIT=systemd)
After=basic.target remote-fs.target
[Service]
Type=oneshot
WorkingDirectory=/mnt
StandardOutput=journal+console
StandardError=journal+console
ExecStart=/bin/sh -c '/bin/bash /mnt/guest.sh; rc=\$\$?; echo \$\$rc >/mnt/guest-rc; echo GUEST-EXIT=\$\$rc'
ExecStartPost=/bin/systemctl poweroff --no-block
U
cat >/newroot/etc/systemd/system/vmtest.target <<'U'
[Unit]
Description=the test (stands in for multi-user.target)
Requires=basic.target vmtest.service
Wants=remote-fs.target
After=basic.target
AllowIsolate=yes
U
exec switch_root /newroot /lib/systemd/systemd systemd.unit=vmtest.target
INIT
  chmod +x "$tmp/init"
  (cd "$tmp" && find . | cpio -o -H newc 2>/dev/null | gzip -1) >"$tmp.gz"
  rm -rf "$tmp"
  mv "$tmp.gz" "$dir/initrd-systemd.gz"
  echo "$initrd_systemd_version" >"$dir/initrd-systemd.version"
}

# build_sdroot DIR: Debian's systemd and udev, unpacked into DIR/sdroot with /lib, /bin and
# /sbin folded into /usr (the host root's merged /usr: a real /lib in an upper layer would hide
# the host's /lib symlink).
sd_pkgs="systemd libsystemd-shared libsystemd0 libudev1 udev"
build_sdroot() {
  local dir=$1 tmp p d
  tmp=$(mktemp -d "$dir/sdroot.build.XXXXXX")
  chmod 755 "$tmp"
  echo "vm.sh: fetching $sd_pkgs for the systemd guest (once)" >&2
  (cd "$tmp" && apt-get download -qq $sd_pkgs) || { echo "vm.sh: cannot download $sd_pkgs" >&2; exit 98; }
  mkdir -p "$tmp/root/usr"
  for p in "$tmp"/*.deb; do dpkg-deb -x "$p" "$tmp/root"; done
  for d in lib lib64 bin sbin; do
    [ -d "$tmp/root/$d" ] && [ ! -L "$tmp/root/$d" ] || continue
    mkdir -p "$tmp/root/usr/$d"
    cp -a "$tmp/root/$d/." "$tmp/root/usr/$d/"
    rm -rf "${tmp:?}/root/$d"
  done
  # Units the host root has enabled are not ours to start; nothing here is enabled either.
  touch "$tmp/root/.complete"
  rm -rf "$dir/sdroot"
  mv "$tmp/root" "$dir/sdroot"
  rm -rf "$tmp"
}

mkdir -p "$(dirname "$cache")"
[ -f "$cache/kver" ] || build_cache
[ "$(cat "$cache/initrd.version" 2>/dev/null)" = "$initrd_version" ] || build_initrd "$cache"
if [ "${VM_INIT:-}" = systemd ]; then
  [ -x /lib/systemd/systemd ] || { echo "vm.sh: VM_INIT=systemd needs systemd on this machine (apt-get install systemd)" >&2; exit 98; }
  [ "$(cat "$cache/initrd-systemd.version" 2>/dev/null)" = "$initrd_systemd_version" ] &&
    [ "$cache/initrd-systemd.gz" -nt "$cache/initrd.gz" ] || build_initrd_systemd "$cache"
  if [ ! -x /lib/systemd/systemd-udevd ] && [ ! -f "$cache/sdroot/.complete" ]; then
    build_sdroot "$cache"
  fi
fi
[ -z "$prepare" ] || exit 0

mkdir -p "$work"
rm -f "$work/guest-rc"
{
  echo "export KMODS=$cache/kroot"
  echo "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  for kv in "$@"; do printf 'export %q\n' "$kv"; done
  if [ -n "${VM_TAP:-}" ] && [ "${VM_INIT:-}" != systemd ]; then
    # No udev in the guest: the only NIC is eth0. Fail loudly rather than run the script
    # without the network it was promised.
    cat <<NET
modprobe -d "\$KMODS" virtio_net || { echo "vm.sh: cannot load virtio_net"; exit 97; }
ip link set lo up && ip link set eth0 up && ip addr add ${VM_GUEST_ADDR:-10.77.0.2/24} dev eth0 \\
  || { echo "vm.sh: cannot configure eth0"; exit 97; }
NET
  fi
  # Marks that the guest got as far as this script (see the boot retry below).
  echo ': >/mnt/guest-started'
  cat "$script"
} >"$work/guest.sh"

log=$work/console.log
initrd=$cache/initrd.gz
shares=()
append="console=ttyS0 panic=-1 loglevel=${VM_LOGLEVEL:-3}${VM_ROOT_CACHE:+ vm_rootcache=$VM_ROOT_CACHE}"
if [ "${VM_INIT:-}" = systemd ]; then
  initrd=$cache/initrd-systemd.gz
  append+=" systemd.unit=vmtest.target"
  if [ ! -x /lib/systemd/systemd-udevd ]; then
    append+=" vm_sdroot=1"
    shares+=(-virtfs "local,path=$cache/sdroot,mount_tag=sdroot,security_model=none,readonly=on,multidevs=remap")
  fi
fi
append+="${VM_APPEND:+ $VM_APPEND}"
nic=(-nic none)
if [ -n "${VM_TAP:-}" ]; then
  nic=(-netdev "tap,id=n0,ifname=$VM_TAP,script=no,downscript=no" -device virtio-net-pci,netdev=n0)
fi
boot() {
  rm -f "$work/guest-started" "$work/guest-rc"
  timeout "${VM_TIMEOUT:-1800}" qemu-system-x86_64 -accel tcg,thread=multi -cpu max \
    -m "${VM_MEM:-2048}" -smp "${VM_CPUS:-2}" -nographic -no-reboot "${nic[@]}" \
    -kernel "$cache/vmlinuz" -initrd "$initrd" -append "$append" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs local,path="$work",mount_tag=work,security_model=none "${shares[@]}" >"$log" 2>&1 || true
}
boot
# The guest kernel itself may die while it boots, before any of the test runs: seen once
# with the 6.12 kernel, "Oops: int3" in sched_clock_cpu during an initcall (code patched
# under multi-threaded TCG). That is the emulator's, not the test's: boot once more, saying
# so. A panic after the test script started is never retried.
if [ ! -f "$work/guest-started" ] && [ ! -f "$work/guest-rc" ] && grep -q 'Kernel panic' "$log"; then
  cat "$log"
  echo "vm.sh: the guest kernel panicked while booting, before the test script started (console above); booting again"
  boot
fi
cat "$log"
if [ -f "$work/guest-rc" ]; then exit "$(cat "$work/guest-rc")"; fi
exit 99
