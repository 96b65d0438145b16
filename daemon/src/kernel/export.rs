//! What the kernel attach code needs from an opened image: its export info, serving one
//! kernel socket (transmission phase, no handshake) until NBD_CMD_DISC / EOF / shutdown,
//! and a clean close.
//!
//! STOPGAP until the image layer lands on main: the backend is a raw file
//! `<dir>/<pool>/<name>`. Only this file changes at that merge.

use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use bytes::Bytes;
use nbd_protocol::ExportInfo;
use nbd_protocol::{Backend, BackendError, Errno, Extent, ReadChunk, ZeroFlags};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use tokio::net::UnixStream;
use tokio::sync::watch;

pub struct Export {
    backend: Arc<FileBackend>,
}

pub struct FileBackend {
    file: Arc<std::fs::File>,
    info: ExportInfo,
}

fn be(e: impl std::fmt::Display) -> BackendError {
    BackendError::new(Errno::Io, e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(be)?
        .map_err(be)
}

impl Backend for FileBackend {
    fn info(&self) -> ExportInfo {
        self.info.clone()
    }
    async fn read(&self, offset: u64, length: u32) -> Result<Vec<ReadChunk>, BackendError> {
        let f = self.file.clone();
        let b = blocking(move || {
            let mut b = vec![0u8; length as usize];
            f.read_exact_at(&mut b, offset)?;
            Ok(b)
        })
        .await?;
        Ok(vec![ReadChunk::Data(Bytes::from(b))])
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BackendError> {
        let f = self.file.clone();
        blocking(move || {
            f.write_all_at(&data, offset)?;
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
    }
    async fn flush(&self) -> Result<(), BackendError> {
        let f = self.file.clone();
        blocking(move || f.sync_data()).await
    }
    async fn trim(&self, offset: u64, length: u32, _fua: bool) -> Result<(), BackendError> {
        let f = self.file.clone();
        blocking(move || {
            // SAFETY: fallocate on our own descriptor; punching a hole keeps the size.
            let rc = unsafe {
                libc::fallocate(
                    std::os::fd::AsRawFd::as_raw_fd(&*f),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as i64,
                    length as i64,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
        .await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        flags: ZeroFlags,
    ) -> Result<(), BackendError> {
        self.write(offset, Bytes::from(vec![0u8; length as usize]), flags.fua)
            .await
    }
    async fn cache(&self, _offset: u64, _length: u32) -> Result<(), BackendError> {
        Ok(())
    }
    async fn block_status(&self, _offset: u64, length: u32) -> Result<Vec<Extent>, BackendError> {
        Ok(vec![Extent {
            length: u64::from(length),
            flags: 0,
        }])
    }
}

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
        let info = ExportInfo {
            size,
            read_only,
            can_flush: true,
            can_fua: true,
            can_trim: true,
            can_write_zeroes: true,
            can_fast_zero: false,
            can_cache: false,
            can_df: false,
            can_multi_conn: true,
            min_block: 1,
            preferred_block: 4096,
            max_block: 32 << 20,
            description: String::new(),
        };
        Ok(Export {
            backend: Arc::new(FileBackend {
                file: Arc::new(file),
                info,
            }),
        })
    }

    pub fn info(&self) -> ExportInfo {
        self.backend.info()
    }

    pub fn transmission_flags(&self) -> u16 {
        nbd_protocol::transmission_flags(&self.backend.info())
    }

    /// Serves one kernel socket until NBD_CMD_DISC, EOF, or `shutdown` turning true; every
    /// request taken has been answered when this returns.
    pub async fn serve(&self, s: UnixStream, shutdown: watch::Receiver<bool>) -> Result<()> {
        nbd_protocol::serve_transmission(
            s,
            self.backend.clone(),
            nbd_protocol::ServerOptions::default(),
            shutdown,
        )
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("serving the kernel: {e}")))
    }

    /// Clean close: everything acknowledged is durable.
    pub async fn close(&self) -> Result<()> {
        let f = self.backend.file.clone();
        tokio::task::spawn_blocking(move || f.sync_all())
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("closing: {e}")))?
            .map_err(|e| Error::io("closing image", e))
    }
}
