//! One ublk request: what the driver's descriptor asks for, validated in one place before
//! anything runs, and the image's answer turned into the driver's result (a byte count or a
//! negative errno, the only error channel ublk has).

use nbd_protocol::{Backend, BackendError, Errno, ReadChunk, ZeroFlags};

/// The descriptor fields a request is made of (`ublksrv_io_desc`), copied out of the
/// driver's shared page before anything else happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub op_flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
}

const OP_READ: u32 = 0;
const OP_WRITE: u32 = 1;
const OP_FLUSH: u32 = 2;
const OP_DISCARD: u32 = 3;
const OP_WRITE_ZEROES: u32 = 5;
/// Flag bits above the op byte (include/uapi/linux/ublk_cmd.h).
const F_FUA: u32 = 1 << 13;
const F_NOUNMAP: u32 = 1 << 15;

/// A request the image can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Req {
    Read {
        off: u64,
        len: u32,
    },
    Write {
        off: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Discard {
        off: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        off: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
    },
}

/// The largest discard or write-zeroes range we take in one request: lengths reach the
/// image as u32 bytes, so (4 GiB - 4 KiB) / 512 sectors; told to the kernel as the queue
/// limits, so it splits larger ones.
pub const MAX_DISCARD_SECTORS: u32 = (u32::MAX >> 9) & !7;

/// Checks `d` against the device as it is now (`size` bytes, `buf_len` bytes of I/O buffer
/// per tag, `read_only`). The kernel already keeps requests inside the device it was told
/// about, but the image may have shrunk since (`rbd resize` by another client) and a
/// corrupted descriptor must not reach the store.
pub fn validate(d: Desc, size: u64, buf_len: usize, read_only: bool) -> Result<Req, i32> {
    let op = d.op_flags & 0xff;
    let fua = d.op_flags & F_FUA != 0;
    if op == OP_FLUSH {
        return Ok(Req::Flush);
    }
    let off = d.start_sector.checked_mul(512).ok_or(-libc::EINVAL)?;
    let len = u64::from(d.nr_sectors) * 512;
    let len32 = u32::try_from(len).map_err(|_| -libc::EINVAL)?;
    if len == 0 || off.checked_add(len).is_none_or(|end| end > size) {
        return Err(-libc::EINVAL);
    }
    let writes = matches!(op, OP_WRITE | OP_DISCARD | OP_WRITE_ZEROES);
    if writes && read_only {
        return Err(-libc::EPERM);
    }
    match op {
        OP_READ | OP_WRITE if len > buf_len as u64 => Err(-libc::EINVAL),
        OP_READ => Ok(Req::Read { off, len: len32 }),
        OP_WRITE => Ok(Req::Write {
            off,
            len: len32,
            fua,
        }),
        OP_DISCARD => Ok(Req::Discard {
            off,
            len: len32,
            fua,
        }),
        OP_WRITE_ZEROES => Ok(Req::WriteZeroes {
            off,
            len: len32,
            fua,
            no_hole: d.op_flags & F_NOUNMAP != 0,
        }),
        _ => Err(-libc::EOPNOTSUPP),
    }
}

/// The one place an image error becomes a ublk result.
pub fn errno(e: &BackendError) -> i32 {
    -match e.errno {
        Errno::Perm => libc::EPERM,
        Errno::Io => libc::EIO,
        Errno::NoMem => libc::ENOMEM,
        Errno::Inval => libc::EINVAL,
        Errno::NoSpc => libc::ENOSPC,
        Errno::Overflow => libc::EOVERFLOW,
        Errno::NotSup => libc::EOPNOTSUPP,
        Errno::Shutdown => libc::ESHUTDOWN,
    }
}

/// What a finished request hands back to the queue thread.
pub enum Done {
    /// The ublk result: bytes done, or a negative errno.
    Result(i32),
    /// A read's pieces, copied into the tag's buffer by the queue thread.
    Read(Vec<ReadChunk>, u32),
}

/// Runs `req` on the image (on the tokio runtime). Writes carry their data already copied
/// out of the tag's buffer.
pub async fn run<B: Backend>(b: &B, req: Req, data: Option<bytes::Bytes>) -> Done {
    let r = match req {
        Req::Read { off, len } => {
            return match b.read(off, len).await {
                Ok(chunks) => Done::Read(chunks, len),
                Err(e) => {
                    tracing::warn!("ublk read of {len} bytes at {off}: {e}");
                    Done::Result(errno(&e))
                }
            }
        }
        Req::Write { off, len, fua } => b
            .write(off, data.unwrap_or_default(), fua)
            .await
            .map(|()| len as i32),
        Req::Flush => b.flush().await.map(|()| 0),
        Req::Discard { off, len, fua } => b.trim(off, len, fua).await.map(|()| len as i32),
        Req::WriteZeroes {
            off,
            len,
            fua,
            no_hole,
        } => {
            let flags = ZeroFlags {
                no_hole,
                fast_zero: false,
                fua,
            };
            b.write_zeroes(off, len, flags).await.map(|()| len as i32)
        }
    };
    match r {
        Ok(n) => Done::Result(n),
        Err(e) => {
            tracing::warn!("ublk {req:?}: {e}");
            Done::Result(errno(&e))
        }
    }
}

