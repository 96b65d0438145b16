#!/usr/bin/env python3
"""rados-nbd benchmarks: the same fio jobs, in one run, against rados-nbd and the servers a
user would pick instead. Results are ratios within this run, never absolute promises.

  bench/run.sh [--quick] [--ceph] [--only PEER,...]

Writes bench/results.json, bench/results.md and bench/ratios.png.
"""
import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.environ.get("RADOS_NBD_BIN", os.path.join(ROOT, "target/release/rados-nbd"))

# (name, fio rw, block size, iodepth)
JOBS = [
    ("seqwrite-1M-qd8", "write", "1M", 8),
    ("randwrite-4k-qd1", "randwrite", "4k", 1),
    ("randwrite-4k-qd32", "randwrite", "4k", 32),
    ("randread-4k-qd1", "randread", "4k", 1),
    ("randread-4k-qd32", "randread", "4k", 32),
    ("seqread-1M-qd8", "read", "1M", 8),
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def wait_socket(path, proc, timeout=30):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(path):
            return time.time() - t0
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        time.sleep(0.01)
    raise RuntimeError(f"{path} never appeared")


def proc_cpu_rss(pid):
    """CPU seconds (user+sys) and peak RSS (KiB) of a process, from /proc."""
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


class Server:
    """A peer: started on a unix socket with a fresh backing of `size` bytes."""

    def __init__(self, name, work, size):
        self.name, self.work, self.size = name, work, size
        self.sock = os.path.join(work, f"{name}.sock")
        self.proc = None
        self.export = ""

    def uri(self):
        return f"nbd+unix:///{self.export}?socket={self.sock}"

    def start(self):
        argv, env = self.argv()
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.work, f"{self.name}.log"), "w"))
        self.open_seconds = wait_socket(self.sock, self.proc)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.exists(self.sock):
            os.unlink(self.sock)


class RadosNbdDir(Server):
    def argv(self):
        store = os.path.join(self.work, "store")
        os.makedirs(store, exist_ok=True)
        env = dict(os.environ, RADOS_NBD_STORE=store)
        img = f"bench{int(time.time() * 1000) % 10**9}"
        subprocess.run([BIN, "create", "--size", str(self.size), img], env=env, check=True)
        self.export = img
        return [BIN, "serve", img, "--socket", self.sock], env


class SparseFilePeer(Server):
    def backing(self):
        path = os.path.join(self.work, f"{self.name}.raw")
        if os.path.exists(path):
            os.unlink(path)
        with open(path, "wb") as f:
            f.truncate(self.size)
        return path


class NbdkitFile(SparseFilePeer):
    def argv(self):
        return ["nbdkit", "-f", "-U", self.sock, "file", self.backing()], None


class QemuNbd(SparseFilePeer):
    def argv(self):
        return ["qemu-nbd", "-f", "raw", "-k", self.sock, "-t", "-e", "16", "--discard=unmap", "--cache=writeback", "--aio=threads", self.backing()], None


class NbdkitMemory(Server):
    def argv(self):
        return ["nbdkit", "-f", "-U", self.sock, "memory", str(self.size)], None


class NbdkitNull(Server):
    def argv(self):
        return ["nbdkit", "-f", "-U", self.sock, "null", str(self.size)], None


def fio(uri, job, runtime, ramp, region):
    name, rw, bs, qd = job
    argv = [
        "fio", "--output-format=json", f"--name={name}", "--ioengine=nbd", f"--uri={uri}",
        f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", f"--size={region}", "--time_based",
        f"--runtime={runtime}", f"--ramp_time={ramp}", "--randrepeat=0", "--norandommap",
    ]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]
    side = j["read"] if "read" in rw else j["write"]
    return {"iops": side["iops"], "mib_s": side["bw_bytes"] / 2**20, "bytes": side["io_bytes"]}


