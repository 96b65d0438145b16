//! The fixed-newstyle handshake, server side. Option haggling runs in a loop that answers
//! every option it is sent, known or not, until the client picks an export (GO or
//! EXPORT_NAME) or leaves; only violations that make the byte stream unreadable (a wrong
//! magic, an absurd length) end the connection.

use crate::backend::{Backend, ExportInfo};
use crate::consts::*;
use crate::error::ProtocolError;
use crate::export::Exports;
use crate::io::{discard, read_exact_or_shutdown, ReadOutcome};
use crate::reply::clip_to;
use crate::tls::TlsMode;
use bytes::{BufMut, BytesMut};
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::debug;

/// Options with payloads up to this size are read and parsed. Legitimate ones are far
/// smaller (a GO is at most 4 + 4096 + 2 + 2n bytes).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Above this an option is treated as an attack or garbage and the connection is closed;
/// between the two limits its payload is discarded (streamed) and answered ERR_TOO_BIG.
pub const ABSURD_OPTION_LEN: u32 = 64 * 1024 * 1024;
/// How long a client that is mid-handshake when shutdown begins gets to send its next
/// option, so it can be told ERR_SHUTDOWN rather than see the connection drop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// The id `base:allocation` gets when selected; any non-zero constant will do since it
/// is the only context.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake agreed.
#[derive(Debug, Clone)]
pub(crate) struct Negotiated {
    pub export: usize,
    pub info: ExportInfo,
    pub structured: bool,
    pub base_allocation: Option<u32>,
    pub transmission_flags: u16,
}

pub(crate) enum Outcome {
    Transmission(Negotiated),
    /// STARTTLS was acknowledged: the caller upgrades the stream, calls
    /// [`State::tls_started`] and negotiates on.
    StartTls,
    /// The client aborted, left, or we are shutting down: the connection ends quietly.
    Closed,
}

/// The transmission flags of an export, given whether structured replies were negotiated
/// (DF means nothing without them, and the spec says to leave it clear). Write-side
/// commands are not advertised on a read-only export: the client could only get EPERM.
pub(crate) fn flags_for(info: &ExportInfo, structured: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS;
    let writable = !info.read_only;
    let set = |f: &mut u16, cond: bool, bit: u16| {
        if cond {
            *f |= bit
        }
    };
    set(&mut f, info.read_only, FLAG_READ_ONLY);
    set(&mut f, info.can_flush, FLAG_SEND_FLUSH);
    set(&mut f, info.can_fua, FLAG_SEND_FUA);
    set(&mut f, writable && info.can_trim, FLAG_SEND_TRIM);
    set(
        &mut f,
        writable && info.can_write_zeroes,
        FLAG_SEND_WRITE_ZEROES,
    );
    set(
        &mut f,
        writable && info.can_write_zeroes && info.can_fast_zero,
        FLAG_SEND_FAST_ZERO,
    );
    set(&mut f, structured && info.can_df, FLAG_SEND_DF);
    set(&mut f, info.can_cache, FLAG_SEND_CACHE);
    set(&mut f, info.can_multi_conn, FLAG_CAN_MULTI_CONN);
    f
}

/// The block sizes to advertise and enforce, with nonsense in `ExportInfo` (zeros,
/// non-powers of two) replaced by safe defaults so clients never see an invalid triple.
pub(crate) fn block_sizes(info: &ExportInfo) -> (u32, u32, u32) {
    let min = if info.min_block.is_power_of_two() && info.min_block <= 65536 {
        info.min_block
    } else {
        1
    };
    let preferred = if info.preferred_block.is_power_of_two()
        && info.preferred_block >= min
        && info.preferred_block <= DEFAULT_MAX_BLOCK
    {
        info.preferred_block
    } else {
        DEFAULT_PREFERRED_BLOCK.max(min)
    };
    let mut max = if info.max_block == 0 {
        DEFAULT_MAX_BLOCK
    } else {
        info.max_block.min(MAX_BLOCK_CAP)
    };
    max -= max % min;
    (min, preferred, max.max(min))
}

struct OptionHeader {
    option: u32,
    length: u32,
}

