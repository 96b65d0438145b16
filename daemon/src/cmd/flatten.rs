//! `flatten`: copies up everything a clone still reads from its ancestors, then
//! detaches it from its parent (`rbd flatten`).

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::image;
use crate::progress::EVERY;
use crate::spec::ImageSpec;
use crate::store::{ImageStore, OpenMode, OwnerAction, Store};
use std::time::Instant;

/// Flattens a clone here when it is not in use, else asks the process serving it to (a
/// rados-nbd or librbd holder of its lock, through the header watch, as `rbd flatten`).
pub async fn flatten<S: Store>(store: &S, spec: &ImageSpec) -> Result<()> {
    // The holder may hand its lock over part way (another client asked for it), and the
    // lock may then be free: start again, here or with the new holder, as librbd's asker
    // does (the objects copied up so far are not copied again).
    let mut tries = 0;
    loop {
        match flatten_once(store, spec).await {
            Err(e) if e.kind == ErrorKind::Interrupted && tries < 10 => {
                tries += 1;
                tracing::info!("{e}: starting again");
                // The lock may still be moving (its new holder closing the image).
                tokio::time::sleep(std::time::Duration::from_millis(200 * tries)).await;
            }
            r => return r,
        }
    }
}

async fn flatten_once<S: Store>(store: &S, spec: &ImageSpec) -> Result<()> {
    // Refused before anything is written (opening for writing sets the dirty flag).
    let peek = store.open_image(spec, OpenMode::ReadOnly).await?;
    let is_clone = peek.header().parent.is_some();
    peek.close().await?;
    if !is_clone {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("image {spec} is not a clone: nothing to flatten"),
        ));
    }
    let opts = image::OpenOptions {
        read_only: false,
        shared_default: Config::load()?.shared_default,
        checkpoint_idle: None,
    };
    let img = match image::Image::open(store, spec, &opts).await {
        Ok(img) => img,
        Err(e) if e.kind == ErrorKind::Busy => {
            // Served elsewhere: the holder flattens it (as `rbd flatten` asks it).
            let start = Instant::now();
            let mut last = start;
            let mut progress = |done: u64, total: u64| {
                let now = Instant::now();
                if now.duration_since(last) >= EVERY && done < total {
                    last = now;
                    tracing::info!(
                        "flattening {spec} (by the process serving it): {done} of {total} objects ({}%)",
                        done * 100 / total.max(1)
                    );
                }
            };
            return match store
                .ask_holder(spec, &OwnerAction::Flatten, &mut progress)
                .await
            {
                Ok(()) => {
                    // The holder also removed a parent snapshot left in the trash.
                    println!("{spec}: flattened by the process serving it");
                    Ok(())
                }
                Err(e2) if e2.kind == ErrorKind::Busy && e2.message.contains("stop serving") => {
                    Err(Error::new(
                        ErrorKind::Busy,
                        format!("{}; stop serving it to flatten it", e.message),
                    ))
                }
                Err(e2) => Err(e2),
            };
        }
        Err(e) => return Err(e),
    };
    // Each object may be a copy-up of megabytes: the clock is read every object (not
    // every 1024 as Progress does for listings), a line at most every EVERY.
    let start = Instant::now();
    let mut last = start;
    let mut checked = 0;
    let r = img.flatten(|done, total| {
        checked = total;
        let now = Instant::now();
        if now.duration_since(last) >= EVERY && done < total {
            last = now;
            tracing::info!(
                "flattening {spec}: {done} of {total} objects ({}%, {:.1} s)",
                done * 100 / total.max(1),
                now.duration_since(start).as_secs_f64()
            );
        }
    });
    let r = r.await;
    let c = img.close().await;
    r?;
    c?;
    println!("{spec}: flattened ({checked} objects checked)");
    Ok(())
}
