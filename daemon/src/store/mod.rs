//! Stores hold RBD format-2 images: a header per image and its data objects
//! `rbd_data.<id>.<objno %016x>`, plus `rbd_object_map.<id>[.<snapid %016x>]`.
//!
//! Two implementations: `dir` (the embedded directory store, laid out like a RADOS pool)
//! and `ceph` (librados, feature `ceph`). Stores know nothing of NBD: they speak objects.
//! The image layer (`crate::image`) maps byte ranges to objects and owns the object map.

use crate::error::Result;
use crate::spec::ImageSpec;
use bytes::Bytes;
use objmap::ObjectState;
use std::future::Future;

#[cfg(feature = "ceph")]
pub mod ceph;
pub mod connect;
pub mod dir;
pub mod snapset;
pub mod uri;

pub use connect::{connect, AnyStore, CephAccess, LockAtOpen};
pub use uri::StoreUri;

/// Header flags (Ceph's RBD_FLAG_*).
pub const RBD_FLAG_OBJECT_MAP_INVALID: u64 = 1 << 0;
pub const RBD_FLAG_FAST_DIFF_INVALID: u64 = 1 << 1;

/// Feature bits (Ceph's RBD_FEATURE_*).
pub const RBD_FEATURE_LAYERING: u64 = 1 << 0;
pub const RBD_FEATURE_STRIPINGV2: u64 = 1 << 1;
pub const RBD_FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
pub const RBD_FEATURE_OBJECT_MAP: u64 = 1 << 3;
pub const RBD_FEATURE_FAST_DIFF: u64 = 1 << 4;
pub const RBD_FEATURE_DEEP_FLATTEN: u64 = 1 << 5;
pub const RBD_FEATURE_JOURNALING: u64 = 1 << 6;
pub const RBD_FEATURE_DATA_POOL: u64 = 1 << 7;
pub const RBD_FEATURE_OPERATIONS: u64 = 1 << 8;
pub const RBD_FEATURE_MIGRATING: u64 = 1 << 9;
pub const RBD_FEATURE_NON_PRIMARY: u64 = 1 << 10;
/// What `rados-nbd create` sets by default, like `rbd create` (rbd_default_features 61):
/// layering, exclusive-lock, object-map, fast-diff, deep-flatten (0x3d).
pub const DEFAULT_FEATURES: u64 = RBD_FEATURE_LAYERING
    | RBD_FEATURE_EXCLUSIVE_LOCK
    | RBD_FEATURE_OBJECT_MAP
    | RBD_FEATURE_FAST_DIFF
    | RBD_FEATURE_DEEP_FLATTEN;

/// A request for the lock holder, answered through `done`.
#[derive(Debug)]
pub struct OwnerRequest {
    pub action: OwnerAction,
    /// (objects done, total) as it goes, for the actions that go object by object
    /// (flatten, object map rebuild, sparsify); the others leave it at (0, 0).
    pub progress: tokio::sync::watch::Sender<(u64, u64)>,
    pub done: tokio::sync::oneshot::Sender<Result<()>>,
}

impl OwnerRequest {
    /// A request for `action`, its progress at (0, 0) (`progress.subscribe()` follows it).
    pub fn new(action: OwnerAction, done: tokio::sync::oneshot::Sender<Result<()>>) -> Self {
        OwnerRequest {
            action,
            progress: tokio::sync::watch::Sender::new((0, 0)),
            done,
        }
    }
}

/// What the lock holder is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerAction {
    /// `rbd resize` / `rados-nbd resize`: shrinking needs `allow_shrink`.
    Resize { size: u64, allow_shrink: bool },
    /// `rbd rename` / `rados-nbd rename` of an image in use: the holder renames it (its
    /// pool and namespace stay).
    Rename { new_name: String },
    /// `rados-nbd snap create` of an image in use: taken with new requests held and the
    /// ones in flight finished, so it holds every write acknowledged before it.
    SnapCreate { name: String, quiesce: QuiesceMode },
    /// `rbd snap rm` of an image in use.
    SnapRemove { name: String },
    /// `rbd snap rename`: librbd names the source by its snapshot id.
    SnapRename { snap_id: u64, new_name: String },
    /// `rbd snap protect` / `unprotect`.
    SnapProtect { name: String, protected: bool },
    /// `rbd flatten`.
    Flatten,
    /// `rbd object-map rebuild`: the head's map rebuilt from the objects that exist.
    RebuildObjectMap,
    /// `rbd sparsify`: zero runs of at least `sparse_size` bytes given back to the store,
    /// objects of zeros only removed (outside a clone's parent overlap).
    Sparsify { sparse_size: u64 },
    /// `rbd feature enable|disable FEATURES`.
    UpdateFeatures { features: u64, enabled: bool },
    /// Another client wants the exclusive lock (cooperative hand-over): hold new
    /// requests, finish those in flight, write the map, clear the flag, release.
    ReleaseLock,
    /// A snapshot in another namespace than the users' (Ceph): this image's part of a
    /// group snapshot (`rbd group snap create`), or a mirror snapshot (`rbd mirror image
    /// enable|snapshot`), named `name` in `namespace` (the encoded cls SnapshotNamespace
    /// the asker sent, written as it is). Taken as a user snapshot is (held requests,
    /// its own object map); a quiesce, if any, came before, from the asker.
    NsSnapCreate { name: String, namespace: Vec<u8> },
    /// `rbd group snap rm`, `rbd mirror image disable`, or a trashed snapshot's removal
    /// (Ceph): removes this image's snapshot `name` of the namespace of type
    /// `namespace_type` (cls::rbd::SnapshotNamespaceType: 1 group, 2 trash, 3 mirror).
    NsSnapRemove { name: String, namespace_type: u32 },
    /// The removal of a trashed snapshot (`name`, the UUID it got in the trash; the rest
    /// its namespace's fields) that no clone uses any more, asked of the parent's owner
    /// by whoever removed or flattened its last clone, as librbd's DetachChildRequest
    /// asks. The owner receives it as `NsSnapRemove`.
    TrashSnapRemove {
        name: String,
        original: String,
        original_type: u32,
    },
}

