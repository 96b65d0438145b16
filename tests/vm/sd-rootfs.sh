# What the systemd VM suites (tests/vm/systemd-run.sh, tests/vm/systemd-ceph-run.sh) lay over
# the guest's root before systemd starts (tests/vm/vm.sh VM_INIT=systemd copies WORKDIR/rootfs/
# over it). Sourced; the caller sets R (WORKDIR/rootfs) and root (the repository).

# sd_inst MODE FILE PATH: FILE installed at PATH in the guest.
sd_inst() { install -D -m "$1" "$2" "$R$3"; }

# sd_package_files BINARY: the package's files where build-deb.sh puts them (usr/lib: the
# guest's /lib is /usr/lib), BINARY as /usr/bin/rados-nbd.
sd_package_files() {
  local u
  sd_inst 0755 "$1" /usr/bin/rados-nbd
  for u in "$root"/systemd/*.service "$root"/systemd/*.socket; do
    sd_inst 0644 "$u" "/usr/lib/systemd/system/$(basename "$u")"
  done
  sd_inst 0644 "$root/packaging/60-rados-nbd.rules" /usr/lib/udev/rules.d/60-rados-nbd.rules
  sd_inst 0755 "$root/packaging/rados-nbdmap" /usr/lib/rados-nbd/rados-nbdmap
  sd_inst 0755 "$root/packaging/rados-nbd-udev" /usr/lib/rados-nbd/rados-nbd-udev
  sd_inst 0755 "$root/packaging/rados-nbd_quiesce" /usr/libexec/rados-nbd/rados-nbd_quiesce
  sd_inst 0644 "$root/packaging/tmpfiles.conf" /usr/lib/tmpfiles.d/rados-nbd.conf
  sd_inst 0644 "$root/packaging/rados-nbd.conf" /etc/rados-nbd/rados-nbd.conf
}

# sd_journal_unit UNIT...: the guest's journal dies with it, so vmtest-journal.service saves
# it to /mnt (the work folder) when it stops, which at shutdown is after UNITs have stopped
# (and so after the unmounts before them); with it the kernel's ring buffer (dmesg) and the
# processes whose mount namespace still has an nbd/ublk mount. Enabled in vmtest.target.
sd_journal_unit() {
  mkdir -p "$R/etc/systemd/system/vmtest.target.wants"
  {
    printf '%s\n' '[Unit]' \
      'Description=save the journal in /mnt at shutdown, once the rados-nbd units have stopped' \
      'RequiresMountsFor=/mnt' 'After=systemd-journald.service' "Before=$*"
    cat <<'UNIT'
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
ExecStop=/bin/sh -c 'journalctl -b -o short-monotonic --no-pager >/mnt/journal.txt; dmesg >/mnt/dmesg.txt; for p in /proc/[0-9]*; do grep -qE " /dev/(nbd|ublkb)[0-9]+ " $$p/mountinfo 2>/dev/null && echo "$${p#/proc/} $$(cat $$p/comm) $$(readlink $$p/ns/mnt)"; done >/mnt/holders.txt'
UNIT
  } >"$R/etc/systemd/system/vmtest-journal.service"
  ln -sfn /etc/systemd/system/vmtest-journal.service "$R/etc/systemd/system/vmtest.target.wants/vmtest-journal.service"
}
