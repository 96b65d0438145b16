//! A generic-netlink client for the kernel's `nbd` family, written on raw `libc` sockets.
//!
//! The family and attribute numbers are the kernel's ABI (include/uapi/linux/nbd-netlink.h);
//! the behaviour relied on is drivers/block/nbd.c's:
//! - CONNECT needs SIZE_BYTES and at least one socket; without INDEX the kernel picks any
//!   unconfigured device (or creates one) and answers with a CONNECT message carrying INDEX
//!   before the ACK. The process (thread) that sends CONNECT becomes the device's "pid".
//! - DISCONNECT sends NBD_CMD_DISC on every socket, then shuts the sockets down.
//! - RECONFIGURE only replaces sockets the kernel already saw die; when none is dead it
//!   silently ignores the new ones (so callers must make sure the old server is gone).
//! - When the device was connected with BACKEND_IDENTIFIER, RECONFIGURE must carry the same
//!   string, which lets the kernel refuse to re-attach a different image.

// The whole kernel ABI is spelled out here; not every item is used by the daemon.
#![allow(dead_code)]

use crate::error::{Error, ErrorKind, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

// netlink / generic netlink constants (linux/netlink.h, linux/genetlink.h)
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

// nbd-netlink.h
pub const NBD_GENL_FAMILY_NAME: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;

pub const NBD_CMD_CONNECT: u8 = 1;
pub const NBD_CMD_DISCONNECT: u8 = 2;
pub const NBD_CMD_RECONFIGURE: u8 = 3;
pub const NBD_CMD_STATUS: u8 = 5;

pub const NBD_ATTR_INDEX: u16 = 1;
pub const NBD_ATTR_SIZE_BYTES: u16 = 2;
pub const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
pub const NBD_ATTR_TIMEOUT: u16 = 4;
pub const NBD_ATTR_SERVER_FLAGS: u16 = 5;
pub const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
pub const NBD_ATTR_SOCKETS: u16 = 7;
pub const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
pub const NBD_ATTR_DEVICE_LIST: u16 = 9;
pub const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;

pub const NBD_SOCK_ITEM: u16 = 1;
pub const NBD_SOCK_FD: u16 = 1;
pub const NBD_DEVICE_ITEM: u16 = 1;
pub const NBD_DEVICE_INDEX: u16 = 1;
pub const NBD_DEVICE_CONNECTED: u16 = 2;

/// NBD_CFLAG_DESTROY_ON_DISCONNECT: delete the device when it is disconnected. We do not
/// set it (nor DISCONNECT_ON_CLOSE): like rbd-nbd we keep the preallocated /dev/nbdX nodes
/// stable, and a device must survive its last opener closing it (mkfs, then mount).
pub const NBD_CFLAG_DESTROY_ON_DISCONNECT: u64 = 1 << 0;
pub const NBD_CFLAG_DISCONNECT_ON_CLOSE: u64 = 1 << 1;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Builds one generic-netlink request: nlmsghdr, genlmsghdr, then attributes (nestable).
#[derive(Debug)]
pub struct GenlMessage {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl GenlMessage {
    pub fn new(family: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set by finish()
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel fills it in
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        GenlMessage {
            buf,
            nests: Vec::new(),
        }
    }

    fn put(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        let len = NLA_HDRLEN + payload.len();
        // Attribute lengths are u16; our payloads are tiny, but never wrap silently.
        let len16 = u16::try_from(len).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len16.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }
    pub fn put_u8(&mut self, ty: u16, v: u8) -> &mut Self {
        self.put(ty, &[v])
    }
    pub fn put_u16(&mut self, ty: u16, v: u16) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }
    pub fn put_u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }
    pub fn put_u64(&mut self, ty: u16, v: u64) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }
    /// NUL-terminated, as NLA_STRING / NLA_NUL_STRING policies expect.
    pub fn put_str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.put(ty, &v)
    }
    pub fn begin_nest(&mut self, ty: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        self
    }
    pub fn end_nest(&mut self) -> &mut Self {
        if let Some(start) = self.nests.pop() {
            let len = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }
    pub fn finish(mut self) -> Vec<u8> {
        while !self.nests.is_empty() {
            self.end_nest();
        }
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// One attribute seen in a reply. `nested` is true when NLA_F_NESTED was set (the kernel
/// does not always set it, so parsers decide by type, not by this bit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr<'a> {
    pub ty: u16,
    pub payload: &'a [u8],
}

impl<'a> Attr<'a> {
    pub fn u8(&self) -> Option<u8> {
        self.payload.first().copied()
    }
    pub fn u16(&self) -> Option<u16> {
        Some(u16::from_ne_bytes(self.payload.get(..2)?.try_into().ok()?))
    }
    pub fn u32(&self) -> Option<u32> {
        Some(u32::from_ne_bytes(self.payload.get(..4)?.try_into().ok()?))
    }
    pub fn u64(&self) -> Option<u64> {
        Some(u64::from_ne_bytes(self.payload.get(..8)?.try_into().ok()?))
    }
    pub fn nested(&self) -> Result<Vec<Attr<'a>>> {
        parse_attrs(self.payload)
    }
}

