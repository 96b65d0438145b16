#!/usr/bin/env python3
"""Protocol edge cases against a running NBD server, spoken byte by byte (no client library,
so nothing is smoothed over): unknown option, unknown command, illegal flags, out-of-range,
oversized request, write with a payload that never arrives, garbage magic, many options.

Usage: raw_edge.py UNIX_SOCKET EXPORT_NAME
Prints PASS/FAIL lines; exits non-zero on any failure.
"""
import os
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbdwire as wire  # noqa: E402
from nbdwire import (  # noqa: E402
    CMD_BLOCK_STATUS, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_WRITE, EINVAL, ENOSPC, EOVERFLOW,
    FLAG_FUA, FLAG_NO_HOLE, FLAG_REQ_ONE, INFO_BLOCK_SIZE, OPT_ABORT, OPT_LIST,
    OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_SERVER,
)

failures = 0


def ok(name, cond, detail=""):
    global failures
    if cond:
        print(f"PASS {name}")
    else:
        failures += 1
        print(f"FAIL {name}{': ' + detail if detail else ''}")


class Conn:
    def __init__(self, path):
        self.s = wire.unix(path, 20)
        self.server_flags = wire.greet(self.s)
        self.handle = 1
        self.size = None
        self.tflags = None

    def opt(self, code, data=b""):
        self.s.sendall(wire.option(code, data))

    def opt_reply(self):
        return wire.option_reply(self.s)

    def go(self, name, structured=False):
        if structured:
            self.opt(OPT_STRUCTURED_REPLY)
            _, typ, _ = self.opt_reply()
            assert typ == REP_ACK, typ
        typ, infos, _ = wire.go(self.s, name, (INFO_BLOCK_SIZE,))
        if typ == REP_ACK:
            self.size, self.tflags = wire.export_info(infos)
        return typ, infos

    def request(self, cmd, offset, length, flags=0, payload=b""):
        h = self.handle
        self.handle += 1
        self.s.sendall(wire.request(cmd, h, offset, length, flags) + payload)
        return h

    def simple_reply(self, want_data=0):
        err, handle = wire.simple_reply(self.s)
        data = wire.recvall(self.s, want_data) if err == 0 and want_data else b""
        return err, handle, data

    def alive(self):
        """A read of the first 512 bytes still works on this connection."""
        self.request(CMD_READ, 0, 512)
        err, _, data = self.simple_reply(512)
        return err == 0 and len(data) == 512


def connect(path, name):
    c = Conn(path)
    typ, _ = c.go(name)
    assert typ == REP_ACK, f"GO failed: {typ}"
    return c


