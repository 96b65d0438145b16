//! The kernel-attach commands, as a clap `Subcommand` the main command line flattens.

use clap::{Args, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Clone, Subcommand)]
pub enum KernelCommand {
    /// Attach an image to a kernel /dev/nbdX device and print the device once it is usable;
    /// the serving daemon then stays in the background.
    Map(MapArgs),
    /// Disconnect a device: the kernel stops sending requests, the daemon answers those in
    /// flight, closes the image cleanly (flush, object map, dirty flag, lock) and exits.
    /// Fails when that close failed.
    Unmap(UnmapArgs),
    /// List the devices this host maps.
    ListMapped(ListMappedArgs),
    /// Serve a device the kernel kept after `detach` again (netlink reconfigure), so a
    /// daemon upgrade unmounts nothing.
    Attach(AttachArgs),
    /// Stop a device's daemon cleanly without disconnecting the device; the kernel holds
    /// I/O for --reattach-timeout seconds waiting for `attach`.
    Detach(DetachArgs),
}

/// Options shared by map and attach.
#[derive(Debug, Clone, Args)]
pub struct ServeOpts {
    /// Map read-only (always so for a snapshot).
    #[arg(long)]
    pub read_only: bool,
    /// Keep the image's exclusive lock while mapped, as rbd-nbd --exclusive: a librbd
    /// client (rbd bench, qemu) asking for it is refused instead of handed the lock (by
    /// default it gets it, and the next I/O here takes it back), and the exclusive lock
    /// is taken even when the image is marked shared.
    #[arg(long)]
    pub exclusive: bool,
    /// Ceph: when another client (a rados-nbd on the source host of a live migration,
    /// librbd) holds the image's lock, ask it to hand the lock over and wait for it (at
    /// most RADOS_NBD_LOCK_WAIT_SECS, 45 s), instead of failing with "in use".
    #[arg(long)]
    pub wait_for_lock: bool,
    /// Kernel request timeout in seconds (0 or unset: requests never time out).
    /// `--timeout` is the older name, as in rbd-nbd.
    #[arg(long = "io-timeout", visible_alias = "timeout", value_name = "SEC")]
    pub io_timeout: Option<u64>,
    /// How long the kernel keeps a device whose daemon went away waiting for `attach`.
    #[arg(long, value_name = "SEC", default_value_t = 30)]
    pub reattach_timeout: u64,
    /// After this many seconds with no map-changing write, write the object map and
    /// clear the dirty flag while mapped (see `serve --checkpoint-idle`). Off by default.
    #[arg(long, value_name = "SECONDS", value_parser = crate::parse::parse_checkpoint_idle)]
    pub checkpoint_idle: Option<std::time::Duration>,
    /// For a clone: the first read of an object it still reads from its parent copies the
    /// object into the clone in the background (see `serve --copy-on-read`).
    #[arg(long)]
    pub copy_on_read: bool,
    /// Run a quiesce hook around snapshots of the image taken while it is mapped (Ceph:
    /// `rbd snap create`; the directory store: `rados-nbd snap create`): `HOOK /dev/nbdX
    /// quiesce` before (the default hook freezes the file system mounted from the device),
    /// `HOOK /dev/nbdX unquiesce` after. A failing hook fails the snapshot.
    #[arg(long)]
    pub quiesce: bool,
    /// The hook for --quiesce (default /usr/libexec/rados-nbd/rados-nbd_quiesce).
    #[arg(long, value_name = "PATH", requires = "quiesce")]
    pub quiesce_hook: Option<PathBuf>,
    /// Sockets (and kernel queues) per device; more than 1 needs a multi-connection-safe image.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub connections: u32,
    /// How the kernel reaches the daemon: `nbd` (/dev/nbdN, the default) or `ublk`
    /// (/dev/ublkbN: requests over io_uring, fewer copies; the device survives a daemon
    /// crash or upgrade until `attach`; needs Linux 6.0+ with CONFIG_BLK_DEV_UBLK).
    #[arg(long, value_enum, default_value_t = super::device::Transport::Nbd)]
    pub transport: super::device::Transport,
    /// ublk: hardware queues, each served by its own thread (default: one per CPU, at most 4).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: Option<u16>,
    /// ublk: requests in flight per queue (default 128).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub queue_depth: Option<u16>,
    /// Stay in the foreground (log to stderr, or to --log-file) instead of going to the
    /// background.
    #[arg(long)]
    pub foreground: bool,
    /// Write the daemon's pid here (removed when it exits).
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,
    /// Log to this file (appended) instead of syslog in the background or stderr in the
    /// foreground.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// The device's cookie (rbd-nbd's name for the kernel's NBD_ATTR_BACKEND_IDENTIFIER,
    /// shown in /sys/block/nbdN/backend): `map` gives the device this one instead of its
    /// own (`rados-nbd:STORE:IMAGE`); `attach` refuses a device whose cookie differs.
    #[arg(long, value_name = "COOKIE", value_parser = parse_cookie)]
    pub cookie: Option<String>,
    /// Print the device's cookie after its path (`/dev/nbdN COOKIE`), as rbd-nbd
    /// --show-cookie; only the path when the device has none (the ioctl interface).
    #[arg(long)]
    pub show_cookie: bool,
    /// Accepted for rbd-nbd's command lines: the netlink interface is always tried first.
    #[arg(long, hide = true)]
    pub try_netlink: bool,
    /// Refused with a clear message: rados-nbd has no client-side encryption.
    #[arg(long, hide = true, value_name = "FORMAT")]
    pub encryption_format: Option<String>,
    /// Refused with a clear message: rados-nbd has no client-side encryption.
    #[arg(long, hide = true, value_name = "PATH")]
    pub encryption_passphrase_file: Option<PathBuf>,
    /// Internal: the pipe on which a background daemon reports readiness to `map`.
    #[arg(long, value_name = "FD", hide = true)]
    pub ready_fd: Option<i32>,
}

