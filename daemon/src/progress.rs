//! Progress lines for long scans. Rebuilding the object map of a large image lists every
//! data object first (268 million for a 1 PiB image): without a line now and then, an
//! operator watching `map` or `serve` start cannot tell a slow rebuild from a hang.

use std::time::{Duration, Instant};

/// How often a scan says how far it got.
pub const EVERY: Duration = Duration::from_secs(2);

/// Counts items and logs `what: N so far (T)` at most once per `every`.
#[derive(Debug)]
pub struct Progress {
    what: String,
    every: Duration,
    start: Instant,
    last: Instant,
    count: u64,
}

impl Progress {
    pub fn new(what: impl Into<String>) -> Self {
        Self::with_interval(what, EVERY)
    }

    pub fn with_interval(what: impl Into<String>, every: Duration) -> Self {
        let now = Instant::now();
        Progress {
            what: what.into(),
            every,
            start: now,
            last: now,
            count: 0,
        }
    }

    /// One more item. Returns the line it logged, if it was time for one. The clock is
    /// read once every 1024 items, so counting stays cheap for millions of them.
    pub fn tick(&mut self) -> Option<String> {
        self.count += 1;
        if self.count & 1023 != 0 && !self.every.is_zero() {
            return None;
        }
        let now = Instant::now();
        if now.duration_since(self.last) < self.every {
            return None;
        }
        self.last = now;
        let line = format!(
            "{}: {} so far ({:.1} s)",
            self.what,
            self.count,
            now.duration_since(self.start).as_secs_f64()
        );
        tracing::info!("{line}");
        Some(line)
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_at_most_once_per_interval() {
        let mut p = Progress::with_interval("listing objects of rbd/vm1", Duration::ZERO);
        assert_eq!(
            p.tick().unwrap().split(" (").next().unwrap(),
            "listing objects of rbd/vm1: 1 so far"
        );
        let mut quiet = Progress::with_interval("x", Duration::from_secs(3600));
        assert!((0..10_000).all(|_| quiet.tick().is_none()));
        assert_eq!(quiet.count(), 10_000);
    }
}
