"""The clone-depth job (bench/run.sh --clone-depth; see bench/README.md): what a chain of
clones costs a reader and a first writer, for rados-nbd and the librbd peers.

On $CEPH_CONF or a one-node loopback cluster: a base image whose first REGION holds data,
then a "spine" of clones c1..c15, each made with `rbd snap create` + `rbd clone` (clone
format 2) from a snapshot of the one before. A leaf at depth d is a fresh clone of the
spine's level d-1 (of the base for d = 1): it holds no data and no snapshot of its own, so
every read of REGION goes to data that lives only in the base, d levels up, and its first
write to an object is a copy-up from the base through d levels.

(a) reads: 4 KiB random reads at QD 1 over REGION of the leaf of depth 1, 4, 8 and 16, for
    rados-nbd and qemu-nbd (fio's nbd engine over a unix socket) and fio's rbd engine;
    fio's completion latency (mean, p50, p99) and IOPS.
(b) first writes: 4 KiB writes at QD 32 into a fresh leaf at depth 1 and 8, one per object
    of REGION in a random order at a random 4 KiB-aligned offset in the object, so every
    write is the first to its object (a copy-up). fio has no such pattern (random offsets
    at 4 KiB granularity repeat objects), so libnbd's asynchronous API drives it; the same
    client for both servers.

Writes bench/clone-depth.json, .md and .png (to --out); `--report bench/clone-depth.json`
rewrites the last two. Targets are printed as met / missed, never asserted.
"""
import json
import os
import random
import subprocess
import time

import bench
from bench import US, log

READ_DEPTHS = [1, 4, 8, 16]
WRITE_DEPTHS = [1, 8]
READ_PEERS = [US, "qemu-nbd", "fio-rbd"]
WRITE_PEERS = [US, "qemu-nbd"]
OBJ = 4 << 20
# (image size, REGION holding the base's data, seconds per read job, warm-up)
# The data is 1 GiB: the four copy-up runs then write 4 GiB more (one 4 MiB object per
# write) into the cluster's block file, on a disk shared with others.
FULL = (8 * bench.GIB, 1 * bench.GIB, 20, 3)
QUICK = (1 * bench.GIB, 128 << 20, 5, 1)
# Targets of the issue: rados-nbd's mean read latency at depth 16 within 10% of depth 1;
# at every depth at least as fast as each peer; first writes >= 1.5x qemu-nbd (IOPS).
DEPTH_FLAT = 1.10
COPYUP_NEED = 1.5


def lat_of(side):
    """IOPS and completion latency (microseconds) of one side of a fio job."""
    clat = side.get("clat_ns", {})
    pct = clat.get("percentile", {})
    return {"iops": side["iops"], "ios": side.get("total_ios", 0),
            "lat_mean_us": clat.get("mean", 0) / 1000,
            "lat_p50_us": pct.get("50.000000", 0) / 1000,
            "lat_p99_us": pct.get("99.000000", 0) / 1000}


def fio_json(args, env=None):
    p = subprocess.run(["fio", "--output-format=json"] + args, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"fio exited with {p.returncode}: {tail}")
    out = p.stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]
    if j.get("error"):
        raise RuntimeError(f"fio job error {j['error']}")
    return j


def refusal(srv, err):
    """The server's own last words, when it exited (e.g. rados-nbd refusing a clone)."""
    try:
        with open(os.path.join(srv.work, f"{srv.id}.log")) as f:
            lines = [l.strip() for l in f if l.strip()]
    except OSError:
        lines = []
    why = lines[-1] if lines else str(err)
    if srv.name == US:
        return f"rados-nbd refused the clone: {why}"
    return f"{srv.name} failed: {why}"


