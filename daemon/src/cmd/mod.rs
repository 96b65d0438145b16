//! The bodies of the commands that work on a store: one file each, as mini-redis keeps
//! them (the clap types stay in `crate::cli`). Dispatch on the store is one `match` in
//! [`dispatch`]; every command is a generic function over [`Store`], so a new store only
//! adds a match arm.

pub mod children;
pub mod clone;
pub mod config;
pub mod create;
pub mod diff;
pub mod du;
pub mod flatten;
pub mod info;
pub mod ls;
pub mod object_map;
pub mod resize;
pub mod snap;
pub(crate) mod table;

use crate::cli::{Cli, Command, ObjectMapCommand};
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::image;
use crate::parse::parse_image_size;
use crate::serve;
use crate::spec::ImageSpec;
use crate::store::{
    connect, AnyStore, ImageHeader, ImageStore, OpenMode, Removal, Store, StoreUri,
};

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
    let mut access = cli.ceph_access();
    if let Command::Serve(a) = &cli.command {
        access.lock_at_open = crate::store::LockAtOpen::for_serving(a.wait_for_lock, a.exclusive);
    }
    match connect(&uri, &access).await? {
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

/// The new name of `rename SPEC DEST`: DEST names an image of SPEC's pool and namespace,
/// which it may leave out (rbd's `rename` takes the source's pool as the default there,
/// and refuses another one).
fn rename_dest(spec: &ImageSpec, dest: &str) -> Result<String> {
    let d = parse_head_spec(dest, "rename to")?;
    if dest.contains('/') && (d.pool != spec.pool || d.namespace != spec.namespace) {
        let across = if d.pool != spec.pool {
            "pools"
        } else {
            "namespaces"
        };
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "cannot rename {spec} to {d}: rename across {across} is not supported (as in rbd)"
            ),
        ));
    }
    Ok(d.name)
}

/// librbd's PreRemoveRequest: when an image's snapshots are all ones the trash keeps for
/// clones, those that no clone uses any more (left by a removal or flatten of the last
/// clone that could not remove them, e.g. while another client held this image) go
/// before the image does; the store then refuses the image, or moves it to the trash,
/// only for snapshots that clones still use. Best effort: the store's check follows.
async fn prune_trashed_snaps<S: Store>(store: &S, spec: &ImageSpec, h: &ImageHeader) {
    let trashed = |s: &&crate::store::SnapInfo| {
        matches!(s.namespace, crate::store::SnapNamespace::Trash { .. })
    };
    if h.snaps.is_empty() || !h.snaps.iter().all(|s| trashed(&s)) {
        return;
    }
    let r = async {
        let opts = image::OpenOptions {
            read_only: false,
            shared_default: false,
            checkpoint_idle: None,
        };
        let img = image::Image::open(store, spec, &opts).await?;
        let mut r = Ok(());
        for s in h.snaps.iter().filter(trashed) {
            if let Err(e) = img.snap_remove_id(s.id).await {
                r = Err(e);
                break;
            }
        }
        let c = img.close().await;
        r.and(c)
    }
    .await;
    if let Err(e) = r {
        tracing::warn!("trashed snapshots of {spec} no clone uses any more: {e}");
    }
}