/// Send the greeting and read the client's flags. `None` means the client left (or
/// shutdown began) before sending them.
pub(crate) async fn greet<R, W, B>(
    r: &mut R,
    w: &mut W,
    exports: &Exports<B>,
    shutdown: &mut watch::Receiver<bool>,
    tls_mode: TlsMode,
) -> Result<Option<State>, ProtocolError>
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    B: Backend,
{
    if exports.exports.is_empty() {
        return Err(ProtocolError::NoExports);
    }
    let mut greeting = BytesMut::with_capacity(18);
    greeting.put_u64(NBDMAGIC);
    greeting.put_u64(IHAVEOPT);
    greeting.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    w.write_all(&greeting).await?;
    w.flush().await?;

    let mut cf = [0u8; 4];
    match read_exact_or_shutdown(r, &mut cf, shutdown, None).await? {
        ReadOutcome::Done => {}
        _ => return Ok(None),
    }
    let client_flags = u32::from_be_bytes(cf);
    // The spec: a server MUST close if it does not recognise the client's flags.
    if client_flags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(ProtocolError::BadClientFlags(client_flags));
    }
    Ok(Some(State {
        fixed: client_flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        meta: None,
        tls_mode,
        tls_active: false,
    }))
}

/// Haggle over options until the client picks an export, asks for TLS, or leaves.
/// `Closed` covers every quiet ending; `Err` only real violations.
pub(crate) async fn negotiate<R, W, B>(
    r: &mut R,
    w: &mut W,
    exports: &Exports<B>,
    shutdown: &mut watch::Receiver<bool>,
    st: &mut State,
) -> Result<Outcome, ProtocolError>
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    B: Backend,
{
    let (fixed, no_zeroes) = (st.fixed, st.no_zeroes);
    loop {
        let mut hb = [0u8; 16];
        match read_exact_or_shutdown(r, &mut hb, shutdown, Some(SHUTDOWN_GRACE)).await? {
            ReadOutcome::Done => {}
            ReadOutcome::Eof | ReadOutcome::Shutdown => return Ok(Outcome::Closed),
        }
        let magic = u64::from_be_bytes(hb[0..8].try_into().unwrap_or([0; 8]));
        if magic != IHAVEOPT {
            return Err(ProtocolError::BadMagic {
                what: "option request",
                got: magic,
                expected: IHAVEOPT,
            });
        }
        let h = OptionHeader {
            option: u32::from_be_bytes(hb[8..12].try_into().unwrap_or([0; 4])),
            length: u32::from_be_bytes(hb[12..16].try_into().unwrap_or([0; 4])),
        };
        debug!(
            option = option_name(h.option),
            code = h.option,
            length = h.length,
            "option"
        );

        if !fixed && h.option != OPT_EXPORT_NAME {
            // Without fixed newstyle the client cannot parse option replies.
            return Err(ProtocolError::NotFixedNewstyle(h.option));
        }
        if h.length > ABSURD_OPTION_LEN {
            return Err(ProtocolError::OptionTooLarge {
                option: h.option,
                length: h.length,
            });
        }
        if h.length > MAX_OPTION_LEN {
            discard(r, u64::from(h.length)).await?;
            if h.option == OPT_EXPORT_NAME {
                // EXPORT_NAME has no error reply; a name this long cannot exist.
                return Err(ProtocolError::OptionTooLarge {
                    option: h.option,
                    length: h.length,
                });
            }
            let msg = format!("option payload of {} bytes is too large", h.length);
            reply(w, h.option, REP_ERR_TOO_BIG, msg.as_bytes()).await?;
            continue;
        }
        let mut data = vec![0u8; h.length as usize];
        match read_exact_or_shutdown(r, &mut data, shutdown, Some(SHUTDOWN_GRACE)).await? {
            ReadOutcome::Done => {}
            ReadOutcome::Eof => {
                if !data.is_empty() {
                    return Ok(Outcome::Closed);
                }
            }
            ReadOutcome::Shutdown => return Ok(Outcome::Closed),
        }

        if *shutdown.borrow() {
            if h.option != OPT_EXPORT_NAME {
                let code = if h.option == OPT_ABORT {
                    REP_ACK
                } else {
                    REP_ERR_SHUTDOWN
                };
                reply(w, h.option, code, b"server is shutting down").await?;
            }
            return Ok(Outcome::Closed);
        }

        match handle_option(w, &h, &data, exports, st, no_zeroes).await? {
            Step::Continue => {}
            Step::Done(o) => return Ok(o),
        }
    }
}

/// What the option haggling has agreed so far.
pub(crate) struct State {
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    /// The export SET_META_CONTEXT was for, and whether it selected base:allocation.
    meta: Option<(usize, bool)>,
    tls_mode: TlsMode,
    tls_active: bool,
}

impl State {
    /// TLS is up. Whatever was agreed in plain text could have been tampered with, so it
    /// is forgotten and the client negotiates again over TLS (as nbdkit and qemu do).
    pub(crate) fn tls_started(&mut self) {
        self.structured = false;
        self.meta = None;
        self.tls_active = true;
    }
}

