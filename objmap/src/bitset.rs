//! A fixed-size set of object numbers, one bit each, safe to change through `&self`
//! from many threads: e.g. which objects requests have touched while a map is rebuilt.

use std::sync::atomic::{AtomicU64, Ordering};

pub struct BitSet {
    words: Vec<AtomicU64>,
    len: u64,
}

impl BitSet {
    /// An empty set of `len` bits; reports a size too large to allocate instead of
    /// aborting.
    pub fn try_new(len: u64) -> Result<Self, std::collections::TryReserveError> {
        let n = usize::try_from(len.div_ceil(64)).unwrap_or(usize::MAX);
        let mut words: Vec<AtomicU64> = Vec::new();
        words.try_reserve_exact(n)?;
        words.resize_with(n, || AtomicU64::new(0));
        Ok(BitSet { words, len })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether bit `i` is set; bits past the end are not.
    #[inline]
    pub fn contains(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Sets bit `i` (nothing past the end); returns whether it was set before.
    #[inline]
    pub fn insert(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let bit = 1 << (i % 64);
        self.words[(i / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit != 0
    }

    /// Clears bit `i` (nothing past the end); returns whether it was set before.
    #[inline]
    pub fn remove(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let bit = 1 << (i % 64);
        self.words[(i / 64) as usize].fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// How many bits are set.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones() as u64)
            .sum()
    }
}

impl std::fmt::Debug for BitSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BitSet({} of {} set)", self.count(), self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::BitSet;

    #[test]
    fn insert_contains_count() {
        let b = BitSet::try_new(130).unwrap();
        assert_eq!(b.count(), 0);
        assert!(!b.insert(0));
        assert!(!b.insert(64));
        assert!(!b.insert(129));
        assert!(b.insert(64));
        assert!(!b.insert(130), "past the end: ignored");
        assert!(b.contains(0) && b.contains(64) && b.contains(129));
        assert!(!b.contains(1) && !b.contains(63) && !b.contains(130));
        assert_eq!(b.count(), 3);
        assert_eq!(b.len(), 130);
        assert!(b.remove(64) && !b.remove(64) && !b.remove(1) && !b.remove(130));
        assert!(!b.contains(64) && b.contains(0) && b.contains(129));
        assert_eq!(b.count(), 2);
        assert!(BitSet::try_new(0).unwrap().is_empty());
    }
}
