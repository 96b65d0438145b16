//! The image layer's tests, by plane, and what they share: a directory store with one
//! image, read back through the store's own trait, and a memory image (`test_store`).

use super::pieces::{split, Piece};
use super::test_store::MemImage;
use super::*;
use crate::store::dir::{DirImage, DirStore};
use crate::store::{
    CreateOptions, OpenMode, Store, DEFAULT_FEATURES, RBD_FEATURE_LAYERING,
    RBD_FLAG_FAST_DIFF_INVALID, RBD_FLAG_OBJECT_MAP_INVALID,
};
use bytes::Bytes;
use nbd_protocol::backend::{STATE_HOLE, STATE_ZERO};
use nbd_protocol::{Backend, Errno, Extent, ReadChunk, ZeroFlags};
use objmap::ObjectState;
use std::path::{Path, PathBuf};

mod clone;
mod data;
mod dirty;
mod features;
mod handover;
mod open;
mod rebuild;
mod resize;
mod snap;

const OBJ: u64 = 4 << 20;

const NO_HOLE: ZeroFlags = ZeroFlags {
    no_hole: true,
    fast_zero: false,
    fua: false,
};

const FAST_ZERO: ZeroFlags = ZeroFlags {
    no_hole: false,
    fast_zero: true,
    fua: false,
};

fn spec(s: &str) -> ImageSpec {
    s.parse().unwrap()
}

async fn store_with(size: u64, features: u64) -> (tempfile::TempDir, DirStore) {
    let d = tempfile::tempdir().unwrap();
    let s = DirStore::new(d.path());
    let o = CreateOptions {
        size,
        order: 22,
        features,
        data_pool: None,
        stripe_unit: None,
    };
    create_image(&s, &spec("vm1"), &o).await.unwrap();
    (d, s)
}

/// A new image (default features) in a directory store, open for writing.
async fn writable(size: u64) -> (tempfile::TempDir, DirStore, Image<DirImage>) {
    let (d, s) = store_with(size, DEFAULT_FEATURES).await;
    let img = open(&s, false).await;
    (d, s, img)
}

async fn open(s: &DirStore, read_only: bool) -> Image<DirImage> {
    let o = OpenOptions {
        read_only,
        shared_default: false,
        checkpoint_idle: None,
    };
    Image::open(s, &spec("vm1"), &o).await.unwrap()
}

/// An image in memory, its calls recorded and audited, and a handle to look at it.
async fn recorded(size: u64, checkpoint_idle: Option<Duration>) -> (Image<MemImage>, MemImage) {
    let mem = MemImage::new(size, DEFAULT_FEATURES).audited();
    let o = OpenOptions {
        checkpoint_idle,
        ..OpenOptions::default()
    };
    let img = Image::from_store_image(mem.clone(), &spec("vm1"), &o)
        .await
        .unwrap();
    (img, mem)
}

fn pool(d: &Path) -> PathBuf {
    d.join("rbd")
}

/// A read-only handle of the stored image: what the store holds now, through its own
/// trait (it takes no lock, so an open writer does not stand in the way).
async fn stored(s: &DirStore) -> DirImage {
    s.open_image(&spec("vm1"), OpenMode::ReadOnly)
        .await
        .unwrap()
}

async fn stored_header(s: &DirStore) -> ImageHeader {
    let h = stored(s).await;
    let header = h.header();
    h.close().await.unwrap();
    header
}

async fn header_flags(s: &DirStore) -> u64 {
    stored_header(s).await.flags
}

async fn header_size(s: &DirStore) -> u64 {
    stored_header(s).await.size
}

/// The stored object map's bytes.
async fn disk_map_bytes(s: &DirStore) -> Vec<u8> {
    let h = stored(s).await;
    let b = h.read_object_map(None).await.unwrap().unwrap();
    h.close().await.unwrap();
    b
}

async fn disk_map(s: &DirStore) -> ObjectMap {
    ObjectMap::decode(&disk_map_bytes(s).await).unwrap()
}

/// An exclusive handle, for changing the stored image while nobody has it open.
async fn exclusive(s: &DirStore) -> DirImage {
    s.open_image(&spec("vm1"), OpenMode::ReadWrite)
        .await
        .unwrap()
}

/// Replaces the stored object map of the (closed) image with these bytes.
async fn write_disk_map(s: &DirStore, b: Vec<u8>) {
    let h = exclusive(s).await;
    h.write_object_map(b).await.unwrap();
    h.close().await.unwrap();
}

/// Sets the image's `shared` metadata (the image closed).
async fn set_shared(s: &DirStore, value: &str) {
    let h = exclusive(s).await;
    h.set_meta(META_SHARED, value).await.unwrap();
    h.close().await.unwrap();
}

async fn objects_on_disk(s: &DirStore) -> Vec<u64> {
    let h = stored(s).await;
    let mut v = h.list_objects(None).await.unwrap();
    h.close().await.unwrap();
    v.sort();
    v
}

fn existing(m: impl std::ops::Deref<Target = ObjectMap>) -> Vec<u64> {
    (0..m.len())
        .filter(|&i| m.get(i) != ObjectState::Nonexistent)
        .collect()
}

async fn read_all<S: ImageStore>(img: &Image<S>, off: u64, len: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for c in img.read(off, len).await.unwrap() {
        match c {
            ReadChunk::Data(b) => out.extend_from_slice(&b),
            ReadChunk::Hole(n) => out.extend(std::iter::repeat_n(0u8, n as usize)),
        }
    }
    assert_eq!(out.len(), len as usize, "chunks cover the request exactly");
    out
}
