//! Kernel attach: `map`, `unmap`, `list-mapped`, `attach`, `detach` (Linux only).
//!
//! How a mapping works: the daemon opens the image, makes one socketpair per connection,
//! serves one end of each with the transmission-phase server (no handshake) and hands the
//! other ends to the nbd driver with a netlink CONNECT (ioctls when the kernel lacks the
//! netlink family). `map` without `--foreground` re-executes this binary as
//! `map ... --foreground --ready-fd N` in a new session and waits for the child to report
//! "ready /dev/nbdX" on that pipe: no process with a tokio runtime is ever forked.
//!
//! Ending a mapping: `unmap` (or SIGTERM/SIGINT to the daemon, or a kernel-side disconnect
//! such as `nbd-client -d`) makes the kernel send NBD_CMD_DISC on every socket; the server
//! drains, the daemon closes the image cleanly (flush, object map, dirty flag, lock),
//! records how that close ended next to its state file and exits; `unmap` returns when that
//! pid is gone, and fails when the recorded close failed. Disconnect first, close second is
//! the safe order (rbd-nbd's too): only once the kernel sends nothing more can the flush and
//! the object map be the last word on the image. `detach` (SIGUSR1 to the daemon) does the
//! same drain and clean close but leaves the device configured; `attach` serves it again
//! through netlink RECONFIGURE within the kernel's dead-connection timeout.

pub mod cli;
mod daemon;
mod daemonize;
pub mod device;
pub mod export;
pub mod ioctl;
mod manage;
pub mod netlink;
#[cfg(feature = "ublk")]
pub mod ublk;

pub use daemonize::log_to_file;

use crate::error::Result;
use crate::store::{CephAccess, StoreUri};
use cli::KernelCommand;
use daemonize::{absolute, absolute_store};

/// Runs one kernel command. Synchronous on purpose: the serving daemon builds its own tokio
/// runtime after the (single-threaded) setup, so call this outside any runtime.
/// `store` is the resolved `--store` (recorded as `dir:/var/lib/rados-nbd`, ...).
pub fn run(cmd: KernelCommand, store: &StoreUri, mut ceph: CephAccess) -> Result<()> {
    // Paths as given are relative to the directory `map` ran in, which the background daemon
    // leaves (it must not pin that file system); recorded absolute, the store also reads the
    // same in list-mapped and in the backend identifier whatever directory a command ran in.
    ceph.keyring = ceph.keyring.map(|p| absolute(&p)).transpose()?;
    let store = &absolute_store(store)?.to_string();
    match cmd {
        KernelCommand::Map(a) => daemon::map(a, store, &ceph),
        KernelCommand::Unmap(a) => manage::unmap(a),
        KernelCommand::ListMapped(a) => manage::list_mapped(a),
        KernelCommand::Attach(a) => daemon::attach(a, store, &ceph),
        KernelCommand::Detach(a) => manage::detach(a),
    }
}

/// The netlink control socket, or None for the ioctl fallback: when the kernel has no `nbd`
/// family, or when `RADOS_NBD_FORCE_IOCTL=1` asks for it (to test the fallback).
fn open_netlink() -> Result<Option<netlink::NbdNetlink>> {
    if std::env::var_os("RADOS_NBD_FORCE_IOCTL").is_some_and(|v| v == "1") {
        return Ok(None);
    }
    netlink::NbdNetlink::open()
}
