//! Packed 2 bits per object, as `bitvec` or as plain words: whichever is faster, measured.
//! This bench is that measurement: the same operations on our
//! plain-words `ObjectMap` and on the `bitvec` crate (1.x, Ceph's MSB-first order), in the
//! same run. `cargo bench -p objmap --bench bitvec_vs_words`.
//!
//! bitvec has no 2-bit element type, so an object is `bits[2*i..2*i+2]` read with
//! `load_be::<u8>()` and written with `store_be`; runs and counts walk object by object,
//! because bitvec offers no "find the next pair different from this one" primitive.
//! `BitVec<AtomicU64>` is the only bitvec layout usable from `&self` by many tasks; there
//! `store_be` needs `&mut`, so a `&self` write is two `set_aliased` calls (two atomic RMWs,
//! and a reader can see the half-written state in between: not a correct map update).

use bitvec::prelude::*;
mod common;

use common::{time_reps, Rng};
use objmap::{ObjectMap, ObjectState};
use std::sync::atomic::AtomicU64;

const PIB_OBJECTS: u64 = 1 << 28; // 1 PiB at 4 MiB objects
const TIB_OBJECTS: u64 = 1 << 18; // 1 TiB at 4 MiB objects
const OPS: u64 = 2_000_000;

type PlainBits = BitVec<u64, Msb0>;
type AtomicBits = BitVec<AtomicU64, Msb0>;

/// Median of `reps` timed calls (after one warm-up), in nanoseconds per item.
fn bench<T>(name: &str, reps: usize, items: u64, f: impl FnMut() -> T) -> f64 {
    let (med, best) = time_reps(reps, f);
    let per = med.as_secs_f64() * 1e9 / items as f64;
    println!("{name:<50} median {med:>10.2?}  best {best:>10.2?}  ({per:.2} ns/item)");
    per
}

fn bv_get<T: BitStore>(b: &BitSlice<T, Msb0>, i: u64) -> u8 {
    let i = i as usize * 2;
    b[i..i + 2].load_be::<u8>()
}

fn bv_set(b: &mut BitSlice<u64, Msb0>, i: u64, s: u8) {
    let i = i as usize * 2;
    b[i..i + 2].store_be::<u8>(s);
}

fn abv_set(b: &BitSlice<AtomicU64, Msb0>, i: u64, s: u8) {
    let i = i as usize * 2;
    b.set_aliased(i, s & 2 != 0);
    b.set_aliased(i + 1, s & 1 != 0);
}

/// Number of maximal runs of equal state in `0..n`, object by object.
fn bv_runs<T: BitStore>(b: &BitSlice<T, Msb0>, n: u64) -> u64 {
    let mut runs = 0;
    let mut prev = u8::MAX;
    for i in 0..n {
        let s = bv_get(b, i);
        if s != prev {
            runs += 1;
            prev = s;
        }
    }
    runs
}

/// `bv_runs` helped by bitvec's word-wise search: a NONEXISTENT (00) stretch is skipped
/// with `first_one()`, the best bitvec offers; other states still go object by object.
fn bv_runs_skip(b: &BitSlice<u64, Msb0>, n: u64) -> u64 {
    let mut runs = 0;
    let mut prev = u8::MAX;
    let mut i = 0;
    while i < n {
        let s = bv_get(b, i);
        if s != prev {
            runs += 1;
            prev = s;
        }
        i += 1;
        if s == 0 {
            // The first set bit after object i-1 lies in the first non-00 object.
            let at = 2 * i as usize;
            i = match b[at..n as usize * 2].first_one() {
                Some(k) => (at + k) as u64 / 2,
                None => n,
            };
        }
    }
    runs
}

fn bv_count<T: BitStore>(b: &BitSlice<T, Msb0>, n: u64) -> [u64; 4] {
    let mut c = [0u64; 4];
    for pair in b[..n as usize * 2].chunks_exact(2) {
        c[pair.load_be::<u8>() as usize] += 1;
    }
    c
}

fn copy_to_bitvecs(map: &ObjectMap) -> (PlainBits, AtomicBits) {
    let n = map.len() as usize * 2;
    let mut plain = PlainBits::repeat(false, n);
    let atomic = AtomicBits::repeat(false, n);
    for i in 0..map.len() {
        let s = map.get(i) as u8;
        bv_set(&mut plain, i, s);
        abv_set(&atomic, i, s);
    }
    (plain, atomic)
}

