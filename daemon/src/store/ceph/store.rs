//! The cluster connection and the [`Store`] impl: creating, removing, listing and opening
//! images.

use super::ask_owner;
use super::header::{
    generate_image_id, header_oid, load_header, load_header_at, object_map_oid, refresh,
};
use super::image::{data_object_name, CephImage, Inner};
use super::lock::acquire_lock;
use super::merge::{Merger, Pending};
use super::rados::{errno_of, ConnectOptions, IoCtx, Rados, WriteOp};
use super::write::start_write;
use super::{cls, NOTIFY_TIMEOUT_MS, RBD};
use crate::error::{Error, ErrorKind, Result};
use crate::spec::{parse_pool_spec, ImageSpec};
use crate::store::{
    ChildImage, CloneOptions, CreateOptions, ImageStore as _, OpenMode, ParentInfo, Store,
    RBD_FEATURE_DATA_POOL, RBD_FEATURE_DEEP_FLATTEN, RBD_FEATURE_EXCLUSIVE_LOCK,
    RBD_FEATURE_FAST_DIFF, RBD_FEATURE_LAYERING, RBD_FEATURE_OBJECT_MAP, RBD_FEATURE_STRIPINGV2,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};

const RBD_DIRECTORY: &str = "rbd_directory";
const RBD_TRASH: &str = "rbd_trash";
/// Where format-1 clones are recorded (per pool): parent spec → child ids.
const RBD_CHILDREN: &str = "rbd_children";
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
    lock_at_open: crate::store::LockAtOpen,
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
            lock_at_open: Default::default(),
            luks_noted: Arc::default(),
        })
    }

    /// `--allow-encrypted` for the images this store opens (off by default).
    /// See [`crate::store::LockAtOpen`].
    pub fn with_lock_at_open(mut self, how: crate::store::LockAtOpen) -> Self {
        self.lock_at_open = how;
        self
    }

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

    pub(super) async fn image_id(&self, io: &IoCtx, spec: &ImageSpec) -> Result<String> {
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
        self.create_with_id(spec, opts).await.map(|_| ())
    }

    async fn remove_image(&self, spec: &ImageSpec) -> Result<crate::store::Removal> {
        let io = self.pool(&spec.pool, &spec.namespace).await?;
        let id = self.image_id(&io, spec).await?;
        let hdr = header_oid(&id);
        let ctx = |e: Error| e.context(format!("removing image {spec}"));
        match io.exec_read(&hdr, RBD, "get_snapcontext", &[]).await {
            Ok(b) => {
                let (_, snaps) = cls::get_snapcontext_out(&b).map_err(ctx)?;
                if !snaps.is_empty() {
                    // librbd's PreRemoveRequest: snapshots kept in the trash namespace
                    // for clones (`rbd snap rm` of a snapshot in use) do not stop a
                    // removal as others do; with rbd_move_parent_to_trash_on_remove the
                    // image goes to the trash to wait for its last clone.
                    if all_trashed(&io, &hdr, &snaps).await.map_err(ctx)? {
                        if move_parent_to_trash_on_remove(&io).await {
                            check_unwatched(&io, &hdr, spec).await?;
                            return trash_move(&io, spec, &id, cls::TRASH_SOURCE_USER_PARENT)
                                .await
                                .map(|()| crate::store::Removal::Trashed)
                                .map_err(ctx);
                        }
                        return Err(Error::new(
                            ErrorKind::Busy,
                            format!(
                                "image {spec} has snapshots with linked clones: these must be \
                                 deleted or flattened before the image can be removed \
                                 (or set rbd_move_parent_to_trash_on_remove=true to move it \
                                 to the trash until they are)"
                            ),
                        ));
                    }
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "image {spec} has {} snapshot(s); remove them first (rbd snap purge)",
                            snaps.len()
                        ),
                    ));
                }
                check_unwatched(&io, &hdr, spec).await?;
            }
            Err(e) if e.kind == ErrorKind::NotFound => {}
            Err(e) => return Err(ctx(e)),
        }
        let knobs = OpenKnobs {
            allow_encrypted: self.allow_encrypted,
            lock_at_open: self.lock_at_open,
        };
        remove_by_id(&io, spec, &id, knobs, self.luks_noted.clone())
            .await
            .map_err(ctx)?;
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
        Ok(crate::store::Removal::Removed)
    }

    async fn image_id_of(&self, spec: &ImageSpec) -> Result<String> {
        let io = self.pool(&spec.pool, &spec.namespace).await?;
        self.image_id(&io, spec).await
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

    async fn ask_holder(
        &self,
        spec: &ImageSpec,
        action: &crate::store::OwnerAction,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<()> {
        let build = ask_owner::request_builder(spec, action)?;
        ask_owner::ask_owner(self, spec, &action.describe(), build, progress).await
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
        open_by_id(
            meta,
            spec,
            id,
            mode,
            OpenKnobs {
                allow_encrypted: self.allow_encrypted,
                lock_at_open: self.lock_at_open,
            },
            self.luks_noted.clone(),
        )
        .await
    }

    async fn create_defaults(&self, pool: &str) -> Result<crate::store::CreateDefaults> {
        let (pool_name, namespace) = parse_pool_spec(pool)?;
        let io = self.pool(&pool_name, &namespace).await?;
        Ok(crate::store::CreateDefaults {
            features: configured(&io, "rbd_default_features").await,
            order: configured(&io, "rbd_default_order").await,
            data_pool: configured(&io, "rbd_default_data_pool")
                .await
                .filter(|p| !p.is_empty()),
            stripe_unit: configured(&io, "rbd_default_stripe_unit").await,
            stripe_count: configured(&io, "rbd_default_stripe_count").await,
        })
    }

    async fn clone_image(
        &self,
        parent: &ImageSpec,
        child: &ImageSpec,
        opts: &CloneOptions,
    ) -> Result<()> {
        self.clone_impl(parent, child, opts).await
    }

    async fn children(
        &self,
        parent: &ImageSpec,
        snap_id: Option<u64>,
        descendants: bool,
    ) -> Result<Vec<ChildImage>> {
        self.children_impl(parent, snap_id, descendants).await
    }
}

impl CephStore {
    /// `create_image`, returning the new image's id (what a clone's records need).
    async fn create_with_id(&self, spec: &ImageSpec, opts: &CreateOptions) -> Result<String> {
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
        // librbd's CreateRequest: a stripe unit other than the object size makes the
        // image striped (the feature comes from the settings, not from the caller).
        let stripe_unit = opts.stripe_unit.filter(|&u| u != 1u64 << opts.order);
        if let Some(unit) = stripe_unit {
            if !super::header::plain_layout(unit, 1, opts.order) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "cannot create {spec}: stripe unit {unit} is not a factor of the \
                         object size {}",
                        1u64 << opts.order
                    ),
                ));
            }
        }
        let f = f | stripe_unit.map_or(0, |_| RBD_FEATURE_STRIPINGV2);
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
        let data_pool = match &opts.data_pool {
            Some(p) => self.data_pool_for(spec, &io, p).await?,
            None => None,
        };
        let id = generate_image_id(self.rados.instance_id());
        let id_oid = format!("rbd_id.{}", spec.name);
        let ctx = |e: Error| e.context(format!("creating image {spec} in {}", self.desc));
        // librbd's CreateRequest: with a data pool the feature says so, and the data
        // objects' names carry the metadata pool's id.
        let (f, prefix, data_pool_id) = match data_pool {
            Some(id_of_pool) => (
                f | RBD_FEATURE_DATA_POOL,
                format!("rbd_data.{}.{id}", io.pool_id()),
                id_of_pool,
            ),
            None => (f, format!("rbd_data.{id}"), -1),
        };

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
            let mut op = WriteOp::new();
            op.create(true).exec(
                c"rbd",
                c"create",
                &cls::create_in(opts.size, opts.order, f, &prefix, data_pool_id),
            );
            io.operate(&header_oid(&id), op, "cls rbd.create on")
                .await?;
            if let Some(unit) = stripe_unit {
                io.exec_write(
                    &header_oid(&id),
                    RBD,
                    "set_stripe_unit_count",
                    &cls::stripe_in(unit, 1),
                )
                .await?;
            }
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
        Ok(id)
    }

    /// The id of `--data-pool POOL` for a new image in `io`'s pool, checked as librbd's
    /// CreateRequest checks it (ValidatePoolRequest, once per pool, recorded in the pool's
    /// `rbd_info` object in the default namespace): the pool must exist, use self-managed
    /// snapshots and take partial overwrites, which an erasure-coded pool does only with
    /// allow_ec_overwrites. Writing a new object proves nothing there (a new object is an
    /// append, which any pool takes): librbd allocates and releases a snapshot id (which
    /// puts a new pool in self-managed mode), creates `rbd_info` as "validate", then
    /// overwrites it with "overwrite validated"; a pool that refuses that overwrite
    /// (EOPNOTSUPP) is refused. `None` when it is the image's own pool (librbd then records
    /// no data pool either).
    async fn data_pool_for(&self, spec: &ImageSpec, io: &IoCtx, pool: &str) -> Result<Option<i64>> {
        const VALIDATED: &[u8] = b"overwrite validated";
        const VALIDATE: &[u8] = b"validate";
        if pool == io.pool() {
            return Ok(None);
        }
        let what = |e: Error| e.context(format!("the data pool {pool} of {spec}"));
        let no_overwrites = || {
            Error::new(
                ErrorKind::Unsupported,
                format!(
                    "cannot create {spec} with data pool {pool}: the pool does not allow \
                     overwrites (erasure-coded: `ceph osd pool set {pool} \
                     allow_ec_overwrites true`)"
                ),
            )
        };
        let data = self.pool(pool, "").await.map_err(what)?;
        let info = data.read(RBD_INFO, 0, 4096).await.map_err(what)?;
        if info.as_deref() == Some(VALIDATED) {
            return Ok(Some(data.pool_id()));
        }
        if info.as_deref() != Some(VALIDATE) {
            let snap = match data.selfmanaged_snap_create().await {
                Ok(id) => id,
                Err(e) if errno_of(&e) == Some(libc::EINVAL) => {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!(
                            "cannot create {spec} with data pool {pool}: the pool uses pool \
                             snapshots, not the self-managed ones RBD needs"
                        ),
                    ))
                }
                Err(e) => return Err(what(e)),
            };
            let mut op = WriteOp::new();
            op.create(true).write(0, VALIDATE);
            let r = match data.operate(RBD_INFO, op, "write").await {
                Err(e) if errno_of(&e) == Some(libc::EOPNOTSUPP) => Err(no_overwrites()),
                Err(e) if e.kind != ErrorKind::AlreadyExists => Err(what(e)),
                _ => Ok(()),
            };
            // As librbd: the id only served to put the pool in self-managed mode; failing
            // to give it back is not fatal.
            if let Err(e) = data.selfmanaged_snap_remove(snap).await {
                tracing::warn!("validating data pool {pool}: {e}");
            }
            r?;
        }
        let mut op = WriteOp::new();
        op.write(0, VALIDATED);
        match data.operate(RBD_INFO, op, "write").await {
            Ok(()) => Ok(Some(data.pool_id())),
            Err(e) if errno_of(&e) == Some(libc::EOPNOTSUPP) => Err(no_overwrites()),
            Err(e) => Err(what(e)),
        }
    }

    /// librbd's CloneRequest: the child is created like any image (size = the snapshot's,
    /// empty object map), then `parent_attach` on its header (legacy `set_parent` on an
    /// OSD without it); format 2 sets the CLONE_CHILD op feature on the child and
    /// `child_attach`es it to the parent's snapshot (cls_rbd sets CLONE_PARENT on the
    /// parent); format 1 needs a protected snapshot and records the child in
    /// `rbd_children`. The parent's image-meta is copied, as librbd does. A failure
    /// undoes what was done, best effort.
    async fn clone_impl(
        &self,
        parent: &ImageSpec,
        child: &ImageSpec,
        opts: &CloneOptions,
    ) -> Result<()> {
        let invalid = |m: String| Err(Error::new(ErrorKind::InvalidInput, m));
        if parent.snap.is_none() {
            return invalid(format!(
                "cannot clone {parent}: name a snapshot (PARENT@SNAP)"
            ));
        }
        if child.snap.is_some() {
            return invalid(format!(
                "cannot clone into {child}: a snapshot name is not allowed"
            ));
        }
        if opts.clone_format > 2 {
            return invalid(format!(
                "clone format {} is not 1, 2 or auto",
                opts.clone_format
            ));
        }
        let cio = self.pool(&child.pool, &child.namespace).await?;
        let (format, from_pool) = clone_format(&cio, opts.clone_format)
            .await
            .map_err(|e| e.context(format!("cloning {parent} into {child}")))?;
        if format == 1 && parent.namespace != child.namespace {
            return invalid(format!(
                "cannot clone {parent} into {child}: clone format 1 cannot cross RBD namespaces (use format 2)"
            ));
        }
        if opts.features & RBD_FEATURE_LAYERING == 0 {
            return invalid(format!(
                "cannot clone into {child}: a clone needs the layering feature"
            ));
        }
        let pio = self.pool(&parent.pool, &parent.namespace).await?;
        let pid = self.image_id(&pio, parent).await?;
        let (ph, snap_id) = load_header(&pio, parent, &pid, OpenMode::ReadOnly).await?;
        let snap_id = snap_id.ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("{parent} is not a snapshot"),
            )
        })?;
        if ph.features & RBD_FEATURE_LAYERING == 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("cannot clone {parent}: the parent image lacks the layering feature"),
            ));
        }
        let phdr = header_oid(&pid);
        let protected = || async {
            let b = pio
                .exec_read(&phdr, RBD, "get_protection_status", &cls::snap_in(snap_id))
                .await?;
            Ok::<bool, Error>(b.first() == Some(&cls::PROTECTION_STATUS_PROTECTED))
        };
        if format == 1 && !protected().await? {
            // rbd's "parent snapshot must be protected", with the way out.
            let why = if from_pool {
                " (the pool's rbd_default_clone_format, set by `rbd config pool set`, says 1; \
                 as in rbd it wins over the command line)"
            } else if opts.clone_format == 0 {
                " (format 1 is what rbd_default_clone_format says, or its auto picks while \
                 the cluster lets clients older than Mimic in; `ceph osd \
                 set-require-min-compat-client mimic` changes that)"
            } else {
                ""
            };
            let other = if from_pool {
                format!("rbd config pool rm {} rbd_default_clone_format", child.pool)
            } else {
                "--rbd-default-clone-format 2".to_string()
            };
            return invalid(format!(
                "cannot clone {parent} with clone format 1{why}: the snapshot is not \
                 protected (rbd snap protect {parent}, or {other})"
            ));
        }
        let size = ph.size;
        // librbd's CloneRequest: the child takes the parent's stripe unit (and count,
        // 1 here: a parent striped otherwise does not open). With larger objects than
        // the parent's, the child is striped, with the plain layout. Where the unit does
        // not divide the child's object size (smaller objects than the parent's) librbd
        // refuses the clone, and so does this; --stripe-unit makes it possible.
        let punit = if ph.features & RBD_FEATURE_STRIPINGV2 != 0 {
            let b = pio
                .exec_read(&header_oid(&pid), RBD, "get_stripe_unit_count", &[])
                .await
                .map_err(|e| e.context(format!("reading the striping of {parent}")))?;
            cls::stripe_out(&b)?.0
        } else {
            1u64 << ph.order
        };
        let stripe_unit = match opts.stripe_unit {
            Some(unit) => Some(unit),
            None if super::header::plain_layout(punit, 1, opts.order) => Some(punit),
            None => {
                let os = 1u64 << opts.order;
                return invalid(format!(
                    "cannot clone {parent} into {child} with object size {os}: the child takes \
                     the parent's stripe unit {punit}, which is not a factor of it (rbd clone \
                     refuses it too); --stripe-unit {os} --stripe-count 1 makes it unstriped"
                ));
            }
        };
        let cid = self
            .create_with_id(
                child,
                &CreateOptions {
                    size,
                    order: opts.order,
                    features: opts.features,
                    data_pool: opts.data_pool.clone(),
                    stripe_unit,
                },
            )
            .await?;
        let chdr = header_oid(&cid);
        let pspec = cls::ParentSpec {
            pool_id: pio.pool_id(),
            namespace: parent.namespace.clone(),
            image_id: pid.clone(),
            snap_id,
        };
        let cspec = cls::ChildSpec {
            pool_id: cio.pool_id(),
            namespace: child.namespace.clone(),
            image_id: cid.clone(),
        };
        let linked = std::sync::atomic::AtomicBool::new(false);
        let r = async {
            match cio
                .exec_write(
                    &chdr,
                    RBD,
                    "parent_attach",
                    &cls::parent_attach_in(&pspec, size, false),
                )
                .await
            {
                Ok(()) => {}
                Err(e) if errno_of(&e) == Some(libc::EOPNOTSUPP) && pspec.namespace.is_empty() => {
                    cio.exec_write(&chdr, RBD, "set_parent", &cls::set_parent_in(&pspec, size))
                        .await?
                }
                Err(e) => return Err(e),
            }
            if format == 2 {
                let f = cls::OP_FEATURE_CLONE_CHILD;
                cio.exec_write(
                    &chdr,
                    RBD,
                    "op_features_set",
                    &cls::op_features_set_in(f, f),
                )
                .await?;
                pio.exec_write(
                    &phdr,
                    RBD,
                    "child_attach",
                    &cls::child_attach_in(snap_id, &cspec),
                )
                .await?;
                linked.store(true, std::sync::atomic::Ordering::SeqCst);
            } else {
                cio.exec_write(
                    RBD_CHILDREN,
                    RBD,
                    "add_child",
                    &cls::v1_child_in(&pspec, Some(&cid)),
                )
                .await?;
                linked.store(true, std::sync::atomic::Ordering::SeqCst);
                // Unprotected meanwhile: librbd re-checks after recording the child.
                if !protected().await? {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!("snapshot {parent} was unprotected during the clone"),
                    ));
                }
            }
            // The parent's image-meta, as librbd's CloneRequest copies it.
            let mut start = String::new();
            loop {
                let b = match pio
                    .exec_read(&phdr, RBD, "metadata_list", &cls::list_in(&start, 64))
                    .await
                {
                    Ok(b) => b,
                    Err(e) if e.kind == ErrorKind::NotFound => break,
                    Err(e) => return Err(e),
                };
                let page = cls::metadata_list_out(&b)?;
                if page.is_empty() {
                    break;
                }
                let mut e = cls::Enc::new();
                e.u32(page.len() as u32);
                for (k, v) in &page {
                    e.str(k).bytes(v);
                }
                cio.exec_write(&chdr, RBD, "metadata_set", &e.done())
                    .await?;
                start = page[page.len() - 1].0.clone();
                if page.len() < 64 {
                    break;
                }
            }
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = r {
            if linked.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = if format == 2 {
                    pio.exec_write(
                        &phdr,
                        RBD,
                        "child_detach",
                        &cls::child_attach_in(snap_id, &cspec),
                    )
                    .await
                } else {
                    cio.exec_write(
                        RBD_CHILDREN,
                        RBD,
                        "remove_child",
                        &cls::v1_child_in(&pspec, Some(&cid)),
                    )
                    .await
                };
            }
            let _ = self.remove_image(child).await;
            return Err(e.context(format!("cloning {parent} into {child}")));
        }
        tracing::info!(parent = %parent, child = %child, id = %cid, format = format, "cloned");
        Ok(())
    }

    /// `rbd children` (librbd's api::Image::list_descendants): the clones of one
    /// snapshot, or of every snapshot (trash-namespace ones included: a removed snapshot
    /// that clones still use) when `parent` names none; with `descendants`, the clones of
    /// every snapshot of each clone found, all the way down. Clones in the trash are
    /// listed with `trash` set.
    async fn children_impl(
        &self,
        parent: &ImageSpec,
        snap_id: Option<u64>,
        descendants: bool,
    ) -> Result<Vec<ChildImage>> {
        let ctx = |e: Error| e.context(format!("listing children of {parent}"));
        let pio = self.pool(&parent.pool, &parent.namespace).await?;
        let pid = self.image_id(&pio, parent).await?;
        // The snapshot's id from the header alone, not as an open reads it: librbd lists
        // the clones of images rados-nbd would not serve (fancy striping, journaling).
        let snaps = match (&parent.snap, snap_id) {
            (_, Some(want)) => {
                // Any namespace (user, trash, group, mirror), as librbd's snap_set_by_id.
                if !snapshot_ids(&pio, &pid).await.map_err(ctx)?.contains(&want) {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!("snapshot id {want} of {parent} not found"),
                    ));
                }
                vec![want]
            }
            (Some(name), None) => vec![user_snap_id(&pio, &pid, name)
                .await
                .map_err(ctx)?
                .ok_or_else(|| {
                    Error::new(ErrorKind::NotFound, format!("snapshot {parent} not found"))
                })?],
            (None, None) => snapshot_ids(&pio, &pid).await.map_err(ctx)?,
        };
        let mut todo = vec![(pio, pid, snaps)];
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        while let Some((io, id, snaps)) = todo.pop() {
            for snap in snaps {
                for (cio, cid) in self.clones_of(&io, &id, snap).await.map_err(ctx)? {
                    let key = (cio.pool_id(), cio.namespace().to_string(), cid.clone());
                    if !seen.insert(key) {
                        continue;
                    }
                    // librbd's list_descendants counts an image the trash holds only on
                    // its way to removal as not in the trash.
                    let (name, source) = name_by_id(&cio, &cid).await.map_err(ctx)?;
                    let trash = source.is_some_and(|s| s != cls::TRASH_SOURCE_REMOVING);
                    out.push(ChildImage {
                        spec: ImageSpec {
                            pool: cio.pool().to_string(),
                            namespace: cio.namespace().to_string(),
                            name,
                            snap: None,
                        },
                        id: cid.clone(),
                        trash,
                    });
                    if descendants {
                        // A child whose header is gone has nothing below it (librbd:
                        // an open that finds no image lists nothing).
                        match snapshot_ids(&cio, &cid).await {
                            Ok(s) => todo.push((cio, cid, s)),
                            Err(e) if e.kind == ErrorKind::NotFound => {}
                            Err(e) => return Err(ctx(e)),
                        }
                    }
                }
            }
        }
        ChildImage::sort_dedup(&mut out);
        Ok(out)
    }

    /// The clones of snapshot `snap` of image `id` (in `io`), each as (its pool and
    /// namespace, its id): format 2 from the image's `children_list`, format 1 from
    /// `rbd_children` in every pool that is no cache tier (in the parent's namespace:
    /// format 1 does not cross namespaces). Pools this client may not read are skipped
    /// (librbd fails the listing there; a client with caps on some pools only would
    /// list nothing).
    async fn clones_of(
        &self,
        io: &Arc<IoCtx>,
        id: &str,
        snap: u64,
    ) -> Result<Vec<(Arc<IoCtx>, String)>> {
        let mut out = Vec::new();
        match io
            .exec_read(&header_oid(id), RBD, "children_list", &cls::snap_in(snap))
            .await
        {
            Ok(b) => {
                for c in cls::children_list_out(&b)? {
                    let pool = self.rados.pool_name(c.pool_id)?;
                    out.push((self.rados.ioctx_in(&pool, &c.namespace)?, c.image_id));
                }
            }
            Err(e) if e.kind == ErrorKind::NotFound => {}
            Err(e) if errno_of(&e) == Some(libc::EOPNOTSUPP) => {}
            Err(e) => return Err(e),
        }
        let pspec = cls::ParentSpec {
            pool_id: io.pool_id(),
            namespace: String::new(),
            image_id: id.to_string(),
            snap_id: snap,
        };
        for pool in self.rados.pool_names()? {
            let Ok(cio) = self.rados.ioctx_in(&pool, io.namespace()) else {
                continue;
            };
            if self.rados.is_cache_tier(cio.pool_id()).unwrap_or(false) {
                continue;
            }
            let ids = match cio
                .exec_read(
                    RBD_CHILDREN,
                    RBD,
                    "get_children",
                    &cls::v1_child_in(&pspec, None),
                )
                .await
            {
                Ok(b) => cls::string_set_out(&b, "rbd.get_children reply")?,
                Err(e)
                    if e.kind == ErrorKind::NotFound
                        || matches!(errno_of(&e), Some(libc::EPERM | libc::EACCES)) =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
            out.extend(ids.into_iter().map(|id| (cio.clone(), id)));
        }
        Ok(out)
    }
}

