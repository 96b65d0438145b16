//! Encoding replies. A reply is a list of `Bytes` pieces written back to back, so read data
//! is never copied into a second buffer and holes sent as zeros share one static page.

use crate::backend::{Extent, ReadChunk};
use crate::consts::*;
use bytes::{BufMut, Bytes, BytesMut};

static ZEROS: [u8; 65536] = [0; 65536];

/// The most descriptors one BLOCK_STATUS reply carries. A backend that fragments badly
/// (one extent per 512 bytes over 4 GiB would be 8M descriptors) must not make us build a
/// 64 MiB reply; the spec lets the server answer less than the whole range.
pub const MAX_EXTENTS: usize = 65536;

pub type Pieces = Vec<Bytes>;

pub fn simple_header(handle: u64, error: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(SIMPLE_REPLY_HEADER_LEN);
    b.put_u32(SIMPLE_REPLY_MAGIC);
    b.put_u32(error);
    b.put_u64(handle);
    b.freeze()
}

fn chunk_header(b: &mut BytesMut, flags: u16, kind: u16, handle: u64, length: u32) {
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(flags);
    b.put_u16(kind);
    b.put_u64(handle);
    b.put_u32(length);
}

/// A structured chunk with no payload beyond what is in `body`.
pub fn structured_chunk(flags: u16, kind: u16, handle: u64, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(STRUCTURED_REPLY_HEADER_LEN + body.len());
    // Bodies built here are small (errors, holes, extents bounded by MAX_EXTENTS).
    chunk_header(&mut b, flags, kind, handle, body.len() as u32);
    b.put_slice(body);
    b.freeze()
}

/// NBD_REPLY_TYPE_NONE with DONE: success with nothing to say.
pub fn structured_none(handle: u64) -> Bytes {
    structured_chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, &[])
}

/// Messages are clipped to what the 16-bit length field and the spec's string limit allow,
/// at a character boundary so the client still sees valid UTF-8.
fn clip(message: &str) -> &str {
    clip_to(message, MAX_STRING_LEN.min(u16::MAX as usize))
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub(crate) fn clip_to(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// NBD_REPLY_TYPE_ERROR, final chunk.
pub fn structured_error(handle: u64, error: u32, message: &str) -> Bytes {
    let m = clip(message);
    let mut body = BytesMut::with_capacity(6 + m.len());
    body.put_u32(error);
    body.put_u16(m.len() as u16);
    body.put_slice(m.as_bytes());
    structured_chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, &body)
}

/// NBD_REPLY_TYPE_ERROR_OFFSET, final chunk: an error at a known offset within the request.
pub fn structured_error_offset(handle: u64, error: u32, message: &str, offset: u64) -> Bytes {
    let m = clip(message);
    let mut body = BytesMut::with_capacity(14 + m.len());
    body.put_u32(error);
    body.put_u16(m.len() as u16);
    body.put_slice(m.as_bytes());
    body.put_u64(offset);
    structured_chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR_OFFSET, handle, &body)
}

/// The reply to a failed request: structured when negotiated (the client then sees the
/// message), simple otherwise. A simple error reply never carries a payload, even for READ.
pub fn error_reply(handle: u64, structured: bool, error: u32, message: &str) -> Pieces {
    if structured {
        vec![structured_error(handle, error, message)]
    } else {
        vec![simple_header(handle, error)]
    }
}

/// The reply to a successful command that returns no data.
pub fn ok_reply(handle: u64) -> Pieces {
    // A simple reply is allowed for payload-less successes even with structured replies,
    // and it is what every client handles.
    vec![simple_header(handle, 0)]
}

fn zeros(out: &mut Pieces, mut n: usize) {
    while n > 0 {
        let k = n.min(ZEROS.len());
        out.push(Bytes::from_static(&ZEROS[..k]));
        n -= k;
    }
}

/// Checks the backend's chunks against the request: they must cover exactly `length`
/// bytes. A backend bug must become an EIO, not a malformed reply that desyncs the client.
fn check_chunks(chunks: &[ReadChunk], length: u32) -> Result<(), String> {
    let mut total: u64 = 0;
    for c in chunks {
        total += match c {
            ReadChunk::Data(d) => d.len() as u64,
            ReadChunk::Hole(n) => u64::from(*n),
        };
    }
    if total != u64::from(length) {
        return Err(format!(
            "backend returned {total} bytes for a {length}-byte read"
        ));
    }
    Ok(())
}