def trim_seconds(uri, size):
    """Discard a whole image with NBD TRIM requests of the largest size the server allows."""
    code = f"""
import nbd, time
h = nbd.NBD(); h.connect_uri({uri!r})
mx = min(h.get_block_size(nbd.SIZE_MAXIMUM) or (32 << 20), 2**32 - 2**20)
step = (2**32 - 2**20) if h.can_trim() else mx
t0 = time.time(); off = 0; size = h.get_size()
while off < size:
    n = min(step, size - off); h.trim(n, off); off += n
h.flush(); print(time.time() - t0); h.shutdown()
"""
    out = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        return None
    return float(out.stdout.strip())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="5 s per job instead of 20")
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default=HERE)
    a = ap.parse_args()
    runtime, ramp = (5, 1) if a.quick else (20, 3)
    size, region = 8 << 30, "1G"
    peers = [("rados-nbd", RadosNbdDir), ("nbdkit", NbdkitFile), ("qemu-nbd", QemuNbd),
             ("nbdkit-memory", NbdkitMemory), ("nbdkit-null", NbdkitNull)]
    if a.only:
        keep = a.only.split(",")
        peers = [p for p in peers if p[0] in keep]
    work = tempfile.mkdtemp(prefix="rados-nbd-bench.", dir="/var/tmp")
    results = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "note": "shared machine, 2 cores; compare ratios within one run only"},
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "runtime_s": runtime, "jobs": {}, "extra": {}}
    try:
        for peer, cls in peers:
            srv = cls(peer, work, size)
            srv.start()
            log(f"{peer}: started in {srv.open_seconds:.3f}s")
            moved = 0
            cpu0, _ = proc_cpu_rss(srv.proc.pid)
            for job in JOBS:
                r = fio(srv.uri(), job, runtime, ramp, region)
                moved += r["bytes"]
                results["jobs"].setdefault(job[0], {})[peer] = r
                log(f"{peer:14} {job[0]:20} {r['iops']:10.0f} IOPS {r['mib_s']:8.1f} MiB/s")
            cpu1, hwm = proc_cpu_rss(srv.proc.pid)
            results["extra"].setdefault("cpu_s_per_gib", {})[peer] = (cpu1 - cpu0) / max(moved / 2**30, 1e-9)
            results["extra"].setdefault("peak_rss_mib", {})[peer] = hwm / 1024
            srv.stop()
            # Whole-image discard of a fresh 1 TiB image, and time to open a 10 TiB image.
            if peer in ("rados-nbd", "nbdkit", "qemu-nbd"):
                big = cls(peer + "-1t", work, 1 << 40)
                big.start()
                t = trim_seconds(big.uri(), 1 << 40)
                big.stop()
                results["extra"].setdefault("discard_1tib_s", {})[peer] = t
                huge = cls(peer + "-10t", work, 10 << 40)
                huge.start()
                results["extra"].setdefault("open_10tib_s", {})[peer] = huge.open_seconds
                huge.stop()
                log(f"{peer}: discard 1 TiB {t}s, open 10 TiB {huge.open_seconds:.3f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_reports(results, a.out)


def write_reports(results, out):
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    peers = []
    for job in results["jobs"].values():
        for p in job:
            if p not in peers:
                peers.append(p)
    lines = [f"# Benchmark results ({results['date']})", "",
             f"Machine: {results['machine']['cpus']} CPUs, kernel {results['machine']['kernel']}; {results['machine']['note']}.",
             f"fio --ioengine=nbd over unix sockets, {results['runtime_s']} s per job after a warm-up. "
             "`ratio` = rados-nbd / peer (higher is better for rados-nbd).", "",
             "| job | " + " | ".join(peers) + " | " + " | ".join(f"ratio vs {p}" for p in peers if p != "rados-nbd") + " |",
             "|---" * (1 + len(peers) + len(peers) - 1) + "|"]
    for job, r in results["jobs"].items():
        metric = "mib_s" if "1M" in job else "iops"
        unit = " MiB/s" if metric == "mib_s" else ""
        cells = [f"{r[p][metric]:.0f}{unit}" if p in r else "-" for p in peers]
        ours = r.get("rados-nbd", {}).get(metric)
        ratios = [f"{ours / r[p][metric]:.2f}" if ours and p in r and r[p][metric] else "-" for p in peers if p != "rados-nbd"]
        lines.append(f"| {job} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines.append("")
    for k, v in results["extra"].items():
        lines.append(f"- {k}: " + ", ".join(f"{p} {x:.3f}" if isinstance(x, float) else f"{p} {x}" for p, x in v.items()))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        others = [p for p in peers if p != "rados-nbd"]
        jobs = list(results["jobs"])
        fig, ax = plt.subplots(figsize=(10, 5))
        w = 0.8 / max(len(others), 1)
        for i, p in enumerate(others):
            vals = []
            for j in jobs:
                r = results["jobs"][j]
                m = "mib_s" if "1M" in j else "iops"
                vals.append(r["rados-nbd"][m] / r[p][m] if "rados-nbd" in r and p in r and r[p][m] else 0)
            ax.bar([x + i * w for x in range(len(jobs))], vals, w, label=f"rados-nbd / {p}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([x + w * (len(others) - 1) / 2 for x in range(len(jobs))], jobs, rotation=20)
        ax.set_ylabel("ratio (rados-nbd / peer)")
        ax.set_title(f"rados-nbd vs peers, same run ({results['date']})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "ratios.png"), dpi=100)
    except ImportError:
        log("matplotlib missing: no chart (apt-get install python3-matplotlib)")


if __name__ == "__main__":
    main()
