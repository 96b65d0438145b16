//! The command line (this contract is used by other issues and by outside checks: keep
//! the names): the clap types only. What each command does lives in `crate::cmd`.

use crate::serve::ServeArgs;
use crate::store::CephAccess;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

pub use crate::store::uri::DEFAULT_STORE_DIR;

// What `--version` says: the version and the optional parts built in, so that a packager, a
// support request or a test can tell whether `--store ceph:` and `--transport ublk` work here
// (both are cargo features; without them the options exist and say they are not built in).
#[cfg(feature = "ceph")]
macro_rules! with_ceph {
    () => {
        "ceph"
    };
}
#[cfg(not(feature = "ceph"))]
macro_rules! with_ceph {
    () => {
        "no ceph"
    };
}
#[cfg(feature = "ublk")]
macro_rules! with_ublk {
    () => {
        "ublk"
    };
}
#[cfg(not(feature = "ublk"))]
macro_rules! with_ublk {
    () => {
        "no ublk"
    };
}
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (stores: dir, ",
    with_ceph!(),
    "; transports: nbd, ",
    with_ublk!(),
    ")"
);

#[derive(Parser, Debug)]
// `args_override_self`: a flag given twice takes its later value, in every subcommand.
// rados-nbdmap puts RADOS_NBD_MAP_OPTIONS (/etc/default/rados-nbd) before an nbdtab entry's
// own flags, and rados-nbd@.service RADOS_NBD_IMAGE_OPTIONS after it: the per-image one wins.
#[command(
    name = "rados-nbd",
    version = VERSION,
    about = "Serve Ceph RBD format-2 images over NBD with the object map kept in memory",
    args_override_self = true
)]
pub struct Cli {
    /// Where images live: `dir:PATH` (default: dir:$RADOS_NBD_STORE, else
    /// dir:/var/lib/rados-nbd) or `ceph:[CONF]`.
    #[arg(long, global = true, value_name = "URI")]
    pub store: Option<String>,

    /// Ceph client id for `--store ceph:` (like `rbd --id`: `admin`, not `client.admin`).
    #[arg(long, short = 'i', global = true, value_name = "ID")]
    pub id: Option<String>,

    /// Ceph client name, `client.ID` (like `rbd --name`): the same as `--id ID`.
    #[arg(
        long,
        short = 'n',
        global = true,
        value_name = "client.ID",
        conflicts_with = "id"
    )]
    pub name: Option<String>,

    /// Ceph configuration file, as in `rbd -c` and `rbd-nbd -c`: the image is in that
    /// cluster (the same as `--store ceph:PATH`).
    #[arg(long = "conf", short = 'c', global = true, value_name = "PATH")]
    pub conf: Option<PathBuf>,

    /// Ceph keyring file for `--store ceph:` (like `rbd --keyring`).
    #[arg(long, global = true, value_name = "PATH")]
    pub keyring: Option<PathBuf>,

    /// Serve a Ceph image that starts with a LUKS header (encrypted by librbd's `rbd
    /// encryption format`, or a volume cryptsetup made on the device) as its raw LUKS
    /// volume instead of refusing it: rados-nbd has no client-side encryption.
    #[arg(long, global = true)]
    pub allow_encrypted: bool,

    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,

    /// rbd-nbd's (Ceph's) `-d` and `-f`, before or after the command: run `map` or
    /// `attach` in the foreground, as `--foreground` does (rbd-nbd's `-d` logs to stderr,
    /// `-f` to its log file: ours logs to stderr, or to --log-file, either way).
    #[arg(short = 'd', short_alias = 'f', global = true, hide = true)]
    pub rbd_nbd_foreground: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    #[default]
    Plain,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct CreateArgs {
    /// Image size: MiB as in `rbd create` (`--size 10240` is 10 GiB), or with a unit
    /// (B for bytes, K/M/G/T/P).
    #[arg(long, short = 's')]
    pub size: String,
    /// Object size, a power of two from 4K to 32M (default: rbd_default_order as the
    /// store is configured, else 4M).
    #[arg(long)]
    pub object_size: Option<String>,
    /// Features, as `rbd create --image-feature` takes them: names (layering,
    /// exclusive-lock, object-map, fast-diff, deep-flatten), repeated or comma-separated
    /// (default: rbd_default_features as the store is configured, else all five).
    #[arg(long = "image-feature", value_name = "FEATURE")]
    pub image_features: Vec<String>,
    /// Ceph: keep the data objects in this pool (e.g. an erasure-coded one with
    /// allow_ec_overwrites), the header and object map in the image's own, like
    /// `rbd create --data-pool`.
    #[arg(long, value_name = "POOL")]
    pub data_pool: Option<String>,
    /// Ceph: stripe unit (B/K/M), with --stripe-count 1: a factor of the object size,
    /// as `rbd create --stripe-unit` (default: rbd_default_stripe_unit as configured).
    /// Only one object per stripe is served (the plain layout).
    #[arg(long, value_name = "SIZE")]
    pub stripe_unit: Option<String>,
    /// Ceph: stripe count, 1 (default: rbd_default_stripe_count as configured).
    #[arg(long, value_name = "COUNT")]
    pub stripe_count: Option<String>,
    /// [POOL/]NAME
    pub image: String,
}

