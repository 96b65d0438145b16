#!/usr/bin/python3
"""Time to first I/O after a crash (issue 17), on the directory store.

An image with many objects written is served, killed with SIGKILL (its map is then
flagged invalid), and served again: measured from the start of `rados-nbd serve` until a
client's first 4 KiB read is answered, and until the daemon logs that the map is
rebuilt; each round ends with another SIGKILL, so every start is a crashed one. Two
modes, alternating round by round: `before` (RADOS_NBD_REBUILD_BEFORE_SERVING=1: the map
is rebuilt before serving, as before issue 17) and `after` (served at once, rebuilt in the
background). Figures are printed, never asserted.

    /usr/bin/python3 bench/crash_reopen.py [--objects N] [--rounds R] [--out FILE.json]
        [--image-size BYTES --object-size BYTES] [--ceph CONF [--id ID --keyring FILE]]

By default the image holds exactly the objects written (64 KiB each); with --image-size
(e.g. 10 TiB, the issue's goal: 100k objects written in a 10 TiB image of 4 MiB objects)
the written objects are spread evenly over a larger image.

Uses $RADOS_NBD_BIN (default target/release/rados-nbd). With --ceph the image lives in
the cluster of CONF (pool rbd; the binary built with feature ceph) and is removed after;
each timed open starts once the OSD has dropped the killed daemon's watch (see
`wait_unwatched`), so it measures the reopen, fencing and lock break included.
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

OSIZE = 64 << 10


def wait_socket(path, proc, deadline):
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode} before listening")
        if time.time() > deadline:
            raise RuntimeError(f"{path} never appeared")
        time.sleep(0.001)


def serve(rn, img, sock, log, env):
    if os.path.exists(sock):
        os.unlink(sock)
    return subprocess.Popen(rn + ["serve", img, "--socket", sock], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def wait_unwatched(header, deadline):
    """Ceph: until the OSD has dropped the killed daemon's watch on the header
    (osd_client_watch_timeout), so the timed open measures the reopen of a crashed image
    (fencing, lock break, map), not the wait for a dead client's watch, which is the
    same for every client and every map strategy."""
    while time.time() < deadline:
        out = subprocess.run(["rados", "-p", "rbd", "listwatchers", header],
                             capture_output=True, text=True).stdout
        if "watcher=" not in out:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{header} still watched")


def kill9(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=40000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--ceph", metavar="CONF")
    ap.add_argument("--id")
    ap.add_argument("--keyring")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--object-size", type=int, default=OSIZE)
    a = ap.parse_args()
    osize = a.object_size
    size = a.image_size or a.objects * osize
    stride = (size // osize) // a.objects
    assert stride >= 1, "more objects than the image holds"
    binary = os.path.abspath(os.environ.get("RADOS_NBD_BIN", "target/release/rados-nbd"))
    work = tempfile.mkdtemp(prefix="rados-nbd-crash-")
    try:
        env = dict(os.environ, RADOS_NBD_STORE=os.path.join(work, "store"), RUST_LOG="info")
        os.makedirs(env["RADOS_NBD_STORE"])
        sock = os.path.join(work, "nbd.sock")
        rn = [binary]
        img = "img"
        if a.ceph:
            rn += ["--store", f"ceph:{a.ceph}"]
            if a.id:
                rn += ["--id", a.id, "--keyring", a.keyring]
            img = f"crash-bench-{os.getpid()}"
        uri = f"nbd+unix:///{img}?socket={sock}"
        subprocess.run(rn + ["create", "--size", f"{size}B", "--object-size",
                        str(osize), img], env=env, check=True, stdout=subprocess.DEVNULL)
        p = serve(rn, img, sock, os.path.join(work, "fill.log"), env)
        wait_socket(sock, p, time.time() + 60)
        h = nbd.NBD()
        h.connect_uri(uri)
        buf = bytearray(b"\x5a" * 4096)
        pending = []
        for o in range(a.objects):
            pending.append(h.aio_pwrite(buf, o * stride * osize))
            if len(pending) >= 64:
                while h.aio_in_flight() > 0:
                    h.poll(-1)
                pending.clear()
        while h.aio_in_flight() > 0:
            h.poll(-1)
        h.flush()
        h.shutdown()
        kill9(p)
        header = None
        if a.ceph:
            info = subprocess.run(["rbd", "info", "--format", "json", img], capture_output=True,
                                  text=True, check=True).stdout
            header = "rbd_header." + json.loads(info)["id"]
        res = {"objects": a.objects, "object_size": osize, "image_size": size,
               "store": "ceph" if a.ceph else "dir", "modes": {}}
        for r in range(a.rounds):
            for mode in ("before", "after") if r % 2 == 0 else ("after", "before"):
                e = dict(env)
                if mode == "before":
                    e["RADOS_NBD_REBUILD_BEFORE_SERVING"] = "1"
                log = os.path.join(work, f"{mode}-{r}.log")
                if header:
                    wait_unwatched(header, time.time() + 120)
                t0 = time.time()
                p = serve(rn, img, sock, log, e)
                wait_socket(sock, p, t0 + 600)
                h = nbd.NBD()
                while True:
                    try:
                        h.connect_uri(uri)
                        break
                    except nbd.Error:
                        if time.time() > t0 + 600:
                            raise
                        time.sleep(0.001)
                got = h.pread(4096, (r * 7919 % a.objects) * stride * osize)
                first = time.time() - t0
                assert got == bytes(buf), "the data written before the crash"
                while not re.search(r"object map of .* rebuilt", open(log).read()):
                    if time.time() > t0 + 600:
                        raise RuntimeError(f"no rebuild logged in {log}")
                    time.sleep(0.005)
                rebuilt = time.time() - t0
                h.shutdown()
                kill9(p)
                m = res["modes"].setdefault(mode, {"first_io": [], "rebuilt": []})
                m["first_io"].append(first)
                m["rebuilt"].append(rebuilt)
                print(f"round {r} {mode:6}: first I/O after {first * 1000:8.1f} ms, "
                      f"map rebuilt after {rebuilt * 1000:8.1f} ms", flush=True)
        for mode, m in res["modes"].items():
            m["first_io_median"] = statistics.median(m["first_io"])
            m["rebuilt_median"] = statistics.median(m["rebuilt"])
            print(f"{mode:6}: median first I/O {m['first_io_median'] * 1000:.1f} ms, "
                  f"median map rebuilt {m['rebuilt_median'] * 1000:.1f} ms "
                  f"({a.objects} objects of {osize >> 10} KiB written, image {size >> 30} GiB)")
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
    finally:
        if a.ceph:
            # Served once more and closed cleanly (the lock of the last kill broken), then removed.
            subprocess.run(rn + ["rm", img], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
