#!/usr/bin/python3
"""Differential test: the same seeded sequence of operations against twin images, A served by
rados-nbd and written over NBD, B written through librbd in this process, compared with Ceph's
own code each time a serve of A ends (clean close, or kill -9 followed by a reopen and a clean
close):

  - every snapshot and the head read whole through librbd (what `rbd export` writes): equal bytes
  - `diff_iterate(whole_object=True, include_parent=False)` (what `rbd diff --whole-object
    [--from-snap S]` prints, less a clone's parent, whose part the chains and overlaps give),
    from nothing and from every earlier snapshot to every snapshot and the head: equal sets
    of (object number, exists)
  - image flags: none on either (A's dirty flag is cleared at a clean close); features: equal
  - `rbd object-map check` of A's head (of every snapshot with --long) passes (while the
    images have an object map: a feature operation may have turned it off)
  - `rbd du --format json`: equal provisioned and used sizes, per snapshot and head
  - each data object's length as the OSD has it (`rados stat`) at every snapshot and the
    head: equal (after a burst whose requests shared an object, counted instead: the
    order decides). A zeroing that lengthens an object reads the same but shows here,
    in `rbd du` without fast-diff and in the clones the OSD makes for snapshots (seen:
    the shrink boundary bug of 6d6f54d fails this replay on the binary before it:
    {"order":16,"objects":4,"ops":[["resize",245760],["write",196608,4096,7,false],
    ["close"],["resize",229376],["write",0,4096,8,false],["close"]]})
  - rados-nbd's own read path (DIFF_SERVED_READS=0 leaves it out): A served read-only, the
    head and each snapshot as IMAGE@SNAP, read whole through NBD: B's bytes; and every
    extent its block status calls zero must be zeros in B
and, while A is served, after each operation that changes its maps, chain, size or lock
(READ_AFTER: resize, flatten, snap rm, handover, feature, sparsify, ...), the head read
whole through the writer's connection must be B's, its zero extents zeros in B.

Operations and their twins (tests/diffops.py makes the sequences):
  write            NBD WRITE (FUA sometimes)        librbd write
  trim             NBD TRIM                         librbd discard, rbd_skip_partial_discard=false
                                                    (exact zeroing, like ours; librbd's default
                                                    skips unaligned pieces of a discard)
  zero             NBD WRITE_ZEROES                 librbd write_zeroes
  zero, NO_HOLE    NBD WRITE_ZEROES + NO_HOLE       librbd write of zeros (keeps it allocated)
  flush            NBD FLUSH                        librbd flush
  snap             between serves: snapshot of both through librbd
  livesnap         `rbd snap create` of A while served (asks the lock owner); only with
                   --kinds naming it, while rados-nbd refuses it
  resize           served: `rbd resize` (reaches rados-nbd as the lock owner);
                   not served: `rados-nbd resize`; B: librbd resize
  ro               `serve --read-only` opened while the writer serves; the writer then writes
                   and the reader must read it back
  oob              TRIM past the end: EINVAL
  slowcrash        kill -9, then one reopen with no help (crash blocklists the dead client by
                   hand to be fast): it must wait for the dead watch and serve within 45 s
  takeover         A writes P_1 (acked), is SIGSTOPped with a write P_A of the same place
                   queued in its socket; B opens the image (at
                   once, or once the OSD dropped A's watch), takes the lock over and writes
                   P_B at the same place (acked); A continued: the queued write must fail with
                   EIO and the place read P_B. B then serves the rest. Twin: only P_B
  sparsify         `rbd sparsify` of A (served: reaches rados-nbd as the lock owner)
                                                    librbd sparsify(4096)
                   librbd marks every object left EXISTS, even one unchanged since a
                   snapshot (its own object-map check then wants EXISTS_CLEAN: the check's
                   same-mismatch rule below applies)
  feature          `rbd feature enable|disable` of A's object-map or fast-diff (served: done
                   by the owner; enabling object-map on an image with snapshots closes the
                   serve first, as rados-nbd refuses it while served), or of exclusive-lock
                   (off with the maps off: done by the owner when served, which serves on
                   lock-less; on: by rbd itself). While it is off, rbd resizes, snapshots,
                   sparsifies and rolls back the served image itself and only announces it:
                   the NBD size must follow (polled), snapshots stay exact
                                                    librbd update_features
                   Enabling, librbd leaves the maps flagged invalid for `rbd object-map
                   rebuild`: B's (and A's when librbd did it) are rebuilt at once, head and
                   snapshots, as a user would; rados-nbd builds A's itself. A's features and
                   flags are compared with B's at once
  handover         a librbd client (another process) opens A while it is served and writes
                   P at (off, len): it asks rados-nbd for the lock, which hands it over; the
                   client closes, and rados-nbd's next request takes the lock back (until
                   then `rbd sparsify|feature|resize` find no owner and are done by librbd)
                                                    librbd write of P

Clones (--clone, the run of tests/ceph/run.sh's second differential): each sequence starts with
  parent           A and B become clones (format 2) of twin chains of depth 1 or 2 (or
                   those of DIFF_CLONE_DEPTHS), each level written (the same data on both
                   sides) and snapshotted as "p", with or without deep-flatten, its
                   object size the clone's or, one sequence in two, drawn per level; each
                   clone's stripe unit its object size or, one sequence in two, its
                   parent's where that divides it, as `rbd clone` makes it (striping,
                   count 1: served as the plain layout it is); the
                   chains are compared too (A's must never change). Then the operations above, and from a stream of their own:
  flatten          served: `rbd flatten` (the owner does it); not served: `rados-nbd
                   flatten`                         librbd flatten
  rollback         not served: `rados-nbd snap rollback`
                                                    librbd rollback_to_snap
                   served: `rbd snap rollback` must fail with EROFS (librbd does not ask a
                   live owner for the lock to roll back: rbd-nbd's image refuses it too)
  snaprm           served: `rbd snap rm` (the owner does it); not served: `rados-nbd snap
                   rm`                              librbd remove_snap
  read             (from a stream of its own, after an operation one time in three) NBD
                   READ, then FLUSH                 librbd read, then flush
                   One sequence in two serves A with --copy-on-read and opens B with
                   rbd_clone_copy_on_read (image-meta conf_ override): the objects a read
                   reaches are copied up, data or not, and the flush waits for that
The overlap (head and snapshots) is compared with the twin's as well.

A failing sequence is minimised (greedy delta debugging, bounded in time) and printed with its
geometry as one JSON object; `--replay FILE` (or `--replay-json '...'`) runs it again.

Environment: CEPH_CONF (admin keyring in it), CEPH_NBD_ID/CEPH_NBD_KEYRING (the daemon's
restricted client, optional), RADOS_NBD_BIN, DIFF_SEQS (sequences, default 32: about 4 minutes
when all pass; seeds 7 and 23 mod 32 get a slowcrash and a takeover, see diffops.rare_ops), DIFF_SEED (first seed; default 1000, so the test command is repeatable: seeds 1000..1031 pass; 0 = from the clock, to explore), DIFF_KINDS (operations to
generate, default all but livesnap), DIFF_MINIMISE_S (seconds per minimisation, default 60),
DIFF_MINIMISE_UNTIL_S (no minimisation after this many seconds of the run, default 600),
DIFF_OUT (where failing cases are written, default the run's temporary directory),
DIFF_PREFIX (of the images' names, default "diff"), DIFF_CLONE_DEPTHS (--clone: the chain
depths drawn from, default "1,1,2"; e.g. "2,3,4" for deeper chains), DIFF_DEBUG (print both
diffs and each listed object's `rados listsnaps` when diffs differ). The default mix has the lock-owner
operations too (sparsify, feature, handover: ~20 in a default run, from a random stream of
their own, so the other operations of a seed are what they were before them; see
diffops.OWNER_RATE); DIFF_KINDS naming them draws them by weight instead.
"""

import argparse
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import diffops  # noqa: E402
from diffops import Failure, Server, hang_up, nbd_errno  # noqa: E402

import nbd  # noqa: E402
import rados  # noqa: E402  Debian's python3-rados
import rbd  # noqa: E402  Debian's python3-rbd

POOL = "rbd"
# DIFF_DATA_POOL=POOL: every image of the run (twins and parent chains) keeps its data
# objects in POOL (`rbd create --data-pool`); the daemon's client needs caps on it.
DATA_POOL = os.environ.get("DIFF_DATA_POOL") or None
FEATURES = (rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
            | rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF)
