//! Codec tests: real Ceph vectors, multi-block crc layout, and corruption handling.

use objmap::{ceph_crc32c, CodecError, ObjectMap, ObjectState, CRC_BLOCK_SIZE};
use ObjectState::*;

const ALL_EXISTS: &[u8] = include_bytes!("data/256-all-exists.bin");
const HEAD_AFTER_SNAP: &[u8] = include_bytes!("data/16-head-after-snap.bin");
const SNAP4: &[u8] = include_bytes!("data/16-snap4.bin");

/// Bit-at-a-time CRC-32C (reflected polynomial 0x82F63B78), register seeded with `seed`,
/// no inversion: written from the definition, independent of the crate the library uses.
fn reference_crc(seed: u32, data: &[u8]) -> u32 {
    let mut crc = seed;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    crc
}

fn states_from(len: usize, set: &[(usize, ObjectState)]) -> Vec<ObjectState> {
    let mut v = vec![Nonexistent; len];
    for &(i, s) in set {
        v[i] = s;
    }
    v
}

fn vectors() -> Vec<(&'static str, &'static [u8], Vec<ObjectState>)> {
    vec![
        ("256-all-exists", ALL_EXISTS, vec![Exists; 256]),
        (
            "16-head-after-snap",
            HEAD_AFTER_SNAP,
            states_from(
                16,
                &[
                    (0, ExistsClean),
                    (3, ExistsClean),
                    (5, Exists),
                    (10, Exists),
                ],
            ),
        ),
        (
            "16-snap4",
            SNAP4,
            states_from(16, &[(0, Exists), (3, Exists), (5, Exists)]),
        ),
    ]
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

#[test]
fn crc_matches_ceph_convention() {
    // The header crc stored in each real vector is ceph_crc32c(0, 14 header bytes).
    for (name, bytes, _) in vectors() {
        let header = &bytes[4..18];
        let data_len = (le32(bytes, 10) as usize).div_ceil(4);
        let footer = 18 + data_len;
        let stored = le32(bytes, footer + 4);
        assert_eq!(ceph_crc32c(0, header), stored, "{name}");
        assert_eq!(reference_crc(0, header), stored, "{name}");
    }
    // And the function agrees with the reference for other seeds too.
    for seed in [0u32, 1, 0xffff_ffff, 0x1234_5678] {
        assert_eq!(
            ceph_crc32c(seed, b"123456789"),
            reference_crc(seed, b"123456789")
        );
    }
}

#[test]
fn real_vectors_decode_to_listed_states() {
    for (name, bytes, states) in vectors() {
        let map = ObjectMap::decode(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(map.len(), states.len() as u64, "{name}");
        assert_eq!(map.to_vec(), states, "{name}");
    }
}

#[test]
fn listed_states_encode_to_real_bytes() {
    for (name, bytes, states) in vectors() {
        let map = ObjectMap::from_states(states.iter().copied());
        assert_eq!(map.encode(), bytes, "{name}");
        // Built with set() instead of from_states: same bytes.
        let m2 = ObjectMap::new(states.len() as u64);
        for (i, s) in states.iter().enumerate() {
            m2.set(i as u64, *s);
        }
        assert_eq!(m2.encode(), bytes, "{name}");
    }
}

/// Checks `enc` against the layout of BitVector<_b>::encode (bit_vector.hpp):
/// - encode_header: a bufferlist-encoded header (u32 length, then ENCODE_START(1, 1):
///   u8 struct_v, u8 compat, u32 struct_len, then `encode(m_size)` as u64), and
///   `m_header_crc = header_bl.crc32c(0)` over that header (not its length prefix);
/// - encode_data: the data bytes, `(size + ELEMENTS_PER_BLOCK - 1) / ELEMENTS_PER_BLOCK`
///   of them (4 objects per byte), with `m_data_crcs[offset / BLOCK_SIZE] =
///   bit.crc32c(0)` for each BLOCK_SIZE (4096) byte slice, the last one shorter;
/// - encode_footer: a bufferlist-encoded footer holding m_header_crc, `__u32 size =
///   m_data_crcs.size()` (= `(buffer_size + BLOCK_SIZE - 1) / BLOCK_SIZE` from resize), and
///   every data crc from encode_data_crcs(footer_bl, 0, m_size).
/// - compute_index: object i is in byte i / 4 at shift ((4 - 1) - i % 4) * 2, i.e. object
///   0 in the most significant bits.
fn check_layout(enc: &[u8], states: &[ObjectState]) {
    let n = states.len();
    // BitVector<_b>::BLOCK_SIZE = 4096 in bit_vector.hpp.
    assert_eq!(CRC_BLOCK_SIZE, 4096);
    assert_eq!(le32(enc, 0), 14);
    assert_eq!(&enc[4..10], &[1, 1, 8, 0, 0, 0]);
    assert_eq!(
        u64::from_le_bytes(enc[10..18].try_into().unwrap()),
        n as u64
    );
    let data_len = n.div_ceil(4);
    let data = &enc[18..18 + data_len];
    for (i, s) in states.iter().enumerate() {
        let shift = (3 - i % 4) * 2;
        assert_eq!((data[i / 4] >> shift) & 3, *s as u8, "object {i}");
    }
    let blocks = data_len.div_ceil(4096);
    let f = 18 + data_len;
    assert_eq!(le32(enc, f) as usize, 8 + 4 * blocks, "footer length");
    assert_eq!(
        le32(enc, f + 4),
        reference_crc(0, &enc[4..18]),
        "header crc"
    );
    assert_eq!(le32(enc, f + 8) as usize, blocks, "crc count");
    for b in 0..blocks {
        let block = &data[b * 4096..((b + 1) * 4096).min(data_len)];
        assert_eq!(
            le32(enc, f + 12 + 4 * b),
            reference_crc(0, block),
            "block {b}"
        );
    }
    assert_eq!(enc.len(), f + 12 + 4 * blocks, "nothing after the footer");
}

/// A deterministic pseudo-random state sequence.
fn pseudo_states(n: usize, mut seed: u64) -> Vec<ObjectState> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ObjectState::from_bits((seed >> 40) as u8)
        })
        .collect()
}

