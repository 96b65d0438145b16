#!/usr/bin/python3
"""Report of bench/kernel.sh: rados-nbd, rbd-nbd and krbd side by side in one guest kernel.

    kernel.py --raw DIR [--out OUT]        DIR: the guest's output (records.jsonl, fio/, machine.json,
                                           load.txt); writes OUT/kernel-results.{json,md} and
                                           OUT/kernel-ratios.png
    kernel.py --report JSON [--out OUT]    only rewrite the .md and the chart from a kernel-results.json
"""
import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
US = "rados-nbd"
UBLK = "rados-nbd-ublk"  # the same daemon on the ublk transport (issue 19)
TICK = 100  # USER_HZ of Debian's kernel: /proc/PID/stat and /proc/stat count 1/100 s
GIB = 1 << 30
# job -> (what it is, the figure compared: "iops" or "mibs")
JOBS = {
    "first-write-4k-qd32": ("4 KiB writes, each to an object never written before (4 MiB stride), QD32", "iops"),
    "read-unwritten-4k-qd32": ("4 KiB random reads of never-written areas, QD32", "iops"),
    "randwrite-4k-qd32": ("4 KiB random writes over the written GiB, QD32", "iops"),
    "randwrite-4k-qd1": ("4 KiB random writes over the written GiB, QD1", "iops"),
    "randread-4k-qd32": ("4 KiB random reads of the written GiB, QD32", "iops"),
    "randread-4k-qd1": ("4 KiB random reads of the written GiB, QD1", "iops"),
    "seqwrite-1M-qd8": ("1 MiB sequential writes over the written GiB, QD8", "mibs"),
    "seqread-1M-qd8": ("1 MiB sequential reads of the written GiB, QD8", "mibs"),
}
# Issue 18's targets: rados-nbd / rbd-nbd > 1 everywhere, >= 2 on these; rados-nbd / krbd >= 0.8.
TWICE = ("first-write-4k-qd32", "read-unwritten-4k-qd32")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def med(v):
    v = [x for x in v if x is not None]
    return statistics.median(v) if v else None


def fio_figures(path):
    with open(path) as f:
        j = json.load(f)["jobs"][0]
    r, w = j["read"], j["write"]
    nbytes = r["io_bytes"] + w["io_bytes"]
    runtime_ms = max(r["runtime"], w["runtime"]) or 1
    lat = [d["clat_ns"]["mean"] for d in (r, w) if d["io_bytes"]]
    return {"iops": r["iops"] + w["iops"], "mibs": nbytes / (1 << 20) / (runtime_ms / 1000),
            "bytes": nbytes, "clat_us": (sum(lat) / len(lat) / 1000) if lat else None}


def ticks(s):
    u, n, sy, irq, sirq, busy = (int(x) for x in s.split())
    return {"sys": sy + irq + sirq, "busy": busy}


