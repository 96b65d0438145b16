//! The Ceph store: RBD format-2 images in a real cluster, through librados (feature `ceph`).
//!
//! Layout, as librbd writes it: `rbd_id.<name>` (cls get_id/set_id) → image id;
//! `rbd_directory` (dir_add_image / dir_list); `rbd_header.<id>` (cls_rbd methods, the
//! `rbd_lock` cls_lock and the header watch); data objects `rbd_data.<id>.<objno %016x>`;
//! object maps `rbd_object_map.<id>[.<snapid %016x>]`.
//!
//! Two pool handles per image: metadata objects (header, object map, directory) are
//! written without a snapshot context, as librbd's `md_ctx` does, so snapshots never clone
//! them; data objects are written with the image's self-managed snapshot context, so
//! snapshots taken by Ceph's tools keep their data.
//!
//! With a separate data pool (`rbd create --data-pool`) the data objects, named
//! `rbd_data.<metadata pool id>.<id>.<objno>`, live in that pool and snapshot ids are
//! allocated there, as librbd's `data_ctx` does; the rest stays in the image's pool.
//!
//! Not supported (refused at open rather than served wrong): journaling, fancy striping
//! (stripe count > 1: count 1 is the plain layout, whatever the unit), migration, non-primary mirrored images for
//! writing, unknown feature bits.
//!
//! Clones (formats 1 and 2, any depth, the parent in any pool or namespace): the header
//! names the parent by ids, resolved to names at open (`header::resolve_parent`);
//! `open_parent` opens the next level read-only at its snapshot; `copyup` is librbd's
//! CopyupRequest (`rbd.copyup` + the op in one write with the child's snapshot context);
//! `clone_image`, `children` and `detach_parent` follow librbd's CloneRequest,
//! list_children and Flatten's detach steps. Pacific's
//! client-side encryption (`rbd encryption format`) leaves no mark in the header: it is
//! recognised from the LUKS header librbd writes at the start of object 0 (see `luks`) and
//! refused before serving (`ImageStore::check_servable`), unless `--allow-encrypted` asks
//! for the raw LUKS volume. Where librbd's layout is the same as cryptsetup's (LUKS2 on
//! objects up to 16 MiB) the two cannot be told apart, so any LUKS volume at offset 0 is
//! refused until `--allow-encrypted` says it is to be served raw.
//!
//! The exclusive lock (`take_lock`) is broken only when its owner is dead, and the owner is
//! fenced first, as librbd's managed_lock::BreakRequest does: an owner that answers a
//! notify on the header is alive (the open is refused, "in use"); one whose watch is still
//! registered but silent (killed, stopped) is waited for, bounded ([`lock::LOCK_WAIT_SECS`]),
//! until the OSD drops its watch; then its address is blocklisted and only then is the
//! lock broken, so that requests it still has queued cannot land after ours. The fenced
//! side (`Inner::fence`): a handle that finds itself blocklisted (ESHUTDOWN from any op,
//! or its watch) or its lock broken sends nothing more, fails every read and write with
//! EIO and leaves the image flagged invalid for the next owner.
//!
//! Files: `store` connects and creates, removes, lists and opens images (the
//! [`Store`](crate::store::Store) impl); `header` reads and checks an image header and its features; `lock` takes, keeps
//! and breaks the exclusive lock, follows the header watch and answers notifies (and
//! fences a handle that lost the lock); `quiesce` runs the `--quiesce` hook on librbd's
//! quiesce notifications and sends them around a snapshot we take for `rbd snap create`; `image` is one opened image, its data I/O and the
//! [`ImageStore`](crate::store::ImageStore) impl; `rados` is our librados binding, `cls` the cls_rbd/cls_lock
//! encodings, `snaps` the snap sets of objects, `sparse` sparse reads, `write` data writes
//! sent without a copy, `read` data reads kept in librados' reply buffer, `shim` the
//! asynchronous calls into our C++ shims, `luks` the LUKS header probe;
//! `owner_msgs` the requests librbd clients address to the lock owner (and our progress
//! and completion notices), `ask_owner` the asking side, for `rados-nbd` commands run
//! against an image another process serves.

mod ask_owner;
pub mod cls;
mod header;
mod image;
mod lock;
pub mod luks;
mod merge;
mod owner_msgs;
mod quiesce;
pub mod rados;
mod read;
mod shim;
pub mod snaps;
pub mod sparse;
mod store;
mod timestamps;
mod write;

#[cfg(test)]
mod live_tests;

pub use image::CephImage;
pub use shim::set_completion_hook;
pub use store::{CephOptions, CephStore};

const RBD: &str = "rbd";
const LOCK: &str = "lock";
/// How long to wait for watchers to answer when checking whether a lock owner is alive.
const NOTIFY_TIMEOUT_MS: u64 = 5000;