#[test]
fn multi_block_maps_round_trip_with_ceph_crc_layout() {
    // 25,600 objects = 6,400 data bytes = 2 blocks (4096 + 2304); 100,000 objects = 25,000
    // bytes = 7 blocks (6 * 4096 + 424); 16,384 objects = exactly one full block; 16,385
    // spills one byte into a second block; 0 objects = no data and no crcs.
    for (n, blocks) in [
        (25_600usize, 2usize),
        (100_000, 7),
        (16_384, 1),
        (16_385, 2),
        (16_388, 2),
        (1, 1),
        (0, 0),
    ] {
        let states = pseudo_states(n, 0x9E37_79B9_7F4A_7C15 ^ n as u64);
        let map = ObjectMap::from_states(states.iter().copied());
        let enc = map.encode();
        assert_eq!(le32(&enc, 18 + n.div_ceil(4) + 8) as usize, blocks, "n={n}");
        check_layout(&enc, &states);
        let back = ObjectMap::decode(&enc).unwrap_or_else(|e| panic!("n={n}: {e}"));
        assert_eq!(back.len(), n as u64);
        assert_eq!(back.to_vec(), states, "n={n}");
        assert_eq!(back.encode(), enc, "n={n}");
    }
    // Each block crc really is per block: a change in block 1 leaves block 0's crc alone.
    let a = ObjectMap::new(25_600);
    let e1 = a.encode();
    a.set(20_000, Exists);
    let e2 = a.encode();
    let f = 18 + 6400;
    assert_eq!(le32(&e1, f + 12), le32(&e2, f + 12));
    assert_ne!(le32(&e1, f + 16), le32(&e2, f + 16));
}