impl OwnerAction {
    /// The request as `rbd` users know it, for messages ("could not snap create s1").
    pub fn describe(&self) -> String {
        match self {
            OwnerAction::Resize { size, .. } => format!("resize to {size} bytes"),
            OwnerAction::SnapCreate { name, .. } => format!("snap create {name}"),
            OwnerAction::SnapRemove { name } => format!("snap rm {name}"),
            OwnerAction::SnapRename { snap_id, new_name } => {
                format!("snap rename (snapshot id {snap_id}) to {new_name}")
            }
            OwnerAction::SnapProtect { name, protected } => {
                format!("snap {}protect {name}", if *protected { "" } else { "un" })
            }
            OwnerAction::Rename { new_name } => format!("rename to {new_name}"),
            OwnerAction::Flatten => "flatten".into(),
            OwnerAction::RebuildObjectMap => "object-map rebuild".into(),
            OwnerAction::Sparsify { sparse_size } => {
                format!("sparsify (runs of {sparse_size} bytes)")
            }
            OwnerAction::UpdateFeatures { features, enabled } => format!(
                "feature {} {features:#x}",
                if *enabled { "enable" } else { "disable" }
            ),
            OwnerAction::ReleaseLock => "hand the lock over".into(),
            OwnerAction::NsSnapCreate { name, .. } => format!("snap create {name}"),
            OwnerAction::NsSnapRemove { name, .. } => format!("snap rm {name}"),
            OwnerAction::TrashSnapRemove { name, original, .. } => {
                format!("remove trashed snapshot {name} (was {original})")
            }
        }
    }
}

/// Whether a snapshot asked of the lock holder runs the `--quiesce` hook around it
/// (`rbd snap create --skip-quiesce` / `--ignore-quiesce-error`). Without `--quiesce` the
/// holder has no hook and each is the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuiesceMode {
    /// Quiesce first; a failed quiesce fails the snapshot.
    #[default]
    Run,
    /// No quiesce (the caller did it, or was asked not to).
    Skip,
    /// Quiesce first; take the snapshot even when that failed.
    IgnoreError,
}

/// An image's op features (RBD_OPERATION_FEATURE_*), timestamps, in seconds since the
/// epoch (`None`: the store keeps none, or an OSD too old to know it), and striping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageDetails {
    pub op_features: u64,
    pub create_timestamp: Option<u64>,
    pub access_timestamp: Option<u64>,
    pub modify_timestamp: Option<u64>,
    /// (stripe unit, stripe count) of an image with the striping feature.
    pub stripe: Option<(u64, u64)>,
    /// Who holds the image's lock (`rbd lock ls`, `rbd ls -l`'s LOCK): Some(true) an
    /// exclusive holder, Some(false) shared ones; None when nobody does or the store
    /// does not say.
    pub locked: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapInfo {
    pub id: u64,
    pub name: String,
    pub size: u64,
    /// `rbd snap protect`: a format-1 clone may be made of it, and it cannot be removed.
    pub protected: bool,
    /// When it was taken (seconds since the epoch), when the store records it.
    pub timestamp: Option<u64>,
    /// Whose it is. Only user snapshots are named by users (`IMAGE@SNAP`, `snap ls`,
    /// `du`); the others (a removed snapshot that clones still use, in the trash) are
    /// still snapshots of the data: snapshot contexts and map histories include them.
    pub namespace: SnapNamespace,
}

/// A snapshot's namespace (cls::rbd::SnapshotNamespace).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SnapNamespace {
    #[default]
    User,
    /// `rbd snap rm` of a snapshot that format-2 clones still use: kept, renamed to a
    /// UUID, until the last clone is gone. `original` is the name it had, `original_type`
    /// its namespace's type then (cls::rbd::SnapshotNamespaceType; 0 user).
    Trash {
        original: String,
        original_type: u32,
    },
    /// An image's part of a group snapshot (`rbd group snap create`): the group's pool
    /// (by id), the group's id and the group snapshot's id, which
    /// [`ImageStore::group_snap_names`] resolves.
    Group {
        pool: i64,
        group_id: String,
        snap_id: String,
    },
    /// A mirror snapshot (`rbd mirror image snapshot`, or the first one `rbd mirror image
    /// enable IMG snapshot` takes): cls::rbd::MirrorSnapshotNamespace's fields that
    /// `rbd snap ls --all` shows.
    Mirror(MirrorSnap),
    /// A type we do not know.
    Other(u32),
}

