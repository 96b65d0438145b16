#!/usr/bin/python3
"""Writes the seed inputs of the fuzz targets into protocol/tests/fuzz-corpus/<target>/
(seed-*.bin). Seeds are well-formed sessions, so the fuzzer starts from inputs that reach
deep into the handshake and the transmission phase instead of stopping at the magic."""
import os
import struct
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "protocol", "tests", "fuzz-corpus")
IHAVEOPT = 0x49484156454F5054
REQ = 0x25609513
(OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO, OPT_SR, OPT_LIST_META,
 OPT_SET_META) = (1, 2, 3, 5, 6, 7, 8, 9, 10)
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS = 0, 1, 2, 3, 4, 5, 6, 7
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16


def opt(o, data=b""):
    return struct.pack(">QII", IHAVEOPT, o, len(data)) + data


def go(name, infos=()):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def meta(name, queries):
    n = name.encode()
    d = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        d += struct.pack(">I", len(q)) + q.encode()
    return d


def req(cmd, off=0, length=0, flags=0, handle=1, payload=b""):
    return struct.pack(">IHHQQI", REQ, flags, cmd, handle, off, length) + payload


def workload(structured):
    w = req(WRITE, 4096, 512, 0, 1, bytes(range(256)) * 2)
    w += req(WRITE, 8192, 100, FUA, 2, b"x" * 100)
    w += req(READ, 4000, 1024, DF if structured else 0, 3)
    w += req(FLUSH, 0, 0, 0, 4)
    w += req(TRIM, 0, 4096, 0, 5)
    w += req(WZ, 65536, 8192, NO_HOLE | FAST_ZERO, 6)
    w += req(CACHE, 0, 65536, 0, 7)
    if structured:
        w += req(BS, 0, 262144, 0, 8) + req(BS, 4096, 100, REQ_ONE, 9)
    w += req(READ, 262100, 100, 0, 10)      # past the end
    w += req(WRITE, 262144, 1, 0, 11, b"z")  # past the end
    w += req(99, 0, 0, 0, 12)               # unknown command
    w += req(READ, 0, 16, 0x8000, 13)       # unknown flag
    return w + req(DISC, 0, 0, 0, 14)


def main():
    hs = {
        "simple-go": bytes([0]) + struct.pack(">I", 3) + opt(OPT_GO, go("")) + workload(False),
        "structured": bytes([9]) + struct.pack(">I", 3) + opt(OPT_SR) + opt(OPT_SET_META, meta("a", ["base:allocation"]))
        + opt(OPT_GO, go("a", (0, 1, 2, 3))) + workload(True),
        "options": bytes([0]) + struct.pack(">I", 1) + opt(OPT_LIST) + opt(OPT_INFO, go("ro", (3,))) + opt(0x1234, b"??")
        + opt(OPT_STARTTLS) + opt(OPT_LIST_META, meta("", [])) + opt(OPT_SR) + opt(OPT_LIST_META, meta("", ["base:"]))
        + opt(OPT_ABORT),
        "export-name-ro": bytes([3]) + struct.pack(">I", 1) + opt(OPT_EXPORT_NAME, b"ro") + workload(False),
        "oldstyle": bytes([0]) + struct.pack(">I", 0) + opt(OPT_EXPORT_NAME, b"a") + req(READ, 0, 512),
        # Knob bits 4-5: 1 = TLS allow, 2 = TLS require.
        "tls-require": bytes([0x20]) + struct.pack(">I", 3) + opt(OPT_LIST) + opt(OPT_GO, go("a"))
        + opt(OPT_STARTTLS, b"x") + opt(OPT_STARTTLS) + b"\x16\x03\x01\x00\x05hello",
        "tls-allow-pipelined": bytes([0x10]) + struct.pack(">I", 3) + opt(OPT_LIST) + opt(OPT_STARTTLS) + opt(OPT_GO, go("a")),
        "tls-require-export-name": bytes([0x20]) + struct.pack(">I", 1) + opt(OPT_EXPORT_NAME, b"a") + req(READ, 0, 512),
        "too-big": bytes([0]) + struct.pack(">I", 1) + struct.pack(">QII", IHAVEOPT, OPT_GO, 70000) + b"\0" * 70000,
    }
    tr = {
        "workload": workload(False),
        "payload-cut": req(WRITE, 0, 4096, 0, 1, b"short"),
        "bad-magic": req(READ, 0, 512)[:-4] + b"\xde\xad\xbe\xef" + b"\0" * 28,
    }
    rq = {
        "read": req(READ, 512, 512, DF, 7) + b"\0" + struct.pack(">Q", 1 << 20) + struct.pack(">H", 0xfdff) + b"\x03" + b"\x00\x02\x00",
        "write-ro": req(WRITE, 0, 1, FUA, 7) + b"\0" + struct.pack(">Q", 1 << 20) + struct.pack(">H", 0x0003) + b"\x00" + b"\x00\x02\x00",
        "bs": req(BS, 0, 1 << 31, REQ_ONE, 7) + b"\0" + struct.pack(">Q", 1 << 40) + struct.pack(">H", 0xffff) + b"\x03" + b"\x10\x00\x00",
    }
    for target, seeds in (("handshake", hs), ("transmission", tr), ("request", rq)):
        d = os.path.join(ROOT, target)
        os.makedirs(d, exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(d, f"seed-{name}.bin"), "wb") as f:
                f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
