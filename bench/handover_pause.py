#!/usr/bin/python3
"""The I/O pause of a lock hand-over (issue 17: live migration), on Ceph.

A 1 TiB image (4 MiB objects) with 4 KiB written into each of N objects (default 10k)
moves between owners while a client writes. The pause is measured from the source's last
acknowledged write to the destination's first acknowledged write, start-up included:

  rados-nbd -> rados-nbd  the destination is `serve --wait-for-lock`, started right after
                          the source's last write (process start, cluster connect, open,
                          hand-over, map load, first write)
  rados-nbd -> rados-nbd, started in advance
                          the destination is a plain `serve` started while the source
                          serves (it opens without the lock, as librbd does, and reads);
                          the pause runs from the source's last write to the
                          destination's first, which asks the source for the lock
  rados-nbd -> librbd     python3-rbd opens the image and writes (librbd asks us for the
                          lock, we write our map, clear the flag and release)
  librbd -> rados-nbd     librbd writes, then `serve --wait-for-lock` takes the lock from it
                          (librbd releases; we load the map librbd keeps valid)
  kill -9 -> rados-nbd    no hand-over: the source dies, a plain `serve` waits for its watch
                          to expire (osd_client_watch_timeout), fences it and serves while the
                          map is rebuilt: what a migration without a cooperative owner costs

Figures are printed (and written to --out as JSON), never asserted.

    CEPH_CONF=... /usr/bin/python3 bench/handover_pause.py [--objects N] [--rounds R]
        [--id ID --keyring FILE] [--out FILE.json] [--no-kill]

Uses $RADOS_NBD_BIN (default target/release/rados-nbd, built with feature ceph); the
image lives in pool rbd and is removed after.
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time

import nbd
import rados
import rbd

OBJ = 4 << 20
SIZE = 1 << 40


def wait_connect(uri, sock, proc, deadline):
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode} before listening")
        if os.path.exists(sock):
            h = nbd.NBD()
            try:
                h.connect_uri(uri)
                return h
            except nbd.Error:
                pass
        if time.time() > deadline:
            raise RuntimeError(f"{sock} never served")
        time.sleep(0.001)


def acquired(log):
    """What a destination's log says of its open: how long the lock took, map loaded or not."""
    dl = open(log).read()
    acq = re.search(r"acquired exclusive lock in ([0-9.]+) ms", dl)
    return (f"(lock acquired in {acq.group(1) if acq else '?'} ms, "
            f"map {'REBUILT' if 'rebuilding object map' in dl else 'loaded'})")


