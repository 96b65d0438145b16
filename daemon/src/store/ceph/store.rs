//! The cluster connection and the [`Store`] impl: creating, removing, listing and opening
//! images.

use super::header::{generate_image_id, header_oid, load_header, object_map_oid};
use super::image::{CephImage, Inner};
use super::lock::acquire_lock;
use super::rados::{ConnectOptions, IoCtx, Rados, WriteOp};
use super::{cls, NOTIFY_TIMEOUT_MS, RBD};
use crate::error::{Error, ErrorKind, Result};
use crate::spec::{parse_pool_spec, ImageSpec};
use crate::store::{
    CreateOptions, OpenMode, Store, RBD_FEATURE_DEEP_FLATTEN, RBD_FEATURE_EXCLUSIVE_LOCK,
    RBD_FEATURE_FAST_DIFF, RBD_FEATURE_LAYERING, RBD_FEATURE_OBJECT_MAP,
};
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};

const RBD_DIRECTORY: &str = "rbd_directory";
/// cls::rbd::DIRECTORY_STATE_READY, encoded as the u8 it is.
const DIRECTORY_STATE_READY: u8 = 0;
/// Concurrent RADOS calls when removing or stat-ing many objects.
const PARALLEL: usize = 32;

/// Where the cluster is and who we are, parsed from `--store ceph:[CONF]`, `--id`,
/// `--keyring`.
pub type CephOptions = ConnectOptions;

pub struct CephStore {
    rados: Arc<Rados>,
    desc: String,
    /// Handles by (pool, RBD namespace).
    pools: Mutex<HashMap<(String, String), Arc<IoCtx>>>,
    allow_encrypted: bool,
    /// Images (`pool/name[@snap]`) whose LUKS header was already logged: a read-write open
    /// checks twice (before and after taking the lock) and logs once.
    luks_noted: Arc<Mutex<std::collections::HashSet<String>>>,
}

impl CephStore {
    /// Connects to the cluster (`opts.conf` = None: librados' default config search).
    pub async fn connect(opts: CephOptions) -> Result<CephStore> {
        let desc = format!("ceph:{}", opts.conf.as_deref().unwrap_or(""));
        let rados = Rados::connect(opts)
            .await
            .map_err(|e| e.context(format!("opening store {desc}")))?;
        Ok(CephStore {
            rados,
            desc,
            pools: Mutex::new(HashMap::new()),
            allow_encrypted: false,
            luks_noted: Arc::default(),
        })
    }

    /// `--allow-encrypted` for the images this store opens (off by default).
    pub fn with_allow_encrypted(mut self, allow: bool) -> Self {
        self.allow_encrypted = allow;
        self
    }

    /// The handle on `pool`'s RBD namespace `namespace` ("" is the default one), after
    /// checking that the namespace exists: objects written into a namespace that `rbd
    /// namespace create` never made would be invisible to `rbd namespace ls`.
    pub(super) async fn pool(&self, pool: &str, namespace: &str) -> Result<Arc<IoCtx>> {
        let key = (pool.to_string(), namespace.to_string());
        if let Some(io) = self
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(io.clone());
        }
        let io = self.rados.ioctx_in(pool, namespace).map_err(|e| {
            if e.kind == ErrorKind::NotFound {
                Error::new(e.kind, format!("pool {pool} not found in {}", self.desc))
            } else {
                e.context(format!("in {}", self.desc))
            }
        })?;
        if !namespace.is_empty() {
            // librbd's Namespace::exists: the namespace's image directory is there, READY.
            match io
                .exec_read(
                    RBD_DIRECTORY,
                    RBD,
                    "dir_state_assert",
                    &[DIRECTORY_STATE_READY],
                )
                .await
            {
                Ok(_) => {}
                Err(e) if e.kind == ErrorKind::NotFound => {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "namespace {namespace} not found in pool {pool} of {} \
                             (create it with `rbd namespace create {pool}/{namespace}`)",
                            self.desc
                        ),
                    ))
                }
                Err(e) => return Err(e.context(format!("checking namespace {pool}/{namespace}"))),
            }
        }
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        Ok(pools.entry(key).or_insert(io).clone())
    }

    async fn image_id(&self, io: &IoCtx, spec: &ImageSpec) -> Result<String> {
        let oid = format!("rbd_id.{}", spec.name);
        match io.exec_read(&oid, RBD, "get_id", &[]).await {
            Ok(b) => cls::string_out(&b, "rbd.get_id reply"),
            Err(e) if e.kind == ErrorKind::NotFound => Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "image {}/{} not found in {}",
                    spec.pool_spec(),
                    spec.name,
                    self.desc
                ),
            )),
            Err(e) => Err(e.context(format!("opening image {spec}"))),
        }
    }
}