fn malformed(what: &str) -> Error {
    Error::new(
        ErrorKind::Io,
        format!("malformed netlink reply from the kernel: {what}"),
    )
}

/// Parses a run of attributes; a length that runs past the buffer is an error, never a panic.
pub fn parse_attrs(mut b: &[u8]) -> Result<Vec<Attr<'_>>> {
    let mut out = Vec::new();
    while b.len() >= NLA_HDRLEN {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > b.len() {
            return Err(malformed(&format!(
                "attribute {ty} claims {len} bytes, {} left",
                b.len()
            )));
        }
        out.push(Attr {
            ty,
            payload: &b[NLA_HDRLEN..len],
        });
        b = &b[align4(len).min(b.len())..];
    }
    Ok(out)
}

/// One message out of a netlink reply datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// NLMSG_ERROR with 0: the ACK.
    Ack {
        seq: u32,
    },
    /// NLMSG_ERROR with a negative errno.
    Error {
        seq: u32,
        errno: i32,
    },
    Done {
        seq: u32,
    },
    /// A generic-netlink message: its command and attributes.
    Genl {
        seq: u32,
        ty: u16,
        cmd: u8,
        attrs: Vec<Attr<'a>>,
    },
}

/// Splits a received datagram into messages.
pub fn parse_replies(mut b: &[u8]) -> Result<Vec<Reply<'_>>> {
    let mut out = Vec::new();
    while b.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let ty = u16::from_ne_bytes([b[4], b[5]]);
        let seq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err(malformed(&format!(
                "message claims {len} bytes, {} left",
                b.len()
            )));
        }
        let body = &b[NLMSG_HDRLEN..len];
        match ty {
            NLMSG_ERROR => {
                let e = body
                    .get(..4)
                    .ok_or_else(|| malformed("short NLMSG_ERROR"))?;
                let err = i32::from_ne_bytes([e[0], e[1], e[2], e[3]]);
                out.push(if err == 0 {
                    Reply::Ack { seq }
                } else {
                    Reply::Error { seq, errno: -err }
                });
            }
            NLMSG_DONE => out.push(Reply::Done { seq }),
            _ if ty >= GENL_ID_CTRL => {
                if body.len() < GENL_HDRLEN {
                    return Err(malformed("short generic netlink header"));
                }
                out.push(Reply::Genl {
                    seq,
                    ty,
                    cmd: body[0],
                    attrs: parse_attrs(&body[GENL_HDRLEN..])?,
                });
            }
            _ => {} // NLMSG_NOOP, NLMSG_OVERRUN: nothing to act on
        }
        b = &b[align4(len).min(b.len())..];
    }
    Ok(out)
}

