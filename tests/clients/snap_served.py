#!/usr/bin/python3
"""Snapshots of a served image are exact (directory store): while clients write, snapshots
are taken through `rados-nbd snap create` (which asks the serving daemon); each snapshot,
served read-only afterwards, must hold every write acknowledged before its request was
sent and none sent after it returned.

Usage: snap_served.py BIN IMAGE SOCKET SNAP_SOCKET ROUNDS
  (IMAGE served on SOCKET; each snapshot is served on SNAP_SOCKET to be read back)
Prints PASS/FAIL lines; exits non-zero on failure.
"""
import hashlib
import os
import subprocess
import sys
import threading
import time

import nbd

BS = 4096
BLOCKS = 2048  # 8 MiB: two 4 MiB objects' worth of 4 KiB blocks, spread over the image
WRITERS = 4


def main(binary, image, sock, snap_sock, rounds):
    rounds = int(rounds)
    uri = f"nbd+unix:///{image}?socket={sock}"
    # Per block, the (send time, ack time, digest) of every write, in order.
    log = {}
    lock = threading.Lock()
    stop = threading.Event()
    errors = []

    def writer(k):
        h = nbd.NBD()
        seq = 0
        try:
            h.connect_uri(uri)
            while not stop.is_set():
                b = (seq * WRITERS + k) % BLOCKS
                seq += 1
                data = os.urandom(BS)
                sent = time.monotonic()
                # Spread blocks over the image: block b at 64 KiB * b.
                h.pwrite(data, b * 65536)
                acked = time.monotonic()
                with lock:
                    log.setdefault(b, []).append((sent, acked, hashlib.sha256(data).digest()))
        except nbd.Error as e:
            errors.append(f"writer {k}: {e}")
        finally:
            h.shutdown()

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(WRITERS)]
    for t in threads:
        t.start()
    snaps = []
    bad = 0
    try:
        for r in range(rounds):
            time.sleep(0.3)
            name = f"live{r}"
            t0 = time.monotonic()
            p = subprocess.run([binary, "snap", "create", f"{image}@{name}"],
                               capture_output=True, text=True)
            t1 = time.monotonic()
            if p.returncode != 0:
                print(f"FAIL snap create {image}@{name} while served: {p.stderr.strip()}")
                bad += 1
                continue
            snaps.append((name, t0, t1))
    finally:
        stop.set()
        for t in threads:
            t.join()
    if errors:
        print(f"FAIL writers while snapshots were taken: {errors[:3]}")
        return 1
    if bad:
        return 1
    if sum(len(v) for v in log.values()) == 0:
        print("FAIL no write was acknowledged while the snapshots were taken")
        return 1
    print(f"PASS {len(snaps)} snapshots taken while {WRITERS} clients wrote "
          f"({sum(len(v) for v in log.values())} acked writes)")
    return 0 if verify(binary, image, snap_sock, snaps, log) else 1


def verify(binary, image, sock, snaps, log):
    """Serves each snapshot read-only and checks every block against the write log."""
    ok = True
    for name, t0, t1 in snaps:
        srv = subprocess.Popen([binary, "serve", f"{image}@{name}", "--socket", sock],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                if os.path.exists(sock):
                    break
                time.sleep(0.05)
            h = nbd.NBD()
            h.connect_uri(f"nbd+unix:///{image}?socket={sock}")
            wrong = 0
            for b, writes in log.items():
                got = hashlib.sha256(h.pread(BS, b * 65536)).digest()
                # Allowed: the last write acked before t0, or any write in flight across
                # the snapshot (sent before t1 and acked after t0); never one sent after t1.
                before = [w for w in writes if w[1] < t0]
                allowed = {w[2] for w in writes if w[0] <= t1 and w[1] >= t0}
                allowed.add(before[-1][2] if before else hashlib.sha256(bytes(BS)).digest())
                if got not in allowed:
                    wrong += 1
            h.shutdown()
        finally:
            srv.terminate()
            srv.wait()
            try:
                os.unlink(sock)
            except FileNotFoundError:
                pass
        if wrong:
            ok = False
            print(f"FAIL snapshot {name}: {wrong} of {len(log)} blocks are not what was "
                  f"acknowledged before it (or in flight across it)")
        else:
            print(f"PASS snapshot {name} holds every write acked before it and none sent after")
    return ok


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