enum Step {
    Continue,
    Done(Outcome),
}

async fn reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    kind: u32,
    data: &[u8],
) -> Result<(), ProtocolError> {
    let mut b = BytesMut::with_capacity(20 + data.len());
    b.put_u64(OPTION_REPLY_MAGIC);
    b.put_u32(option);
    b.put_u32(kind);
    // Replies are built from bounded strings (names, descriptions, messages).
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    w.write_all(&b).await?;
    w.flush().await?;
    Ok(())
}

fn find_export<B: Backend>(exports: &Exports<B>, name: &str) -> Option<usize> {
    if name.is_empty() {
        return if exports.exports.is_empty() {
            None
        } else {
            Some(0)
        };
    }
    exports.exports.iter().position(|e| e.name == name)
}

/// The export an option's parsed payload names, and the rest of the payload. A payload
/// that did not parse (ERR_INVALID) or an unknown name (ERR_UNKNOWN) is answered here and
/// gives `None`: the haggling goes on.
async fn named_export<W, B, T>(
    w: &mut W,
    opt: u32,
    exports: &Exports<B>,
    parsed: Result<(String, T), String>,
) -> Result<Option<(usize, T)>, ProtocolError>
where
    W: AsyncWrite + Unpin,
    B: Backend,
{
    let (name, rest) = match parsed {
        Ok(v) => v,
        Err(m) => {
            reply(w, opt, REP_ERR_INVALID, m.as_bytes()).await?;
            return Ok(None);
        }
    };
    let Some(idx) = find_export(exports, &name) else {
        let m = format!("no export named {name:?}");
        reply(w, opt, REP_ERR_UNKNOWN, m.as_bytes()).await?;
        return Ok(None);
    };
    Ok(Some((idx, rest)))
}

/// A cursor over an option payload that never reads past its end.
struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.data.len() < n {
            return Err(format!(
                "option payload truncated: wanted {n} more bytes, {} left",
                self.data.len()
            ));
        }
        let (a, b) = self.data.split_at(n);
        self.data = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A length-prefixed string, held to the spec's 4096-byte ceiling and to UTF-8.
    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.u32()? as usize;
        if n > MAX_STRING_LEN {
            return Err(format!("{what} is {n} bytes, more than {MAX_STRING_LEN}"));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }
    fn finish(&self) -> Result<(), String> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} unexpected trailing bytes in option",
                self.data.len()
            ))
        }
    }
}

/// Parses GO/INFO: export name and the list of information the client asks for.
pub(crate) fn parse_go(data: &[u8]) -> Result<(String, Vec<u16>), String> {
    let mut c = Cursor { data };
    let name = c.string("export name")?;
    let n = c.u16()?;
    let mut reqs = Vec::with_capacity(n as usize);
    for _ in 0..n {
        reqs.push(c.u16()?);
    }
    c.finish()?;
    Ok((name, reqs))
}

/// Parses LIST_META_CONTEXT/SET_META_CONTEXT: export name and queries.
pub(crate) fn parse_meta(data: &[u8]) -> Result<(String, Vec<String>), String> {
    let mut c = Cursor { data };
    let name = c.string("export name")?;
    let n = c.u32()?;
    // Each query takes at least 4 bytes, so a count larger than that is a lie; checking
    // first keeps a hostile count from reserving memory.
    if n as usize > c.data.len() / 4 {
        return Err(format!("{n} queries cannot fit in the option payload"));
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        queries.push(c.string("query")?);
    }
    c.finish()?;
    Ok((name, queries))
}

fn info_reply(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + body.len());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn clip(s: &str) -> &str {
    clip_to(s, MAX_STRING_LEN)
}