/// What one device's CONNECT or RECONFIGURE says. `None` fields are left out of the message
/// (for RECONFIGURE that means "keep what the kernel has").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    /// `N` of /dev/nbdN; None on CONNECT lets the kernel choose any free device.
    pub index: Option<u32>,
    pub size_bytes: Option<u64>,
    pub block_size: Option<u64>,
    /// Transmission flags (NBD_FLAG_*), as the server would advertise them.
    pub server_flags: Option<u64>,
    pub client_flags: Option<u64>,
    /// Request timeout in seconds (0: never time out).
    pub timeout: Option<u64>,
    /// How long the kernel keeps requests waiting for a new socket after all died.
    pub dead_conn_timeout: Option<u64>,
    pub backend: Option<String>,
    /// The kernel's ends of the socket pairs, one per connection.
    pub sockets: Vec<RawFd>,
}

/// Runs a system call again for as long as a signal interrupts it; its result as a count.
fn retry_eintr(mut call: impl FnMut() -> isize) -> std::io::Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Encodes CONNECT / RECONFIGURE (the same attributes; the kernel validates per command).
pub fn encode_config(family: u16, seq: u32, cmd: u8, c: &DeviceConfig) -> Vec<u8> {
    let mut m = nbd_request(family, seq, cmd, c.index);
    for (attr, v) in [
        (NBD_ATTR_SIZE_BYTES, c.size_bytes),
        (NBD_ATTR_BLOCK_SIZE_BYTES, c.block_size),
        (NBD_ATTR_TIMEOUT, c.timeout),
        (NBD_ATTR_SERVER_FLAGS, c.server_flags),
        (NBD_ATTR_CLIENT_FLAGS, c.client_flags),
        (NBD_ATTR_DEAD_CONN_TIMEOUT, c.dead_conn_timeout),
    ] {
        if let Some(v) = v {
            m.put_u64(attr, v);
        }
    }
    if let Some(b) = &c.backend {
        m.put_str(NBD_ATTR_BACKEND_IDENTIFIER, b);
    }
    if !c.sockets.is_empty() {
        m.begin_nest(NBD_ATTR_SOCKETS);
        for fd in &c.sockets {
            m.begin_nest(NBD_SOCK_ITEM);
            m.put_u32(NBD_SOCK_FD, *fd as u32);
            m.end_nest();
        }
        m.end_nest();
    }
    m.finish()
}

pub fn encode_index_cmd(family: u16, seq: u32, cmd: u8, index: Option<u32>) -> Vec<u8> {
    nbd_request(family, seq, cmd, index).finish()
}

/// An nbd family request that asks for an ACK, naming the device when `index` is given.
fn nbd_request(family: u16, seq: u32, cmd: u8, index: Option<u32>) -> GenlMessage {
    let mut m = GenlMessage::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        cmd,
        NBD_GENL_VERSION,
    );
    if let Some(i) = index {
        m.put_u32(NBD_ATTR_INDEX, i);
    }
    m
}

pub fn encode_get_family(seq: u32, name: &str) -> Vec<u8> {
    let mut m = GenlMessage::new(
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CTRL_CMD_GETFAMILY,
        1,
    );
    m.put_str(CTRL_ATTR_FAMILY_NAME, name);
    m.finish()
}

/// One device in a STATUS answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    pub index: u32,
    pub connected: bool,
}