def collect(raw):
    with open(os.path.join(raw, "machine.json")) as f:
        machine = json.load(f)
    recs = []
    with open(os.path.join(raw, "records.jsonl")) as f:
        for line in f:
            if line.strip():
                recs.append(json.loads(line))
    load = []
    try:
        with open(os.path.join(raw, "load.txt")) as f:
            for line in f:
                t, l1, l5, l15, *_ = line.split()
                load.append([int(t), float(l1), float(l5), float(l15)])
    except OSError:
        pass
    peers = machine["peers"].split()
    runs = {}  # job -> peer -> [per round]
    maps, unmaps, prefill, rss, locked = {}, {}, {}, {}, {}
    for r in recs:
        p = r["peer"]
        if r["kind"] == "map":
            maps.setdefault(p, []).append(r["us"] / 1000)
            if r.get("rss_kib"):
                rss.setdefault(p, []).append(r["rss_kib"] / 1024)
                locked.setdefault(p, []).append(r.get("locked_kib", 0) / 1024)
        elif r["kind"] == "unmap":
            unmaps.setdefault(p, []).append(r["us"] / 1000)
        else:
            fig = fio_figures(os.path.join(raw, r["fio"]))
            g0, g1 = ticks(r["guest_ticks0"]), ticks(r["guest_ticks1"])
            gib = fig["bytes"] / GIB
            # The serving side's CPU: the daemon's utime+stime; krbd has no daemon, so the guest's
            # system time (sys + irq + softirq: the kernel client and the network stack).
            serve = (g1["sys"] - g0["sys"]) if p == "krbd" else r["daemon_ticks"]
            nreq = fig["bytes"] / (4096 if "4k" in r["job"] else 1 << 20)
            dcsw = r.get("daemon_csw", 0) if p != "krbd" else None
            fig.update({
                "daemon_csw_per_req": dcsw / nreq if nreq and dcsw is not None else None,
                "guest_csw_per_req": r["guest_csw"] / nreq if nreq and "guest_csw" in r else None,
                "daemon_threads": r.get("daemon_threads"),
                "round": r["round"], "wall_s": r["wall_us"] / 1e6, "guest_load1": r.get("guest_load1"),
                "serve_cpu_s_per_gib": serve / TICK / gib if gib else None,
                "guest_sys_s_per_gib": (g1["sys"] - g0["sys"]) / TICK / gib if gib else None,
                "guest_busy_s_per_gib": (g1["busy"] - g0["busy"]) / TICK / gib if gib else None,
            })
            if r["kind"] == "prefill":
                prefill[p] = fig
            else:
                runs.setdefault(r["job"], {}).setdefault(p, []).append(fig)
    jobs = {}
    for job in [j for j in JOBS if j in runs] + [j for j in runs if j not in JOBS]:
        unit = JOBS.get(job, ("", "iops"))[1]
        jobs[job] = {"unit": unit, "peers": {}}
        for p in peers:
            rs = sorted(runs[job].get(p, []), key=lambda x: x["round"])
            if not rs:
                continue
            jobs[job]["peers"][p] = {
                "value": med([x[unit] for x in rs]),
                "values": [round(x[unit], 1) for x in rs],
                "iops": med([x["iops"] for x in rs]),
                "mibs": med([x["mibs"] for x in rs]),
                "clat_us": med([x["clat_us"] for x in rs]),
                "serve_cpu_s_per_gib": med([x["serve_cpu_s_per_gib"] for x in rs]),
                "guest_sys_s_per_gib": med([x["guest_sys_s_per_gib"] for x in rs]),
                "guest_busy_s_per_gib": med([x["guest_busy_s_per_gib"] for x in rs]),
                "guest_load1": [x["guest_load1"] for x in rs],
                "daemon_csw_per_req": med([x["daemon_csw_per_req"] for x in rs]),
                "guest_csw_per_req": med([x["guest_csw_per_req"] for x in rs]),
                "daemon_threads": med([x["daemon_threads"] for x in rs]),
            }
    res = {
        "machine": machine, "peers": peers, "jobs": jobs,
        "map_ms": {p: med(v) for p, v in maps.items()}, "map_ms_all": maps,
        "unmap_ms": {p: med(v) for p, v in unmaps.items()}, "unmap_ms_all": unmaps,
        "rss_mib_after_map": {p: med(v) for p, v in rss.items()},
        "locked_mib_after_map": {p: med(v) for p, v in locked.items()},
        "prefill_mibs": {p: round(v["mibs"], 1) for p, v in prefill.items()},
        "prefill_serve_cpu_s_per_gib": {p: v["serve_cpu_s_per_gib"] for p, v in prefill.items()},
        "host_load": summarize_load(load),
    }
    return res


def summarize_load(load):
    if not load:
        return {}
    ones = [x[1] for x in load]
    return {"start": load[0][1:], "end": load[-1][1:], "min1": min(ones), "max1": max(ones),
            "median1": statistics.median(ones), "samples": len(load)}


