#!/usr/bin/python3
"""Writes the seed inputs of the fuzz targets into protocol/tests/fuzz-corpus/<target>/
(seed-*.bin). Seeds are well-formed sessions, so the fuzzer starts from inputs that reach
deep into the handshake and the transmission phase instead of stopping at the magic."""
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "protocol", "tests", "fuzz-corpus")
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from nbdwire import (  # noqa: E402
    CMD_BLOCK_STATUS as BS, CMD_CACHE as CACHE, CMD_DISC as DISC, CMD_FLUSH as FLUSH,
    CMD_READ as READ, CMD_TRIM as TRIM, CMD_WRITE as WRITE, CMD_WRITE_ZEROES as WZ,
    FLAG_DF as DF, FLAG_FAST_ZERO as FAST_ZERO, FLAG_FUA as FUA, FLAG_NO_HOLE as NO_HOLE,
    FLAG_REQ_ONE as REQ_ONE, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST,
    OPT_LIST_META, OPT_SET_META, OPT_STARTTLS, OPT_STRUCTURED_REPLY as OPT_SR,
    client_flags, option as opt, option_header, request,
)
from nbdwire import go_data as go, meta_data as meta  # noqa: E402


def req(cmd, off=0, length=0, flags=0, handle=1, payload=b""):
    """The seeds' order: what varies most first."""
    return request(cmd, handle, off, length, flags) + payload


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
        "simple-go": bytes([0]) + client_flags(3) + opt(OPT_GO, go("")) + workload(False),
        "structured": bytes([9]) + client_flags(3) + opt(OPT_SR) + opt(OPT_SET_META, meta("a", ["base:allocation"]))
        + opt(OPT_GO, go("a", (0, 1, 2, 3))) + workload(True),
        "options": bytes([0]) + client_flags(1) + opt(OPT_LIST) + opt(OPT_INFO, go("ro", (3,))) + opt(0x1234, b"??")
        + opt(OPT_STARTTLS) + opt(OPT_LIST_META, meta("", [])) + opt(OPT_SR) + opt(OPT_LIST_META, meta("", ["base:"]))
        + opt(OPT_ABORT),
        "export-name-ro": bytes([3]) + client_flags(1) + opt(OPT_EXPORT_NAME, b"ro") + workload(False),
        "oldstyle": bytes([0]) + client_flags(0) + opt(OPT_EXPORT_NAME, b"a") + req(READ, 0, 512),
        # Knob bits 4-5: 1 = TLS allow, 2 = TLS require.
        "tls-require": bytes([0x20]) + client_flags(3) + opt(OPT_LIST) + opt(OPT_GO, go("a"))
        + opt(OPT_STARTTLS, b"x") + opt(OPT_STARTTLS) + b"\x16\x03\x01\x00\x05hello",
        "tls-allow-pipelined": bytes([0x10]) + client_flags(3) + opt(OPT_LIST) + opt(OPT_STARTTLS) + opt(OPT_GO, go("a")),
        "tls-require-export-name": bytes([0x20]) + client_flags(1) + opt(OPT_EXPORT_NAME, b"a") + req(READ, 0, 512),
        "too-big": bytes([0]) + client_flags(1) + option_header(OPT_GO, 70000) + b"\0" * 70000,
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
