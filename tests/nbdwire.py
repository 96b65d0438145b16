"""The NBD wire, client side, encoded by hand: the one encoder of the scripts that must send
what a client library would smooth over or refuse to send (tests/clients/raw_edge.py,
tests/reliability/nbdtool.py's hostile clients, fuzz/seeds.py). Names follow the spec
(NetworkBlockDevice/nbd doc/proto.md) as protocol/src/consts.rs does on the server's side.

Encoders return bytes and send nothing, so a caller can cut, repeat or concatenate them;
the few socket helpers below read exactly what the spec says comes back.
"""
import socket
import struct

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCT_REPLY_MAGIC = 0x668E33EF

# Client handshake flags.
FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES = 1, 2
CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR + 1
REP_ERR_UNKNOWN = REP_FLAG_ERROR + 6
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO = 1, 2, 4, 8, 16

EPERM, EIO, EINVAL, ENOSPC, EOVERFLOW = 1, 5, 22, 28, 75


# ---------------------------------------------------------------- encoders

def client_flags(flags=CLIENT_FLAGS):
    return struct.pack(">I", flags)


def option_header(code, length):
    """An option's header alone: `length` need not be what follows."""
    return struct.pack(">QII", IHAVEOPT, code, length)


def option(code, data=b""):
    return option_header(code, len(data)) + data


def string(s):
    """A length-prefixed string (export names, queries)."""
    b = s.encode()
    return struct.pack(">I", len(b)) + b


def go_data(name, infos=()):
    """The payload of GO or INFO: the export name and the information requests."""
    return string(name) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def meta_data(name, queries):
    """The payload of LIST_META_CONTEXT or SET_META_CONTEXT."""
    return string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries)


def request(cmd, handle, offset, length, flags=0):
    """A request header (a WRITE's payload follows it, sent by the caller)."""
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, handle, offset, length)


# ---------------------------------------------------------------- on a socket

def unix(path, timeout=None):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if timeout is not None:
        s.settimeout(timeout)
    s.connect(path)
    return s


def recvall(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def greet(s, flags=CLIENT_FLAGS):
    """Takes the newstyle greeting and answers with the client flags; the server's flags."""
    magic, opt, server_flags = struct.unpack(">QQH", recvall(s, 18))
    assert magic == NBDMAGIC and opt == IHAVEOPT, "bad greeting"
    s.sendall(client_flags(flags))
    return server_flags


def option_reply(s):
    """(option, reply type, data) of the next option reply."""
    magic, opt, typ, length = struct.unpack(">QIII", recvall(s, 20))
    assert magic == REPLY_MAGIC, hex(magic)
    return opt, typ, recvall(s, length)


def go(s, name, infos=()):
    """Sends GO and reads its replies up to the ACK or the first other one:
    (its type, {info type: data}, its data). After an ACK, infos[INFO_EXPORT] is always
    there (size and transmission flags)."""
    s.sendall(option(OPT_GO, go_data(name, infos)))
    got = {}
    while True:
        _, typ, data = option_reply(s)
        if typ != REP_INFO:
            return typ, got, data
        (itype,) = struct.unpack(">H", data[:2])
        got[itype] = data[2:]


def export_info(infos):
    """(size, transmission flags) from what GO returned."""
    return struct.unpack(">QH", infos[INFO_EXPORT])


def simple_reply(s):
    """(error, handle) of the next simple reply; a read's data follows it on the socket."""
    magic, err, handle = struct.unpack(">IIQ", recvall(s, 16))
    assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
    return err, handle