/// A cookie goes to the kernel as a netlink string and comes back as one line of sysfs:
/// any text without control characters (rbd-nbd takes any), at most 1024 bytes. (One
/// with spaces is taken, as by rbd-nbd, but splits list-mapped's plain columns.)
fn parse_cookie(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 1024 {
        return Err("a cookie is 1 to 1024 bytes".into());
    }
    if s.chars().any(char::is_control) {
        return Err("a cookie has no control characters (no newline, no tab)".into());
    }
    Ok(s.to_string())
}

#[derive(Debug, Clone, Args)]
pub struct MapArgs {
    /// [POOL/]NAME[@SNAP]
    pub image: String,
    /// Use this device (/dev/nbdN) instead of any free one.
    #[arg(long, value_name = "/dev/nbdN")]
    pub device: Option<String>,
    /// nbd module parameter, used only when this command loads the module.
    /// `--nbds_max` is rbd-nbd's spelling.
    #[arg(long, alias = "nbds_max", value_name = "N")]
    pub nbds_max: Option<u32>,
    /// nbd module parameter, used only when this command loads the module.
    /// `--max_part` is rbd-nbd's spelling.
    #[arg(long, alias = "max_part", value_name = "N")]
    pub max_part: Option<u32>,
    #[command(flatten)]
    pub opts: ServeOpts,
}

#[derive(Debug, Clone, Args)]
pub struct UnmapArgs {
    /// /dev/nbdN or [POOL/]NAME[@SNAP]
    pub target: String,
    /// Disconnect even when the device is mounted or held (its users get I/O errors).
    #[arg(long)]
    pub force: bool,
    /// How long to wait for the daemon to finish its clean close.
    #[arg(long, value_name = "SEC", default_value_t = 300)]
    pub wait_timeout: u64,
}

