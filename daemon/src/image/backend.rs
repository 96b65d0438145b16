//! The data plane: the NBD [`Backend`] an open image serves.

use super::pieces::all_pieces;
use super::pieces::split;
use super::{Image, MAX_BLOCK};
use crate::store::ImageStore;
use bytes::Bytes;
use futures_util::future::try_join_all;
use nbd_protocol::{Backend, BackendError, Errno, ExportInfo, Extent, ReadChunk, ZeroFlags};
use objmap::ObjectState;

impl<S: ImageStore> Image<S> {
    /// Holds `gate` shared for a request (close and checkpoints wait for it): ESHUTDOWN
    /// once the image is closing.
    ///
    /// While the lock is another client's (handed over), the lock is taken back first:
    /// the map in memory is stale then, so no read, write or block-status answer may
    /// come from it.
    async fn enter(&self) -> Result<tokio::sync::RwLockReadGuard<'_, bool>, BackendError> {
        loop {
            let g = self.gate.read().await;
            if *g {
                return Err(BackendError::new(Errno::Shutdown, "the image is closing"));
            }
            if !self.released.load(std::sync::atomic::Ordering::Acquire) {
                return Ok(g);
            }
            drop(g);
            self.take_lock_back().await?;
        }
    }

    /// Like `enter` for a request that only reads (READ, BLOCK_STATUS): librbd reads
    /// without the exclusive lock, and so do we. While the lock is another client's the
    /// request runs without it and must not trust the map in memory (stale: the other
    /// owner creates and removes objects); `true` then. A take-back waits for `gate`, so
    /// the lock cannot come back (and the map be replaced) under such a request.
    async fn enter_to_read(
        &self,
    ) -> Result<(tokio::sync::RwLockReadGuard<'_, bool>, bool), BackendError> {
        let g = self.gate.read().await;
        if *g {
            return Err(BackendError::new(Errno::Shutdown, "the image is closing"));
        }
        let away = self.released.load(std::sync::atomic::Ordering::Acquire);
        Ok((g, away))
    }

    /// The protocol checked the request against the size its client was told; the image
    /// may have shrunk since (a resize while connected), so check again against now.
    fn in_range(&self, offset: u64, length: u64, errno: Errno) -> Result<(), BackendError> {
        let size = self.size();
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BackendError::new(
                errno,
                format!(
                    "{offset}+{length} lies beyond the end of {} ({size} bytes since a resize)",
                    self.spec
                ),
            )),
        }
    }
}

impl<S: ImageStore> Backend for Image<S> {
    fn current_size(&self) -> Option<u64> {
        Some(self.size())
    }

