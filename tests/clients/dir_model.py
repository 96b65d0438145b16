#!/usr/bin/python3
"""The directory store against an in-memory model, driven by the same seeded sequences as the
Ceph differential test (tests/diffops.py), snapshots included.

The model holds the image's bytes and, per object, whether it exists (the object map of an
image without snapshots has only NONEXISTENT and EXISTS):
  write, WRITE_ZEROES + NO_HOLE    the objects touched exist
  TRIM, WRITE_ZEROES               a whole object stops existing (all of a short last
                                   object is only part of one); part of one is zeroed and
                                   the object keeps its state (a NONEXISTENT one stays so),
                                   except that an object left all zeros may exist or not:
                                   the store may remove an object that punched holes emptied
                                   (when its file system tells so cheaply); the next
                                   comparison learns which
  resize                           shrinking drops the objects past the end, growing adds
                                   NONEXISTENT ones
  kill -9                          nothing changes: the reopen rebuilds the map from the
                                   object files, which must say the same
  burst                            requests in flight together (disjoint extents), put in
                                   the model one by one; each read among them must read the
                                   model's bytes; an object left all zeros by a hole beside
                                   another change in it may exist or not (the order decides)
  snap                             between serves, `snap create`: the model keeps a copy of
                                   the bytes; every compare then reads each snapshot whole
                                   (`serve --read-only IMG@SNAP`) and runs `object-map check`
                                   on it. With snapshots the head's map may say EXISTS_CLEAN
                                   (unchanged since the newest) where the model says it exists,
                                   and `du` (which counts changes since the last snapshot) is
                                   not compared

Each time a serve ends (clean close, or kill -9 followed by a reopen and a clean close) the
stored image is compared with the model: every byte read through a `serve --read-only`, the
stored object map (rbd_object_map.<id>, decoded here) object by object, `object-map check`,
`du --format json` (used size) and `info --format json` (no flags left).

Environment: RADOS_NBD_BIN, DIFF_SEQS (default 200: about 2 minutes), DIFF_SEED, DIFF_KINDS,
DIFF_MINIMISE_S (default 60), DIFF_OUT.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import diffops  # noqa: E402
from diffops import Failure, hang_up, serving, sh  # noqa: E402

import nbd  # noqa: E402

IMG = "model"


class Run(diffops.Serves):
    def __init__(self, bin_, work, geo):
        self.geo = geo
        self.size = geo.size
        self.root = tempfile.mkdtemp(prefix="store.", dir=work)
        self.rn = [bin_, "--store", f"dir:{self.root}"]
        self.work = work
        self.log = os.path.join(self.root, "serve.log")
        sh(self.rn + ["create", "--size", f"{geo.size}B", "--object-size", str(geo.obj), IMG])
        self.data = bytearray(geo.size)
        self.exists = [False] * self.objects()
        # (name, size, bytes) of each snapshot, oldest first.
        self.snaps = []
        self.server = None
        self.h = None
        self.serves = 0

    def objects(self):
        return -(-self.size // self.geo.obj)

    def obj_len(self, o):
        return min(self.geo.obj, self.size - o * self.geo.obj)

    # ------------------------------------------------------------------ the model
    def model_zero(self, off, length, no_hole):
        self.data[off:off + length] = bytes(length)
        o_sz = self.geo.obj
        for o in range(off // o_sz, (off + length - 1) // o_sz + 1):
            a = max(off, o * o_sz)
            b = min(off + length, o * o_sz + self.obj_len(o))
            if no_hole:
                self.exists[o] = True
            elif a == o * o_sz and b - a == o_sz:
                # Only a whole object of the full size goes: a short last object, even all
                # of it, is zeroed (as librbd, which removes only full objects).
                self.exists[o] = False
            elif self.exists[o] is not False and not any(
                    self.data[o * o_sz:o * o_sz + self.obj_len(o)]):
                self.exists[o] = None  # emptied by holes: the store may have removed it

    def model_write(self, off, data):
        self.data[off:off + len(data)] = data
        for o in range(off // self.geo.obj, (off + len(data) - 1) // self.geo.obj + 1):
            self.exists[o] = True

    def model_resize(self, new):
        if new < self.size:
            del self.data[new:]
        else:
            self.data += bytes(new - self.size)
        self.size = new
        n = self.objects()
        self.exists = (self.exists + [False] * n)[:n]

    # ------------------------------------------------------------------ the server
    def start(self):
        self.server = serving(self.rn + ["serve", IMG], os.path.join(self.root, "w.sock"), self.log)
        self.h = self.server.connect()
        if self.h.get_size() != self.size:
            raise Failure("size", f"NBD size {self.h.get_size()}, model {self.size}")

    def end_serve(self, crash):
        if crash:
            self.server.kill()
            self.h = None
            self.start()
        self.close_serve()
        self.compare("after crash + reopen + close" if crash else "after close")

    def run_op(self, op):
        k = op[0]
        if k in ("oob", "flush"):
            self.ensure_served()
        h = self.h
        if k == "write":
            self.model_write(op[1], diffops.send(h, op))
        elif k == "trim":
            diffops.send(h, op)
            self.model_zero(op[1], op[2], False)
        elif k == "zero":
            diffops.send(h, op)
            self.model_zero(op[1], op[2], op[3])
        elif k == "burst":
            self.burst(op[1])
        elif k == "flush":
            h.flush()
        elif k in ("close", "crash"):
            if self.server is not None:
                self.end_serve(crash=k == "crash")
        elif k == "resize":
            new = op[1]
            if new == self.size:
                return
            sh(self.rn + ["resize", "--allow-shrink", "--size", f"{new}B", IMG])
            self.model_resize(new)
            if self.server is not None:
                hang_up(self.h)   # a client keeps the size it was told: reconnect
                self.h = self.server.connect()
                if self.h.get_size() != new:
                    raise Failure("resize", f"NBD size {self.h.get_size()} after resize to {new}")
        elif k == "ro":
            diffops.read_only_beside(self.rn + ["serve", "--read-only", IMG],
                                     os.path.join(self.root, "r.sock"), self.log, h, op,
                                     lambda data, off: self.model_write(off, data), self.geo.order)
        elif k == "oob":
            diffops.trim_past_end(h, self.size)
        elif k == "snap":
            if self.server is not None:
                self.end_serve(crash=False)
            name = f"s{len(self.snaps) + 1}"
            sh(self.rn + ["snap", "create", f"{IMG}@{name}"])
            self.snaps.append((name, self.size, bytes(self.data)))
        else:
            raise ValueError(f"unknown operation {op}")

    def burst(self, subs):
        """["burst", subs]: all in flight at once (disjoint extents), then into the model one
        by one; each read must read the model's bytes there."""
        got = diffops.send_burst(self.h, subs)
        for s, data in zip(subs, got):
            if s[0] == "write":
                self.model_write(s[1], data)
            elif s[0] in ("trim", "zero"):
                self.model_zero(s[1], s[2], s[0] == "zero" and s[3])
        if diffops.burst_sharing(subs, self.geo.order):
            # A hole beside another change in one object: whether the store found the object
            # empty (and removed it) depends on the order they ran in.
            for s in subs:
                if s[0] == "read":
                    continue
                for o in range(s[1] // self.geo.obj, (s[1] + s[2] - 1) // self.geo.obj + 1):
                    if self.exists[o] is True and not any(
                            self.data[o * self.geo.obj:o * self.geo.obj + self.obj_len(o)]):
                        self.exists[o] = None
        for s, data in zip(subs, got):
            if s[0] == "read" and data != self.data[s[1]:s[1] + s[2]]:
                want = self.data[s[1]:s[1] + s[2]]
                first = next(i for i in range(s[2]) if data[i] != want[i])
                raise Failure("burst: read", f"{s[1]}+{s[2]} (object "
                              f"{(s[1] + first) // self.geo.obj}), read with {len(subs)} "
                              f"requests in flight, differs from the model at +{first}")

    # ------------------------------------------------------------------ comparison
    def compare(self, where):
        ro = serving(self.rn + ["serve", "--read-only", IMG], os.path.join(self.root, "c.sock"),
                     self.log, "ro serve start")
        try:
            r = ro.connect()
            if r.get_size() != self.size:
                raise Failure("size", f"{where}: size {r.get_size()}, model {self.size}")
            got = bytearray()
            step = 4 << 20
            for off in range(0, self.size, step):
                got += r.pread(min(step, self.size - off), off)
            if got != self.data:
                first = next(i for i in range(self.size) if got[i] != self.data[i])
                raise Failure("bytes", f"{where}: first difference at {first} "
                              f"(object {first // self.geo.obj})")
            hang_up(r)
        finally:
            ro.stop()
        for name, size, want in self.snaps:
            spec = f"{IMG}@{name}"
            ro = serving(self.rn + ["serve", spec], os.path.join(self.root, "s.sock"),
                         self.log, f"serve {spec}")
            try:
                r = ro.connect()
                if r.get_size() != size:
                    raise Failure("snapshot size", f"{where}: {spec}: size {r.get_size()}, "
                                  f"model {size}")
                got = bytearray()
                for off in range(0, size, 4 << 20):
                    got += r.pread(min(4 << 20, size - off), off)
                if got != want:
                    first = next(i for i in range(size) if got[i] != want[i])
                    raise Failure("snapshot bytes", f"{where}: {spec}: first difference at "
                                  f"{first} (object {first // self.geo.obj})")
                hang_up(r)
            finally:
                ro.stop()
            chk = sh(self.rn + ["object-map", "check", spec], check=False)
            if chk.returncode != 0:
                raise Failure("object-map check", f"{where}: {spec}: exit {chk.returncode}: "
                              f"{(chk.stdout + chk.stderr).decode(errors='replace').strip()[-300:]}")
        stored = self.stored_map()
        if self.snaps:
            # EXISTS_CLEAN (3): exists, unchanged since the newest snapshot.
            stored = [1 if st == 3 else st for st in stored]
        if len(stored) != self.objects():
            raise Failure("map", f"{where}: stored map of {len(stored)} objects, model "
                          f"{self.objects()}")
        wrong = [o for o, (st, x) in enumerate(zip(stored, self.exists))
                 if st not in (0, 1) or (x is not None and st != x)]
        if wrong:
            raise Failure("map", f"{where}: stored map states (0 NONEXISTENT, 1 EXISTS) "
                          f"{stored}, model {[{True: 1, False: 0, None: '0|1'}[x] for x in self.exists]}: "
                          f"objects {wrong} differ")
        self.exists = [bool(st) for st in stored]  # an undecided object is what was stored
        chk = sh(self.rn + ["object-map", "check", IMG], check=False)
        if chk.returncode != 0:
            raise Failure("object-map check", f"{where}: exit {chk.returncode}: "
                          f"{(chk.stdout + chk.stderr).decode(errors='replace').strip()[-300:]}")
        # The head's line: its used size is what changed since the newest snapshot, which the
        # model does not track; without snapshots every existing object.
        du = json.loads(sh(self.rn + ["du", "--format", "json", IMG]).stdout)["images"][-1]
        used = sum(self.obj_len(o) for o, x in enumerate(self.exists) if x)
        if not self.snaps and (du["used_size"] != used or du["provisioned_size"] != self.size):
            raise Failure("du", f"{where}: du used {du['used_size']} of "
                          f"{du['provisioned_size']}, model {used} of {self.size}")
        info = json.loads(sh(self.rn + ["info", "--format", "json", IMG]).stdout)
        if info["flags"]:
            raise Failure("flags", f"{where}: flags {info['flags']}")

    def stored_map(self):
        """The object states in rbd_object_map.<id>: Ceph's BitVector<2> encoding, a
        length-prefixed header (struct_v, struct_compat, struct_len, u64 object count), then
        two bits per object, the first object in the highest bits of the first byte."""
        info = json.loads(sh(self.rn + ["info", "--format", "json", IMG]).stdout)
        with open(os.path.join(self.root, "rbd", f"rbd_object_map.{info['id']}"), "rb") as f:
            raw = f.read()
        hlen = int.from_bytes(raw[0:4], "little")
        count = int.from_bytes(raw[4 + 6:4 + 14], "little")
        data = raw[4 + hlen:]
        return [(data[o // 4] >> (2 * (3 - o % 4))) & 3 for o in range(count)]

    def finish(self):
        hang_up(self.h)
        if self.server is not None:
            self.server.kill()
        subprocess.run(["rm", "-rf", self.root])


# Sequences a default run drives (about 2 minutes, snapshots included).
DEFAULT_SEQS = 200


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=int(os.environ.get("DIFF_SEQS", str(DEFAULT_SEQS))))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("DIFF_SEED", "0")) or None)
    ap.add_argument("--long", action="store_true", help="1000 sequences, longer ones")
    ap.add_argument("--replay", help="a JSON case printed by a failure")
    ap.add_argument("--kinds", default=os.environ.get("DIFF_KINDS", ""))
    args = ap.parse_args()
    bin_ = diffops.rados_nbd_bin()
    work = tempfile.mkdtemp(prefix="rados-nbd-dirmodel.")
    test = diffops.Campaign(
        "dir model", "tests/clients/dir_model.py", "dir", "the model", work,
        lambda geo, ops, label: diffops.drive(Run(bin_, work, geo), ops, (nbd.Error,)))
    if args.replay:
        sys.exit(test.replay(json.load(open(args.replay))))
    # --long means 1000 sequences unless DIFF_SEQS/--seqs names another number.
    seqs = 1000 if args.long and args.seqs == DEFAULT_SEQS else args.seqs
    kinds = [k for k in args.kinds.split(",") if k] or None
    first, failed, serves, secs = test.seeds(
        args.seed, seqs,
        lambda seed: diffops.sequence(seed, args.long, snapshots=True, kinds=kinds,
                                      burst=diffops.burst_rng(seed)),
        float(os.environ.get("DIFF_MINIMISE_S", "60")))
    sys.exit(test.summary(first, seqs, failed, serves, secs))


if __name__ == "__main__":
    main()
