#!/usr/bin/env bash
# Builds the rados-nbd .deb from this workspace with plain dpkg tools (why not cargo-deb or
# debhelper: packaging/README.md). Prints the path of the .deb on its last line.
#
#   packaging/build-deb.sh [--binary PATH] [--ceph | --no-ceph] [--out DIR]
#
# --binary  package this already built release binary instead of running cargo (the test suite
#           passes the one it just built, so nothing is compiled twice)
# --ceph    build with the `ceph` feature (links librados: Depends gains librados2);
#           default: only when librados' C and C++ headers are installed (librados-dev,
#           libradospp-dev), as tests/run-all.sh does
# --out     where the .deb goes (default: target/debian)
#
# Needs: cargo (unless --binary), dpkg-dev (dpkg-shlibdeps, dpkg-architecture), binutils;
# for --ceph also g++, librados-dev and libradospp-dev (daemon/build.rs compiles a C++ shim).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

BIN=
CEPH=auto
OUT=$ROOT/target/debian
while [ $# -gt 0 ]; do
  case $1 in
    --binary) BIN=$(realpath "$2"); shift 2 ;;
    --ceph) CEPH=yes; shift ;;
    --no-ceph) CEPH=no; shift ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "build-deb: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
die() { echo "build-deb: $*" >&2; exit 1; }
for tool in dpkg-deb dpkg-shlibdeps dpkg-architecture objdump strip gzip; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (apt-get install dpkg-dev binutils)"
done

PKG=rados-nbd
# Version from the workspace: `cargo pkgid` prints ...#rados-nbd@0.1.0
VERSION=$(cargo pkgid -p "$PKG" 2>/dev/null | sed -n 's/.*[#@]\([0-9][0-9A-Za-z.+~-]*\)$/\1/p')
[ -n "$VERSION" ] || die "cannot read the version of $PKG from the workspace (cargo pkgid)"
DEB_VERSION=$VERSION-1
ARCH=$(dpkg-architecture -qDEB_HOST_ARCH)
# Reproducible timestamps: the last commit, else now.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH

if [ -z "$BIN" ]; then
  features=()
  if [ "$CEPH" = yes ] || { [ "$CEPH" = auto ] && [ -e /usr/include/rados/librados.h ] &&
    [ -e /usr/include/rados/librados.hpp ]; }; then
    features=(--features ceph)
  fi
  # The ublk transport when libublk's build can run bindgen (libclang-dev).
  if [ -e /usr/lib/llvm-14/lib/libclang.so ] || ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1; then
    features+=(--features ublk)
  fi
  echo "build-deb: cargo build --release -p $PKG ${features[*]}" >&2
  cargo build --release -p "$PKG" "${features[@]}" >&2
  BIN=$ROOT/target/release/rados-nbd
fi
[ -x "$BIN" ] || die "no executable at $BIN"

WORK=$OUT/work
STAGE=$WORK/debian/$PKG        # dpkg-shlibdeps expects the binary under debian/<package>/
rm -rf "$WORK"
mkdir -p "$STAGE/DEBIAN" "$OUT"

inst() { # inst MODE SRC DEST
  install -D -m "$1" "$2" "$STAGE$3"
}

# --- files -------------------------------------------------------------------------------
inst 0755 "$BIN" /usr/bin/rados-nbd
# Like dh_strip: the release profile keeps line tables for backtraces; the package does not.
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$STAGE/usr/bin/rados-nbd"