async fn handle_option<W, B>(
    w: &mut W,
    h: &OptionHeader,
    data: &[u8],
    exports: &Exports<B>,
    st: &mut State,
    no_zeroes: bool,
) -> Result<Step, ProtocolError>
where
    W: AsyncWrite + Unpin,
    B: Backend,
{
    let opt = h.option;
    if st.tls_mode == TlsMode::Require && !st.tls_active && opt != OPT_STARTTLS && opt != OPT_ABORT
    {
        if opt == OPT_EXPORT_NAME {
            // EXPORT_NAME has no error reply: the spec says terminate.
            return Err(ProtocolError::TlsRequired);
        }
        let m = format!(
            "option {opt} ({}) refused: this server requires TLS (NBD_OPT_STARTTLS) first",
            option_name(opt)
        );
        reply(w, opt, REP_ERR_TLS_REQD, m.as_bytes()).await?;
        return Ok(Step::Continue);
    }
    match opt {
        OPT_EXPORT_NAME => {
            let name = String::from_utf8_lossy(data).into_owned();
            let Some(idx) = find_export(exports, &name) else {
                // No way to send an error: the spec says terminate.
                return Err(ProtocolError::UnknownExport(name));
            };
            let info = exports.exports[idx].backend.info();
            let flags = flags_for(&info, st.structured);
            let mut b = BytesMut::with_capacity(134);
            b.put_u64(info.size);
            b.put_u16(flags);
            if !no_zeroes {
                b.put_bytes(0, 124);
            }
            w.write_all(&b).await?;
            w.flush().await?;
            Ok(Step::Done(Outcome::Transmission(negotiated(idx, info, st))))
        }
        OPT_ABORT => {
            // The client may already have closed; failing to ACK is not an error.
            let _ = reply(w, opt, REP_ACK, &[]).await;
            Ok(Step::Done(Outcome::Closed))
        }
        OPT_LIST => {
            if !data.is_empty() {
                reply(w, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data").await?;
                return Ok(Step::Continue);
            }
            for e in &exports.exports {
                let name = clip(&e.name);
                let mut body = Vec::with_capacity(4 + name.len() + e.description.len());
                body.extend_from_slice(&(name.len() as u32).to_be_bytes());
                body.extend_from_slice(name.as_bytes());
                body.extend_from_slice(clip(&e.description).as_bytes());
                reply(w, opt, REP_SERVER, &body).await?;
            }
            reply(w, opt, REP_ACK, &[]).await?;
            Ok(Step::Continue)
        }
        OPT_STARTTLS => {
            if st.tls_mode == TlsMode::Off {
                reply(
                    w,
                    opt,
                    REP_ERR_POLICY,
                    b"TLS is not configured on this server",
                )
                .await?;
            } else if st.tls_active {
                reply(w, opt, REP_ERR_INVALID, b"TLS is already active").await?;
            } else if !data.is_empty() {
                reply(w, opt, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data").await?;
            } else {
                reply(w, opt, REP_ACK, &[]).await?;
                return Ok(Step::Done(Outcome::StartTls));
            }
            Ok(Step::Continue)
        }
        OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                reply(
                    w,
                    opt,
                    REP_ERR_INVALID,
                    b"NBD_OPT_STRUCTURED_REPLY takes no data",
                )
                .await?;
                return Ok(Step::Continue);
            }
            st.structured = true;
            reply(w, opt, REP_ACK, &[]).await?;
            Ok(Step::Continue)
        }
        OPT_INFO | OPT_GO => {
            let Some((idx, reqs)) = named_export(w, opt, exports, parse_go(data)).await? else {
                return Ok(Step::Continue);
            };
            let export = &exports.exports[idx];
            let info = export.backend.info();
            let flags = flags_for(&info, st.structured);
            let mut ex = Vec::with_capacity(10);
            ex.extend_from_slice(&info.size.to_be_bytes());
            ex.extend_from_slice(&flags.to_be_bytes());
            reply(w, opt, REP_INFO, &info_reply(INFO_EXPORT, &ex)).await?;
            // Each kind once, whatever the client repeated; unknown kinds are ignored
            // as the spec requires.
            let wants = |k: u16| reqs.contains(&k);
            if wants(INFO_NAME) {
                let n = clip(&export.name);
                reply(w, opt, REP_INFO, &info_reply(INFO_NAME, n.as_bytes())).await?;
            }
            if wants(INFO_DESCRIPTION) {
                let d = if export.description.is_empty() {
                    &info.description
                } else {
                    &export.description
                };
                if !d.is_empty() {
                    let d = clip(d);
                    reply(
                        w,
                        opt,
                        REP_INFO,
                        &info_reply(INFO_DESCRIPTION, d.as_bytes()),
                    )
                    .await?;
                }
            }
            if wants(INFO_BLOCK_SIZE) {
                let (min, pref, max) = block_sizes(&info);
                let mut b = Vec::with_capacity(12);
                b.extend_from_slice(&min.to_be_bytes());
                b.extend_from_slice(&pref.to_be_bytes());
                b.extend_from_slice(&max.to_be_bytes());
                reply(w, opt, REP_INFO, &info_reply(INFO_BLOCK_SIZE, &b)).await?;
            }
            reply(w, opt, REP_ACK, &[]).await?;
            if opt == OPT_GO {
                Ok(Step::Done(Outcome::Transmission(negotiated(idx, info, st))))
            } else {
                Ok(Step::Continue)
            }
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            if !st.structured {
                reply(
                    w,
                    opt,
                    REP_ERR_INVALID,
                    b"metadata contexts need structured replies first",
                )
                .await?;
                return Ok(Step::Continue);
            }
            let Some((idx, queries)) = named_export(w, opt, exports, parse_meta(data)).await?
            else {
                return Ok(Step::Continue);
            };
            let list = opt == OPT_LIST_META_CONTEXT;
            // LIST with no queries means "everything"; "base:" asks for the whole base
            // namespace. SET selects only exact names.
            let selected = if list && queries.is_empty() {
                true
            } else {
                queries
                    .iter()
                    .any(|q| q == META_BASE_ALLOCATION || (list && q == "base:"))
            };
            if selected {
                let id = if list { 0 } else { BASE_ALLOCATION_ID };
                let mut body = Vec::with_capacity(4 + META_BASE_ALLOCATION.len());
                body.extend_from_slice(&id.to_be_bytes());
                body.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                reply(w, opt, REP_META_CONTEXT, &body).await?;
            }
            if !list {
                st.meta = Some((idx, selected));
            }
            reply(w, opt, REP_ACK, &[]).await?;
            Ok(Step::Continue)
        }
        _ => {
            let m = format!("option {opt} ({}) is not supported", option_name(opt));
            reply(w, opt, REP_ERR_UNSUP, m.as_bytes()).await?;
            Ok(Step::Continue)
        }
    }
}