/// The id of image `id`'s user snapshot `name`, if it has one.
async fn user_snap_id(io: &IoCtx, id: &str, name: &str) -> Result<Option<u64>> {
    for sid in snapshot_ids(io, id).await? {
        let b = io
            .exec_read(&header_oid(id), RBD, "snapshot_get", &cls::snap_in(sid))
            .await?;
        let info = cls::snapshot_get_out(&b)?;
        if info.name == name && info.namespace == crate::store::SnapNamespace::User {
            return Ok(Some(sid));
        }
    }
    Ok(None)
}

/// Every snapshot id of image `id` (every namespace), from its snapshot context.
async fn snapshot_ids(io: &IoCtx, id: &str) -> Result<Vec<u64>> {
    let b = io
        .exec_read(&header_oid(id), RBD, "get_snapcontext", &[])
        .await?;
    Ok(cls::get_snapcontext_out(&b)?.1)
}

/// librbd's object in a data pool that says partial overwrites work there.
const RBD_INFO: &str = "rbd_info";

/// Opens image `id` (named `spec`) through `meta`, its pool and namespace: the common
/// part of `open_image` and of opening a clone's parent (by id, as librbd does, so a
/// renamed parent still opens).
pub(super) async fn open_by_id(
    meta: Arc<IoCtx>,
    spec: &ImageSpec,
    id: String,
    mode: OpenMode,
    knobs: OpenKnobs,
    luks_noted: Arc<Mutex<std::collections::HashSet<String>>>,
) -> Result<CephImage> {
    open_by_id_at(meta, spec, id, None, mode, knobs, luks_noted).await
}

