//! The RBD object map: 2 bits per object, held in memory, with a byte-exact codec for
//! Ceph's on-disk encoding (`BitVector<2>` from src/common/bit_vector.hpp).
//!
//! - `ObjectMap::new(len)`: all NONEXISTENT.
//! - `get`, `set`, `swap`, `compare_exchange`, `set_range` take `&self`: the words are
//!   atomics, so the daemon can update the map from many requests without a global lock.
//! - `runs(range)`, `count(range)`: fast queries that skip uniform words.
//! - `decode(&[u8]) -> Result<ObjectMap, CodecError>` for the raw RADOS object (crcs
//!   required and checked), `decode_allow_no_crc` for a cls `object_map_load` reply (empty
//!   footer allowed), `encode() -> Vec<u8>` (crcs included, as cls `object_map_save` writes).
//!   See objmap/README.md for the on-disk format and measured figures.
//!
//! # Layout
//! Each `u64` word holds 32 objects; object `32 * w` sits in the two MOST significant bits
//! of word `w`. Ceph stores 4 objects per byte with the first object in the most significant
//! bits, so a word serialized big-endian is exactly 8 bytes of Ceph's data section and the
//! codec is a byte copy. A 1 PiB image at 4 MiB objects (2^28 objects) takes 2^23 words =
//! 64 MiB. Bits past `len()` are always zero, so `encode` never leaks stale states and a
//! grow after a shrink starts the new objects at NONEXISTENT.
//!
//! # Out-of-range indexes
//! Objects past `len()` do not exist. `get` returns `Nonexistent` for them, `set` and
//! `set_range` ignore them (ranges are clamped to `len()`), `swap` returns `Nonexistent`
//! without storing anything and `compare_exchange` returns `Err(Nonexistent)`. None of them
//! panics. Callers that must know use `try_get`, `try_set` or `try_swap`, which report
//! [`OutOfRange`]. The daemon validates object numbers before it touches the map.
//!
//! # Concurrency
//! Single-object updates are atomic read-modify-writes of one word (other objects in the
//! same word are never disturbed). `runs`, `count`, `encode` and `Clone` read word by word:
//! they are not a snapshot of the whole map while other threads write; quiesce writers
//! first when an exact snapshot matters (the daemon flushes after in-flight I/O drained).

pub mod bitset;
pub mod diff;
pub use bitset::BitSet;

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ObjectState {
    Nonexistent = 0,
    Exists = 1,
    Pending = 2,
    /// Exists and unchanged since the latest snapshot (fast-diff).
    ExistsClean = 3,
}

impl ObjectState {
    /// All four states, indexed by their value.
    pub const ALL: [ObjectState; 4] = [
        ObjectState::Nonexistent,
        ObjectState::Exists,
        ObjectState::Pending,
        ObjectState::ExistsClean,
    ];

    /// The state held in the low 2 bits of `bits` (higher bits are ignored).
    pub fn from_bits(bits: u8) -> ObjectState {
        Self::ALL[(bits & 3) as usize]
    }

    /// Ceph's name for the state, as `rbd object-map` tools print it.
    pub fn name(self) -> &'static str {
        match self {
            ObjectState::Nonexistent => "nonexistent",
            ObjectState::Exists => "exists",
            ObjectState::Pending => "pending",
            ObjectState::ExistsClean => "exists_clean",
        }
    }
}

/// A maximal run of objects in one state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub len: u64,
    pub state: ObjectState,
}

