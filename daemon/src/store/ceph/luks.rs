//! Recognising librbd's client-side encryption (`rbd encryption format IMAGE luks1|luks2`,
//! Ceph 16.2 pacific and later) from the first bytes of an image.
//!
//! The format leaves no mark in the image header: librbd has libcryptsetup write a standard
//! LUKS header at offset 0 of the image data (object 0), with the data alignment set to the
//! image's object size (librbd/crypto/luks/FormatRequest.cc and Header.cc). So the encrypted
//! data starts at the first multiple of the object size past the LUKS metadata, where
//! `cryptsetup luksFormat` puts it at its own default (LUKS1: 2 MiB, LUKS2: 16 MiB). Checked
//! with Ceph 16.2.15 and libcryptsetup 2.6.1:
//!
//! | object size | librbd LUKS1 | librbd LUKS2 |
//! |---|---|---|
//! | 1 MiB | 2 MiB | 16 MiB |
//! | 4 MiB (default) | 4 MiB | 16 MiB |
//! | 8 MiB | 8 MiB | 16 MiB |
//! | 16 MiB | 16 MiB | 16 MiB |
//! | 32 MiB | 32 MiB | 32 MiB |
//!
//! A data offset equal to the object size is therefore librbd's layout; anything else is
//! served as it is (a LUKS volume made by cryptsetup on the device is a legitimate thing to
//! serve raw). Where librbd's offset equals cryptsetup's default (LUKS2 on objects up to
//! 16 MiB, LUKS1 on objects up to 2 MiB) the two are byte-for-byte the same layout and cannot
//! be told apart.
//!
//! Everything here is pure and total: any input, however short or malformed, gives an
//! answer and never panics.

/// How much of object 0 to read first: a LUKS1 header (592 bytes) and a LUKS2 header of the
/// default size (16 KiB) fit; a larger LUKS2 header needs [`luks2_header_size`] bytes.
pub const PROBE_LEN: usize = 64 << 10;

/// The largest LUKS2 binary header plus JSON area (the spec allows 16 KiB to 4 MiB).
pub const LUKS2_MAX_HEADER: u64 = 4 << 20;

const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// LUKS1: `payload-offset`, big-endian u32 in 512-byte sectors, at byte 104.
const LUKS1_PAYLOAD_OFFSET_AT: usize = 104;
/// LUKS2: the binary header (4 KiB) precedes the JSON area.
const LUKS2_BINARY_HEADER: usize = 4096;

/// What a LUKS header at offset 0 says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksHeader {
    /// 1 or 2.
    pub version: u16,
    /// Where the encrypted data starts, in bytes from the start of the device.
    pub data_offset: u64,
}