for u in systemd/*.service systemd/*.socket; do
  inst 0644 "$u" "/lib/systemd/system/$(basename "$u")"
done
inst 0644 packaging/60-rados-nbd.rules /lib/udev/rules.d/60-rados-nbd.rules
inst 0755 packaging/rados-nbdmap /usr/lib/rados-nbd/rados-nbdmap
inst 0755 packaging/rados-nbd-udev /usr/lib/rados-nbd/rados-nbd-udev
# `map --quiesce`'s default hook, where rbd-nbd keeps its own (/usr/libexec/rbd-nbd/).
inst 0755 packaging/rados-nbd_quiesce /usr/libexec/rados-nbd/rados-nbd_quiesce
inst 0644 packaging/tmpfiles.conf /usr/lib/tmpfiles.d/rados-nbd.conf
inst 0644 packaging/rados-nbd.conf /etc/rados-nbd/rados-nbd.conf
inst 0644 packaging/default /etc/default/rados-nbd
inst 0644 packaging/nbdtab /etc/rados-nbd/nbdtab
install -d -m 0750 "$STAGE/var/lib/rados-nbd"

# Manual pages and completions come from the binary's own CLI definition.
GEN=$WORK/generated
"$BIN" generate man "$GEN/man" >/dev/null ||
  die "$BIN cannot generate its manual pages ('rados-nbd generate man DIR')"
[ -s "$GEN/man/rados-nbd.8" ] || die "'rados-nbd generate man' wrote no rados-nbd.8"
for page in "$GEN"/man/*.8; do
  inst 0644 "$page" "/usr/share/man/man8/$(basename "$page")"
  gzip -9n "$STAGE/usr/share/man/man8/$(basename "$page")"
done
for shell in bash zsh fish; do
  "$BIN" generate completions "$shell" "$GEN/completions" >/dev/null ||
    die "$BIN cannot generate $shell completions"
done
inst 0644 "$GEN/completions/rados-nbd.bash" /usr/share/bash-completion/completions/rados-nbd
inst 0644 "$GEN/completions/_rados-nbd" /usr/share/zsh/vendor-completions/_rados-nbd
inst 0644 "$GEN/completions/rados-nbd.fish" /usr/share/fish/vendor_completions.d/rados-nbd.fish

DOC=/usr/share/doc/$PKG
inst 0644 packaging/copyright "$DOC/copyright"
[ -f README.md ] && { inst 0644 README.md "$DOC/README.md"; gzip -9n "$STAGE$DOC/README.md"; }
mkdir -p "$STAGE$DOC"
{
  echo "$PKG ($DEB_VERSION) unstable; urgency=medium"
  echo
  echo "  * Built from the rados-nbd workspace, version $VERSION"
  git -C "$ROOT" log -1 --format='    (commit %h, %cs)' 2>/dev/null || true
  echo
  echo " -- rados-nbd developers <rados-nbd@example.invalid>  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} >"$STAGE$DOC/changelog.Debian"
gzip -9n "$STAGE$DOC/changelog.Debian"

# --- control -----------------------------------------------------------------------------
# Depends from what the binary really links (dpkg-shlibdeps reads its NEEDED entries):
# librados2 appears exactly when the `ceph` feature linked it.
cat >"$WORK/debian/control" <<EOF
Source: $PKG

Package: $PKG
Architecture: any
EOF
SHLIBS=$(cd "$WORK" && dpkg-shlibdeps -O -e "debian/$PKG/usr/bin/rados-nbd" 2>/dev/null |
  sed -n 's/^shlibs:Depends=//p')
[ -n "$SHLIBS" ] || die "dpkg-shlibdeps found no dependencies for the binary"
# Not `grep -q`: under pipefail, grep quitting at the first match makes objdump die of SIGPIPE
# on its next write (its output is over 4 KiB), and the pipeline would read as "no match".
if objdump -p "$STAGE/usr/bin/rados-nbd" | grep 'NEEDED.*librados\.so' >/dev/null; then
  echo "$SHLIBS" | grep -q librados2 || die "binary links librados but Depends lacks librados2: $SHLIBS"
fi

SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat >"$STAGE/DEBIAN/control" <<EOF
Package: $PKG
Version: $DEB_VERSION
Architecture: $ARCH
Maintainer: rados-nbd developers <rados-nbd@example.invalid>
Installed-Size: $SIZE
Depends: $SHLIBS, mount
Recommends: kmod, udev
Suggests: nbd-client, ceph-common
Section: admin
Priority: optional
Homepage: https://example.invalid/rados-nbd
Description: serve Ceph RBD images over NBD with the object map in memory
 rados-nbd serves RBD format-2 images (from a Ceph cluster or an embedded
 directory store) over the Network Block Device protocol: to the Linux kernel
 as /dev/nbdX (map/unmap, like rbd-nbd) and to userspace clients such as qemu
 and libnbd. The image's object map is kept in memory.
 .
 Includes systemd units (rados-nbd@.service per image, rados-nbdmap.service
 for /etc/rados-nbd/nbdtab, socket-activated rados-nbd-serve@.socket) and a
 udev rule for stable /dev/rados-nbd/POOL/IMAGE names.
EOF
printf '%s\n' /etc/default/rados-nbd /etc/rados-nbd/nbdtab /etc/rados-nbd/rados-nbd.conf >"$STAGE/DEBIAN/conffiles"
for s in postinst prerm postrm; do
  install -m 0755 "packaging/maintscripts/$s" "$STAGE/DEBIAN/$s"
done
(cd "$STAGE" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z |
  xargs -0 md5sum >DEBIAN/md5sums)

# Normalise mtimes for a reproducible archive.
find "$STAGE" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
DEB=$OUT/${PKG}_${DEB_VERSION}_$ARCH.deb
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >&2
echo "$DEB"