#[derive(Subcommand, Debug, Clone)]
pub enum ObjectMapCommand {
    /// Compare the stored object map with the data objects that exist.
    Check { image: String },
    /// Rebuild the stored object map from the data objects that exist.
    Rebuild { image: String },
}

#[derive(Subcommand, Debug, Clone)]
pub enum SnapCommand {
    /// Take a snapshot of an image, like `rbd snap create` (also while it is served).
    Create {
        /// [POOL/]NAME@SNAP
        snap: String,
        /// Of an image served with --quiesce: do not run its quiesce hook.
        #[arg(long, conflicts_with = "ignore_quiesce_error")]
        skip_quiesce: bool,
        /// Of an image served with --quiesce: take the snapshot even when its quiesce
        /// hook fails.
        #[arg(long)]
        ignore_quiesce_error: bool,
    },
    /// List an image's snapshots: SNAPID NAME SIZE PROTECTED TIMESTAMP.
    #[command(alias = "list")]
    Ls {
        /// [POOL/]NAME
        image: String,
        /// Also snapshots of other namespaces (a removed snapshot clones still use, in
        /// the trash), with a NAMESPACE column, as `rbd snap ls --all`.
        #[arg(long, short = 'a')]
        all: bool,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// Indent the JSON (`--format json`) as rbd's `--pretty-format` does.
        #[arg(long)]
        pretty_format: bool,
    },
    /// Remove a snapshot (refused while it is protected).
    #[command(alias = "remove")]
    Rm {
        /// [POOL/]NAME@SNAP
        snap: String,
    },
    /// Rename a snapshot: `snap rename IMAGE@SNAP [IMAGE@]NEW`.
    #[command(alias = "mv")]
    Rename { snap: String, dest: String },
    /// Protect a snapshot from removal (clone format 1 needs it).
    Protect { snap: String },
    /// Unprotect a snapshot (refused while it has clones).
    Unprotect { snap: String },
    /// Make the image's data what it was at the snapshot (its size too).
    Rollback { snap: String },
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Create an image.
    Create(CreateArgs),
    /// Show an image's size, layout, features and flags.
    Info {
        /// [POOL/]NAME[@SNAP]
        image: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// Indent the JSON (`--format json`) as rbd's `--pretty-format` does.
        #[arg(long)]
        pretty_format: bool,
    },
    /// Remove an image and all its objects.
    Rm { image: String },
    /// Rename an image within its pool (and namespace), like `rbd rename`. An image being
    /// served may be renamed: everything but its name is keyed by its id.
    #[command(alias = "mv")]
    Rename {
        /// [POOL/[NAMESPACE/]]IMAGE
        image: String,
        /// [POOL/[NAMESPACE/]]NEW_NAME: the same pool and namespace (the default)
        dest: String,
    },
    /// List the images of a pool (POOL or POOL/NAMESPACE).
    Ls {
        pool: Option<String>,
        /// Each image and its snapshots with size, parent, format, protection and lock,
        /// as `rbd ls -l`.
        #[arg(short = 'l', long)]
        long: bool,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// Indent the JSON (`--format json`) as rbd's `--pretty-format` does.
        #[arg(long)]
        pretty_format: bool,
    },
    /// Serve an image over NBD until SIGTERM, SIGINT or SIGHUP (each a clean close).
    Serve(ServeArgs),
    /// Provisioned and used space, per snapshot and for the head, like `rbd du`: from
    /// the object maps (whole objects), or with --exact (or without fast-diff) from the
    /// data objects' snapshot sets.
    Du {
        /// [POOL/]NAME[@SNAP]; without it every image of the pool (`--pool`, default rbd),
        /// with totals, as `rbd du` without an image.
        image: Option<String>,
        /// The pool (POOL or POOL/NAMESPACE) when no image is named.
        #[arg(long, short = 'p', value_name = "POOL", conflicts_with = "image")]
        pool: Option<String>,
        /// Only the snapshots after this one, and the head (each still against the
        /// version before it).
        #[arg(long, value_name = "SNAP")]
        from_snap: Option<String>,
        /// One line for the image with every listed version's used space summed.
        #[arg(long)]
        merge_snapshots: bool,
        /// The bytes written, not whole objects: reads every written object's snapshot
        /// set instead of the object maps (slower), like `rbd du --exact`.
        #[arg(long)]
        exact: bool,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// Indent the JSON (`--format json`) as rbd's `--pretty-format` does.
        #[arg(long)]
        pretty_format: bool,
    },
    /// What changed between two versions of an image, like `rbd diff`: extents as
    /// "data" (written since) or "zero" (removed since), from each written object's
    /// snapshot set; with --whole-object whole objects, from the object maps alone.
    Diff {
        /// [POOL/]NAME[@SNAP]: the end version (default: the head).
        image: String,
        /// Changes since this snapshot (default: since the image was created).
        #[arg(long, value_name = "SNAP")]
        from_snap: Option<String>,
        /// Whole objects, from the object maps alone (with fast-diff; without it from the
        /// snapshot sets, as librbd).
        #[arg(long)]
        whole_object: bool,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// Indent the JSON (`--format json`) as rbd's `--pretty-format` does.
        #[arg(long)]
        pretty_format: bool,
    },
    /// Resize an image, like `rbd resize`; also while it is served or mapped (the
    /// serving daemon does it, and a mapped /dev/nbdX follows).
    Resize {
        /// New size: MiB as in `rbd resize`, or with a unit (B for bytes, K/M/G/T/P).
        #[arg(long, short = 's')]
        size: String,
        /// Allow making the image smaller (what lies past the new end is discarded).
        #[arg(long)]
        allow_shrink: bool,
        /// [POOL/]NAME
        image: String,
    },
    /// Copy everything a clone still reads from its parent into it, then detach it from
    /// the parent, like `rbd flatten`; also while it is served or mapped (the serving
    /// daemon does it, as librbd's lock owner does for `rbd flatten`).
    Flatten {
        /// [POOL/]NAME
        image: String,
    },
    /// Check or rebuild an image's object map.
    #[command(subcommand, name = "object-map")]
    ObjectMap(ObjectMapCommand),
    /// Snapshots: create, ls, rm, rename, protect, unprotect, rollback (`IMAGE@SNAP`).
    #[command(subcommand)]
    Snap(SnapCommand),
    /// Show or change per-image settings: `config IMAGE [shared=true|false]`.
    Config {
        image: String,
        setting: Option<String>,
    },
    /// Clone a snapshot into a new copy-on-write image, like `rbd clone`: the child
    /// reads what it has not written from the parent's snapshot.
    Clone {
        /// 2: no protected snapshot needed, the parent records its children in its
        /// header; 1: the snapshot must be protected (`rbd snap protect`), for clients
        /// older than Mimic; auto (the default, as rbd's): on Ceph the pool's or this
        /// client's `rbd_default_clone_format`, else 2 when the cluster requires Mimic or
        /// newer clients and 1 otherwise; 2 on the directory store. Named like rbd's option,
        /// and like it second to the pool's setting (`rbd config pool set`), which wins.
        #[arg(
            long = "rbd-default-clone-format",
            visible_alias = "clone-format",
            value_name = "1|2|auto",
            default_value = "auto",
            value_parser = parse_clone_format
        )]
        clone_format: u8,
        /// Object size of the child (default: the parent's).
        #[arg(long)]
        object_size: Option<String>,
        /// Features of the child, as `rbd clone --image-feature` (default: the
        /// parent's); layering is needed.
        #[arg(long = "image-feature", value_name = "FEATURE")]
        image_features: Vec<String>,
        /// Ceph: stripe unit, with --stripe-count 1 (default: the parent's where it
        /// divides the child's object size, as rbd clone).
        #[arg(long, value_name = "SIZE")]
        stripe_unit: Option<String>,
        /// Ceph: stripe count, 1.
        #[arg(long, value_name = "COUNT")]
        stripe_count: Option<String>,
        /// Ceph: the child's data objects in this pool, like `rbd clone --data-pool`
        /// (a clone does not inherit its parent's data pool).
        #[arg(long, value_name = "POOL")]
        data_pool: Option<String>,
        /// [POOL/[NAMESPACE/]]PARENT@SNAP
        parent: String,
        /// [POOL/[NAMESPACE/]]CHILD
        child: String,
    },
    /// List the clones of a snapshot, or of every snapshot of an image, like `rbd children`.
    Children {
        /// [POOL/[NAMESPACE/]]IMAGE[@SNAP]
        image: String,
        /// The snapshot by its id instead of `@SNAP` (as `rbd children --snap-id`): also
        /// reaches snapshots outside the user namespace, such as a removed snapshot that
        /// clones keep in the trash namespace (`snap ls --all` shows the ids).
        #[arg(long, value_name = "ID")]
        snap_id: Option<u64>,
        /// Also the clones in the trash, marked `(trash ID)` (JSON: `id`, `trash`).
        #[arg(short = 'a', long)]
        all: bool,
        /// The clones of the clones too, all the way down.
        #[arg(long)]
        descendants: bool,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// Indent the JSON (`--format json`) as rbd's `--pretty-format` does.
        #[arg(long)]
        pretty_format: bool,
    },
    /// Write the manual pages or shell completions generated from this CLI (packaging).
    #[command(hide = true, subcommand)]
    Generate(crate::generate::GenerateCmd),
    /// Kernel attach: map, unmap, list-mapped, attach, detach (Linux). `main` runs these
    /// outside the async runtime (the serving daemon builds its own after its setup).
    #[cfg(target_os = "linux")]
    #[command(flatten)]
    Kernel(crate::kernel::cli::KernelCommand),
}

