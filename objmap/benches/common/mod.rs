//! What both objmap benches need: a deterministic operation source and the timing loop.
//! (A directory with `mod.rs`, so Cargo does not take it for a bench target of its own.)

use std::hint::black_box;
use std::time::{Duration, Instant};

/// xorshift64*: tiny, deterministic, good enough to drive operations.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Times `reps` calls of `f` after one warm-up; returns (median, best).
pub fn time_reps<T>(reps: usize, mut f: impl FnMut() -> T) -> (Duration, Duration) {
    black_box(f());
    let mut times: Vec<Duration> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            t.elapsed()
        })
        .collect();
    times.sort();
    (times[times.len() / 2], times[0])
}
