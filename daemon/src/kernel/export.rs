//! What the kernel attach code needs from an opened image: its export info, serving one
//! kernel socket (transmission phase, no handshake) until NBD_CMD_DISC / EOF / shutdown,
//! and a clean close. A thin layer over [`crate::image::Image`] and
//! [`nbd_protocol::serve_transmission`], with one arm per store kind.

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::image::{Image, OpenOptions};
use crate::spec::ImageSpec;
use crate::store::dir::DirStore;
use crate::store::{connect, AnyStore, CephAccess, OpenMode, Store, StoreUri};
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

/// Opens `spec` in `st` for serving and starts the image's background duties (owner
/// requests, idle checkpoints).
async fn open_image<S: Store>(
    st: &S,
    spec: &ImageSpec,
    exclusive: bool,
    opts: &OpenOptions,
) -> Result<Arc<Image<S::Image>>> {
    let img = if exclusive && !opts.read_only {
        let h = st.open_image(spec, OpenMode::ReadWrite).await?;
        Image::from_store_image(h, spec, opts).await?
    } else {
        Image::open(st, spec, opts).await?
    };
    let img = Arc::new(img);
    // Another client asking for the lock gets it (and we take it back on our next
    // request), as with rbd-nbd; `--exclusive` keeps it, as rbd-nbd --exclusive.
    if !exclusive {
        img.enable_handover();
    }
    img.serve_owner_requests();
    img.spawn_map_rebuild();
    img.spawn_idle_checkpoints();
    Ok(img)
}

impl Export {
    /// The id of the image `spec` names now in `store`, without opening it (a takeover
    /// checks it against the device's record before opening anything).
    pub async fn image_id_of(store: &str, ceph: &CephAccess, spec: &ImageSpec) -> Result<String> {
        match connect(&StoreUri::parse(Some(store))?, ceph).await? {
            AnyStore::Dir(st) => st.image_id_of(spec).await,
            #[cfg(feature = "ceph")]
            AnyStore::Ceph(st) => st.image_id_of(spec).await,
        }
    }

    /// Opens for serving; writable opens set the dirty flag until [`Export::close`]. The
    /// lock follows the image's `shared` setting (exclusive unless shared); `exclusive`
    /// takes the exclusive lock even for a shared image, so no other writer can join.
    pub async fn open(
        store: &str,
        ceph: &CephAccess,
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
        match connect(&StoreUri::parse(Some(store))?, ceph).await? {
            AnyStore::Dir(st) => Ok(Export::Dir(open_image(&st, spec, exclusive, &opts).await?)),
            #[cfg(feature = "ceph")]
            AnyStore::Ceph(st) => {
                let st = Arc::new(st);
                Ok(Export::Ceph(
                    open_image(&*st, spec, exclusive, &opts).await?,
                    st,
                ))
            }
        }
    }

    pub fn info(&self) -> ExportInfo {
        match self {
            Export::Dir(i) => i.info(),
            #[cfg(feature = "ceph")]
            Export::Ceph(i, _) => i.info(),
        }
    }

    /// The image's id (stays through renames; a new image of the same name has another).
    pub fn image_id(&self) -> String {
        match self {
            Export::Dir(i) => i.header().id.clone(),
            #[cfg(feature = "ceph")]
            Export::Ceph(i, _) => i.header().id.clone(),
        }
    }

    /// `--copy-on-read`: false when the image is not a writable clone (nothing to copy).
    pub fn enable_copy_on_read(&self) -> bool {
        match self {
            Export::Dir(i) => i.enable_copy_on_read(),
            #[cfg(feature = "ceph")]
            Export::Ceph(i, _) => i.enable_copy_on_read(),
        }
    }

    /// `--quiesce`: snapshots of the image taken for other clients run `hook` around them.
    pub fn enable_quiesce(&self, hook: crate::quiesce::QuiesceHook) {
        match self {
            Export::Dir(i) => i.enable_quiesce(hook),
            #[cfg(feature = "ceph")]
            Export::Ceph(i, _) => i.enable_quiesce(hook),
        };
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

    /// Serves the image as a ublk device (see [`super::ublk::serve`]).
    #[cfg(feature = "ublk")]
    pub(super) fn serve_ublk(
        &self,
        setup: &super::ublk::Setup<'_>,
        mode: super::ublk::Mode,
        sig: &mut super::daemon::Signals,
        ready: &mut Option<super::daemonize::ReadyPipe>,
        on_started: impl FnOnce(&str),
    ) -> Result<(u32, super::ublk::Ending)> {
        let sizes = self.size_changes();
        match self {
            Export::Dir(i) => {
                super::ublk::serve(i.clone(), setup, mode, sig, sizes, ready, on_started)
            }
            #[cfg(feature = "ceph")]
            Export::Ceph(i, _) => {
                super::ublk::serve(i.clone(), setup, mode, sig, sizes, ready, on_started)
            }
        }
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
