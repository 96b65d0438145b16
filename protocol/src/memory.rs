//! A sparse in-memory backend, for tests and the `memserver` example. Storage is a map of
//! 64 KiB pages: a page never written (or fully trimmed) is a hole, so reads produce
//! `ReadChunk::Hole` and block status reports holes, exercising the same paths a real
//! sparse image does.

use crate::backend::*;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

pub const PAGE: u64 = 64 * 1024;

pub struct MemoryBackend {
    size: AtomicU64,
    read_only: bool,
    /// Added before each write/read is applied, so tests can keep requests in flight.
    write_delay: Duration,
    read_delay: Duration,
    pages: Mutex<BTreeMap<u64, Box<[u8]>>>,
    /// Counters tests use to see what actually reached the backend.
    pub reads_started: AtomicU64,
    pub writes_done: AtomicU64,
    pub flushes: AtomicU64,
}

impl MemoryBackend {
    pub fn new(size: u64) -> Self {
        MemoryBackend {
            size: AtomicU64::new(size),
            read_only: false,
            write_delay: Duration::ZERO,
            read_delay: Duration::ZERO,
            pages: Mutex::new(BTreeMap::new()),
            reads_started: AtomicU64::new(0),
            writes_done: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        }
    }

    /// Changes the size, as a resized image would (data past a smaller end stays stored).
    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    pub fn read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }

    pub fn write_delay(mut self, d: Duration) -> Self {
        self.write_delay = d;
        self
    }

    pub fn read_delay(mut self, d: Duration) -> Self {
        self.read_delay = d;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Box<[u8]>>> {
        // A panic while holding the lock cannot leave a page half-updated in a way that
        // matters for a test store, so a poisoned lock is still usable.
        self.pages.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls `f(page_index, offset_in_page, len)` for each page piece of a range.
    fn for_each_piece(offset: u64, length: u64, mut f: impl FnMut(u64, usize, usize)) {
        let mut pos = offset;
        let end = offset + length;
        while pos < end {
            let page = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = ((PAGE - pos % PAGE).min(end - pos)) as usize;
            f(page, in_page, n);
            pos += n as u64;
        }
    }

    /// Contents of a range as one buffer (holes as zeros); for tests.
    pub fn snapshot(&self, offset: u64, length: usize) -> Vec<u8> {
        let pages = self.lock();
        let mut out = Vec::with_capacity(length);
        Self::for_each_piece(offset, length as u64, |p, o, n| match pages.get(&p) {
            Some(d) => out.extend_from_slice(&d[o..o + n]),
            None => out.resize(out.len() + n, 0),
        });
        out
    }

    /// Number of allocated pages; for tests.
    pub fn allocated_pages(&self) -> usize {
        self.lock().len()
    }

    fn zero(&self, offset: u64, length: u32, keep_allocated: bool) {
        let mut pages = self.lock();
        Self::for_each_piece(offset, u64::from(length), |p, o, n| {
            if n as u64 == PAGE && !keep_allocated {
                pages.remove(&p);
            } else if let Some(d) = pages.get_mut(&p) {
                d[o..o + n].fill(0);
            } else if keep_allocated {
                pages.insert(p, vec![0u8; PAGE as usize].into_boxed_slice());
            }
        });
    }
}

impl Backend for MemoryBackend {
    fn current_size(&self) -> Option<u64> {
        Some(self.size.load(Ordering::Acquire))
    }

    fn info(&self) -> ExportInfo {
        ExportInfo {
            size: self.size.load(Ordering::Acquire),
            read_only: self.read_only,
            can_flush: true,
            can_fua: true,
            can_trim: true,
            can_write_zeroes: true,
            can_fast_zero: true,
            can_cache: true,
            can_df: true,
            // One shared map and no cache: what one connection acks, all see.
            can_multi_conn: true,
            min_block: 1,
            preferred_block: 4096,
            max_block: 32 * 1024 * 1024,
            description: "in-memory test export".into(),
        }
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Vec<ReadChunk>, BackendError> {
        self.reads_started.fetch_add(1, Ordering::SeqCst);
        if !self.read_delay.is_zero() {
            tokio::time::sleep(self.read_delay).await;
        }
        let pages = self.lock();
        let mut out: Vec<ReadChunk> = Vec::new();
        Self::for_each_piece(offset, u64::from(length), |p, o, n| match pages.get(&p) {
            Some(d) => out.push(ReadChunk::Data(Bytes::copy_from_slice(&d[o..o + n]))),
            None => match out.last_mut() {
                Some(ReadChunk::Hole(h)) => *h += n as u32,
                _ => out.push(ReadChunk::Hole(n as u32)),
            },
        });
        Ok(out)
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), BackendError> {
        if !self.write_delay.is_zero() {
            tokio::time::sleep(self.write_delay).await;
        }
        {
            let mut pages = self.lock();
            let mut src = 0usize;
            Self::for_each_piece(offset, data.len() as u64, |p, o, n| {
                let page = pages
                    .entry(p)
                    .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
                page[o..o + n].copy_from_slice(&data[src..src + n]);
                src += n;
            });
        }
        self.writes_done.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn flush(&self) -> Result<(), BackendError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u32, _fua: bool) -> Result<(), BackendError> {
        self.zero(offset, length, false);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        flags: ZeroFlags,
    ) -> Result<(), BackendError> {
        self.zero(offset, length, flags.no_hole);
        Ok(())
    }

    async fn cache(&self, _offset: u64, _length: u32) -> Result<(), BackendError> {
        Ok(())
    }

    async fn block_status(&self, offset: u64, length: u32) -> Result<Vec<Extent>, BackendError> {
        let pages = self.lock();
        let mut out = Vec::new();
        // One extent per page piece on purpose: the server must merge them.
        Self::for_each_piece(offset, u64::from(length), |p, _, n| {
            let flags = if pages.contains_key(&p) {
                0
            } else {
                STATE_HOLE | STATE_ZERO
            };
            out.push(Extent {
                length: n as u64,
                flags,
            });
        });
        Ok(out)
    }
}