def ratio(res, job, peer, us=US):
    ps = res["jobs"][job]["peers"]
    if us not in ps or peer not in ps or not ps[peer]["value"]:
        return None
    return ps[us]["value"] / ps[peer]["value"]


def targets(res):
    out = []
    for job in res["jobs"]:
        r = ratio(res, job, "rbd-nbd")
        if r is not None:
            want = 2.0 if job in TWICE else 1.0
            cmp = ">=" if want == 2.0 else ">"
            met = r >= want if want == 2.0 else r > want
            out.append({"target": f"{job}: rados-nbd {cmp} {want:.1f}x rbd-nbd", "ratio": round(r, 2), "met": met})
        r = ratio(res, job, "krbd")
        if r is not None:
            out.append({"target": f"{job}: rados-nbd >= 0.8x krbd", "ratio": round(r, 2), "met": r >= 0.8})
        # Issue 19's: ublk >= 1.3x rados-nbd's own NBD transport on 4 KiB QD32 and on 1 MiB jobs,
        # >= 1.0x krbd on first writes and unwritten reads.
        if "-4k-qd32" in job or "-1M-" in job:
            r = ratio(res, job, US, UBLK)
            if r is not None:
                out.append({"target": f"{job}: {UBLK} >= 1.3x rados-nbd (NBD)", "ratio": round(r, 2), "met": r >= 1.3})
        if job in TWICE:
            r = ratio(res, job, "krbd", UBLK)
            if r is not None:
                out.append({"target": f"{job}: {UBLK} >= 1.0x krbd", "ratio": round(r, 2), "met": r >= 1.0})
    return out


def fmt(v, unit):
    if v is None:
        return "-"
    return f"{v:.0f} MiB/s" if unit == "mibs" else f"{v:.0f}"