impl SnapNamespace {
    /// The trash's type number (cls::rbd::SnapshotNamespaceType).
    pub const TRASH_TYPE: u32 = 2;

    /// Its type number (cls::rbd::SnapshotNamespaceType): 0 user, 1 group, 2 trash,
    /// 3 mirror.
    pub fn type_code(&self) -> u32 {
        match self {
            SnapNamespace::User => 0,
            SnapNamespace::Group { .. } => 1,
            SnapNamespace::Trash { .. } => Self::TRASH_TYPE,
            SnapNamespace::Mirror(_) => 3,
            SnapNamespace::Other(t) => *t,
        }
    }
}

/// A mirror snapshot's namespace (cls::rbd::MirrorSnapshotNamespace).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirrorSnap {
    /// 0 primary, 1 primary (demoted), 2 non-primary, 3 non-primary (demoted).
    pub state: u8,
    pub complete: bool,
    /// Sorted, as the std::set they come from.
    pub peer_uuids: Vec<String>,
    pub primary_mirror_uuid: String,
    pub primary_snap_id: u64,
    pub last_copied_object_number: u64,
}

impl MirrorSnap {
    /// rbd's word for the state.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            0 => "primary",
            2 => "non-primary",
            _ => "demoted",
        }
    }

    pub fn non_primary(&self) -> bool {
        self.state >= 2
    }
}

/// What `remove_image` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Removed,
    /// Moved to the trash, where it waits for the last clone of its snapshots.
    Trashed,
}

/// What `rbd snap ls --all` shows of a group snapshot: the group's pool, the group and
/// the group snapshot, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSnapNames {
    pub pool: String,
    pub group: String,
    pub snap: String,
}

impl SnapInfo {
    /// A snapshot users name (user namespace).
    pub fn is_user(&self) -> bool {
        self.namespace == SnapNamespace::User
    }
}

impl ImageHeader {
    /// The user snapshot called `name` (what `IMAGE@name` means, as for librbd).
    pub fn user_snap(&self, name: &str) -> Option<&SnapInfo> {
        self.snaps.iter().find(|s| s.is_user() && s.name == name)
    }
}

/// The parent of a clone: where reads of objects the clone lacks go (`rbd info`'s
/// `parent:` and `overlap:` lines). Bytes `[0, overlap)` of the clone are backed by the
/// parent's snapshot; past the overlap, objects the clone lacks read as zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentInfo {
    /// The parent image and its snapshot (`spec.snap` is the snapshot's name) as names,
    /// resolved by the store from the ids the header holds.
    pub spec: ImageSpec,
    pub image_id: String,
    pub snap_id: u64,
    pub overlap: u64,
    /// The parent image is in the trash (Ceph: `spec`'s name is its trash entry's; it is
    /// opened by id), as `rbd info` shows it: `parent: POOL/NAME@SNAP (trash ID)`.
    pub in_trash: bool,
}

/// What a copy-up applies on top of the parent's data (see [`ImageStore::copyup`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectWrite {
    /// Nothing: copy-on-read, or flatten.
    None,
    Write {
        off: u64,
        data: Bytes,
    },
    /// Zeroes inside the object (deallocating where possible).
    Zero {
        off: u64,
        len: u64,
    },
    /// Cuts the object to `len` bytes (a discard to the object's end; 0 keeps an empty
    /// object that hides the parent's data).
    Truncate {
        len: u64,
    },
}

/// See [`Store::create_defaults`]: each `None` where nothing is configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateDefaults {
    /// A number or a comma-separated list of feature names, as librbd reads it.
    pub features: Option<String>,
    pub order: Option<String>,
    pub data_pool: Option<String>,
    /// `rbd_default_stripe_unit` and `_count`: anything but 0 (or the object size, or 1)
    /// asks for striping v2.
    pub stripe_unit: Option<String>,
    pub stripe_count: Option<String>,
}

/// How `clone` makes a child (see [`Store::clone_image`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneOptions {
    /// 1: the parent snapshot must be protected and the child is recorded in
    /// `rbd_children`; 2: no protection needed, the child is recorded in the parent's
    /// header (`rbd clone --rbd-default-clone-format`); 0: as the store is configured
    /// (Ceph: librbd's `rbd_default_clone_format` and its `auto`; the directory store: 2).
    pub clone_format: u8,
    pub features: u64,
    pub order: u8,
    /// Ceph: the child's data objects in this pool (`rbd clone --data-pool`); a clone
    /// does not inherit its parent's.
    pub data_pool: Option<String>,
    /// `rbd clone --stripe-unit` (with stripe count 1): None takes the parent's, as
    /// librbd's clone does where it divides the child's object size.
    pub stripe_unit: Option<u64>,
}

/// What an image's header says (`rbd_header.<id>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHeader {
    pub id: String,
    pub size: u64,
    /// log2 of the object size (22 = 4 MiB).
    pub order: u8,
    /// `rbd_data.<id>`
    pub object_prefix: String,
    pub features: u64,
    pub flags: u64,
    pub snap_seq: u64,
    /// Newest first, as in a snapshot context.
    pub snaps: Vec<SnapInfo>,
    /// `Some` for a clone (for a handle opened at a snapshot: the parent that snapshot
    /// had).
    pub parent: Option<ParentInfo>,
}