# The clone mode's own operations, drawn from a stream of their own (see clone_case).
CLONE_OPS = ("flatten", "rollback", "snaprm")
# In clone mode, the chance of a read (compared with librbd's, copy-on-read or not) after
# each operation.
READ_RATE = 0.3
# Operations after which the served head is read whole through NBD and compared with B
# (read_while_served): they change the maps, the chain, the size or the lock under it.
READ_AFTER = ("resize", "flatten", "snaprm", "rollback", "handover", "feature", "sparsify",
              "livesnap", "takeover")
CLONE_RATE = 0.1
CLI_TIMEOUT = 120
# How long a reopen may wait for a dead or stopped owner's watch: the OSD drops it after
# osd_client_watch_timeout (15 s on the test cluster), rados-nbd's wait is bounded by 30 s.
TAKEOVER_BOUND_S = 45


def sh(args, check=True):
    return diffops.sh(args, CLI_TIMEOUT, check)


class Env:
    def __init__(self, args):
        self.conf = os.environ["CEPH_CONF"]
        self.bin = diffops.rados_nbd_bin()
        self.rn = [self.bin, "--store", f"ceph:{self.conf}"]
        if os.environ.get("CEPH_NBD_KEYRING"):
            self.rn += ["--id", os.environ.get("CEPH_NBD_ID", "nbd"),
                        "--keyring", os.environ["CEPH_NBD_KEYRING"]]
        self.work = tempfile.mkdtemp(prefix="rados-nbd-diff.")
        self.long = args.long
        # Each comparison also serves A read-only (head and snapshots) and reads it through
        # NBD: rados-nbd's own read path and block status against librbd's bytes.
        self.served_reads = os.environ.get("DIFF_SERVED_READS", "1") != "0"
        self.cluster = rados.Rados(conffile=self.conf)
        # B's twin of an NBD TRIM zeroes exactly what it is told, like rados-nbd does;
        # librbd's default (true) leaves the unaligned parts of a discard as they were.
        self.cluster.conf_set("rbd_skip_partial_discard", "false")
        # Clones of unprotected snapshots (format 2), as `rados-nbd clone` makes by default.
        self.cluster.conf_set("rbd_default_clone_format", "2")
        self.cluster.connect(timeout=30)
        self.ioctx = self.cluster.open_ioctx(POOL)
        # The data objects' pool, read at a snapshot (set_read) to stat objects: its own
        # handle, opened once (object_lengths).
        self.data_ioctx = self.cluster.open_ioctx(DATA_POOL or POOL)
        self.counter = 0
        # Times the object-map check found the same mismatch in A and in librbd's twin.
        self.same_check_mismatch = 0
        # Times librbd's own check rejected its head map where rados-nbd's was right (after
        # a rollback: see _compare).
        self.librbd_wrong_clean = 0
        self.librbd_missed = 0
        self.rollback_optional = 0
        self.burst_du = 0
        self.burst_lengths = 0
        self.bursts = self.burst_requests = 0
        self.served_points = 0

    def close(self):
        # Shut librados down before the interpreter exits: left to the interpreter's teardown,
        # its threads outlive the C++ statics they use and the process dies of
        # "terminate called ... std::system_error: Invalid argument" (SIGABRT) after the last
        # line of a passing run, losing any output still buffered.
        self.data_ioctx.close()
        self.ioctx.close()
        self.cluster.shutdown()


