#!/usr/bin/python3
"""The directory store against an in-memory model, driven by the same seeded sequences as the
Ceph differential test (tests/diffops.py; no snapshots: the directory store keeps none).

The model holds the image's bytes and, per object, whether it exists (the object map of an
image without snapshots has only NONEXISTENT and EXISTS):
  write, WRITE_ZEROES + NO_HOLE    the objects touched exist
  TRIM, WRITE_ZEROES               a whole object stops existing; part of one is zeroed and
                                   the object keeps its state (a NONEXISTENT one stays so),
                                   except that an object left all zeros may exist or not:
                                   the store may remove an object that punched holes emptied
                                   (when its file system tells so cheaply); the next
                                   comparison learns which
  resize                           shrinking drops the objects past the end, growing adds
                                   NONEXISTENT ones
  kill -9                          nothing changes: the reopen rebuilds the map from the
                                   object files, which must say the same

Each time a serve ends (clean close, or kill -9 followed by a reopen and a clean close) the
stored image is compared with the model: every byte read through a `serve --read-only`, the
stored object map (rbd_object_map.<id>, decoded here) object by object, `object-map check`,
`du --format json` (used size) and `info --format json` (no flags left).

Environment: RADOS_NBD_BIN, DIFF_SEQS (default 300: about 3 minutes), DIFF_SEED, DIFF_KINDS,
DIFF_MINIMISE_S (default 60), DIFF_OUT.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import diffops  # noqa: E402
from diffops import Failure, Server, clip, hang_up, nbd_errno  # noqa: E402

import nbd  # noqa: E402

IMG = "model"


def sh(args, timeout=60, check=True):
    try:
        r = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Failure("timeout", f"{' '.join(args)}: no answer in {timeout} s")
    if check and r.returncode != 0:
        raise Failure("command", f"{' '.join(args[3:])}: exit {r.returncode}: "
                      f"{r.stderr.decode(errors='replace').strip()[-300:]}")
    return r


class Run:
    def __init__(self, bin_, work, geo):
        self.geo = geo
        self.size = geo.size
        self.root = tempfile.mkdtemp(prefix="store.", dir=work)
        self.rn = [bin_, "--store", f"dir:{self.root}"]
        self.work = work
        self.log = os.path.join(self.root, "serve.log")
        sh(self.rn + ["create", "--size", str(geo.size), "--object-size", str(geo.obj), IMG])
        self.data = bytearray(geo.size)
        self.exists = [False] * self.objects()
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
            elif a == o * o_sz and b - a == self.obj_len(o):
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
        s = Server(self.rn + ["serve", IMG], os.path.join(self.root, "w.sock"), self.log)
        if not s.wait_ready():
            raise Failure("serve start", f"exit {s.proc.returncode}: {s.tail()}")
        self.server = s
        self.h = s.connect()
        if self.h.get_size() != self.size:
            raise Failure("size", f"NBD size {self.h.get_size()}, model {self.size}")

    def end_serve(self, crash):
        if crash:
            self.server.kill()
            self.h = None
            self.start()
        hang_up(self.h)
        self.h = None
        rc = self.server.stop()
        if rc != 0:
            raise Failure("close", f"serve exited {rc} after SIGTERM: {self.server.tail()}")
        self.server = None
        self.serves += 1
        self.compare("after crash + reopen + close" if crash else "after close")

    def apply(self, op):
        k = op[0]
        if k in ("write", "trim", "zero", "ro"):
            op = clip(op, self.size)
            if op is None:
                return
        if k in ("write", "trim", "zero", "ro", "oob", "flush") and self.server is None:
            self.start()
        h = self.h
        if k == "write":
            _, off, length, tag, fua = op
            data = diffops.pattern(tag, off, length)
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if fua else 0)
            self.model_write(off, data)
        elif k == "trim":
            _, off, length, fua = op
            h.trim(length, off, nbd.CMD_FLAG_FUA if fua else 0)
            self.model_zero(off, length, False)
        elif k == "zero":
            _, off, length, no_hole, fua = op
            flags = (nbd.CMD_FLAG_NO_HOLE if no_hole else 0) | (nbd.CMD_FLAG_FUA if fua else 0)
            h.zero(length, off, flags)
            self.model_zero(off, length, no_hole)
        elif k == "flush":
            h.flush()
        elif k in ("close", "crash"):
            if self.server is not None:
                self.end_serve(crash=k == "crash")
        elif k == "resize":
            new = op[1]
            if new == self.size:
                return
            sh(self.rn + ["resize", "--allow-shrink", "--size", str(new), IMG])
            self.model_resize(new)
            if self.server is not None:
                hang_up(self.h)   # a client keeps the size it was told: reconnect
                self.h = self.server.connect()
                if self.h.get_size() != new:
                    raise Failure("resize", f"NBD size {self.h.get_size()} after resize to {new}")
        elif k == "ro":
            _, off, length, tag = op
            ro = Server(self.rn + ["serve", "--read-only", IMG], os.path.join(self.root, "r.sock"),
                        self.log)
            if not ro.wait_ready():
                raise Failure("ro serve start", f"exit {ro.proc.returncode}: {ro.tail()}")
            try:
                r = ro.connect()
                data = diffops.pattern(tag, off, length)
                h.pwrite(data, off)
                h.flush()
                self.model_write(off, data)
                got = r.pread(length, off)
                hang_up(r)
                if got != data:
                    raise Failure("ro read", f"serve --read-only opened before a write of "
                                  f"{off}+{length} (object {off // self.geo.obj}) reads "
                                  f"{'zeros' if got == bytes(length) else 'other data'}")
            finally:
                rc = ro.stop()
            if rc != 0:
                raise Failure("ro close", f"serve --read-only exited {rc}: {ro.tail()}")
        elif k == "oob":
            off = max(0, self.size - diffops.SECTOR)
            try:
                h.trim(2 * diffops.SECTOR, off, 0)
            except nbd.Error as e:
                if nbd_errno(e) != "EINVAL":
                    raise Failure("oob trim", f"TRIM past the end: errno {nbd_errno(e)}, not EINVAL")
                return
            raise Failure("oob trim", "TRIM past the end succeeded")
        elif k == "snap":
            pass  # no snapshots in the directory store
        else:
            raise ValueError(f"unknown operation {op}")

    # ------------------------------------------------------------------ comparison
    def compare(self, where):
        ro = Server(self.rn + ["serve", "--read-only", IMG], os.path.join(self.root, "c.sock"),
                    self.log)
        if not ro.wait_ready():
            raise Failure("ro serve start", f"exit {ro.proc.returncode}: {ro.tail()}")
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
        stored = self.stored_map()
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
        du = json.loads(sh(self.rn + ["du", "--format", "json", IMG]).stdout)
        used = sum(self.obj_len(o) for o, x in enumerate(self.exists) if x)
        if du["total_used_size"] != used or du["total_provisioned_size"] != self.size:
            raise Failure("du", f"{where}: du used {du['total_used_size']} of "
                          f"{du['total_provisioned_size']}, model {used} of {self.size}")
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


def run_sequence(bin_, work, geo, ops):
    run = Run(bin_, work, geo)
    i = -1
    try:
        for i, op in enumerate(ops):
            run.apply(op)
        return None, run.serves
    except Failure as f:
        f.at = i
        return f, run.serves
    except nbd.Error as ex:
        f = Failure(f"error in {ops[i][0]}", str(ex))
        f.at = i
        return f, run.serves
    finally:
        run.finish()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=int(os.environ.get("DIFF_SEQS", "300")))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("DIFF_SEED", "0")) or None)
    ap.add_argument("--long", action="store_true", help="1000 sequences, longer ones")
    ap.add_argument("--replay", help="a JSON case printed by a failure")
    ap.add_argument("--kinds", default=os.environ.get("DIFF_KINDS", ""))
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    bin_ = os.environ.get("RADOS_NBD_BIN", os.path.join(root, "target/release/rados-nbd"))
    work = tempfile.mkdtemp(prefix="rados-nbd-dirmodel.")
    budget = float(os.environ.get("DIFF_MINIMISE_S", "60"))
    if args.replay:
        case = json.load(open(args.replay))
        geo = diffops.Geometry(case["order"], case["objects"])
        f, serves = run_sequence(bin_, work, geo, case["ops"])
        print(f"FAIL dir model replay: {f}" if f else
              f"PASS dir model replay ({len(case['ops'])} ops, {serves} serves compared)")
        sys.exit(1 if f else 0)
    seqs = 1000 if args.long and args.seqs == 100 else args.seqs
    first = args.seed if args.seed is not None else int(time.time()) % 1000000
    kinds = [k for k in args.kinds.split(",") if k] or None
    t0 = time.monotonic()
    failed = {}
    serves = 0
    for seed in range(first, first + seqs):
        rng = random.Random(seed)
        geo = diffops.random_geometry(rng)
        ops = diffops.generate(rng, geo, rng.randint(8, 48 if args.long else 24),
                               snapshots=False, kinds=kinds)
        f, n = run_sequence(bin_, work, geo, ops)
        serves += n
        if f is None:
            continue
        if f.kind in failed:
            failed[f.kind] += 1
            print(f"# also seed {seed}: {f}")
            continue
        failed[f.kind] = 1
        print(f"# seed {seed}: {f}; minimising...", flush=True)

        def still_fails(cand, kind=f.kind, geo=geo):
            g, _ = run_sequence(bin_, work, geo, cand)
            return g is not None and g.kind == kind

        small = diffops.minimise(ops[:f.at + 1], still_fails, budget,
                                 log=lambda m: print(f"#   {m}", flush=True))
        g, _ = run_sequence(bin_, work, geo, small)
        case = {"seed": seed, "order": geo.order, "objects": geo.size // geo.obj, "ops": small}
        path = os.path.join(os.environ.get("DIFF_OUT", work), f"dir-seed{seed}.json")
        with open(path, "w") as fh:
            json.dump(case, fh)
        print(f"FAIL dir model seed {seed}: {g or f}")
        print(f"#   minimal ({len(small)} ops): {json.dumps(case, separators=(',', ':'))}")
        print(f"#   replay: /usr/bin/python3 tests/clients/dir_model.py --replay {path}")
    secs = time.monotonic() - t0
    if not failed:
        subprocess.run(["rm", "-rf", work])
        print(f"PASS dir model: {seqs} sequences (seeds {first}..{first + seqs - 1}), "
              f"{serves} serves compared with the model in {secs:.0f} s")
    else:
        print(f"# {seqs} sequences from seed {first} in {secs:.0f} s; failures by kind: {failed}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