def write_for(write, seconds, rng_off):
    """QD1 4 KiB writes for `seconds`; the time right after the last acknowledgement."""
    end = time.time() + seconds
    i = 0
    while time.time() < end:
        write(b"\x42" * 4096, ((rng_off + i * 7919) % (SIZE // OBJ)) * OBJ + 8192)
        i += 1
    return time.time()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--id")
    ap.add_argument("--keyring")
    ap.add_argument("--out")
    ap.add_argument("--no-kill", action="store_true")
    a = ap.parse_args()
    conf = os.environ["CEPH_CONF"]
    binary = os.path.abspath(os.environ.get("RADOS_NBD_BIN", "target/release/rados-nbd"))
    rn = [binary, "--store", f"ceph:{conf}"]
    if a.id:
        rn += ["--id", a.id, "--keyring", a.keyring]
    work = tempfile.mkdtemp(prefix="rados-nbd-handover-")
    img = f"handover-bench-{os.getpid()}"
    env = dict(os.environ, RUST_LOG="info")
    procs = []
    n_sock = [0]

    def serve(*extra):
        n_sock[0] += 1
        sock = os.path.join(work, f"s{n_sock[0]}.sock")
        log = os.path.join(work, f"s{n_sock[0]}.log")
        p = subprocess.Popen(rn + ["serve", img, "--socket", sock, *extra], env=env,
                             stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        procs.append(p)
        return p, sock, log, f"nbd+unix:///{img}?socket={sock}"

    def stop(p):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait()

    cluster = rados.Rados(conffile=conf)
    cluster.connect()
    io = cluster.open_ioctx("rbd")
    res = {"objects": a.objects, "image_size": SIZE, "object_size": OBJ, "modes": {}}

    def note(mode, pause, extra=""):
        res["modes"].setdefault(mode, []).append(pause)
        print(f"{mode:24}: pause {pause * 1000:8.1f} ms {extra}", flush=True)

    try:
        subprocess.run(rn + ["create", "--size", f"{SIZE}B", img], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        src, sock, log, uri = serve()
        h = wait_connect(uri, sock, src, time.time() + 60)
        stride = (SIZE // OBJ) // a.objects
        buf = bytearray(b"\x5a" * 4096)
        for o in range(a.objects):
            h.aio_pwrite(buf, o * stride * OBJ)
            while h.aio_in_flight() >= 64:
                h.poll(-1)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        h.flush()
        h.shutdown()
        for r in range(a.rounds):
            # rados-nbd -> rados-nbd
            h = nbd.NBD()
            h.connect_uri(uri)
            t_last = write_for(h.pwrite, 0.5, r)
            h.shutdown()
            dst, dsock, dlog, duri = serve("--wait-for-lock")
            h = wait_connect(duri, dsock, dst, time.time() + 120)
            h.pwrite(b"\x43" * 4096, 4096)
            pause = time.time() - t_last
            assert h.pread(4096, 0) == bytes(buf), "the source's data, through the destination"
            h.shutdown()
            note("rados-nbd -> rados-nbd", pause, acquired(dlog))
            stop(src)
            src, sock, log, uri = dst, dsock, dlog, duri
            # rados-nbd -> rados-nbd, the destination started in advance (a migration's
            # destination host maps the image before the switch-over): a plain `serve` of
            # the image in use opens without the lock, as librbd does; at the switch-over
            # its first write asks the source for it.
            h = nbd.NBD()
            h.connect_uri(uri)
            write_for(h.pwrite, 0.1, r + 40)
            dst, dsock, dlog, duri = serve()
            h2 = wait_connect(duri, dsock, dst, time.time() + 120)
            assert h2.pread(4096, 0) == bytes(buf), "the source's data, read without the lock"
            t_last = write_for(h.pwrite, 0.5, r + 50)
            h.shutdown()
            h2.pwrite(b"\x47" * 4096, 4096)
            pause = time.time() - t_last
            assert h2.pread(4096, 0) == bytes(buf), "the source's data, through the destination"
            h2.shutdown()
            dl = open(dlog).read()
            took = re.findall(r"lock taken back after ([0-9.]+) ms(?:; ([a-z ]+))?", dl)
            note("rados-nbd -> rados-nbd, started in advance", pause,
                 f"(lock taken back in {took[-1][0] + ' ms, ' + took[-1][1] if took else '?'})")
            stop(src)
            src, sock, log, uri = dst, dsock, dlog, duri
            # rados-nbd -> librbd
            h = nbd.NBD()
            h.connect_uri(uri)
            t_last = write_for(h.pwrite, 0.5, r + 100)
            image = rbd.Image(io, img)
            image.write(b"\x44" * 4096, 4096)
            pause = time.time() - t_last
            note("rados-nbd -> librbd", pause, "(open + first write)")
            # librbd -> rados-nbd
            t_last = write_for(image.write, 0.5, r + 200)
            h.shutdown()
            dst, dsock, dlog, duri = serve("--wait-for-lock")
            h2 = wait_connect(duri, dsock, dst, time.time() + 120)
            h2.pwrite(b"\x45" * 4096, 4096)
            pause = time.time() - t_last
            h2.shutdown()
            note("librbd -> rados-nbd", pause, acquired(dlog))
            image.close()
            stop(src)
            src, sock, log, uri = dst, dsock, dlog, duri
        if not a.no_kill:
            h = nbd.NBD()
            h.connect_uri(uri)
            t_last = write_for(h.pwrite, 0.5, 999)
            h.shutdown()
            src.send_signal(signal.SIGKILL)
            src.wait()
            dst, dsock, dlog, duri = serve()
            h = wait_connect(duri, dsock, dst, time.time() + 300)
            h.pwrite(b"\x46" * 4096, 4096)
            pause = time.time() - t_last
            h.shutdown()
            note("kill -9 -> rados-nbd", pause, "(watch timeout, fencing, map rebuilt in the background)")
            src = dst
        for mode, v in res["modes"].items():
            print(f"{mode:24}: median pause {statistics.median(v) * 1000:.1f} ms over {len(v)}")
        res["median_ms"] = {m: statistics.median(v) * 1000 for m, v in res["modes"].items()}
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
    finally:
        for p in procs:
            stop(p)
        io.close()
        cluster.shutdown()
        subprocess.run(["rbd", "rm", "--no-progress", img], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
