#!/usr/bin/env python3
"""rados-nbd benchmarks: the same fio jobs, in one run, against rados-nbd and the servers a
user would pick instead. Results are ratios within this run, never absolute promises, and
never a pass/fail test: targets are printed as met / missed.

  bench/run.sh [--quick] [--ceph] [--no-dir] [--only PEER,...] [--rounds N]
  bench/run.sh --report bench/results.json   (rewrite results.md and ratios.png only)
  bench/run.sh --checkpoint-rtt [ROUNDS]     (only the cost of --checkpoint-idle on Ceph)
  bench/run.sh --clone-depth [--quick]       (only reads and copy-up through clone chains on
                                             Ceph: bench/clones.py)

Directory store: `rados-nbd serve` vs `nbdkit file` vs `qemu-nbd -f raw` on sparse files of
the same size, with `nbdkit memory` / `nbdkit null` as the ceiling of the NBD path itself.
Every server runs for the whole run and the peers take turns job by job, so a burst of
load on this shared machine hits one job of every peer rather than every job of one peer.

--ceph: `rados-nbd --store ceph:CONF serve` vs `qemu-nbd` on `rbd:rbd/IMG` (librbd) vs
`fio --ioengine=rbd` (librbd without the NBD hop), each on its own fresh image of the same
size and features, on $CEPH_CONF or on a one-node loopback cluster started with
tests/ceph/cluster.sh. Needs a rados-nbd built with `--features ceph`.

Writes bench/results.json, bench/results.md and bench/ratios.png (to --out).
"""
import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.environ.get("RADOS_NBD_BIN", os.path.join(ROOT, "target/release/rados-nbd"))
US = "rados-nbd"