def fx(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def write_md(res, out, notes=""):
    m, peers = res["machine"], res["peers"]
    others = [p for p in peers if p != US]
    hl = res.get("host_load", {})
    L = [f"# {', '.join(peers)} in one guest kernel ({m['date']})", "",
         "Issue 18, \"Side by side in one guest kernel\"" + (" and issue 19 (the ublk transport)" if UBLK in peers else "")
         + ". One command: `bench/kernel.sh` (bench/README.md). "
         f"The test VM (Debian's {m.get('guest_kernel', '6.1')} kernel under TCG emulation, "
         f"{m['vm_cpus']} vCPUs, {m['vm_mem_mib']} MiB) maps one fresh 1 TiB image per peer (features "
         f"{m['image_features']}) of a one-node cluster in a network namespace; fio (libaio, direct=1) "
         f"runs on the devices for {m['runtime_s']} s per job, the peers taking turns job by job with the "
         f"first one rotating, {m['rounds']} rounds; figures are medians. The guest is emulated: only the "
         "ratios count.", "",
         f"Host: {m['cpu']}, {m['ncpu']} CPUs, {m['mem_gib']} GiB, kernel {m['host_kernel']}; shared with other "
         "work (load average below). "
         f"Host load average (1 min) during the run: median {hl.get('median1', '-')}, min {hl.get('min1', '-')}, "
         f"max {hl.get('max1', '-')} ({hl.get('samples', 0)} samples, every 10 s).", "",
         f"Versions: {m['rados_nbd']}; rbd-nbd and librbd {m['rbd_nbd']}; krbd of the guest kernel; {m['fio']}. "
         "Each peer as a user runs it: `rados-nbd map IMAGE`, `rbd-nbd map rbd/IMAGE`, "
         "`rbd map -o noudev IMAGE`" + (", `rados-nbd map --transport ublk IMAGE`" if UBLK in peers else "")
         + " (defaults otherwise); all as the restricted client.nbd.", "",
         "## Throughput (IOPS, or MiB/s for the 1 MiB jobs; median of the rounds)", ""]
    uothers = [p for p in peers if p != UBLK] if UBLK in peers else []
    # (rados-nbd / rados-nbd-ublk would be the inverse of a column that follows.)
    hdr = ["job"] + peers + [f"{US} / {p}" for p in others if p != UBLK] + [f"{UBLK} / {p}" for p in uothers]
    L += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for job, d in res["jobs"].items():
        row = [job] + [fmt(d["peers"].get(p, {}).get("value"), d["unit"]) for p in peers]
        row += [fx(ratio(res, job, p)) for p in others if p != UBLK]
        row += [fx(ratio(res, job, p, UBLK)) for p in uothers]
        L.append("| " + " | ".join(row) + " |")
    L += ["", "Every round's figure (in round order):", ""]
    L += ["| job | " + " | ".join(peers) + " |", "|" + "---|" * (len(peers) + 1)]
    for job, d in res["jobs"].items():
        L.append(f"| {job} | " + " | ".join(
            ", ".join(f"{v:.0f}" for v in d["peers"].get(p, {}).get("values", [])) for p in peers) + " |")
    L += ["", "## CPU seconds per GiB moved (median)", "",
          "Serving side: the daemon's utime+stime from /proc/PID/stat before and after each job (for krbd, which "
          "has no daemon, the guest's system+irq+softirq time from /proc/stat). Guest busy: all the guest's "
          "non-idle time (fio, the nbd driver, the network stack, the daemon), the same measure for every peer.", "",
          "| job | " + " | ".join(f"{p} serving" for p in peers) + " | " + " | ".join(f"{p} guest busy" for p in peers) + " |",
          "|" + "---|" * (2 * len(peers) + 1)]
    for job, d in res["jobs"].items():
        ps = d["peers"]
        L.append(f"| {job} | " + " | ".join(fx(ps.get(p, {}).get("serve_cpu_s_per_gib")) for p in peers) + " | "
                 + " | ".join(fx(ps.get(p, {}).get("guest_busy_s_per_gib")) for p in peers) + " |")
    L += ["", "Context switches per request (median): the daemon's, all its threads (/proc/PID/task/*/status), "
          "and the whole guest's (/proc/stat ctxt); the daemon's thread count.", "",
          "| job | " + " | ".join(f"{p} daemon" for p in peers if p != "krbd") + " | "
          + " | ".join(f"{p} guest" for p in peers) + " | threads |",
          "|" + "---|" * (2 * len(peers) + 1 - ("krbd" in peers) + 1)]
    for job, d in res["jobs"].items():
        ps = d["peers"]
        L.append(f"| {job} | " + " | ".join(fx(ps.get(p, {}).get("daemon_csw_per_req"), 1) for p in peers if p != "krbd")
                 + " | " + " | ".join(fx(ps.get(p, {}).get("guest_csw_per_req"), 1) for p in peers) + " | "
                 + ", ".join(f"{p} {ps.get(p, {}).get('daemon_threads') or 0:.0f}" for p in peers if p != "krbd") + " |")
    L += ["", "Mean completion latency (µs, median of the rounds):", "",
          "| job | " + " | ".join(peers) + " |", "|" + "---|" * (len(peers) + 1)]
    for job, d in res["jobs"].items():
        L.append(f"| {job} | " + " | ".join(fx(d["peers"].get(p, {}).get("clat_us"), 0) for p in peers) + " |")
    L += ["", "## Map and unmap", "",
          "Wall time of the map command until it printed a usable device, and of the unmap command until the "
          "daemon exited (median of 3: the first map of the fresh image, then two more map/unmap cycles).", "",
          "| | " + " | ".join(peers) + " |", "|" + "---|" * (len(peers) + 1),
          "| map (ms) | " + " | ".join(fx(res["map_ms"].get(p), 0) for p in peers) + " |",
          "| unmap (ms) | " + " | ".join(fx(res["unmap_ms"].get(p), 0) for p in peers) + " |",
          "| daemon RSS just after map (MiB) | " + " | ".join(fx(res.get("rss_mib_after_map", {}).get(p), 0) for p in peers) + " |",
          "| of which locked (VmLck, MiB) | " + " | ".join(fx(res.get("locked_mib_after_map", {}).get(p), 0) for p in peers) + " |",
          "| prefill (the written area), 1 MiB QD8, fresh objects (MiB/s, one run) | "
          + " | ".join(fx(res["prefill_mibs"].get(p), 0) for p in peers) + " |",
          "", "## Targets (issue 18" + (", issue 19 for rados-nbd-ublk" if UBLK in peers else "") + ")", "", "| target | ratio | status |", "|---|---|---|"]
    for t in targets(res):
        L.append(f"| {t['target']} | {t['ratio']:.2f} | {'met' if t['met'] else '**missed**'} |")
    L += ["", "![ratios](kernel-ratios.png)", ""]
    if notes:
        L += [notes.rstrip(), ""]
    with open(os.path.join(out, "kernel-results.md"), "w") as f:
        f.write("\n".join(L))
    log("\n".join(L))


def chart(res, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no chart (apt-get install python3-matplotlib)")
        return
    jobs = list(res["jobs"])
    others = [p for p in res["peers"] if p != US]
    # Pairs (numerator, denominator): rados-nbd against each peer; with the ublk transport in
    # the run, rados-nbd-ublk against each peer but rados-nbd-ublk itself.
    pairs = [(US, p) for p in others if p != UBLK]
    if UBLK in res["peers"]:
        pairs += [(UBLK, p) for p in res["peers"] if p != UBLK]
    fig, axes = plt.subplots(2, 1, figsize=(11, 9))
    ax = axes[0]
    w = 0.8 / max(len(pairs), 1)
    for i, (u, p) in enumerate(pairs):
        vals = [ratio(res, j, p, u) or 0 for j in jobs]
        bars = ax.bar([x + i * w for x in range(len(jobs))], vals, w, label=f"{u} / {p}")
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(0.8, color="grey", linewidth=0.8, linestyle="--", label="0.8 (krbd target)")
    ax.axhline(2.0, color="grey", linewidth=0.8, linestyle=":", label="2.0 (rbd-nbd target, first two jobs)")
    ax.set_xticks([x + w * (len(pairs) - 1) / 2 for x in range(len(jobs))], jobs, rotation=15, fontsize=8)
    ax.set_ylabel("ratio (higher: rados-nbd faster)")
    ax.set_title(f"One guest kernel (TCG), one cluster — {res['machine']['date']}, median of "
                 f"{res['machine']['rounds']} rounds")
    ax.legend(fontsize=8)
    ax = axes[1]
    peers = res["peers"]
    w = 0.8 / len(peers)
    for i, p in enumerate(peers):
        vals = [res["jobs"][j]["peers"].get(p, {}).get("serve_cpu_s_per_gib") or 0 for j in jobs]
        ax.bar([x + i * w for x in range(len(jobs))], vals, w,
               label=p + (" (guest system time)" if p == "krbd" else " (daemon)"))
    ax.set_yscale("log")
    ax.set_xticks([x + w * (len(peers) - 1) / 2 for x in range(len(jobs))], jobs, rotation=15, fontsize=8)
    ax.set_ylabel("serving CPU s per GiB (log)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "kernel-ratios.png"), dpi=90)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw", help="the guest's output folder")
    ap.add_argument("--report", metavar="JSON", help="only rewrite the .md and the chart")
    ap.add_argument("--out", default=HERE)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    notes = ""
    if a.report:
        with open(a.report) as f:
            res = json.load(f)
    else:
        res = collect(a.raw)
    res["targets"] = targets(res)
    # Findings written by hand (where the time goes) live beside the figures and survive reruns.
    npath = os.path.join(a.out, "kernel-notes.md")
    if os.path.exists(npath):
        with open(npath) as f:
            notes = f.read()
    if not a.report:
        with open(os.path.join(a.out, "kernel-results.json"), "w") as f:
            json.dump(res, f, indent=1)
    write_md(res, a.out, notes)
    chart(res, a.out)


if __name__ == "__main__":
    main()
