#!/usr/bin/env bash
# Install, from Debian, what the test suite needs and is missing. Idempotent and quiet.
# What each package is for is listed in README.md ("Dependencies").
set -euo pipefail
# command-or-file -> Debian package
need=(
  "nbdinfo libnbd-bin"            # nbdinfo, nbdcopy, nbdsh: libnbd's real NBD clients
  "/usr/lib/python3/dist-packages/nbd.py python3-libnbd"  # nbdsh / python `import nbd`
  # librbd and librados for Debian's python: the twin image of tests/ceph/differential.py
  "/usr/lib/python3/dist-packages/rbd-2.0.0.egg-info python3-rbd"
  "/usr/lib/python3/dist-packages/rados-2.0.0.egg-info python3-rados"
  "nbdkit nbdkit"                 # peer server (benchmarks, protocol ceiling)
  "fio fio"                       # fio --ioengine=nbd, verify workloads
  "qemu-img qemu-utils"           # qemu-img convert/compare/info through NBD; qemu-nbd peer
  "/usr/include/rados/librados.h librados-dev"  # link librados (feature ceph)
  "/usr/include/rados/librados.hpp libradospp-dev"  # librados' C++ API: the list_snaps shim (feature ceph)
  "/usr/lib/llvm-14/lib/libclang.so libclang-dev"  # bindgen in libublk's build (feature ublk)
  "ceph-mon ceph-mon"             # throwaway one-node cluster for the Ceph tests
  "ceph-osd ceph-osd"
  "rbd ceph-common"               # rbd / rados / ceph: the oracle tools
  "rbd-nbd rbd-nbd"               # Ceph's own NBD client: the oracle of map/attach/list-mapped
  "qemu-system-x86_64 qemu-system-x86"  # real kernel with an NBD driver for kernel-attach tests
  "busybox busybox-static"        # the test VM's initramfs
  "cpio cpio"
  "depmod kmod"
  "mkfs.xfs xfsprogs"             # filesystems on /dev/nbdX in the VM
  "mkfs.ext4 e2fsprogs"
  "nbd-client nbd-client"         # kernel-side disconnect (nbd-client -d) in the VM
  "jq jq"                         # JSON checks in shell tests
  "sha256sum coreutils"
  "systemd-analyze systemd"       # systemd-analyze verify for the units
  "fakeroot fakeroot"
  "openssl openssl"               # throwaway CA and certificates for the TLS tests
  "ss iproute2"                   # ss -ltn: what the daemon listens on
)
missing=()
for pair in "${need[@]}"; do
  what=${pair%% *}; pkg=${pair##* }
  if [[ $what == /* ]]; then [ -e "$what" ] && continue; else command -v "$what" >/dev/null 2>&1 && continue; fi
  missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing from Debian: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# qemu-system-x86 from bookworm may replace a newer preinstalled qemu-utils and leave no qemu-img.
command -v qemu-img >/dev/null 2>&1 || { apt-get install -y -qq qemu-utils >/dev/null; }
echo "deps: all present"