def main():
    path, name = sys.argv[1], sys.argv[2]

    # Unknown option: ERR_UNSUP, and the handshake goes on.
    c = Conn(path)
    c.opt(0x7777, b"xyz")
    opt, typ, _ = c.opt_reply()
    ok("unknown option gets ERR_UNSUP", typ == REP_ERR_UNSUP and opt == 0x7777, f"type {typ:#x}")
    typ, infos = c.go(name)
    ok("GO after unknown option", typ == REP_ACK and c.size and c.size > 0)
    ok("NBD_INFO_BLOCK_SIZE sent", INFO_BLOCK_SIZE in infos)
    if INFO_BLOCK_SIZE in infos:
        mn, pref, mx = struct.unpack(">III", infos[INFO_BLOCK_SIZE])
        ok("block sizes sane", 1 <= mn <= pref <= mx and mx >= 1 << 20, f"{mn} {pref} {mx}")
    max_block = struct.unpack(">III", infos[INFO_BLOCK_SIZE])[2] if INFO_BLOCK_SIZE in infos else 32 << 20

    # Unknown export name: ERR_UNKNOWN.
    c2 = Conn(path)
    typ, _ = c2.go("no-such-export-" + name)
    ok("unknown export gets ERR_UNKNOWN", typ == REP_ERR_UNKNOWN, f"type {typ:#x}")
    c2.s.close()

    # LIST names our export.
    c3 = Conn(path)
    c3.opt(OPT_LIST)
    names = []
    while True:
        _, typ, data = c3.opt_reply()
        if typ != REP_SERVER:
            break
        (n,) = struct.unpack(">I", data[:4])
        names.append(data[4 : 4 + n].decode())
    ok("LIST names the export", name in names, repr(names))
    c3.opt(OPT_ABORT)
    c3.s.close()

    # Many options: 10,000 unknown options, then GO still works.
    c4 = Conn(path)
    batch = b"".join(wire.option(0x7000 + (i % 100)) for i in range(10000))
    c4.s.sendall(batch)
    good = sum(1 for _ in range(10000) if c4.opt_reply()[1] == REP_ERR_UNSUP)
    typ, _ = c4.go(name)
    ok("10000 unknown options answered, then GO", good == 10000 and typ == REP_ACK, f"{good}")
    c4.s.close()

    # Transmission edge cases on connection c (simple replies).
    c.request(CMD_READ, c.size, 512)
    err, _, _ = c.simple_reply()
    ok("read past the end gets EINVAL", err == EINVAL, f"err {err}")
    c.request(CMD_READ, 2**64 - 512, 1024)
    err, _, _ = c.simple_reply()
    ok("read with offset+length overflow gets EINVAL", err == EINVAL, f"err {err}")
    ok("connection alive after out-of-range", c.alive())

    c.request(CMD_WRITE, c.size - 512, 1024, payload=b"\0" * 1024)
    err, _, _ = c.simple_reply()
    ok("write past the end gets ENOSPC (or EINVAL)", err in (ENOSPC, EINVAL), f"err {err}")
    ok("connection alive after write past end", c.alive())

    c.request(0x55, 0, 512)
    err, _, _ = c.simple_reply()
    ok("unknown command gets EINVAL", err == EINVAL, f"err {err}")
    ok("connection alive after unknown command", c.alive())

    c.request(CMD_READ, 0, 512, flags=FLAG_NO_HOLE)
    err, _, _ = c.simple_reply()
    ok("NO_HOLE on READ gets EINVAL", err == EINVAL, f"err {err}")
    c.request(CMD_READ, 0, 512, flags=0x8000)
    err, _, _ = c.simple_reply()
    ok("unknown flag gets EINVAL", err == EINVAL, f"err {err}")
    c.request(CMD_READ, 0, 512, flags=FLAG_REQ_ONE)
    err, _, _ = c.simple_reply()
    ok("REQ_ONE on READ gets EINVAL", err == EINVAL, f"err {err}")
    ok("connection alive after illegal flags", c.alive())

    big = max_block + 4096
    if big < c.size:
        c.request(CMD_READ, 0, big)
        err, _, _ = c.simple_reply()
        ok("oversized read gets EINVAL/EOVERFLOW", err in (EINVAL, EOVERFLOW), f"err {err}")
        ok("connection alive after oversized read", c.alive())
        # An oversized write is refused, its payload skipped (the connection stays in
        # step), and nothing of it reaches the image.
        c.request(CMD_READ, 0, 4096)
        _, _, before = c.simple_reply(4096)
        c.request(CMD_WRITE, 0, big, payload=b"\7" * big)
        err, _, _ = c.simple_reply()
        ok("oversized write gets EINVAL/EOVERFLOW", err in (EINVAL, EOVERFLOW), f"err {err}")
        ok("connection alive after oversized write", c.alive())
        c.request(CMD_READ, 0, 4096)
        err, _, after = c.simple_reply(4096)
        ok("oversized write wrote nothing", err == 0 and after == before, f"err {err}")

    c.request(CMD_BLOCK_STATUS, 0, 4096)
    err, _, _ = c.simple_reply()
    ok("BLOCK_STATUS without meta context gets EINVAL", err == EINVAL, f"err {err}")
    ok("connection alive after block status refusal", c.alive())

    # Good write + read back + flush on the same connection.
    pattern = bytes(range(256)) * 16
    c.request(CMD_WRITE, 8192, 4096, flags=FLAG_FUA, payload=pattern)
    err, _, _ = c.simple_reply()
    ok("FUA write", err == 0, f"err {err}")
    c.request(CMD_READ, 8192, 4096)
    err, _, data = c.simple_reply(4096)
    ok("read back what was written", err == 0 and data == pattern)
    c.request(CMD_FLUSH, 0, 0)
    err, _, _ = c.simple_reply()
    ok("flush", err == 0, f"err {err}")
    c.request(CMD_DISC, 0, 0)
    c.s.close()

    # A write whose payload never arrives, then the client vanishes: the server survives.
    c5 = connect(path, name)
    c5.request(CMD_WRITE, 0, 65536, payload=b"\1" * 100)
    c5.s.close()
    # Garbage magic on the request: the server may close, but must stay up for others.
    c6 = connect(path, name)
    c6.s.sendall(b"\xde\xad\xbe\xef" * 7)
    c6.s.settimeout(5)
    try:
        c6.s.recv(16)
    except (socket.timeout, ConnectionResetError):
        pass
    c6.s.close()
    # Garbage instead of the client flags.
    s = wire.unix(path)
    wire.recvall(s, 18)
    s.sendall(b"garbage-garbage-garbage")
    s.close()
    time.sleep(0.2)
    c7 = connect(path, name)
    ok("server still serves after hostile clients", c7.alive())
    c7.request(CMD_READ, 0, 4096)
    err, _, data = c7.simple_reply(4096)
    ok("abandoned partial write did not touch data", err == 0 and data[:100] != b"\1" * 100)
    c7.request(CMD_DISC, 0, 0)
    c7.s.close()

    print(f"raw_edge: {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
