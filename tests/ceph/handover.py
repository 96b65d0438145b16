#!/usr/bin/python3
"""librbd beside a rados-nbd server of the same image: the lock handed back and forth.

  alternate URI CONF POOL IMAGE ROUNDS SEED OUT
      One librbd handle (python3-rbd) and one NBD connection to the server take turns:
      each round librbd writes a random extent, then the NBD client writes one and reads
      back an extent librbd wrote (the server must have reloaded the map librbd left, or
      it would read zeros), and librbd reads one the NBD client wrote. Every turn moves
      the exclusive lock (RequestLock, release, acquire). At the end the whole image is
      read through both and compared with what was written, which is saved to OUT.
  librbd-journal CONF POOL IMAGE SECONDS SEED FIRST BLOCKS JOURNAL
      librbd writes random 4 KiB blocks of [FIRST, FIRST+BLOCKS) with several writes in
      flight, journaled like nbdtool.py's journal-write (P before sending, A once acked),
      so nbdtool.py journal-verify can check them through the server afterwards.
"""
import os
import random
import sys
import threading
import time

import nbd
import rados
import rbd

# The journal's format and hash are nbdtool.py's, which verifies it; so is the command
# dispatch.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reliability"))
from nbdtool import BS, dispatch, sha  # noqa: E402


def read_all(h, size):
    out = bytearray()
    while len(out) < size:
        out += h.pread(min(1 << 20, size - len(out)), len(out))
    return out


def open_image(conf, pool, image):
    c = rados.Rados(conffile=conf)
    c.connect()
    io = c.open_ioctx(pool)
    return c, io, rbd.Image(io, image)


def alternate(uri, conf, pool, image, rounds, seed, out):
    rng = random.Random(int(seed))
    c, io, img = open_image(conf, pool, image)
    size = img.size()
    h = nbd.NBD()
    h.connect_uri(uri)
    assert size <= (256 << 20), "image too large for this test"
    want = read_all(h, size)
    bad = 0

    def extent():
        n = rng.choice([BS, 4 * BS, 16 * BS, 300 * BS])
        off = rng.randrange(0, (size - n) // BS) * BS
        return off, n

    last_nbd = None
    t0 = time.monotonic()
    for r in range(int(rounds)):
        off, n = extent()
        data = rng.randbytes(n)
        img.write(data, off)
        want[off:off + n] = data
        # Read through the server what librbd just wrote: only right if it reloaded the map.
        got = h.pread(n, off)
        if got != data:
            bad += 1
            print(f"round {r}: NBD read of librbd's {n} bytes at {off} differs")
        off2, n2 = extent()
        data2 = rng.randbytes(n2)
        h.pwrite(data2, off2, nbd.CMD_FLAG_FUA if rng.random() < 0.3 else 0)
        want[off2:off2 + n2] = data2
        last_nbd = (off2, n2)
        # librbd reads what the server wrote (no lock needed to read, but the data must
        # be there: acknowledged before the lock moved).
        o, l = last_nbd
        if bytes(img.read(o, l)) != bytes(want[o:o + l]):
            bad += 1
            print(f"round {r}: librbd read of the server's {l} bytes at {o} differs")
        if rng.random() < 0.2:
            h.flush()
    elapsed = time.monotonic() - t0
    if read_all(h, size) != want:
        bad += 1
        print("the whole image read through the server differs from what was written")
    whole_rbd = bytes(img.read(0, size))
    if whole_rbd != want:
        bad += 1
        print("the whole image read through librbd differs from what was written")
    h.shutdown()
    img.close()
    io.close()
    c.shutdown()
    with open(out, "wb") as f:
        f.write(want)
    print(f"alternate: {rounds} rounds ({2 * int(rounds)} lock moves) in {elapsed:.1f} s, "
          f"{bad} bad")
    return 1 if bad else 0


def librbd_journal(conf, pool, image, seconds, seed, first, blocks, journal):
    rng = random.Random(int(seed))
    first, blocks = int(first), int(blocks)
    c, io, img = open_image(conf, pool, image)
    j = open(journal, "a", buffering=1)
    lock = threading.Lock()
    inflight = {}
    done = threading.Condition(lock)
    acked = [0]
    errors = []
    busy = set()
    end = time.monotonic() + float(seconds)
    seq = 0

    def completed(tag, comp):
        with lock:
            entries = inflight.pop(tag)
            r = comp.get_return_value()
            if r < 0:
                errors.append(r)
            else:
                j.write("".join(f"A {x} {s}\n" for x, s in entries))
                acked[0] += 1
            busy.difference_update(x for x, _ in entries)
            done.notify_all()

    while time.monotonic() < end:
        with lock:
            while len(inflight) >= 8:
                done.wait()
            if errors:
                break
            n = rng.randint(1, 4)
            b = first + rng.randrange(0, blocks - n)
            if any(x in busy for x in range(b, b + n)):
                continue
            data = rng.randbytes(n * BS)
            entries = [(b + i, sha(data[i * BS:(i + 1) * BS])) for i in range(n)]
            j.write("".join(f"P {x} {s}\n" for x, s in entries))
            seq += 1
            inflight[seq] = entries
            busy.update(x for x, _ in entries)
        tag = seq
        img.aio_write(data, b * BS, lambda comp, tag=tag: completed(tag, comp))
    with lock:
        while inflight:
            done.wait()
    img.close()
    io.close()
    c.shutdown()
    print(f"librbd-journal: {acked[0]} acked writes, errors {errors[:3]}")
    return 1 if errors or acked[0] == 0 else 0


def main(argv):
    return dispatch(argv, {"alternate": alternate, "librbd-journal": librbd_journal}, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
