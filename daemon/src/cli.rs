//! The command line (this contract is used by other issues and by outside checks: keep
//! the names). Dispatch on the store is one `match` in [`dispatch`]; every command is a
//! generic function over [`Store`], so a new store only adds a match arm.

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::image::{self, load_object_map, rebuild_map, shared_setting, META_SHARED};
use crate::serve::{self, ServeArgs};
use crate::spec::{parse_size, ImageSpec, DEFAULT_POOL};
use crate::store::{
    connect, AnyStore, CephAccess, CreateOptions, ImageHeader, ImageStore, OpenMode, Store,
    StoreUri, DEFAULT_FEATURES, RBD_FEATURE_OBJECT_MAP, RBD_FLAG_FAST_DIFF_INVALID,
    RBD_FLAG_OBJECT_MAP_INVALID,
};
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use objmap::{ObjectMap, ObjectState};
use serde_json::json;
use std::path::PathBuf;

pub use crate::store::uri::DEFAULT_STORE_DIR;

#[derive(Parser, Debug)]
#[command(
    name = "rados-nbd",
    version,
    about = "Serve Ceph RBD format-2 images over NBD with the object map kept in memory"
)]
pub struct Cli {
    /// Where images live: `dir:PATH` (default: dir:$RADOS_NBD_STORE, else
    /// dir:/var/lib/rados-nbd) or `ceph:[CONF]`.
    #[arg(long, global = true, value_name = "URI")]
    pub store: Option<String>,

    /// Ceph client id for `--store ceph:` (like `rbd --id`: `admin`, not `client.admin`).
    #[arg(long, global = true, value_name = "ID")]
    pub id: Option<String>,

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
    /// Image size (K/M/G/T/P suffixes).
    #[arg(long, short = 's')]
    pub size: String,
    /// Object size, a power of two from 4K to 32M.
    #[arg(long, default_value = "4M")]
    pub object_size: String,
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
pub enum Command {
    /// Create an image.
    Create(CreateArgs),
    /// Show an image's size, layout, features and flags.
    Info {
        /// [POOL/]NAME[@SNAP]
        image: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Remove an image and all its objects.
    Rm { image: String },
    /// List the images of a pool (POOL or POOL/NAMESPACE).
    Ls {
        pool: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Serve an image over NBD until SIGTERM/SIGINT.
    Serve(ServeArgs),
    /// Provisioned and used space, from the object map.
    Du {
        image: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Resize an image, like `rbd resize`; also while it is served or mapped (the
    /// serving daemon does it, and a mapped /dev/nbdX follows).
    Resize {
        /// New size (K/M/G/T/P suffixes).
        #[arg(long, short = 's')]
        size: String,
        /// Allow making the image smaller (what lies past the new end is discarded).
        #[arg(long)]
        allow_shrink: bool,
        /// [POOL/]NAME
        image: String,
    },
    /// Check or rebuild an image's object map.
    #[command(subcommand, name = "object-map")]
    ObjectMap(ObjectMapCommand),
    /// Show or change per-image settings: `config IMAGE [shared=true|false]`.
    Config {
        image: String,
        setting: Option<String>,
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

impl Cli {
    /// `--id`, `--keyring` and `--allow-encrypted`, for [`crate::store::connect`].
    pub fn ceph_access(&self) -> CephAccess {
        CephAccess {
            id: self.id.clone(),
            keyring: self.keyring.clone(),
            allow_encrypted: self.allow_encrypted,
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

pub async fn dispatch(cli: Cli) -> Result<()> {
    if let Command::Generate(what) = cli.command {
        return crate::generate::run(what, <Cli as clap::CommandFactory>::command());
    }
    let uri = StoreUri::parse(cli.store.as_deref())?;
    if !uri.is_ceph() && (cli.id.is_some() || cli.keyring.is_some()) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "--id and --keyring only apply to --store ceph:[CONF]",
        ));
    }
    if !uri.is_ceph() && cli.allow_encrypted {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "--allow-encrypted only applies to --store ceph:[CONF]",
        ));
    }
    match connect(&uri, &cli.ceph_access()).await? {
        AnyStore::Dir(st) => run(st, cli.command).await,
        #[cfg(feature = "ceph")]
        AnyStore::Ceph(st) => run(st, cli.command).await,
    }
}

fn parse_spec(s: &str) -> Result<ImageSpec> {
    s.parse()
}

fn parse_head_spec(s: &str, what: &str) -> Result<ImageSpec> {
    let spec = parse_spec(s)?;
    if spec.snap.is_some() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("cannot {what} snapshot {spec}: name an image, not a snapshot"),
        ));
    }
    Ok(spec)
}

pub async fn run<S: Store>(store: S, cmd: Command) -> Result<()> {
    match cmd {
        Command::Generate(what) => {
            crate::generate::run(what, <Cli as clap::CommandFactory>::command())
        }
        Command::Create(a) => create(&store, &a).await,
        Command::Info { image, format } => info(&store, &parse_spec(&image)?, format).await,
        Command::Rm { image } => {
            let spec = parse_head_spec(&image, "remove")?;
            store.remove_image(&spec).await
        }
        Command::Ls { pool, format } => ls(&store, pool.as_deref(), format).await,
        Command::Serve(a) => serve::serve(store, a, &Config::load()?).await,
        Command::Du { image, format } => du(&store, &parse_spec(&image)?, format).await,
        Command::Resize {
            image,
            size,
            allow_shrink,
        } => {
            let size = parse_size(&size).map_err(|e| e.context("--size"))?;
            resize(
                &store,
                &parse_head_spec(&image, "resize")?,
                size,
                allow_shrink,
            )
            .await
        }
        Command::ObjectMap(ObjectMapCommand::Check { image }) => {
            object_map_check(&store, &parse_spec(&image)?).await
        }
        Command::ObjectMap(ObjectMapCommand::Rebuild { image }) => {
            object_map_rebuild(&store, &parse_head_spec(&image, "rebuild the map of")?).await
        }
        Command::Config { image, setting } => {
            config(
                &store,
                &parse_head_spec(&image, "configure")?,
                setting.as_deref(),
            )
            .await
        }
        #[cfg(target_os = "linux")]
        Command::Kernel(_) => Err(Error::new(
            ErrorKind::InvalidInput,
            "internal: kernel commands are run by main, outside the runtime",
        )),
    }
}

/// Runs `f` on an opened store image and closes it whatever `f` returned.
async fn with_image<S: Store, T>(
    store: &S,
    spec: &ImageSpec,
    mode: OpenMode,
    f: impl AsyncFnOnce(&S::Image) -> Result<T>,
) -> Result<T> {
    let img = store.open_image(spec, mode).await?;
    let r = f(&img).await;
    let c = img.close().await;
    let t = r?;
    c?;
    Ok(t)
}

pub fn parse_object_size(s: &str) -> Result<u8> {
    let n = parse_size(s).map_err(|e| e.context("--object-size"))?;
    if !n.is_power_of_two() || !(4096..=(32 << 20)).contains(&n) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("invalid object size {s:?} (a power of two from 4K to 32M)"),
        ));
    }
    Ok(n.trailing_zeros() as u8)
}

