//! The locks, flock()s on files beside the images: the pool's, which serializes directory
//! changes between processes, and each image's, held by its writers.

use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

const POOL_LOCK: &str = "rbd_directory.lock";

/// How many more times (10 ms apart) a taken image lock is asked for (see `lock_image`).
const LOCK_RETRIES: usize = 10;

fn flock(f: &File, op: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let r = unsafe { libc::flock(f.as_raw_fd(), op) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Opens (creating it if need be) the file a lock is taken on; its content is never used.
fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))
}

/// Serializes directory changes (create/remove) between processes.
pub(super) fn lock_pool(pool_dir: &Path) -> Result<File> {
    let path = pool_dir.join(POOL_LOCK);
    let f = open_lock_file(&path)?;
    flock(&f, libc::LOCK_EX).map_err(|e| Error::io(format!("locking {}", path.display()), e))?;
    Ok(f)
}

/// Takes an image's lock without waiting: exclusive for a writer (a second writer is
/// refused), shared for the writers of a shared image (they exclude only exclusive ones).
pub(super) fn lock_image(
    pool_dir: &Path,
    id: &str,
    spec: &ImageSpec,
    exclusive: bool,
) -> Result<File> {
    let path = pool_dir.join(format!("rbd_header.{id}.lock"));
    let f = open_lock_file(&path)?;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    // A process forked by this one (a quiesce hook, a test's client) holds a copy of
    // every descriptor from its fork to its exec, so a lock this process has just
    // released can still be taken for a moment: ask again briefly before calling the
    // image in use (a real holder keeps it far longer).
    let mut r = flock(&f, op | libc::LOCK_NB);
    for _ in 0..LOCK_RETRIES {
        if !matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        r = flock(&f, op | libc::LOCK_NB);
    }
    match r {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
            let how = if exclusive {
                "opened for writing by another client"
            } else {
                "opened for exclusive writing by another client (not as a shared image)"
            };
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "image {}/{} is in use: {how} (lock {})",
                    spec.pool,
                    spec.name,
                    path.display()
                ),
            ));
        }
        Err(e) => return Err(Error::io(format!("locking {}", path.display()), e)),
    }
    Ok(f)
}
