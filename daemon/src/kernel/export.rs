//! What the kernel attach code needs from an opened image: its export info, serving one
//! kernel socket (transmission phase, no handshake) until NBD_CMD_DISC / EOF / shutdown,
//! and a clean close. A thin layer over [`crate::image::Image`] and
//! [`nbd_protocol::serve_transmission`], with one arm per store kind.

use crate::cli::{parse_store_uri, StoreUri};
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::image::{Image, OpenOptions};
use crate::spec::ImageSpec;
use crate::store::dir::DirStore;
use crate::store::{OpenMode, Store};
use nbd_protocol::{Backend, ExportInfo, ServerOptions};
use std::sync::Arc;
use tokio::net::UnixStream;
use tokio::sync::watch;

type DirImage = Image<<DirStore as Store>::Image>;
#[cfg(feature = "ceph")]
type CephImage = Image<<crate::store::ceph::CephStore as Store>::Image>;

/// An opened image, whichever store it lives in.
pub enum Export {
    Dir(Arc<DirImage>),
    /// The store (cluster connection) lives as long as the image.
    #[cfg(feature = "ceph")]
    Ceph(Arc<CephImage>, Arc<crate::store::ceph::CephStore>),
}

/// `--id` / `--keyring` for a Ceph store, set once by [`super::run`].
pub static CEPH_AUTH: std::sync::OnceLock<(Option<String>, Option<std::path::PathBuf>)> =
    std::sync::OnceLock::new();

/// How a store is written in state files and messages; `parse_store_uri` reads it back.
pub fn store_string(uri: &StoreUri) -> String {
    match uri {
        StoreUri::Dir(p) => format!("dir:{}", p.display()),
        StoreUri::Ceph { conf } => format!(
            "ceph:{}",
            conf.as_ref()
                .map(|c| c.display().to_string())
                .unwrap_or_default()
        ),
    }
}

impl Export {
    /// Opens for serving; writable opens set the dirty flag until [`Export::close`]. The
    /// lock follows the image's `shared` setting (exclusive unless shared); `exclusive`
    /// takes the exclusive lock even for a shared image, so no other writer can join.
    pub async fn open(
        store: &str,
        spec: &ImageSpec,
        read_only: bool,
        exclusive: bool,
        checkpoint_idle: Option<std::time::Duration>,
    ) -> Result<Self> {
        let read_only = read_only || spec.snap.is_some();
        let opts = OpenOptions {
            read_only,
            shared_default: Config::load()?.shared_default,
            checkpoint_idle,
        };
        match parse_store_uri(Some(store))? {
            StoreUri::Dir(p) => {
                let st = DirStore::new(p);
                let img = if exclusive && !read_only {
                    let h = st.open_image(spec, OpenMode::ReadWrite).await?;
                    Image::from_store_image(h, spec, &opts).await?
                } else {
                    Image::open(&st, spec, &opts).await?
                };
                let img = Arc::new(img);
                img.serve_owner_requests();
                img.spawn_idle_checkpoints();
                Ok(Export::Dir(img))
            }
            #[cfg(feature = "ceph")]
            StoreUri::Ceph { conf } => {
                use crate::store::ceph::{CephOptions, CephStore};
                let (id, keyring) = CEPH_AUTH.get().cloned().unwrap_or_default();
                let path = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
                let st = Arc::new(
                    CephStore::connect(CephOptions {
                        conf: conf.map(path),
                        id,
                        keyring: keyring.map(path),
                        // Fail a request instead of hanging when the cluster is unreachable.
                        options: vec![
                            ("rados_mon_op_timeout".into(), "60".into()),
                            ("client_mount_timeout".into(), "60".into()),
                        ],
                    })
                    .await?,
                );
                let img = if exclusive && !read_only {
                    let h = st.open_image(spec, OpenMode::ReadWrite).await?;
                    Image::from_store_image(h, spec, &opts).await?
                } else {
                    Image::open(&*st, spec, &opts).await?
                };
                let img = Arc::new(img);
                img.serve_owner_requests();
                img.spawn_idle_checkpoints();
                Ok(Export::Ceph(img, st))
            }
            #[cfg(not(feature = "ceph"))]
            StoreUri::Ceph { .. } => Err(Error::new(
                ErrorKind::Unsupported,
                "this build has no Ceph support (rebuild with --features ceph; needs librados-dev and libradospp-dev)",
            )),
        }
    }

    pub fn info(&self) -> ExportInfo {
        match self {
            Export::Dir(i) => i.info(),
            #[cfg(feature = "ceph")]
            Export::Ceph(i, _) => i.info(),
        }
    }

    pub fn transmission_flags(&self) -> u16 {
        nbd_protocol::transmission_flags(&self.info())
    }

    /// Serves one kernel socket until NBD_CMD_DISC, EOF, or `shutdown` turning true; every
    /// request taken has been answered when this returns.
    pub async fn serve(&self, s: UnixStream, shutdown: watch::Receiver<bool>) -> Result<()> {
        let poll_max = std::time::Duration::from_micros(crate::serve::DEFAULT_POLL_MAX_US.into());
        let s = nbd_protocol::NbdSocket::from_unix(s)
            .map_err(|e| Error::new(ErrorKind::Io, format!("setting up the kernel socket: {e}")))?
            .with_polling(poll_max);
        let r = match self {
            Export::Dir(i) => {
                nbd_protocol::serve_transmission(s, i.clone(), ServerOptions::default(), shutdown)
                    .await
            }
            #[cfg(feature = "ceph")]
            Export::Ceph(i, _) => {
                nbd_protocol::serve_transmission(s, i.clone(), ServerOptions::default(), shutdown)
                    .await
            }
        };
        r.map_err(|e| Error::new(ErrorKind::Io, format!("serving the kernel: {e}")))
    }

    /// The image's size now and each later change (a resize while mapped).
    pub fn size_changes(&self) -> watch::Receiver<u64> {
        match self {
            Export::Dir(i) => i.size_changes(),
            #[cfg(feature = "ceph")]
            Export::Ceph(i, _) => i.size_changes(),
        }
    }

    /// Clean close: flush, write the object map, clear the dirty flag, release the lock.
    pub async fn close(&self) -> Result<()> {
        match self {
            Export::Dir(i) => i.close().await,
            #[cfg(feature = "ceph")]
            Export::Ceph(i, _) => i.close().await,
        }
    }
}
