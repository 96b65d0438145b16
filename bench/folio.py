#!/usr/bin/env python3
"""Why the directory store cuts writes into 128 KiB pieces (daemon/src/store/dir/object.rs,
WRITE_PIECE): the page cache sizes a new folio by the write that creates it, and on ext4
(buffer heads; large folios since Linux 6.16) a later 4 KiB write into a folio walks the
buffer heads of the whole folio.

For each piece size this fills a 1 GiB file with 1 MiB of data at a time, cut into
pieces of that size, then times 50k random 4 KiB rewrites after fsync (the bench's
"seqwrite, then randwrite" order). Run it on the filesystem the store lives on:

    python3 bench/folio.py [DIR]        # DIR defaults to /var/tmp

Prints microseconds per operation; nothing is asserted (the machine is shared and noisy;
compare the rows of one run).
"""
import os
import random
import sys
import tempfile
import time

SIZE = 1 << 30
MIB = 1 << 20


def fill(fd, data, piece):
    view = memoryview(data)
    t = time.perf_counter()
    for off in range(0, SIZE, MIB):
        for c in range(0, MIB, piece):
            os.pwrite(fd, view[c:c + piece], off + c)
    return (time.perf_counter() - t) / (SIZE // MIB) * 1e6


def main():
    where = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp"
    data = os.urandom(MIB)
    small = os.urandom(4096)
    print(f"{'piece':>9} {'1 MiB first write':>18} {'1 MiB overwrite':>16} {'4 KiB rewrite':>14}")
    for piece in (MIB, 256 << 10, 128 << 10, 64 << 10, 16 << 10):
        fd, path = tempfile.mkstemp(dir=where, prefix="folio.")
        try:
            first = fill(fd, data, piece)
            os.fsync(fd)
            over = fill(fd, data, piece)
            os.fsync(fd)
            offs = [random.randrange(SIZE // 4096) * 4096 for _ in range(50000)]
            t = time.perf_counter()
            for o in offs:
                os.pwrite(fd, small, o)
            rewrite = (time.perf_counter() - t) / len(offs) * 1e6
        finally:
            os.close(fd)
            os.unlink(path)
        print(f"{piece >> 10:>6} KiB {first:>15.1f} us {over:>13.1f} us {rewrite:>11.1f} us")


if __name__ == "__main__":
    main()