/// Prints one comparison row: words, bitvec<u64>, bitvec<AtomicU64>, ratio to words.
fn row(rows: &mut Vec<String>, what: &str, w: f64, b: f64, a: f64) {
    rows.push(format!(
        "| {what} | {} | {} ({:.1}x) | {} ({:.1}x) |",
        fmt_ns(w),
        fmt_ns(b),
        b / w,
        fmt_ns(a),
        a / w
    ));
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

fn main() {
    let mut rows = Vec::new();

    // Runs and counts over 1 TiB (262,144 objects): all NONEXISTENT, then mixed.
    let empty = ObjectMap::new(TIB_OBJECTS);
    let mixed = ObjectMap::new(TIB_OBJECTS);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut pos = 0;
    while pos < TIB_OBJECTS {
        // Patches of random length and state, like an image written piecemeal.
        let len = 1 + rng.next() % 4096;
        mixed.set_range(pos..pos + len, ObjectState::from_bits(rng.next() as u8));
        pos += len;
    }
    for (label, map) in [("all nonexistent", &empty), ("mixed", &mixed)] {
        let (plain, atomic) = copy_to_bitvecs(map);
        let n = map.len();
        // The three must agree, or the timings compare different work.
        let want_runs = map.runs(0..n).count() as u64;
        let want_count = map.count(0..n);
        assert_eq!(bv_runs(&plain, n), want_runs);
        assert_eq!(bv_runs(&atomic, n), want_runs);
        assert_eq!(bv_runs_skip(&plain, n), want_runs);
        assert_eq!(bv_count(&plain, n), want_count);
        assert_eq!(bv_count(&atomic, n), want_count);

        let w = bench(&format!("words  runs 1 TiB {label}"), 30, 1, || {
            map.runs(0..n).count()
        });
        let b = bench(&format!("bitvec runs 1 TiB {label}"), 30, 1, || {
            bv_runs(&plain, n)
        });
        let a = bench(&format!("atomic runs 1 TiB {label}"), 30, 1, || {
            bv_runs(&atomic, n)
        });
        row(
            &mut rows,
            &format!("`runs()` 1 TiB, {label} ({want_runs} runs)"),
            w,
            b,
            a,
        );
        let s = bench(
            &format!("bitvec runs, first_one() skip, {label}"),
            30,
            1,
            || bv_runs_skip(&plain, n),
        );
        rows.push(format!(
            "| `runs()` 1 TiB, {label}, bitvec skipping 00 with `first_one()` | | {} ({:.1}x) | |",
            fmt_ns(s),
            s / w
        ));
        let w = bench(&format!("words  count 1 TiB {label}"), 30, 1, || {
            map.count(0..n)
        });
        let b = bench(&format!("bitvec count 1 TiB {label}"), 30, 1, || {
            bv_count(&plain, n)
        });
        let a = bench(&format!("atomic count 1 TiB {label}"), 30, 1, || {
            bv_count(&atomic, n)
        });
        row(&mut rows, &format!("`count()` 1 TiB, {label}"), w, b, a);
    }

    // Point operations at random objects: across a 1 TiB map (64 KiB, cache-resident:
    // the cost of the bit arithmetic) and a 1 PiB map (64 MiB each: cache misses).
    for (label, n) in [("1 TiB", TIB_OBJECTS), ("1 PiB", PIB_OBJECTS)] {
        let words = ObjectMap::new(n);
        let mut plain = PlainBits::repeat(false, n as usize * 2);
        let atomic = AtomicBits::repeat(false, n as usize * 2);
        let idx: Vec<u64> = {
            let mut r = Rng(99);
            (0..OPS).map(|_| r.next() % n).collect()
        };
        let w = bench(&format!("words  set random {label}"), 5, OPS, || {
            for &i in &idx {
                words.set(i, ObjectState::from_bits(i as u8));
            }
        });
        let b = bench(&format!("bitvec set random {label}"), 5, OPS, || {
            for &i in &idx {
                bv_set(&mut plain, i, i as u8 & 3);
            }
        });
        let a = bench(&format!("atomic set random {label}"), 5, OPS, || {
            for &i in &idx {
                abv_set(&atomic, i, i as u8 & 3);
            }
        });
        row(&mut rows, &format!("`set()` random, {label} map"), w, b, a);
        let w = bench(&format!("words  get random {label}"), 5, OPS, || {
            idx.iter().map(|&i| words.get(i) as u64).sum::<u64>()
        });
        let b = bench(&format!("bitvec get random {label}"), 5, OPS, || {
            idx.iter().map(|&i| bv_get(&plain, i) as u64).sum::<u64>()
        });
        let a = bench(&format!("atomic get random {label}"), 5, OPS, || {
            idx.iter().map(|&i| bv_get(&atomic, i) as u64).sum::<u64>()
        });
        row(&mut rows, &format!("`get()` random, {label} map"), w, b, a);
        // Same contents after the same writes: the comparison did the same work.
        let check: Vec<u64> = idx.iter().take(1000).copied().collect();
        for &i in &check {
            let s = words.get(i) as u8;
            assert_eq!(bv_get(&plain, i), s, "object {i}");
            assert_eq!(bv_get(&atomic, i), s, "object {i}");
        }
    }

    println!();
    println!("| operation (median) | plain words `ObjectMap` | `BitVec<u64, Msb0>` | `BitVec<AtomicU64, Msb0>` |");
    println!("|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}
