//! A memory-backed [`ImageStore`] for the image layer's tests: the header, objects,
//! object maps and metadata live in memory, where a test looks at them directly instead
//! of reading a store's files, and the calls whose order matters (flags, size, data,
//! sync, map, close) are recorded in a log.

use crate::error::Result;
use crate::store::RBD_FLAG_OBJECT_MAP_INVALID;
use crate::store::{
    ImageHeader, ImageStore, ObjectWrite, ParentInfo, SnapInfo, RBD_FEATURE_OBJECT_MAP,
};
use bytes::Bytes;
use objmap::{ObjectMap, ObjectState};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

struct State {
    header: ImageHeader,
    /// The head's data objects.
    objects: BTreeMap<u64, Vec<u8>>,
    /// `(snap id, objno)`: what a snapshot still sees of an object the head changed or
    /// removed since (Ceph: a clone). A listing does not show them.
    clones: BTreeMap<(u64, u64), Vec<u8>>,
    /// The snapshots' header flags (the head's are in `header`).
    snap_flags: HashMap<u64, u64>,
    /// Snapshots made by `snap_create`: every object they have is in `clones` (a
    /// full copy taken at the time), so the head's objects never show through.
    full_snaps: std::collections::HashSet<u64>,
    /// Object maps: the head's (None) and the snapshots'.
    maps: HashMap<Option<u64>, Vec<u8>>,
    meta: HashMap<String, String>,
    log: Vec<String>,
    /// A clone's parent: a handle of the parent image at the snapshot (`header.parent`
    /// says which), until `detach_parent`.
    parent: Option<MemImage>,
    /// The lock was handed to another client (`release_lock`): nothing may be written.
    lock_away: bool,
    /// How many of the next copy-ups fail, having changed nothing (see `fail_copyups`).
    failing_copyups: u32,
}

/// A handle of one image in memory. Clones share the image: a test keeps one to look
/// at while the image layer owns another.
#[derive(Clone)]
pub(super) struct MemImage {
    state: Arc<Mutex<State>>,
    /// Opened at this snapshot (read-only): its flags in the header, writes refused.
    snap: Option<u64>,
    /// Check every data operation against the map while the flag is clear (see `audit`).
    audit: bool,
    /// How long `sync` and `set_flags` take (a slow disk or OSD): widens the windows
    /// where a checkpoint and requests interleave.
    slow: Option<std::time::Duration>,
    /// How long each `remove` takes (a round trip to the OSD), and how many were under
    /// way at once at most (see `max_removes_at_once`).
    slow_remove: Option<std::time::Duration>,
    removing: Arc<(
        std::sync::atomic::AtomicUsize,
        std::sync::atomic::AtomicUsize,
    )>,
    /// Answers `holds_no_data` (an object of zeros only), as a store that punches holes.
    punches: bool,
    /// Holds every head listing until released, or fails it (see `ListingHold`).
    hold: Option<Arc<ListingHold>>,
}

/// What a held listing does once the test says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HoldState {
    Held,
    Released,
    Failed,
}

/// A head listing (`list_objects(None)`, what a map's rebuild reads) that takes what
/// exists when it starts, then waits until the test releases it (or makes it fail): a
/// rebuild the test keeps under way, and a listing that misses what requests did since.
pub(super) struct ListingHold {
    state: tokio::sync::watch::Sender<HoldState>,
    started: tokio::sync::watch::Sender<usize>,
}