impl ImageHeader {
    pub fn object_size(&self) -> u64 {
        1u64 << self.order
    }
    pub fn object_count(&self) -> u64 {
        self.size.div_ceil(self.object_size())
    }
    pub fn object_name(&self, objno: u64) -> String {
        format!("{}.{:016x}", self.object_prefix, objno)
    }
}

/// One image `children` lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildImage {
    /// Without a snapshot.
    pub spec: ImageSpec,
    pub id: String,
    /// In the pool's trash (`rbd trash mv`): `children` shows it only with `--all`.
    pub trash: bool,
}

impl ChildImage {
    /// rbd's order (librbd's list_descendants sorts so): pool, namespace, name; an image
    /// listed twice once.
    pub fn sort_dedup(v: &mut Vec<ChildImage>) {
        v.sort_by(|a, b| {
            (&a.spec.pool, &a.spec.namespace, &a.spec.name, &a.id).cmp(&(
                &b.spec.pool,
                &b.spec.namespace,
                &b.spec.name,
                &b.id,
            ))
        });
        v.dedup();
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    pub size: u64,
    pub order: u8,
    pub features: u64,
    /// `rbd create --data-pool`: the pool of the data objects (Ceph only; the header,
    /// object map and the rest stay in the image's own pool).
    pub data_pool: Option<String>,
    /// Ceph: a stripe unit other than the object size (a factor of it), stripe count 1:
    /// striping v2 with the plain layout, as `rbd clone --object-size` makes of a parent
    /// with smaller objects. None: no striping.
    pub stripe_unit: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    ReadOnly,
    /// Writable and holding the image's exclusive lock until `close`.
    ReadWrite,
    /// Writable without the exclusive lock, for images whose `rados-nbd.shared` setting
    /// is true (several writers that coordinate themselves, e.g. ocfs2/gfs2). Shared
    /// writers coexist with each other but not with a `ReadWrite` opener.
    SharedWrite,
}

/// A pool-level store: creates, lists, removes and opens images.
pub trait Store: Send + Sync + 'static {
    type Image: ImageStore;

    /// How to name this store in messages: `dir:/var/lib/rados-nbd`, `ceph:/etc/ceph/ceph.conf`.
    fn describe(&self) -> String;

    fn create_image(
        &self,
        spec: &ImageSpec,
        opts: &CreateOptions,
    ) -> impl Future<Output = Result<()>> + Send;

    /// librbd's `rbd_default_features`, `rbd_default_order` and `rbd_default_data_pool` as
    /// this store is configured for `pool` (Ceph: the pool's `rbd config pool set`, then
    /// the client's configuration): what `create` uses where its command line does not
    /// say. The raw values, checked by `create`; the directory store has no configuration.
    fn create_defaults(&self, pool: &str) -> impl Future<Output = Result<CreateDefaults>> + Send {
        let _ = pool;
        std::future::ready(Ok(CreateDefaults::default()))
    }

    /// Removes the header, the id object, every data object and every object map; or
    /// (Ceph, `rbd_move_parent_to_trash_on_remove`, an image whose snapshots all wait in
    /// the trash for their clones) moves the image to the trash instead, to go with its
    /// last clone.
    fn remove_image(&self, spec: &ImageSpec) -> impl Future<Output = Result<Removal>> + Send;

    /// The id of the image `spec` names now, without opening it.
    fn image_id_of(&self, spec: &ImageSpec) -> impl Future<Output = Result<String>> + Send;

    /// Image names in `pool`, which may be `POOL/NAMESPACE` (an RBD namespace).
    fn list_images(&self, pool: &str) -> impl Future<Output = Result<Vec<String>>> + Send;

    // --- Requests to whoever holds an image's exclusive lock (a serving daemon), how the
    // commands reach an image in use. Every store has its way (Ceph: librbd's
    // watch/notify requests; the directory store: the holder's control socket), so there
    // is no default.