async fn create<S: Store>(store: &S, a: &CreateArgs) -> Result<()> {
    let spec = parse_head_spec(&a.image, "create")?;
    let size = parse_size(&a.size).map_err(|e| e.context("--size"))?;
    let order = parse_object_size(&a.object_size)?;
    let opts = CreateOptions {
        size,
        order,
        features: DEFAULT_FEATURES,
    };
    image::create_image(store, &spec, &opts).await
}

/// `1 GiB`, `4 MiB`, `1.5 GiB`, like `rbd` prints sizes.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut i = 0;
    while i + 1 < UNITS.len() && n >= 1u64 << (10 * (i + 1)) {
        i += 1;
    }
    let unit = 1u64 << (10 * i);
    if n.is_multiple_of(unit) {
        format!("{} {}", n / unit, UNITS[i])
    } else {
        let v = n as f64 / unit as f64;
        let s = format!("{v:.2}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        format!("{s} {}", UNITS[i])
    }
}

pub fn feature_names(features: u64) -> Vec<String> {
    const NAMES: [&str; 11] = [
        "layering",
        "striping",
        "exclusive-lock",
        "object-map",
        "fast-diff",
        "deep-flatten",
        "journaling",
        "data-pool",
        "operations",
        "migrating",
        "non-primary",
    ];
    (0..64)
        .filter(|b| features & (1u64 << b) != 0)
        .map(|b| {
            NAMES
                .get(b as usize)
                .map(|s| s.to_string())
                .unwrap_or_else(|| format!("unknown-{:#x}", 1u64 << b))
        })
        .collect()
}

pub fn flag_names(flags: u64) -> Vec<String> {
    (0..64)
        .filter(|b| flags & (1u64 << b) != 0)
        .map(|b| match 1u64 << b {
            RBD_FLAG_OBJECT_MAP_INVALID => "object map invalid".to_string(),
            RBD_FLAG_FAST_DIFF_INVALID => "fast diff invalid".to_string(),
            f => format!("unknown flag {f:#x}"),
        })
        .collect()
}

