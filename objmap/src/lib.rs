//! The RBD object map: 2 bits per object, held in memory, with a byte-exact codec for
//! Ceph's on-disk encoding (`BitVector<2>` from src/common/bit_vector.hpp).
//!
//! API contract (implementation pending, see issue 3):
//! - `ObjectMap::new(len)`: all NONEXISTENT.
//! - `get(i)`, `set(i, state)` take `&self` (words are atomics) so the daemon can update
//!   the map from many requests without a global lock.
//! - `set_range(range, state)`, `runs(range)`, `count(range)`.
//! - `decode(&[u8]) -> Result<ObjectMap, CodecError>`, `encode() -> Vec<u8>`.

use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ObjectState {
    Nonexistent = 0,
    Exists = 1,
    Pending = 2,
    /// Exists and unchanged since the latest snapshot (fast-diff).
    ExistsClean = 3,
}

/// A maximal run of objects in one state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub len: u64,
    pub state: ObjectState,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("object map truncated: {0}")]
    Truncated(String),
    #[error("object map header invalid: {0}")]
    BadHeader(String),
    #[error("object map crc mismatch: {0}")]
    BadCrc(String),
    #[error("object map length wrong: {0}")]
    BadLength(String),
}

pub struct ObjectMap {
    _private: (),
}

impl ObjectMap {
    pub fn new(_len: u64) -> Self {
        unimplemented!("issue 3")
    }
    pub fn len(&self) -> u64 {
        unimplemented!("issue 3")
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn get(&self, _i: u64) -> ObjectState {
        unimplemented!("issue 3")
    }
    pub fn set(&self, _i: u64, _s: ObjectState) {
        unimplemented!("issue 3")
    }
    pub fn set_range(&self, _r: Range<u64>, _s: ObjectState) {
        unimplemented!("issue 3")
    }
    pub fn runs(&self, _r: Range<u64>) -> impl Iterator<Item = Run> + '_ {
        std::iter::empty()
    }
    /// Counts per state over a range, indexed by `ObjectState as usize`.
    pub fn count(&self, _r: Range<u64>) -> [u64; 4] {
        unimplemented!("issue 3")
    }
    pub fn resize(&mut self, _len: u64) {
        unimplemented!("issue 3")
    }
    pub fn decode(_bytes: &[u8]) -> Result<ObjectMap, CodecError> {
        unimplemented!("issue 3")
    }
    pub fn encode(&self) -> Vec<u8> {
        unimplemented!("issue 3")
    }
}
