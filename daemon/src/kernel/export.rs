//! What the kernel attach code needs from an opened image: its export info, serving one
//! kernel socket (transmission phase, no handshake) until NBD_CMD_DISC / EOF / shutdown,
//! and a clean close.
//!
//! STOPGAP until the image layer and the protocol server land on main: a raw file
//! `<dir>/<pool>/<name>` served one request at a time. Only this file changes at the merge.

use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use nbd_protocol::ExportInfo;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;

pub struct Export {
    file: Arc<std::fs::File>,
    info: ExportInfo,
}

const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

impl Export {
    pub async fn open(
        store: &str,
        spec: &ImageSpec,
        read_only: bool,
        _exclusive: bool,
    ) -> Result<Self> {
        let dir = store.strip_prefix("dir:").ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                format!("store {store} is not supported yet"),
            )
        })?;
        let path = std::path::Path::new(dir).join(&spec.pool).join(&spec.name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|e| Error::io(format!("opening image {spec} in {store}"), e))?;
        let size = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
            .len();
        Ok(Export {
            file: Arc::new(file),
            info: ExportInfo {
                size,
                read_only,
                can_flush: true,
                can_fua: true,
                can_trim: true,
                can_write_zeroes: false,
                can_fast_zero: false,
                can_cache: false,
                can_df: false,
                can_multi_conn: true,
                min_block: 1,
                preferred_block: 4096,
                max_block: 32 << 20,
                description: String::new(),
            },
        })
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    pub fn transmission_flags(&self) -> u16 {
        let mut f =
            NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM;
        if self.info.read_only {
            f |= NBD_FLAG_READ_ONLY;
        }
        if self.info.can_multi_conn {
            f |= NBD_FLAG_CAN_MULTI_CONN;
        }
        f
    }

    /// Serves one kernel socket until NBD_CMD_DISC, EOF, or `shutdown` turning true.
    pub async fn serve(
        &self,
        mut s: UnixStream,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        let ioe = |e: std::io::Error| Error::io("kernel socket", e);
        loop {
            let mut h = [0u8; 28];
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|v| *v) => return Ok(()),
                r = s.read_exact(&mut h) => match r {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(ioe(e)),
                },
            }
            let ty = u32::from_be_bytes(h[4..8].try_into().unwrap_or_default()) & 0xffff;
            let handle = &h[8..16];
            let off = u64::from_be_bytes(h[16..24].try_into().unwrap_or_default());
            let len = u32::from_be_bytes(h[24..28].try_into().unwrap_or_default()) as usize;
            let mut reply = Vec::with_capacity(16);
            reply.extend_from_slice(&0x6744_6698u32.to_be_bytes());
            let file = self.file.clone();
            let (err, data) = match ty {
                0 => {
                    let r = tokio::task::spawn_blocking(move || {
                        let mut b = vec![0u8; len];
                        let mut done = 0;
                        while done < len {
                            match file.read_at(&mut b[done..], off + done as u64) {
                                Ok(0) => break,
                                Ok(n) => done += n,
                                Err(e) => return Err(e),
                            }
                        }
                        Ok(b)
                    })
                    .await;
                    match r {
                        Ok(Ok(b)) => (0u32, Some(b)),
                        _ => (5, None),
                    }
                }
                1 => {
                    let mut b = vec![0u8; len];
                    s.read_exact(&mut b).await.map_err(ioe)?;
                    let ro = self.info.read_only;
                    let r = tokio::task::spawn_blocking(move || {
                        if ro {
                            return Err(std::io::Error::from_raw_os_error(libc::EPERM));
                        }
                        file.write_all_at(&b, off)
                    })
                    .await;
                    (if matches!(r, Ok(Ok(()))) { 0 } else { 5 }, None)
                }
                2 => return Ok(()),
                3 => {
                    let r = tokio::task::spawn_blocking(move || file.sync_data()).await;
                    (if matches!(r, Ok(Ok(()))) { 0 } else { 5 }, None)
                }
                4 => {
                    let r = tokio::task::spawn_blocking(move || {
                        // SAFETY: plain fallocate on our fd; punching a hole keeps the size.
                        let rc = unsafe {
                            libc::fallocate(
                                std::os::fd::AsRawFd::as_raw_fd(&*file),
                                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                                off as i64,
                                len as i64,
                            )
                        };
                        rc == 0
                    })
                    .await;
                    (if matches!(r, Ok(true)) { 0 } else { 5 }, None)
                }
                _ => (22, None),
            };
            reply.extend_from_slice(&err.to_be_bytes());
            reply.extend_from_slice(handle);
            s.write_all(&reply).await.map_err(ioe)?;
            if let Some(d) = data {
                s.write_all(&d).await.map_err(ioe)?;
            }
        }
    }

    pub async fn close(&self) -> Result<()> {
        let f = self.file.clone();
        tokio::task::spawn_blocking(move || f.sync_all())
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("closing: {e}")))?
            .map_err(|e| Error::io("closing image", e))
    }
}
