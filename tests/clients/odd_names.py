#!/usr/bin/python3
"""Names as `rbd` takes them: anything but '/' and '@' (its spec parser's separators). An
image, snapshots and a clone whose names have white space, quotes, shell and XML characters,
a leading '-' and Unicode go through create (or `rbd create`), serve and NBD writes, a
snapshot and a rename asked of the serving daemon, protect, clone, children, reads of the
snapshot and of the clone (a copy-up), object-map check and removal; the bytes are checked
against a model. With --ceph, Ceph's `rbd` makes the image and is the oracle: `rbd ls`,
`snap ls`, `children`, `info` (the clone's parent), `export` and `object-map check`.

    odd_names.py WORK [--ceph] -- RADOS-NBD [GLOBAL-OPTIONS...]

Run by tests/clients/run.sh (directory store) and tests/ceph/e2e.sh (Ceph)."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import nbd

MB = 1 << 20
SIZE = 16 * MB
# Names no build before this one took (they allowed letters, digits and - _ . + :); this
# process's pid in each keeps runs beside each other in one pool apart.
NAME = f"vm {os.getpid()} 'q\" ü名\t#=%,<&>"
RENAMED = NAME + " renamed"
CHILD = f"-child ü {os.getpid()}"
SNAP = "s ü 1 \"x\""

work = sys.argv[1]
ceph = "--ceph" in sys.argv[2:sys.argv.index("--")]
rn = sys.argv[sys.argv.index("--") + 1:]
sock = os.path.join(work, "odd.sock")
failures = []


def spec(name, snap=None):
    return f"rbd/{name}" + (f"@{snap}" if snap is not None else "")


def run(cmd, timeout=300, ok=True):
    """Runs CMD (bounded: a hung Ceph client must not hang the suite); its stdout."""
    for attempt in (1, 2):
        try:
            p = subprocess.run(cmd, capture_output=True, timeout=timeout)
            break
        except subprocess.TimeoutExpired:
            if attempt == 2:
                raise
            print(f"note: {cmd!r} did not finish in {timeout} s; once more", flush=True)
    if ok and p.returncode != 0:
        raise RuntimeError(f"{cmd!r} failed ({p.returncode}): {p.stderr.decode(errors='replace').strip()}")
    return p


def ours(*args, **kw):
    return run(rn + list(args), **kw)


def rbd(*args, **kw):
    return run(["rbd", *args], **kw)


def check(what, cond, detail=""):
    print(("PASS " if cond else "FAIL ") + what + ("" if cond else f": {detail}"), flush=True)
    if not cond:
        failures.append(what)


class Served:
    """`serve SPEC` on the suite's socket until the block ends (SIGTERM, clean exit)."""

    def __init__(self, s, *extra):
        self.args = [*rn, "serve", s, "--socket", sock, *extra]

    def __enter__(self):
        if os.path.exists(sock):
            os.unlink(sock)
        self.log = open(os.path.join(work, "odd-serve.log"), "ab")
        self.p = subprocess.Popen(self.args, stdout=self.log, stderr=self.log)
        for _ in range(600):
            if os.path.exists(sock):
                return self
            if self.p.poll() is not None:
                raise RuntimeError(f"serve exited ({self.p.returncode}): see {self.log.name}")
            time.sleep(0.05)
        raise RuntimeError("serve did not create its socket in 30 s")

    def connect(self, export):
        h = nbd.NBD()
        h.set_export_name(export)
        h.connect_unix(sock)
        return h

    def __exit__(self, *exc):
        self.p.send_signal(signal.SIGTERM)
        try:
            rc = self.p.wait(60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            rc = self.p.wait()
        self.log.close()
        check(f"serve {self.args[len(rn) + 1]!r} exits cleanly", rc == 0, f"exit {rc}")


def read_all(h):
    return b"".join(h.pread(MB, o) for o in range(0, h.get_size(), MB))


def main():
    rng = random.Random(int(os.environ.get("ODD_SEED", "7")))
    head = bytearray(SIZE)

    def write(h, off, n):
        data = rng.randbytes(n)
        h.pwrite(data, off)
        head[off:off + n] = data

    if ceph:
        rbd("create", "--size", f"{SIZE // MB}M", spec(NAME))
    else:
        ours("create", "--size", f"{SIZE // MB}M", spec(NAME))
    check("ls --format json lists the name as it is",
          NAME in json.loads(ours("ls", "--format", "json").stdout))
    check("info --format json names it",
          json.loads(ours("info", "--format", "json", spec(NAME)).stdout).get("name") == NAME)

    with Served(spec(NAME)) as srv:
        h = srv.connect(NAME)
        check("served under its name as the export name", h.get_size() == SIZE, h.get_size())
        write(h, 123456, MB + 7)
        h.flush()
        ours("snap", "create", spec(NAME, SNAP))
        at_snap = bytes(head)
        write(h, 0, 65536)
        ours("rename", spec(NAME), spec(RENAMED))
        # Still served after the rename its daemon made: the same connection goes on.
        write(h, 8 * MB, 4096 * 3)
        h.flush()
        check("the served image reads back what was written, across a snapshot and a rename",
              read_all(h) == bytes(head))
        h.shutdown()

    names = json.loads(ours("ls", "--format", "json").stdout)
    check("after the rename, ls has the new name only", RENAMED in names and NAME not in names, names)
    snaps = [s["name"] for s in json.loads(ours("snap", "ls", "--format", "json", spec(RENAMED)).stdout)]
    check("snap ls lists the snapshot by its name", snaps == [SNAP], snaps)
    ours("snap", "protect", spec(RENAMED, SNAP))
    ours("clone", spec(RENAMED, SNAP), spec(CHILD))
    kids = ours("children", spec(RENAMED, SNAP)).stdout.decode().splitlines()
    check("children of the snapshot names the clone", kids == [spec(CHILD)], kids)
    if ceph:
        check("rbd ls has the names",
              {RENAMED, CHILD} <= set(json.loads(rbd("ls", "--format", "json").stdout)))
        rs = [s["name"] for s in json.loads(rbd("snap", "ls", "--format", "json", spec(RENAMED)).stdout)]
        check("rbd snap ls has the snapshot", rs == [SNAP], rs)
        # Tables pad by bytes, as Ceph's TextTable does, not by characters.
        for cmd in (("snap", "ls"), ("du",)):
            a, b = ours(*cmd, spec(RENAMED)).stdout, rbd(*cmd, spec(RENAMED)).stdout
            check(f"{' '.join(cmd)} (plain) is rbd's, byte for byte", a == b, f"{a!r} != {b!r}")
        rk = rbd("children", spec(RENAMED, SNAP)).stdout.decode().splitlines()
        check("rbd children names the clone", rk == [spec(CHILD)], rk)
        par = json.loads(rbd("info", "--format", "json", spec(CHILD)).stdout).get("parent", {})
        check("rbd info of the clone names its parent",
              (par.get("image"), par.get("snapshot")) == (RENAMED, SNAP), par)

    with Served(spec(RENAMED, SNAP)) as srv:
        h = srv.connect(RENAMED)
        check("the snapshot (served by name) reads what the image had when it was taken",
              read_all(h) == at_snap)
        h.shutdown()
    child = bytearray(at_snap)
    with Served(spec(CHILD)) as srv:
        h = srv.connect(CHILD)
        data = rng.randbytes(200)
        h.pwrite(data, 4 * MB - 100)  # across two objects the parent has: two copy-ups
        child[4 * MB - 100:4 * MB + 100] = data
        h.flush()
        check("the clone reads its parent's snapshot under its write", read_all(h) == bytes(child))
        h.shutdown()

    for name, want in ((RENAMED, head), (CHILD, child)):
        if ceph:
            out = rbd("export", spec(name), "-").stdout
            check(f"rbd export of {name!r} is the model", out == bytes(want))
            c = rbd("object-map", "check", spec(name), ok=False)
            check(f"rbd object-map check of {name!r} passes", c.returncode == 0, c.stderr)
        else:
            c = ours("object-map", "check", spec(name), ok=False)
            check(f"object-map check of {name!r} passes", c.returncode == 0, c.stderr)

    for bad, why in ((spec("a", "b@c"), "'/' and '@'"), ("rbd/.", "are not names"),
                     (spec("x" * 256), "longer than 255")):
        r = ours("info", bad, ok=False)
        err = r.stderr.decode(errors="replace")
        check(f"{bad[:40]!r} is refused, saying why", r.returncode != 0 and why in err, err)

    ours("rm", spec(CHILD))
    ours("snap", "unprotect", spec(RENAMED, SNAP))
    ours("snap", "rm", spec(RENAMED, SNAP))
    ours("rm", spec(RENAMED))
    names = json.loads(ours("ls", "--format", "json").stdout)
    check("rm removes them", RENAMED not in names and CHILD not in names, names)
    print(f"odd names: {len(failures)} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