/// Reads NBD_ATTR_DEVICE_LIST out of a STATUS reply's attributes.
pub fn decode_status(attrs: &[Attr<'_>]) -> Result<Vec<DeviceStatus>> {
    let mut out = Vec::new();
    for a in attrs.iter().filter(|a| a.ty == NBD_ATTR_DEVICE_LIST) {
        for item in a.nested()? {
            if item.ty != NBD_DEVICE_ITEM {
                continue;
            }
            let mut index = None;
            let mut connected = false;
            for f in item.nested()? {
                match f.ty {
                    NBD_DEVICE_INDEX => index = f.u32(),
                    NBD_DEVICE_CONNECTED => connected = f.u8().unwrap_or(0) != 0,
                    _ => {}
                }
            }
            let index = index.ok_or_else(|| malformed("device item without an index"))?;
            out.push(DeviceStatus { index, connected });
        }
    }
    Ok(out)
}

fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

/// An open generic-netlink socket with the `nbd` family resolved.
pub struct NbdNetlink {
    fd: OwnedFd,
    family: u16,
    seq: u32,
}

impl NbdNetlink {
    /// Opens a socket and resolves the `nbd` family. `Ok(None)` when the kernel has no such
    /// family (the module is missing or too old): callers fall back to ioctls.
    pub fn open() -> Result<Option<Self>> {
        // SAFETY: plain socket(2); the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(Error::io(
                "opening a generic netlink socket",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: raw is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; all-zero means "kernel assigns the port id".
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: sa is a valid sockaddr_nl of the size passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(Error::io(
                "binding a generic netlink socket",
                std::io::Error::last_os_error(),
            ));
        }
        let mut s = NbdNetlink {
            fd,
            family: 0,
            seq: 0,
        };
        let seq = s.next_seq();
        let msg = encode_get_family(seq, NBD_GENL_FAMILY_NAME);
        let mut family = None;
        match s.transact(&msg, seq, |r| {
            if let Reply::Genl { attrs, .. } = r {
                if let Some(a) = attrs.iter().find(|a| a.ty == CTRL_ATTR_FAMILY_ID) {
                    family = a.u16();
                }
            }
            Ok(())
        }) {
            Ok(()) => {}
            Err(NlError::Errno(e)) if e == libc::ENOENT => return Ok(None),
            Err(e) => return Err(e.into_error("resolving the generic netlink family \"nbd\"")),
        }
        match family {
            Some(f) => {
                s.family = f;
                Ok(Some(s))
            }
            None => Err(malformed("CTRL_CMD_GETFAMILY answer without a family id")),
        }
    }

    pub fn family(&self) -> u16 {
        self.family
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one request and reads until its ACK or error, handing every other message
    /// with the same sequence number to `on_msg`.
    fn transact(
        &mut self,
        msg: &[u8],
        seq: u32,
        mut on_msg: impl FnMut(&Reply<'_>) -> Result<()>,
    ) -> std::result::Result<(), NlError> {
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: msg is a valid buffer of the given length; sa is a valid address.
        retry_eintr(|| unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })
        .map_err(NlError::Io)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is a valid writable buffer of its length.
            let n = retry_eintr(|| unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            })
            .map_err(NlError::Io)?;
            let replies = parse_replies(&buf[..n]).map_err(NlError::Other)?;
            for r in &replies {
                match r {
                    Reply::Ack { seq: s } if *s == seq => return Ok(()),
                    Reply::Error { seq: s, errno } if *s == seq => {
                        return Err(NlError::Errno(*errno))
                    }
                    Reply::Done { seq: s } if *s == seq => return Ok(()),
                    Reply::Genl { seq: s, .. } if *s == seq => on_msg(r).map_err(NlError::Other)?,
                    _ => {} // stale answers to an earlier request
                }
            }
        }
    }

    /// NBD_CMD_CONNECT; returns the index of the device the kernel configured.
    pub fn connect(&mut self, cfg: &DeviceConfig) -> Result<u32> {
        let seq = self.next_seq();
        let msg = encode_config(self.family, seq, NBD_CMD_CONNECT, cfg);
        let mut index = None;
        let what = match cfg.index {
            Some(i) => format!("connecting /dev/nbd{i}"),
            None => "connecting a free nbd device".to_string(),
        };
        self.transact(&msg, seq, |r| {
            if let Reply::Genl { attrs, .. } = r {
                if let Some(a) = attrs.iter().find(|a| a.ty == NBD_ATTR_INDEX) {
                    index = a.u32();
                }
            }
            Ok(())
        })
        .map_err(|e| match e {
            NlError::Errno(libc::EBUSY) => Error::new(
                ErrorKind::Busy,
                format!("{what}: the device is already in use"),
            ),
            e => e.into_error(&what),
        })?;
        index
            .or(cfg.index)
            .ok_or_else(|| malformed("CONNECT answer without a device index"))
    }

    /// NBD_CMD_RECONFIGURE: hand a configured device new sockets (and timeouts).
    pub fn reconfigure(&mut self, cfg: &DeviceConfig) -> Result<()> {
        let index = cfg.index.ok_or_else(|| {
            Error::new(ErrorKind::InvalidInput, "reconfigure needs a device index")
        })?;
        let seq = self.next_seq();
        let msg = encode_config(self.family, seq, NBD_CMD_RECONFIGURE, cfg);
        self.transact(&msg, seq, |_| Ok(()))
            .map_err(|e| e.into_error(&format!("reconfiguring /dev/nbd{index}")))
    }

    /// NBD_CMD_DISCONNECT: the kernel sends NBD_CMD_DISC on every socket, then closes them.
    pub fn disconnect(&mut self, index: u32) -> Result<()> {
        let seq = self.next_seq();
        let msg = encode_index_cmd(self.family, seq, NBD_CMD_DISCONNECT, Some(index));
        self.transact(&msg, seq, |_| Ok(()))
            .map_err(|e| e.into_error(&format!("disconnecting /dev/nbd{index}")))
    }

    /// NBD_CMD_STATUS for one device or (None) all of them.
    pub fn status(&mut self, index: Option<u32>) -> Result<Vec<DeviceStatus>> {
        let seq = self.next_seq();
        let msg = encode_index_cmd(self.family, seq, NBD_CMD_STATUS, index);
        let mut out = Vec::new();
        self.transact(&msg, seq, |r| {
            if let Reply::Genl { attrs, .. } = r {
                out.extend(decode_status(attrs)?);
            }
            Ok(())
        })
        .map_err(|e| e.into_error("asking the kernel for nbd device status"))?;
        Ok(out)
    }
}

