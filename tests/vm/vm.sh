#!/usr/bin/env bash
# Boot Debian's stock kernel under qemu-system-x86_64 (software emulation, no network) with this
# machine's root file system shared read-only, and run one guest script in it as root.
#
#   vm.sh GUEST_SCRIPT WORKDIR [NAME=VALUE ...]
#
# WORKDIR is shared read-write and appears at /mnt in the guest; GUEST_SCRIPT is copied there.
# NAME=VALUE pairs are exported to the guest script, plus KMODS (the unpacked kernel's root, for
# `modprobe -d`). Prints the guest console; exits with the guest script's status (99 when the
# guest never reported one: crash, hang, timeout).
#
# Why this shape: the host kernel has no nbd driver and a KVM guest hangs on this machine kind,
# so the tests need a kernel we do not install; TCG boots Debian's kernel in ~2 s. The kernel
# and a tiny busybox initramfs are built once and cached outside /tmp, /run, /var/tmp and
# /var/lib, which the guest hides behind its own tmpfs.
set -euo pipefail
script=$(realpath "${1:?usage: vm.sh GUEST_SCRIPT WORKDIR [NAME=VALUE ...]}")
work=$(realpath -m "${2:?usage: vm.sh GUEST_SCRIPT WORKDIR [NAME=VALUE ...]}")
shift 2
cache=${RADOS_NBD_VM_CACHE:-/var/cache/rados-nbd-test-vm}

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

build_cache() {
  local tmp pkg kver m f
  tmp=$(mktemp -d "$cache.build.XXXXXX")
  chmod 755 "$tmp"  # apt-get download runs as _apt and must be able to write here
  pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$pkg" ] || { echo "vm.sh: cannot find the kernel package linux-image-amd64 depends on" >&2; exit 98; }
  echo "vm.sh: fetching $pkg into $cache (once)" >&2
  (cd "$tmp" && apt-get download -qq "$pkg" && dpkg-deb -x "$pkg"_*.deb kroot && rm -f "$pkg"_*.deb)
  kver=$(ls "$tmp/kroot/lib/modules")
  depmod -b "$tmp/kroot" "$kver"
  cp "$tmp/kroot/boot/vmlinuz-$kver" "$tmp/vmlinuz"
  mkdir -p "$tmp/initrd/bin" "$tmp/initrd/mod" "$tmp/initrd/proc" "$tmp/initrd/sys" "$tmp/initrd/dev" "$tmp/initrd/host"
  cp "$(command -v busybox)" "$tmp/initrd/bin/busybox"
  for m in $initrd_mods; do
    f=$(find "$tmp/kroot/lib/modules" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -1)
    [ -n "$f" ] || { echo "vm.sh: module $m not in $pkg" >&2; exit 98; }
    cp "$f" "$tmp/initrd/mod/$m.ko"
  done
  cat >"$tmp/initrd/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $initrd_mods; do insmod /mod/\$m.ko || echo "init: insmod \$m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 hostroot /host
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
  chmod +x "$tmp/initrd/init"
  (cd "$tmp/initrd" && find . | cpio -o -H newc 2>/dev/null | gzip -1) >"$tmp/initrd.gz"
  rm -rf "$tmp/initrd"
  echo "$kver" >"$tmp/kver"
  rm -rf "$cache"
  mv "$tmp" "$cache"
}

mkdir -p "$(dirname "$cache")"
[ -f "$cache/kver" ] || build_cache

mkdir -p "$work"
rm -f "$work/guest-rc"
{
  echo "export KMODS=$cache/kroot"
  echo "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  for kv in "$@"; do printf 'export %q\n' "$kv"; done
  cat "$script"
} >"$work/guest.sh"

log=$work/console.log
timeout "${VM_TIMEOUT:-1800}" qemu-system-x86_64 -accel tcg,thread=multi -cpu max \
  -m "${VM_MEM:-2048}" -smp "${VM_CPUS:-2}" -nographic -no-reboot -nic none \
  -kernel "$cache/vmlinuz" -initrd "$cache/initrd.gz" \
  -append "console=ttyS0 panic=-1 loglevel=${VM_LOGLEVEL:-3}" \
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
  -virtfs local,path="$work",mount_tag=work,security_model=none >"$log" 2>&1 || true
cat "$log"
if [ -f "$work/guest-rc" ]; then exit "$(cat "$work/guest-rc")"; fi
exit 99