impl Run {
    /// One past the last object of the run.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
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

/// An object number past the end of the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("object {index} is out of range: the object map has {len} objects")]
pub struct OutOfRange {
    pub index: u64,
    pub len: u64,
}

const OBJS_PER_WORD: u64 = 32;
/// `01` in every 2-bit slot.
const LOW_BITS: u64 = 0x5555_5555_5555_5555;

/// Bytes of data covered by one data crc (`BitVector<_b>::BLOCK_SIZE = 4096`).
pub const CRC_BLOCK_SIZE: usize = 4096;
/// The encoded header: u8 struct_v, u8 struct_compat, u32 struct_len, u64 object count.
const HEADER_LEN: usize = 14;

/// Ceph's `ceph_crc32c(seed, data, len)`: CRC-32C (Castagnoli) with the seed used as the
/// initial register and no inversion before or after. The crate's `crc32c_append` inverts
/// on the way in and out (the iSCSI convention), so invert around it to undo that.
pub fn ceph_crc32c(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// Every slot of a word holding state `s`.
#[inline]
fn pattern(s: ObjectState) -> u64 {
    LOW_BITS.wrapping_mul(s as u64)
}

/// Shift of object slot `k` (0..32) within its word: slot 0 is in the top bits.
#[inline]
fn shift(k: u64) -> u64 {
    62 - 2 * k
}

/// Mask of slots `a..b` within one word (0 <= a < b <= 32).
#[inline]
fn slot_mask(a: u64, b: u64) -> u64 {
    debug_assert!(a < b && b <= OBJS_PER_WORD);
    let hi = if a == 0 { !0u64 } else { !0u64 >> (2 * a) };
    let lo = if b == OBJS_PER_WORD {
        !0u64
    } else {
        !(!0u64 >> (2 * b))
    };
    hi & lo
}

/// Per-state counts of the slots selected by `mask` (a whole-slot mask) in `w`.
#[inline]
fn count_word(w: u64, mask: u64, out: &mut [u64; 4]) {
    let m = mask & LOW_BITS;
    let lo = w & m;
    let hi = (w >> 1) & m;
    let c3 = (lo & hi).count_ones() as u64;
    let c1 = (lo & !hi).count_ones() as u64;
    let c2 = (hi & !lo).count_ones() as u64;
    let total = m.count_ones() as u64;
    out[0] += total - c1 - c2 - c3;
    out[1] += c1;
    out[2] += c2;
    out[3] += c3;
}

/// The object map. See the crate docs for layout, range and concurrency rules.
pub struct ObjectMap {
    words: Vec<AtomicU64>,
    len: u64,
}

fn words_for(len: u64) -> usize {
    // Sizes that do not fit in memory fail in the allocator, not here; usize is 64-bit on
    // every target the daemon supports.
    len.div_ceil(OBJS_PER_WORD) as usize
}

impl ObjectMap {
    pub fn new(len: u64) -> Self {
        let n = words_for(len);
        let mut words = Vec::with_capacity(n);
        words.resize_with(n, || AtomicU64::new(0));
        ObjectMap { words, len }
    }

    /// Like `new`, but reports a map too large to allocate (e.g. a size read from a corrupt
    /// image header) instead of aborting.
    pub fn try_new(len: u64) -> Result<Self, std::collections::TryReserveError> {
        let n = usize::try_from(len.div_ceil(OBJS_PER_WORD)).unwrap_or(usize::MAX);
        let mut words: Vec<AtomicU64> = Vec::new();
        words.try_reserve_exact(n)?;
        words.resize_with(n, || AtomicU64::new(0));
        Ok(ObjectMap { words, len })
    }

    /// A map holding `states` in order (object 0 first).
    pub fn from_states<I: IntoIterator<Item = ObjectState>>(states: I) -> Self {
        let mut words: Vec<AtomicU64> = Vec::new();
        let mut len = 0u64;
        let mut cur = 0u64;
        for s in states {
            let k = len % OBJS_PER_WORD;
            cur |= (s as u64) << shift(k);
            len += 1;
            if k == OBJS_PER_WORD - 1 {
                words.push(AtomicU64::new(cur));
                cur = 0;
            }
        }
        if len > words.len() as u64 * OBJS_PER_WORD {
            words.push(AtomicU64::new(cur));
        }
        ObjectMap { words, len }
    }

    /// Every object's state, object 0 first (for tests and small maps).
    pub fn to_vec(&self) -> Vec<ObjectState> {
        (0..self.len).map(|i| self.get(i)).collect()
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    fn locate(i: u64) -> (usize, u64) {
        ((i / OBJS_PER_WORD) as usize, shift(i % OBJS_PER_WORD))
    }

    #[inline]
    fn load(&self, w: usize) -> u64 {
        self.words[w].load(Ordering::Acquire)
    }

    /// The state of object `i`, or `None` past the end.
    #[inline]
    pub fn try_get(&self, i: u64) -> Option<ObjectState> {
        if i >= self.len {
            return None;
        }
        let (w, sh) = Self::locate(i);
        Some(ObjectState::from_bits((self.load(w) >> sh) as u8))
    }

    /// The state of object `i`; objects past the end are `Nonexistent`.
    #[inline]
    pub fn get(&self, i: u64) -> ObjectState {
        self.try_get(i).unwrap_or(ObjectState::Nonexistent)
    }

    /// Atomically replaces object `i`'s state, returning the previous one.
    pub fn try_swap(&self, i: u64, s: ObjectState) -> Result<ObjectState, OutOfRange> {
        if i >= self.len {
            return Err(OutOfRange {
                index: i,
                len: self.len,
            });
        }
        let (w, sh) = Self::locate(i);
        let mask = 3u64 << sh;
        let bits = (s as u64) << sh;
        let old = self.words[w]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                Some((cur & !mask) | bits)
            })
            // The closure always returns Some, so this is the Ok value in both arms.
            .unwrap_or_else(|v| v);
        Ok(ObjectState::from_bits((old >> sh) as u8))
    }

    /// Atomically replaces object `i`'s state and returns the previous one (the daemon
    /// uses it to detect a first write). Past the end: stores nothing, returns `Nonexistent`.
    pub fn swap(&self, i: u64, s: ObjectState) -> ObjectState {
        self.try_swap(i, s).unwrap_or(ObjectState::Nonexistent)
    }

    pub fn try_set(&self, i: u64, s: ObjectState) -> Result<(), OutOfRange> {
        self.try_swap(i, s).map(|_| ())
    }

    /// Sets object `i`'s state; a no-op past the end.
    pub fn set(&self, i: u64, s: ObjectState) {
        let _ = self.try_swap(i, s);
    }

    /// Sets object `i` to `new` if it is `current`. `Ok(previous)` on success, else
    /// `Err(actual)`; past the end it is `Err(Nonexistent)` and nothing is stored.
    pub fn compare_exchange(
        &self,
        i: u64,
        current: ObjectState,
        new: ObjectState,
    ) -> Result<ObjectState, ObjectState> {
        if i >= self.len {
            return Err(ObjectState::Nonexistent);
        }
        let (w, sh) = Self::locate(i);
        let mask = 3u64 << sh;
        let want = (current as u64) << sh;
        let bits = (new as u64) << sh;
        match self.words[w].fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
            if cur & mask == want {
                Some((cur & !mask) | bits)
            } else {
                None
            }
        }) {
            Ok(_) => Ok(current),
            Err(cur) => Err(ObjectState::from_bits((cur >> sh) as u8)),
        }
    }

    fn clamp(&self, r: Range<u64>) -> Range<u64> {
        let end = r.end.min(self.len);
        r.start.min(end)..end
    }

    /// Sets every object in `r` (clamped to `len()`) to `s`. Whole words are plain stores;
    /// the partial words at either end are atomic read-modify-writes of just those slots.
    pub fn set_range(&self, r: Range<u64>, s: ObjectState) {
        let r = self.clamp(r);
        if r.is_empty() {
            return;
        }
        let pat = pattern(s);
        let (w0, k0) = ((r.start / OBJS_PER_WORD) as usize, r.start % OBJS_PER_WORD);
        let last = r.end - 1;
        let (w1, k1) = ((last / OBJS_PER_WORD) as usize, last % OBJS_PER_WORD + 1);
        let set_masked = |w: usize, mask: u64| {
            if mask == !0 {
                self.words[w].store(pat, Ordering::Release);
            } else {
                let _ = self.words[w].fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                    Some((c & !mask) | (pat & mask))
                });
            }
        };
        if w0 == w1 {
            set_masked(w0, slot_mask(k0, k1));
            return;
        }
        set_masked(w0, slot_mask(k0, OBJS_PER_WORD));
        for w in &self.words[w0 + 1..w1] {
            w.store(pat, Ordering::Release);
        }
        set_masked(w1, slot_mask(0, k1));
    }

    /// Maximal runs of equal state over `r` (clamped to `len()`), in order. Runs are cut at
    /// the range bounds. Uniform words are skipped with one comparison each.
    pub fn runs(&self, r: Range<u64>) -> Runs<'_> {
        let r = self.clamp(r);
        Runs {
            map: self,
            pos: r.start,
            end: r.end,
        }
    }

    /// The first object at or after `from` (and before `end`) whose state is not `s`, or
    /// `end`. `from < end <= len`.
    fn run_end(&self, from: u64, end: u64, s: ObjectState) -> u64 {
        let pat = pattern(s);
        let mut w = (from / OBJS_PER_WORD) as usize;
        let k = from % OBJS_PER_WORD;
        // Differences before `from` in its word are masked away.
        let mut diff = (self.load(w) ^ pat) & slot_mask(k, OBJS_PER_WORD);
        let last_w = ((end - 1) / OBJS_PER_WORD) as usize;
        loop {
            if diff != 0 {
                let slot = diff.leading_zeros() as u64 / 2;
                let at = w as u64 * OBJS_PER_WORD + slot;
                return at.min(end);
            }
            if w >= last_w {
                return end;
            }
            w += 1;
            diff = self.load(w) ^ pat;
        }
    }

    /// Counts per state over `r` (clamped to `len()`), indexed by `ObjectState as usize`.
    pub fn count(&self, r: Range<u64>) -> [u64; 4] {
        let r = self.clamp(r);
        let mut out = [0u64; 4];
        if r.is_empty() {
            return out;
        }
        let (w0, k0) = ((r.start / OBJS_PER_WORD) as usize, r.start % OBJS_PER_WORD);
        let last = r.end - 1;
        let (w1, k1) = ((last / OBJS_PER_WORD) as usize, last % OBJS_PER_WORD + 1);
        if w0 == w1 {
            count_word(self.load(w0), slot_mask(k0, k1), &mut out);
            return out;
        }
        count_word(self.load(w0), slot_mask(k0, OBJS_PER_WORD), &mut out);
        // Whole words: accumulate popcounts without the per-word mask and total. Words of
        // one state (the common case: fresh or fully written regions) skip the popcounts,
        // which matters because x86-64's baseline has no popcnt instruction.
        let (mut c1, mut c2, mut c3) = (0u64, 0u64, 0u64);
        for w in &self.words[w0 + 1..w1] {
            let v = w.load(Ordering::Acquire);
            if v == 0 {
                continue;
            }
            let lo = v & LOW_BITS;
            let hi = (v >> 1) & LOW_BITS;
            if v == !0 {
                c3 += OBJS_PER_WORD;
            } else if hi == 0 && lo == LOW_BITS {
                c1 += OBJS_PER_WORD;
            } else {
                c3 += (lo & hi).count_ones() as u64;
                c1 += (lo & !hi).count_ones() as u64;
                c2 += (hi & !lo).count_ones() as u64;
            }
        }
        let middle = (w1 - w0 - 1) as u64 * OBJS_PER_WORD;
        out[0] += middle - c1 - c2 - c3;
        out[1] += c1;
        out[2] += c2;
        out[3] += c3;
        count_word(self.load(w1), slot_mask(0, k1), &mut out);
        out
    }

    /// Changes the number of objects. New objects are `Nonexistent`; on a shrink the dropped
    /// objects' bits are cleared so a later grow does not bring them back.
    pub fn resize(&mut self, len: u64) {
        let n = words_for(len);
        self.words.resize_with(n, || AtomicU64::new(0));
        self.words.shrink_to_fit();
        let k = len % OBJS_PER_WORD;
        if len < self.len && k != 0 {
            if let Some(w) = self.words.last_mut() {
                *w.get_mut() &= slot_mask(0, k);
            }
        }
        self.len = len;
    }

    /// Length in bytes of Ceph's data section for this map: 4 objects per byte.
    fn data_len(len: u64) -> u64 {
        len.div_ceil(4)
    }

    /// The exact bytes of the RADOS object `rbd_object_map.<id>[.<snap>]` as Ceph's
    /// `BitVector<2>::encode` writes it with crcs enabled (cls_rbd `object_map_save`).
    pub fn encode(&self) -> Vec<u8> {
        let data_len = Self::data_len(self.len) as usize;
        let blocks = data_len.div_ceil(CRC_BLOCK_SIZE);
        let footer_len = 8 + 4 * blocks;
        let mut out = Vec::with_capacity(4 + HEADER_LEN + data_len + 4 + footer_len);

        out.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        out.push(1); // struct_v
        out.push(1); // struct_compat
        out.extend_from_slice(&8u32.to_le_bytes()); // struct_len
        out.extend_from_slice(&self.len.to_le_bytes());
        let header_crc = ceph_crc32c(0, &out[4..4 + HEADER_LEN]);

        let data_start = out.len();
        for w in &self.words {
            out.extend_from_slice(&w.load(Ordering::Acquire).to_be_bytes());
        }
        out.truncate(data_start + data_len);

        let mut footer = Vec::with_capacity(4 + footer_len);
        footer.extend_from_slice(&(footer_len as u32).to_le_bytes());
        footer.extend_from_slice(&header_crc.to_le_bytes());
        footer.extend_from_slice(&(blocks as u32).to_le_bytes());
        for block in out[data_start..].chunks(CRC_BLOCK_SIZE) {
            footer.extend_from_slice(&ceph_crc32c(0, block).to_le_bytes());
        }
        out.extend_from_slice(&footer);
        out
    }

    /// Decodes the content of an object map RADOS object. Everything is checked: header
    /// length and version, the object count against the data and footer lengths, the
    /// header crc, every data block crc, and that nothing follows the footer. A map
    /// without crcs is refused (see [`ObjectMap::decode_allow_no_crc`]).
    pub fn decode(bytes: &[u8]) -> Result<ObjectMap, CodecError> {
        decode_impl(bytes, false)
    }

    /// Like [`ObjectMap::decode`], but also accepts an empty footer (no crcs), which is what
    /// the cls method `rbd.object_map_load` returns: the OSD verified the crcs before it
    /// re-encoded the map with crcs disabled. Crcs that are present are still checked.
    pub fn decode_allow_no_crc(bytes: &[u8]) -> Result<ObjectMap, CodecError> {
        decode_impl(bytes, true)
    }

    /// Memory held by the map's words, in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.words.capacity() * std::mem::size_of::<AtomicU64>()
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], CodecError> {
        let remaining = self.bytes.len() - self.pos;
        if n > remaining {
            return Err(CodecError::Truncated(format!(
                "{what} needs {n} bytes at offset {}, only {remaining} left (object is {} bytes)",
                self.pos,
                self.bytes.len()
            )));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<u32, CodecError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

fn decode_impl(bytes: &[u8], allow_no_crc: bool) -> Result<ObjectMap, CodecError> {
    // Follows BitVector<_b>::decode: decode_header, copy the data, decode_footer, then
    // decode_data checks each block's crc.
    let mut r = Reader { bytes, pos: 0 };

    let header_len = r.u32("header length")?;
    if header_len as usize != HEADER_LEN {
        return Err(CodecError::BadHeader(format!(
            "header length is {header_len}, expected {HEADER_LEN}"
        )));
    }
    let header = r.take(HEADER_LEN, "header")?;
    let (struct_v, compat) = (header[0], header[1]);
    // Ceph has only ever written version 1. A newer encoding could carry fields we would
    // drop when writing the map back, so it is refused rather than half understood.
    if struct_v != 1 || compat != 1 {
        return Err(CodecError::BadHeader(format!(
            "struct_v {struct_v} compat {compat}, only version 1 (compat 1) is supported"
        )));
    }
    let struct_len = u32::from_le_bytes([header[2], header[3], header[4], header[5]]);
    if struct_len != 8 {
        return Err(CodecError::BadHeader(format!(
            "struct_len is {struct_len}, expected 8"
        )));
    }
    let mut size_bytes = [0u8; 8];
    size_bytes.copy_from_slice(&header[6..14]);
    let len = u64::from_le_bytes(size_bytes);
    let header_crc = ceph_crc32c(0, header);

    // The data length follows from the object count; check it against what is there before
    // allocating, so a corrupt count cannot ask for an absurd allocation.
    let data_len = ObjectMap::data_len(len);
    let remaining = (bytes.len() - r.pos) as u64;
    if data_len > remaining {
        return Err(CodecError::Truncated(format!(
            "header says {len} objects ({data_len} data bytes) but only {remaining} bytes follow the header"
        )));
    }
    let data_len = data_len as usize;
    let data = r.take(data_len, "data")?;

    let footer_len = r.u32("footer length")? as usize;
    let footer_at = r.pos;
    let footer = r.take(footer_len, "footer")?;
    if r.pos != bytes.len() {
        return Err(CodecError::BadLength(format!(
            "{} trailing bytes after the footer at offset {} (header says {len} objects)",
            bytes.len() - r.pos,
            r.pos
        )));
    }

    let blocks = data_len.div_ceil(CRC_BLOCK_SIZE);
    let mut crcs: &[u8] = &[];
    if footer_len == 0 {
        if !allow_no_crc {
            return Err(CodecError::BadCrc(
                "footer is empty: the map has no crcs to verify it".into(),
            ));
        }
    } else {
        let mut f = Reader {
            bytes: footer,
            pos: 0,
        };
        let stored_header_crc = f.u32("footer header crc")?;
        let count = f.u32("footer data crc count")? as usize;
        crcs = &footer[8..];
        if count != blocks || crcs.len() != 4 * blocks {
            return Err(CodecError::BadLength(format!(
                "footer at offset {footer_at} has {} bytes of data crcs and a count of {count}, \
                 but {len} objects ({data_len} data bytes) need {blocks} crcs of {CRC_BLOCK_SIZE}-byte blocks",
                crcs.len()
            )));
        }
        if stored_header_crc != header_crc {
            return Err(CodecError::BadCrc(format!(
                "object map header crc mismatch: stored {stored_header_crc:#010x}, computed {header_crc:#010x}"
            )));
        }
    }
    for (i, (block, stored)) in data
        .chunks(CRC_BLOCK_SIZE)
        .zip(crcs.chunks_exact(4))
        .enumerate()
    {
        let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
        let computed = ceph_crc32c(0, block);
        if stored != computed {
            return Err(CodecError::BadCrc(format!(
                "object map data crc mismatch in block {i}: stored {stored:#010x}, computed {computed:#010x}"
            )));
        }
    }

    let exact = data.chunks_exact(8);
    let tail = exact.remainder();
    let mut words = Vec::with_capacity(words_for(len));
    words.extend(exact.map(|c| {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        AtomicU64::new(u64::from_be_bytes(b))
    }));
    if !tail.is_empty() {
        let mut b = [0u8; 8];
        b[..tail.len()].copy_from_slice(tail);
        words.push(AtomicU64::new(u64::from_be_bytes(b)));
    }
    let mut map = ObjectMap { words, len };
    debug_assert_eq!(map.words.len(), words_for(len));
    // Ceph keeps the padding bits of the last byte when it shrinks a map; they belong to no
    // object (and were covered by the crc above), so drop them to keep the invariant that
    // bits past len() are zero.
    let k = len % OBJS_PER_WORD;
    if k != 0 {
        if let Some(w) = map.words.last_mut() {
            *w.get_mut() &= slot_mask(0, k);
        }
    }
    Ok(map)
}

/// Iterator over maximal runs, see [`ObjectMap::runs`].
pub struct Runs<'a> {
    map: &'a ObjectMap,
    pos: u64,
    end: u64,
}

impl Iterator for Runs<'_> {
    type Item = Run;

    fn next(&mut self) -> Option<Run> {
        if self.pos >= self.end {
            return None;
        }
        let start = self.pos;
        let state = self.map.get(start);
        let stop = self.map.run_end(start, self.end, state);
        self.pos = stop;
        Some(Run {
            start,
            len: stop - start,
            state,
        })
    }
}