    fn info(&self) -> ExportInfo {
        let rw = !self.read_only;
        ExportInfo {
            size: self.size(),
            read_only: self.read_only,
            can_flush: rw,
            can_fua: rw,
            can_trim: rw,
            can_write_zeroes: rw,
            can_fast_zero: rw,
            can_cache: true,
            can_df: true,
            // One Image is shared by every connection and FLUSH syncs the whole store.
            can_multi_conn: true,
            min_block: 1,
            preferred_block: 4096,
            max_block: MAX_BLOCK,
            description: format!("rbd image {}", self.spec),
        }
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Vec<ReadChunk>, BackendError> {
        // While the lock is away `read_piece` asks the store for every object (see
        // `is_nonexistent`), as a reader without a trusted map must.
        let (_g, _away) = self.enter_to_read().await?;
        self.in_range(offset, length as u64, Errno::Inval)?;
        self.store.note_io(false);
        let pieces = split(self.order(), offset, length as u64);
        if let [p] = pieces[..] {
            // Most requests lie in one object: no join machinery, no merging.
            return Ok(self.read_piece(p).await?);
        }
        let parts = try_join_all(pieces.into_iter().map(|p| self.read_piece(p))).await?;
        let mut out: Vec<ReadChunk> = Vec::new();
        for c in parts.into_iter().flatten() {
            match (out.last_mut(), c) {
                (Some(ReadChunk::Hole(a)), ReadChunk::Hole(b)) => *a += b,
                (_, c) => out.push(c),
            }
        }
        Ok(out)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BackendError> {
        let _g = self.enter().await?;
        self.check_writable()?;
        self.in_range(offset, data.len() as u64, Errno::NoSpc)?;
        self.store.note_io(true);
        let pieces = split(self.order(), offset, data.len() as u64);
        self.dirty_before(|| {
            pieces
                .iter()
                .any(|p| self.needs_map_change(p.objno, ObjectState::Exists))
        })
        .await?;
        if let [p] = pieces[..] {
            self.write_piece(p, data, fua).await?;
            return Ok(());
        }
        // Every piece is waited for, failed or not, before the request is answered:
        // dropping the others at the first error would leave them in flight (or held
        // behind another write, to be sent later) after the answer, outside the gate
        // that a hand-over of the lock or a close waits on.
        all_pieces(pieces.into_iter().map(|p| {
            let d = data.slice(p.req_off as usize..(p.req_off + p.len) as usize);
            self.write_piece(p, d, fua)
        }))
        .await?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), BackendError> {
        // Everything was synced before the lock was handed over: nothing to take back.
        if self.lock_released() {
            return Ok(());
        }
        // As librbd's flush: the copy-on-read copy-ups asked before it are done first.
        self.wait_copy_on_read().await;
        let _g = self.enter().await?;
        self.store.sync().await?;
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), BackendError> {
        let _g = self.enter().await?;
        self.in_range(offset, length as u64, Errno::Inval)?;
        self.check_writable()?;
        self.store.note_io(true);
        self.discard(offset, length, fua, false).await?;
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        flags: ZeroFlags,
    ) -> Result<(), BackendError> {
        let _g = self.enter().await?;
        if flags.fast_zero && flags.no_hole {
            // Keeping the range allocated means writing zeros: not fast.
            return Err(BackendError::new(
                Errno::NotSup,
                "zeroing with NO_HOLE writes data and is not fast",
            ));
        }
        if flags.fast_zero && !self.store.zeroes_are_fast() {
            // Whole objects are removed (fast); part of one would be written with zeros
            // (the short last object of an image too: never whole, see discard_piece).
            let osize = self.header.object_size();
            let partial = split(self.order(), offset, length as u64)
                .iter()
                .any(|p| p.off != 0 || p.len != osize);
            if partial {
                return Err(BackendError::new(
                    Errno::NotSup,
                    "the store cannot punch holes here: zeroing part of an object writes zeros, not fast",
                ));
            }
        }
        self.in_range(offset, length as u64, Errno::NoSpc)?;
        self.check_writable()?;
        self.store.note_io(true);
        self.discard(offset, length, flags.fua, flags.no_hole)
            .await?;
        Ok(())
    }

    async fn cache(&self, _offset: u64, _length: u32) -> Result<(), BackendError> {
        // Advisory; the store has no cache of its own to warm.
        Ok(())
    }

    async fn block_status(&self, offset: u64, length: u32) -> Result<Vec<Extent>, BackendError> {
        let (_g, away) = self.enter_to_read().await?;
        // After a shrink (the client still has the old size): EINVAL from the new end on,
        // as a read there gets; a range across it is described up to it (a reply may
        // cover less than was asked).
        self.in_range(offset, 1, Errno::Inval)?;
        let length = (length as u64).min(self.size() - offset) as u32;
        if away {
            // The map in memory is stale while another client writes: say "data" for
            // the whole range, which is never wrong (the protocol allows an extent
            // state to be less precise than the truth).
            return Ok(vec![Extent {
                length: length as u64,
                flags: 0,
            }]);
        }
        Ok(self.extents(offset, length as u64))
    }
}
