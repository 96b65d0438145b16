#!/usr/bin/python3
"""Clients for the reliability tests (tests/reliability/run.sh), on libnbd's Python binding
(Debian python3-libnbd, so run with /usr/bin/python3) or on raw sockets where a library
would refuse to send what we want to send.

  journal-write URI JOURNAL SECONDS SEED BLOCKS   random writes and WRITE_ZEROES, QD 16; every write is
        journalled before it is sent (P) and when it is acknowledged (A); stops quietly
        when the server dies
  journal-verify URI JOURNAL SEED BLOCKS [BASE]   every block reads back as its last acked
        write (or the one write to it that was in flight when the server died); a sample
        of never-written blocks reads as zeros, or with BASE (a file holding what a clone's
        parent has) every never-written block reads as the parent's bytes: a copy-up cut
        short never leaves an object holding the write without the parent's data around it;
        fails when the journal holds no acked write, unless JOURNAL_EMPTY_OK=1
  overlap URI SECONDS                             4 connections hammer the same 64 blocks
        concurrently, then final writes are issued one at a time from random connections:
        every block reads back as its final write from every connection
  ro-writes URI                                   WRITE, TRIM, WRITE_ZEROES on a read-only
        export each fail with EPERM (client-side checks off)
  enospc URI                                      fill the store: writes past capacity fail
        with ENOSPC, earlier data intact, a new connection works, TRIM frees space
  eio URI OFFSET                                  a read at OFFSET fails with EIO, the
        connection and the rest of the export keep working
  eio-write URI OFFSET                            writes at OFFSET (small, large, FUA) each
        fail with EIO, unacknowledged; the connection, the rest of the export and a new
        connection keep working
  limit URI SOCKET N                              with --max-connections N: N clients are
        served, client N+1 is closed before the greeting, the N keep working, and when one
        leaves a new client gets in
  canary URI SECONDS OUT                          one write+read every 20 ms; writes
        "ok N worst_ms" or "fail ..." to OUT
  flood-unread SOCKET EXPORT SECONDS              pipelines 32 MiB READs and never reads a reply
  flood-writes SOCKET EXPORT SECONDS              pipelines WRITEs with payload, never reads replies
  huge SOCKET EXPORT                              4 GiB lengths, truncated headers: protocol
        answers or a closed connection
  idle SOCKET N SECONDS                           N connections that never finish the handshake
  export-name SOCKET                              EXPORT_NAME of an unknown export closes the
        connection without serving anything
"""
import hashlib
import os
import random
import socket
import sys
import threading
import time

import nbd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbdwire as wire  # noqa: E402
from nbdwire import (  # noqa: E402
    CMD_DISC, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, EINVAL, ENOSPC, EOVERFLOW,
    OPT_EXPORT_NAME, REP_ACK, recvall, simple_reply,
)

BS = 4096
QD = 16


def sha(b):
    return hashlib.sha256(b).hexdigest()[:32]


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


# ---------------------------------------------------------------- journal (crash oracle)