    /// Asks the holder of `spec`'s exclusive lock to perform `action` (anything but
    /// `ReleaseLock`, which `--wait-for-lock` asks for in its own way) and waits for the
    /// outcome; `progress(done, total)` as the holder reports it (the directory store's
    /// holder reports none).
    fn ask_holder(
        &self,
        spec: &ImageSpec,
        action: &OwnerAction,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> impl Future<Output = Result<()>> + Send;

    /// Opens an image (at `spec.snap` when given, which must be ReadOnly). ReadWrite
    /// takes the image's exclusive lock; a second writer gets `ErrorKind::Busy`.
    /// SharedWrite is writable without excluding other SharedWrite openers.
    fn open_image(
        &self,
        spec: &ImageSpec,
        mode: OpenMode,
    ) -> impl Future<Output = Result<Self::Image>> + Send;

    /// Makes `child` a clone of `parent` (whose `snap` names the snapshot): a new image
    /// of the snapshot's size whose header names the parent, with an empty object map,
    /// recorded as a child of the parent as `opts.clone_format` says.
    fn clone_image(
        &self,
        parent: &ImageSpec,
        child: &ImageSpec,
        _opts: &CloneOptions,
    ) -> impl Future<Output = Result<()>> + Send {
        let e = unsupported(format!(
            "{}: cloning {parent} into {child}",
            self.describe()
        ));
        async move { Err(e) }
    }

    /// The clones of `parent@snap` (`rbd children`), or of its snapshot `snap_id` (of any
    /// namespace; `parent` then names no snapshot), or of every snapshot of `parent`
    /// (trash-namespace ones included) when neither is given; with `descendants`, their
    /// clones too, all the way down. In rbd's order: pool, namespace, name.
    fn children(
        &self,
        parent: &ImageSpec,
        _snap_id: Option<u64>,
        _descendants: bool,
    ) -> impl Future<Output = Result<Vec<ChildImage>>> + Send {
        let e = unsupported(format!("{}: listing children of {parent}", self.describe()));
        async move { Err(e) }
    }
}

/// The error of a store method a store does not implement (yet).
pub fn unsupported(what: String) -> crate::error::Error {
    crate::error::Error::new(
        crate::error::ErrorKind::Unsupported,
        format!("{what}: not supported by this store"),
    )
}

/// One opened image: its header and its objects. `snap` arguments select a snapshot
/// (None = the head); writes always go to the head with the image's snapshot context.
/// A plain read's bytes at `off` as `read_extents` gives them: one extent, none when empty.
pub(crate) fn one_extent(off: u64, b: Bytes) -> Vec<(u64, Bytes)> {
    if b.is_empty() {
        Vec::new()
    } else {
        vec![(off, b)]
    }
}

pub trait ImageStore: Send + Sync + 'static {
    /// The header as read at open (or at the latest `refresh_header`).
    fn header(&self) -> ImageHeader;

    /// What `info` shows beyond the header: op features and the image's timestamps,
    /// read now. Nothing known by default.
    fn details(&self) -> impl Future<Output = Result<ImageDetails>> + Send {
        async { Ok(ImageDetails::default()) }
    }

    /// An I/O request came for the image through its served device: `modify` for a
    /// write, discard or zeroing (not a flush, as librbd), else a read (of this image, or of an ancestor's
    /// data for a clone). librbd notes each in the header's modify or access timestamp,
    /// at most once per `rbd_mtime_update_interval` / `rbd_atime_update_interval`,
    /// without holding the request for it; so does the Ceph store. Nothing by default.
    fn note_io(&self, _modify: bool) {}

    /// The pool the data objects live in when it is not the image's own (`rbd create
    /// --data-pool`; `rbd info` shows it as `data_pool`).
    fn data_pool(&self) -> Option<String> {
        None
    }

    fn refresh_header(&self) -> impl Future<Output = Result<ImageHeader>> + Send;

