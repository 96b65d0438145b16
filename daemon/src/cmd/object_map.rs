//! `object-map check` and `object-map rebuild`.

use super::{snap_of, with_image};
use crate::error::{Error, ErrorKind, Result};
use crate::image::{self, rebuild_map};
use crate::spec::ImageSpec;
use crate::store::{
    ImageStore, OpenMode, OwnerAction, Store, RBD_FEATURE_OBJECT_MAP, RBD_FLAG_OBJECT_MAP_INVALID,
};
use objmap::{ObjectMap, ObjectState};

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

pub async fn check<S: Store>(store: &S, spec: &ImageSpec) -> Result<()> {
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

pub async fn rebuild<S: Store>(store: &S, spec: &ImageSpec) -> Result<()> {
    let r = with_image(store, spec, OpenMode::ReadWrite, async |img: &S::Image| {
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
    .await;
    match r {
        Ok(summary) => println!("object map of {spec} rebuilt: {summary}"),
        // Served elsewhere: its lock holder rebuilds it (as `rbd object-map rebuild`
        // asks it), with its own writes held meanwhile.
        Err(e) if e.kind == ErrorKind::Busy => {
            store
                .ask_holder(spec, &OwnerAction::RebuildObjectMap, &mut |_, _| {})
                .await?;
            println!("object map of {spec} rebuilt by the process serving it");
        }
        Err(e) => return Err(e),
    }
    Ok(())
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
        // snapshot is what `rbd object-map check` invalidates ...
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
}