def journal_write(uri, journal, seconds, seed, blocks, first=0):
    """Writes blocks [first, first+blocks) (first: a range shared with another writer)."""
    rng = random.Random(int(seed))
    blocks = int(blocks)
    first = int(first)
    try:
        h = connect(uri)
    except nbd.Error as e:
        print(f"journal-write: could not connect: {e}")
        return 0
    j = open(journal, "a", buffering=1)
    end = time.monotonic() + float(seconds)
    inflight = {}  # cookie -> [(block, hash)]
    busy = set()
    acked = 0
    try:
        while time.monotonic() < end:
            while len(inflight) < QD:
                # Mostly writes; some WRITE_ZEROES, half of them over a whole 64 KiB
                # object (the object is removed and the map updated: the riskiest moment
                # to be killed).
                zero = rng.random() < 0.15
                if zero and rng.random() < 0.5:
                    n = 16
                    b = rng.randrange(0, blocks // 16) * 16
                else:
                    n = rng.randint(1, 4)
                    b = rng.randrange(0, blocks - n)
                b += first
                if any(x in busy for x in range(b, b + n)):
                    continue
                data = bytearray(n * BS) if zero else bytearray(os.urandom(n * BS))
                entries = [(b + i, sha(data[i * BS:(i + 1) * BS])) for i in range(n)]
                # Journal before sending: a write in flight at the crash may or may not
                # have landed, and the verifier must know its content either way.
                j.write("".join(f"P {x} {s}\n" for x, s in entries))
                flags = nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0
                if zero:
                    if rng.random() < 0.3:
                        flags |= nbd.CMD_FLAG_NO_HOLE
                    c = h.aio_zero(n * BS, b * BS, flags=flags)
                else:
                    c = h.aio_pwrite(nbd.Buffer.from_bytearray(data), b * BS, flags=flags)
                inflight[c] = entries
                busy.update(x for x, _ in entries)
            h.poll(-1)
            for c in list(inflight):
                if h.aio_command_completed(c):
                    entries = inflight.pop(c)
                    j.write("".join(f"A {x} {s}\n" for x, s in entries))
                    busy.difference_update(x for x, _ in entries)
                    acked += 1
            if rng.random() < 0.02:
                h.flush()
    except nbd.Error as e:
        print(f"journal-write: server gone after {acked} acked writes ({e.errno})")
        return 0
    print(f"journal-write: {acked} acked writes, finished")
    try:
        h.shutdown()
    except nbd.Error:
        pass
    return 0


def journal_state(journal):
    """block -> set of acceptable hashes: the last acked one, plus a write sent after it
    that was never acknowledged (in flight at the crash)."""
    state = {}
    with open(journal) as f:
        for line in f:
            kind, b, s = line.split()
            b = int(b)
            acc, pend = state.get(b, (None, []))
            if kind == "P":
                pend = pend + [s]
            else:
                acc, pend = s, []
            state[b] = (acc, pend)
    return state


def journal_verify(uri, journal, seed, blocks, base=None, first=0):
    """Checks blocks [first, first+blocks); base "-" (or none): unwritten blocks are zero."""
    first = int(first)
    state = {b - first: v for b, v in journal_state(journal).items()
             if first <= b < first + int(blocks)}
    h = connect(uri)
    zero = sha(bytes(BS))
    parent = open(base, "rb").read() if base and base != "-" else None

    def unwritten(b):
        """What block b holds if no write reached it: zeros, or the parent's bytes."""
        if parent is None:
            return zero
        return sha(parent[b * BS:(b + 1) * BS].ljust(BS, b"\0"))
    # Read the whole region in 1 MiB pieces and hash locally: far fewer round trips.
    image = bytearray()
    total = int(blocks) * BS
    while len(image) < total:
        image += h.pread(min(1 << 20, total - len(image)), first * BS + len(image))

    def block(b):
        return sha(bytes(image[b * BS:(b + 1) * BS]))

    bad = 0
    acked = 0
    for b, (acc, pend) in sorted(state.items()):
        got = block(b)
        ok = set(pend)
        ok.add(acc if acc is not None else unwritten(b))
        if acc is not None:
            acked += 1
        if got not in ok:
            bad += 1
            if bad <= 5:
                print(f"block {first + b}: read {got}, want last acked {acc} or in-flight {pend}")
    rng = random.Random(int(seed) + 1)
    # With a parent every block is checked: the blocks around a write in a copied-up object
    # are the ones a torn copy-up would have lost.
    sample = range(int(blocks)) if parent is not None else rng.sample(range(int(blocks)), 200)
    untouched = [b for b in sample if b not in state]
    for b in untouched:
        if block(b) != unwritten(b):
            bad += 1
            if bad <= 5:
                print(f"block {first + b}: never written but not {'the parent' if parent else 'zero'}")
    h.shutdown()
    print(f"journal-verify: {len(state)} blocks ({acked} with acked writes), "
          f"{len(untouched)} untouched, {bad} bad")
    # No acked write at all makes the check vacuous, so it fails, unless the caller knows
    # the writer was killed before its first acknowledgement (JOURNAL_EMPTY_OK=1).
    if acked == 0 and os.environ.get("JOURNAL_EMPTY_OK") != "1":
        print("journal-verify: no acked write to check")
        return 1
    return 1 if bad else 0


# ---------------------------------------------------------------- overlapping writers

def overlap(uri, seconds):
    conns = [connect(uri) for _ in range(4)]
    nblocks = 64
    stop = time.monotonic() + float(seconds)
    errors = []
    counts = [0] * len(conns)

    def storm(i, h):
        rng = random.Random(i)
        try:
            while time.monotonic() < stop:
                cookies = []
                for _ in range(32):
                    b = rng.randrange(nblocks)
                    buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(BS)))
                    cookies.append(h.aio_pwrite(buf, b * BS))
                while cookies:
                    h.poll(-1)
                    cookies = [c for c in cookies if not h.aio_command_completed(c)]
                counts[i] += 32
        except nbd.Error as e:
            errors.append(f"connection {i}: {e}")

    # libnbd handles are thread-safe; one thread per connection keeps them all busy.
    ts = [threading.Thread(target=storm, args=(i, h)) for i, h in enumerate(conns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        print("overlap: storm failed:", errors)
        return 1
    # The final writes, one at a time from random connections: each is acked before the
    # next is sent, so "last" is unambiguous.
    rng = random.Random(99)
    final = {}
    for b in range(nblocks):
        for _ in range(2):
            data = os.urandom(BS)
            rng.choice(conns).pwrite(data, b * BS)
            final[b] = sha(data)
    bad = 0
    for i, h in enumerate(conns):
        for b in range(nblocks):
            if sha(h.pread(BS, b * BS)) != final[b]:
                bad += 1
    for h in conns:
        h.shutdown()
    print(f"overlap: {sum(counts)} concurrent writes to {nblocks} blocks, then "
          f"{2 * nblocks} final writes; {bad} stale reads")
    return 1 if bad else 0


# ---------------------------------------------------------------- errors reaching clients

def ro_writes(uri):
    h = connect(uri)
    h.set_strict_mode(0)  # send what the server advertised it does not accept
    assert h.is_read_only(), "export is not read-only"
    bad = 0
    for name, f in (("WRITE", lambda: h.pwrite(b"x" * 512, 0)),
                    ("TRIM", lambda: h.trim(4096, 0)),
                    ("WRITE_ZEROES", lambda: h.zero(4096, 0))):
        try:
            f()
            print(f"{name} accepted on a read-only export")
            bad += 1
        except nbd.Error as e:
            if e.errno != "EPERM":
                print(f"{name}: {e.errno}, want EPERM")
                bad += 1
            else:
                print(f"{name}: EPERM")
    h.pread(512, 0)  # still serving
    h.shutdown()
    return 1 if bad else 0


def enospc(uri):
    h = connect(uri)
    chunk = 1 << 20
    written = {}
    err = None
    for i in range(64):
        data = os.urandom(chunk)
        try:
            h.pwrite(data, i * chunk)
            written[i] = sha(data)
        except nbd.Error as e:
            err = e.errno
            break
    print(f"enospc: {len(written)} MiB acked before the error {err}")
    if err != "ENOSPC":
        print(f"enospc: expected ENOSPC, got {err}")
        return 1
    if not written:
        print("enospc: nothing could be written at all")
        return 1
    # Every acked MiB is intact, on this connection and on a new one.
    h2 = connect(uri)
    for c in (h, h2):
        for i, s in written.items():
            if sha(c.pread(chunk, i * chunk)) != s:
                print(f"enospc: MiB {i} changed")
                return 1
    # Overwriting already allocated data still works; flush works.
    data = os.urandom(4096)
    h2.pwrite(data, 0)
    h2.flush()
    written[0] = None
    if h2.pread(4096, 0) != data:
        print("enospc: overwrite of allocated data failed")
        return 1
    # Freeing space (TRIM of whole objects) lets writes succeed again.
    last = max(written)
    h2.trim(2 * chunk, (last - 1) * chunk)
    h2.pwrite(os.urandom(chunk), (last - 1) * chunk)
    print("enospc: after TRIM freed space a new write succeeded")
    h.shutdown()
    h2.shutdown()
    return 0


def not_eio(request, what):
    """None when `request` fails with EIO, else why not (it succeeded, or failed otherwise)."""
    try:
        request()
    except nbd.Error as e:
        return None if e.errno == "EIO" else f"{what} got {e.errno}, want EIO"
    return f"{what} was acknowledged, expected EIO"


def eio(uri, offset):
    offset = int(offset)
    h = connect(uri)
    why = not_eio(lambda: h.pread(4096, offset), "read")
    if why:
        print(f"eio: {why}")
        return 1
    # The connection and the other objects keep working.
    h.pwrite(b"y" * 4096, 0)
    assert h.pread(4096, 0) == b"y" * 4096
    h.shutdown()
    print("eio: EIO reached the client; the connection kept serving")
    return 0


def eio_write(uri, offset):
    offset = int(offset)
    h = connect(uri)
    # 4 KiB goes the store's inline path once the file is open, 256 KiB its thread pool
    # path (which opens the file); FUA adds the durable path.
    for name, n, flags in (("4 KiB", 4096, 0), ("256 KiB", 256 << 10, 0),
                           ("4 KiB FUA", 4096, nbd.CMD_FLAG_FUA), ("4 KiB again", 4096, 0)):
        why = not_eio(lambda: h.pwrite(b"w" * n, offset, flags), f"the {name} write at {offset}")
        if why:
            print(f"eio-write: {why}")
            return 1
    # The connection and the other objects keep working, and so does a new connection.
    h.pwrite(b"y" * 4096, 0)
    assert h.pread(4096, 0) == b"y" * 4096, "object 0 reads back wrong after the EIOs"
    h2 = connect(uri)
    h2.pwrite(b"q" * 4096, 8192)
    assert h.pread(4096, 8192) == b"q" * 4096, "a new connection's write is not seen"
    h2.shutdown()
    h.shutdown()
    print("eio-write: 4 writes got EIO (none acknowledged); the connection, other objects "
          "and a new connection kept working")
    return 0


def limit(uri, path, n):
    n = int(n)
    held = []
    for i in range(n):
        h = connect(uri)
        h.pread(512, 0)
        held.append(h)

    def refused():
        """A raw connection beyond the limit: closed before the 18-byte greeting."""
        s = wire.unix(path, 5)
        try:
            got = s.recv(18)
        except ConnectionResetError:
            got = b""
        except socket.timeout:
            got = None
        s.close()
        return got

    t0 = time.monotonic()
    got = refused()
    took = time.monotonic() - t0
    if got != b"":
        print(f"limit: client {n + 1} was not closed (got {got!r})")
        return 1
    if took > 2:
        print(f"limit: client {n + 1} was closed only after {took:.1f} s")
        return 1
    # libnbd's view of the same thing: the handshake fails.
    try:
        connect(uri)
        print(f"limit: libnbd client {n + 1} was served")
        return 1
    except nbd.Error:
        pass
    # Many at once: every one closed, none served.
    extra = [refused() for _ in range(50)]
    if any(g != b"" for g in extra):
        print(f"limit: of 50 clients beyond the limit, {sum(g != b'' for g in extra)} were not closed")
        return 1
    for i, h in enumerate(held):
        data = bytes([i + 1]) * 4096
        h.pwrite(data, 4096 * i)
        if h.pread(4096, 4096 * i) != data:
            print(f"limit: held client {i} reads back wrong data")
            return 1
    held.pop().shutdown()
    # The leaving client's slot is free once the server has seen it go.
    deadline = time.monotonic() + 5
    while True:
        try:
            h = connect(uri)
            h.pread(512, 0)
            held.append(h)
            break
        except nbd.Error as e:
            if time.monotonic() > deadline:
                print(f"limit: no client got in within 5 s of one leaving ({e})")
                return 1
            time.sleep(0.05)
    if refused() != b"":
        print("limit: after the replacement, client n+1 was served")
        return 1
    for h in held:
        h.shutdown()
    print(f"limit: {n} served, client {n + 1} closed in {took * 1000:.0f} ms before the greeting, "
          f"50 more closed, a leaver's slot reused")
    return 0


def canary(uri, seconds, out):
    end = time.monotonic() + float(seconds)
    n, worst = 0, 0.0
    try:
        h = connect(uri)
        size = h.get_size()
        off = size - 65536
        while time.monotonic() < end:
            t0 = time.monotonic()
            data = os.urandom(4096)
            h.pwrite(data, off)
            if h.pread(4096, off) != data:
                raise RuntimeError("canary read back wrong data")
            worst = max(worst, time.monotonic() - t0)
            n += 1
            time.sleep(0.02)
        h.shutdown()
        msg = f"ok {n} {worst * 1000:.0f}"
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        msg = f"fail after {n}: {e}"
    with open(out, "w") as f:
        f.write(msg + "\n")
    return 0


# ---------------------------------------------------------------- raw-socket hostile clients

def raw_go(path, export):
    s = wire.unix(path, 20)
    wire.greet(s)
    typ, infos, body = wire.go(s, export)
    if typ != REP_ACK:
        raise RuntimeError(f"GO refused: {typ:#x} {body!r}")
    return s, wire.export_info(infos)[0]


req = wire.request


def flood(path, export, seconds, writes):
    s, size = raw_go(path, export)
    s.settimeout(1)
    end = time.monotonic() + float(seconds)
    sent, blocked = 0, 0
    length = 32 << 20 if not writes else 1 << 20
    payload = os.urandom(length) if writes else b""
    while time.monotonic() < end:
        try:
            off = (sent * length) % max(size - length, 1)
            s.sendall(req(CMD_WRITE if writes else CMD_READ, sent, off, length) + payload)
            sent += 1
        except socket.timeout:
            # The server stopped reading: that is the throttle working.
            blocked += 1
    s.close()
    print(f"flood({'writes' if writes else 'reads'}): {sent} requests sent, "
          f"{blocked} times blocked by the server not reading")
    return 0


def alive(s):
    s.sendall(req(CMD_READ, 777, 0, 512))
    err, h = simple_reply(s)
    recvall(s, 512)
    return err == 0 and h == 777


def huge(path, export):
    bad = 0

    def check(name, cond):
        nonlocal bad
        print(("PASS " if cond else "FAIL ") + name)
        bad += 0 if cond else 1

    four = 0xFFFFFFFF
    s, size = raw_go(path, export)
    s.sendall(req(CMD_READ, 1, 0, four))
    err, _ = simple_reply(s)
    check("READ of 4 GiB gets EINVAL/EOVERFLOW, connection alive",
          err in (EINVAL, EOVERFLOW) and alive(s))
    s.sendall(req(CMD_TRIM, 2, 0, four))
    err, _ = simple_reply(s)
    check("TRIM of 4 GiB past the end gets ENOSPC/EINVAL, alive", err in (ENOSPC, EINVAL) and alive(s))
    s.sendall(req(CMD_WRITE_ZEROES, 3, size - 4096, four))
    err, _ = simple_reply(s)
    check("WRITE_ZEROES of 4 GiB past the end refused, alive", err in (ENOSPC, EINVAL) and alive(s))
    s.sendall(req(CMD_TRIM, 4, 1 << 62, 4096))
    err, _ = simple_reply(s)
    check("TRIM at offset 2^62 refused, alive", err in (ENOSPC, EINVAL) and alive(s))
    # A 4 GiB WRITE: refused, and its payload is swallowed as a stream; the client gives up
    # after 8 MiB and closes. Nothing may be written.
    before = None
    s2, _ = raw_go(path, export)
    s2.sendall(req(CMD_READ, 5, 0, 4096))
    simple_reply(s2)
    before = recvall(s2, 4096)
    s.sendall(req(CMD_WRITE, 6, 0, four))
    try:
        for _ in range(8):
            s.sendall(b"\xab" * (1 << 20))
    except OSError:
        pass
    s.close()
    s2.sendall(req(CMD_READ, 7, 0, 4096))
    simple_reply(s2)
    check("4 GiB WRITE with a payload that never completes changed nothing",
          recvall(s2, 4096) == before)
    # Truncated request headers, then the client vanishes.
    for n in (1, 4, 13, 27):
        t, _ = raw_go(path, export)
        t.sendall(req(CMD_READ, 8, 0, 512)[:n])
        t.close()
    # A header cut short and then left hanging: the server waits, others are served.
    hang, _ = raw_go(path, export)
    hang.sendall(req(CMD_WRITE, 9, 0, 4096)[:20])
    check("truncated and hanging headers do not disturb other connections", alive(s2))
    hang.close()
    s2.sendall(req(CMD_DISC, 10, 0, 0))
    s2.close()
    return 1 if bad else 0


def idle(path, n, seconds):
    """n connections that take the greeting and then say nothing."""
    socks = []
    for _ in range(int(n)):
        socks.append(wire.unix(path))
    time.sleep(float(seconds))
    for s in socks:
        s.close()
    print(f"idle: held {len(socks)} silent connections for {seconds} s")
    return 0


def export_name(path):
    s = wire.unix(path, 10)
    wire.greet(s)
    s.sendall(wire.option(OPT_EXPORT_NAME, b"nosuch"))
    try:
        got = s.recv(100)
    except (ConnectionResetError, socket.timeout):
        got = b""
    s.close()
    if got:
        print(f"export-name: server answered an unknown EXPORT_NAME with {got!r}")
        return 1
    print("export-name: unknown EXPORT_NAME closed the connection")
    return 0


def dispatch(argv, cmds, doc):
    """Runs the command argv[1] of `cmds` (name -> function) with the words after it as
    its arguments, and returns its exit status; without a known command prints `doc`
    (the script's usage) and returns 2. tests/ceph/handover.py uses it too."""
    if len(argv) < 2 or argv[1] not in cmds:
        print(doc)
        return 2
    return cmds[argv[1]](*argv[2:])


def main(argv):
    return dispatch(argv, {
        "journal-write": journal_write, "journal-verify": journal_verify, "overlap": overlap,
        "ro-writes": ro_writes, "enospc": enospc, "eio": eio, "canary": canary,
        "eio-write": eio_write, "limit": limit,
        "flood-unread": lambda p, e, t: flood(p, e, t, False),
        "flood-writes": lambda p, e, t: flood(p, e, t, True),
        "huge": huge, "export-name": export_name, "idle": idle,
    }, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