    /// Refuses to serve an image whose data this store knows it would serve wrong (Ceph:
    /// an image encrypted by librbd, unless `--allow-encrypted`). The image layer calls it
    /// before serving; metadata commands (info, du, object-map, config) do not.
    fn check_servable(&self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// Err when this handle may no longer serve I/O at all (Ceph: its lock was broken and
    /// it was fenced off). The image layer asks it where it answers from the object map
    /// alone, without calling the store: a fenced handle's map may be stale.
    fn check_usable(&self) -> Result<()> {
        Ok(())
    }

    /// Sets the image's size in its header, durably. The caller (the image layer's
    /// resize) has already removed what lies beyond a smaller size.
    fn set_size(&self, size: u64) -> impl Future<Output = Result<()>> + Send;

    /// Starts taking requests that other clients address to the holder of this image's
    /// exclusive lock (Ceph: librbd's `rbd resize` through watch/notify; the directory
    /// store: `rados-nbd resize` through the holder's control socket), and returns them.
    /// Only a read-write (exclusive) handle takes requests, and only once: `None` when
    /// this handle cannot or already did. Until it is called, such requests are refused.
    fn owner_requests(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<OwnerRequest>> {
        None
    }

    /// `--quiesce`: the store runs `hook` for the quiesce requests it takes itself (Ceph:
    /// librbd's quiesce notifications, which reach every watcher of the header). Stores
    /// without such requests ignore it; the image layer runs the hook around the
    /// snapshots asked of it.
    fn enable_quiesce(&self, _hook: std::sync::Arc<crate::quiesce::QuiesceHook>) {}

    // --- Cooperative hand-over of the exclusive lock (librbd's default; not with
    // `--exclusive`). The image layer drives it: it holds every request, writes the map
    // and clears the flag, then `release_lock`; the next request of its own clients
    // calls `reacquire_lock` and reloads the map the other owner left.

    /// From now on a request for the lock from another client (Ceph: librbd's
    /// REQUEST_LOCK) is accepted and passed on as [`OwnerAction::ReleaseLock`] through
    /// `owner_requests`. Until then (and with `--exclusive`) it is refused, as rbd-nbd
    /// `--exclusive` refuses it. Stores without other clients ignore it.
    fn enable_handover(&self) {}

    /// A read-write handle opened while a live client held the lock (Ceph, `serve|map`
    /// without `--exclusive`: [`LockAtOpen::Defer`]): it starts as after `release_lock`,
    /// and the image layer serves reads without the lock and takes it with
    /// `reacquire_lock` at the first write. Stores without other clients: never.
    fn opened_without_lock(&self) -> bool {
        false
    }

    /// Gives the exclusive lock up and tells the other clients, keeping the handle (and
    /// its watch) open. The caller has made everything durable and holds every request.
    fn release_lock(&self) -> impl Future<Output = Result<()>> + Send {
        async { Err(unsupported("handing the exclusive lock over".to_string())) }
    }

    /// Takes the lock back after `release_lock`, asking its holder to release it as
    /// librbd's requester does; an owner that refuses or does not let go within a bound
    /// is an error (the request that wanted it fails; the next one asks again).
    fn reacquire_lock(&self) -> impl Future<Output = Result<()>> + Send {
        async { Err(unsupported("taking the exclusive lock back".to_string())) }
    }

    /// `flags = (flags & !mask) | (value & mask)` in the header, durably.
    fn set_flags(&self, value: u64, mask: u64) -> impl Future<Output = Result<()>> + Send;

    /// Image metadata (`rbd image-meta`), e.g. `rados-nbd.shared`.
    fn get_meta(&self, key: &str) -> impl Future<Output = Result<Option<String>>> + Send;
    fn set_meta(&self, key: &str, value: &str) -> impl Future<Output = Result<()>> + Send;

    /// Reads up to `len` bytes at `off` in object `objno`. `Ok(None)` when the object
    /// does not exist; a short result means the object ends early (the rest is zeros).
    fn read(
        &self,
        objno: u64,
        off: u64,
        len: u64,
        snap: Option<u64>,
    ) -> impl Future<Output = Result<Option<Bytes>>> + Send;

    /// Like `read`, as the extents of the range the object has allocated, each (offset
    /// in the object, its bytes), ascending: what a copy-up reads of an ancestor's object,
    /// as librbd does (a sparse read: the copy-up then ends where the ancestor's last
    /// extent ends, not where the read did). A store that cannot tell holes from zeros
    /// gives what `read` gives, as one extent.
    fn read_extents(
        &self,
        objno: u64,
        off: u64,
        len: u64,
        snap: Option<u64>,
    ) -> impl Future<Output = Result<Option<Vec<(u64, Bytes)>>>> + Send {
        async move {
            Ok(self
                .read(objno, off, len, snap)
                .await?
                .map(|b| one_extent(off, b)))
        }
    }

    /// Writes into an object, creating it if needed. `durable`: stable before returning
    /// (FUA); otherwise stable after the next `sync`.
    fn write(
        &self,
        objno: u64,
        off: u64,
        data: Bytes,
        durable: bool,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Zeroes a range inside an existing object (deallocating where possible). A missing
    /// object stays missing.
    fn zero(
        &self,
        objno: u64,
        off: u64,
        len: u64,
        durable: bool,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Whether `zero` deallocates (cheap, like a removal) rather than writing zeros: an
    /// NBD FAST_ZERO request must fail instead of becoming a slow write.
    fn zeroes_are_fast(&self) -> bool {
        true
    }

    /// Whether object `objno` exists but holds no data at all (every byte a hole), when
    /// the store can tell without reading it; `Ok(false)` when it cannot, or when the
    /// object does not exist. The image layer removes an object that partial zeroes
    /// have emptied (`Image::remove_if_emptied`).
    fn holds_no_data(&self, _objno: u64) -> impl Future<Output = Result<bool>> + Send {
        async { Ok(false) }
    }

    /// Removes an object (no error when it does not exist).
    fn remove(&self, objno: u64, durable: bool) -> impl Future<Output = Result<()>> + Send;

    /// Makes every write acknowledged so far durable.
    fn sync(&self) -> impl Future<Output = Result<()>> + Send;

    /// Numbers of the data objects that exist (at `snap`).
    fn list_objects(&self, snap: Option<u64>) -> impl Future<Output = Result<Vec<u64>>> + Send;

    /// The data objects that exist (at `snap`) with the object map state librbd gives
    /// them when it rebuilds a map, ascending: EXISTS, or with fast-diff EXISTS_CLEAN for
    /// an object not written since the snapshot before (for the head: the newest
    /// snapshot); see `snapset::object_state`. What `rebuild_map` and `object-map check`
    /// use. The default, for a store without snapshots: EXISTS for every listed object.
    fn list_object_states(
        &self,
        snap: Option<u64>,
    ) -> impl Future<Output = Result<Vec<(u64, ObjectState)>>> + Send {
        async move {
            let objs = self.list_objects(snap).await?;
            Ok(objs.into_iter().map(|o| (o, ObjectState::Exists)).collect())
        }
    }

    /// The snap sets of data objects `objs`, with every version's size and overlap with
    /// the next, in the order asked; `None` for an object that does not exist at all (not
    /// even in a snapshot). What exact diffs (`diff` without --whole-object, `du
    /// --exact`) are computed from, with `snapset::snap_set_diff`.
    fn object_snap_sets(
        &self,
        _objs: Vec<u64>,
    ) -> impl Future<Output = Result<Vec<(u64, Option<snapset::SnapSet>)>>> + Send {
        async { Err(unsupported("listing the snapshot sets of objects".into())) }
    }

    /// The raw object map object (Ceph encoding), `None` when absent.
    fn read_object_map(
        &self,
        snap: Option<u64>,
    ) -> impl Future<Output = Result<Option<Vec<u8>>>> + Send;

    /// Replaces the head's object map object, durably.
    fn write_object_map(&self, data: Vec<u8>) -> impl Future<Output = Result<()>> + Send;

    /// Releases the exclusive lock (and watch). After `close` the handle is unusable.
    fn close(&self) -> impl Future<Output = Result<()>> + Send;

    // --- Clones. A store without clones never reports a parent, so these are never
    // called on it.

    /// Opens this image's parent read-only at the parent snapshot (the next level of a
    /// clone chain); `None` when the image is not a clone.
    fn open_parent(&self) -> impl Future<Output = Result<Option<Self>>> + Send
    where
        Self: Sized,
    {
        async { Ok(None) }
    }

    /// Header updates other clients announced (librbd's HeaderUpdate notification), each
    /// already read into `header()` when the counter moves: while the lock is elsewhere
    /// the image layer follows a resize or a flatten done by the owner, as librbd
    /// refreshes its image. `None`: the store has no such notifications.
    fn header_updates(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Opens the head of `parent`, this clone's parent (before a flatten detached it), in
    /// `mode`: ReadOnly, or ReadWrite failing with `Busy` while a live client holds its
    /// lock (never asking for it, nor waiting). Flatten uses it to remove a parent
    /// snapshot left in the trash once no clone uses it, as librbd's DetachChildRequest.
    /// A store without a snapshot trash need not have it.
    fn open_parent_head(
        &self,
        parent: &ParentInfo,
        _mode: OpenMode,
    ) -> impl Future<Output = Result<Self>> + Send
    where
        Self: Sized,
    {
        let e = unsupported(format!("opening {} for its trashed snapshot", parent.spec));
        async move { Err(e) }
    }

    /// Asks the live client holding `parent`'s lock (its head's: `open_parent_head` said
    /// Busy) to carry out `action`, and waits for the outcome, as librbd asks an image's
    /// owner for maintenance. A store without a snapshot trash need not have it.
    fn ask_parent_holder(
        &self,
        parent: &ParentInfo,
        _action: &OwnerAction,
    ) -> impl Future<Output = Result<()>> + Send {
        let e = unsupported(format!(
            "asking the holder of {} for its trashed snapshot",
            parent.spec
        ));
        async move { Err(e) }
    }

    /// Removes `parent` (an image by id, as a clone's header names it) if it waits in the
    /// trash for its last clone and that clone is gone: moved there by `rbd rm` with
    /// `rbd_move_parent_to_trash_on_remove` (source USER_PARENT), its deferment over, and
    /// no snapshot left (librbd's DetachChildRequest, then trash::RemoveRequest). `true`
    /// if it was removed. A store without an image trash need not have it.
    fn remove_trashed_parent(
        &self,
        _parent: &ParentInfo,
    ) -> impl Future<Output = Result<bool>> + Send {
        async { Ok(false) }
    }

    /// Copy-up (librbd's CopyupRequest): makes object `objno` hold `parent_data` (the
    /// ancestor's bytes of this object inside the overlap; may be empty) with `op`
    /// applied on top, in one atomic step and only if the object does not exist yet; if
    /// it already exists (copied up before), only `op` is applied. Ceph: `rbd.copyup`
    /// and the op in one write operation with the image's snapshot context.
    fn copyup(
        &self,
        objno: u64,
        _parent_data: Bytes,
        _op: ObjectWrite,
        _durable: bool,
    ) -> impl Future<Output = Result<()>> + Send {
        let e = unsupported(format!("copy-up of object {objno}"));
        async move { Err(e) }
    }

    /// `copyup` with `extents` (offset, length) saying which bytes of `parent_data` the
    /// ancestor had (the rest are holes): librbd's sparse copy-up (`rbd.sparse_copyup`)
    /// writes only those. A store that keeps no holes copies `parent_data` whole.
    fn copyup_extents(
        &self,
        objno: u64,
        parent_data: Bytes,
        extents: Vec<(u64, u64)>,
        op: ObjectWrite,
        durable: bool,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = extents;
        self.copyup(objno, parent_data, op, durable)
    }

    /// The snapshots (oldest first) whose data a copy-up of `parent_data` into object
    /// `objno` sets as well, and whose object maps must then say the object exists;
    /// empty when a copy-up changes the head only. Ceph: a "deep" copy-up (the child
    /// has snapshots, the data is not all zeros), for each snapshot large enough to
    /// hold the object. The directory store: none (its snapshots keep reading the
    /// parent through their whiteouts).
    fn copyup_snapshots(&self, objno: u64, parent_data: &[u8]) -> Vec<u64> {
        let _ = (objno, parent_data);
        Vec::new()
    }

    /// Sets object `objno`'s state in snapshot `snap`'s object map, in place (librbd's
    /// object map UpdateRequest on a snapshot, after a deep copy-up). A snapshot
    /// without a map object is left alone.
    fn update_snap_object_map(
        &self,
        snap: u64,
        objno: u64,
        _state: ObjectState,
    ) -> impl Future<Output = Result<()>> + Send {
        let e = unsupported(format!(
            "updating object {objno} in the object map of snapshot {snap}"
        ));
        async move { Err(e) }
    }

    /// Flatten's last step: removes the link to the parent (and the parent's record of
    /// this child), once every object the parent backed was copied up.
    fn detach_parent(&self) -> impl Future<Output = Result<()>> + Send {
        async { Err(unsupported("detaching a clone from its parent".into())) }
    }

    // --- Snapshots, made by the holder of the exclusive lock (a read-write handle).
    // The image layer keeps the object maps right around them.

    /// Adds snapshot `name` of the head as it is now and returns its id; writes after
    /// it go with the new snapshot context, so the snapshot keeps the data each object
    /// had. The snapshot's object map is written by the caller (`write_snap_object_map`).
    fn snap_create(&self, name: &str) -> impl Future<Output = Result<u64>> + Send {
        let e = unsupported(format!("creating snapshot {name}"));
        async move { Err(e) }
    }

    /// The names of the group, its pool and its snapshot that a group snapshot's
    /// namespace (pool id, group id, group snapshot id) refers to. A store without
    /// groups need not have it.
    fn group_snap_names(
        &self,
        _pool: i64,
        _group_id: &str,
        _snap_id: &str,
    ) -> impl Future<Output = Result<GroupSnapNames>> + Send {
        async { Err(unsupported("groups".into())) }
    }

    /// `snap_create` in a namespace other than the users' (Ceph: a group's), given as
    /// the asker encoded it. A store without such namespaces need not have it.
    fn snap_create_in(
        &self,
        name: &str,
        _namespace: &[u8],
    ) -> impl Future<Output = Result<u64>> + Send {
        let e = unsupported(format!("creating snapshot {name} in a group namespace"));
        async move { Err(e) }
    }

    /// Called before anything of snapshot `id` is removed: an error when it cannot be
    /// removed (clones that need it, where the store has no trash), `Ok(true)` when the
    /// store keeps it for its clones instead, out of the users' names (Ceph, clone format
    /// 2: librbd's SnapshotRemoveRequest moves it to the trash namespace; it goes when its
    /// last clone does), `Ok(false)` when it is to be removed.
    fn snap_trash_if_used(&self, _id: u64) -> impl Future<Output = Result<bool>> + Send {
        async { Ok(false) }
    }

    /// `rbd feature enable|disable`: `features = (features & !mask) | (value & mask)` in
    /// the header (cls_rbd's set_features), the other clients told.
    fn set_features(&self, _value: u64, _mask: u64) -> impl Future<Output = Result<()>> + Send {
        async { Err(unsupported("changing the image's features".to_string())) }
    }

    /// Removes the object maps of the head and of every snapshot (the object-map feature
    /// is being disabled). Missing ones are fine.
    fn remove_object_maps(&self) -> impl Future<Output = Result<()>> + Send {
        async { Err(unsupported("removing the object maps".to_string())) }
    }

    /// `rbd sparsify` of object `objno` (cls_rbd's `sparsify`, run on the OSD): runs of
    /// `sparse_size` zero bytes are punched, trailing zeros truncated, and the object is
    /// removed when `remove_empty` and nothing but zeros is left. Whether it exists after.
    fn sparsify_object(
        &self,
        objno: u64,
        _sparse_size: u64,
        _remove_empty: bool,
    ) -> impl Future<Output = Result<bool>> + Send {
        let e = unsupported(format!("sparsifying object {objno}"));
        async move { Err(e) }
    }

    /// Removes snapshot `id`: its data (what only it kept), its object map, its record.
    fn snap_remove(&self, id: u64) -> impl Future<Output = Result<()>> + Send {
        let e = unsupported(format!("removing snapshot {id}"));
        async move { Err(e) }
    }

    /// Renames the image to `dest` within its pool and namespace (`rbd rename`), from the
    /// name the store has for it now, as librbd's RenameRequest does: the id object under
    /// the new name first, created exclusively, then the directory entry, then the old id
    /// object. Nothing else is keyed by the name, so a served image keeps being served.
    fn rename(&self, dest: &str) -> impl Future<Output = Result<()>> + Send;

    fn snap_rename(&self, id: u64, _new_name: &str) -> impl Future<Output = Result<()>> + Send {
        let e = unsupported(format!("renaming snapshot {id}"));
        async move { Err(e) }
    }

    /// `rbd snap protect` / `unprotect` (unprotect fails while the snapshot has clones).
    fn snap_set_protected(
        &self,
        id: u64,
        _protected: bool,
    ) -> impl Future<Output = Result<()>> + Send {
        let e = unsupported(format!("protecting snapshot {id}"));
        async move { Err(e) }
    }

    /// Makes object `objno` of the head what it was at snapshot `snap` (removed if it
    /// did not exist then) with the store's own rollback (Ceph: librados'
    /// selfmanaged_snap_rollback), returning `Ok(true)`; `Ok(false)` when the store has
    /// none, and the image layer copies the data itself.
    fn rollback_object(
        &self,
        _objno: u64,
        _snap: u64,
    ) -> impl Future<Output = Result<bool>> + Send {
        async { Ok(false) }
    }

    /// Replaces snapshot `snap`'s object map object, durably.
    fn write_snap_object_map(
        &self,
        snap: u64,
        _data: Vec<u8>,
    ) -> impl Future<Output = Result<()>> + Send {
        let e = unsupported(format!("writing the object map of snapshot {snap}"));
        async move { Err(e) }
    }

    /// Flags of snapshot `snap` (its OBJECT_MAP_INVALID says whether its map is trusted).
    fn snap_flags(&self, snap: u64) -> impl Future<Output = Result<u64>> + Send {
        let e = unsupported(format!("reading the flags of snapshot {snap}"));
        async move { Err(e) }
    }
}