async fn info<S: Store>(store: &S, spec: &ImageSpec, format: Format) -> Result<()> {
    let shared_default = Config::load()?.shared_default;
    let (h, shared) = with_image(store, spec, OpenMode::ReadOnly, async |img: &S::Image| {
        let shared = shared_setting(img, spec, shared_default).await?;
        Ok((img.header(), shared))
    })
    .await?;
    let size = match &spec.snap {
        Some(n) => h
            .snaps
            .iter()
            .find(|s| &s.name == n)
            .map_or(h.size, |s| s.size),
        None => h.size,
    };
    let objects = size.div_ceil(h.object_size());
    let features = feature_names(h.features);
    let flags = flag_names(h.flags);
    match format {
        Format::Json => {
            let v = json!({
                "name": spec.name,
                "pool": spec.pool,
                "namespace": spec.namespace,
                "id": h.id,
                "size": size,
                "objects": objects,
                "order": h.order,
                "object_size": h.object_size(),
                "snapshot_count": h.snaps.len(),
                "block_name_prefix": h.object_prefix,
                "format": 2,
                "features": features,
                "op_features": [],
                "flags": flags,
                "shared": shared,
                "snapshots": h.snaps.iter().map(|s| json!({"id": s.id, "name": s.name, "size": s.size})).collect::<Vec<_>>(),
            });
            println!("{v}");
        }
        Format::Plain => {
            println!("rbd image '{}':", spec.name);
            println!("\tsize {} in {} objects", human_size(size), objects);
            println!(
                "\torder {} ({} objects)",
                h.order,
                human_size(h.object_size())
            );
            println!("\tsnapshot_count: {}", h.snaps.len());
            println!("\tid: {}", h.id);
            println!("\tblock_name_prefix: {}", h.object_prefix);
            println!("\tformat: 2");
            println!("\tfeatures: {}", features.join(", "));
            println!("\top_features: ");
            println!("\tflags: {}", flags.join(", "));
            println!("\tshared: {shared}");
            for s in &h.snaps {
                println!("\tsnapshot {} {} ({})", s.id, s.name, human_size(s.size));
            }
        }
    }
    Ok(())
}

async fn ls<S: Store>(store: &S, pool: Option<&str>, format: Format) -> Result<()> {
    let pool = pool.unwrap_or(DEFAULT_POOL);
    // The same rules as the pool (and namespace) part of an image spec.
    crate::spec::parse_pool_spec(pool)?;
    let names = store.list_images(pool).await?;
    match format {
        Format::Json => println!("{}", json!(names)),
        Format::Plain => {
            for n in names {
                println!("{n}");
            }
        }
    }
    Ok(())
}

/// Bytes of object `objno` inside an image of `size`.
fn object_len(h: &ImageHeader, size: u64, objno: u64) -> u64 {
    h.object_size()
        .min(size.saturating_sub(objno * h.object_size()))
}

async fn du<S: Store>(store: &S, spec: &ImageSpec, format: Format) -> Result<()> {
    let (h, size, used) = with_image(store, spec, OpenMode::ReadOnly, async |img: &S::Image| {
        let h = img.header();
        let (snap, size) = snap_of(&h, spec)?;
        let count = size.div_ceil(h.object_size());
        let map = if h.features & RBD_FEATURE_OBJECT_MAP != 0 {
            load_object_map(img, spec, &h, snap, size).await?.0
        } else {
            rebuild_map(img, spec, count, snap).await?
        };
        let mut used = 0u64;
        for run in map.runs(0..count) {
            if run.state != ObjectState::Nonexistent {
                for o in run.start..run.start + run.len {
                    used += object_len(&h, size, o);
                }
            }
        }
        Ok((h, size, used))
    })
    .await?;
    let _ = h;
    match format {
        Format::Json => println!(
            "{}",
            json!({
                "images": [{"name": spec.name, "provisioned_size": size, "used_size": used}],
                "total_provisioned_size": size,
                "total_used_size": used,
            })
        ),
        Format::Plain => {
            let name = spec.to_string();
            let name = name
                .strip_prefix(&format!("{}/", spec.pool_spec()))
                .unwrap_or(&name);
            let w = name.len().max(4);
            println!("{:<w$}  {:>11}  {:>9}", "NAME", "PROVISIONED", "USED");
            println!(
                "{:<w$}  {:>11}  {:>9}",
                name,
                human_size(size),
                human_size(used)
            );
        }
    }
    Ok(())
}