/// How an open behaves beyond its mode: `--allow-encrypted`, `--wait-for-lock`.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct OpenKnobs {
    pub(super) allow_encrypted: bool,
    /// What to do when a live client holds the lock.
    pub(super) lock_at_open: crate::store::LockAtOpen,
}

/// [`open_by_id`] at the snapshot with id `snap_id` (`spec.snap` its name), whatever its
/// namespace: a clone's parent.
pub(super) async fn open_by_id_at(
    meta: Arc<IoCtx>,
    spec: &ImageSpec,
    id: String,
    snap_id: Option<u64>,
    mode: OpenMode,
    knobs: OpenKnobs,
    luks_noted: Arc<Mutex<std::collections::HashSet<String>>>,
) -> Result<CephImage> {
    let (header, snap_id) = load_header_at(&meta, spec, &id, mode, snap_id).await?;
    let data_home = data_home_of(&meta, spec, &id, &header).await?;
    // Data objects get their own handle: it carries the snapshot context (writes) or
    // reads at the mapped snapshot.
    let data = match snap_id {
        Some(s) => data_home.at_snap(s)?,
        None => meta
            .cluster()
            .ioctx_in(data_home.pool(), data_home.namespace())?,
    };
    if snap_id.is_none() {
        let ids: Vec<u64> = header.snaps.iter().map(|s| s.id).collect();
        data.set_snap_write_ctx(header.snap_seq, &ids)?;
    }
    // Writes to an object merge behind the one in flight unless librbd's option says
    // none; a mapped snapshot writes nothing.
    let merge_on = snap_id.is_none() && io_scheduler(&meta, &header_oid(&id)).await != "none";
    // The image, for the check below: set once it exists (it owns the merger).
    let image: Arc<std::sync::OnceLock<std::sync::Weak<Inner>>> = Default::default();
    let merge = {
        let (data, prefix, osize, image) = (
            data.clone(),
            header.object_prefix.clone(),
            header.object_size(),
            image.clone(),
        );
        Merger::new(
            merge_on,
            Box::new(move |objno, extents| {
                // Checked again as it goes: a write held behind another was checked
                // when it came, and the lock may have been lost or handed over since.
                if let Some(i) = image.get().and_then(std::sync::Weak::upgrade) {
                    i.check_kept()?;
                }
                let oid = data_object_name(&prefix, objno);
                Ok(Box::pin(start_write(&data, &oid, extents, osize)?) as Pending)
            }),
        )
    };
    let timestamps = super::timestamps::Timestamps::new(meta.clone(), header_oid(&id));
    let inner = Arc::new(Inner {
        meta,
        data,
        data_home,
        object_prefix: header.object_prefix.clone(),
        spec: spec.clone(),
        hdr_oid: header_oid(&id),
        id,
        snap_id,
        mode,
        allow_encrypted: knobs.allow_encrypted,
        luks_noted,
        header: RwLock::new(header),
        snap_ios: Mutex::new(HashMap::new()),
        lock: tokio::sync::Mutex::new(None),
        lost_lock: AtomicBool::new(false),
        reacquiring: AtomicBool::new(false),
        reacquired: tokio::sync::Notify::new(),
        hands_over: AtomicBool::new(false),
        // Not ours until `acquire_lock` takes it.
        released: AtomicBool::new(mode != OpenMode::ReadOnly),
        lock_freed: tokio::sync::Notify::new(),
        owner_tx: Mutex::new(None),
        owner_pending: Mutex::new(std::collections::HashSet::new()),
        owner_done: Mutex::new(std::collections::VecDeque::new()),
        quiesce: Default::default(),
        header_updates: tokio::sync::watch::Sender::new(0),
        updates_announced: AtomicU64::new(0),
        updates_applied: AtomicU64::new(0),
        refreshing: tokio::sync::Mutex::new(()),
        closed: AtomicBool::new(false),
        merge,
        timestamps,
    });
    let _ = image.set(Arc::downgrade(&inner));
    if mode == OpenMode::ReadOnly {
        return Ok(CephImage { inner });
    }
    acquire_lock(&inner, knobs.lock_at_open).await?;
    let released = inner.released.load(std::sync::atomic::Ordering::SeqCst);
    let img = CephImage { inner };
    if !released {
        // The header above was read before the lock was ours: an owner we asked, or
        // waited for, may have changed it meanwhile (a snapshot, whose context our writes
        // must carry; the flag it cleared when it handed over; the size). Read it again.
        if let Err(e) = refresh(&img.inner).await {
            let _ = crate::store::ImageStore::close(&img).await;
            return Err(e.context(format!("re-reading the header of {spec} under the lock")));
        }
    }
    Ok(img)
}