class Run(diffops.Serves):
    """One sequence on a fresh pair of images."""

    def __init__(self, env, geo, label):
        self.env = env
        self.geo = geo
        self.size = geo.size
        env.counter += 1
        base = f"{os.environ.get('DIFF_PREFIX', 'diff')}{os.getpid()}-{env.counter}"
        self.base = base
        self.a, self.b = f"{base}-a", f"{base}-b"
        # The parent chains of a clone run, A's then B's, each from its root (finish()
        # removes them), and the twin pairs of them to compare.
        self.parents = []
        # --copy-on-read on A, rbd_clone_copy_on_read on B (clone mode, drawn per sequence).
        self.cor = False
        self.chain_pairs = []
        self.chain_digests = {}
        self.snap_count = 0
        # snap_count at each rollback done (snapshots s1..sN existed before it).
        self.rollbacks = []
        for name in (self.a, self.b):
            rbd.RBD().create(env.ioctx, name, geo.size, order=geo.order, old_format=False,
                             features=FEATURES, data_pool=DATA_POOL)
        self.bimg = rbd.Image(env.ioctx, self.b)
        self.server = None
        self.h = None
        # Servers besides self.server (a stopped A during a takeover), ended by finish().
        self.others = []
        self.snaps = []
        # object-map and fast-diff on (librbd turns them on and off together).
        self.maps = True
        self.lock = True  # exclusive-lock on (diffops' ["feature", "exclusive-lock", on])
        # A hand-over left the lock free: until A's next request takes it back, librbd (not
        # rados-nbd) does what `rbd` asks of the image, as when it is not served.
        self.owner_away = False
        # A burst left an object whose length depends on the order its requests ran in
        # (diffops.burst_sharing): `rbd du` without fast-diff, which adds up the objects'
        # extents, may then differ from the twin's in used sizes, with the same bytes.
        self.lengths_may_differ = False
        self.serves = 0
        self.log = os.path.join(env.work, f"{base}.serve.log")
        self.label = label

    # ------------------------------------------------------------------ A's server
    def serve_cmd(self, read_only=False):
        return (self.env.rn + ["serve", f"{POOL}/{self.a}"]
                + (["--read-only"] if read_only else [])
                + (["--copy-on-read"] if self.cor and not read_only else []))

    def start(self, bound=None, kind="serve start", sock="a.sock"):
        """Serve A. bound: seconds the open may take (waiting for a dead owner's watch)."""
        s = Server(self.serve_cmd(), os.path.join(self.env.work, sock), self.log)
        t = time.monotonic()
        try:
            ready = s.wait_ready(bound + 15 if bound else 30)
        except Failure as f:
            raise Failure(kind, f.detail)
        if not ready:
            raise Failure(kind, f"exit {s.proc.returncode} after {time.monotonic() - t:.1f} s: "
                          f"{s.tail(1 if bound else 3)}")
        if bound and time.monotonic() - t > bound:
            s.kill()
            raise Failure(f"{kind} late", f"the open took {time.monotonic() - t:.0f} s, "
                          f"more than {bound} s")
        self.server = s
        self.owner_away = False
        self.h = s.connect()
        got = self.h.get_size()
        if got != self.size:
            raise Failure("size", f"NBD size {got}, librbd size {self.size}")

    def watchers(self):
        hdr = f"rbd_header.{self.image_id(self.a)}"
        out = sh(["rados", "-p", POOL, "listwatchers", hdr]).stdout.decode()
        return [w[len("watcher="):] for w in out.split() if w.startswith("watcher=")]

    def blocklist_dead_watchers(self):
        """After a kill -9 our dead client's watch lingers until the OSD times it out (15 s
        on the test cluster), and its lock cannot be broken before: the dead watcher is
        blocklisted, as librbd does when it breaks a lock, and the watch goes at once. The
        reopen then finds a stale lock whose owner's watch is gone, and breaks it."""
        for addr in self.watchers():
            cmd = json.dumps({"prefix": "osd blocklist", "blocklistop": "add", "addr": addr})
            rc, _, err = self.env.cluster.mon_command(cmd, b"", timeout=30)
            if rc != 0:
                raise Failure("blocklist", f"osd blocklist add {addr}: {rc} {err}")
        end = time.monotonic() + 30
        while self.watchers():
            if time.monotonic() > end:
                raise Failure("blocklist", "the dead server's watch is still there 30 s after "
                              "its client was blocklisted")
            time.sleep(0.2)

    def image_id(self, name):
        with rbd.Image(self.env.ioctx, name, read_only=True) as im:
            return im.id()

    def end_serve(self, crash, slow=False):
        if crash:
            self.h = None
            self.server.kill()
            self.server = None
            if slow:
                # One open that must wait for the dead watch itself (bug 5: it was refused).
                self.start(bound=TAKEOVER_BOUND_S, kind="slowcrash: reopen after kill -9")
            else:
                self.blocklist_dead_watchers()
                # Reopen: a crash leaves the dirty flag, the open rebuilds the map; then close.
                self.start()
        self.close_serve()
        self.compare("after crash + reopen + close" if crash else "after close", rebuilt=crash)

    # ------------------------------------------------------------------ operations
    def apply(self, op):
        if op[0] == "read":
            op = diffops.clip(op, self.size)
            if op is None:
                return
            self.ensure_served()
        super().apply(op)
        if (op[0] in READ_AFTER and self.env.served_reads and self.server is not None
                and self.h is not None):
            self.read_while_served(op[0])

    def run_op(self, op):
        k = op[0]
        h, b = self.h, self.bimg
        # Not "oob": a TRIM past the end is refused before it reaches the image, so it
        # takes nothing back.
        if k in ("write", "trim", "zero", "ro") or (
                k == "burst" and any(x[0] != "read" for x in op[1])):
            self.owner_away = False  # the request takes the lock back
        if k in ("write", "trim", "zero"):
            self.twin(op, diffops.send(h, op))
        elif k == "burst":
            self.burst(op[1])
        elif k == "flush":
            if self.h is not None:
                h.flush()
            b.flush()
        elif k == "close":
            if self.server is not None:
                self.end_serve(crash=False)
        elif k == "crash":
            if self.server is not None:
                self.end_serve(crash=True)
        elif k == "slowcrash":
            # Always run: it is rare, and a serve to kill is cheap.
            self.ensure_served()
            self.end_serve(crash=True, slow=True)
        elif k == "takeover":
            op = diffops.clip(op, self.size)
            if op is not None:
                self.ensure_served()
                self.takeover(op)
        elif k == "snap":
            if self.server is not None:
                self.end_serve(crash=False)
            self.snap_count += 1
            name = f"s{self.snap_count}"
            with rbd.Image(self.env.ioctx, self.a) as im:
                im.create_snap(name)
            self.bimg.create_snap(name)
            self.snaps.append(name)
        elif k == "livesnap":
            if self.server is None:
                return self.apply(["snap"])
            self.snap_count += 1
            name = f"s{self.snap_count}"
            # librbd asks the lock owner (rados-nbd) to take the snapshot.
            sh(["rbd", "snap", "create", "--no-progress", f"{POOL}/{self.a}@{name}"])
            self.bimg.create_snap(name)
            self.snaps.append(name)
        elif k == "resize":
            new = op[1]
            if new == self.size:
                return  # `rbd resize` refuses a resize to the same size
            if self.server is not None:
                sh(["rbd", "resize", "--allow-shrink", "--no-progress", "--size", f"{new}B",
                    f"{POOL}/{self.a}"])
                # Clients connected before a resize keep the old size: reconnect. Without
                # exclusive-lock, or with the lock handed over to a writer since gone (rbd
                # took it itself: nobody held it), rbd resized it itself and announced it:
                # followed as the announcement comes, as by librbd's clients (a few tries).
                # Only an owner asked to resize has done it by the time rbd returns.
                by_rbd = not self.lock or self.owner_away
                if not self.reconnect_at(new, 50 if by_rbd else 1):
                    why = (" (lock handed over: done by rbd)" if self.owner_away else
                           " (no exclusive-lock: done by rbd)" if by_rbd else "")
                    raise Failure("resize", f"NBD size {self.h.get_size()} after rbd resize to "
                                  f"{new}{why}")
            else:
                sh(self.env.rn + ["resize", "--allow-shrink", "--size", f"{new}B", f"{POOL}/{self.a}"])
            self.bimg.resize(new)
            self.size = new
        elif k == "ro":
            diffops.read_only_beside(self.serve_cmd(read_only=True),
                                     os.path.join(self.env.work, "ro.sock"), self.log, self.h, op,
                                     self.bimg.write, self.geo.order)
        elif k == "oob":
            self.ensure_served()
            diffops.trim_past_end(self.h, self.size)
        elif k == "sparsify":
            # Served, librbd asks the owner (rados-nbd) to do it; else it does it itself.
            sh(["rbd", "sparsify", "--no-progress", "--sparse-size", "4096", f"{POOL}/{self.a}"])
            self.bimg.sparsify(4096)
        elif k == "feature":
            self.feature(op[1], op[2])
        elif k == "handover":
            self.handover(op)
        elif k == "parent":
            self.make_clones(op[1], op[2], op[3], op[4] if len(op) > 4 else None,
                             len(op) > 5 and op[5], len(op) > 6 and op[6])
        elif k == "flatten":
            self.flatten()
        elif k == "rollback":
            self.rollback(op[1], op[2])
        elif k == "snaprm":
            self.snap_remove(op[1], op[2])
        elif k == "read":
            self.read(op)
        else:
            raise ValueError(f"unknown operation {op}")

    def twin(self, op, data):
        """The I/O operation op (write, trim, zero), done through NBD, done to B: data is
        what a write wrote."""
        k, off, length = op[:3]
        if k == "write":
            self.bimg.write(data, off)
        elif k == "trim":
            self.bimg.discard(off, length)
        elif op[3]:  # zero with NO_HOLE
            self.bimg.write(bytes(length), off)
        else:
            self.bimg.write_zeroes(off, length)

    def burst(self, subs):
        """["burst", subs]: all in flight at once on A's connection (disjoint extents, so in
        any order the same bytes), then done one by one to B; each read must read B's bytes
        there. With copy-on-read the reads are left out: A's background copy-up of the
        object would race the burst's writes there while B's comes after them, which may
        leave the two objects different lengths (see burst_sharing)."""
        if self.cor:
            subs = [x for x in subs if x[0] != "read"]
        got = diffops.send_burst(self.h, subs)
        self.env.bursts += 1
        self.env.burst_requests += len(subs)
        for x, data in zip(subs, got):
            if x[0] != "read":
                self.twin(x, data)
        if diffops.burst_sharing(subs, self.geo.order, holes_only=not self.b_is_clone()):
            # A clone's copy-up leaves out what a write covers when the rest is zeros
            # (librbd's prepare_copyup_data): with two writes into one object the one
            # that ran first decides how long the object is. And a cut of an object's tail
            # before or after a write beside it leaves it another length.
            self.lengths_may_differ = True
        reads = [(x, data) for x, data in zip(subs, got) if x[0] == "read"]
        if not reads:
            return
        with self._open(self.b) as im:
            for (_, off, length), data in reads:
                want = im.read(off, length)
                if data != want:
                    first = next(i for i in range(length) if data[i] != want[i])
                    raise Failure("burst: read", f"{off}+{length} (object "
                                  f"{(off + first) >> self.geo.order}), read with "
                                  f"{len(subs)} requests in flight, differs from librbd's "
                                  f"twin at +{first}")

    # ------------------------------------------------------------------ clones
    def make_clones(self, depth, deep, fill, orders=None, cor=False, inherit=False):
        """A and B become clones of twin chains (see the module's "parent"); orders: each
        level's object size (log2), from the root (default: the sequence's); cor: A served
        with --copy-on-read, B with rbd_clone_copy_on_read (an image-meta config
        override, so every open of B has it); inherit: each clone keeps its parent's
        stripe unit where it divides the clone's object size, as `rbd clone` does without
        --stripe-unit (a clone with larger objects than its parent's is then striped,
        count 1: the plain layout), else its stripe unit is its object size."""
        orders = orders or [self.geo.order] * depth
        unit = None

        def stripe_unit(order):
            nonlocal unit
            if unit is None or not inherit or (1 << order) % unit:
                unit = 1 << order
            return unit
        if self.server is not None or self.snaps:
            raise ValueError("parent must be a sequence's first operation")
        e = self.env
        feats = FEATURES | (rbd.RBD_FEATURE_DEEP_FLATTEN if deep else 0)
        self.bimg.close()
        for name in (self.a, self.b):
            rbd.RBD().remove(e.ioctx, name)
        chains = {}
        for twin in ("a", "b"):
            prev = None
            unit = None
            for level in range(depth):
                name = f"{self.base}-{twin}p{level}"
                if prev is None:
                    rbd.RBD().create(e.ioctx, name, self.size, order=orders[level],
                                     old_format=False, features=feats, data_pool=DATA_POOL)
                    stripe_unit(orders[level])
                else:
                    rbd.RBD().clone(e.ioctx, prev, "p", e.ioctx, name, features=feats,
                                    order=orders[level], stripe_unit=stripe_unit(orders[level]),
                                    stripe_count=1, data_pool=DATA_POOL)
                self.parents.append(name)
                with rbd.Image(e.ioctx, name) as im:
                    for lv, off, length, tag in fill:
                        if lv == level:
                            im.write(diffops.pattern(tag, off, length), off)
                    im.create_snap("p")
                prev = name
            rbd.RBD().clone(e.ioctx, prev, "p", e.ioctx, self.a if twin == "a" else self.b,
                            features=feats, order=self.geo.order,
                            stripe_unit=stripe_unit(self.geo.order), stripe_count=1,
                            data_pool=DATA_POOL)
            chains[twin] = [f"{self.base}-{twin}p{level}" for level in range(depth)]
        self.chain_pairs = list(zip(chains["a"], chains["b"]))
        for name in chains["a"] + chains["b"]:
            with self._open(name, "p") as im:
                self.chain_digests[name] = hashlib.sha256(im.read(0, im.size())).hexdigest()
        self.cor = cor
        if cor:
            with rbd.Image(e.ioctx, self.b) as im:
                im.metadata_set("conf_rbd_clone_copy_on_read", "true")
        self.bimg = rbd.Image(e.ioctx, self.b)

    def read(self, op):
        """["read", off, length]: A read through NBD (with --copy-on-read, the objects it
        reaches copied up in the background) must read B's bytes (librbd read, its own
        copy-on-read); then both flush, which waits for those copy-ups (librbd's flush
        waits for its in-flight ones), so what follows finds them done."""
        _, off, length = op
        got = self.h.pread(length, off)
        want = self.b_read(off, length)
        self.h.flush()
        self.bimg.flush()
        if got != want:
            first = next(i for i in range(length) if got[i] != want[i])
            raise Failure("read", f"{off}+{length} (object {(off + first) >> self.geo.order}) "
                          f"reads through rados-nbd differently from librbd's twin at +{first}")

    def b_read(self, off, length):
        """B's bytes at off, read as A's were just read through NBD: with copy-on-read,
        copying up what A copies up. Without it (or without the lock) a read-only open of
        B, which copies nothing."""
        b = self.bimg
        if self.cor and not self.owner_away:
            # librbd copies on read only as the lock owner (or without exclusive-lock), as
            # A is (it takes the lock at open); B took it at its last write, or takes it now.
            if self.lock and not b.is_exclusive_lock_owner():
                b.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
            return b.read(off, length)
        # A without the lock (another client's since a hand-over) copies nothing.
        with self._open(self.b) as im:
            return im.read(off, length) if length else b""

    def b_is_clone(self):
        try:
            self.bimg.parent_info()
            return True
        except rbd.ImageNotFound:
            return False

    def flatten(self):
        if not self.b_is_clone():
            return  # rbd flatten refuses an image without a parent
        if self.server is not None:
            sh(["rbd", "flatten", "--no-progress", f"{POOL}/{self.a}"])
        else:
            sh(self.env.rn + ["flatten", f"{POOL}/{self.a}"])
        self.bimg.flatten()

    def reconnect_at(self, size, tries):
        """Reconnects (clients connected before a resize keep the old size) until the
        server says `size`, at most `tries` times 0.1 s apart: a change rbd made itself
        and only announced is followed as the announcement comes. Whether it did."""
        for _ in range(tries):
            hang_up(self.h)
            self.h = self.server.connect()
            if self.h.get_size() == size:
                return True
            time.sleep(0.1)
        return False

    def pick_snap(self, k, served):
        """The snapshot a clone operation names (k-th, modulo), None without any; a serve
        that the operation does not want is ended first."""
        if not self.snaps:
            return None
        if self.server is not None and not served:
            self.end_serve(crash=False)
        return self.snaps[k % len(self.snaps)]

    def rollback(self, k, served):
        snap = self.pick_snap(k, served)
        if snap is None:
            return
        if self.server is not None and (not self.lock or self.owner_away):
            # No exclusive-lock, no owner: rbd rolls the served image back itself, under
            # us, as under a librbd client (which follows the size and overlap it announces).
            # The same when rados-nbd handed the lock over and has not taken it back: rbd
            # finds it free and takes it (our next request takes it back, adopting what
            # the rollback left).
            sh(["rbd", "snap", "rollback", "--no-progress", f"{POOL}/{self.a}@{snap}"])
            self.bimg.rollback_to_snap(snap)
            self.rollbacks.append(self.snap_count)
            new = self.bimg.size()
            if new != self.size and not self.reconnect_at(new, 50):
                why = "lock handed over" if self.lock else "no exclusive-lock"
                raise Failure("rollback served", f"NBD size {self.h.get_size()} after rbd "
                              f"snap rollback ({why}) to a {new}-byte snapshot")
            self.size = new
            return
        if self.server is not None:
            # librbd rolls back only with the lock, and does not ask a live owner for it
            # (prepare_image_update without a lock request): refused, as for an image
            # rbd-nbd serves, and nothing changes.
            r = sh(["rbd", "snap", "rollback", "--no-progress", f"{POOL}/{self.a}@{snap}"],
                   check=False)
            err = (r.stdout + r.stderr).decode(errors="replace")
            if r.returncode == 0 or "Read-only file system" not in err:
                raise Failure("rollback served", f"rbd snap rollback of the served image: "
                              f"exit {r.returncode}, expected EROFS as librbd's owner gets: "
                              f"{err.strip()[-300:]}")
            return
        sh(self.env.rn + ["snap", "rollback", f"{POOL}/{self.a}@{snap}"])
        self.bimg.rollback_to_snap(snap)
        self.rollbacks.append(self.snap_count)
        self.size = self.bimg.size()

    def snap_remove(self, k, served):
        snap = self.pick_snap(k, served)
        if snap is None:
            return
        if self.server is not None:
            sh(["rbd", "snap", "rm", "--no-progress", f"{POOL}/{self.a}@{snap}"])
        else:
            sh(self.env.rn + ["snap", "rm", f"{POOL}/{self.a}@{snap}"])
        self.bimg.remove_snap(snap)
        self.snaps.remove(snap)

    def takeover(self, op):
        """Two writers after a lock takeover (bug 3): nothing the stopped owner had queued may
        land over the new owner's acknowledged write."""
        _, off, length, tag_1, tag_a, tag_b, early = op
        a, ha = self.server, self.h
        p_a, p_b = diffops.pattern(tag_a, off, length), diffops.pattern(tag_b, off, length)
        # P_1 first, acked: the objects are in A's map, so the queued write needs no map
        # update (the OSD refuses one from a client that lost the lock, which would hide
        # the bug): nothing but fencing keeps it from landing.
        p_1 = diffops.pattern(tag_1, off, length)
        ha.pwrite(p_1, off)
        self.bimg.write(p_1, off)
        a_watch = self.watchers()
        # A stays listed until it exited: finish() continues and ends it if this fails.
        self.others.append(a)
        a.proc.send_signal(signal.SIGSTOP)
        try:
            # kill() returns before every thread has stopped: the write must find A stopped.
            end = time.monotonic() + 10
            while not stopped(a.proc.pid):
                if time.monotonic() > end:
                    raise Failure("takeover: SIGSTOP", "A's threads still run 10 s after it")
                time.sleep(0.01)
            cookie = ha.aio_pwrite(p_a, off)
            ha.poll(0)  # into A's socket now
            if not early:
                # The sequence: B opens only after the OSD dropped A's watch.
                end = time.monotonic() + TAKEOVER_BOUND_S
                while set(a_watch) & set(self.watchers()):
                    if time.monotonic() > end:
                        raise Failure("takeover: A's watch", f"stopped A's watch {a_watch} is "
                                      f"still there after {TAKEOVER_BOUND_S} s")
                    time.sleep(0.2)
            # Else B must wait for A's watch itself, then fence A and break its lock.
            self.server, self.h = None, None
            self.start(bound=TAKEOVER_BOUND_S, kind="takeover: B opens", sock="b.sock")
            self.h.pwrite(p_b, off, nbd.CMD_FLAG_FUA)
            self.bimg.write(p_b, off)
        finally:
            a.proc.send_signal(signal.SIGCONT)
        result = None
        end = time.monotonic() + 60
        while result is None:
            try:
                if ha.aio_command_completed(cookie):
                    result = "acked"
            except nbd.Error as e:
                result = nbd_errno(e) or str(e)
            if result is None:
                if time.monotonic() > end:
                    result = "no answer in 60 s"
                else:
                    ha.poll(500)
        got = self.h.pread(length, off)
        if got != p_b:
            landed = got == p_a
            raise Failure("takeover: P_A landed over P_B" if landed else "takeover: X != P_B",
                          f"{off}+{length} (object {off >> self.geo.order}) reads "
                          f"{'P_A, the write queued in the stopped owner' if landed else 'neither P_B nor P_A'}"
                          f" after B's acked write of P_B (A's queued write: {result})")
        if result != "EIO":
            raise Failure("takeover: A's queued write not EIO",
                          f"the write queued in stopped A ended: {result}, not EIO")
        hang_up(ha)
        # A is fenced: its close cannot write; how it exits is fencing.sh's business.
        a.stop(30)
        self.others.remove(a)
        # Its blocklist entry is of no use any more (the cluster may serve many runs).
        for addr in a_watch:
            cmd = json.dumps({"prefix": "osd blocklist", "blocklistop": "rm", "addr": addr})
            self.env.cluster.mon_command(cmd, b"", timeout=30)

    def feature(self, name, on):
        """`rbd feature enable|disable A name` (done by the owner when served), librbd's
        update_features on B; A's features and flags then compared with B's."""
        if name == "exclusive-lock":
            return self.lock_feature(on)
        if on == self.maps or (on and not self.lock):
            # librbd refuses a change that changes nothing ("already enabled"), and the maps
            # without exclusive-lock: a no-op, so that a minimised sequence that lost the
            # change before stays valid.
            return
        if on and self.snaps and self.server is not None and not self.owner_away:
            # rados-nbd refuses to build the snapshots' maps while served (EBUSY, README):
            # the image is closed first, as a user would.
            self.end_serve(crash=False)
        bit = rbd.RBD_FEATURE_OBJECT_MAP if name == "object-map" else rbd.RBD_FEATURE_FAST_DIFF
        sh(["rbd", "feature", "enable" if on else "disable", f"{POOL}/{self.a}", name])
        self.bimg.update_features(bit, on)
        self.maps = on
        if on:
            # librbd leaves the maps it made flagged invalid until rebuilt; rados-nbd, the
            # owner, builds A's itself.
            self.bimg.rebuild_object_map()
            if self.server is None or self.owner_away:
                # librbd did A's too.
                sh(["rbd", "object-map", "rebuild", "--no-progress", f"{POOL}/{self.a}"])
            # (Snapshots: rados-nbd did not do it, see above.)
            for snap in self.snaps:
                for img in (self.a, self.b):
                    sh(["rbd", "object-map", "rebuild", "--no-progress", f"{POOL}/{img}@{snap}"])
        self.same_features(name, on)

    def lock_feature(self, on):
        """`rbd feature enable|disable A exclusive-lock`: off (the maps off first, as librbd
        insists), the owner does it when served (rados-nbd serves on lock-less), else rbd;
        on, always rbd itself (an image without it has no owner). librbd's update_features
        on B (its owner, this process)."""
        if on == self.lock or (not on and self.maps):
            return
        sh(["rbd", "feature", "enable" if on else "disable", f"{POOL}/{self.a}",
            "exclusive-lock"])
        self.bimg.update_features(rbd.RBD_FEATURE_EXCLUSIVE_LOCK, on)
        self.lock = on
        self.same_features("exclusive-lock", on)

    def same_features(self, name, on):
        with self._open(self.a) as im:
            got = (im.features(), im.flags())
        want = (self.bimg.features(), self.bimg.flags())
        if got != want:
            raise Failure("feature", f"after rbd feature {'enable' if on else 'disable'} "
                          f"{name}{' (served)' if self.server else ''}"
                          f"{' (lock handed over)' if self.owner_away else ''}: rados-nbd image "
                          f"features {got[0]:#x} flags {got[1]:#x}, librbd's twin features "
                          f"{want[0]:#x} flags {want[1]:#x}")

    def handover(self, op):
        """A librbd client in another process writes A while rados-nbd serves it: the lock is
        handed over and back (librbd's RequestLock)."""
        _, off, length, tag = op
        data = diffops.pattern(tag, off, length)
        try:
            r = subprocess.run([sys.executable, "-c", HANDOVER_WRITER, self.env.conf, POOL,
                                self.a, str(off)], input=data, capture_output=True,
                               timeout=CLI_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise Failure("handover", f"the librbd writer of {off}+{length} had no answer "
                          f"in {CLI_TIMEOUT} s (lock not handed over?)")
        if r.returncode != 0:
            err = [ln for ln in r.stderr.decode(errors="replace").splitlines() if ln.strip()]
            raise Failure("handover", f"the librbd writer of {off}+{length} exited "
                          f"{r.returncode}: {' | '.join(err)[-600:]}")
        self.bimg.write(data, off)
        # Without exclusive-lock it simply wrote beside us: nothing was handed over.
        self.owner_away = self.lock

    # ------------------------------------------------------------------ comparison
    def compare(self, where, rebuilt=False):
        e = self.env
        self.bimg.close()
        try:
            if rebuilt and self.maps:
                # A's map was rebuilt from the objects by the reopen after the crash; compare
                # it with librbd's own rebuild of B's, like with like. (librbd's in-memory
                # map and the OSD's objects can disagree on one state: see object_map_check.)
                sh(["rbd", "object-map", "rebuild", "--no-progress", f"{POOL}/{self.b}"])
            self._compare(where)
        finally:
            self.bimg = rbd.Image(e.ioctx, self.b)

    def object_map_check(self, spec):
        """rbd object-map check of spec: (ok, mismatches as (object number, marked, should be),
        text). It exits 0 even when it finds the map wrong: it logs "object map error" and
        flags the map invalid, so both are looked at."""
        r = sh(["rbd", "object-map", "check", "--no-progress", spec], check=False)
        name, _, snap = spec.partition("/")[2].partition("@")
        with self._open(name, snap or None) as im:
            flags = im.flags()
        text = (r.stdout + r.stderr).decode(errors="replace")
        bad = sorted((int(o, 16), int(m), int(b)) for o, m, b in re.findall(
            r"object map error: object rbd_data\.(?:[0-9a-f]+\.)+?([0-9a-f]{16}) marked as (\d+), "
            r"but should be (\d+)", text))
        ok = r.returncode == 0 and flags == 0 and "object map error" not in text
        return ok, bad, f"exit {r.returncode}, flags after it {flags:#x}: {text.strip()[-300:]}"

    def _open(self, name, snap=None):
        return rbd.Image(self.env.ioctx, name, snapshot=snap, read_only=True)

    def rolled_back_between(self, frm, snap):
        """Whether a rollback happened after snapshot `frm` and before point `snap`
        (None: the head). Never for a diff from nothing: that lists what exists, which a
        rollback leaves the same on both twins."""
        if frm is None:
            return False
        k = int(frm[1:])
        n = int(snap[1:]) if snap else float("inf")
        return any(k <= c < n for c in self.rollbacks)

    def b_changed_objects(self, frm, snap):
        """The objects whose bytes differ in the librbd twin between snapshot `frm` and
        point `snap` (None: the head)."""
        osize = 1 << self.geo.order
        with self._open(self.b, frm) as old, self._open(self.b, snap) as new:
            sizes = (old.size(), new.size())
            out = []
            for o in range((max(sizes) + osize - 1) // osize):
                got = []
                for im, size in zip((old, new), sizes):
                    off = o * osize
                    n = max(0, min(off + osize, size) - off)
                    got.append((im.read(off, n) if n else b"").ljust(osize, b"\0"))
                if got[0] != got[1]:
                    out.append(o)
            return out

    def b_unchanged(self, frm, snap, objs):
        """Which of `objs` ((object, exists) pairs) read the same in the librbd twin at
        snapshot `frm` (None: nothing) and at `snap` (None: the head)."""
        osize = 1 << self.geo.order

        def obj(im, o):
            off, size = o << self.geo.order, im.size()
            n = max(0, min(off + osize, size) - off)
            return (im.read(off, n) if n else b"").ljust(osize, b"\0")

        with self._open(self.b, snap) as new:
            if frm is None:
                return [o for o, _ in objs if obj(new, o) == bytes(osize)]
            with self._open(self.b, frm) as old:
                return [o for o, _ in objs if obj(old, o) == obj(new, o)]

    def nbd_read_all(self, h, size, what):
        """All of an export through the NBD handle h: (bytes, the extents its block status
        (base:allocation) calls zero)."""
        chunk = 4 << 20
        got = b"".join(h.pread(min(chunk, size - off), off) for off in range(0, size, chunk))
        zeros = []
        off = 0
        while off < size:
            ext = []
            h.block_status(min(chunk, size - off), off,
                           lambda ctx, o, entries, err: ext.extend(entries)
                           if ctx == nbd.CONTEXT_BASE_ALLOCATION else None)
            if not ext:
                raise Failure("served block status", f"{what}: no base:allocation extent "
                              f"at {off}")
            for i in range(0, len(ext), 2):
                n, flags = ext[i], ext[i + 1]
                if flags & 2:
                    zeros.append((off, min(n, size - off)))
                off += n
        self.env.served_points += 1
        return got, zeros

    def check_read(self, what, got, zeros, want):
        """got (read through rados-nbd) must be want (librbd's twin), and every extent of
        zeros (its block status's zero ones) zeros in want."""
        if len(got) != len(want):
            raise Failure("served size", f"{what}: served with NBD size {len(got)}, librbd's "
                          f"twin {len(want)}")
        if got != want:
            first = next(i for i in range(len(got)) if got[i] != want[i])
            raise Failure("served read", f"{what}: read through rados-nbd differs from "
                          f"librbd's twin at {first} (object {first >> self.geo.order}): "
                          f"{'zeros' if not any(got[first:first + 512]) else 'data'} where "
                          f"librbd reads {'zeros' if not any(want[first:first + 512]) else 'data'}")
        for zo, zn in zeros:
            if any(want[zo:zo + zn]):
                first = zo + next(i for i in range(zn) if want[zo + i])
                raise Failure("served block status", f"{what}: block status calls {zo}+{zn} "
                              f"zero, librbd's twin has data at {first} (object "
                              f"{first >> self.geo.order})")

    def served_reads(self, where, points):
        """rados-nbd's own read path, with librbd as the oracle: A served read-only (the
        head, and each snapshot as IMAGE@SNAP: the object maps of the image and of every
        ancestor at its snapshot, the overlaps) must read through NBD exactly B's bytes, and
        every extent its block status calls zero must be zeros in B (nbdcopy and qemu-img
        convert skip those: a wrong answer there loses data silently)."""
        for snap in points:
            at = f"@{snap}" if snap else ""
            what = f"{where}: {at or 'head'} served read-only"
            srv = diffops.serving(self.env.rn + ["serve", f"{POOL}/{self.a}{at}", "--read-only"],
                                  os.path.join(self.env.work, "reads.sock"), self.log,
                                  f"served read of {at or 'the head'} start")
            try:
                h = srv.connect()
                got, zeros = self.nbd_read_all(h, h.get_size(), what)
                hang_up(h)
            finally:
                rc = srv.stop()
            if rc != 0:
                raise Failure("served read close", f"{what}: exited {rc}: {srv.tail()}")
            with self._open(self.b, snap) as im:
                want = im.read(0, im.size()) if im.size() else b""
            self.check_read(what, got, zeros, want)

    def read_while_served(self, after):
        """The served head read whole through the writer's own connection, right after an
        operation that changes more than bytes (the in-memory maps, the chain, the lock),
        against B. A size the client was not told yet (a resize announced to the kernel
        only) is left to the reconnect that follows it."""
        size = min(self.h.get_size(), self.bimg.size())
        got, zeros = self.nbd_read_all(self.h, size, f"served head after {after}")
        want = self.b_read(0, size)
        # With copy-on-read both copied up what they read: done before what follows.
        self.h.flush()
        self.bimg.flush()
        self.check_read(f"served head after {after}", got, zeros, want)

    def object_lengths(self, name, points):
        """{point: (length of each of the image's own data objects or None where it has
        none)} as the OSD has them at each snapshot and the head: what `rados stat` shows,
        and what `rbd du` without fast-diff and `rbd diff` without whole-object count."""
        io = self.env.data_ioctx
        out = {}
        with self._open(name) as im:
            pref = im.block_name_prefix()
            ids = {s["name"]: s["id"] for s in im.list_snaps()}
        for snap in points:
            with self._open(name, snap) as im:
                n = -(-im.size() // self.geo.obj)
            io.set_read(ids[snap] if snap else rados.LIBRADOS_SNAP_HEAD)
            lengths = []
            for o in range(n):
                try:
                    lengths.append(io.stat(f"{pref}.{o:016x}")[0])
                except rados.ObjectNotFound:
                    lengths.append(None)
            out[snap] = lengths
        io.set_read(rados.LIBRADOS_SNAP_HEAD)
        return out

    def compare_lengths(self, where, points):
        """Each data object's length at each point, against the twin's: a zeroing that
        lengthens an object, or a truncate where librbd punches, reads the same but shows
        in `rados stat`, in `rbd du` without fast-diff and in the clones the OSD makes for
        snapshots (what `rbd diff --from-snap` then lists). Concurrent overlapping requests
        (bursts) may leave either length: then they are counted, not compared."""
        la = self.object_lengths(self.a, points)
        lb = self.object_lengths(self.b, points)
        if os.environ.get("DIFF_DEBUG"):
            print(f"DEBUG {where} lengths: ours {la} librbd {lb}", flush=True)
        for snap in points:
            if la[snap] == lb[snap]:
                continue
            if self.lengths_may_differ:
                self.env.burst_lengths += 1
                return
            at = f"@{snap}" if snap else " head"
            odd = [(o, x, y) for o, (x, y) in enumerate(zip(la[snap], lb[snap])) if x != y]
            raise Failure("object lengths", f"{where}: data objects{at} (object, rados-nbd's "
                          f"length, librbd's): {odd}")

    def _compare(self, where, retried=False):
        e = self.env
        points = self.snaps + [None]
        state = {}
        for name in (self.a, self.b):
            per = {}
            for snap in points:
                with self._open(name, snap) as im:
                    size = im.size()
                    flags = im.flags()
                    features = im.features()
                    digest = hashlib.sha256(im.read(0, size)).hexdigest() if size else ""
                    try:
                        overlap = im.overlap()
                    except rbd.Error:
                        overlap = None
                    diffs = {}
                    for frm in [None] + self.snaps[:points.index(snap)]:
                        objs = []
                        # The image's own objects (rbd du's view): with the parent's
                        # (rbd diff's default), an object one twin copied up and the
                        # other did not is listed by both. The parents' part follows from
                        # the chains and overlaps, compared below.
                        im.diff_iterate(0, size, frm,
                                        lambda o, n, ex: objs.append((o >> self.geo.order, ex)),
                                        include_parent=False, whole_object=True)
                        diffs[frm] = sorted(objs)
                per[snap] = (size, flags, digest, diffs, features, overlap)
            state[name] = per
        for snap in points:
            at = f"@{snap}" if snap else " head"
            sa, sb = state[self.a][snap], state[self.b][snap]
            if sa[1] != 0 or sb[1] != 0:
                raise Failure("flags", f"{where}: flags{at}: rados-nbd image {sa[1]:#x}, "
                              f"librbd image {sb[1]:#x}")
            if sa[4] != sb[4]:
                raise Failure("features", f"{where}: features{at}: rados-nbd image "
                              f"{sa[4]:#x}, librbd image {sb[4]:#x}")
            if sa[0] != sb[0]:
                raise Failure("size", f"{where}: size{at}: {sa[0]} vs librbd {sb[0]}")
            if sa[2] != sb[2]:
                raise Failure("export", f"{where}: rbd export{at} differs")
            if sa[5] != sb[5]:
                raise Failure("overlap", f"{where}: parent overlap{at}: {sa[5]} vs librbd {sb[5]}")
            for frm in sa[3]:
                if sa[3][frm] != sb[3][frm]:
                    only_a = sorted(set(sa[3][frm]) - set(sb[3][frm]))
                    only_b = sorted(set(sb[3][frm]) - set(sa[3][frm]))
                    if os.environ.get("DIFF_DEBUG"):
                        print(f"DEBUG {where} {frm}{at}: ours {sa[3][frm]} librbd {sb[3][frm]}", flush=True)
                        for nm in (self.a, self.b):
                            with rbd.Image(e.ioctx, nm, read_only=True) as dim:
                                pref = dim.block_name_prefix()
                                print(f"DEBUG {nm} snaps {[(x['id'], x['name']) for x in dim.list_snaps()]}", flush=True)
                            for o in sorted({o for o, _ in sa[3][frm]}):
                                r = subprocess.run(["rados", "-p", DATA_POOL or POOL, "listsnaps", f"{pref}.{o:016x}"], capture_output=True, text=True)
                                print(f"DEBUG {nm} obj {o}: {r.stdout.strip()} {r.stderr.strip()}", flush=True)
                    if snap is None and only_a and not only_b and not retried:
                        # librbd's rollback copies the snapshot's map over the head's,
                        # EXISTS_CLEAN entries included, though the OSD's rollback counts
                        # as a write: its own check then wants EXISTS where rados-nbd
                        # says EXISTS. If the twin's check rejects exactly so, librbd's map
                        # is the wrong one: rebuilt, as a user would, and compared again.
                        ok_b, bad_b, _ = self.object_map_check(f"{POOL}/{self.b}")
                        wrong_clean = {o for o, m, b in bad_b if (m, b) == (3, 1)}
                        if not ok_b and {o for o, _ in only_a} <= wrong_clean:
                            e.librbd_wrong_clean += 1
                            sh(["rbd", "object-map", "rebuild", "--no-progress",
                                f"{POOL}/{self.b}"])
                            return self._compare(where, retried=True)
                    # What the twin's bytes say of each object listed by one side only:
                    # one whose bytes differ between the two points must be listed; one
                    # whose bytes are the same may be (it was written, or a map is
                    # conservative). A rollback makes librbd's map a copy of the old
                    # snapshot's (EXISTS_CLEAN entries included) while the OSD counts
                    # each object librbd rolled back as written: after one, the two
                    # sides may differ on objects whose bytes did not change, and
                    # librbd's diff misses objects that did (seen: `rbd export-diff`
                    # from the newest snapshot before the rollback would miss them).
                    same_a = self.b_unchanged(frm, snap, only_a) if only_a else []
                    same_b = self.b_unchanged(frm, snap, only_b) if only_b else []
                    we_missed = [x for x in only_b if x[0] not in same_b]
                    librbd_missed = [x for x in only_a if x[0] not in same_a]
                    optional = same_a + same_b
                    if not we_missed and self.rolled_back_between(frm, snap):
                        # librbd is no oracle for these objects here: every object whose
                        # bytes changed must be in our list, whatever librbd's says.
                        ours = {o for o, _ in sa[3][frm]}
                        unlisted = [o for o in self.b_changed_objects(frm, snap) if o not in ours]
                        if unlisted:
                            raise Failure(f"diff --from-snap {where}: rados-nbd misses a change",
                                          f"{where}: rbd diff --whole-object --from-snap {frm}{at}: "
                                          f"objects {unlisted} changed (the bytes say) but are not listed")
                        e.librbd_missed += bool(librbd_missed)
                        e.rollback_optional += bool(optional)
                        continue
                    # The kind tells apart a map that lost a change from one that
                    # invented one, after a close or after a crash: different bugs.
                    side = ("rados-nbd lists more" if only_a and not only_b else
                            "librbd lists more" if only_b and not only_a else "both differ")
                    raise Failure(f"diff{' --from-snap' if frm else ''} {where}: {side}",
                                  f"{where}: rbd diff --whole-object"
                                  f"{' --from-snap ' + frm if frm else ''}{at}: "
                                  f"(object, exists) only from rados-nbd {only_a}, only from librbd {only_b}"
                                  + (f" (the same bytes at both points: {optional})" if optional else ""))
        self.compare_lengths(where, points)
        if e.served_reads:
            self.served_reads(where, points)
        for name, want in self.chain_digests.items():
            with self._open(name, "p") as im:
                if hashlib.sha256(im.read(0, im.size())).hexdigest() != want:
                    raise Failure("parent changed", f"{where}: {name}@p is not what it was")
        # Without an object map there is none to check (the bytes, diffs and flags are).
        checks = [f"{POOL}/{self.a}"] if self.maps else []
        if e.long and self.maps:
            checks += [f"{POOL}/{self.a}@{s}" for s in self.snaps]
        for spec in checks:
            ok, bad, text = self.object_map_check(spec)
            if ok:
                continue
            # The check can disagree with librbd's own map: a partial discard of an
            # EXISTS_CLEAN object wholly past its data end is marked EXISTS by librbd (and by
            # us), but the OSD has nothing to cut, makes no clone, and the check says
            # EXISTS_CLEAN; so does every object that a sparsify left with nothing cut.
            # What counts is being no different from librbd: the twin's check must find the
            # same mismatches. Both maps are then rebuilt, as a user would.
            twin = spec.replace(f"/{self.a}", f"/{self.b}")
            ok_b, bad_b, text_b = self.object_map_check(twin)
            if not bad or bad != bad_b:
                raise Failure("object-map check", f"{where}: rbd object-map check {spec}: "
                              f"{text}; librbd's twin: {text_b}")
            e.same_check_mismatch += 1
            for s in (spec, twin):
                sh(["rbd", "object-map", "rebuild", "--no-progress", s])
        du = {}
        # The two `rbd du` at once: each is mostly waiting (process start, cluster connection,
        # the OSD), and a run compares a hundred times.
        with ThreadPoolExecutor(2) as pool:
            runs = pool.map(lambda name: sh(["rbd", "du", "--format", "json", f"{POOL}/{name}"]),
                            (self.a, self.b))
            for name, r in zip((self.a, self.b), list(runs)):
                out = json.loads(r.stdout)
                du[name] = [(i.get("snapshot"), i["provisioned_size"], i["used_size"])
                            for i in out["images"]]
        if du[self.a] != du[self.b]:
            # Used sizes may differ where the diffs above could (after a rollback since the
            # snapshot before: objects whose bytes did not change), and only where they
            # are counted from the maps (fast-diff): without it `rbd du` adds up the
            # objects' real extents, which a rollback leaves alike on both twins.
            with self._open(self.a) as im:
                fast = im.features() & rbd.RBD_FEATURE_FAST_DIFF
            same_names = [x[:2] for x in du[self.a]] == [x[:2] for x in du[self.b]]
            if not fast and same_names and self.lengths_may_differ:
                e.burst_du += 1
                return
            ok = bool(fast) and same_names
            for i, (ea, eb) in enumerate(zip(du[self.a], du[self.b])):
                prev = du[self.a][i - 1][0] if i else None
                if ea != eb and not self.rolled_back_between(prev, ea[0]):
                    ok = False
            if not ok:
                raise Failure("du", f"{where}: rbd du: rados-nbd {du[self.a]}, librbd {du[self.b]}")
            e.rollback_optional += 1

    def finish(self):
        """Ends whatever runs and removes both images (and their snapshots)."""
        hang_up(self.h)
        for s in self.others:
            # SIGTERM, for the same reason as below.
            s.proc.send_signal(signal.SIGCONT)
            try:
                s.stop(30)
            except Failure:
                pass
        if self.server is not None:
            # SIGTERM, not kill -9: a dead server's watch would hold up the removal (librbd
            # refuses to remove an image with watchers) until the OSD times it out.
            try:
                self.server.stop(30)
            except Failure:
                try:
                    self.blocklist_dead_watchers()
                except Failure as f:
                    print(f"note: {f}", file=sys.stderr)
            self.server = None
        try:
            self.bimg.close()
        except rbd.Error:
            pass
        for name in (self.a, self.b):
            try:
                with rbd.Image(self.env.ioctx, name) as im:
                    for s in im.list_snaps():
                        im.remove_snap(s["name"])
                rbd.RBD().remove(self.env.ioctx, name)
            except rbd.Error as ex:
                print(f"note: could not remove {name}: {ex}", file=sys.stderr)
        for name in reversed(self.parents):
            try:
                with rbd.Image(self.env.ioctx, name) as im:
                    for s in im.list_snaps():
                        im.remove_snap(s["name"])
                rbd.RBD().remove(self.env.ioctx, name)
            except rbd.Error as ex:
                print(f"note: could not remove {name}: {ex}", file=sys.stderr)


def stopped(pid):
    """Every thread of pid is stopped (state T)."""
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "T":
                    return False
        except FileNotFoundError:
            pass
    return True


TIMES = {}

# The librbd client of a hand-over (another process, as a user's would be): writes its
# standard input at the offset given, through librbd, then closes.
HANDOVER_WRITER = """
import sys, rados, rbd
conf, pool, image, off = sys.argv[1:5]
data = sys.stdin.buffer.read()
c = rados.Rados(conffile=conf)
c.connect(timeout=30)
try:
    io = c.open_ioctx(pool)
    with rbd.Image(io, image) as im:
        im.write(data, int(off))
    io.close()
finally:
    c.shutdown()
"""


def run_sequence(env, geo, ops, label):
    """None when the sequence passes, else the Failure (with the index of the operation)."""
    return diffops.drive(Run(env, geo, label), ops, (nbd.Error, rbd.Error, rados.Error), TIMES)


KNOWN = [
    # (failure kind, operations present, hint)
    ("diff --from-snap after close: librbd lists more", {"snap", "trim"},
     "bug 1? partial TRIM of an EXISTS_CLEAN object left EXISTS_CLEAN"),
    ("diff --from-snap after close: librbd lists more", {"snap", "zero"},
     "bug 1? partial WRITE_ZEROES of an EXISTS_CLEAN object left EXISTS_CLEAN"),
    ("ro read", {"ro"}, "bug 2? serve --read-only reads zeros for objects created after it opened"),
    ("oob trim", {"oob"}, "TRIM past the end must be EINVAL"),
]


def hint(f, ops):
    kinds = {o[0] for o in ops}
    if "crash" in kinds and "snap" in kinds and (
            f.kind.startswith("diff --from-snap after crash")
            or f.kind in ("object-map check", "du")):
        return "bug 4? the map rebuilt after a crash with snapshots marks unchanged objects EXISTS"
    if "rados-nbd" in f.detail and ": exit -11:" in f.detail:
        return ("rados-nbd died of SIGSEGV: seen in `rados-nbd resize` of an image nobody serves, "
                "after its work, while the runtime shuts down (a librados messenger thread)")
    if f.kind.startswith("slowcrash: reopen after kill -9"):
        return ("bug 5? the reopen after kill -9 was refused (\"retry later\") or took too long "
                "instead of waiting, bounded, for the dead owner's watch to expire")
    if f.kind.startswith("takeover: B opens"):
        return "bug 5? the new owner was refused while the stopped owner's watch lingered"
    if f.kind in ("takeover: P_A landed over P_B", "takeover: X != P_B",
                  "takeover: A's queued write not EIO"):
        return ("bug 3? the lock was broken without fencing (blocklisting) the stopped owner "
                "first: its queued write landed over the new owner's acknowledged one")
    if "livesnap" in kinds and "snap create" in f.detail:
        return "rbd snap create while served: refused until rados-nbd answers as the lock owner"
    if "snap" in kinds and f.kind == "diff after crash + reopen + close: rados-nbd lists more":
        return ("bug 4b? the map rebuilt after a crash lists an object whose head was removed "
                "after a snapshot (only its clone is left) as existing")
    for kind, need, text in KNOWN:
        if f.kind == kind and need <= kinds:
            return text
    return "not a known bug: investigate"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=int(os.environ.get("DIFF_SEQS", "32")))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("DIFF_SEED", "1000")) or None)
    ap.add_argument("--ops", type=int, default=0, help="operations per sequence (default 8..24)")
    ap.add_argument("--long", action="store_true", help="bench-style: 500 sequences, longer ones, "
                    "object-map check of every snapshot")
    ap.add_argument("--replay", help="a JSON case printed by a failure")
    ap.add_argument("--replay-json", help="the same, inline")
    ap.add_argument("--no-minimise", action="store_true")
    ap.add_argument("--clone", action="store_true",
                    help="clone sequences (see the module's \"parent\"); DIFF_CLONE_SEQS "
                    "sequences (default 8) unless --seqs")
    ap.add_argument("--kinds", default=os.environ.get("DIFF_KINDS", ""),
                    help="comma-separated operation kinds to generate (default all)")
    args = ap.parse_args()
    env = Env(args)
    try:
        rc = run(args, env)
    finally:
        sys.stdout.flush()
        env.close()
    sys.exit(rc)