#[derive(Debug)]
enum NlError {
    Errno(i32),
    Io(std::io::Error),
    Other(Error),
}

impl NlError {
    fn into_error(self, what: &str) -> Error {
        match self {
            NlError::Errno(e) => {
                let kind = match e {
                    libc::EPERM | libc::EACCES => ErrorKind::ReadOnly,
                    libc::EBUSY => ErrorKind::Busy,
                    libc::ENOENT | libc::ENODEV => ErrorKind::NotFound,
                    libc::EINVAL => ErrorKind::InvalidInput,
                    _ => ErrorKind::Io,
                };
                let hint = match e {
                    libc::EPERM => " (needs root / CAP_SYS_ADMIN)",
                    libc::EINVAL => " (see the kernel log, dmesg, for the reason)",
                    _ => "",
                };
                Error::new(
                    kind,
                    format!("{what}: the kernel refused: {}{hint}", errno_text(e)),
                )
            }
            NlError::Io(e) => Error::io(format!("{what}: netlink"), e),
            NlError::Other(e) => e.context(what),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(b: &[u8]) -> (u32, u16, u16, u32, u8, u8) {
        (
            u32::from_ne_bytes(b[0..4].try_into().unwrap()),
            u16::from_ne_bytes(b[4..6].try_into().unwrap()),
            u16::from_ne_bytes(b[6..8].try_into().unwrap()),
            u32::from_ne_bytes(b[8..12].try_into().unwrap()),
            b[16],
            b[17],
        )
    }

    #[test]
    fn get_family_bytes() {
        let m = encode_get_family(7, "nbd");
        // 16 nlmsghdr + 4 genl + 4 nla hdr + "nbd\0" = 28
        assert_eq!(m.len(), 28);
        assert_eq!(
            hdr(&m),
            (28, GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, 7, 3, 1)
        );
        assert_eq!(&m[20..22], &8u16.to_ne_bytes());
        assert_eq!(&m[22..24], &CTRL_ATTR_FAMILY_NAME.to_ne_bytes());
        assert_eq!(&m[24..28], b"nbd\0");
    }

    #[test]
    fn connect_encoding_round_trips() {
        let cfg = DeviceConfig {
            index: Some(3),
            size_bytes: Some(1 << 30),
            block_size: Some(512),
            server_flags: Some(0x1ad),
            client_flags: Some(0),
            timeout: Some(60),
            dead_conn_timeout: Some(30),
            backend: Some("dir:/x|rbd/vm1".into()),
            sockets: vec![5, 9],
        };
        let m = encode_config(0x22, 11, NBD_CMD_CONNECT, &cfg);
        let (len, ty, flags, seq, cmd, ver) = hdr(&m);
        assert_eq!(len as usize, m.len());
        assert_eq!(m.len() % 4, 0);
        assert_eq!(
            (ty, flags, seq, cmd, ver),
            (0x22, 5, 11, NBD_CMD_CONNECT, 1)
        );
        let attrs = parse_attrs(&m[20..]).unwrap();
        let get = |t| attrs.iter().find(|a| a.ty == t).unwrap();
        assert_eq!(get(NBD_ATTR_INDEX).u32(), Some(3));
        assert_eq!(get(NBD_ATTR_INDEX).payload.len(), 4);
        assert_eq!(get(NBD_ATTR_SIZE_BYTES).u64(), Some(1 << 30));
        assert_eq!(get(NBD_ATTR_SIZE_BYTES).payload.len(), 8);
        assert_eq!(get(NBD_ATTR_BLOCK_SIZE_BYTES).u64(), Some(512));
        assert_eq!(get(NBD_ATTR_SERVER_FLAGS).u64(), Some(0x1ad));
        assert_eq!(get(NBD_ATTR_CLIENT_FLAGS).u64(), Some(0));
        assert_eq!(get(NBD_ATTR_TIMEOUT).u64(), Some(60));
        assert_eq!(get(NBD_ATTR_DEAD_CONN_TIMEOUT).u64(), Some(30));
        assert_eq!(
            get(NBD_ATTR_BACKEND_IDENTIFIER).payload,
            b"dir:/x|rbd/vm1\0"
        );
        // The socket list is nested twice: SOCKETS > SOCK_ITEM > SOCK_FD, flagged nested.
        let socks_raw = &m[20..];
        let pos = socks_raw
            .windows(2)
            .position(|w| w == (NBD_ATTR_SOCKETS | NLA_F_NESTED).to_ne_bytes())
            .unwrap();
        assert!(pos >= 2);
        let items = get(NBD_ATTR_SOCKETS).nested().unwrap();
        assert_eq!(items.len(), 2);
        let fds: Vec<u32> = items
            .iter()
            .map(|i| {
                assert_eq!(i.ty, NBD_SOCK_ITEM);
                let f = i.nested().unwrap();
                assert_eq!(f.len(), 1);
                assert_eq!(f[0].ty, NBD_SOCK_FD);
                f[0].u32().unwrap()
            })
            .collect();
        assert_eq!(fds, vec![5, 9]);
        // Each item is 4 (item hdr) + 8 (fd attr); the list 4 + 2*12.
        assert_eq!(get(NBD_ATTR_SOCKETS).payload.len(), 24);
    }

    #[test]
    fn optional_fields_are_left_out() {
        let cfg = DeviceConfig {
            size_bytes: Some(4096),
            sockets: vec![4],
            ..Default::default()
        };
        let m = encode_config(0x22, 1, NBD_CMD_CONNECT, &cfg);
        let attrs = parse_attrs(&m[20..]).unwrap();
        let tys: Vec<u16> = attrs.iter().map(|a| a.ty).collect();
        assert_eq!(tys, vec![NBD_ATTR_SIZE_BYTES, NBD_ATTR_SOCKETS]);
        let m = encode_index_cmd(0x22, 2, NBD_CMD_STATUS, None);
        assert_eq!(m.len(), 20);
        let m = encode_index_cmd(0x22, 2, NBD_CMD_DISCONNECT, Some(9));
        let a = parse_attrs(&m[20..]).unwrap();
        assert_eq!(
            a,
            vec![Attr {
                ty: NBD_ATTR_INDEX,
                payload: &9u32.to_ne_bytes()
            }]
        );
    }

    #[test]
    fn strings_are_padded() {
        let mut m = GenlMessage::new(0x20, 0, 0, 1, 1);
        m.put_str(10, "abcd").put_u8(2, 7).put_u16(3, 0x1234);
        let b = m.finish();
        // "abcd\0" = 5 + 4 hdr = 9 -> padded to 12; u8 = 5 -> 8; u16 = 6 -> 8
        assert_eq!(b.len(), 20 + 12 + 8 + 8);
        let a = parse_attrs(&b[20..]).unwrap();
        assert_eq!(a[0].payload, b"abcd\0");
        assert_eq!(a[1].u8(), Some(7));
        assert_eq!(a[2].u16(), Some(0x1234));
    }

    fn nlmsg(ty: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&0u16.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(body);
        v.resize(align4(v.len()), 0);
        v
    }

    #[test]
    fn replies_parse() {
        // A CONNECT reply (index 4), then the ACK, in one datagram.
        let mut genl = vec![NBD_CMD_CONNECT, 1, 0, 0];
        genl.extend_from_slice(&8u16.to_ne_bytes());
        genl.extend_from_slice(&NBD_ATTR_INDEX.to_ne_bytes());
        genl.extend_from_slice(&4u32.to_ne_bytes());
        let mut d = nlmsg(0x22, 5, &genl);
        let mut ack = 0i32.to_ne_bytes().to_vec();
        ack.extend_from_slice(&[0u8; 16]);
        d.extend(nlmsg(NLMSG_ERROR, 5, &ack));
        let mut err = (-libc::EBUSY).to_ne_bytes().to_vec();
        err.extend_from_slice(&[0u8; 16]);
        d.extend(nlmsg(NLMSG_ERROR, 6, &err));
        let r = parse_replies(&d).unwrap();
        assert_eq!(r.len(), 3);
        match &r[0] {
            Reply::Genl {
                seq,
                ty,
                cmd,
                attrs,
            } => {
                assert_eq!((*seq, *ty, *cmd), (5, 0x22, NBD_CMD_CONNECT));
                assert_eq!(attrs[0].u32(), Some(4));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(r[1], Reply::Ack { seq: 5 });
        assert_eq!(
            r[2],
            Reply::Error {
                seq: 6,
                errno: libc::EBUSY
            }
        );
    }

    #[test]
    fn truncated_replies_are_errors_not_panics() {
        let mut d = nlmsg(0x22, 1, &[1, 1, 0, 0, 200, 0, 1, 0]);
        assert!(parse_replies(&d).is_err()); // attribute longer than the message
        d[0] = 200; // message longer than the datagram
        assert!(parse_replies(&d).is_err());
        assert!(parse_replies(&d[..10]).unwrap().is_empty());
        assert!(parse_attrs(&[3, 0, 1, 0]).is_err()); // length below the header size
        assert!(Attr {
            ty: 1,
            payload: &[1, 2]
        }
        .u32()
        .is_none());
    }

    #[test]
    fn status_decodes() {
        let mut m = GenlMessage::new(0x22, 0, 0, NBD_CMD_STATUS, 1);
        m.begin_nest(NBD_ATTR_DEVICE_LIST);
        for (i, c) in [(0u32, 1u8), (1, 0), (7, 1)] {
            m.begin_nest(NBD_DEVICE_ITEM);
            m.put_u32(NBD_DEVICE_INDEX, i)
                .put_u8(NBD_DEVICE_CONNECTED, c);
            m.end_nest();
        }
        m.end_nest();
        let b = m.finish();
        let attrs = parse_attrs(&b[20..]).unwrap();
        let s = decode_status(&attrs).unwrap();
        assert_eq!(
            s,
            vec![
                DeviceStatus {
                    index: 0,
                    connected: true
                },
                DeviceStatus {
                    index: 1,
                    connected: false
                },
                DeviceStatus {
                    index: 7,
                    connected: true
                },
            ]
        );
    }
}