# (name, fio rw, block size, iodepth)
JOBS = [
    ("seqwrite-1M-qd8", "write", "1M", 8),
    ("randwrite-4k-qd1", "randwrite", "4k", 1),
    ("randwrite-4k-qd32", "randwrite", "4k", 32),
    ("randread-4k-qd1", "randread", "4k", 1),
    ("randread-4k-qd32", "randread", "4k", 32),
    ("seqread-1M-qd8", "read", "1M", 8),
]
DIR_PEERS = [US, "nbdkit", "qemu-nbd", "nbdkit memory", "nbdkit null"]
# Peers that store data: the whole-image discard and the 10 TiB open apply to all of them.
GIB = 1 << 30
TIB = 1 << 40


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def proc_cpu_rss(pid):
    """CPU seconds (user+sys, threads included) and peak RSS (KiB) of a live process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / tick
        hwm = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
        return cpu, hwm
    except OSError:
        return 0.0, 0


def nbd_ready(uri, deadline):
    """Connects with libnbd until the server answers the handshake; returns when it did."""
    import nbd
    while True:
        h = nbd.NBD()
        try:
            h.connect_uri(uri)
            h.get_size()
            h.shutdown()
            return
        except nbd.Error:
            if time.time() > deadline:
                raise
            time.sleep(0.002)
        finally:
            del h


class Server:
    """A peer serving one export of `size` bytes on a unix socket."""

    def __init__(self, name, work, size, tag=""):
        self.name, self.work, self.size = name, work, size
        self.id = slug(name) + (f"-{tag}" if tag else "")
        self.sock = os.path.join(work, f"{self.id}.sock")
        self.proc = None
        self.export = ""
        self.open_seconds = None

    def uri(self):
        return f"nbd+unix:///{self.export}?socket={self.sock}"

    def prepare(self):
        """Create the backing (not timed)."""

    def argv(self):
        raise NotImplementedError

    def env(self):
        return None

    def start(self):
        self.prepare()
        argv = self.argv()
        t0 = time.time()
        self.proc = subprocess.Popen(argv, env=self.env(), stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.work, f"{self.id}.log"), "w"))
        deadline = t0 + 120
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before listening "
                                   f"(see {self.work}/{self.id}.log)")
            if time.time() > deadline:
                raise RuntimeError(f"{self.name}: {self.sock} never appeared")
            time.sleep(0.002)
        # Open = until a client gets through the handshake (the image is really open).
        nbd_ready(self.uri(), deadline)
        self.open_seconds = time.time() - t0

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.exists(self.sock):
            os.unlink(self.sock)


class RadosNbdDir(Server):
    def prepare(self):
        self.store = os.path.join(self.work, "store")
        os.makedirs(self.store, exist_ok=True)
        self.export = f"bench-{self.id}"
        subprocess.run([BIN, "create", "--size", f"{self.size}B", self.export], env=self.env(), check=True)

    def env(self):
        return dict(os.environ, RADOS_NBD_STORE=self.store)

    def argv(self):
        return [BIN, "serve", self.export, "--socket", self.sock]


class SparseFilePeer(Server):
    def prepare(self):
        self.path = os.path.join(self.work, f"{self.id}.raw")
        with open(self.path, "wb") as f:
            f.truncate(self.size)


class NbdkitFile(SparseFilePeer):
    def argv(self):
        return ["nbdkit", "-f", "-U", self.sock, "file", self.path]


class QemuNbd(SparseFilePeer):
    def argv(self):
        return ["qemu-nbd", "-f", "raw", "-k", self.sock, "-t", "-e", "16", "--discard=unmap",
                "--cache=writeback", "--aio=threads", self.path]


class NbdkitMemory(Server):
    def argv(self):
        return ["nbdkit", "-f", "-U", self.sock, "memory", str(self.size)]


class NbdkitNull(Server):
    def argv(self):
        return ["nbdkit", "-f", "-U", self.sock, "null", str(self.size)]


DIR_CLASSES = {US: RadosNbdDir, "nbdkit": NbdkitFile, "qemu-nbd": QemuNbd,
               "nbdkit memory": NbdkitMemory, "nbdkit null": NbdkitNull}


def run_fio(args, rw, env=None):
    out = subprocess.run(["fio", "--output-format=json"] + args, check=True, capture_output=True,
                         text=True, env=env).stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]
    side = j["read"] if "read" in rw else j["write"]
    return {"iops": side["iops"], "mib_s": side["bw_bytes"] / 2**20, "bytes": side["io_bytes"],
            "lat_p50_us": side.get("clat_ns", {}).get("percentile", {}).get("50.000000", 0) / 1000}


def fio_nbd(uri, rw, bs, qd, runtime, ramp, region, extra=()):
    return run_fio([
        "--name=job", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
        f"--iodepth={qd}", f"--size={region}", "--time_based", f"--runtime={runtime}",
        f"--ramp_time={ramp}", "--randrepeat=0", "--norandommap", *extra], rw)


TRIM_BUDGET_S = 300


def trim_seconds(uri):
    """Discards a whole image with NBD TRIM requests as large as the protocol allows
    (blkdiscard-like), then FLUSH; returns the seconds taken, or None when a server
    has not finished within TRIM_BUDGET_S (the report then says so)."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        step = 2**32 - 2**20
        size = h.get_size()
        t0 = time.time()
        off = 0
        while off < size:
            n = min(step, size - off)
            h.trim(n, off)
            off += n
            if time.time() - t0 > TRIM_BUDGET_S:
                return None
        h.flush()
        return time.time() - t0
    finally:
        h.shutdown()