def first_writes(uri, region, qd=32, bs=4096):
    """One 4 KiB write per object of REGION, objects in a random order, QD `qd` on one
    connection (libnbd aio), then FLUSH (timed too: a server may only acknowledge durably
    there). Returns IOPS and per-write latency from submit to reply. The image must be
    larger than REGION (the warm-up write goes past it)."""
    import nbd
    offs = [o * OBJ + random.randrange(OBJ // bs) * bs for o in range(region // OBJ)]
    random.shuffle(offs)
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(bs)))
        # Not timed: one write to the image's last block, past the base's data (no copy-up),
        # so one-time costs of the first write (librbd takes the exclusive lock then; rados-nbd
        # holds it from the open) stay out of the figures.
        h.pwrite(bytes(bs), h.get_size() - bs)
        lat, errs = [], []
        todo = iter(offs)
        inflight = [0]

        def submit():
            off = next(todo, None)
            if off is None:
                return False
            t0 = time.perf_counter()

            def done(err, t0=t0, off=off):
                lat.append(time.perf_counter() - t0)
                inflight[0] -= 1
                if err.value:
                    errs.append(f"write at {off}: errno {err.value}")
                return 1  # retire the command

            h.aio_pwrite(buf, off, completion=done)
            inflight[0] += 1
            return True

        t0 = time.perf_counter()
        while inflight[0] < qd and submit():
            pass
        while inflight[0]:
            h.poll(-1)
            while inflight[0] < qd and submit():
                pass
        h.flush()
        el = time.perf_counter() - t0
    finally:
        h.shutdown()
    if errs:
        raise RuntimeError(f"{len(errs)} of {len(offs)} writes failed, first: {errs[0]}")
    lat.sort()
    n = len(lat)
    return {"iops": n / el, "ios": n, "seconds": el,
            "lat_mean_us": sum(lat) / n * 1e6, "lat_p50_us": lat[n // 2] * 1e6,
            "lat_p99_us": lat[min(n - 1, int(n * 0.99))] * 1e6}


class Chain:
    """The base image, the spine of clones, and the leaves hung off it."""

    def __init__(self, ceph, size, region):
        self.ceph, self.size, self.region = ceph, size, region
        self.prefix = f"bench{os.getpid()}-clone"
        self.spine = []
        self.leaves = []

    def base(self):
        return f"{self.prefix}-base"

    def build(self, depth):
        c = self.ceph
        c.rbd("create", "--size", f"{self.size >> 20}M", "--image-feature", bench.FEATURES, f"rbd/{self.base()}")
        # The data, written once through librbd, 4 MiB at a time: every object of REGION exists.
        fio_json(["--name=fill", "--ioengine=rbd", "--clientname=admin", "--pool=rbd",
                  f"--rbdname={self.base()}", "--rw=write", "--bs=4M", "--iodepth=8",
                  f"--size={self.region >> 20}M"], env=c.env())
        parent = self.base()
        for d in range(1, depth):
            child = f"{self.prefix}-c{d}"
            self.snap_clone(parent, child)
            self.spine.append(child)
            parent = child

    def snap_clone(self, parent, child):
        c = self.ceph
        snaps = subprocess.run(["rbd", "-c", c.conf, "snap", "ls", "--format", "json", f"rbd/{parent}"],
                               env=c.env(), capture_output=True, text=True, check=True).stdout
        if not any(s["name"] == "s" for s in json.loads(snaps)):
            c.rbd("snap", "create", "--no-progress", f"rbd/{parent}@s")
        c.rbd("clone", "--rbd-default-clone-format", "2", f"rbd/{parent}@s", f"rbd/{child}")

    def leaf(self, depth, tag):
        """A fresh clone at `depth` (no data, no snapshot of its own)."""
        parent = self.base() if depth == 1 else self.spine[depth - 2]
        child = f"{self.prefix}-{tag}{depth}"
        self.snap_clone(parent, child)
        self.leaves.append(child)
        return child

    def remove(self):
        """Only needed on a cluster we did not start (ours is thrown away whole)."""
        c = self.ceph

        def quiet(*args):
            subprocess.run(["rbd", "-c", c.conf, *args], env=c.env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        for img in self.leaves + list(reversed(self.spine)) + [self.base()]:
            quiet("snap", "purge", "--no-progress", f"rbd/{img}")
            quiet("rm", "--no-progress", f"rbd/{img}")


def serve(name, work, ceph, image):
    cls = bench.RadosNbdCeph if name == US else bench.QemuNbdRbd
    return cls(name, work, ceph, image)


def read_job(name, work, ceph, image, region, runtime, ramp):
    args = ["--name=job", "--rw=randread", "--bs=4k", "--iodepth=1", f"--size={region >> 20}M",
            "--time_based", f"--runtime={runtime}", f"--ramp_time={ramp}", "--randrepeat=0",
            "--norandommap"]
    if name == "fio-rbd":
        return lat_of(fio_json(["--ioengine=rbd", "--clientname=admin", "--pool=rbd",
                                f"--rbdname={image}"] + args, env=ceph.env())["read"])
    srv = serve(name, work, ceph, image)
    try:
        try:
            srv.start()
        except RuntimeError as e:
            return {"error": refusal(srv, e)}
        try:
            return lat_of(fio_json(["--ioengine=nbd", f"--uri={srv.uri()}"] + args)["read"])
        except RuntimeError as e:
            return {"error": f"{name}: reads through the clone failed: {e}"}
    finally:
        srv.stop()


def write_job(name, work, ceph, image, region):
    srv = serve(name, work, ceph, image)
    try:
        try:
            srv.start()
        except RuntimeError as e:
            return {"error": refusal(srv, e)}
        try:
            r = first_writes(srv.uri(), region)
        except Exception as e:  # libnbd errors, failed writes: reported, not fatal
            return {"error": f"{name}: first writes into the clone failed: {e}"}
    finally:
        srv.stop()
    r["objects_after"] = objects_in(ceph, image)
    return r


def objects_in(ceph, image):
    """Objects the leaf holds after the run (its object map, by `rbd du`): one per write plus
    the warm-up's shows that every write created its object, i.e. was a copy-up."""
    p = subprocess.run(["rbd", "-c", ceph.conf, "du", "--format", "json", f"rbd/{image}"], env=ceph.env(),
                       capture_output=True, text=True)
    try:
        return json.loads(p.stdout)["images"][0]["used_size"] // OBJ
    except (ValueError, KeyError, IndexError):
        return None


def median(runs):
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return dict(runs[-1], rounds=len(runs))
    ok.sort(key=lambda r: r["lat_mean_us"])
    return dict(ok[len(ok) // 2], rounds=len(ok))


def run(a, work):
    size, region, runtime, ramp = QUICK if a.quick else FULL
    only = a.only or None
    read_peers = [p for p in READ_PEERS if not only or p in only]
    write_peers = [p for p in WRITE_PEERS if not only or p in only]
    ceph = bench.Ceph.start(work)
    res = {"size": size, "region": region, "runtime_s": runtime, "ramp_s": ramp,
           "features": bench.FEATURES, "clone_format": 2,
           "conf": "loopback one-node cluster" if ceph.started else "$CEPH_CONF",
           "reads": {}, "first_writes": {}}
    chain = Chain(ceph, size, region)
    try:
        t0 = time.time()
        chain.build(max(READ_DEPTHS + WRITE_DEPTHS))
        leaves = {d: chain.leaf(d, "r") for d in READ_DEPTHS}
        log(f"chain of {len(chain.spine)} clones + {len(leaves)} leaves over {region >> 20} MiB of data: "
            f"{time.time() - t0:.1f} s")
        runs = {}
        for rnd in range(a.rounds):
            for k, d in enumerate(READ_DEPTHS):
                # Peers take turns depth by depth, the first one rotating (as in run_dir).
                first = (k + rnd) % len(read_peers)
                for n in read_peers[first:] + read_peers[:first]:
                    r = read_job(n, work, ceph, leaves[d], region, runtime, ramp)
                    runs.setdefault(str(d), {}).setdefault(n, []).append(r)
                    log(f"read  depth {d:2} {n:10} " + (r["error"] if "error" in r else
                        f"{r['iops']:8.0f} IOPS  mean {r['lat_mean_us']:8.1f} us  p50 "
                        f"{r['lat_p50_us']:8.1f}  p99 {r['lat_p99_us']:8.1f}"))
        res["reads"] = {d: {n: median(v) for n, v in per.items()} for d, per in runs.items()}
        for d in WRITE_DEPTHS:
            for n in write_peers:
                # Every peer gets its own fresh leaf: all its writes are first writes.
                img = chain.leaf(d, f"w{bench.slug(n)}-")
                r = write_job(n, work, ceph, img, region)
                res["first_writes"].setdefault(str(d), {})[n] = r
                log(f"first writes depth {d:2} {n:10} " + (r["error"] if "error" in r else
                    f"{r['iops']:8.0f} IOPS  mean {r['lat_mean_us']:8.1f} us  p50 "
                    f"{r['lat_p50_us']:8.1f}  p99 {r['lat_p99_us']:8.1f}  ({r['ios']} writes, "
                    f"{r['objects_after']} objects after)"))
    finally:
        if not ceph.started:
            chain.remove()
        ceph.stop()
    return res


# ---------------------------------------------------------------------------- report

def targets(c):
    """The issue's targets, each with the measured ratio and met / missed / not run."""
    out = []
    reads, writes = c.get("reads", {}), c.get("first_writes", {})

    def lat(d, n):
        r = reads.get(str(d), {}).get(n)
        return r["lat_mean_us"] if r and "error" not in r and r.get("lat_mean_us") else None

    l1, l16 = lat(1, US), lat(16, US)
    out.append({"target": f"reads: {US} mean latency at depth 16 <= {DEPTH_FLAT:.2f}x its depth 1",
                "ratio": l16 / l1 if l1 and l16 else None, "need": DEPTH_FLAT, "cmp": "<="})
    for d in READ_DEPTHS:
        for p in READ_PEERS[1:]:
            us, peer = lat(d, US), lat(d, p)
            out.append({"target": f"reads at depth {d}: {US} at least as fast as {p} "
                                  f"(mean latency {p} / {US})",
                        "ratio": peer / us if us and peer else None, "need": 1.0, "cmp": ">="})
    for d in WRITE_DEPTHS:
        per = writes.get(str(d), {})
        us, q = per.get(US, {}), per.get("qemu-nbd", {})
        ok = "error" not in us and "error" not in q and us.get("iops") and q.get("iops")
        out.append({"target": f"first writes (copy-up) at depth {d}: {US} >= {COPYUP_NEED}x qemu-nbd (IOPS)",
                    "ratio": us["iops"] / q["iops"] if ok else None, "need": COPYUP_NEED, "cmp": ">="})
    for t in out:
        if t["ratio"] is None:
            t["status"] = "not run"
        elif t["cmp"] == "<=":
            t["status"] = "met" if t["ratio"] <= t["need"] else "missed"
        else:
            t["status"] = "met" if t["ratio"] >= t["need"] else "missed"
    return out


def cell(r):
    if r is None:
        return "-"
    if "error" in r:
        return "failed (below)"
    return f"{r['lat_mean_us']:.0f} / {r['lat_p50_us']:.0f} / {r['lat_p99_us']:.0f} µs, {r['iops']:.0f} IOPS"


def write_report(results, out):
    c = results["clone_depth"]
    results["targets"] = targets(c)
    with open(os.path.join(out, "clone-depth.json"), "w") as f:
        json.dump(results, f, indent=1)
    m = results["machine"]
    lines = [f"# Clone depth ({results['date']}{', --quick: a smoke run, not results' if results.get('quick') else ''})",
             "",
             f"Machine: {m.get('cpu_model', '?')}, {m['cpus']} CPUs, {m.get('mem_gib', '?')} GiB RAM, "
             f"kernel {m['kernel']}; {m['note']}. Load average at start {results.get('load_start')}, "
             f"at end {results.get('load_end')}.",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()) + ".", "",
             f"Ceph: {c['conf']}. Base image {c['size'] >> 20} MiB ({c['features']}), data in its first "
             f"{c['region'] >> 20} MiB; each leaf a fresh clone (format {c['clone_format']}) at that depth "
             "of a chain made with `rbd snap create` + `rbd clone`, holding nothing of its own.", "",
             f"## Reads of data only in the base: 4 KiB random, QD 1, {c['runtime_s']} s after a "
             f"{c['ramp_s']} s warm-up", "",
             "fio completion latency mean / p50 / p99 and IOPS; rados-nbd and qemu-nbd through fio's "
             "nbd engine over a unix socket, fio-rbd is librbd in fio's own process (no NBD hop).", ""]
    reads = c.get("reads", {})
    peers = bench.peers_of(reads)
    others = [p for p in peers if p != US]
    lines += ["| depth | " + " | ".join(peers) + " | " + " | ".join(f"{p} / {US} (mean latency)" for p in others) + " |",
              "|---" * (1 + len(peers) + len(others)) + "|"]
    errors = []
    for d, per in reads.items():
        rat = []
        for p in others:
            a, b = per.get(US, {}), per.get(p, {})
            ok = "error" not in a and "error" not in b and a.get("lat_mean_us") and b.get("lat_mean_us")
            rat.append(f"{b['lat_mean_us'] / a['lat_mean_us']:.2f}" if ok else "-")
        lines.append(f"| {d} | " + " | ".join(cell(per.get(p)) for p in peers) + " | " + " | ".join(rat) + " |")
        errors += [f"- reads, depth {d}, {p}: {r['error']}" for p, r in per.items() if "error" in r]
    lines.append("")
    writes = c.get("first_writes", {})
    lines += ["## First writes (copy-up): 4 KiB at QD 32 into a fresh leaf, one write per object of the data "
              "(random order and offset), then FLUSH", "",
              "libnbd aio on one connection; latency from submit to reply, mean / p50 / p99; IOPS over "
              "all the writes and the final FLUSH.", ""]
    wpeers = bench.peers_of(writes)
    wothers = [p for p in wpeers if p != US]
    lines += ["| depth | " + " | ".join(wpeers) + " | " + " | ".join(f"{US} / {p} (IOPS)" for p in wothers) + " |",
              "|---" * (1 + len(wpeers) + len(wothers)) + "|"]
    for d, per in writes.items():
        rat = []
        for p in wothers:
            a, b = per.get(US, {}), per.get(p, {})
            ok = "error" not in a and "error" not in b and a.get("iops") and b.get("iops")
            rat.append(f"{a['iops'] / b['iops']:.2f}" if ok else "-")
        n = next((r["ios"] for r in per.values() if "ios" in r), "?")
        lines.append(f"| {d} ({n} writes; objects in the leaf after: "
                     + ", ".join(f"{p} {r.get('objects_after', '?')}" for p, r in per.items() if "ios" in r)
                     + ") | " + " | ".join(cell(per.get(p)) for p in wpeers) + " | "
                     + " | ".join(rat) + " |")
        errors += [f"- first writes, depth {d}, {p}: {r['error']}" for p, r in per.items() if "error" in r]
    lines.append("")
    if errors:
        lines += ["## Failures", ""] + errors + [""]
    bench.finish_report(lines, "Targets (issue 16)", results["targets"], os.path.join(out, "clone-depth.md"))
    chart(results, out)


def chart(results, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no chart (apt-get install python3-matplotlib)")
        return
    c = results["clone_depth"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    reads = c.get("reads", {})
    # Mean and p99 on their own axes: a p99 ten times the mean would flatten the means.
    for ax, key, what in ((axes[0], "lat_mean_us", "mean"), (axes[1], "lat_p99_us", "p99")):
        for i, p in enumerate(bench.peers_of(reads)):
            pts = [(int(d), per[p]) for d, per in reads.items() if p in per and "error" not in per[p]]
            if not pts:
                ax.plot([], [], color=f"C{i}", label=f"{p}: failed")
                continue
            ax.plot([d for d, _ in pts], [r[key] for _, r in pts], "o-", color=f"C{i}", label=p)
        ax.set_xscale("log", base=2)
        ax.set_xticks(READ_DEPTHS, [str(d) for d in READ_DEPTHS])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("clone depth (levels from the leaf up to the data)")
        ax.set_ylabel(f"4 KiB random read at QD 1, {what} latency (µs)")
        ax.set_title(f"Reads through a clone chain, {what} (lower is better)\n{results['date']}", fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[2]
    writes = c.get("first_writes", {})
    for i, p in enumerate(bench.peers_of(writes)):
        pts = [(int(d), per[p]) for d, per in writes.items() if p in per and "error" not in per[p]]
        if not pts:
            ax.plot([], [], color=f"C{i}", label=f"{p}: failed")
            continue
        ax.plot([d for d, _ in pts], [r["iops"] for _, r in pts], "o-", color=f"C{i}", label=p)
    ax.set_xticks(WRITE_DEPTHS, [str(d) for d in WRITE_DEPTHS])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("clone depth")
    ax.set_ylabel("4 KiB first writes at QD 32, IOPS")
    ax.set_title("First writes (copy-up), higher is better", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "clone-depth.png"), dpi=90)


def main(a):
    import shutil
    import tempfile
    work = tempfile.mkdtemp(prefix="rados-nbd-bench.", dir="/var/tmp")
    results = {"machine": bench.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "quick": a.quick, "load_start": bench.loadavg()}
    try:
        results["clone_depth"] = run(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_end"] = bench.loadavg()
    os.makedirs(a.out, exist_ok=True)
    write_report(results, a.out)