/// Copies a read's pieces into `buf` (holes as zeros); the byte count, or -EIO when the
/// pieces do not cover the request exactly (never trusted to be right by luck).
pub fn fill(buf: &mut [u8], chunks: &[ReadChunk], len: u32) -> i32 {
    let len = len as usize;
    let mut at = 0usize;
    for c in chunks {
        let n = match c {
            ReadChunk::Data(d) => d.len(),
            ReadChunk::Hole(n) => *n as usize,
        };
        if at + n > len || at + n > buf.len() {
            return -libc::EIO;
        }
        match c {
            ReadChunk::Data(d) => buf[at..at + n].copy_from_slice(d),
            ReadChunk::Hole(_) => buf[at..at + n].fill(0),
        }
        at += n;
    }
    if at == len {
        len as i32
    } else {
        -libc::EIO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(op: u32, start: u64, n: u32) -> Desc {
        Desc {
            op_flags: op,
            nr_sectors: n,
            start_sector: start,
        }
    }

    #[test]
    fn requests_are_checked_against_the_device_now() {
        let size = 1 << 20;
        assert_eq!(
            validate(d(OP_READ, 0, 8), size, 65536, false),
            Ok(Req::Read { off: 0, len: 4096 })
        );
        assert_eq!(
            validate(d(OP_WRITE | F_FUA, 2040, 8), size, 65536, false),
            Ok(Req::Write {
                off: 2040 * 512,
                len: 4096,
                fua: true
            })
        );
        // Past the end (the image shrank), empty, larger than the buffer, overflowing.
        assert_eq!(
            validate(d(OP_READ, 2041, 8), size, 65536, false),
            Err(-libc::EINVAL)
        );
        assert_eq!(
            validate(d(OP_WRITE, 0, 0), size, 65536, false),
            Err(-libc::EINVAL)
        );
        assert_eq!(
            validate(d(OP_READ, 0, 256), size, 65536, false),
            Err(-libc::EINVAL)
        );
        assert_eq!(
            validate(d(OP_READ, u64::MAX / 256, 1), size, 65536, false),
            Err(-libc::EINVAL)
        );
        // Discards are not bounded by the buffer; write-zeroes keeps NOUNMAP.
        assert_eq!(
            validate(d(OP_DISCARD, 0, 2048), size, 4096, false),
            Ok(Req::Discard {
                off: 0,
                len: 1 << 20,
                fua: false
            })
        );
        assert_eq!(
            validate(d(OP_WRITE_ZEROES | F_NOUNMAP, 8, 8), size, 4096, false),
            Ok(Req::WriteZeroes {
                off: 4096,
                len: 4096,
                fua: false,
                no_hole: true
            })
        );
        // Read-only: reads and flushes only.
        assert_eq!(
            validate(d(OP_WRITE, 0, 8), size, 65536, true),
            Err(-libc::EPERM)
        );
        assert_eq!(
            validate(d(OP_DISCARD, 0, 8), size, 65536, true),
            Err(-libc::EPERM)
        );
        assert!(validate(d(OP_READ, 0, 8), size, 65536, true).is_ok());
        assert_eq!(
            validate(d(OP_FLUSH, 0, 0), size, 65536, true),
            Ok(Req::Flush)
        );
        // Ops we do not serve (write-same, zoned).
        assert_eq!(
            validate(d(4, 0, 8), size, 65536, false),
            Err(-libc::EOPNOTSUPP)
        );
        assert_eq!(
            validate(d(13, 0, 8), size, 65536, false),
            Err(-libc::EOPNOTSUPP)
        );
    }

    #[test]
    fn reads_fill_the_buffer_exactly_or_fail() {
        let mut buf = vec![7u8; 16];
        let chunks = vec![
            ReadChunk::Data(bytes::Bytes::from_static(b"abcd")),
            ReadChunk::Hole(4),
            ReadChunk::Data(bytes::Bytes::from_static(b"efgh")),
        ];
        assert_eq!(fill(&mut buf, &chunks, 12), 12);
        assert_eq!(&buf[..12], b"abcd\0\0\0\0efgh");
        assert_eq!(fill(&mut buf, &chunks, 16), -libc::EIO, "short");
        assert_eq!(fill(&mut buf, &chunks, 8), -libc::EIO, "long");
    }

    #[test]
    fn every_image_error_has_one_errno() {
        let e = |errno| errno_of(errno);
        fn errno_of(x: Errno) -> i32 {
            errno(&BackendError::new(x, "x"))
        }
        assert_eq!(e(Errno::Io), -libc::EIO);
        assert_eq!(e(Errno::NoSpc), -libc::ENOSPC);
        assert_eq!(e(Errno::Perm), -libc::EPERM);
        assert_eq!(e(Errno::NotSup), -libc::EOPNOTSUPP);
    }
}