def clone_case(seed, geo, ops):
    """A clone run of a sequence: the parent operation first (chains of depth 1 or 2, or
    those of DIFF_CLONE_DEPTHS, each level with data in about half of its objects,
    deep-flatten three times in four), then the sequence with the clone operations
    inserted from a stream of their own."""
    rng = random.Random(f"clone-ops {seed}")
    # DIFF_CLONE_DEPTHS: the depths drawn from (default "1,1,2": depth 2 one time in three).
    depths = [int(d) for d in os.environ.get("DIFF_CLONE_DEPTHS", "1,1,2").split(",") if d]
    depth = rng.choice(depths)
    deep = rng.random() < 0.75
    fill = []
    tag = 1 << 20
    for level in range(depth):
        for o in range(geo.size // geo.obj):
            if rng.random() < 0.5:
                tag += 1
                a = rng.randrange(geo.obj // diffops.SECTOR) * diffops.SECTOR
                b = rng.randrange(a // diffops.SECTOR + 1, geo.obj // diffops.SECTOR + 1) * diffops.SECTOR
                fill.append([level, o * geo.obj + a, b - a, tag])
    # The ancestors' object sizes: the sequence's one time in two, otherwise each level's
    # drawn around it (a child object then covers parts of several parent objects, or a
    # parent object several child ones). From a stream of its own, so that a seed's other
    # operations stay what they were before sizes were drawn.
    orng = random.Random(f"clone-orders {seed}")
    orders = [geo.order] * depth
    if orng.random() < 0.5:
        orders = [orng.randint(max(12, geo.order - 2), min(25, geo.order + 2))
                  for _ in range(depth)]
    # Copy-on-read one sequence in two, and reads through NBD compared with librbd's,
    # from a stream of their own too.
    crng = random.Random(f"clone-cor {seed}")
    cor = crng.random() < 0.5
    # Stripe units inherited as `rbd clone` does one sequence in two (from a stream of
    # its own): then a clone with larger objects than its parent's is striped (count 1).
    inherit = random.Random(f"clone-stripes {seed}").random() < 0.5
    out = [["parent", depth, deep, fill, orders, cor, inherit]]
    for op in ops:
        if rng.random() < CLONE_RATE:
            k = rng.choice(CLONE_OPS)
            out.append(["flatten"] if k == "flatten" else [k, rng.randrange(8), rng.random() < 0.5])
        out.append(op)
        if crng.random() < READ_RATE:
            out.append(["read", *diffops._extent(crng, geo.size, geo.obj)])
    return out


def run(args, env):
    def note(replay):
        n, w = env.same_check_mismatch, env.librbd_wrong_clean
        out = []
        if n or replay:
            out.append(f"{n} object-map checks found the same mismatch in librbd's twin")
        if w:
            out.append(f"{w} times librbd's own check rejected its head map where ours was "
                       f"right (rebuilt, compared again)")
        if env.librbd_missed:
            out.append(f"{env.librbd_missed} diffs after a rollback where librbd missed "
                       f"objects whose bytes changed and ours listed them")
        if env.served_points:
            out.append(f"{env.served_points} heads and snapshots of A read whole through "
                       f"rados-nbd and block status checked")
        if env.rollback_optional:
            out.append(f"{env.rollback_optional} diffs or du after a rollback that differ "
                       f"only on objects whose bytes did not change")
        if env.bursts:
            out.append(f"{env.bursts} bursts of {env.burst_requests} requests in flight "
                       f"together, every read among them compared")
        if env.burst_lengths:
            out.append(f"{env.burst_lengths} comparisons of object lengths left out after a "
                       f"burst (lengths that depend on the order)")
        if env.burst_du:
            out.append(f"{env.burst_du} du without fast-diff after a burst that differ only "
                       f"in used sizes (object lengths that depend on the order)")
        return "; ".join(out)

    name = "differential --clone" if args.clone else "differential"
    test = diffops.Campaign(name, "tests/ceph/differential.py", "diff", "librbd's twin",
                            env.work, lambda geo, ops, label: run_sequence(env, geo, ops, label),
                            hint=hint, note=note)
    if args.replay or args.replay_json:
        return test.replay(json.loads(open(args.replay).read() if args.replay else args.replay_json))
    seqs = 500 if args.long and args.seqs == 32 else args.seqs
    if args.clone and "--seqs" not in sys.argv and "DIFF_SEQS" not in os.environ:
        seqs = int(os.environ.get("DIFF_CLONE_SEQS", "8")) * (4 if args.long else 1)
    kinds = [k for k in args.kinds.split(",") if k] or None

    def make(seed):
        # The slow operations go to a few seeds of the default mix; --kinds names them.
        geo, ops = diffops.sequence(seed, args.long, args.ops, snapshots=True, kinds=kinds,
                                    rare=[] if kinds else diffops.rare_ops(seed, args.long),
                                    owner=diffops.owner_rng(seed),
                                    burst=diffops.burst_rng(seed))
        return (geo, clone_case(seed, geo, ops)) if args.clone else (geo, ops)

    # Past DIFF_MINIMISE_UNTIL_S seconds of the run, failures are printed as they are,
    # unminimised.
    first, failed, serves, secs = test.seeds(
        args.seed, seqs, make, float(os.environ.get("DIFF_MINIMISE_S", "60")),
        minimise_until=float(os.environ.get("DIFF_MINIMISE_UNTIL_S", "600")),
        no_minimise=args.no_minimise)
    print("# seconds by operation (with the comparisons they end in): "
          + ", ".join(f"{k} {v:.0f}" for k, v in sorted(TIMES.items(), key=lambda kv: -kv[1])))
    return test.summary(first, seqs, failed, serves, secs)


if __name__ == "__main__":
    main()