impl ListingHold {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(ListingHold {
            state: tokio::sync::watch::Sender::new(HoldState::Held),
            started: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Lets every listing (held now or later) answer.
    pub(super) fn release(&self) {
        self.state.send_replace(HoldState::Released);
    }

    /// Makes every listing (held now or later) fail.
    pub(super) fn fail(&self) {
        self.state.send_replace(HoldState::Failed);
    }

    /// Waits (at most a minute) until `n` listings have started.
    pub(super) async fn wait_started(&self, n: usize) {
        let mut rx = self.started.subscribe();
        tokio::time::timeout(std::time::Duration::from_secs(60), rx.wait_for(|&k| k >= n))
            .await
            .expect("a listing started within a minute")
            .expect("hold alive");
    }

    pub(super) fn started(&self) -> usize {
        *self.started.borrow()
    }

    async fn pass(&self) -> Result<()> {
        self.started.send_modify(|k| *k += 1);
        let mut rx = self.state.subscribe();
        let st = tokio::time::timeout(
            std::time::Duration::from_secs(120),
            rx.wait_for(|&s| s != HoldState::Held),
        )
        .await
        .expect("a held listing released within two minutes")
        .map(|s| *s)
        .expect("hold alive");
        match st {
            HoldState::Failed => Err(crate::error::Error::new(
                crate::error::ErrorKind::Io,
                "listing the objects failed (test store)",
            )),
            _ => Ok(()),
        }
    }
}

impl MemImage {
    /// A new image of `size` bytes in 4 MiB objects, with its empty object map when
    /// `features` has one (as `create_image` leaves it).
    pub(super) fn new(size: u64, features: u64) -> Self {
        let header = ImageHeader {
            id: "1234abcd".into(),
            size,
            order: 22,
            object_prefix: "rbd_data.1234abcd".into(),
            features,
            flags: 0,
            snap_seq: 0,
            snaps: vec![],
            parent: None,
        };
        let mut maps = HashMap::new();
        if features & RBD_FEATURE_OBJECT_MAP != 0 {
            let count = size.div_ceil(header.object_size());
            maps.insert(None, ObjectMap::try_new(count).unwrap().encode());
        }
        MemImage {
            state: Arc::new(Mutex::new(State {
                header,
                objects: BTreeMap::new(),
                clones: BTreeMap::new(),
                snap_flags: HashMap::new(),
                full_snaps: Default::default(),
                maps,
                meta: HashMap::new(),
                log: Vec::new(),
                parent: None,
                lock_away: false,
                failing_copyups: 0,
            })),
            snap: None,
            audit: false,
            slow: None,
            slow_remove: None,
            removing: Default::default(),
            punches: false,
            hold: None,
        }
    }

    /// This handle, auditing every data operation (see `audit`).
    pub(super) fn audited(mut self) -> Self {
        self.audit = true;
        self
    }

    /// Another client holds the image's lock (a librbd owner, alive): a read-write open
    /// starts without it, as the Ceph store's `LockAtOpen::Defer` does.
    pub(super) fn held_elsewhere(self) -> Self {
        self.lock().lock_away = true;
        self
    }

    /// This handle, its head listings held by `h` (see `ListingHold`).
    pub(super) fn holding_listings(mut self, h: Arc<ListingHold>) -> Self {
        self.hold = Some(h);
        self
    }

    /// This handle, telling which objects hold no data (see `punches`).
    pub(super) fn punching(mut self) -> Self {
        self.punches = true;
        self
    }

    /// This handle, taking `d` for each `sync`, `set_flags` and `copyup`.
    pub(super) fn slowed(mut self, d: std::time::Duration) -> Self {
        self.slow = Some(d);
        self
    }

    /// This handle, taking `d` for each `remove`.
    pub(super) fn slow_removes(mut self, d: std::time::Duration) -> Self {
        self.slow_remove = Some(d);
        self
    }

    /// The most `remove`s this handle (and its clones) had under way at once.
    pub(super) fn max_removes_at_once(&self) -> usize {
        self.removing.1.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Makes the next `n` copy-ups fail (an OSD error, a lost lock) without changing
    /// anything; each is logged as `copyup_failed(objno)`.
    pub(super) fn fail_copyups(&self, n: u32) {
        self.lock().failing_copyups = n;
    }

    async fn take_time(&self) {
        if let Some(d) = self.slow {
            tokio::time::sleep(d).await;
        }
    }

    /// Takes snapshot `name` (id `id`) of the head's size, with these header flags, map
    /// bytes and objects that live on only as its clones.
    pub(super) fn add_snapshot(
        &self,
        id: u64,
        name: &str,
        flags: u64,
        map: Vec<u8>,
        clones: &[(u64, &[u8])],
    ) {
        let mut s = self.lock();
        let size = s.header.size;
        s.header.snaps.insert(
            0,
            SnapInfo {
                id,
                name: name.into(),
                size,
                protected: false,
                timestamp: None,
                namespace: Default::default(),
            },
        );
        s.header.snap_seq = s.header.snap_seq.max(id);
        s.snap_flags.insert(id, flags);
        s.maps.insert(Some(id), map);
        for (objno, data) in clones {
            s.clones.insert((id, *objno), data.to_vec());
        }
    }

    /// A new clone (id `id`) of this image at snapshot `snap`: as big as the snapshot,
    /// the overlap all of it, an empty map when the parent has the feature.
    pub(super) fn clone_of(&self, snap: u64, id: &str) -> Self {
        let (size, features, order, pid, pname) = {
            let s = self.lock();
            let info = s
                .header
                .snaps
                .iter()
                .find(|i| i.id == snap)
                .expect("snapshot");
            (
                info.size,
                s.header.features,
                s.header.order,
                s.header.id.clone(),
                info.name.clone(),
            )
        };
        let child = MemImage::new(size, features);
        {
            let mut s = child.lock();
            s.header.id = id.into();
            s.header.object_prefix = format!("rbd_data.{id}");
            s.header.order = order;
            if features & RBD_FEATURE_OBJECT_MAP != 0 {
                let count = size.div_ceil(1 << order);
                s.maps
                    .insert(None, ObjectMap::try_new(count).unwrap().encode());
            }
            s.header.parent = Some(ParentInfo {
                spec: format!("img{pid}@{pname}").parse().unwrap(),
                image_id: pid,
                snap_id: snap,
                overlap: size,
                in_trash: false,
            });
            s.parent = Some(self.at_snapshot(snap));
        }
        child
    }

    /// Takes snapshot `id` named `name` of the head as it is now, with a valid map of
    /// the objects that exist (as `rbd snap create` leaves it).
    pub(super) fn snapshot_now(&self, id: u64, name: &str) {
        let (count, objs) = {
            let s = self.lock();
            (
                s.header.object_count(),
                s.objects.keys().copied().collect::<Vec<_>>(),
            )
        };
        let m = ObjectMap::try_new(count).unwrap();
        for o in objs {
            m.set(o, ObjectState::Exists);
        }
        self.add_snapshot(id, name, 0, m.encode(), &[]);
    }

    /// The parent overlap in the header.
    pub(super) fn parent_overlap(&self) -> Option<u64> {
        self.lock().header.parent.as_ref().map(|p| p.overlap)
    }

    /// Sets the parent overlap in the header (a clone whose parent was bigger than what
    /// it kept of it).
    pub(super) fn set_overlap(&self, overlap: u64) {
        if let Some(p) = self.lock().header.parent.as_mut() {
            p.overlap = overlap;
        }
    }

    /// Points this image's parent elsewhere (a broken chain, for the loop check).
    pub(super) fn set_parent(&self, parent: &MemImage, snap: u64) {
        let pid = parent.lock().header.id.clone();
        let mut s = self.lock();
        let overlap = s.header.size;
        s.header.parent = Some(ParentInfo {
            spec: format!("img{pid}@s{snap}").parse().unwrap(),
            image_id: pid,
            snap_id: snap,
            overlap,
            in_trash: false,
        });
        s.parent = Some(parent.at_snapshot(snap));
    }

    /// The bytes of object `o` of the head, if it exists.
    pub(super) fn object(&self, o: u64) -> Option<Vec<u8>> {
        self.lock().objects.get(&o).cloned()
    }

    /// A handle of snapshot `id`, as the store opens `IMAGE@SNAP` (read-only).
    pub(super) fn at_snapshot(&self, id: u64) -> Self {
        MemImage {
            snap: Some(id),
            ..self.clone()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note(&self, s: impl Into<String>) {
        self.lock().log.push(s.into());
    }

    fn writable(&self, what: &str) {
        assert!(self.snap.is_none(), "a snapshot is never {what}");
        assert!(
            !self.lock().lock_away,
            "{what} while the lock was handed over"
        );
    }

    /// Another owner, holding the lock we handed over, turns features off (its maps go
    /// with object-map).
    pub(super) fn other_owner_disables(&self, features: u64) {
        let mut s = self.lock();
        assert!(
            s.lock_away,
            "the other owner changes features only while it holds the lock"
        );
        s.header.features &= !features;
        if features & RBD_FEATURE_OBJECT_MAP != 0 {
            s.maps.clear();
        }
    }

    /// Another owner, holding the lock we handed over, writes object `o`: keeping the map
    /// right as librbd does, or (`keeps_map` false) with the flag set and the map stale,
    /// as one that crashed would leave it.
    pub(super) fn other_owner_writes(&self, o: u64, data: Vec<u8>, keeps_map: bool) {
        let mut s = self.lock();
        assert!(
            s.lock_away,
            "the other owner writes only while it holds the lock"
        );
        s.objects.insert(o, data);
        if keeps_map {
            let map = ObjectMap::decode(&s.maps[&None]).unwrap();
            map.set(o, ObjectState::Exists);
            s.maps.insert(None, map.encode());
        } else {
            s.header.flags |=
                RBD_FLAG_OBJECT_MAP_INVALID | crate::store::RBD_FLAG_FAST_DIFF_INVALID;
        }
    }

    /// The stored head map claims object `o` exists, the flag left clear, the object
    /// not created: what librbd leaves when a copy-up fails or its client dies after it
    /// marked the object (it marks before the copy-up and takes nothing back).
    pub(super) fn claim_in_map(&self, o: u64) {
        let mut s = self.lock();
        let map = ObjectMap::decode(&s.maps[&None]).unwrap();
        map.set(o, ObjectState::Exists);
        s.maps.insert(None, map.encode());
    }

    /// The head's header flags now.
    pub(super) fn flags(&self) -> u64 {
        self.lock().header.flags
    }

    /// The head's features now.
    pub(super) fn features(&self) -> u64 {
        self.lock().header.features
    }

    /// Whether a head object map is stored.
    pub(super) fn has_map(&self) -> bool {
        self.lock().maps.contains_key(&None)
    }

    /// Whether the header flags the head's object map invalid.
    pub(super) fn flagged_invalid(&self) -> bool {
        self.flags() & RBD_FLAG_OBJECT_MAP_INVALID != 0
    }

    /// Snapshot `id`'s header flags.
    pub(super) fn snapshot_flags(&self, id: u64) -> u64 {
        self.lock().snap_flags[&id]
    }

    /// Snapshot `id`'s object map as stored.
    pub(super) fn stored_snap_map(&self, id: u64) -> ObjectMap {
        ObjectMap::decode(&self.lock().maps[&Some(id)]).unwrap()
    }

    /// The head's object map as stored.
    pub(super) fn stored_map(&self) -> ObjectMap {
        ObjectMap::decode(&self.lock().maps[&None]).unwrap()
    }

    /// The head's data objects that exist, ascending.
    pub(super) fn objects(&self) -> Vec<u64> {
        self.lock().objects.keys().copied().collect()
    }

    /// The calls recorded since the last `take_log`.
    pub(super) fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().log)
    }

    /// Under a clear flag the map on disk is trusted, so a data operation may only
    /// touch what it says is EXISTS, and leave it so: a removal, or anything on an
    /// object not EXISTS there, must come after the flag was set. (Sound under
    /// concurrency: only a checkpoint clears the flag or writes the map, and none runs
    /// while a request is in its store call.)
    fn audit(&self, op: &str, objno: u64) {
        // No map to keep right: the feature is off.
        if !self.audit || self.flagged_invalid() || self.features() & RBD_FEATURE_OBJECT_MAP == 0 {
            return;
        }
        let on_disk = self.stored_map().get(objno);
        assert!(
            op != "remove" && on_disk == ObjectState::Exists,
            "{op}({objno}) under a clear flag, the map on disk saying {on_disk:?}"
        );
    }
}

impl ImageStore for MemImage {
    fn header(&self) -> ImageHeader {
        let s = self.lock();
        let mut h = s.header.clone();
        if let Some(id) = self.snap {
            h.flags = s.snap_flags[&id];
            // A snapshot's header is as big as the snapshot.
            if let Some(info) = s.header.snaps.iter().find(|i| i.id == id) {
                h.size = info.size;
            }
        }
        h
    }
    async fn refresh_header(&self) -> Result<ImageHeader> {
        Ok(self.header())
    }
    async fn set_size(&self, size: u64) -> Result<()> {
        self.writable("resized");
        self.note(format!("set_size({size})"));
        let mut s = self.lock();
        s.header.size = size;
        // As cls_rbd's set_size: a shrink lowers the parent overlap, growing never raises it.
        if let Some(p) = s.header.parent.as_mut() {
            p.overlap = p.overlap.min(size);
        }
        Ok(())
    }
    async fn set_flags(&self, value: u64, mask: u64) -> Result<()> {
        self.writable("flagged");
        self.take_time().await;
        self.note(format!("set_flags({value})"));
        let mut s = self.lock();
        s.header.flags = (s.header.flags & !mask) | (value & mask);
        Ok(())
    }
    async fn get_meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self.lock().meta.get(key).cloned())
    }
    async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.lock().meta.insert(key.into(), value.into());
        Ok(())
    }
    async fn read(&self, o: u64, off: u64, len: u64, snap: Option<u64>) -> Result<Option<Bytes>> {
        if self.snap.is_some() {
            assert_eq!(snap, self.snap, "reads go to the snapshot");
        }
        self.note("read");
        let s = self.lock();
        let obj = match snap {
            Some(id) if s.full_snaps.contains(&id) => s.clones.get(&(id, o)),
            Some(id) => s.clones.get(&(id, o)).or_else(|| s.objects.get(&o)),
            None => s.objects.get(&o),
        };
        Ok(obj.map(|v| {
            let lo = (off as usize).min(v.len());
            let hi = ((off + len) as usize).min(v.len());
            Bytes::copy_from_slice(&v[lo..hi])
        }))
    }
    async fn write(&self, o: u64, off: u64, data: Bytes, _durable: bool) -> Result<()> {
        self.writable("written");
        self.audit("write", o);
        self.note(format!("write({o})"));
        let mut s = self.lock();
        let v = s.objects.entry(o).or_default();
        let end = off as usize + data.len();
        if v.len() < end {
            v.resize(end, 0);
        }
        v[off as usize..end].copy_from_slice(&data);
        Ok(())
    }
    async fn zero(&self, o: u64, off: u64, len: u64, _durable: bool) -> Result<()> {
        self.writable("written");
        self.audit("zero", o);
        self.note(format!("zero({o})"));
        if let Some(v) = self.lock().objects.get_mut(&o) {
            let lo = (off as usize).min(v.len());
            let hi = ((off + len) as usize).min(v.len());
            v[lo..hi].fill(0);
        }
        Ok(())
    }
    async fn remove(&self, o: u64, _durable: bool) -> Result<()> {
        if let Some(d) = self.slow_remove {
            use std::sync::atomic::Ordering::SeqCst;
            let now = self.removing.0.fetch_add(1, SeqCst) + 1;
            self.removing.1.fetch_max(now, SeqCst);
            tokio::time::sleep(d).await;
            self.removing.0.fetch_sub(1, SeqCst);
        }
        self.writable("written");
        self.audit("remove", o);
        self.note(format!("remove({o})"));
        self.lock().objects.remove(&o);
        Ok(())
    }
    async fn sync(&self) -> Result<()> {
        self.take_time().await;
        self.note("sync");
        Ok(())
    }
    async fn list_objects(&self, snap: Option<u64>) -> Result<Vec<u64>> {
        let objs: Vec<u64> = {
            let s = self.lock();
            match snap {
                // A full snapshot knows what it has.
                Some(id) if s.full_snaps.contains(&id) => {
                    s.clones.keys().filter(|k| k.0 == id).map(|k| k.1).collect()
                }
                // Otherwise a listing shows the head's objects, never a snapshot's clones.
                _ => s.objects.keys().copied().collect(),
            }
        };
        // Held after it looked: what requests do meanwhile, it misses.
        if let (None, Some(h)) = (snap, &self.hold) {
            h.pass().await?;
        }
        Ok(objs)
    }
    async fn read_object_map(&self, snap: Option<u64>) -> Result<Option<Vec<u8>>> {
        if self.snap.is_some() {
            assert_eq!(snap, self.snap, "the snapshot's own map");
        }
        Ok(self.lock().maps.get(&snap).cloned())
    }
    async fn write_object_map(&self, data: Vec<u8>) -> Result<()> {
        self.writable("given a new map");
        self.note("write_object_map");
        self.lock().maps.insert(None, data);
        Ok(())
    }
    async fn close(&self) -> Result<()> {
        self.note("close");
        Ok(())
    }
    async fn set_features(&self, value: u64, mask: u64) -> Result<()> {
        self.writable("given new features");
        self.note(format!("set_features({value:#x}, {mask:#x})"));
        let mut s = self.lock();
        s.header.features = (s.header.features & !mask) | (value & mask);
        Ok(())
    }
    async fn remove_object_maps(&self) -> Result<()> {
        self.writable("stripped of its maps");
        self.note("remove_object_maps");
        self.lock().maps.clear();
        Ok(())
    }
    fn opened_without_lock(&self) -> bool {
        self.snap.is_none() && self.lock().lock_away
    }
    async fn release_lock(&self) -> Result<()> {
        self.note("release_lock");
        self.lock().lock_away = true;
        Ok(())
    }
    async fn reacquire_lock(&self) -> Result<()> {
        self.note("reacquire_lock");
        self.lock().lock_away = false;
        Ok(())
    }
    /// As Ceph's snapshot_add: the head's flags copied into the snapshot.
    async fn snap_create(&self, name: &str) -> Result<u64> {
        self.writable("snapshotted");
        self.note(format!("snap_create({name})"));
        let mut s = self.lock();
        let id = s.header.snap_seq + 1;
        let (size, flags) = (s.header.size, s.header.flags);
        s.header.snap_seq = id;
        s.header.snaps.insert(
            0,
            SnapInfo {
                id,
                name: name.into(),
                size,
                protected: false,
                timestamp: Some(1),
                namespace: Default::default(),
            },
        );
        s.snap_flags.insert(id, flags);
        s.full_snaps.insert(id);
        let copies: Vec<_> = s.objects.iter().map(|(o, d)| (*o, d.clone())).collect();
        for (o, d) in copies {
            s.clones.insert((id, o), d);
        }
        Ok(id)
    }
    async fn snap_remove(&self, id: u64) -> Result<()> {
        self.writable("changed");
        self.note(format!("snap_remove({id})"));
        let mut s = self.lock();
        s.header.snaps.retain(|x| x.id != id);
        s.clones.retain(|k, _| k.0 != id);
        s.maps.remove(&Some(id));
        s.snap_flags.remove(&id);
        s.full_snaps.remove(&id);
        Ok(())
    }
    async fn rename(&self, _dest: &str) -> Result<()> {
        Ok(())
    }

