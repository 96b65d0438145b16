//! Benchmarks (not timed tests): `cargo bench -p objmap`. Prints the median and best of
//! several repetitions of each operation.

mod common;

use common::{time_reps, Rng};
use objmap::{ObjectMap, ObjectState, Run};
use std::time::Instant;

const PIB_OBJECTS: u64 = 1 << 28; // 1 PiB at 4 MiB objects
const TIB_OBJECTS: u64 = 1 << 18; // 1 TiB at 4 MiB objects

/// Runs `f` `reps` times (after one warm-up) and prints median/best per call, plus a
/// per-item figure when `items` > 1.
fn bench<T>(name: &str, reps: usize, items: u64, f: impl FnMut() -> T) {
    let (med, best) = time_reps(reps, f);
    if items > 1 {
        let per = med.as_secs_f64() * 1e9 / items as f64;
        let rate = items as f64 / med.as_secs_f64() / 1e6;
        println!(
            "{name:<58} median {med:>10.2?}  best {best:>10.2?}  ({per:.2} ns/item, {rate:.1} M items/s)"
        );
    } else {
        println!("{name:<58} median {med:>10.2?}  best {best:>10.2?}");
    }
}

fn main() {
    println!(
        "objmap benchmarks: 1 PiB map = {PIB_OBJECTS} objects, 1 TiB region = {TIB_OBJECTS} objects"
    );

    let t = Instant::now();
    let map = ObjectMap::new(PIB_OBJECTS);
    println!(
        "{:<58} {:>10.2?}  ({} MiB)",
        "allocate 1 PiB map",
        t.elapsed(),
        map.memory_bytes() >> 20
    );

    // All NONEXISTENT: a fresh image.
    let region = 3 * TIB_OBJECTS..4 * TIB_OBJECTS;
    bench("runs() over 1 TiB, all nonexistent", 50, 1, || {
        map.runs(region.clone()).count()
    });
    bench("count() over 1 TiB, all nonexistent", 50, 1, || {
        map.count(region.clone())
    });

    // Mixed: runs of random length (1..4096 objects) and random state across the region,
    // like an image written in patches.
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut pos = region.start;
    while pos < region.end {
        let len = 1 + rng.next() % 4096;
        let s = ObjectState::from_bits(rng.next() as u8);
        map.set_range(pos..pos + len, s);
        pos += len;
    }
    let nruns = map.runs(region.clone()).count();
    bench(
        &format!("runs() over 1 TiB, mixed ({nruns} runs)"),
        50,
        1,
        || map.runs(region.clone()).count(),
    );
    bench("count() over 1 TiB, mixed", 50, 1, || {
        map.count(region.clone())
    });

    // Worst case for runs(): a different state on every object.
    let worst = 5 * TIB_OBJECTS..6 * TIB_OBJECTS;
    for i in worst.clone() {
        map.set(i, ObjectState::from_bits((i % 2) as u8 + 1));
    }
    bench(
        "runs() over 1 TiB, state changes every object (262144 runs)",
        10,
        TIB_OBJECTS,
        || map.runs(worst.clone()).count(),
    );
    bench(
        "runs() first 1000 runs of that worst case (BLOCK_STATUS)",
        50,
        1000,
        || {
            map.runs(worst.clone())
                .take(1000)
                .fold(0u64, |a, r: Run| a + r.len)
        },
    );
    bench("count() over the whole 1 PiB map", 10, PIB_OBJECTS, || {
        map.count(0..PIB_OBJECTS)
    });
    bench(
        "set_range() 1 TiB (whole-word stores)",
        10,
        TIB_OBJECTS,
        || {
            map.set_range(
                7 * TIB_OBJECTS + 5..8 * TIB_OBJECTS + 5,
                ObjectState::Exists,
            )
        },
    );

    // Point operations at random objects across the 1 PiB map.
    const OPS: u64 = 2_000_000;
    let idx: Vec<u64> = {
        let mut r = Rng(99);
        (0..OPS).map(|_| r.next() % PIB_OBJECTS).collect()
    };
    bench("get() random objects", 5, OPS, || {
        idx.iter().map(|&i| map.get(i) as u64).sum::<u64>()
    });
    bench("set() random objects", 5, OPS, || {
        for &i in &idx {
            map.set(i, ObjectState::Exists);
        }
    });
    bench("swap() random objects", 5, OPS, || {
        idx.iter()
            .filter(|&&i| map.swap(i, ObjectState::Exists) == ObjectState::Nonexistent)
            .count()
    });
    bench("get() sequential objects", 5, OPS, || {
        (0..OPS).map(|i| map.get(i) as u64).sum::<u64>()
    });
    bench("set() sequential objects", 5, OPS, || {
        for i in 0..OPS {
            map.set(i, ObjectState::Exists);
        }
    });

    // Two threads setting objects concurrently (the machine has 2 cores, shared).
    let shared = std::sync::Arc::new(ObjectMap::new(1 << 24));
    bench(
        "set() random, 2 threads concurrently (per op)",
        5,
        2 * OPS,
        || {
            let hs: Vec<_> = (0..2u64)
                .map(|t| {
                    let m = shared.clone();
                    std::thread::spawn(move || {
                        let mut r = Rng(t + 7);
                        for _ in 0..OPS {
                            m.set(r.next() % (1 << 24), ObjectState::Exists);
                        }
                    })
                })
                .collect();
            for h in hs {
                let _ = h.join();
            }
        },
    );

    // Codec.
    let small = ObjectMap::new(100_000);
    let mut r = Rng(5);
    for i in 0..100_000 {
        small.set(i, ObjectState::from_bits(r.next() as u8));
    }
    let enc = small.encode();
    bench(
        "encode() 100,000-object map (25,000 data bytes)",
        200,
        1,
        || small.encode(),
    );
    bench("decode() 100,000-object map", 200, 1, || {
        ObjectMap::decode(&enc).map(|m| m.len())
    });
    let big = map.encode();
    println!("encoded 1 PiB map: {} bytes", big.len());
    bench("encode() 1 PiB map (64 MiB)", 5, 1, || map.encode().len());
    bench("decode() 1 PiB map (64 MiB)", 5, 1, || {
        ObjectMap::decode(&big).map(|m| m.len())
    });
    match ObjectMap::decode(&big) {
        Ok(m) if m == map => println!("1 PiB round trip: identical"),
        Ok(_) => println!("1 PiB round trip: MISMATCH"),
        Err(e) => println!("1 PiB round trip failed: {e}"),
    }
}
