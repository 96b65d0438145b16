//! Property-style tests: ObjectMap against a naive `Vec<u8>` model over random operations.

use objmap::{ObjectMap, ObjectState, Run};
use std::ops::Range;

/// A seeded generator (fastrand's wyrand) with the picks the model test needs.
struct Rng(fastrand::Rng);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.u64(..)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn state(&mut self) -> ObjectState {
        ObjectState::from_bits(self.next() as u8)
    }
    /// A range biased towards word boundaries and the ends, sometimes past the end.
    fn range(&mut self, len: u64) -> Range<u64> {
        let pick = |r: &mut Rng| match r.below(4) {
            0 => (r.below(len / 32 + 2)) * 32,
            1 => (r.below(len / 32 + 2) * 32).saturating_sub(1),
            2 => r.below(len + 40),
            _ => r.below(len + 1),
        };
        let a = pick(self);
        let b = pick(self);
        a.min(b)..a.max(b)
    }
}

fn model_runs(m: &[u8], r: Range<u64>) -> Vec<Run> {
    let end = r.end.min(m.len() as u64);
    let mut out: Vec<Run> = Vec::new();
    for i in r.start..end.max(r.start) {
        let s = ObjectState::from_bits(m[i as usize]);
        match out.last_mut() {
            Some(last) if last.state == s => last.len += 1,
            _ => out.push(Run {
                start: i,
                len: 1,
                state: s,
            }),
        }
    }
    out
}

fn model_count(m: &[u8], r: Range<u64>) -> [u64; 4] {
    let end = r.end.min(m.len() as u64);
    let mut c = [0u64; 4];
    for i in r.start..end.max(r.start) {
        c[m[i as usize] as usize] += 1;
    }
    c
}

fn check_all(map: &ObjectMap, model: &[u8], ctx: &str) {
    assert_eq!(map.len(), model.len() as u64, "{ctx}");
    let got: Vec<u8> = map.to_vec().into_iter().map(|s| s as u8).collect();
    assert_eq!(got, model, "{ctx}");
    assert_eq!(
        map.runs(0..u64::MAX).collect::<Vec<_>>(),
        model_runs(model, 0..u64::MAX),
        "{ctx}"
    );
    assert_eq!(
        map.count(0..u64::MAX),
        model_count(model, 0..u64::MAX),
        "{ctx}"
    );
}

fn run_seed(seed: u64, steps: usize) {
    let mut rng = Rng(fastrand::Rng::with_seed(seed | 1));
    let mut len = rng.below(300);
    let map = ObjectMap::new(len);
    let mut map = map;
    let mut model = vec![0u8; len as usize];
    for step in 0..steps {
        let ctx = format!("seed {seed} step {step} len {len}");
        match rng.below(10) {
            0 | 1 => {
                let i = rng.below(len + 3);
                let s = rng.state();
                map.set(i, s);
                if i < len {
                    model[i as usize] = s as u8;
                }
            }
            2 => {
                let i = rng.below(len + 3);
                let s = rng.state();
                let old = map.swap(i, s);
                let want = if i < len {
                    let o = model[i as usize];
                    model[i as usize] = s as u8;
                    o
                } else {
                    0
                };
                assert_eq!(old as u8, want, "{ctx} swap {i}");
            }
            3 => {
                let i = rng.below(len + 3);
                let cur = rng.state();
                let new = rng.state();
                let got = map.compare_exchange(i, cur, new);
                if i < len {
                    let actual = model[i as usize];
                    if actual == cur as u8 {
                        assert_eq!(got, Ok(cur), "{ctx}");
                        model[i as usize] = new as u8;
                    } else {
                        assert_eq!(got.map_err(|s| s as u8), Err(actual), "{ctx}");
                    }
                } else {
                    assert!(got.is_err(), "{ctx}");
                }
            }
            4 | 5 => {
                let r = rng.range(len);
                let s = rng.state();
                map.set_range(r.clone(), s);
                for i in r.start..r.end.min(len) {
                    model[i as usize] = s as u8;
                }
            }
            6 => {
                let r = rng.range(len);
                assert_eq!(
                    map.runs(r.clone()).collect::<Vec<_>>(),
                    model_runs(&model, r.clone()),
                    "{ctx} runs {r:?}"
                );
            }
            7 => {
                let r = rng.range(len);
                assert_eq!(
                    map.count(r.clone()),
                    model_count(&model, r.clone()),
                    "{ctx} count {r:?}"
                );
            }
            8 => {
                // Shrinks and grows: dropped objects must not come back.
                len = rng.below(400);
                map.resize(len);
                model.resize(len as usize, 0);
                check_all(&map, &model, &ctx);
            }
            _ => {
                let i = rng.below(len + 3);
                let want = if i < len {
                    Some(ObjectState::from_bits(model[i as usize]))
                } else {
                    None
                };
                assert_eq!(map.try_get(i), want, "{ctx}");
                // Codec round trip preserves everything.
                let back = ObjectMap::decode(&map.encode()).unwrap();
                assert_eq!(back, map, "{ctx}");
            }
        }
    }
    check_all(&map, &model, &format!("seed {seed} end"));
    let clone = map.clone();
    check_all(&clone, &model, &format!("seed {seed} clone"));
}