    async fn snap_rename(&self, id: u64, new_name: &str) -> Result<()> {
        let mut s = self.lock();
        for x in s.header.snaps.iter_mut().filter(|x| x.id == id) {
            x.name = new_name.into();
        }
        Ok(())
    }
    async fn snap_set_protected(&self, id: u64, protected: bool) -> Result<()> {
        let mut s = self.lock();
        for x in s.header.snaps.iter_mut().filter(|x| x.id == id) {
            x.protected = protected;
        }
        Ok(())
    }
    async fn write_snap_object_map(&self, snap: u64, data: Vec<u8>) -> Result<()> {
        self.writable("changed");
        self.note(format!("write_snap_object_map({snap})"));
        self.lock().maps.insert(Some(snap), data);
        Ok(())
    }
    async fn holds_no_data(&self, o: u64) -> Result<bool> {
        Ok(self.punches
            && self
                .lock()
                .objects
                .get(&o)
                .is_some_and(|v| v.iter().all(|&b| b == 0)))
    }
    async fn open_parent(&self) -> Result<Option<Self>> {
        self.note("open_parent");
        Ok(self.lock().parent.clone())
    }
    async fn copyup(
        &self,
        o: u64,
        parent_data: Bytes,
        op: ObjectWrite,
        _durable: bool,
    ) -> Result<()> {
        self.writable("written");
        self.audit("copyup", o);
        // A slow copy-up (a round trip to the OSD) is where a racing write could slip in.
        self.take_time().await;
        let mut s = self.lock();
        if s.failing_copyups > 0 {
            s.failing_copyups -= 1;
            s.log.push(format!("copyup_failed({o})"));
            return Err(crate::error::Error::new(
                crate::error::ErrorKind::Io,
                "copy-up failed (test store)",
            ));
        }
        // Logged apart: a copy-up that created the object, or only the op on one there.
        let created = !s.objects.contains_key(&o);
        s.log.push(if created {
            format!("copyup({o})")
        } else {
            format!("copyup_op({o})")
        });
        let v = s.objects.entry(o).or_insert_with(|| parent_data.to_vec());
        match op {
            ObjectWrite::None => {}
            ObjectWrite::Write { off, data } => {
                let end = off as usize + data.len();
                if v.len() < end {
                    v.resize(end, 0);
                }
                v[off as usize..end].copy_from_slice(&data);
            }
            ObjectWrite::Zero { off, len } => {
                let lo = (off as usize).min(v.len());
                let hi = ((off + len) as usize).min(v.len());
                v[lo..hi].fill(0);
            }
            ObjectWrite::Truncate { len } => v.resize(len as usize, 0),
        }
        Ok(())
    }
    async fn detach_parent(&self) -> Result<()> {
        self.writable("flattened");
        self.note("detach_parent");
        let mut s = self.lock();
        s.header.parent = None;
        s.parent = None;
        Ok(())
    }
    async fn snap_flags(&self, snap: u64) -> Result<u64> {
        Ok(self.lock().snap_flags[&snap])
    }
}