def machine():
    m = {"cpus": os.cpu_count(), "kernel": platform.release(),
         "note": "shared machine (other builds may run); compare ratios within one run only"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    m["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            m["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        m["fs"] = subprocess.run(["df", "--output=fstype", "/var/tmp"], capture_output=True,
                                 text=True).stdout.split()[-1]
    except (OSError, IndexError):
        pass
    vers = {}
    for tool, argv in [("fio", ["fio", "--version"]), ("nbdkit", ["nbdkit", "--version"]),
                       ("qemu-nbd", ["qemu-nbd", "--version"])]:
        try:
            vers[tool] = subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            vers[tool] = "?"
    m["versions"] = vers
    return m


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run_dir(a, work, runtime, ramp):
    size, region = 8 * GIB, "1G"
    names = [p for p in DIR_PEERS if not a.only or p in a.only]
    servers = {n: DIR_CLASSES[n](n, work, size) for n in names}
    res = {"size": size, "region": region, "jobs": {}, "extra": {}}
    cpu = {n: 0.0 for n in names}
    moved = {n: 0 for n in names}
    try:
        for s in servers.values():
            s.start()
            log(f"{s.name}: serving {size >> 30} GiB")
        for rnd in range(a.rounds):
            for k, job in enumerate(j for j in JOBS if not a.jobs or j[0] in a.jobs):
                name, rw, bs, qd = job
                # Rotate who goes first, so no peer always runs right after the same one
                # (by round too: with an even number of jobs the order would repeat).
                first = (k + rnd) % len(names)
                for n in names[first:] + names[:first]:
                    # Dirty pages left by the previous job are written back now, not
                    # during the next peer's measurement.
                    os.sync()
                    s = servers[n]
                    c0, _ = proc_cpu_rss(s.proc.pid)
                    r = fio_nbd(s.uri(), rw, bs, qd, runtime, ramp, region)
                    c1, _ = proc_cpu_rss(s.proc.pid)
                    cpu[n] += c1 - c0
                    moved[n] += r["bytes"]
                    res["jobs"].setdefault(name, {}).setdefault(n, []).append(r)
                    log(f"{n:14} {name:20} {r['iops']:10.0f} IOPS {r['mib_s']:8.1f} MiB/s")
        for n, s in servers.items():
            _, hwm = proc_cpu_rss(s.proc.pid)
            res["extra"].setdefault("peak_rss_mib", {})[n] = hwm / 1024
            res["extra"].setdefault("cpu_s_per_gib", {})[n] = cpu[n] / max(moved[n] / GIB, 1e-9)
    finally:
        for s in servers.values():
            s.stop()
    # With several rounds keep the median of each job (by the job's metric).
    for name, per in res["jobs"].items():
        metric = "mib_s" if "1M" in name else "iops"
        for n, runs in per.items():
            runs.sort(key=lambda r: r[metric])
            per[n] = dict(runs[len(runs) // 2], rounds=len(runs))
    # Whole-image discard of a fresh 1 TiB image, and the time to open a 10 TiB one.
    for n in names:
        big = DIR_CLASSES[n](n, work, TIB, "1t")
        big.start()
        try:
            t = trim_seconds(big.uri())
        finally:
            big.stop()
        res["extra"].setdefault("discard_1tib_s", {})[n] = t
        huge = DIR_CLASSES[n](n, work, 10 * TIB, "10t")
        huge.start()
        huge.stop()
        res["extra"].setdefault("open_10tib_s", {})[n] = huge.open_seconds
        log(f"{n}: discard 1 TiB {t}s, open 10 TiB {huge.open_seconds:.4f}s")
        for f in os.listdir(work):
            if f.endswith(".raw"):
                os.unlink(os.path.join(work, f))
    return res


# ---------------------------------------------------------------------------- Ceph

FEATURES = "layering,exclusive-lock,object-map,fast-diff,deep-flatten"
# (case, fio rw, bs, qd, what the image holds before the job, fio extras)
# First writes: each I/O lands in an object never written before (4 MiB stride over a
# 4 TiB image: 1M objects, more than any peer reaches in one job), so librbd pays its
# object-map update for every one. Reads of never-written areas: a fresh image. Steady
# writes: random 4k over a GiB whose objects all exist.
CEPH_SIZE = 4 * TIB
CEPH_CASES = [
    ("first-write-4k-qd32", "write:4092k", "4k", 32, "fresh", ()),
    ("read-unwritten-4k-qd32", "randread", "4k", 32, "fresh", ()),
    ("steady-randwrite-4k-qd32", "randwrite", "4k", 32, "prefilled", ()),
]
CEPH_PEERS = [US, "qemu-nbd", "fio-rbd", "nbdkit null"]


class Ceph:
    def __init__(self, work, conf):
        self.work, self.conf, self.started = work, conf, None

    @classmethod
    def start(cls, work):
        conf = os.environ.get("CEPH_CONF")
        if conf:
            return cls(work, conf)
        script = os.path.join(ROOT, "tests/ceph/cluster.sh")
        if not os.path.exists(script):
            raise RuntimeError("no $CEPH_CONF and no tests/ceph/cluster.sh (the Ceph store has not landed)")
        # cluster.sh picks a random port and leaves a retry to its caller; a failed start may
        # have left a daemon running, so stop that one (by its pid file) before the next try.
        for attempt in range(3):
            d = os.path.join(work, f"ceph{attempt}" if attempt else "ceph")
            p = subprocess.run(["bash", script, "start", d], capture_output=True, text=True)
            if p.returncode == 0:
                break
            subprocess.run(["bash", script, "stop", d], check=False, capture_output=True)
            # The daemons' own complaints (e.g. the mon refusing a nearly full disk) are in
            # their stderr log, not in cluster.sh's.
            try:
                with open(os.path.join(d, "log", "stderr.log")) as f:
                    daemon = [l.strip() for l in f if "error" in l.lower()]
            except OSError:
                daemon = []
            err = (p.stderr.strip().splitlines() or daemon or ["no message"])[-1]
            log(f"tests/ceph/cluster.sh start {d} exited with {p.returncode}: {err}")
        else:
            raise RuntimeError(f"tests/ceph/cluster.sh start failed 3 times, last: exit {p.returncode}: {err} "
                               f"(logs under {work}/ceph*/log, removed with the work directory)")
        out = p.stdout
        # cluster.sh prints KEY=VALUE lines (CEPH_CONF, and with cephx the daemon's user).
        confs = [l.split("=", 1)[1] for l in out.splitlines() if l.startswith("CEPH_CONF=")]
        if not confs:
            raise RuntimeError(f"tests/ceph/cluster.sh start printed no CEPH_CONF= line: {out!r}")
        conf = confs[0]
        c = cls(work, conf)
        c.started = (script, d)
        return c

    def stop(self):
        if self.started:
            subprocess.run(["bash", self.started[0], "stop", self.started[1]], check=False)

    def env(self):
        return dict(os.environ, CEPH_CONF=self.conf)

    def rbd(self, *args):
        subprocess.run(["rbd", "-c", self.conf, *args], check=True, env=self.env(),
                       stdout=subprocess.DEVNULL)

    def create(self, name):
        self.rbd("create", "--size", f"{CEPH_SIZE >> 30}G", "--image-feature", FEATURES, f"rbd/{name}")

    def remove(self, name):
        subprocess.run(["rbd", "-c", self.conf, "rm", "--no-progress", f"rbd/{name}"], env=self.env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class RadosNbdCeph(Server):
    def __init__(self, name, work, ceph, image):
        super().__init__(name, work, CEPH_SIZE, image)
        self.ceph, self.export = ceph, image

    def env(self):
        return self.ceph.env()

    def argv(self):
        return [BIN, "--store", f"ceph:{self.ceph.conf}", "serve", self.export, "--socket", self.sock]


class QemuNbdRbd(Server):
    def __init__(self, name, work, ceph, image):
        super().__init__(name, work, CEPH_SIZE, image)
        self.ceph, self.image = ceph, image

    def env(self):
        return self.ceph.env()

    def argv(self):
        return ["qemu-nbd", "-f", "raw", "-k", self.sock, "-t", "-e", "16", "--discard=unmap",
                "--cache=writeback", f"rbd:rbd/{self.image}:conf={self.ceph.conf}"]


class RadosNbdCephIdle(RadosNbdCeph):
    """rados-nbd on Ceph with --checkpoint-idle."""

    def __init__(self, name, work, ceph, image, idle):
        super().__init__(name, work, ceph, image)
        self.idle = idle

    def argv(self):
        return super().argv() + ["--checkpoint-idle", str(self.idle)]


def checkpoint_rtt(work, rounds):
    """The cost of --checkpoint-idle: one flag round trip before the first map-changing
    write after each idle checkpoint. Per round, on one connection at QD 1: wait past the
    idle period (the server writes the map and clears the flags), then time a 4 KiB write
    to a new object (sets the flags first), a second one to another new object (flags
    already set: a normal first write) and a rewrite of the first (an EXISTS object)."""
    import nbd
    idle = 0.3
    ceph = Ceph.start(work)
    image = f"bench{os.getpid()}-ckpt"
    srv = None
    try:
        ceph.create(image)
        srv = RadosNbdCephIdle(US, work, ceph, image, idle)
        srv.start()
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        buf = os.urandom(4096)
        obj = 4 << 20
        after, normal, rewrite, cleared = [], [], [], 0
        for i in range(rounds):
            time.sleep(idle + 0.7)
            if i % 5 == 0:
                info = subprocess.run(["rbd", "-c", ceph.conf, "info", "--format", "json", f"rbd/{image}"],
                                      env=ceph.env(), capture_output=True, text=True, check=True).stdout
                cleared += json.loads(info)["flags"] == []
            for dst, off in ((after, 2 * i * obj), (normal, (2 * i + 1) * obj), (rewrite, 2 * i * obj + 4096)):
                t0 = time.perf_counter()
                h.pwrite(buf, off)
                dst.append(time.perf_counter() - t0)
        h.shutdown()
    finally:
        if srv:
            srv.stop()
        ceph.remove(image)
        ceph.stop()

    def med(v):
        return sorted(v)[len(v) // 2] * 1e3

    res = {"rounds": rounds, "idle_s": idle,
           "flags_clear_when_checked": f"{cleared} of {(rounds + 4) // 5}",
           "first_write_after_checkpoint_ms": med(after), "first_write_flag_set_ms": med(normal),
           "rewrite_ms": med(rewrite), "extra_ms": med(after) - med(normal)}
    for k, v in res.items():
        log(f"{k:34} {v:.3f}" if isinstance(v, float) else f"{k:34} {v}")
    return res


def run_ceph(a, work, runtime, ramp):
    ceph = Ceph.start(work)
    res = {"size": CEPH_SIZE, "features": FEATURES, "conf": "loopback one-node cluster"
           if ceph.started else "$CEPH_CONF", "jobs": {}, "extra": {}}
    names = [p for p in CEPH_PEERS if not a.only or p in a.only]
    n_img = 0
    try:
        null = None
        if "nbdkit null" in names:
            null = NbdkitNull("nbdkit null", work, CEPH_SIZE, "ceph")
            null.start()
        for case, rw, bs, qd, state, extra in CEPH_CASES:
            for n in names:
                if n == "nbdkit null":
                    if not case.startswith("read-"):
                        continue
                    r = fio_nbd(null.uri(), rw, bs, qd, runtime, ramp, "1T", extra)
                    res["jobs"].setdefault(case, {})[n] = r
                    log(f"{n:14} {case:26} {r['iops']:10.0f} IOPS")
                    continue
                n_img += 1
                image = f"bench{os.getpid()}-{n_img}"
                ceph.create(image)
                region = "1G" if state == "prefilled" else f"{CEPH_SIZE >> 30}G"
                srv = None
                try:
                    if n == "fio-rbd":
                        base = ["--ioengine=rbd", "--clientname=admin", "--pool=rbd", f"--rbdname={image}"]
                        run = lambda args, rw_: run_fio(base + args, rw_, env=ceph.env())  # noqa: E731
                    else:
                        cls = RadosNbdCeph if n == US else QemuNbdRbd
                        srv = cls(n, work, ceph, image)
                        srv.start()
                        base = ["--ioengine=nbd", f"--uri={srv.uri()}"]
                        run = lambda args, rw_: run_fio(base + args, rw_)  # noqa: E731
                    if state == "prefilled":
                        run(["--name=fill", "--rw=write", "--bs=1M", "--iodepth=8", "--size=1G"], "write")
                    c0 = proc_cpu_rss(srv.proc.pid)[0] if srv else 0
                    r = run(["--name=job", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", f"--size={region}",
                             "--time_based", f"--runtime={runtime}", f"--ramp_time={ramp}", "--randrepeat=0",
                             "--norandommap", *extra], rw)
                    if srv:
                        c1, hwm = proc_cpu_rss(srv.proc.pid)
                        r["server_cpu_s"] = c1 - c0
                        r["server_peak_rss_mib"] = hwm / 1024
                    res["jobs"].setdefault(case, {})[n] = r
                    log(f"{n:14} {case:26} {r['iops']:10.0f} IOPS")
                finally:
                    if srv:
                        srv.stop()
                    ceph.remove(image)
        if null:
            null.stop()
        # Time to open a 10 TiB image and to discard a fresh 1 TiB one, for the NBD servers.
        for n in [p for p in (US, "qemu-nbd") if p in names]:
            cls = RadosNbdCeph if n == US else QemuNbdRbd
            for what, sz in (("open_10tib_s", 10 * TIB), ("discard_1tib_s", TIB)):
                n_img += 1
                image = f"bench{os.getpid()}-{n_img}"
                ceph.rbd("create", "--size", f"{sz >> 30}G", "--image-feature", FEATURES, f"rbd/{image}")
                srv = cls(n, work, ceph, image)
                try:
                    srv.start()
                    v = srv.open_seconds if what == "open_10tib_s" else trim_seconds(srv.uri())
                finally:
                    srv.stop()
                    ceph.remove(image)
                res["extra"].setdefault(what, {})[n] = v
                log(f"{n}: {what} {v}")
    finally:
        ceph.stop()
    res["extra"].update(server_costs(res["jobs"]))
    return res


def server_costs(jobs):
    """Peak RSS and CPU seconds per GiB moved of each Ceph NBD server, from its jobs
    (fio-rbd and nbdkit null have no server process measured)."""
    rss, cpu, moved = {}, {}, {}
    for per in jobs.values():
        for n, r in per.items():
            if "server_cpu_s" in r:
                rss[n] = max(rss.get(n, 0.0), r["server_peak_rss_mib"])
                cpu[n] = cpu.get(n, 0.0) + r["server_cpu_s"]
                moved[n] = moved.get(n, 0) + r["bytes"]
    return {"peak_rss_mib": rss,
            "cpu_s_per_gib": {n: cpu[n] / max(moved[n] / GIB, 1e-9) for n in cpu}}


# ---------------------------------------------------------------------------- report

def metric_of(job):
    return "mib_s" if "1M" in job else "iops"


def ratio(jobs, job, peer):
    r = jobs.get(job, {})
    m = metric_of(job)
    if US in r and peer in r and r[peer][m]:
        return r[US][m] / r[peer][m]
    return None


def targets(results):
    out = []
    d = results.get("dir")
    if d:
        for job, *_ in JOBS:
            out.append({"target": f"directory store, {job}: rados-nbd >= 1.0x nbdkit",
                        "need": 1.0, "ratio": ratio(d["jobs"], job, "nbdkit")})
    c = results.get("ceph")
    checks = [("first-write-4k-qd32", "qemu-nbd", 1.8, "Ceph first writes"),
              ("first-write-4k-qd32", "fio-rbd", 1.0, "Ceph first writes"),
              ("read-unwritten-4k-qd32", "nbdkit null", 0.9, "Ceph reads of never-written areas"),
              ("steady-randwrite-4k-qd32", "qemu-nbd", 1.0, "Ceph steady writes")]
    for job, peer, need, what in checks:
        out.append({"target": f"{what}: rados-nbd >= {need}x {peer}", "need": need,
                    "ratio": ratio(c["jobs"], job, peer) if c else None})
    for t in out:
        t["status"] = "not run" if t["ratio"] is None else ("met" if t["ratio"] >= t["need"] else "missed")
    return out


def fmt_x(x):
    if x is None:
        return f"not finished in {TRIM_BUDGET_S} s"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def fmt_val(r, job):
    m = metric_of(job)
    return f"{r[m]:.0f} MiB/s" if m == "mib_s" else f"{r[m]:.0f}"


def table(jobs, peers):
    others = [p for p in peers if p != US]
    lines = ["| job | " + " | ".join(peers) + " | " + " | ".join(f"{US} / {p}" for p in others) + " |",
             "|---" * (1 + len(peers) + len(others)) + "|"]
    for job, r in jobs.items():
        cells = [fmt_val(r[p], job) if p in r else "-" for p in peers]
        rat = [f"{ratio(jobs, job, p):.2f}" if ratio(jobs, job, p) is not None else "-" for p in others]
        lines.append(f"| {job} | " + " | ".join(cells) + " | " + " | ".join(rat) + " |")
    return lines


def peers_of(jobs):
    peers = []
    for r in jobs.values():
        for p in r:
            if p not in peers:
                peers.append(p)
    return peers


def write_reports(results, out):
    results["targets"] = targets(results)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    m = results["machine"]
    lines = [f"# Benchmark results ({results['date']})", "",
             f"Machine: {m.get('cpu_model', '?')}, {m['cpus']} CPUs, {m.get('mem_gib', '?')} GiB RAM, "
             f"kernel {m['kernel']}, files on {m.get('fs', '?')}; {m['note']}. "
             f"Load average at start {results.get('load_start')}, at end {results.get('load_end')}.",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()) + ".", "",
             f"fio over unix sockets (`--ioengine=nbd`), {results['runtime_s']} s per job after a "
             f"{results['ramp_s']} s warm-up; IOPS unless marked MiB/s. Ratios are {US} / peer: "
             "higher is better for rados-nbd.", ""]
    d = results.get("dir")
    if d:
        lines += [f"## Directory store ({d['size'] >> 30} GiB sparse images, jobs over the first {d['region']}; "
                  "peers take turns job by job, first peer rotating, sync before each job)", ""]
        lines += table(d["jobs"], peers_of(d["jobs"]))
        lines.append("")
        for k, v in d["extra"].items():
            lines.append(f"- {k}: " + ", ".join(f"{p} {fmt_x(x)}" for p, x in v.items()))
        lines.append("")
    c = results.get("ceph")
    if c:
        lines += [f"## Ceph ({c['conf']}; each peer on its own fresh {c['size'] >> 40} TiB image, "
                  f"features {c['features']})", ""]
        lines += table(c["jobs"], peers_of(c["jobs"]))
        lines.append("")
        for k, v in c["extra"].items():
            lines.append(f"- {k}: " + ", ".join(f"{p} {fmt_x(x)}" for p, x in v.items()))
        lines.append("")
    elif results.get("ceph_note"):
        lines += ["## Ceph", "", results["ceph_note"], ""]
    lines += KERNEL_SECTION
    finish_report(lines, "Targets (issue 7)", results["targets"], os.path.join(out, "results.md"))
    chart(results, out)


# bench/kernel.sh's report (rados-nbd, rbd-nbd and krbd as kernel devices in one guest) is its
# own file; this report links to it.
KERNEL_SECTION = ["## Kernel devices: rados-nbd, rbd-nbd and krbd in one guest kernel (issue 18)", "",
                  "`bench/kernel.sh` (a VM beside a throwaway cluster; not run by `bench/run.sh`): "
                  "see [kernel-results.md](kernel-results.md) and kernel-ratios.png.", ""]


def finish_report(lines, title, targets, path):
    """Appends the targets table (met / missed, from the run) and writes and logs the report."""
    lines += [f"## {title}", "", "| target | ratio | status |", "|---|---|---|"]
    for t in targets:
        r = f"{t['ratio']:.2f}" if t["ratio"] is not None else "-"
        lines.append(f"| {t['target']} | {r} | {t['status']} |")
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    log("\n".join(lines))


def chart(results, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no chart (apt-get install python3-matplotlib)")
        return
    parts = [(k, results[k]) for k in ("dir", "ceph") if results.get(k)]
    if not parts:
        return
    fig, axes = plt.subplots(len(parts), 1, figsize=(11, 4.5 * len(parts)), squeeze=False)
    for ax, (k, part) in zip(axes[:, 0], parts):
        jobs = list(part["jobs"])
        others = [p for p in peers_of(part["jobs"]) if p != US]
        w = 0.8 / max(len(others), 1)
        for i, p in enumerate(others):
            vals = [ratio(part["jobs"], j, p) or 0 for j in jobs]
            ax.bar([x + i * w for x in range(len(jobs))], vals, w, label=f"{US} / {p}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([x + w * (len(others) - 1) / 2 for x in range(len(jobs))], jobs, rotation=15)
        ax.set_ylabel("ratio (higher: rados-nbd faster)")
        ax.set_title(("Directory store" if k == "dir" else "Ceph") + f" — same run, {results['date']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ratios.png"), dpi=90)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="5 s per job instead of 20")
    ap.add_argument("--ceph", action="store_true", help="also run the Ceph peers")
    ap.add_argument("--no-dir", action="store_true", help="skip the directory-store peers")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the directory jobs, keep the median")
    ap.add_argument("--only", default="", help="comma-separated peer names")
    ap.add_argument("--jobs", default="", help="comma-separated directory-store job names (default: all)")
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--report", metavar="JSON", help="only rewrite results.md and the chart from a results.json")
    ap.add_argument("--checkpoint-rtt", type=int, metavar="ROUNDS", nargs="?", const=20,
                    help="only measure what --checkpoint-idle costs on Ceph (median of ROUNDS, "
                         "default 20); prints JSON, writes no report")
    ap.add_argument("--clone-depth", action="store_true",
                    help="only the clone-depth job on Ceph (bench/clones.py): writes clone-depth.{json,md,png}")
    a = ap.parse_args()
    if a.checkpoint_rtt:
        work = tempfile.mkdtemp(prefix="rados-nbd-bench.", dir="/var/tmp")
        try:
            print(json.dumps(checkpoint_rtt(work, a.checkpoint_rtt), indent=1))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    if a.report:
        with open(a.report) as f:
            results = json.load(f)
        if results.get("clone_depth"):
            import clones
            os.makedirs(a.out, exist_ok=True)
            clones.write_report(results, a.out)
            return
        if results.get("ceph"):
            for k, v in server_costs(results["ceph"]["jobs"]).items():
                results["ceph"]["extra"].setdefault(k, v)
        os.makedirs(a.out, exist_ok=True)
        write_reports(results, a.out)
        return
    a.only = [p for p in a.only.split(",") if p]
    a.jobs = [j for j in a.jobs.split(",") if j]
    if a.clone_depth:
        import clones
        clones.main(a)
        return
    unknown = [j for j in a.jobs if j not in [n for n, *_ in JOBS]]
    if unknown:
        ap.error(f"unknown job(s) {', '.join(unknown)}; jobs are {', '.join(n for n, *_ in JOBS)}")
    runtime, ramp = (5, 1) if a.quick else (20, 3)
    work = tempfile.mkdtemp(prefix="rados-nbd-bench.", dir="/var/tmp")
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "runtime_s": runtime, "ramp_s": ramp, "load_start": loadavg()}
    try:
        if not a.no_dir:
            results["dir"] = run_dir(a, work, runtime, ramp)
        if a.ceph:
            results["ceph"] = run_ceph(a, work, runtime, ramp)
        else:
            results["ceph_note"] = "Not run in this run (bench/run.sh --ceph runs it on a loopback cluster)."
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_end"] = loadavg()
    os.makedirs(a.out, exist_ok=True)
    write_reports(results, a.out)


if __name__ == "__main__":
    main()