impl LuksHeader {
    /// Whether this is the layout `rbd encryption format` writes on an image whose objects
    /// are `object_size` bytes: the data aligned to exactly one object.
    pub fn is_librbd_layout(&self, object_size: u64) -> bool {
        self.data_offset == object_size
    }
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn version(head: &[u8]) -> Option<u16> {
    if head.get(..MAGIC.len())? != MAGIC {
        return None;
    }
    be_u16(head, MAGIC.len())
}

/// The size of the LUKS2 header (binary header and JSON area) when `head` starts with one
/// whose size is valid (a power of two from 16 KiB to 4 MiB): that many bytes from offset 0
/// are needed to parse it.
pub fn luks2_header_size(head: &[u8]) -> Option<u64> {
    if version(head)? != 2 {
        return None;
    }
    let size = be_u64(head, 8)?;
    (size.is_power_of_two() && (16 << 10..=LUKS2_MAX_HEADER).contains(&size)).then_some(size)
}

/// Parses a LUKS1 or LUKS2 header at the start of `head`. `None` when there is none, or it
/// is incomplete or malformed (a LUKS2 header needs [`luks2_header_size`] bytes).
pub fn parse(head: &[u8]) -> Option<LuksHeader> {
    match version(head)? {
        1 => {
            let sectors = be_u32(head, LUKS1_PAYLOAD_OFFSET_AT)?;
            (sectors != 0).then(|| LuksHeader {
                version: 1,
                data_offset: u64::from(sectors) * 512,
            })
        }
        2 => {
            let size = usize::try_from(luks2_header_size(head)?).ok()?;
            let area = head.get(LUKS2_BINARY_HEADER..size)?;
            // The JSON text is padded with NULs to the end of its area.
            let text = &area[..area.iter().position(|&b| b == 0).unwrap_or(area.len())];
            let json: serde_json::Value = serde_json::from_slice(text).ok()?;
            // Offsets are decimal strings in LUKS2 (JSON numbers lose precision past 2^53).
            let offset = json.get("segments")?.get("0")?.get("offset")?.as_str()?;
            Some(LuksHeader {
                version: 2,
                data_offset: offset.parse().ok()?,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn luks1(payload_sectors: u32) -> Vec<u8> {
        let mut h = vec![0u8; 592];
        h[..6].copy_from_slice(MAGIC);
        h[6..8].copy_from_slice(&1u16.to_be_bytes());
        h[8..11].copy_from_slice(b"aes");
        h[40..51].copy_from_slice(b"xts-plain64");
        h[72..78].copy_from_slice(b"sha256");
        h[104..108].copy_from_slice(&payload_sectors.to_be_bytes());
        h[108..112].copy_from_slice(&64u32.to_be_bytes());
        h
    }

    fn luks2_with_json(hdr_size: u64, json: &str) -> Vec<u8> {
        let mut h = vec![0u8; hdr_size as usize];
        h[..6].copy_from_slice(MAGIC);
        h[6..8].copy_from_slice(&2u16.to_be_bytes());
        h[8..16].copy_from_slice(&hdr_size.to_be_bytes());
        h[16..24].copy_from_slice(&3u64.to_be_bytes());
        h[72..78].copy_from_slice(b"sha256");
        h[4096..4096 + json.len()].copy_from_slice(json.as_bytes());
        h
    }

    /// The JSON area as cryptsetup 2.6 / librbd write it (keyslot and digest details trimmed).
    fn luks2(data_offset: u64) -> Vec<u8> {
        let json = format!(
            r#"{{"keyslots":{{"0":{{"type":"luks2","key_size":64,"af":{{"type":"luks1","stripes":4000,"hash":"sha256"}},"area":{{"type":"raw","offset":"32768","size":"258048","encryption":"aes-xts-plain64","key_size":64}},"kdf":{{"type":"argon2id","time":4,"memory":1048576,"cpus":4,"salt":"AAAA"}}}}}},"tokens":{{}},"segments":{{"0":{{"type":"crypt","offset":"{data_offset}","size":"dynamic","iv_tweak":"0","encryption":"aes-xts-plain64","sector_size":4096}}}},"digests":{{"0":{{"type":"pbkdf2","keyslots":["0"],"segments":["0"],"hash":"sha256","iterations":1000,"salt":"AAAA","digest":"AAAA"}}}},"config":{{"json_size":"12288","keyslots_size":"16744448"}}}}"#
        );
        luks2_with_json(16 << 10, &json)
    }

    #[test]
    fn librbd_luks1_is_recognised() {
        // `rbd encryption format` on 4 MiB objects: payload at 8192 sectors.
        let h = parse(&luks1(8192)).unwrap();
        assert_eq!(
            h,
            LuksHeader {
                version: 1,
                data_offset: 4 * MIB
            }
        );
        assert!(h.is_librbd_layout(4 * MIB));
        assert!(parse(&luks1(65536)).unwrap().is_librbd_layout(32 * MIB));
    }

    #[test]
    fn librbd_luks2_is_recognised() {
        let h = parse(&luks2(32 * MIB)).unwrap();
        assert_eq!(
            h,
            LuksHeader {
                version: 2,
                data_offset: 32 * MIB
            }
        );
        assert!(h.is_librbd_layout(32 * MIB));
        assert!(parse(&luks2(16 * MIB)).unwrap().is_librbd_layout(16 * MIB));
        // Only the header area counts: what follows it (the keyslots area) is irrelevant.
        let mut long = luks2(32 * MIB);
        long.extend(std::iter::repeat_n(0xa5, PROBE_LEN));
        assert!(parse(&long).unwrap().is_librbd_layout(32 * MIB));
    }

    /// The first 16 KiB of object 0 of a 64 MiB image with 4 MiB objects after
    /// `rbd encryption format IMG luks2 PASSFILE` (Ceph 16.2.15, libcryptsetup 2.6.1).
    const REAL_LIBRBD_LUKS2_4M: &[u8] = include_bytes!("testdata/librbd-luks2-4m-objects.head");

    #[test]
    fn a_real_librbd_luks2_header() {
        assert_eq!(luks2_header_size(REAL_LIBRBD_LUKS2_4M), Some(16 << 10));
        let h = parse(REAL_LIBRBD_LUKS2_4M).unwrap();
        // librbd asked for 4 MiB alignment, but the LUKS2 metadata and keyslots take
        // 16 MiB: data at 16 MiB, exactly where `cryptsetup luksFormat` puts it.
        assert_eq!(
            h,
            LuksHeader {
                version: 2,
                data_offset: 16 * MIB
            }
        );
        assert!(
            !h.is_librbd_layout(4 * MIB),
            "indistinguishable from cryptsetup's"
        );
    }

    #[test]
    fn cryptsetup_defaults_are_not_librbds() {
        // cryptsetup luksFormat: LUKS1 at 2 MiB (4096 sectors), LUKS2 at 16 MiB.
        let h1 = parse(&luks1(4096)).unwrap();
        assert_eq!(h1.data_offset, 2 * MIB);
        assert!(!h1.is_librbd_layout(4 * MIB));
        let h2 = parse(&luks2(16 * MIB)).unwrap();
        assert_eq!(h2.data_offset, 16 * MIB);
        assert!(!h2.is_librbd_layout(4 * MIB));
        assert!(!h2.is_librbd_layout(32 * MIB));
        // A non-default, unaligned offset.
        assert!(!parse(&luks2(5 * MIB + 4096))
            .unwrap()
            .is_librbd_layout(4 * MIB));
    }

    #[test]
    fn larger_luks2_headers_say_how_much_to_read() {
        let json = r#"{"segments":{"0":{"offset":"33554432"}}}"#;
        let h = luks2_with_json(256 << 10, json);
        assert_eq!(luks2_header_size(&h[..PROBE_LEN]), Some(256 << 10));
        assert_eq!(parse(&h[..PROBE_LEN]), None, "the JSON area is cut short");
        assert_eq!(parse(&h).unwrap().data_offset, 32 * MIB);
        assert_eq!(luks2_header_size(&luks1(8192)), None);
    }

    #[test]
    fn garbage_is_not_encrypted() {
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&[0u8; 4096]), None);
        assert_eq!(parse(b"LUKS"), None);
        assert_eq!(parse(MAGIC), None, "magic alone");
        assert_eq!(parse(b"LUKS\xba\xbe\x00"), None, "half a version");
        let mut other = luks1(8192);
        other[..4].copy_from_slice(b"RBDL"); // a librbd clone's header (Quincy+): not LUKS
        assert_eq!(parse(&other), None);
        let mut v3 = luks1(8192);
        v3[7] = 3;
        assert_eq!(parse(&v3), None, "unknown version");
        assert_eq!(parse(&luks1(0)), None, "no payload offset");
        assert_eq!(
            parse(&luks1(8192)[..107]),
            None,
            "LUKS1 cut inside payload-offset"
        );
        assert!(
            parse(&luks1(8192)[..108]).is_some(),
            "LUKS1 up to payload-offset"
        );
        // Pseudo-random bytes after the magic, at every length: an answer, never a panic.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut junk = MAGIC.to_vec();
        for _ in 0..20000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            junk.push(x as u8);
        }
        for version in [1u8, 2] {
            junk[7] = version;
            for len in (0..junk.len()).step_by(97) {
                let _ = parse(&junk[..len]);
                let _ = luks2_header_size(&junk[..len]);
            }
        }
    }

    #[test]
    fn bad_luks2_headers_are_not_encrypted() {
        let cut = luks2(32 * MIB);
        for len in [8, 15, 16, 4096, 8000, (16 << 10) - 1] {
            assert_eq!(parse(&cut[..len]), None, "cut at {len}");
        }
        for bad in [
            "",
            "{",
            "not json",
            "[]",
            r#"{"segments":{}}"#,
            r#"{"segments":{"1":{"offset":"4194304"}}}"#,
            r#"{"segments":{"0":{"offset":4194304}}}"#,
            r#"{"segments":{"0":{"offset":"-1"}}}"#,
            r#"{"segments":{"0":{"offset":"4 MiB"}}}"#,
            r#"{"segments":{"0":{"offset":"99999999999999999999999"}}}"#,
            r#"{"segments":"0"}"#,
        ] {
            assert_eq!(parse(&luks2_with_json(16 << 10, bad)), None, "{bad:?}");
        }
        // JSON without its NUL padding up to the end of the area is still read.
        let json = r#"{"segments":{"0":{"offset":"4194304"}}}"#;
        let mut full = luks2_with_json(16 << 10, json);
        let pad = (16 << 10) - 4096 - json.len();
        full[4096 + json.len()..].copy_from_slice(&vec![b' '; pad]);
        assert_eq!(parse(&full).unwrap().data_offset, 4 * MIB);
        // Invalid header sizes: not a power of two, too small, too large.
        for size in [0u64, 4096, 8192, 20000, 8 << 20, u64::MAX] {
            let mut h = luks2(4 * MIB);
            h[8..16].copy_from_slice(&size.to_be_bytes());
            assert_eq!(luks2_header_size(&h), None, "hdr_size {size}");
            assert_eq!(parse(&h), None, "hdr_size {size}");
        }
    }
}