fn expect_err(bytes: &[u8], what: &str) -> CodecError {
    match ObjectMap::decode(bytes) {
        Ok(m) => panic!("{what}: corrupt map accepted: {m:?}"),
        Err(e) => e,
    }
}

#[test]
fn bad_header_crc_is_refused() {
    let mut b = HEAD_AFTER_SNAP.to_vec();
    let f = 18 + 4;
    b[f + 4] ^= 0x01;
    let e = expect_err(&b, "header crc");
    assert!(matches!(e, CodecError::BadCrc(_)), "{e}");
    assert!(e.to_string().contains("header crc mismatch"), "{e}");
    assert!(
        e.to_string()
            .contains("stored 0x6ec1b3e7, computed 0x6ec1b3e6"),
        "names both crcs: {e}"
    );
}

#[test]
fn bad_data_crc_is_refused_naming_the_block() {
    // Flip a data bit in block 1 of a two-block map.
    let states = pseudo_states(25_600, 7);
    let mut b = ObjectMap::from_states(states).encode();
    b[18 + 5000] ^= 0x40;
    let e = expect_err(&b, "data bit");
    assert!(matches!(e, CodecError::BadCrc(_)), "{e}");
    assert!(
        e.to_string()
            .contains("data crc mismatch in block 1: stored 0x"),
        "{e}"
    );
    // A flipped stored crc of block 0.
    let mut b = ObjectMap::new(25_600).encode();
    b[18 + 6400 + 12] ^= 0x80;
    let e = expect_err(&b, "stored crc");
    assert!(e.to_string().contains("in block 0"), "{e}");
    // Every single-bit flip of a real vector is refused.
    for v in [ALL_EXISTS, HEAD_AFTER_SNAP, SNAP4] {
        for byte in 0..v.len() {
            for bit in 0..8 {
                let mut b = v.to_vec();
                b[byte] ^= 1 << bit;
                expect_err(&b, &format!("flip byte {byte} bit {bit}"));
            }
        }
    }
}

/// Rewrites the header's object count and fixes the header crc, so only the length
/// relation between count, data and footer can catch it.
fn with_count(bytes: &[u8], count: u64) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[10..18].copy_from_slice(&count.to_le_bytes());
    let old_data = (le32(bytes, 10) as usize).div_ceil(4);
    let crc = ceph_crc32c(0, &b[4..18]);
    b[18 + old_data + 4..18 + old_data + 8].copy_from_slice(&crc.to_le_bytes());
    b
}

#[test]
fn wrong_object_count_is_refused() {
    for v in [ALL_EXISTS, HEAD_AFTER_SNAP, SNAP4] {
        let n = le32(v, 10) as u64;
        for count in [0, 1, n - 4, n - 1, n + 1, n + 4, n * 2, u64::MAX] {
            let b = with_count(v, count);
            if count.div_ceil(4) == n.div_ceil(4) {
                // Same data length and a matching header crc: a consistent map of `count`
                // objects (Ceph would read it the same way), the rest being padding.
                let m = ObjectMap::decode(&b).unwrap();
                assert_eq!(m.len(), count);
                continue;
            }
            expect_err(&b, &format!("count {count} for {n}"));
        }
    }
    // A count off by one within the same data length is caught by the header crc when the
    // crc is left alone.
    let mut b = HEAD_AFTER_SNAP.to_vec();
    b[10] = 15;
    assert!(matches!(expect_err(&b, "count 15"), CodecError::BadCrc(_)));
    // A huge count does not make the decoder allocate: it is a truncation error.
    let mut b = HEAD_AFTER_SNAP.to_vec();
    b[10..18].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(expect_err(&b, "huge"), CodecError::Truncated(_)));
}

