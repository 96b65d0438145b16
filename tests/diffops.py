"""Seeded operation sequences for the differential tests, shared by
tests/ceph/differential.py (rados-nbd vs librbd on a real cluster) and
tests/clients/dir_model.py (the directory store vs an in-memory model), and what both do with
them: run them (drive, Serves, Server), minimise and report a failing one (Campaign).

A sequence is a list of operations, each a JSON list whose first element names it, so that a
failing sequence prints in one replayable line. The runners are lazy about state: an I/O
operation starts a server when none runs, `close`/`crash` do nothing when none runs, and `snap`
closes a running server first. Any subsequence is therefore a valid sequence, which is what
the minimiser needs.

  ["write", off, len, tag, fua]      data derived from (tag, offset): see pattern()
  ["trim", off, len, fua]            NBD TRIM
  ["zero", off, len, no_hole, fua]   NBD WRITE_ZEROES
  ["flush"]
  ["close"]                          SIGTERM the server: clean close, then compare
  ["crash"]                          kill -9 the server, reopen it (the map is rebuilt), close
  ["slowcrash"]                      the same (starting a server if none runs), but the reopen
                                     must itself wait (bounded) for the dead server's watch to
                                     expire: one open, no retry, no help
  ["takeover", off, len, tag_1, tag_a, tag_b, early]
                                     the server A writes tag_1 (acked: A's map has the object,
                                     its next write there needs no map update, which the OSD
                                     would refuse to a lock loser); SIGSTOP A with a write of
                                     tag_a queued in its socket; a second server B takes the
                                     lock over (at once when early, else once the OSD dropped
                                     A's watch), writes tag_b at the same place (acked); A is
                                     continued: its queued write must fail and never land over
                                     tag_b. B serves on
  ["snap"]                           a snapshot between serves (stores with snapshots only)
  ["livesnap"]                       `rbd snap create` while the writer serves: only when asked
                                     for by name (kinds), as long as rados-nbd refuses it
  ["resize", size]                   up or down, served (the owner does it) or not
  ["ro", off, len, tag]              a read-only server opened while the writer serves; the
                                     writer then writes (off, len) and the reader must see it
  ["oob"]                            TRIM past the end must fail with EINVAL
  ["burst", [sub-op, ...]]           2..24 writes, trims, zeros and reads ("read", off, len)
                                     sent at once on one connection, all in flight together,
                                     then waited for; their extents are pairwise disjoint,
                                     so the bytes do not depend on the order the server runs
                                     them in (a read must read what the reference has there).
                                     Mostly in one or two objects: requests queued behind
                                     others to the same object, which one-at-a-time requests
                                     never make (the Ceph store merges such writes into one
                                     RADOS operation), reads beside them, copy-ups racing

Lock-owner operations (Ceph only: generate(owner=...); a librbd client asks the server, as the
exclusive-lock owner, to do them, or takes the lock from it):

  ["sparsify"]                       `rbd sparsify` (4 KiB), served (the owner does it) or not
  ["feature", name, on]              `rbd feature enable|disable` of "object-map" or
                                     "fast-diff", served (the owner does it) or not. librbd
                                     turns both on or both off together; one that would
                                     change nothing (both already so: librbd refuses it)
                                     does nothing, so any subsequence stays valid. Or of
                                     "exclusive-lock" (off only with the maps off, the maps
                                     on only with it on; otherwise nothing): while it is
                                     off the image has no owner, and rbd resizes, snapshots,
                                     sparsifies and rolls it back itself, served or not
  ["handover", off, len, tag]        a librbd client opens the served image and writes
                                     pattern(tag, off, len) at off: it asks the server for
                                     the lock, which hands it over; the client closes, and
                                     the server's next request takes the lock back. An I/O
                                     operation: clipped, and it starts a server when none runs

Offsets and lengths are multiples of 512 so that every client and server accepts them.

slowcrash and takeover cost a watch timeout each (15 s on the test cluster): they are never
drawn by weight unless named in kinds; a run asks for them with `rare` instead, once in a
sequence (see rare_ops()).

The lock-owner operations are drawn by weight when kinds names them. In the default mix they
come from a stream of their own (owner, a random.Random: see OWNER_RATE), inserted between
the others, so that the other operations of a seed are the ones it had before they existed.
"""

