//! Request headers: parsing the 28 bytes off the wire, and `validate`, the one function that
//! decides whether a request may run. Nothing reaches a backend without passing it, so the
//! backend can trust offsets, lengths and flags.

use crate::consts::*;

/// A request header exactly as the client sent it (only the magic has been checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    /// The client's opaque cookie, echoed in every reply chunk.
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    /// Parse a header. A wrong magic means the stream is out of step and nothing after it
    /// can be trusted, so the caller must close the connection; that is the only failure.
    pub fn parse(buf: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, u32> {
        let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(RequestHeader {
            flags: u16::from_be_bytes([buf[4], buf[5]]),
            command: u16::from_be_bytes([buf[6], buf[7]]),
            handle: u64::from_be_bytes(buf[8..16].try_into().unwrap_or([0; 8])),
            offset: u64::from_be_bytes(buf[16..24].try_into().unwrap_or([0; 8])),
            length: u32::from_be_bytes([buf[24], buf[25], buf[26], buf[27]]),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// What was agreed for this connection: everything `validate` needs besides the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub size: u64,
    /// The transmission flags that were advertised; a command or flag is legal only if the
    /// client was told it may use it.
    pub transmission_flags: u16,
    pub structured_replies: bool,
    /// The id given to `base:allocation` by SET_META_CONTEXT, if it was selected.
    pub base_allocation: Option<u32>,
    /// Largest READ/WRITE payload; always > 0.
    pub max_block: u32,
    /// Check requests against the backend's size now (`Backend::current_size`) rather
    /// than `size`: for transmission-only sessions, whose size was set out of band and is
    /// changed the same way (the kernel's device is resized with the export).
    pub size_follows_backend: bool,
}

impl Session {
    fn has(&self, flag: u16) -> bool {
        self.transmission_flags & flag != 0
    }
}

/// A validated request, ready to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
        df: bool,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        length: u32,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
        fast_zero: bool,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
        context_id: u32,
    },
}

/// Why a request was refused: the NBD error to send, and a message for the human reading
/// the client's log (sent in structured error replies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub error: u32,
    pub message: String,
}

fn reject(error: u32, message: impl Into<String>) -> Rejection {
    Rejection {
        error,
        message: message.into(),
    }
}