fn snap_of(h: &ImageHeader, spec: &ImageSpec) -> Result<(Option<u64>, u64)> {
    match &spec.snap {
        None => Ok((None, h.size)),
        Some(n) => h
            .snaps
            .iter()
            .find(|s| &s.name == n)
            .map(|s| (Some(s.id), s.size))
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("snapshot {spec} not found"))),
    }
}

/// The differences between an image's stored object map and its data objects.
pub async fn check_object_map<I: ImageStore>(img: &I, spec: &ImageSpec) -> Result<Vec<String>> {
    let h = img.header();
    if h.features & RBD_FEATURE_OBJECT_MAP == 0 {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("image {spec} does not have the object-map feature"),
        ));
    }
    let (snap, size) = snap_of(&h, spec)?;
    let count = size.div_ceil(h.object_size());
    let mut problems = Vec::new();
    if snap.is_none() && h.flags & RBD_FLAG_OBJECT_MAP_INVALID != 0 {
        problems.push(
            "the header flags the object map invalid (open for writing, or not closed cleanly)"
                .to_string(),
        );
    }
    let map = match img.read_object_map(snap).await? {
        None => {
            problems.push("the object map object is missing".to_string());
            return Ok(problems);
        }
        Some(b) => match ObjectMap::decode(&b) {
            Ok(m) => m,
            Err(e) => {
                problems.push(format!("the object map is corrupt: {e}"));
                return Ok(problems);
            }
        },
    };
    if map.len() != count {
        problems.push(format!(
            "the object map has {} entries for {count} objects",
            map.len()
        ));
        return Ok(problems);
    }
    // The states librbd's `rbd object-map check` expects (snapset::object_state).
    let objs = img.list_object_states(snap).await?;
    let expected = image::new_map(count, spec)?;
    for &(n, state) in &objs {
        if n < count {
            expected.set(n, state);
        } else {
            problems.push(format!(
                "object {} lies beyond the image size",
                h.object_name(n)
            ));
        }
    }
    const SHOW: usize = 50;
    let mut mismatches = 0usize;
    for run in map.runs(0..count) {
        for o in run.start..run.start + run.len {
            let Some(p) = state_mismatch(run.state, expected.get(o)) else {
                continue;
            };
            mismatches += 1;
            if mismatches <= SHOW {
                problems.push(format!("object {} {p}", h.object_name(o)));
            }
        }
    }
    if mismatches > SHOW {
        problems.push(format!("... and {} more mismatches", mismatches - SHOW));
    }
    Ok(problems)
}

/// What is wrong with a map entry `map` for an object whose state should be `want`, if
/// anything. Existence must match. Between EXISTS and EXISTS_CLEAN librbd's check flags
/// both directions: a clean entry for a written object hides the write from `rbd diff`,
/// and a dirty entry for an unwritten one puts it in every diff. PENDING (a write in
/// flight when the map was saved) passes for an existing object.
fn state_mismatch(map: ObjectState, want: ObjectState) -> Option<String> {
    use ObjectState::*;
    match (map, want) {
        (Nonexistent, Nonexistent) | (Exists, Exists) | (ExistsClean, ExistsClean) => None,
        (Pending, Exists | ExistsClean) => None,
        (Nonexistent, _) => Some("exists but the map says nonexistent".to_string()),
        (m, Nonexistent | Pending) => {
            Some(format!("is missing but the map says {}", state_name(m)))
        }
        (m, w) => Some(format!(
            "should be {} ({}) but the map says {}",
            state_name(w),
            if w == ExistsClean {
                "not written since the last snapshot"
            } else {
                "written since the last snapshot"
            },
            state_name(m)
        )),
    }
}

fn state_name(s: ObjectState) -> &'static str {
    match s {
        ObjectState::Nonexistent => "nonexistent",
        ObjectState::Exists => "exists",
        ObjectState::Pending => "pending",
        ObjectState::ExistsClean => "exists-clean",
    }
}

async fn object_map_check<S: Store>(store: &S, spec: &ImageSpec) -> Result<()> {
    let (problems, objects) =
        with_image(store, spec, OpenMode::ReadOnly, async |img: &S::Image| {
            let p = check_object_map(img, spec).await?;
            let (snap, _) = snap_of(&img.header(), spec)?;
            Ok((p, img.list_objects(snap).await?.len()))
        })
        .await?;
    if problems.is_empty() {
        println!("object map of {spec} matches the {objects} data objects");
        return Ok(());
    }
    for p in &problems {
        println!("{spec}: {p}");
    }
    Err(Error::new(
        ErrorKind::Corrupt,
        format!(
            "object map of {spec} in {} does not match the data objects ({} problems; `rados-nbd object-map rebuild {spec}` fixes it)",
            store.describe(),
            problems.len()
        ),
    ))
}