/// The reply to a successful READ. `Err` carries a message for an EIO reply instead.
pub fn read_reply(
    handle: u64,
    offset: u64,
    length: u32,
    chunks: Vec<ReadChunk>,
    structured: bool,
    df: bool,
) -> Result<Pieces, String> {
    check_chunks(&chunks, length)?;
    let mut out = Pieces::with_capacity(chunks.len() * 2 + 1);
    if !structured {
        out.push(simple_header(handle, 0));
        for c in chunks {
            match c {
                ReadChunk::Data(d) => out.push(d),
                ReadChunk::Hole(n) => zeros(&mut out, n as usize),
            }
        }
        return Ok(out);
    }
    if length == 0 {
        out.push(structured_none(handle));
        return Ok(out);
    }
    let all_hole = chunks.iter().all(|c| matches!(c, ReadChunk::Hole(_)));
    if df && !all_hole {
        // One content chunk: the holes are sent as explicit zeros inside it.
        let mut h = BytesMut::with_capacity(STRUCTURED_REPLY_HEADER_LEN + 8);
        chunk_header(
            &mut h,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            handle,
            length + 8,
        );
        h.put_u64(offset);
        out.push(h.freeze());
        for c in chunks {
            match c {
                ReadChunk::Data(d) => out.push(d),
                ReadChunk::Hole(n) => zeros(&mut out, n as usize),
            }
        }
        return Ok(out);
    }
    // Merge neighbouring holes (so a DF read that is all hole is still one chunk) and drop
    // empty pieces, which the spec forbids as chunks.
    let mut merged: Vec<ReadChunk> = Vec::with_capacity(chunks.len());
    for c in chunks {
        match c {
            ReadChunk::Data(d) if d.is_empty() => {}
            ReadChunk::Hole(0) => {}
            ReadChunk::Hole(n) => match merged.last_mut() {
                Some(ReadChunk::Hole(m)) => *m += n,
                _ => merged.push(ReadChunk::Hole(n)),
            },
            data => merged.push(data),
        }
    }
    let last = merged.len().saturating_sub(1);
    let mut pos = offset;
    for (i, c) in merged.into_iter().enumerate() {
        // Everything is in hand, so no error can follow: the last content chunk may carry
        // DONE, saving a NONE chunk per read.
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        match c {
            ReadChunk::Data(d) => {
                let n = d.len() as u64;
                let mut h = BytesMut::with_capacity(STRUCTURED_REPLY_HEADER_LEN + 8);
                chunk_header(
                    &mut h,
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    handle,
                    d.len() as u32 + 8,
                );
                h.put_u64(pos);
                out.push(h.freeze());
                out.push(d);
                pos += n;
            }
            ReadChunk::Hole(n) => {
                let mut body = [0u8; 12];
                body[..8].copy_from_slice(&pos.to_be_bytes());
                body[8..].copy_from_slice(&n.to_be_bytes());
                out.push(structured_chunk(
                    flags,
                    REPLY_TYPE_OFFSET_HOLE,
                    handle,
                    &body,
                ));
                pos += u64::from(n);
            }
        }
    }
    Ok(out)
}

/// Shapes a backend's extents into what the spec allows: starting at the request offset,
/// no zero lengths, clipped to the request, neighbours with equal flags merged, at most
/// one descriptor with REQ_ONE, at most `MAX_EXTENTS` otherwise, and never empty (an
/// unknown status, 0, is always a truthful answer).
pub fn normalize_extents(extents: &[Extent], length: u32, req_one: bool) -> Vec<(u32, u32)> {
    let limit = if req_one { 1 } else { MAX_EXTENTS };
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut remaining = u64::from(length);
    for e in extents {
        if remaining == 0 {
            break;
        }
        if e.length == 0 {
            continue;
        }
        let n = e.length.min(remaining);
        remaining -= n;
        // n <= length, a u32.
        let n = n as u32;
        match out.last_mut() {
            Some((len, flags)) if *flags == e.flags => *len += n,
            _ => {
                if out.len() == limit {
                    break;
                }
                out.push((n, e.flags));
            }
        }
    }
    if out.is_empty() {
        out.push((length, 0));
    }
    out
}