/// Where the data objects of image `id` (header `h`, read through `meta`) live: `meta`'s
/// pool, or with the data-pool feature the pool `get_data_pool` names, in the image's
/// namespace (librbd's `data_ctx`).
pub(super) async fn data_home_of(
    meta: &Arc<IoCtx>,
    spec: &ImageSpec,
    id: &str,
    h: &crate::store::ImageHeader,
) -> Result<Arc<IoCtx>> {
    if h.features & RBD_FEATURE_DATA_POOL == 0 {
        return Ok(meta.clone());
    }
    let ctx = |e: Error| e.context(format!("finding the data pool of image {spec}"));
    let b = meta
        .exec_read(&header_oid(id), RBD, "get_data_pool", &[])
        .await
        .map_err(ctx)?;
    let pool_id = cls::data_pool_out(&b).map_err(ctx)?;
    if pool_id < 0 {
        return Ok(meta.clone());
    }
    let pool = meta.cluster().pool_name(pool_id).map_err(ctx)?;
    meta.cluster()
        .ioctx_in(&pool, meta.namespace())
        .map_err(|e| ctx(e.context(format!("data pool {pool} (id {pool_id})"))))
}

/// Refuses with `Busy` while a client has the image's header watched (open): asked by a
/// header-update notification, whose acks name the watchers.
async fn check_unwatched(io: &IoCtx, hdr: &str, spec: &ImageSpec) -> Result<()> {
    let watchers = io
        .notify(hdr, &cls::header_update_notify(), NOTIFY_TIMEOUT_MS)
        .await
        .map_err(|e| e.context(format!("removing image {spec}")))?;
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
    Ok(())
}