impl std::iter::FusedIterator for Runs<'_> {}

impl Clone for ObjectMap {
    fn clone(&self) -> Self {
        ObjectMap {
            words: self
                .words
                .iter()
                .map(|w| AtomicU64::new(w.load(Ordering::Acquire)))
                .collect(),
            len: self.len,
        }
    }
}

impl fmt::Debug for ObjectMap {
    /// A summary, never the states themselves: a 1 PiB image's map is 64 MiB.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.count(0..self.len);
        f.debug_struct("ObjectMap")
            .field("len", &self.len)
            .field("nonexistent", &c[0])
            .field("exists", &c[1])
            .field("pending", &c[2])
            .field("exists_clean", &c[3])
            .finish()
    }
}

impl PartialEq for ObjectMap {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && self
                .words
                .iter()
                .zip(&other.words)
                .all(|(a, b)| a.load(Ordering::Acquire) == b.load(Ordering::Acquire))
    }
}

impl Eq for ObjectMap {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_masks() {
        assert_eq!(slot_mask(0, 32), !0);
        assert_eq!(slot_mask(0, 1), 0xc000_0000_0000_0000);
        assert_eq!(slot_mask(31, 32), 3);
        assert_eq!(slot_mask(1, 3), 0x3c00_0000_0000_0000);
    }