#[test]
fn random_operations_match_model() {
    for seed in 0..200u64 {
        run_seed(
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03,
            400,
        );
    }
}

#[test]
fn runs_are_maximal_and_cover_the_range() {
    let mut rng = Rng(fastrand::Rng::with_seed(42));
    for _ in 0..50 {
        let len = rng.below(5000) + 1;
        let map = ObjectMap::new(len);
        // Few long runs, so whole-word skipping is exercised.
        for _ in 0..rng.below(20) {
            let r = rng.range(len);
            map.set_range(r, rng.state());
        }
        let r = rng.range(len);
        let runs: Vec<Run> = map.runs(r.clone()).collect();
        let mut pos = r.start.min(len);
        for (k, run) in runs.iter().enumerate() {
            assert_eq!(run.start, pos);
            assert!(run.len > 0);
            if k > 0 {
                assert_ne!(runs[k - 1].state, run.state, "adjacent runs must differ");
            }
            for i in run.start..run.end() {
                assert_eq!(map.get(i), run.state);
            }
            pos = run.end();
        }
        assert_eq!(pos, r.end.min(len).max(r.start.min(len)));
    }
}

#[test]
fn concurrent_updates_are_not_lost() {
    // Four threads flip disjoint objects that share words; every update must land.
    let map = std::sync::Arc::new(ObjectMap::new(4096));
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let m = map.clone();
            std::thread::spawn(move || {
                for round in 0..50 {
                    for i in (t..4096).step_by(4) {
                        let s = ObjectState::from_bits((round + t) as u8);
                        m.set(i, s);
                    }
                }
                for i in (t..4096).step_by(4) {
                    assert_eq!(
                        m.swap(i, ObjectState::from_bits(t as u8)),
                        ObjectState::from_bits((49 + t) as u8)
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for i in 0..4096u64 {
        assert_eq!(map.get(i), ObjectState::from_bits((i % 4) as u8));
    }
    assert_eq!(map.count(0..4096), [1024; 4]);
}

#[test]
fn first_write_detected_once() {
    // Many threads race to mark one object; exactly one sees the previous Nonexistent.
    let map = std::sync::Arc::new(ObjectMap::new(100));
    let firsts: usize = (0..4)
        .map(|_| {
            let m = map.clone();
            std::thread::spawn(move || {
                (0..100u64)
                    .filter(|&i| m.swap(i, ObjectState::Exists) == ObjectState::Nonexistent)
                    .count()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .sum();
    assert_eq!(firsts, 100);
}

#[test]
fn peta_byte_map_fits_in_64_mib() {
    // 1 PiB at 4 MiB objects.
    let n = 1u64 << 28;
    let mut map = ObjectMap::new(n);
    assert!(map.memory_bytes() <= 64 << 20, "{}", map.memory_bytes());
    map.set(n - 1, ObjectState::Exists);
    map.set_range(1 << 20..(1 << 20) + 100, ObjectState::ExistsClean);
    let tib = 1u64 << 18;
    let runs: Vec<Run> = map.runs(0..tib * 8).collect();
    assert_eq!(runs.len(), 3);
    assert_eq!(map.count(0..n), [n - 101, 1, 0, 100]);
    // Debug is a summary, not 64 MiB of states.
    assert!(format!("{map:?}").len() < 200);
    map.resize(10);
    assert_eq!(map.count(0..u64::MAX), [10, 0, 0, 0]);
    assert!(map.memory_bytes() <= 8);
}