fn negotiated(idx: usize, info: ExportInfo, st: &State) -> Negotiated {
    // Contexts chosen for a different export do not carry over (the spec ties them to the
    // export named in SET_META_CONTEXT).
    let base_allocation = match st.meta {
        Some((e, true)) if e == idx && st.structured => Some(BASE_ALLOCATION_ID),
        _ => None,
    };
    Negotiated {
        export: idx,
        transmission_flags: flags_for(&info, st.structured),
        info,
        structured: st.structured,
        base_allocation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ExportInfo {
        crate::MemoryBackend::new(1 << 20).info()
    }

    #[test]
    fn flags_follow_info() {
        let all = flags_for(&info(), true);
        for bit in [
            FLAG_HAS_FLAGS,
            FLAG_SEND_FLUSH,
            FLAG_SEND_FUA,
            FLAG_SEND_TRIM,
            FLAG_SEND_WRITE_ZEROES,
            FLAG_SEND_DF,
            FLAG_SEND_CACHE,
            FLAG_SEND_FAST_ZERO,
            FLAG_CAN_MULTI_CONN,
        ] {
            assert_ne!(all & bit, 0, "bit {bit:#x}");
        }
        assert_eq!(all & FLAG_READ_ONLY, 0);
        assert_eq!(flags_for(&info(), false) & FLAG_SEND_DF, 0);
        let mut ro = info();
        ro.read_only = true;
        ro.can_multi_conn = false;
        let f = flags_for(&ro, true);
        assert_ne!(f & FLAG_READ_ONLY, 0);
        assert_eq!(
            f & (FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES
                | FLAG_SEND_FAST_ZERO
                | FLAG_CAN_MULTI_CONN),
            0
        );
    }

    #[test]
    fn block_sizes_are_sane() {
        assert_eq!(block_sizes(&info()), (1, 4096, 1 << 25));
        let mut i = info();
        i.min_block = 3;
        i.preferred_block = 0;
        i.max_block = 0;
        assert_eq!(block_sizes(&i), (1, 4096, DEFAULT_MAX_BLOCK));
        i.min_block = 512;
        i.max_block = 1000;
        assert_eq!(block_sizes(&i), (512, 4096, 512));
        i.max_block = u32::MAX;
        assert_eq!(block_sizes(&i), (512, 4096, MAX_BLOCK_CAP));
    }

    #[test]
    fn go_parsing() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(parse_go(&d), Ok(("abc".into(), vec![3, 1])));
        assert!(parse_go(&d[..d.len() - 1]).is_err());
        let mut extra = d.clone();
        extra.push(0);
        assert!(parse_go(&extra).is_err());
        let mut lying = Vec::new();
        lying.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_go(&lying).is_err());
    }

    #[test]
    fn meta_parsing() {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:", "x-foo:bar"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        assert_eq!(
            parse_meta(&d),
            Ok((String::new(), vec!["base:".into(), "x-foo:bar".into()]))
        );
        let mut huge = Vec::new();
        huge.extend_from_slice(&0u32.to_be_bytes());
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta(&huge).is_err());
    }
}