/// `--rbd-default-clone-format`: 1, 2, or auto (0: as the store's configuration says).
fn parse_clone_format(s: &str) -> std::result::Result<u8, String> {
    match s {
        "1" => Ok(1),
        "2" => Ok(2),
        "auto" => Ok(0),
        _ => Err(format!("{s:?} is not a clone format (1, 2 or auto)")),
    }
}

impl Cli {
    /// The `--store` URI with rbd's spellings folded in: `-c PATH` is `--store ceph:PATH`
    /// (with `--store ceph:` or no `--store`; any other `--store` contradicts it and is an
    /// error); `--name client.ID` is `--id ID`. Call once, before [`Cli::ceph_access`].
    pub fn resolve_rbd_spellings(&mut self) -> crate::error::Result<()> {
        use crate::error::{Error, ErrorKind};
        if std::mem::take(&mut self.rbd_nbd_foreground) {
            #[cfg(target_os = "linux")]
            if let Command::Kernel(
                crate::kernel::cli::KernelCommand::Map(crate::kernel::cli::MapArgs {
                    opts, ..
                })
                | crate::kernel::cli::KernelCommand::Attach(crate::kernel::cli::AttachArgs {
                    opts,
                    ..
                }),
            ) = &mut self.command
            {
                opts.foreground = true;
                return self.resolve_rbd_spellings();
            }
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "-d/-f (rbd-nbd's foreground switches) are for map and attach",
            ));
        }
        if let Some(n) = self.name.take() {
            match n.strip_prefix("client.") {
                Some(id) if !id.is_empty() => self.id = Some(id.to_string()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!("--name {n:?}: expected client.ID (rados-nbd is a Ceph client)"),
                    ))
                }
            }
        }
        if let Some(c) = self.conf.take() {
            let uri = format!("ceph:{}", c.display());
            match self.store.as_deref() {
                None | Some("ceph:") => self.store = Some(uri),
                Some(s) if s == uri => {}
                Some(s) => {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!(
                            "-c/--conf {} and --store {s} say different things: give one of them",
                            c.display()
                        ),
                    ))
                }
            }
        }
        Ok(())
    }

    /// `--id`, `--keyring` and `--allow-encrypted`, for [`crate::store::connect`].
    pub fn ceph_access(&self) -> CephAccess {
        CephAccess {
            id: self.id.clone(),
            keyring: self.keyring.clone(),
            allow_encrypted: self.allow_encrypted,
            lock_at_open: Default::default(),
        }
    }
}