pub fn block_status_reply(
    handle: u64,
    context_id: u32,
    length: u32,
    extents: &[Extent],
    req_one: bool,
) -> Pieces {
    let descs = normalize_extents(extents, length, req_one);
    let mut body = BytesMut::with_capacity(4 + 8 * descs.len());
    body.put_u32(context_id);
    for (len, flags) in descs {
        body.put_u32(len);
        body.put_u32(flags);
    }
    vec![structured_chunk(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        handle,
        &body,
    )]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(p: &Pieces) -> Vec<u8> {
        p.iter().flat_map(|b| b.iter().copied()).collect()
    }

    #[test]
    fn simple_read_fills_holes_with_zeros() {
        let chunks = vec![
            ReadChunk::Data(Bytes::from_static(b"ab")),
            ReadChunk::Hole(70000),
            ReadChunk::Data(Bytes::from_static(b"c")),
        ];
        let out = flat(&read_reply(9, 0, 70003, chunks, false, false).unwrap());
        assert_eq!(&out[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..8], &[0, 0, 0, 0]);
        assert_eq!(&out[8..16], &9u64.to_be_bytes());
        assert_eq!(out.len(), 16 + 70003);
        assert_eq!(&out[16..18], b"ab");
        assert!(out[18..18 + 70000].iter().all(|&b| b == 0));
        assert_eq!(out[out.len() - 1], b'c');
    }

    #[test]
    fn structured_read_chunks() {
        let chunks = vec![
            ReadChunk::Data(Bytes::from_static(b"xy")),
            ReadChunk::Hole(10),
            ReadChunk::Hole(6),
        ];
        let out = flat(&read_reply(1, 100, 18, chunks, true, false).unwrap());
        // data chunk: header 20 + offset 8 + 2 data
        assert_eq!(&out[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..6], &0u16.to_be_bytes());
        assert_eq!(&out[6..8], &REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&out[16..20], &10u32.to_be_bytes());
        assert_eq!(&out[20..28], &100u64.to_be_bytes());
        assert_eq!(&out[28..30], b"xy");
        // merged hole chunk, final
        let h = &out[30..];
        assert_eq!(h.len(), 32);
        assert_eq!(&h[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&h[6..8], &REPLY_TYPE_OFFSET_HOLE.to_be_bytes());
        assert_eq!(&h[20..28], &102u64.to_be_bytes());
        assert_eq!(&h[28..32], &16u32.to_be_bytes());
    }

    #[test]
    fn df_read_is_one_data_chunk() {
        let chunks = vec![
            ReadChunk::Hole(3),
            ReadChunk::Data(Bytes::from_static(b"z")),
        ];
        let out = flat(&read_reply(1, 0, 4, chunks, true, true).unwrap());
        assert_eq!(out.len(), 20 + 8 + 4);
        assert_eq!(&out[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&out[6..8], &REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&out[28..], &[0, 0, 0, b'z']);
    }

    #[test]
    fn short_backend_read_is_an_error() {
        let chunks = vec![ReadChunk::Hole(3)];
        assert!(read_reply(1, 0, 4, chunks, true, false).is_err());
    }

    #[test]
    fn extents_are_trimmed_merged_and_bounded() {
        let e = |length, flags| Extent { length, flags };
        assert_eq!(
            normalize_extents(&[e(10, 3), e(0, 0), e(5, 3), e(100, 0)], 50, false),
            vec![(15, 3), (35, 0)]
        );
        assert_eq!(
            normalize_extents(&[e(10, 3), e(5, 0)], 50, true),
            vec![(10, 3)]
        );
        assert_eq!(normalize_extents(&[], 50, false), vec![(50, 0)]);
        assert_eq!(normalize_extents(&[e(u64::MAX, 1)], 7, false), vec![(7, 1)]);
        let many: Vec<Extent> = (0..MAX_EXTENTS as u64 + 10)
            .map(|i| e(1, (i % 2) as u32))
            .collect();
        assert_eq!(normalize_extents(&many, u32::MAX, false).len(), MAX_EXTENTS);
    }

    #[test]
    fn error_message_is_clipped() {
        let long = "é".repeat(5000);
        let b = structured_error(3, EIO, &long);
        let len = u16::from_be_bytes([b[24], b[25]]) as usize;
        assert!(len <= MAX_STRING_LEN);
        assert!(std::str::from_utf8(&b[26..26 + len]).is_ok());
        assert_eq!(b.len(), 26 + len);
    }
}