    #[test]
    fn object_zero_is_in_the_top_bits() {
        let m = ObjectMap::new(40);
        m.set(0, ObjectState::ExistsClean);
        m.set(33, ObjectState::Exists);
        assert_eq!(m.words[0].load(Ordering::Relaxed), 0xc000_0000_0000_0000);
        assert_eq!(m.words[1].load(Ordering::Relaxed), 0x1000_0000_0000_0000);
    }

    #[test]
    fn out_of_range_is_harmless() {
        let m = ObjectMap::new(5);
        m.set(5, ObjectState::Exists);
        m.set(u64::MAX, ObjectState::Exists);
        m.set_range(3..u64::MAX, ObjectState::Pending);
        #[allow(clippy::reversed_empty_ranges)]
        m.set_range(9..7, ObjectState::Pending);
        assert_eq!(m.get(5), ObjectState::Nonexistent);
        assert_eq!(m.try_get(5), None);
        assert_eq!(
            m.try_set(5, ObjectState::Exists),
            Err(OutOfRange { index: 5, len: 5 })
        );
        assert_eq!(m.swap(7, ObjectState::Exists), ObjectState::Nonexistent);
        assert_eq!(
            m.compare_exchange(7, ObjectState::Nonexistent, ObjectState::Exists),
            Err(ObjectState::Nonexistent)
        );
        // Nothing leaked into the padding slots of the only word.
        assert_eq!(
            m.words[0].load(Ordering::Relaxed) & !slot_mask(0, 5),
            0,
            "bits past len must stay zero"
        );
        assert_eq!(m.count(0..u64::MAX), [3, 0, 2, 0]);
    }

    #[test]
    fn try_new_reports_absurd_sizes() {
        assert!(ObjectMap::try_new(u64::MAX).is_err());
        let m = ObjectMap::try_new(100).unwrap();
        assert_eq!(m.len(), 100);
        assert_eq!(m.count(0..100), [100, 0, 0, 0]);
    }
}