#[test]
fn wrong_crc_count_is_refused() {
    let mut b = ObjectMap::new(25_600).encode();
    let f = 18 + 6400;
    b[f + 8] = 1; // count says 1 block, two crcs follow
    let e = expect_err(&b, "crc count");
    assert!(matches!(e, CodecError::BadLength(_)), "{e}");
    // Footer with one crc too few (footer length and count both say 1).
    let mut b = ObjectMap::new(25_600).encode();
    b[f] = 12;
    b[f + 8] = 1;
    b.truncate(b.len() - 4);
    assert!(matches!(
        expect_err(&b, "short footer"),
        CodecError::BadLength(_)
    ));
}

#[test]
fn every_truncation_is_refused() {
    let big = ObjectMap::from_states(pseudo_states(25_600, 3)).encode();
    for v in [ALL_EXISTS, HEAD_AFTER_SNAP, SNAP4, &big[..]] {
        for len in 0..v.len() {
            let e = expect_err(&v[..len], &format!("prefix of {len}/{} bytes", v.len()));
            let msg = e.to_string();
            assert!(!msg.is_empty());
        }
    }
}

#[test]
fn trailing_garbage_is_refused() {
    for v in [ALL_EXISTS, HEAD_AFTER_SNAP, SNAP4] {
        for extra in [&[0u8][..], &[0, 0, 0, 0], &[0xff; 9]] {
            let mut b = v.to_vec();
            b.extend_from_slice(extra);
            let e = expect_err(&b, "trailing");
            assert!(matches!(e, CodecError::BadLength(_)), "{e}");
            assert!(e.to_string().contains("trailing"), "{e}");
        }
    }
}

#[test]
fn wrong_version_is_refused() {
    for (at, val, what) in [
        (4usize, 2u8, "struct_v 2"),
        (4, 0, "struct_v 0"),
        (5, 2, "compat 2"),
        (5, 0, "compat 0"),
        (6, 9, "struct_len 9"),
        (0, 15, "header length 15"),
    ] {
        let mut b = SNAP4.to_vec();
        b[at] = val;
        // Fix the header crc so only the version check can catch it.
        let f = 18 + 4;
        let crc = ceph_crc32c(0, &b[4..18]);
        b[f + 4..f + 8].copy_from_slice(&crc.to_le_bytes());
        let e = expect_err(&b, what);
        assert!(matches!(e, CodecError::BadHeader(_)), "{what}: {e}");
    }
}

#[test]
fn empty_footer_only_with_allow_no_crc() {
    // What cls_rbd object_map_load returns: the same header and data, footer length 0.
    let mut b = HEAD_AFTER_SNAP[..18 + 4].to_vec();
    b.extend_from_slice(&0u32.to_le_bytes());
    let e = expect_err(&b, "no crc");
    assert!(matches!(e, CodecError::BadCrc(_)), "{e}");
    let m = ObjectMap::decode_allow_no_crc(&b).unwrap();
    assert_eq!(
        m.to_vec(),
        ObjectMap::decode(HEAD_AFTER_SNAP).unwrap().to_vec()
    );
    // Crcs that are there are still checked in that mode.
    let mut b = HEAD_AFTER_SNAP.to_vec();
    b[18] ^= 1;
    assert!(ObjectMap::decode_allow_no_crc(&b).is_err());
}

#[test]
fn padding_bits_are_not_states() {
    // 5 objects: the second data byte holds object 4 and three padding slots. Ceph can
    // leave padding bits set after a shrink; they are covered by the crc but no object.
    let m = ObjectMap::from_states([Exists, Nonexistent, Nonexistent, Nonexistent, Exists]);
    let mut b = m.encode();
    b[19] |= 0x3f;
    let crc = ceph_crc32c(0, &b[18..20]);
    b[20 + 12..20 + 16].copy_from_slice(&crc.to_le_bytes());
    let d = ObjectMap::decode(&b).unwrap();
    assert_eq!(d.to_vec(), m.to_vec());
    assert_eq!(d.count(0..5), [3, 2, 0, 0]);
    let mut d = d;
    d.resize(8);
    assert_eq!(d.get(5), Nonexistent);
    assert_eq!(d.get(7), Nonexistent);
}