import json
import os
import random
import signal
import subprocess
import time

import nbd  # Debian's python3-libnbd: run with /usr/bin/python3

SECTOR = 512


def pattern(tag, off, length):
    """Deterministic, position-dependent data: a byte pattern in which every 512-byte sector
    names its tag and its offset, so a misplaced or stale sector is told apart."""
    out = bytearray()
    pos = off
    while pos < off + length:
        sec = pos - pos % SECTOR
        head = b"%08x:%016x;" % (tag & 0xFFFFFFFF, sec)
        block = (head * (SECTOR // len(head) + 1))[:SECTOR]
        a = pos - sec
        b = min(SECTOR, off + length - sec)
        out += block[a:b]
        pos = sec + b
    return bytes(out)


class Geometry:
    def __init__(self, order, objects):
        self.order = order
        self.obj = 1 << order
        self.size = objects * self.obj


def random_geometry(rng):
    # Small objects keep exports and reads cheap; one in five is the default 4 MiB.
    order = rng.choice([16, 16, 17, 18, 22])
    return Geometry(order, rng.randint(4, 8))


def _extent(rng, size, obj):
    """An extent biased towards the cases that matter for the object map: whole objects,
    pieces of one object, ranges across a boundary, the tail of an object."""
    nobj = max(1, size // obj)
    o = rng.randrange(nobj)
    kind = rng.random()
    if kind < 0.3:  # whole object(s)
        n = rng.choice([1, 1, 2])
        off, length = o * obj, n * obj
    elif kind < 0.65:  # inside one object
        a = rng.randrange(obj // SECTOR) * SECTOR
        b = rng.randrange(a // SECTOR + 1, obj // SECTOR + 1) * SECTOR
        off, length = o * obj + a, b - a
    elif kind < 0.8:  # the tail of an object (librbd truncates rather than punches)
        a = rng.randrange(1, obj // SECTOR) * SECTOR
        off, length = o * obj + a, obj - a
    else:  # across a boundary
        a = rng.randrange(1, obj // SECTOR) * SECTOR
        off = o * obj + a
        length = rng.randrange(1, 2 * obj // SECTOR) * SECTOR
    off = min(off, size - SECTOR)
    length = max(SECTOR, min(length, size - off, 32 << 20))
    return off, length


def rare_ops(seed, long=False):
    """The slow operations a sequence of the default mix gets, by its seed: one sequence in
    32 gets a slowcrash and another a takeover (so a default run of 32 consecutive seeds has
    each exactly once, about 40 s in all), one in 16 each with --long."""
    period = 16 if long else 32
    return {7: ["slowcrash"], period * 3 // 4 - 1: ["takeover"]}.get(seed % period, [])


# The lock-owner operations (Ceph only).
OWNER_OPS = ("sparsify", "feature", "handover")
# In the default mix, the chance that a lock-owner operation (one of OWNER_OPS, evenly) comes
# before each operation of the sequence: about 20 in a default run of 32 sequences.
OWNER_RATE = 0.04
# The tags of hand-overs drawn from the owner stream: apart from the main stream's.
OWNER_TAG = 1 << 24

# In a runner's default mix (generate(burst=...)), the chance that a burst comes before each
# operation of the sequence, from a stream of its own (burst_rng()): about 1.5 bursts a
# sequence, and the other operations of a seed stay what they were before bursts existed.
BURST_RATE = 0.08
# The tags of bursts' writes: apart from the main and owner streams'.
BURST_TAG = 1 << 26
# Weights of a burst's sub-operations.
BURST_KINDS = {"write": 50, "read": 16, "zero": 17, "trim": 17}


def burst_rng(seed):
    """The bursts' own random stream for a seed (see generate())."""
    return random.Random(f"bursts {seed}")


def _burst(rng, size, geo, tag):
    """["burst", subs] for an image of size bytes, and the last tag used: 2..24 pairwise
    disjoint extents, mostly in one object or two neighbours (one burst in five anywhere
    in the image), touching (gap 0) one time in two so that writes can chain, sent in a
    random order."""
    obj = geo.obj
    nobj = max(1, -(-size // obj))
    spread = rng.random() < 0.2
    if spread:
        lo, hi = 0, size
    else:
        lo = rng.randrange(nobj) * obj
        hi = min(size, lo + rng.choice([1, 1, 2]) * obj)
    scale = max(1, (hi - lo) // (24 * 64 * SECTOR)) if spread else 1
    subs = []
    pos = lo + rng.choice([0, rng.randrange(max(1, (hi - lo) // SECTOR // 4)) * SECTOR])
    for _ in range(rng.randint(2, 24)):
        pos += rng.choice([0, 0, 0, 1, 8, 64]) * SECTOR * scale
        length = min(rng.choice([1, 1, 2, 8, 8, 32, 128]) * SECTOR, hi - pos)
        if length <= 0:
            break
        k = rng.choices(list(BURST_KINDS), list(BURST_KINDS.values()))[0]
        if k == "write":
            tag += 1
            subs.append(["write", pos, length, tag, rng.random() < 0.1])
        elif k == "read":
            subs.append(["read", pos, length])
        elif k == "zero":
            subs.append(["zero", pos, length, rng.random() < 0.35, rng.random() < 0.1])
        else:
            subs.append(["trim", pos, length, rng.random() < 0.1])
        pos += length
    rng.shuffle(subs)
    return ["burst", subs], tag


def burst_sharing(subs, order, holes_only=True):
    """Whether two changing sub-operations of a burst touch one object, one of them making
    holes (a trim, a zero without NO_HOLE; any two changes with holes_only False): the
    object's length on the server may then depend on the order they ran in (a cut of its
    tail before or after a write), its bytes may not."""
    seen = {}
    for s in subs:
        if s[0] == "read":
            continue
        holes = s[0] == "trim" or (s[0] == "zero" and not s[3])
        for o in range(s[1] >> order, (s[1] + s[2] - 1 >> order) + 1):
            if o in seen and (not holes_only or holes or seen[o]):
                return True
            seen[o] = seen.get(o, False) or holes
    return False


def owner_rng(seed):
    """The lock-owner operations' own random stream for a seed (see generate())."""
    return random.Random(f"owner-ops {seed}")


def _owner_op(rng, k, size, geo, maps, tag, lock=True):
    """A lock-owner operation of kind k: maps tells whether object-map and fast-diff are on
    (librbd turns them on and off together), lock whether exclusive-lock is, so that a
    feature change is one that changes something (and one librbd allows)."""
    if k == "feature":
        name = rng.choice(["object-map", "fast-diff"])
        if not lock:
            return ["feature", "exclusive-lock", True]
        if not maps and rng.random() < 0.4:
            return ["feature", "exclusive-lock", False]
        return ["feature", name, not maps]
    if k == "handover":
        off, length = _extent(rng, size, geo.obj)
        return ["handover", off, length, tag]
    return [k]


def features_after(op, maps, lock):
    """(maps, lock) after op: whether object-map/fast-diff and exclusive-lock are on."""
    if op[0] != "feature":
        return maps, lock
    if op[1] == "exclusive-lock":
        return maps, op[2] if op[2] or not maps else lock
    return (op[2] if lock or not op[2] else maps), lock


def generate(rng, geo, n_ops, snapshots=True, kinds=None, rare=(), owner=None, burst=None):
    """A sequence of n_ops operations for an image of geometry geo (its starting size).
    kinds: the operation names allowed (default all but the slow ones, livesnap and the
    lock-owner ones). rare: operations added once each at a random place (the random draws of
    a sequence without them are unchanged, so seeds replay as before). owner: a random.Random
    (owner_rng()) with which the default mix gets lock-owner operations too, besides the
    n_ops (the draws of the others unchanged); with kinds, those named are drawn by weight.
    burst: a random.Random (burst_rng()) from which bursts come the same way, BURST_RATE
    before each operation (with kinds only when they name "burst": then 3 in 10, or before
    every operation when "burst" is the only kind)."""
    allowed = set(kinds or ["write", "trim", "zero", "flush", "close", "crash", "snap",
                            "resize", "ro", "oob"])
    if not snapshots:
        allowed -= {"snap", "livesnap"}
    weights = {"write": 30, "trim": 14, "zero": 14, "flush": 4, "close": 8, "crash": 4,
               "snap": 7, "resize": 4, "ro": 3, "oob": 1, "livesnap": 4, "slowcrash": 1,
               "takeover": 1, "sparsify": 6, "feature": 6, "handover": 6}
    names = [k for k in weights if k in allowed]
    extra = list(OWNER_OPS) if owner is not None and not kinds else []
    size = geo.size
    maps = lock = True
    ops = []
    tag = rng.randrange(1 << 16)
    owner_tag = OWNER_TAG
    places = {rng.randrange(n_ops): k for k in rare}
    burst_tag = BURST_TAG
    # With kinds, bursts come only when named: often beside other kinds, else every time.
    burst_rate = (BURST_RATE if not kinds else 0 if "burst" not in kinds
                  else 0.3 if names else 1)
    for i in range(n_ops):
        if burst is not None and burst.random() < burst_rate:
            op, burst_tag = _burst(burst, size, geo, burst_tag)
            ops.append(op)
        if not names:
            continue
        if extra and owner.random() < OWNER_RATE:
            owner_tag += 1
            op = _owner_op(owner, owner.choice(extra), size, geo, maps, owner_tag, lock)
            maps, lock = features_after(op, maps, lock)
            ops.append(op)
        k = places.get(i) or rng.choices(names, [weights[n] for n in names])[0]
        if k in OWNER_OPS:
            tag += 1
            op = _owner_op(rng, k, size, geo, maps, tag, lock)
            maps, lock = features_after(op, maps, lock)
            ops.append(op)
        elif k == "write":
            tag += 1
            off, length = _extent(rng, size, geo.obj)
            ops.append(["write", off, length, tag, rng.random() < 0.2])
        elif k == "trim":
            off, length = _extent(rng, size, geo.obj)
            ops.append(["trim", off, length, rng.random() < 0.2])
        elif k == "zero":
            off, length = _extent(rng, size, geo.obj)
            ops.append(["zero", off, length, rng.random() < 0.35, rng.random() < 0.2])
        elif k == "resize":
            # Whole objects and odd sizes, down to one object, up to twice the start.
            objs = rng.randint(1, 2 * geo.size // geo.obj)
            new = objs * geo.obj - (rng.choice([0, 0, 1]) * rng.randrange(1, geo.obj // SECTOR) * SECTOR)
            size = max(SECTOR, new)
            ops.append(["resize", size])
        elif k == "ro":
            tag += 1
            off, length = _extent(rng, size, geo.obj)
            ops.append(["ro", off, length, tag])
        elif k == "takeover":
            tag += 3
            off, length = _extent(rng, size, geo.obj)
            # Small enough to sit whole in the stopped server's socket buffer.
            ops.append(["takeover", off, min(length, 64 << 10), tag - 2, tag - 1, tag,
                        rng.random() < 0.5])
        else:
            ops.append([k])
    ops.append(["close"])
    return ops


def sequence(seed, long=False, n_ops=0, **kw):
    """A seed's geometry and operations: n_ops of them, or 8..24 (8..48 with long) drawn from
    the seed. kw: generate()'s options."""
    rng = random.Random(seed)
    geo = random_geometry(rng)
    return geo, generate(rng, geo, n_ops or rng.randint(8, 48 if long else 24), **kw)


def minimise(ops, still_fails, budget_s, log=print):
    """Delta debugging, greedy: drop chunks of operations (halves, quarters, ... single ones)
    while still_fails(candidate) holds; stops after budget_s seconds with the smallest
    sequence found so far."""
    deadline = time.monotonic() + budget_s
    cur = list(ops)
    n = 2
    while len(cur) >= 2 and time.monotonic() < deadline:
        chunk = max(1, len(cur) // n)
        removed = False
        i = 0
        while i < len(cur) and time.monotonic() < deadline:
            cand = cur[:i] + cur[i + chunk:]
            if cand and still_fails(cand):
                cur = cand
                removed = True
                log(f"minimise: {len(cur)} operations")
            else:
                i += chunk
        if not removed:
            if chunk == 1:
                break
            n = min(len(cur), n * 2)
    return cur


def dumps(ops):
    return json.dumps(ops, separators=(",", ":"))


def case_of(seed, geo, ops):
    """A sequence with its geometry, as printed and written for a replay."""
    return {"seed": seed, "order": geo.order, "objects": geo.size >> geo.order, "ops": ops}


def drive(run, ops, errors=(), times=None):
    """Applies ops in order to run (apply(op), finish(), serves: how many serves were compared
    so far): (None, serves) when all pass, else (the Failure, its `at` the index of the
    operation, serves). errors: the client libraries' exceptions, taken as a failure of the
    operation that raised them. run.finish() ends what it started, whatever happened. times:
    seconds by operation name, added up."""
    i = -1
    try:
        for i, op in enumerate(ops):
            progress()
            t = time.monotonic()
            run.apply(op)
            if times is not None:
                times[op[0]] = times.get(op[0], 0) + time.monotonic() - t
        return None, run.serves
    except Failure as f:
        f.at = i
        return f, run.serves
    except tuple(errors) as ex:
        f = Failure(f"error in {ops[i][0]}", str(ex))
        f.at = i
        return f, run.serves
    finally:
        progress()
        run.finish()


# An operation (or a sequence's final comparisons) that takes longer than this is taken as
# hung (see `watched`).
HANG_S = float(os.environ.get("DIFF_HANG_S", "300"))
# The exit status of a test program that hung (EX_TEMPFAIL): tests/lib.sh's
# again_if_crashed runs it once more.
HUNG_EXIT = 75
# When the sequence being run last made progress (drive: each operation, then finish).
_progress = [time.monotonic()]


def progress():
    _progress[0] = time.monotonic()


def watched(run, on_hang):
    """run(geo, ops, label) with a watchdog. Seen in tests/ceph/differential.py: python3-rbd's
    librbd deadlocked inside rbd_open_read_only (a librados callback thread blocked on a
    mutex whose memory was garbage, the main thread waiting for the open forever), the
    same corrupted heap its crashes come from (tests/lib.sh, again_if_crashed). When one
    operation of a sequence (or its final comparisons) takes longer than HANG_S seconds,
    the watchdog calls on_hang() (which prints the FAIL line of a failure being minimised,
    so that it is not lost), prints every thread's stack, ends the processes this one started
    (servers, `rbd` commands; by pid), and exits with HUNG_EXIT. Without a FAIL line
    again_if_crashed runs the program once more: a hang that rados-nbd causes comes back
    at the same seed and fails the second run. What the run made (images, its work
    directory) stays, as after a crash; the test's cluster is thrown away whole."""
    import faulthandler
    import sys
    import threading

    def hung(label):
        on_hang()
        print(f"hung: sequence {label} made no progress for {HANG_S:.0f} s (one operation "
              "or the final comparisons); the stacks of this process's threads follow",
              flush=True)
        faulthandler.dump_traceback(file=sys.stdout, all_threads=True)
        me = os.getpid()
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == me:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
        sys.stdout.flush()
        os._exit(HUNG_EXIT)

    def go(geo, ops, label):
        done = threading.Event()

        def watch():
            while not done.wait(min(5.0, HANG_S)):
                if time.monotonic() - _progress[0] > HANG_S:
                    hung(label)

        progress()
        t = threading.Thread(target=watch, daemon=True)
        t.start()
        try:
            return run(geo, ops, label)
        finally:
            done.set()
            t.join()
    return go


class Campaign:
    """Runs a differential test's sequences and prints its result lines: one PASS line, or one
    FAIL line per kind of failure, the first sequence failing so minimised and written to a
    file (in $DIFF_OUT, else work) that `SCRIPT --replay FILE` runs again.

    name       names the test in its PASS/FAIL lines
    script     the test's path in the repository, for the replay line
    prefix     of a failing case's file name
    reference  what the serves were compared with, for the PASS line
    work       the run's temporary directory, removed when all passed
    run        run(geo, ops, label) -> (Failure or None, serves compared)
    hint       hint(failure, ops) -> a guess at the cause, shown in the FAIL line
    note       note(replay) -> a remark for the PASS line, or ""
    """

    def __init__(self, name, script, prefix, reference, work, run, hint=None, note=None):
        self.name, self.script, self.prefix, self.reference = name, script, prefix, reference
        self.work, self.run, self.hint = work, watched(run, self._on_hang), hint
        # The failure being minimised: (seed, geo, ops, Failure).
        self.minimising = None
        self.note = note or (lambda replay: "")

    def _fail(self, what, f, ops):
        hint = f" [{self.hint(f, ops)}]" if self.hint else ""
        print(f"FAIL {self.name} {what}: {f}{hint}")

    def _fail_unminimised(self, seed, geo, ops, f, why=""):
        self._fail(f"seed {seed}{why}", f, ops)
        print(f"#   {dumps(case_of(seed, geo, ops[:f.at + 1]))}")

    def _on_hang(self):
        """What a hang must not lose: the failure being minimised, unminimised."""
        if self.minimising is not None:
            self._fail_unminimised(*self.minimising, why=" (its minimisation hung)")

    def replay(self, case):
        """Runs a case printed by a failure: the exit status."""
        geo = Geometry(case["order"], case["objects"])
        f, serves = self.run(geo, case["ops"], "replay")
        if f:
            self._fail("replay", f, case["ops"])
            return 1
        note = self.note(True)
        print(f"PASS {self.name} replay ({len(case['ops'])} ops, {serves} serves compared"
              f"{'; ' + note if note else ''})")
        return 0

    def seeds(self, first, seqs, make, budget, minimise_until=float("inf"), no_minimise=False):
        """Runs the sequences make(seed) -> (geo, ops) of seeds first.. first+seqs-1 (first None:
        from the clock). A failure of a kind not seen yet is minimised for up to budget seconds
        unless no_minimise or the run is past minimise_until seconds; later ones of that kind
        are noted. The first seed, the failures by kind, serves compared and seconds taken."""
        first = first if first is not None else int(time.time()) % 1000000
        t0 = time.monotonic()
        failed = {}
        serves = 0
        for seed in range(first, first + seqs):
            geo, ops = make(seed)
            f, n = self.run(geo, ops, str(seed))
            serves += n
            if f is None:
                continue
            if f.kind in failed:
                # Already reported and minimised once: a note, one FAIL line per kind.
                print(f"# also seed {seed}: {f}")
                failed[f.kind] += 1
                continue
            failed[f.kind] = 1
            if no_minimise or time.monotonic() - t0 > minimise_until:
                self._fail_unminimised(seed, geo, ops, f)
            else:
                self.minimising = (seed, geo, ops, f)
                self._minimise(seed, geo, ops, f, budget)
                self.minimising = None
        return first, failed, serves, time.monotonic() - t0

    def _minimise(self, seed, geo, ops, f, budget):
        print(f"# seed {seed}: {f} (operation {f.at + 1} of {len(ops)}); minimising...",
              flush=True)

        def still_fails(cand):
            g, _ = self.run(geo, cand, "minimise")
            return g is not None and g.kind == f.kind

        small = minimise(ops[:f.at + 1], still_fails, budget,
                         log=lambda m: print(f"#   {m}", flush=True))
        g, _ = self.run(geo, small, "final")
        g = g or f
        case = case_of(seed, geo, small)
        path = os.path.join(os.environ.get("DIFF_OUT", self.work), f"{self.prefix}-seed{seed}.json")
        with open(path, "w") as fh:
            json.dump(case, fh)
        self._fail(f"seed {seed}", g, small)
        print(f"#   minimal ({len(small)} ops): {dumps(case)}")
        print(f"#   replay: /usr/bin/python3 {self.script} --replay {path}")

    def summary(self, first, seqs, failed, serves, secs):
        """The last line of a run: the exit status."""
        if not failed:
            subprocess.run(["rm", "-rf", self.work])
            note = self.note(False)
            print(f"PASS {self.name}: {seqs} sequences (seeds {first}..{first + seqs - 1}), "
                  f"{serves} serves compared with {self.reference} in {secs:.0f} s"
                  f"{'; ' + note if note else ''}")
            return 0
        print(f"# {seqs} sequences from seed {first} in {secs:.0f} s; failures by kind: {failed}")
        return 1


def rados_nbd_bin():
    """The binary under test: $RADOS_NBD_BIN, else the workspace's release build."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("RADOS_NBD_BIN", os.path.join(root, "target/release/rados-nbd"))


def clip(op, size):
    """An I/O operation clipped to the image's size now (a minimised sequence may have lost
    the resize its offsets were drawn for); None when nothing of it is left."""
    off, length = op[1], op[2]
    if off >= size:
        return None
    op = list(op)
    op[2] = min(length, size - off)
    return op


class Failure(Exception):
    """A difference between the server under test and the reference. kind is stable across
    runs (the minimiser keeps a candidate only when it fails the same way)."""

    def __init__(self, kind, detail):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def sh(args, timeout=60, check=True):
    """Runs a command; with check, a Failure "command" unless it exits 0, naming it and its
    error line (not the daemon's log lines around it)."""
    try:
        r = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Failure("timeout", f"{' '.join(args)}: no answer in {timeout} s")
    if check and r.returncode != 0:
        lines = [ln for ln in r.stderr.decode(errors="replace").splitlines()
                 if ln.strip() and " INFO " not in ln and " DEBUG " not in ln]
        raise Failure("command", f"{' '.join(args)}: exit {r.returncode}: "
                      f"{' | '.join(lines)[-600:]}")
    return r


class Server:
    """One `rados-nbd serve` process on a Unix socket, ended by its pid only."""

    def __init__(self, cmd, sock, log):
        self.sock = sock
        try:
            os.unlink(sock)
        except FileNotFoundError:
            pass
        self.log = log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(cmd + ["--socket", sock], stdin=subprocess.DEVNULL,
                                         stdout=f, stderr=f)

    def wait_ready(self, timeout=30):
        """True once the socket exists; False when the process exited first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if os.path.exists(self.sock):
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        self.kill()
        raise Failure("serve start", f"no socket {self.sock} after {timeout} s")

    def connect(self):
        """An NBD handle connected to the server. The socket is bound (and its mode set)
        before it listens: a connect in between is refused, so refusals are retried for a
        while; a server that exited meanwhile is reported with its log."""
        end = time.monotonic() + 10
        while True:
            h = nbd.NBD()
            # Out-of-range requests must reach the server: its answer is what is tested.
            h.set_strict_mode(0)
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            try:
                h.connect_unix(self.sock)
                return h
            except nbd.Error as e:
                if self.proc.poll() is not None:
                    raise Failure("serve exited", f"exit {self.proc.returncode}: {self.tail()}")
                if nbd_errno(e) not in ("ECONNREFUSED", 111) or time.monotonic() > end:
                    raise
                time.sleep(0.05)

    def stop(self, timeout=60):
        """SIGTERM and wait: the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise Failure("close", f"no exit {timeout} s after SIGTERM")

    def close(self):
        """A clean close: SIGTERM, and exit 0, else a Failure "close"."""
        rc = self.stop()
        if rc != 0:
            raise Failure("close", f"serve exited {rc} after SIGTERM: {self.tail()}")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def tail(self, n=3):
        try:
            with open(self.log, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
            return " | ".join(lines[-n:])
        except OSError:
            return ""


def hang_up(h):
    """Disconnect an NBD handle, ignoring a server that is already gone."""
    if h is None:
        return
    try:
        h.shutdown()
    except nbd.Error:
        pass


def nbd_errno(e):
    """libnbd's Error carries the errno's name ("EINVAL"), or None."""
    return getattr(e, "errno", None)


class Serves:
    """What a run of either test does with its server under test: self.server (a Server, or
    None), self.h (an NBD handle on it, or None), self.serves (how many serves ended and were
    compared), self.size (the image's size now); start() serves the image, run_op(op) carries
    out one operation."""

    def apply(self, op):
        """Carries out op: an I/O operation is clipped first (see clip(): nothing left,
        nothing done) and starts a server when none runs."""
        if op[0] in ("write", "trim", "zero", "ro", "handover"):
            op = clip(op, self.size)
            if op is None:
                return
            self.ensure_served()
        elif op[0] == "burst":
            subs = [c for c in (clip(s, self.size) for s in op[1]) if c is not None]
            if not subs:
                return
            op = ["burst", subs]
            self.ensure_served()
        self.run_op(op)

    def ensure_served(self):
        if self.server is None:
            self.start()

    def close_serve(self):
        """Hangs up and closes the server cleanly (a Failure "close" otherwise): one more
        serve to compare."""
        hang_up(self.h)
        self.h = None
        self.server.close()
        self.server = None
        self.serves += 1


def serving(cmd, sock, log, kind="serve start"):
    """A Server started and serving; a Failure of that kind when it exited first."""
    s = Server(cmd, sock, log)
    if not s.wait_ready():
        raise Failure(kind, f"exit {s.proc.returncode}: {s.tail()}")
    return s


def send(h, op):
    """Sends an I/O operation (write, trim, zero) over the NBD handle h: the bytes a write
    wrote, else None."""
    k = op[0]
    if k == "write":
        _, off, length, tag, fua = op
        data = pattern(tag, off, length)
        h.pwrite(data, off, nbd.CMD_FLAG_FUA if fua else 0)
        return data
    if k == "trim":
        _, off, length, fua = op
        h.trim(length, off, nbd.CMD_FLAG_FUA if fua else 0)
    elif k == "zero":
        _, off, length, no_hole, fua = op
        h.zero(length, off, (nbd.CMD_FLAG_NO_HOLE if no_hole else 0) | (nbd.CMD_FLAG_FUA if fua else 0))
    else:
        raise ValueError(f"not an I/O operation: {op}")
    return None


def send_burst(h, subs, timeout=120):
    """Sends every sub-operation of a burst over h at once (libnbd's aio calls: all in flight
    together), then waits for all of them: for each, the bytes a write wrote or a read read,
    else None. A Failure names the first that failed, once every one has been answered."""
    out = [None] * len(subs)
    bufs = {}
    pending = {}
    for i, s in enumerate(subs):
        k = s[0]
        fua = nbd.CMD_FLAG_FUA if k != "read" and s[-1] else 0
        if k == "write":
            out[i] = pattern(s[3], s[1], s[2])
            c = h.aio_pwrite(out[i], s[1], flags=fua)
        elif k == "read":
            bufs[i] = nbd.Buffer(s[2])
            c = h.aio_pread(bufs[i], s[1])
        elif k == "trim":
            c = h.aio_trim(s[2], s[1], flags=fua)
        elif k == "zero":
            c = h.aio_zero(s[2], s[1], flags=fua | (nbd.CMD_FLAG_NO_HOLE if s[3] else 0))
        else:
            raise ValueError(f"not a burst operation: {s}")
        pending[c] = i
    # libnbd reads and writes these buffers until each command is answered: kept alive with
    # the handle, whatever happens here.
    h.burst_buffers = (out, bufs)
    failed = []
    end = time.monotonic() + timeout
    while True:
        for c, i in list(pending.items()):
            try:
                done = h.aio_command_completed(c)
            except nbd.Error as e:
                failed.append((i, nbd_errno(e) or str(e)))
                done = True
            if done:
                del pending[c]
        if not pending:
            break
        if time.monotonic() > end:
            raise Failure("burst: no answer", f"{len(pending)} of {len(subs)} requests "
                          f"unanswered after {timeout} s: {[subs[i] for i in pending.values()]}")
        h.poll(500)
    if failed:
        i, err = min(failed)
        raise Failure("burst: error", f"{subs[i]} failed ({err}) with {len(subs)} requests "
                      f"in flight")
    for i, b in bufs.items():
        out[i] = bytes(b.to_bytearray())
    return out


def read_only_beside(cmd, sock, log, h, op, twin_write, order):
    """["ro", off, length, tag]: a `serve --read-only` (cmd) opened while the writer h serves;
    then h writes and flushes (and twin_write(data, off) does the same on the reference), and
    the reader must read what was written: objects created after it opened are not holes."""
    _, off, length, tag = op
    ro = serving(cmd, sock, log, "ro serve start")
    try:
        r = ro.connect()
        data = pattern(tag, off, length)
        h.pwrite(data, off)
        h.flush()
        twin_write(data, off)
        got = r.pread(length, off)
        hang_up(r)
        if got != data:
            first = next(i for i in range(length) if got[i] != data[i])
            raise Failure("ro read", f"serve --read-only opened before a write of "
                          f"{off}+{length} (object {off >> order}) reads "
                          f"{'zeros' if got == bytes(length) else 'other data'} "
                          f"(first difference at +{first})")
    finally:
        rc = ro.stop()
    if rc != 0:
        raise Failure("ro close", f"serve --read-only exited {rc}: {ro.tail()}")


def trim_past_end(h, size):
    """A TRIM running past the end of an image of size bytes must fail with EINVAL."""
    off = max(0, size - SECTOR)
    try:
        h.trim(2 * SECTOR, off, 0)
    except nbd.Error as e:
        if nbd_errno(e) != "EINVAL":
            raise Failure("oob trim", f"TRIM past the end failed with errno {nbd_errno(e)}, "
                          f"not EINVAL: {e}")
        return
    raise Failure("oob trim", "TRIM past the end succeeded")