impl KernelCommand {
    /// The serving options of `map` and `attach`.
    pub fn serve_opts(&self) -> Option<&ServeOpts> {
        match self {
            KernelCommand::Map(m) => Some(&m.opts),
            KernelCommand::Attach(a) => Some(&a.opts),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ListFormat {
    Plain,
    Json,
    /// rbd-nbd's XML: a devices element with one device element per mapping (id, pool,
    /// namespace, image, snap, device).
    Xml,
}

#[derive(Debug, Clone, Args)]
pub struct ListMappedArgs {
    #[arg(long, value_enum, default_value_t = ListFormat::Plain)]
    pub format: ListFormat,
    /// Indented json or xml, as rbd-nbd --pretty-format.
    #[arg(long)]
    pub pretty_format: bool,
}

#[derive(Debug, Clone, Args)]
pub struct AttachArgs {
    /// [POOL/]NAME[@SNAP] (the same image the device was mapped with)
    pub image: String,
    /// The device to re-attach (/dev/nbdN).
    #[arg(long, value_name = "/dev/nbdN")]
    pub device: String,
    #[command(flatten)]
    pub opts: ServeOpts,
}

#[derive(Debug, Clone, Args)]
pub struct DetachArgs {
    /// /dev/nbdN or [POOL/]NAME[@SNAP]
    pub target: String,
    #[arg(long, value_name = "SEC", default_value_t = 300)]
    pub wait_timeout: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct T {
        #[command(subcommand)]
        cmd: KernelCommand,
    }

    #[test]
    fn map_options_parse() {
        let t = T::try_parse_from([
            "x",
            "map",
            "p/img@s",
            "--device",
            "/dev/nbd2",
            "--read-only",
            "--exclusive",
            "--timeout",
            "60",
            "--nbds-max",
            "8",
            "--max-part",
            "4",
            "--connections",
            "2",
            "--foreground",
            "--pid-file",
            "/run/p",
            "--log-file",
            "/tmp/l",
        ])
        .unwrap();
        let KernelCommand::Map(m) = t.cmd else {
            panic!("not map")
        };
        assert_eq!(m.image, "p/img@s");
        assert_eq!(m.device.as_deref(), Some("/dev/nbd2"));
        assert!(m.opts.read_only && m.opts.exclusive && m.opts.foreground);
        assert_eq!(m.opts.io_timeout, Some(60));
        assert_eq!(
            (m.nbds_max, m.max_part, m.opts.connections),
            (Some(8), Some(4), 2)
        );
        assert_eq!(m.opts.reattach_timeout, 30);
        let t = T::try_parse_from(["x", "map", "img", "--io-timeout", "5"]).unwrap();
        let KernelCommand::Map(m) = t.cmd else {
            panic!("not map")
        };
        assert_eq!(m.opts.io_timeout, Some(5));
        assert_eq!(m.opts.checkpoint_idle, None, "off by default");
        assert!(T::try_parse_from(["x", "map"]).is_err());
        let t = T::try_parse_from(["x", "map", "img", "--checkpoint-idle", "30"]).unwrap();
        let KernelCommand::Map(m) = t.cmd else {
            panic!("not map")
        };
        assert_eq!(
            m.opts.checkpoint_idle,
            Some(std::time::Duration::from_secs(30))
        );
        assert!(T::try_parse_from(["x", "map", "img", "--checkpoint-idle", "0"]).is_err());
        assert!(!m.opts.copy_on_read, "off by default");
        let t = T::try_parse_from([
            "x",
            "attach",
            "img",
            "--device",
            "/dev/nbd0",
            "--copy-on-read",
        ])
        .unwrap();
        let KernelCommand::Attach(a) = t.cmd else {
            panic!("not attach")
        };
        assert!(a.opts.copy_on_read);
        assert!(
            !a.opts.quiesce && a.opts.quiesce_hook.is_none(),
            "off by default"
        );
        let t =
            T::try_parse_from(["x", "map", "img", "--quiesce", "--quiesce-hook", "/h"]).unwrap();
        let KernelCommand::Map(m) = t.cmd else {
            panic!("not map")
        };
        assert!(m.opts.quiesce);
        assert_eq!(m.opts.quiesce_hook, Some(PathBuf::from("/h")));
        assert!(
            T::try_parse_from(["x", "map", "img", "--quiesce-hook", "/h"]).is_err(),
            "a hook without --quiesce"
        );
    }

    #[test]
    fn rbd_nbd_spellings_of_module_parameters() {
        let parse = |args: &[&str]| {
            let t = T::try_parse_from(["x", "map", "img"].iter().chain(args)).unwrap();
            let KernelCommand::Map(m) = t.cmd else {
                panic!("not map")
            };
            (m.nbds_max, m.max_part)
        };
        assert_eq!(
            parse(&["--nbds_max", "16", "--max_part", "8"]),
            (Some(16), Some(8))
        );
        assert_eq!(parse(&["--nbds-max=3", "--max_part=2"]), (Some(3), Some(2)));
        assert_eq!(parse(&["--nbds_max=5"]), (Some(5), None));
        assert_eq!(parse(&[]), (None, None));
        // Both spellings name one option: giving it twice is an error, as for any option.
        assert!(
            T::try_parse_from(["x", "map", "img", "--nbds-max", "1", "--nbds_max", "2"]).is_err()
        );
        // attach loads no module, so it has neither.
        assert!(T::try_parse_from([
            "x",
            "attach",
            "--device",
            "/dev/nbd0",
            "img",
            "--nbds_max",
            "2"
        ])
        .is_err());
    }

    #[test]
    fn rbd_nbd_cookie_and_compatibility_options() {
        let t = T::try_parse_from([
            "x",
            "map",
            "img",
            "--show-cookie",
            "--cookie",
            "c-1",
            "--try-netlink",
        ])
        .unwrap();
        let KernelCommand::Map(m) = t.cmd else {
            panic!("not map")
        };
        assert!(m.opts.show_cookie && m.opts.try_netlink);
        assert_eq!(m.opts.cookie.as_deref(), Some("c-1"));
        let t = T::try_parse_from([
            "x",
            "attach",
            "--device",
            "/dev/nbd0",
            "img",
            "--cookie",
            "c",
        ])
        .unwrap();
        let KernelCommand::Attach(a) = t.cmd else {
            panic!("not attach")
        };
        assert_eq!(a.opts.cookie.as_deref(), Some("c"));
        // A cookie is one line of text: it comes back through sysfs. Ours, with a
        // UTF-8 image name, or an older version's, with spaces, are taken back.
        for good in ["rados-nbd:dir:/x:rbd/vé", "rados-nbd dir:/x rbd/vm1"] {
            assert!(T::try_parse_from(["x", "map", "img", "--cookie", good]).is_ok());
        }
        for bad in ["", "tab\there", "new\nline"] {
            assert!(
                T::try_parse_from(["x", "map", "img", "--cookie", bad]).is_err(),
                "{bad:?}"
            );
        }
        assert!(T::try_parse_from(["x", "map", "img", "--cookie", &"x".repeat(1025)]).is_err());
        // Encryption options parse, to be refused with a sentence when the map starts.
        let t = T::try_parse_from(["x", "map", "img", "--encryption-format", "luks2"]).unwrap();
        let KernelCommand::Map(m) = t.cmd else {
            panic!("not map")
        };
        assert_eq!(m.opts.encryption_format.as_deref(), Some("luks2"));
        let t =
            T::try_parse_from(["x", "list-mapped", "--format", "xml", "--pretty-format"]).unwrap();
        assert!(matches!(
            t.cmd,
            KernelCommand::ListMapped(ListMappedArgs {
                format: ListFormat::Xml,
                pretty_format: true
            })
        ));
    }

    #[test]
    fn other_commands_parse() {
        let t = T::try_parse_from(["x", "unmap", "/dev/nbd0", "--force"]).unwrap();
        assert!(matches!(
            t.cmd,
            KernelCommand::Unmap(UnmapArgs { force: true, .. })
        ));
        let t = T::try_parse_from(["x", "list-mapped", "--format", "json"]).unwrap();
        assert!(matches!(
            t.cmd,
            KernelCommand::ListMapped(ListMappedArgs {
                format: ListFormat::Json,
                pretty_format: false,
            })
        ));
        let t = T::try_parse_from(["x", "attach", "--device", "/dev/nbd1", "vm1"]).unwrap();
        assert!(matches!(t.cmd, KernelCommand::Attach(_)));
        assert!(T::try_parse_from(["x", "attach", "vm1"]).is_err());
        let t = T::try_parse_from(["x", "detach", "rbd/vm1"]).unwrap();
        assert!(matches!(t.cmd, KernelCommand::Detach(_)));
    }
}