/// The single gate every request goes through. Order matters only for which of several
/// faults gets reported; it follows nbdkit's: the command itself, its flags, permission,
/// then the range.
pub fn validate(h: &RequestHeader, s: &Session) -> Result<Command, Rejection> {
    let name = command_name(h.command);

    // Unknown commands first: nothing else about the request can be interpreted.
    if !matches!(
        h.command,
        CMD_READ
            | CMD_WRITE
            | CMD_DISC
            | CMD_FLUSH
            | CMD_TRIM
            | CMD_CACHE
            | CMD_WRITE_ZEROES
            | CMD_BLOCK_STATUS
    ) {
        return Err(reject(EINVAL, format!("unknown command {}", h.command)));
    }
    // DISC has no reply at all, so there is nothing to reject it with: accept it whatever
    // its other fields say and let the connection wind down.
    if h.command == CMD_DISC {
        return Ok(Command::Disconnect);
    }

    // ---- flags ----
    let unknown = h.flags & !KNOWN_CMD_FLAGS;
    if unknown != 0 {
        return Err(reject(
            EINVAL,
            format!("{name}: unknown flags {unknown:#x}"),
        ));
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    // The spec lets FUA appear on any command once SEND_FUA was advertised (some clients set
    // it on reads); it is meaningless, and refused, if it was not.
    if fua && !s.has(FLAG_SEND_FUA) {
        return Err(reject(
            EINVAL,
            format!("{name}: FUA flag but FUA was not advertised"),
        ));
    }
    let no_hole = h.flags & CMD_FLAG_NO_HOLE != 0;
    if no_hole && h.command != CMD_WRITE_ZEROES {
        return Err(reject(
            EINVAL,
            format!("{name}: NO_HOLE flag is only valid on WRITE_ZEROES"),
        ));
    }
    let fast_zero = h.flags & CMD_FLAG_FAST_ZERO != 0;
    if fast_zero && (h.command != CMD_WRITE_ZEROES || !s.has(FLAG_SEND_FAST_ZERO)) {
        return Err(reject(
            EINVAL,
            format!("{name}: FAST_ZERO flag is only valid on WRITE_ZEROES when advertised"),
        ));
    }
    let df = h.flags & CMD_FLAG_DF != 0;
    if df && (h.command != CMD_READ || !s.structured_replies || !s.has(FLAG_SEND_DF)) {
        return Err(reject(
            EINVAL,
            format!("{name}: DF flag is only valid on READ with structured replies"),
        ));
    }
    let req_one = h.flags & CMD_FLAG_REQ_ONE != 0;
    if req_one && h.command != CMD_BLOCK_STATUS {
        return Err(reject(
            EINVAL,
            format!("{name}: REQ_ONE flag is only valid on BLOCK_STATUS"),
        ));
    }

    // ---- permission ----
    let writes = matches!(h.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && s.has(FLAG_READ_ONLY) {
        return Err(reject(EPERM, format!("{name}: export is read-only")));
    }

    // ---- advertised ----
    let advertised = match h.command {
        CMD_FLUSH => s.has(FLAG_SEND_FLUSH),
        CMD_TRIM => s.has(FLAG_SEND_TRIM),
        CMD_WRITE_ZEROES => s.has(FLAG_SEND_WRITE_ZEROES),
        CMD_CACHE => s.has(FLAG_SEND_CACHE),
        CMD_BLOCK_STATUS => s.base_allocation.is_some(),
        _ => true,
    };
    if !advertised {
        let why = if h.command == CMD_BLOCK_STATUS {
            "no metadata context was negotiated"
        } else {
            "the export did not advertise it"
        };
        return Err(reject(EINVAL, format!("{name}: not supported: {why}")));
    }

    // ---- range ----
    if h.command == CMD_FLUSH {
        if h.offset != 0 || h.length != 0 {
            return Err(reject(EINVAL, "FLUSH: offset and length must be zero"));
        }
        return Ok(Command::Flush);
    }
    // The spec's error section: WRITE and WRITE_ZEROES past the end SHOULD fail with ENOSPC
    // (they would need space the export lacks), READ and TRIM with EINVAL (they name data
    // that does not exist). nbdkit and qemu-nbd answer the same.
    let past_end = if matches!(h.command, CMD_WRITE | CMD_WRITE_ZEROES) {
        ENOSPC
    } else {
        EINVAL
    };
    let end = match h.offset.checked_add(u64::from(h.length)) {
        Some(end) => end,
        None => {
            return Err(reject(
                past_end,
                format!(
                    "{name}: offset {} + length {} overflows",
                    h.offset, h.length
                ),
            ))
        }
    };
    if end > s.size {
        return Err(reject(
            past_end,
            format!(
                "{name}: range {}+{} is beyond the end of the export ({} bytes)",
                h.offset, h.length, s.size
            ),
        ));
    }
    // Only READ and WRITE move payload; the others may cover up to 4 GiB at once.
    if matches!(h.command, CMD_READ | CMD_WRITE) && h.length > s.max_block {
        return Err(reject(
            EINVAL,
            format!(
                "{name}: length {} exceeds the maximum block size {}",
                h.length, s.max_block
            ),
        ));
    }
    // The spec's own example of EOVERFLOW: an unfragmented read too large for one chunk.
    // Unreachable with the payload cap in place, kept so the guarantee does not rest on it.
    if df && h.length > u32::MAX - 8 {
        return Err(reject(EOVERFLOW, "READ: too large to send unfragmented"));
    }
    if h.command == CMD_BLOCK_STATUS && h.length == 0 {
        return Err(reject(EINVAL, "BLOCK_STATUS: length must not be zero"));
    }

    let (offset, length) = (h.offset, h.length);
    Ok(match h.command {
        CMD_READ => Command::Read { offset, length, df },
        CMD_WRITE => Command::Write {
            offset,
            length,
            fua,
        },
        CMD_TRIM => Command::Trim {
            offset,
            length,
            fua,
        },
        CMD_CACHE => Command::Cache { offset, length },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole,
            fast_zero,
        },
        CMD_BLOCK_STATUS => Command::BlockStatus {
            offset,
            length,
            req_one,
            context_id: s.base_allocation.unwrap_or(0),
        },
        // Unreachable by the checks above; answering EINVAL keeps it panic-free.
        _ => return Err(reject(EINVAL, format!("unknown command {}", h.command))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            size: 1 << 20,
            transmission_flags: FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES
                | FLAG_SEND_DF
                | FLAG_SEND_CACHE
                | FLAG_SEND_FAST_ZERO,
            structured_replies: true,
            base_allocation: Some(1),
            max_block: 65536,
            size_follows_backend: false,
        }
    }

    fn hdr(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            handle: 7,
            offset,
            length,
        }
    }

    fn err(h: RequestHeader, s: &Session) -> u32 {
        match validate(&h, s) {
            Err(r) => r.error,
            Ok(c) => panic!("expected rejection, got {c:?}"),
        }
    }

    #[test]
    fn parse_roundtrip_and_bad_magic() {
        let h = hdr(CMD_WRITE, CMD_FLAG_FUA, 0x1122_3344_5566, 0xabcd);
        let b = h.encode();
        assert_eq!(RequestHeader::parse(&b), Ok(h));
        let mut bad = b;
        bad[0] ^= 0xff;
        assert!(RequestHeader::parse(&bad).is_err());
    }

    #[test]
    fn accepts_good_requests() {
        let s = session();
        assert_eq!(
            validate(&hdr(CMD_READ, CMD_FLAG_DF, 0, 4096), &s),
            Ok(Command::Read {
                offset: 0,
                length: 4096,
                df: true
            })
        );
        assert_eq!(
            validate(
                &hdr(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                    512,
                    1 << 19
                ),
                &s
            ),
            Ok(Command::WriteZeroes {
                offset: 512,
                length: 1 << 19,
                fua: false,
                no_hole: true,
                fast_zero: true
            })
        );
        assert_eq!(
            validate(&hdr(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), &s),
            Ok(Command::Flush)
        );
        assert_eq!(
            validate(&hdr(CMD_DISC, 0xffff, 5, 5), &s),
            Ok(Command::Disconnect)
        );
        // Reading right up to the end is fine.
        assert!(validate(&hdr(CMD_READ, 0, (1 << 20) - 1, 1), &s).is_ok());
    }

    #[test]
    fn rejects_bad_flags() {
        let s = session();
        assert_eq!(err(hdr(CMD_READ, 1 << 9, 0, 1), &s), EINVAL);
        assert_eq!(err(hdr(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1), &s), EINVAL);
        assert_eq!(err(hdr(CMD_TRIM, CMD_FLAG_FAST_ZERO, 0, 1), &s), EINVAL);
        assert_eq!(err(hdr(CMD_WRITE, CMD_FLAG_DF, 0, 1), &s), EINVAL);
        assert_eq!(err(hdr(CMD_READ, CMD_FLAG_REQ_ONE, 0, 1), &s), EINVAL);
        let mut plain = session();
        plain.structured_replies = false;
        assert_eq!(err(hdr(CMD_READ, CMD_FLAG_DF, 0, 1), &plain), EINVAL);
        plain.transmission_flags &= !(FLAG_SEND_FUA | FLAG_SEND_FAST_ZERO);
        assert_eq!(err(hdr(CMD_WRITE, CMD_FLAG_FUA, 0, 1), &plain), EINVAL);
        assert_eq!(
            err(hdr(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 1), &plain),
            EINVAL
        );
    }

    #[test]
    fn rejects_bad_ranges() {
        let s = session();
        assert_eq!(err(hdr(CMD_READ, 0, 1 << 20, 1), &s), EINVAL);
        assert_eq!(err(hdr(CMD_WRITE, 0, (1 << 20) - 1, 2), &s), ENOSPC);
        assert_eq!(err(hdr(CMD_WRITE_ZEROES, 0, u64::MAX, 2), &s), ENOSPC);
        assert_eq!(err(hdr(CMD_WRITE_ZEROES, 0, 1 << 20, 1), &s), ENOSPC);
        // TRIM past the end names data that is not there: EINVAL, like READ.
        assert_eq!(err(hdr(CMD_TRIM, 0, u64::MAX, 2), &s), EINVAL);
        assert_eq!(err(hdr(CMD_TRIM, 0, (1 << 20) - 1, 2), &s), EINVAL);
        assert_eq!(err(hdr(CMD_CACHE, 0, 1 << 20, 1), &s), EINVAL);
        assert_eq!(err(hdr(CMD_READ, 0, u64::MAX, 2), &s), EINVAL);
        assert_eq!(err(hdr(CMD_READ, 0, 0, 65537), &s), EINVAL);
        assert_eq!(err(hdr(CMD_FLUSH, 0, 1, 0), &s), EINVAL);
        assert_eq!(err(hdr(CMD_BLOCK_STATUS, 0, 0, 0), &s), EINVAL);
        let mut huge = session();
        huge.size = u64::MAX;
        huge.max_block = u32::MAX;
        assert_eq!(
            err(hdr(CMD_READ, CMD_FLAG_DF, 0, u32::MAX), &huge),
            EOVERFLOW
        );
        // TRIM is not bounded by the payload limit, only by the export.
        assert!(validate(&hdr(CMD_TRIM, 0, 0, 1 << 20), &s).is_ok());
    }

    #[test]
    fn rejects_unadvertised_and_read_only() {
        let mut s = session();
        s.base_allocation = None;
        s.transmission_flags &= !(FLAG_SEND_CACHE | FLAG_SEND_TRIM);
        assert_eq!(err(hdr(CMD_BLOCK_STATUS, 0, 0, 1), &s), EINVAL);
        assert_eq!(err(hdr(CMD_CACHE, 0, 0, 1), &s), EINVAL);
        assert_eq!(err(hdr(CMD_TRIM, 0, 0, 1), &s), EINVAL);
        assert_eq!(err(hdr(99, 0, 0, 1), &s), EINVAL);
        let mut ro = session();
        ro.transmission_flags |= FLAG_READ_ONLY;
        assert_eq!(err(hdr(CMD_WRITE, 0, 0, 1), &ro), EPERM);
        assert_eq!(err(hdr(CMD_WRITE_ZEROES, 0, 0, 1), &ro), EPERM);
        assert_eq!(err(hdr(CMD_TRIM, 0, 0, 1), &ro), EPERM);
        assert!(validate(&hdr(CMD_READ, 0, 0, 1), &ro).is_ok());
    }
}