pub async fn run<S: Store>(store: S, cmd: Command) -> Result<()> {
    match cmd {
        Command::Generate(what) => {
            crate::generate::run(what, <Cli as clap::CommandFactory>::command())
        }
        Command::Create(a) => create::create(&store, &a).await,
        Command::Info {
            image,
            format,
            pretty_format,
        } => {
            set_pretty_json(pretty_format);
            info::info(&store, &parse_spec(&image)?, format).await
        }
        Command::Rm { image } => {
            let spec = parse_head_spec(&image, "remove")?;
            // A clone's parent, read first: its snapshot (and the parent itself) may be
            // in the trash waiting for its last clone (this one). The read-only handle
            // (no watch, no lock) stays open to reach the parent afterwards. An image
            // that cannot be opened is removed anyway.
            let child = store.open_image(&spec, OpenMode::ReadOnly).await.ok();
            let header = child.as_ref().map(|c| c.header());
            if let Some(h) = &header {
                prune_trashed_snaps(&store, &spec, h).await;
            }
            let parent = header.and_then(|h| h.parent);
            let r = store.remove_image(&spec).await;
            // Moved to the trash instead (its snapshots wait for clones): still a clone.
            if let (Ok(Removal::Removed), Some(c), Some(p)) = (&r, &child, parent) {
                image::release_parent(c, p).await;
            }
            if let Some(c) = child {
                let _ = c.close().await;
            }
            r.map(|_| ())
        }
        Command::Rename { image, dest } => {
            let spec = parse_head_spec(&image, "rename")?;
            let dest = rename_dest(&spec, &dest)?;
            // As librbd 16.2's Operations::rename: by whoever holds the exclusive lock,
            // so a serving librbd client (rbd-nbd, qemu) learns its image's new name.
            let r = snap::try_on_head(&store, &spec, "rename", async |img| img.rename(&dest).await)
                .await?;
            match r {
                snap::Head::InUse(_) => {
                    let action = crate::store::OwnerAction::Rename { new_name: dest };
                    snap::ask(&store, &spec, &action).await
                }
                snap::Head::Done(r) => r,
            }
        }
        Command::Ls {
            pool,
            long,
            format,
            pretty_format,
        } => {
            set_pretty_json(pretty_format);
            ls::ls(&store, pool.as_deref(), long, format).await
        }
        Command::Serve(a) => serve::serve(store, a, &Config::load()?).await,
        Command::Du {
            image,
            pool,
            from_snap,
            merge_snapshots,
            exact,
            format,
            pretty_format,
        } => {
            set_pretty_json(pretty_format);
            let opts = du::DuOptions {
                from_snap,
                merge_snapshots,
                exact,
                format,
            };
            match image {
                Some(image) => du::du(&store, &parse_spec(&image)?, &opts).await,
                None => {
                    let pool = pool.as_deref().unwrap_or(crate::spec::DEFAULT_POOL);
                    du::du_pool(&store, pool, &opts).await
                }
            }
        }
        Command::Diff {
            image,
            from_snap,
            whole_object,
            format,
            pretty_format,
        } => {
            set_pretty_json(pretty_format);
            let spec = parse_spec(&image)?;
            diff::diff(&store, &spec, from_snap.as_deref(), whole_object, format).await
        }
        Command::Resize {
            image,
            size,
            allow_shrink,
        } => {
            let size = parse_image_size(&size).map_err(|e| e.context("--size"))?;
            resize::resize(
                &store,
                &parse_head_spec(&image, "resize")?,
                size,
                allow_shrink,
            )
            .await
        }
        Command::Flatten { image } => {
            flatten::flatten(&store, &parse_head_spec(&image, "flatten")?).await
        }
        Command::ObjectMap(ObjectMapCommand::Check { image }) => {
            object_map::check(&store, &parse_spec(&image)?).await
        }
        Command::ObjectMap(ObjectMapCommand::Rebuild { image }) => {
            object_map::rebuild(&store, &parse_head_spec(&image, "rebuild the map of")?).await
        }
        Command::Snap(c) => snap::snap(&store, c).await,
        Command::Config { image, setting } => {
            config::config(
                &store,
                &parse_head_spec(&image, "configure")?,
                setting.as_deref(),
            )
            .await
        }
        Command::Clone {
            clone_format,
            object_size,
            image_features,
            stripe_unit,
            stripe_count,
            data_pool,
            parent,
            child,
        } => {
            let args = clone::CloneArgs {
                clone_format,
                object_size,
                image_features,
                stripe_unit,
                stripe_count,
                data_pool,
            };
            clone::clone(
                &store,
                &parse_spec(&parent)?,
                &parse_head_spec(&child, "clone into")?,
                &args,
            )
            .await
        }
        Command::Children {
            image,
            snap_id,
            all,
            descendants,
            format,
            pretty_format,
        } => {
            set_pretty_json(pretty_format);
            let parent = parse_spec(&image)?;
            children::children(&store, &parent, snap_id, all, descendants, format).await
        }
        #[cfg(target_os = "linux")]
        Command::Kernel(_) => Err(Error::new(
            ErrorKind::InvalidInput,
            "internal: kernel commands are run by main, outside the runtime",
        )),
    }
}

/// `--pretty-format`: set once per command, before it prints.
static PRETTY_JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn set_pretty_json(on: bool) {
    PRETTY_JSON.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// A command's JSON output as printed: compact, or with `--pretty-format` indented by four
/// as Ceph's JSONFormatter indents it, the keys in the order they were written.
fn json_text(compact: &str) -> String {
    if !PRETTY_JSON.load(std::sync::atomic::Ordering::Relaxed) {
        return compact.to_string();
    }
    serde_json::from_str::<serde_json::Value>(compact)
        .ok()
        .and_then(|v| pretty_json(&v).ok())
        .unwrap_or_else(|| compact.to_string())
}

/// `v` indented by four, as Ceph's JSONFormatter (rbd's and rbd-nbd's `--pretty-format`).
pub(crate) fn pretty_json(v: &serde_json::Value) -> Result<String> {
    use serde::Serialize;
    let mut buf = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    v.serialize(&mut ser)
        .map_err(|e| Error::new(ErrorKind::Io, format!("formatting json: {e}")))?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Runs `f` on an opened store image and closes it whatever `f` returned.
/// `f` of each image of `pool` (POOL or POOL/NAMESPACE), by name, as rbd's pool-wide
/// listings go (`du`, `ls -l`): an image gone since the listing is skipped, one that does
/// not open is named on stderr, and the listing goes on.
async fn each_pool_image<S: Store, T>(
    store: &S,
    pool: &str,
    mut f: impl AsyncFnMut(&ImageSpec) -> Result<T>,
) -> Result<Vec<T>> {
    let (pool_name, namespace) = crate::spec::parse_pool_spec(pool)?;
    let mut names = store.list_images(pool).await?;
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let spec = ImageSpec {
            pool: pool_name.clone(),
            namespace: namespace.clone(),
            name,
            snap: None,
        };
        match f(&spec).await {
            Ok(t) => out.push(t),
            Err(e) if e.kind == ErrorKind::NotFound => {}
            Err(e) => eprintln!("rados-nbd: error opening {spec}: {e}"),
        }
    }
    Ok(out)
}

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

fn snap_of(h: &ImageHeader, spec: &ImageSpec) -> Result<(Option<u64>, u64)> {
    match &spec.snap {
        None => Ok((None, h.size)),
        Some(n) => h
            .snaps
            .iter()
            .find(|s| s.is_user() && &s.name == n)
            .map(|s| (Some(s.id), s.size))
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("snapshot {spec} not found"))),
    }
}
