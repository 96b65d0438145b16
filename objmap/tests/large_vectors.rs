//! The two-crc-block vectors of tests/data/README-large.md: decode to the listed states and
//! encode back to the same bytes.

use objmap::{ObjectMap, ObjectState};

const HEAD: &[u8] = include_bytes!("data/25600-head-after-snap.bin");
const SNAP10: &[u8] = include_bytes!("data/25600-snap10.bin");

fn expect(bytes: &[u8], set: &[(u64, ObjectState)]) {
    let m = ObjectMap::decode(bytes).expect("decode");
    assert_eq!(m.len(), 25600);
    for i in 0..m.len() {
        let want = set
            .iter()
            .find(|(o, _)| *o == i)
            .map_or(ObjectState::Nonexistent, |(_, s)| *s);
        assert_eq!(m.get(i), want, "object {i}");
    }
    assert_eq!(m.encode(), bytes, "re-encoding differs");
}

#[test]
fn head_after_snapshot() {
    use ObjectState::*;
    expect(
        HEAD,
        &[
            (0, ExistsClean),
            (3, Exists),
            (16383, ExistsClean),
            (16384, ExistsClean),
            (20000, Exists),
            (25599, ExistsClean),
        ],
    );
}

#[test]
fn snapshot_map() {
    use ObjectState::*;
    expect(
        SNAP10,
        &[
            (0, Exists),
            (3, Exists),
            (16383, Exists),
            (16384, Exists),
            (25599, Exists),
        ],
    );
}

#[test]
fn second_block_crc_is_checked() {
    let mut b = HEAD.to_vec();
    // A byte in the second data block (object 20000 lives at data byte 5000).
    b[4 + 14 + 5000] ^= 0x40;
    assert!(ObjectMap::decode(&b).is_err());
}