impl Store for CephStore {
    type Image = CephImage;

    fn describe(&self) -> String {
        self.desc.clone()
    }

    async fn create_image(&self, spec: &ImageSpec, opts: &CreateOptions) -> Result<()> {
        if spec.snap.is_some() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("cannot create {spec}: a snapshot name is not allowed here"),
            ));
        }
        if !(12..=25).contains(&opts.order) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("object size 2^{} is outside 4 KiB..32 MiB", opts.order),
            ));
        }
        let f = opts.features;
        let creatable = RBD_FEATURE_LAYERING
            | RBD_FEATURE_EXCLUSIVE_LOCK
            | RBD_FEATURE_OBJECT_MAP
            | RBD_FEATURE_FAST_DIFF
            | RBD_FEATURE_DEEP_FLATTEN;
        if f & !creatable != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("cannot create {spec} with features {:#x}", f & !creatable),
            ));
        }
        if f & RBD_FEATURE_OBJECT_MAP != 0 && f & RBD_FEATURE_EXCLUSIVE_LOCK == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the object-map feature needs exclusive-lock",
            ));
        }
        if f & RBD_FEATURE_FAST_DIFF != 0 && f & RBD_FEATURE_OBJECT_MAP == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the fast-diff feature needs object-map",
            ));
        }
        let io = self.pool(&spec.pool, &spec.namespace).await?;
        let id = generate_image_id(self.rados.instance_id());
        let id_oid = format!("rbd_id.{}", spec.name);
        let ctx = |e: Error| e.context(format!("creating image {spec} in {}", self.desc));

        // The id object first, created exclusively: it is what makes the name taken.
        let mut op = WriteOp::new();
        op.create(true)
            .exec(c"rbd", c"set_id", &cls::string_in(&id));
        match io.operate(&id_oid, op, "create").await {
            Ok(()) => {}
            Err(e) if e.kind == ErrorKind::AlreadyExists => {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("image {spec} already exists in {}", self.desc),
                ))
            }
            Err(e) => return Err(ctx(e)),
        }
        let result = async {
            io.exec_write(
                RBD_DIRECTORY,
                RBD,
                "dir_add_image",
                &cls::dir_image_in(&spec.name, &id),
            )
            .await?;
            let prefix = format!("rbd_data.{id}");
            let mut op = WriteOp::new();
            op.create(true).exec(
                c"rbd",
                c"create",
                &cls::create_in(opts.size, opts.order, f, &prefix, -1),
            );
            io.operate(&header_oid(&id), op, "cls rbd.create on")
                .await?;
            if f & RBD_FEATURE_OBJECT_MAP != 0 {
                let count = opts.size.div_ceil(1u64 << opts.order);
                io.exec_write(
                    &object_map_oid(&id, None),
                    RBD,
                    "object_map_resize",
                    &cls::object_map_resize_in(count, 0),
                )
                .await?;
            }
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = result {
            // Undo in reverse order, best effort, so a failed create leaves no half image.
            let _ = io.remove(&object_map_oid(&id, None)).await;
            let _ = io.remove(&header_oid(&id)).await;
            let _ = io
                .exec_write(
                    RBD_DIRECTORY,
                    RBD,
                    "dir_remove_image",
                    &cls::dir_image_in(&spec.name, &id),
                )
                .await;
            let _ = io.remove(&id_oid).await;
            return Err(ctx(e));
        }
        tracing::info!(image = %spec, id = %id, "created image");
        Ok(())
    }

    async fn remove_image(&self, spec: &ImageSpec) -> Result<()> {
        let io = self.pool(&spec.pool, &spec.namespace).await?;
        let id = self.image_id(&io, spec).await?;
        let hdr = header_oid(&id);
        let ctx = |e: Error| e.context(format!("removing image {spec}"));
        match io.exec_read(&hdr, RBD, "get_snapcontext", &[]).await {
            Ok(b) => {
                let (_, snaps) = cls::get_snapcontext_out(&b).map_err(ctx)?;
                if !snaps.is_empty() {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "image {spec} has {} snapshot(s); remove them first (rbd snap purge)",
                            snaps.len()
                        ),
                    ));
                }
                let watchers = io
                    .notify(&hdr, &cls::header_update_notify(), NOTIFY_TIMEOUT_MS)
                    .await
                    .map_err(ctx)?;
                if let Some((gid, cookie, _)) = watchers.acks.first() {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!("image {spec} is open by client.{gid} (watch {cookie})"),
                    ));
                }
                if let Some((gid, cookie)) = watchers.timeouts.first() {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "image {spec} still has a watch by client.{gid} (watch {cookie}); \
                             if that client died, retry after the OSD expires it (~30 s)"
                        ),
                    ));
                }
            }
            Err(e) if e.kind == ErrorKind::NotFound => {}
            Err(e) => return Err(ctx(e)),
        }
        let names = io
            .list_objects(&format!("rbd_data.{id}."))
            .await
            .map_err(ctx)?;
        for_each_parallel(names, |name| {
            let io = io.clone();
            async move { io.remove(&name).await.map(|_| ()) }
        })
        .await
        .map_err(ctx)?;
        io.remove(&object_map_oid(&id, None)).await.map_err(ctx)?;
        io.remove(&hdr).await.map_err(ctx)?;
        match io
            .exec_write(
                RBD_DIRECTORY,
                RBD,
                "dir_remove_image",
                &cls::dir_image_in(&spec.name, &id),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if e.kind == ErrorKind::NotFound => {}
            Err(e) => return Err(ctx(e)),
        }
        io.remove(&format!("rbd_id.{}", spec.name))
            .await
            .map_err(ctx)?;
        Ok(())
    }

    async fn list_images(&self, pool: &str) -> Result<Vec<String>> {
        let (pool_name, namespace) = parse_pool_spec(pool)?;
        let io = self.pool(&pool_name, &namespace).await?;
        let mut out = Vec::new();
        let mut start = String::new();
        loop {
            let b = match io
                .exec_read(RBD_DIRECTORY, RBD, "dir_list", &cls::list_in(&start, 1024))
                .await
            {
                Ok(b) => b,
                Err(e) if e.kind == ErrorKind::NotFound => break,
                Err(e) => return Err(e.context(format!("listing pool {pool}"))),
            };
            let page = cls::dir_list_out(&b)?;
            let n = page.len();
            if let Some((last, _)) = page.last() {
                start = last.clone();
            }
            out.extend(page.into_iter().map(|(name, _)| name));
            if n < 1024 {
                break;
            }
        }
        out.sort();
        Ok(out)
    }

    async fn open_image(&self, spec: &ImageSpec, mode: OpenMode) -> Result<CephImage> {
        if spec.snap.is_some() && mode != OpenMode::ReadOnly {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("{spec} is a snapshot: it can only be opened read-only"),
            ));
        }
        let meta = self.pool(&spec.pool, &spec.namespace).await?;
        let id = self.image_id(&meta, spec).await?;
        let (header, snap_id) = load_header(&meta, spec, &id, mode).await?;
        // Data objects get their own handle: it carries the snapshot context (writes) or
        // reads at the mapped snapshot.
        let data = match snap_id {
            Some(s) => meta.at_snap(s)?,
            None => self.rados.ioctx_in(&spec.pool, &spec.namespace)?,
        };
        if snap_id.is_none() {
            let ids: Vec<u64> = header.snaps.iter().map(|s| s.id).collect();
            data.set_snap_write_ctx(header.snap_seq, &ids)?;
        }
        let inner = Arc::new(Inner {
            meta,
            data,
            spec: spec.clone(),
            hdr_oid: header_oid(&id),
            id,
            snap_id,
            mode,
            allow_encrypted: self.allow_encrypted,
            luks_noted: self.luks_noted.clone(),
            header: RwLock::new(header),
            snap_ios: Mutex::new(HashMap::new()),
            lock: tokio::sync::Mutex::new(None),
            lost_lock: AtomicBool::new(false),
            reacquiring: AtomicBool::new(false),
            owner_tx: Mutex::new(None),
            owner_pending: Mutex::new(std::collections::HashSet::new()),
            closed: AtomicBool::new(false),
        });
        if mode != OpenMode::ReadOnly {
            acquire_lock(&inner).await?;
        }
        Ok(CephImage { inner })
    }
}

/// Runs `f` over `items` with at most PARALLEL calls in flight; the first error wins.
pub(super) async fn for_each_parallel<T, F, Fut>(items: Vec<T>, f: F) -> Result<()>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    let mut first_err = None;
    for item in items {
        while set.len() >= PARALLEL {
            if let Some(r) = set.join_next().await {
                note_result(r, &mut first_err);
            }
        }
        set.spawn(f(item));
    }
    while let Some(r) = set.join_next().await {
        note_result(r, &mut first_err);
    }
    first_err.map_or(Ok(()), Err)
}

fn note_result(
    r: std::result::Result<Result<()>, tokio::task::JoinError>,
    first: &mut Option<Error>,
) {
    let e = match r {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e,
        Err(e) => Error::new(ErrorKind::Io, format!("task failed: {e}")),
    };
    first.get_or_insert(e);
}
