//! The old ioctl interface to the nbd driver, used only when the kernel has no `nbd`
//! generic-netlink family. Differences that matter (drivers/block/nbd.c):
//! - the device is configured step by step on an open fd of /dev/nbdX, and NBD_DO_IT blocks
//!   the calling thread for as long as the device is connected (so it runs in its own
//!   thread) and returns once every socket is gone;
//! - there is no reconfigure: a daemon restart cannot re-attach (attach/detach need netlink);
//! - only one socket per NBD_SET_SOCK, but several calls add several connections.

// The whole kernel ABI is spelled out here; not every item is used by the daemon.
#![allow(dead_code)]

use crate::error::{Error, ErrorKind, Result};
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

const fn io(nr: libc::c_ulong) -> libc::c_ulong {
    (0xab << 8) | nr
}
pub const NBD_SET_SOCK: libc::c_ulong = io(0);
pub const NBD_SET_BLKSIZE: libc::c_ulong = io(1);
pub const NBD_SET_SIZE: libc::c_ulong = io(2);
pub const NBD_DO_IT: libc::c_ulong = io(3);
pub const NBD_CLEAR_SOCK: libc::c_ulong = io(4);
pub const NBD_CLEAR_QUE: libc::c_ulong = io(5);
pub const NBD_SET_SIZE_BLOCKS: libc::c_ulong = io(7);
pub const NBD_DISCONNECT: libc::c_ulong = io(8);
pub const NBD_SET_TIMEOUT: libc::c_ulong = io(9);
pub const NBD_SET_FLAGS: libc::c_ulong = io(10);

fn ioctl(dev: &File, path: &str, name: &str, req: libc::c_ulong, arg: libc::c_ulong) -> Result<()> {
    // SAFETY: every nbd ioctl takes its argument by value (no pointer), so no memory is shared.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), req as _, arg) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        let kind = match e.raw_os_error() {
            Some(libc::EBUSY) => ErrorKind::Busy,
            Some(libc::EPERM) => ErrorKind::ReadOnly,
            _ => ErrorKind::Io,
        };
        return Err(Error::new(kind, format!("{name} on {path}: {e}")));
    }
    Ok(())
}

/// What the ioctl path needs to configure a device.
#[derive(Debug, Clone)]
pub struct IoctlConfig {
    pub size_bytes: u64,
    pub block_size: u64,
    pub server_flags: u64,
    pub timeout: Option<u64>,
    pub sockets: Vec<RawFd>,
}

/// An nbd device opened for ioctls.
pub struct IoctlDevice {
    path: String,
    dev: File,
}

impl IoctlDevice {
    pub fn open(path: &str) -> Result<Self> {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format!("opening {path}"), e))?;
        Ok(IoctlDevice {
            path: path.to_string(),
            dev,
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Everything before NBD_DO_IT. On failure the sockets already given are taken back.
    pub fn configure(&self, c: &IoctlConfig) -> Result<()> {
        let res = (|| -> Result<()> {
            for fd in &c.sockets {
                ioctl(
                    &self.dev,
                    &self.path,
                    "NBD_SET_SOCK",
                    NBD_SET_SOCK,
                    *fd as _,
                )?;
            }
            ioctl(
                &self.dev,
                &self.path,
                "NBD_SET_BLKSIZE",
                NBD_SET_BLKSIZE,
                c.block_size as _,
            )?;
            // NBD_SET_SIZE takes an unsigned long (64-bit here), so no block-count detour.
            ioctl(
                &self.dev,
                &self.path,
                "NBD_SET_SIZE",
                NBD_SET_SIZE,
                c.size_bytes as _,
            )?;
            ioctl(
                &self.dev,
                &self.path,
                "NBD_SET_FLAGS",
                NBD_SET_FLAGS,
                c.server_flags as _,
            )?;
            if let Some(t) = c.timeout {
                ioctl(
                    &self.dev,
                    &self.path,
                    "NBD_SET_TIMEOUT",
                    NBD_SET_TIMEOUT,
                    t as _,
                )?;
            }
            Ok(())
        })();
        if let Err(e) = res {
            if e.kind == ErrorKind::Busy {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("{} is already in use ({})", self.path, e.message),
                ));
            }
            let _ = self.clear_sock();
            return Err(e);
        }
        Ok(())
    }

    /// Blocks until the device is disconnected. Run it on a dedicated thread.
    pub fn do_it(&self) -> Result<()> {
        let r = ioctl(&self.dev, &self.path, "NBD_DO_IT", NBD_DO_IT, 0);
        // The kernel wants the sockets and queue cleared after DO_IT returns, whatever it said.
        let _ = ioctl(&self.dev, &self.path, "NBD_CLEAR_QUE", NBD_CLEAR_QUE, 0);
        let _ = self.clear_sock();
        r
    }

    /// A new size for a running device (the image was resized); the kernel updates the
    /// capacity and tells user space (a RESIZE uevent), as after `rbd-nbd`'s resize.
    pub fn set_size(&self, size_bytes: u64) -> Result<()> {
        ioctl(
            &self.dev,
            &self.path,
            "NBD_SET_SIZE",
            NBD_SET_SIZE,
            size_bytes as _,
        )
    }

    pub fn clear_sock(&self) -> Result<()> {
        ioctl(&self.dev, &self.path, "NBD_CLEAR_SOCK", NBD_CLEAR_SOCK, 0)
    }

    /// Asks the kernel to send NBD_CMD_DISC on every socket; DO_IT then returns.
    pub fn disconnect(&self) -> Result<()> {
        ioctl(&self.dev, &self.path, "NBD_DISCONNECT", NBD_DISCONNECT, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_nbd_h() {
        // _IO(0xab, n): no direction, no size.
        assert_eq!(NBD_SET_SOCK, 0xab00);
        assert_eq!(NBD_SET_BLKSIZE, 0xab01);
        assert_eq!(NBD_SET_SIZE, 0xab02);
        assert_eq!(NBD_DO_IT, 0xab03);
        assert_eq!(NBD_CLEAR_SOCK, 0xab04);
        assert_eq!(NBD_CLEAR_QUE, 0xab05);
        assert_eq!(NBD_SET_SIZE_BLOCKS, 0xab07);
        assert_eq!(NBD_DISCONNECT, 0xab08);
        assert_eq!(NBD_SET_TIMEOUT, 0xab09);
        assert_eq!(NBD_SET_FLAGS, 0xab0a);
    }

    #[test]
    fn opening_a_missing_device_names_it() {
        let e = IoctlDevice::open("/nonexistent/nbd99").err().unwrap();
        assert!(e.message.contains("/nonexistent/nbd99"), "{}", e.message);
        assert_eq!(e.kind, ErrorKind::NotFound);
    }
}
