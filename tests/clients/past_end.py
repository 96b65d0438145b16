#!/usr/bin/env python3
"""Errors for requests that reach past the end of the export, through libnbd with its own
range checks off (so the server, not the client library, answers).

The NBD spec's error section: a WRITE or WRITE_ZEROES past the end SHOULD fail with ENOSPC,
a READ or TRIM past the end with EINVAL. run.sh runs this against rados-nbd and, as the
oracle, against nbdkit, which must pass it unchanged.

Usage: past_end.py NBD_URI
"""
import sys

import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
# Off: libnbd would otherwise refuse out-of-range requests itself with its own EINVAL/ERANGE.
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)
size = h.get_size()
assert h.can_trim() and h.can_zero(), "export must advertise TRIM and WRITE_ZEROES"

failures = 0


def expect(name, errno, op):
    global failures
    try:
        op()
        got = "success"
    except nbd.Error as e:
        got = e.errno
    if got == errno:
        print(f"PASS {name}: {errno}")
    else:
        failures += 1
        print(f"FAIL {name}: want {errno}, got {got}")


expect("trim past the end", "EINVAL", lambda: h.trim(1024, size - 512))
expect("trim starting at the end", "EINVAL", lambda: h.trim(512, size))
expect("read past the end", "EINVAL", lambda: h.pread(1024, size - 512))
expect("write past the end", "ENOSPC", lambda: h.pwrite(b"x" * 1024, size - 512))
expect("write zeroes past the end", "ENOSPC", lambda: h.zero(1024, size - 512))
# Still usable, and up to the end is fine.
h.trim(512, size - 512)
h.zero(512, size - 512)
assert h.pread(512, size - 512) == bytearray(512)
h.shutdown()
sys.exit(1 if failures else 0)