async fn object_map_rebuild<S: Store>(store: &S, spec: &ImageSpec) -> Result<()> {
    let summary = with_image(store, spec, OpenMode::ReadWrite, async |img: &S::Image| {
        let h = img.header();
        if h.features & RBD_FEATURE_OBJECT_MAP == 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("image {spec} does not have the object-map feature"),
            ));
        }
        let count = h.object_count();
        let map = rebuild_map(img, spec, count, None).await?;
        img.write_object_map(map.encode()).await?;
        img.set_flags(0, image::invalid_flags(h.features)).await?;
        Ok(image::describe_rebuilt(&map, count))
    })
    .await?;
    println!("object map of {spec} rebuilt: {summary}");
    Ok(())
}

/// Resizes an image that is not in use here, or asks the process serving it to.
async fn resize<S: Store>(
    store: &S,
    spec: &ImageSpec,
    size: u64,
    allow_shrink: bool,
) -> Result<()> {
    let opts = image::OpenOptions {
        read_only: false,
        shared_default: Config::load()?.shared_default,
        checkpoint_idle: None,
    };
    match image::Image::open(store, spec, &opts).await {
        Ok(img) => {
            let r = img.resize(size, allow_shrink).await;
            let c = img.close().await;
            r?;
            c?;
        }
        Err(e) if e.kind == ErrorKind::Busy => {
            store.ask_holder_to_resize(spec, size, allow_shrink).await?;
        }
        Err(e) => return Err(e),
    }
    println!("{spec}: size {size} bytes");
    Ok(())
}

async fn config<S: Store>(store: &S, spec: &ImageSpec, setting: Option<&str>) -> Result<()> {
    let shared_default = Config::load()?.shared_default;
    match setting {
        None => {
            let (v, explicit) =
                with_image(store, spec, OpenMode::ReadOnly, async |img: &S::Image| {
                    let explicit = img.get_meta(META_SHARED).await?.is_some();
                    Ok((shared_setting(img, spec, shared_default).await?, explicit))
                })
                .await?;
            let src = if explicit { "image" } else { "default" };
            println!("shared={v} ({src})");
            Ok(())
        }
        Some(s) => {
            let Some((k, v)) = s.split_once('=') else {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("invalid setting {s:?} (expected shared=true|false)"),
                ));
            };
            if k.trim() != "shared" {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("unknown setting {:?} (known: shared)", k.trim()),
                ));
            }
            let b = image::parse_bool("shared", v)?;
            with_image(store, spec, OpenMode::ReadWrite, async |img: &S::Image| {
                img.set_meta(META_SHARED, if b { "true" } else { "false" })
                    .await
            })
            .await?;
            println!("shared={b}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_check_flags_clean_and_dirty_mismatches_like_librbd() {
        use ObjectState::*;
        let bad = |m, w| state_mismatch(m, w).is_some();
        // Existence must match.
        assert!(bad(Nonexistent, Exists) && bad(Nonexistent, ExistsClean));
        assert!(bad(Exists, Nonexistent) && bad(ExistsClean, Nonexistent));
        // A rebuilt map that says EXISTS for an object unchanged since the newest
        // snapshot is what `rbd object-map check` invalidates (issue 14) ...
        assert_eq!(
            state_mismatch(Exists, ExistsClean).as_deref(),
            Some("should be exists-clean (not written since the last snapshot) but the map says exists")
        );
        // ... and a clean entry for a written object would hide it from `rbd diff`.
        assert!(bad(ExistsClean, Exists));
        for s in [Nonexistent, Exists, ExistsClean] {
            assert!(!bad(s, s));
        }
        assert!(!bad(Pending, Exists) && !bad(Pending, ExistsClean));
    }

    #[test]
    fn sizes_print_like_rbd() {
        assert_eq!(human_size(4 << 20), "4 MiB");
        assert_eq!(human_size(10 << 30), "10 GiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(100), "100 B");
        assert_eq!(human_size(0), "0 B");
    }

    #[test]
    fn names() {
        assert_eq!(
            feature_names(DEFAULT_FEATURES),
            ["layering", "exclusive-lock", "object-map", "fast-diff"]
        );
        assert_eq!(flag_names(3), ["object map invalid", "fast diff invalid"]);
        assert!(flag_names(0).is_empty());
    }

    #[test]
    fn object_sizes() {
        assert_eq!(parse_object_size("4M").unwrap(), 22);
        assert_eq!(parse_object_size("4K").unwrap(), 12);
        assert!(parse_object_size("3M").is_err());
        assert!(parse_object_size("64M").is_err());
        assert!(parse_object_size("2K").is_err());
    }
}