impl Command {
    /// Whether this command runs a server that outlives its clients (as opposed to
    /// printing something and exiting).
    pub fn serves(&self) -> bool {
        #[cfg(target_os = "linux")]
        if let Command::Kernel(k) = self {
            use crate::kernel::cli::KernelCommand;
            // `map` and `attach` become the daemon serving the kernel's sockets.
            return matches!(k, KernelCommand::Map(_) | KernelCommand::Attach(_));
        }
        matches!(self, Command::Serve(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    fn resolved(args: &[&str]) -> crate::error::Result<Cli> {
        let mut c = Cli::try_parse_from(["rados-nbd"].iter().chain(args)).unwrap();
        c.resolve_rbd_spellings()?;
        Ok(c)
    }

    #[test]
    fn clone_formats() {
        let format = |args: &[&str]| match resolved(args).unwrap().command {
            Command::Clone { clone_format, .. } => clone_format,
            c => panic!("{c:?}"),
        };
        // auto (0: as the store is configured) unless one is named.
        assert_eq!(format(&["clone", "p@s", "c"]), 0);
        assert_eq!(
            format(&["clone", "--rbd-default-clone-format", "auto", "p@s", "c"]),
            0
        );
        assert_eq!(
            format(&["clone", "--rbd-default-clone-format", "1", "p@s", "c"]),
            1
        );
        assert_eq!(format(&["clone", "--clone-format", "2", "p@s", "c"]), 2);
        for bad in ["0", "3", "two"] {
            assert!(
                Cli::try_parse_from(["x", "clone", "--clone-format", bad, "p@s", "c"]).is_err()
            );
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn rbd_nbd_foreground_switches() {
        use crate::kernel::cli::{KernelCommand, MapArgs};
        let foreground = |args: &[&str]| match resolved(args).unwrap().command {
            Command::Kernel(KernelCommand::Map(MapArgs { opts, .. })) => opts.foreground,
            Command::Kernel(KernelCommand::Attach(a)) => a.opts.foreground,
            c => panic!("{c:?}"),
        };
        // rbd-nbd -d map IMAGE, rbd-nbd map -f IMAGE, ...: each is --foreground.
        for args in [
            &["-d", "map", "rbd/img"][..],
            &["map", "-d", "rbd/img"],
            &["-f", "map", "rbd/img"],
            &["map", "rbd/img", "-f"],
            &["-d", "attach", "--device", "/dev/nbd0", "rbd/img"],
            &["map", "--foreground", "-d", "rbd/img"],
        ] {
            assert!(foreground(args), "{args:?}");
        }
        assert!(!foreground(&["map", "rbd/img"]));
        // Elsewhere they mean nothing, and are refused rather than ignored.
        for args in [&["-d", "ls"][..], &["unmap", "-f", "/dev/nbd0"]] {
            let e = resolved(args).expect_err("refused");
            assert!(e.to_string().contains("for map and attach"), "{e}");
        }
    }

    #[test]
    fn rbd_spellings_of_cluster_options() {
        // -c and --conf select the Ceph store with that file, before or after the command.
        for args in [
            &["-c", "/etc/ceph/a.conf", "ls"][..],
            &["ls", "--conf", "/etc/ceph/a.conf"],
            &["--store", "ceph:", "-c", "/etc/ceph/a.conf", "ls"],
            &[
                "--store",
                "ceph:/etc/ceph/a.conf",
                "-c",
                "/etc/ceph/a.conf",
                "ls",
            ],
        ] {
            let c = resolved(args).unwrap();
            assert_eq!(
                c.store.as_deref(),
                Some("ceph:/etc/ceph/a.conf"),
                "{args:?}"
            );
        }
        // Another store, or another cluster's file, is a contradiction.
        for args in [
            &["-c", "/etc/ceph/a.conf", "--store", "dir:/srv", "ls"][..],
            &[
                "-c",
                "/etc/ceph/a.conf",
                "--store",
                "ceph:/etc/ceph/b.conf",
                "ls",
            ],
        ] {
            let e = resolved(args).expect_err("refused");
            assert!(e.to_string().contains("say different things"), "{e}");
        }
        // Without -c nothing changes.
        assert_eq!(resolved(&["ls"]).unwrap().store, None);
        // -i is --id; -n/--name client.X is --id X; anything but a client is refused.
        assert_eq!(
            resolved(&["-i", "nbd", "ls"]).unwrap().id.as_deref(),
            Some("nbd")
        );
        let c = resolved(&["--name", "client.nbd", "ls"]).unwrap();
        assert_eq!((c.id.as_deref(), c.name), (Some("nbd"), None));
        assert_eq!(
            resolved(&["-n", "client.x", "ls"]).unwrap().id.as_deref(),
            Some("x")
        );
        for bad in ["osd.0", "client.", "nbd"] {
            let e = resolved(&["--name", bad, "ls"]).expect_err("refused");
            assert!(e.to_string().contains("client.ID"), "{e}");
        }
        assert!(
            Cli::try_parse_from(["rados-nbd", "--id", "a", "--name", "client.b", "ls"]).is_err()
        );
    }
}