/// Whether every snapshot in `snaps` is in the trash namespace (kept for clones).
async fn all_trashed(io: &IoCtx, hdr: &str, snaps: &[u64]) -> Result<bool> {
    for &id in snaps {
        let b = io
            .exec_read(hdr, RBD, "snapshot_get", &cls::snap_in(id))
            .await?;
        let info = cls::snapshot_get_out(&b)?;
        if !matches!(info.namespace, crate::store::SnapNamespace::Trash { .. }) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// librbd's `rbd_default_clone_format` (CloneRequest) as `rbd clone` resolves it: the
/// pool's own setting (`rbd config pool set`) over everything, since librbd applies a pool's
/// settings over the client's configuration, command line included (seen: with the pool
/// at 1, `rbd clone --rbd-default-clone-format 2` of an unprotected snapshot is refused);
/// then `requested` (our `--rbd-default-clone-format`: 1 or 2, 0 for auto or not given);
/// then this client's setting (ceph.conf, CEPH_ARGS, the monitors' database); else
/// `auto`. `auto` is format 2 only when the cluster lets no client older than Mimic in
/// (the larger of the OSD map's minimum and `require_min_compat_client`), since older
/// clients cannot open a format-2 clone, and format 1 otherwise. Other values are 2, as in
/// librbd. Also whether the pool's setting decided it.
async fn clone_format(io: &IoCtx, requested: u8) -> Result<(u8, bool)> {
    const OPT: &str = "rbd_default_clone_format";
    const MIMIC: i8 = 13;
    let pool = pool_config(io, OPT).await;
    let from_pool = pool.is_some();
    let v = match pool {
        Some(v) => v,
        None if requested != 0 => requested.to_string(),
        None => io.cluster().conf_get(OPT).unwrap_or_else(|| "auto".into()),
    };
    let format = match v.as_str() {
        "1" => 1,
        "auto" if io.cluster().min_compatible_client()? < MIMIC => 1,
        _ => 2,
    };
    Ok((format, from_pool))
}

/// librbd's `rbd_move_parent_to_trash_on_remove` as librbd resolves it: the pool's own
/// setting (`rbd config pool set`: `conf_<option>` in the pool's `rbd_info` metadata)
/// over this client's configuration (ceph.conf, CEPH_ARGS, the monitors' database).
async fn move_parent_to_trash_on_remove(io: &IoCtx) -> bool {
    const OPT: &str = "rbd_move_parent_to_trash_on_remove";
    match pool_config(io, OPT).await.as_deref() {
        Some("true") => return true,
        Some("false") => return false,
        _ => {}
    }
    io.cluster().conf_bool(OPT).unwrap_or(false)
}

/// A librbd option as librbd resolves it for an image of `io`'s pool: the pool's own
/// setting, else this client's configuration (ceph.conf, CEPH_ARGS, the monitors'
/// database).
async fn configured(io: &IoCtx, opt: &str) -> Option<String> {
    match pool_config(io, opt).await {
        Some(v) => Some(v),
        None => io.cluster().conf_get(opt),
    }
}

/// A pool's own setting of a librbd option (`rbd config pool set`: `conf_<option>` in the
/// pool's `rbd_info` metadata), if it has one.
async fn pool_config(io: &IoCtx, opt: &str) -> Option<String> {
    let pool = io.cluster().ioctx_in(io.pool(), "").ok()?;
    let b = pool
        .exec_read(
            "rbd_info",
            RBD,
            "metadata_get",
            &cls::string_in(&format!("conf_{opt}")),
        )
        .await
        .ok()?;
    cls::string_out(&b, "rbd.metadata_get reply").ok()
}

/// A librbd option for an image, resolved as librbd resolves its options: the image's own
/// setting (`rbd config image set`: `conf_<option>` in its metadata), then the pool's
/// (`rbd config pool set`), then this client's configuration.
pub(super) async fn image_option(meta: &IoCtx, hdr_oid: &str, opt: &str) -> Option<String> {
    let key = cls::string_in(&format!("conf_{opt}"));
    if let Ok(b) = meta.exec_read(hdr_oid, RBD, "metadata_get", &key).await {
        if let Ok(v) = cls::string_out(&b, "rbd.metadata_get reply") {
            return Some(v);
        }
    }
    configured(meta, opt).await
}

/// librbd's `rbd_io_scheduler` for an image ([`image_option`]); "simple" by default.
async fn io_scheduler(meta: &IoCtx, hdr_oid: &str) -> String {
    image_option(meta, hdr_oid, "rbd_io_scheduler")
        .await
        .unwrap_or_else(|| "simple".into())
}

/// Seconds and nanoseconds since the epoch, as a utime_t.
fn utime_now() -> (u32, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as u32, d.subsec_nanos())
}

/// librbd's trash::MoveRequest: the trash entry first, then the name goes (the
/// `rbd_id.<name>` object and the directory entry); the image itself, by id, stays whole.
async fn trash_move(io: &IoCtx, spec: &ImageSpec, id: &str, source: u8) -> Result<()> {
    let now = utime_now();
    // MOVING until the name is gone, as librbd's MoveRequest: a NORMAL USER_PARENT entry
    // may be removed with the image's last clone, which must never happen to an image
    // that still has its name.
    let entry = cls::TrashSpec {
        source,
        name: spec.name.clone(),
        deletion: now,
        deferment_end: now,
        state: cls::TRASH_STATE_MOVING,
    };
    io.exec_write(RBD_TRASH, RBD, "trash_add", &cls::trash_add_in(id, &entry))
        .await?;
    let unname = async {
        io.remove(&format!("rbd_id.{}", spec.name)).await?;
        match io
            .exec_write(
                RBD_DIRECTORY,
                RBD,
                "dir_remove_image",
                &cls::dir_image_in(&spec.name, id),
            )
            .await
        {
            Err(e) if e.kind != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
    .await;
    if let Err(e) = unname {
        // Named still (or half): the entry goes, the image stays where it was.
        let _ = io
            .exec_write(RBD_TRASH, RBD, "trash_remove", &cls::string_in(id))
            .await;
        return Err(e);
    }
    io.exec_write(
        RBD_TRASH,
        RBD,
        "trash_state_set",
        &cls::trash_state_set_in(id, cls::TRASH_STATE_NORMAL, cls::TRASH_STATE_MOVING),
    )
    .await?;
    tracing::info!("moved {spec} (id {id}) to the trash until its last clone goes");
    Ok(())
}

/// What an image is besides its name: a clone first lets its parent forget it (librbd's
/// RemoveRequest detaches the child, else the parent keeps counting a clone that is gone:
/// `rbd children` fails on it, the snapshot cannot be unprotected, and one in the trash
/// is never removed), then its data objects, its object map, its header. The caller
/// checked that it has no snapshots and no watchers.
async fn remove_by_id(
    io: &Arc<IoCtx>,
    spec: &ImageSpec,
    id: &str,
    knobs: OpenKnobs,
    luks_noted: Arc<Mutex<std::collections::HashSet<String>>>,
) -> Result<()> {
    let header = load_header(io, spec, id, OpenMode::ReadOnly)
        .await
        .ok()
        .map(|(h, _)| h);
    if let Some(h) = &header {
        if h.parent.is_some() {
            let img = open_by_id(
                io.clone(),
                spec,
                id.to_string(),
                OpenMode::ReadWrite,
                knobs,
                luks_noted,
            )
            .await?;
            let r = img.detach_parent().await;
            let c = crate::store::ImageStore::close(&img).await;
            r.and(c)?;
        }
    }
    // The data objects, in the data pool if the image has one.
    let (data, prefix) = match &header {
        Some(h) => (
            data_home_of(io, spec, id, h).await?,
            h.object_prefix.clone(),
        ),
        None => (io.clone(), format!("rbd_data.{id}")),
    };
    let names = data.list_objects(&format!("{prefix}.")).await?;
    for_each_parallel(names, |name| {
        let io = data.clone();
        async move { io.remove(&name).await.map(|_| ()) }
    })
    .await?;
    io.remove(&object_map_oid(id, None)).await?;
    io.remove(&header_oid(id)).await?;
    Ok(())
}

/// librbd's DetachChildRequest after the parent's trashed snapshot went, then
/// trash::RemoveRequest: a parent image with no snapshot left, in the trash as
/// USER_PARENT (waiting for its last clone), state NORMAL, its deferment over, is marked
/// REMOVING, removed as `rm` removes an image, and its trash entry dropped. Ok(false):
/// not such a parent. On a failure the entry goes back to NORMAL, as librbd's does.
pub(super) async fn remove_trashed_parent(
    cluster: &Arc<Rados>,
    p: &ParentInfo,
    allow_encrypted: bool,
    luks_noted: Arc<Mutex<std::collections::HashSet<String>>>,
) -> Result<bool> {
    let io = cluster.ioctx_in(&p.spec.pool, &p.spec.namespace)?;
    let spec = ImageSpec {
        snap: None,
        ..p.spec.clone()
    };
    let id = &p.image_id;
    let hdr = header_oid(id);
    let b = match io.exec_read(&hdr, RBD, "get_snapcontext", &[]).await {
        Ok(b) => b,
        Err(e) if e.kind == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if !cls::get_snapcontext_out(&b)?.1.is_empty() {
        return Ok(false);
    }
    let t = match io
        .exec_read(RBD_TRASH, RBD, "trash_get", &cls::string_in(id))
        .await
    {
        Ok(b) => cls::trash_get_out(&b)?,
        Err(e) if e.kind == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if t.source != cls::TRASH_SOURCE_USER_PARENT
        || t.state != cls::TRASH_STATE_NORMAL
        || t.deferment_end > utime_now()
    {
        return Ok(false);
    }
    let set_state = |state, expect| cls::trash_state_set_in(id, state, expect);
    io.exec_write(
        RBD_TRASH,
        RBD,
        "trash_state_set",
        &set_state(cls::TRASH_STATE_REMOVING, cls::TRASH_STATE_NORMAL),
    )
    .await?;
    let knobs = OpenKnobs {
        allow_encrypted,
        // Somebody else's image: never take its lock from a live owner.
        lock_at_open: crate::store::LockAtOpen::Refuse,
    };
    let r = match check_unwatched(&io, &hdr, &spec).await {
        Ok(()) => remove_by_id(&io, &spec, id, knobs, luks_noted).await,
        Err(e) => Err(e),
    };
    if let Err(e) = r {
        let _ = io
            .exec_write(
                RBD_TRASH,
                RBD,
                "trash_state_set",
                &set_state(cls::TRASH_STATE_NORMAL, cls::TRASH_STATE_REMOVING),
            )
            .await;
        return Err(e);
    }
    io.exec_write(RBD_TRASH, RBD, "trash_remove", &cls::string_in(id))
        .await?;
    Ok(true)
}

/// Renames image `id` of `io` (pool and namespace) to `dest`, as librbd 16.2's RenameRequest
/// (run by the lock owner, or by the asker holding the lock itself): its current name
/// from the directory (newer librbd reads it there too, so a name another client changed
/// meanwhile is no trouble), refused when `dest` is taken in either image format
/// (Operations::rename); then the id object's bytes under the new name (created
/// exclusively, so a racing create of that name loses), the directory (one cls call,
/// which checks the old name still maps to this id), and last the old id object.
pub(super) async fn rename_image(io: &IoCtx, id: &str, dest: &str) -> Result<()> {
    let pool = crate::spec::pool_spec(io.pool(), io.namespace());
    let name = match directory_name(io, id).await {
        Ok(Some(n)) => n,
        Ok(None) => {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("cannot rename image {id} of {pool}: it has no name in the pool's directory (in the trash?)"),
            ))
        }
        Err(e) => return Err(e.context(format!("renaming image {id} of {pool}"))),
    };
    let what = format!("{pool}/{name}");
    let ctx = |e: Error| e.context(format!("renaming image {what} to {dest}"));
    let exists = || {
        Error::new(
            ErrorKind::AlreadyExists,
            format!("cannot rename {what}: image {pool}/{dest} already exists"),
        )
    };
    for oid in [format!("rbd_id.{dest}"), format!("{dest}.rbd")] {
        if io.stat(&oid).await.map_err(ctx)?.is_some() {
            return Err(exists());
        }
    }
    let src_oid = format!("rbd_id.{name}");
    let Some(id_bytes) = io.read(&src_oid, 0, 4096).await.map_err(ctx)? else {
        return Err(ctx(Error::new(
            ErrorKind::NotFound,
            format!("{src_oid} is missing"),
        )));
    };
    let dest_oid = format!("rbd_id.{dest}");
    let mut op = WriteOp::new();
    op.create(true).write_full(&id_bytes);
    match io.operate(&dest_oid, op, "create").await {
        Ok(()) => {}
        Err(e) if e.kind == ErrorKind::AlreadyExists => return Err(exists()),
        Err(e) => return Err(ctx(e)),
    }
    if let Err(e) = io
        .exec_write(
            RBD_DIRECTORY,
            RBD,
            "dir_rename_image",
            &cls::dir_rename_image_in(&name, dest, id),
        )
        .await
    {
        // The new id object goes again (librbd leaves it behind) only when the directory
        // is known to be unchanged: an error such as a timeout may come after the change
        // was made, and the new name must then keep its id object.
        let renamed = directory_name(io, id).await.ok().flatten();
        match renamed.as_deref() {
            Some(n) if n == dest => {
                tracing::warn!(
                    "renaming {what} to {dest}: {e}, but the directory has the new name"
                );
            }
            Some(n) if n == name => {
                let _ = io.remove(&dest_oid).await;
                return Err(ctx(e));
            }
            // Unknown: both id objects stay, so whichever name the directory has opens.
            _ => return Err(ctx(e)),
        }
    }
    // As librbd: a failure here leaves only an id object that no directory entry names.
    if let Err(e) = io.remove(&src_oid).await {
        tracing::warn!("renamed {what} to {dest}, but could not remove {src_oid}: {e}");
    }
    tracing::info!(id = %id, "renamed {what} to {dest}");
    Ok(())
}

/// The name the pool's directory has for image `id` (`dir_get_name`); None when it has none.
async fn directory_name(io: &IoCtx, id: &str) -> Result<Option<String>> {
    match io
        .exec_read(RBD_DIRECTORY, RBD, "dir_get_name", &cls::string_in(id))
        .await
    {
        Ok(b) => cls::string_out(&b, "rbd.dir_get_name reply").map(Some),
        Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// An image's name from its id, as rbd finds it: the pool's directory, else the trash
/// entry's name with the entry's source (the image is in the trash), else the id itself.
pub(super) async fn name_by_id(io: &IoCtx, id: &str) -> Result<(String, Option<u8>)> {
    if let Some(name) = directory_name(io, id).await? {
        return Ok((name, None));
    }
    match io
        .exec_read(RBD_TRASH, RBD, "trash_get", &cls::string_in(id))
        .await
    {
        Ok(b) => {
            let t = cls::trash_get_out(&b)?;
            Ok((t.name, Some(t.source)))
        }
        Err(e) if e.kind == ErrorKind::NotFound => Ok((id.to_string(), None)),
        Err(e) => Err(e),
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
