//! `create`: a new image, like `rbd create`: the features, object size and data pool the
//! command line names, else what librbd's `rbd_default_*` options say for the pool (Ceph),
//! else librbd's defaults.

use super::info::FEATURE_NAMES;
use super::parse_head_spec;
use crate::cli::CreateArgs;
use crate::error::{Error, ErrorKind, Result};
use crate::image;
use crate::parse::{parse_image_size, parse_object_size};
use crate::store::{
    CreateOptions, Store, DEFAULT_FEATURES, RBD_FEATURE_DATA_POOL, RBD_FEATURE_DEEP_FLATTEN,
    RBD_FEATURE_EXCLUSIVE_LOCK, RBD_FEATURE_FAST_DIFF, RBD_FEATURE_JOURNALING,
    RBD_FEATURE_LAYERING, RBD_FEATURE_MIGRATING, RBD_FEATURE_NON_PRIMARY, RBD_FEATURE_OBJECT_MAP,
    RBD_FEATURE_OPERATIONS, RBD_FEATURE_STRIPINGV2,
};

pub async fn create<S: Store>(store: &S, a: &CreateArgs) -> Result<()> {
    let spec = parse_head_spec(&a.image, "create")?;
    let size = parse_image_size(&a.size).map_err(|e| e.context("--size"))?;
    let defaults = store.create_defaults(&spec.pool_spec()).await?;
    let order = match (&a.object_size, &defaults.order) {
        (Some(s), _) => parse_object_size(s)?,
        (None, Some(o)) => parse_order(o).map_err(|e| e.context("rbd_default_order"))?,
        (None, None) => 22,
    };
    let features = if !a.image_features.is_empty() {
        parse_features(&a.image_features.join(",")).map_err(|e| e.context("--image-feature"))?
    } else {
        // An empty rbd_default_features is librbd's default, as librbd reads it.
        match defaults.features.as_deref().map(str::trim) {
            Some(f) if !f.is_empty() => parse_features(f).map_err(|e| {
                e.context("rbd_default_features (as configured; --image-feature overrides it)")
            })?,
            _ => DEFAULT_FEATURES,
        }
    };
    // Each as librbd takes it: the option, else the configured default.
    let stripe_unit = stripe_unit(
        a.stripe_unit.as_deref().or(defaults.stripe_unit.as_deref()),
        a.stripe_count
            .as_deref()
            .or(defaults.stripe_count.as_deref()),
        order,
    )?;
    let features = with_fast_diff(features & !RBD_FEATURE_STRIPINGV2);
    let opts = CreateOptions {
        size,
        order,
        features,
        data_pool: a.data_pool.clone().or(defaults.data_pool),
        stripe_unit,
    };
    image::create_image(store, &spec, &opts).await
}

/// The stripe unit that --stripe-unit and --stripe-count, else `rbd_default_stripe_unit`
/// and `rbd_default_stripe_count` as configured (0 when not), give a new image of objects
/// 2^order, checked as librbd's
/// CreateRequest checks them: striping v2 is what these settings say, not the feature
/// bit (`rbd default features = 3` makes a layering-only image). Some(unit): striped with
/// one object per stripe, the plain layout; a stripe count above 1 is refused (rados-nbd
/// serves no such image).
pub fn stripe_unit(unit: Option<&str>, count: Option<&str>, order: u8) -> Result<Option<u64>> {
    let unit = match unit.map(str::trim).filter(|v| !v.is_empty()) {
        None => 0,
        Some(v) => crate::parse::parse_size(v).map_err(|e| e.context("stripe unit"))?,
    };
    let count = match count.map(str::trim).filter(|v| !v.is_empty()) {
        None => 0,
        Some(v) => v.parse::<u64>().map_err(|_| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("invalid stripe count {v:?} (a number: 1)"),
            )
        })?,
    };
    let object_size = 1u64 << order;
    let bad = |why: String| {
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "stripe unit {unit} and stripe count {count} (--stripe-unit and \
                 --stripe-count; for create, else rbd_default_stripe_unit and _count as \
                 configured): {why}"
            ),
        ))
    };
    if (unit == 0) != (count == 0) {
        return bad("set both or neither, as librbd requires".into());
    }
    if unit != 0 && (!object_size.is_multiple_of(unit) || unit < 512) {
        return bad(format!(
            "the stripe unit must be a factor of the object size {object_size} and at least 512"
        ));
    }
    if count > 1 {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "stripe count {count} makes a striped image with {count} objects per \
                 stripe, which rados-nbd does not serve"
            ),
        ));
    }
    Ok((unit != 0 && unit != object_size).then_some(unit))
}

/// librbd's create adds fast-diff to object-map (features 13 make an image of 29); so
/// does its clone.
pub fn with_fast_diff(features: u64) -> u64 {
    if features & RBD_FEATURE_OBJECT_MAP != 0 {
        features | RBD_FEATURE_FAST_DIFF
    } else {
        features
    }
}

/// The features a new image may have, by name or as librbd's number (`rbd_default_features
/// = 61`), checked as librbd checks them: object-map needs exclusive-lock, fast-diff needs
/// object-map. The bits librbd sets or clears itself (data-pool, operations, migrating,
/// non-primary) are dropped, as librbd drops them; striping v2 is left to `create` (the
/// stripe settings decide it); journaling is refused (rados-nbd does not serve it).
pub fn parse_features(s: &str) -> Result<u64> {
    let bad = |m: String| Error::new(ErrorKind::InvalidInput, m);
    let t = s.trim();
    let f = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse::<u64>()
            .map_err(|_| bad(format!("invalid features {t:?}")))?
    } else {
        let mut f = 0;
        for name in t.split([',', ' ']).map(str::trim).filter(|n| !n.is_empty()) {
            let bit = FEATURE_NAMES
                .iter()
                .position(|&n| n == name)
                .ok_or_else(|| bad(format!("unknown image feature {name:?}")))?;
            f |= 1u64 << bit;
        }
        f
    };
    let f = f & !(RBD_FEATURE_DATA_POOL
        | RBD_FEATURE_OPERATIONS
        | RBD_FEATURE_MIGRATING
        | RBD_FEATURE_NON_PRIMARY);
    const CREATABLE: u64 = RBD_FEATURE_LAYERING
        | RBD_FEATURE_STRIPINGV2
        | RBD_FEATURE_EXCLUSIVE_LOCK
        | RBD_FEATURE_OBJECT_MAP
        | RBD_FEATURE_FAST_DIFF
        | RBD_FEATURE_DEEP_FLATTEN
        | RBD_FEATURE_JOURNALING;
    if f & !CREATABLE != 0 {
        return Err(bad(format!(
            "features {f:#x} include ones librbd sets itself or does not know ({})",
            super::info::feature_names(f & !CREATABLE).join(", ")
        )));
    }
    if f & RBD_FEATURE_JOURNALING != 0 {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "rados-nbd does not serve images with journaling: leave it out",
        ));
    }
    if f & RBD_FEATURE_OBJECT_MAP != 0 && f & RBD_FEATURE_EXCLUSIVE_LOCK == 0 {
        return Err(bad("object-map needs exclusive-lock".into()));
    }
    if f & RBD_FEATURE_FAST_DIFF != 0 && f & RBD_FEATURE_OBJECT_MAP == 0 {
        return Err(bad("fast-diff needs object-map".into()));
    }
    Ok(f)
}

/// `rbd_default_order`: log2 of the object size, 12 (4 KiB) to 25 (32 MiB).
fn parse_order(s: &str) -> Result<u8> {
    match s.trim().parse::<u8>() {
        Ok(o) if (12..=25).contains(&o) => Ok(o),
        _ => Err(Error::new(
            ErrorKind::InvalidInput,
            format!("invalid order {s:?} (12 to 25: objects of 4 KiB to 32 MiB)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripe_settings_as_librbd_checks_them() {
        let su = |u: Option<&str>, c: Option<&str>| stripe_unit(u, c, 22);
        // Neither, or the plain values: no striping.
        assert_eq!(su(None, None).unwrap(), None);
        assert_eq!(su(Some("0"), Some("0")).unwrap(), None);
        assert_eq!(su(Some("4M"), Some("1")).unwrap(), None);
        // Count 1 with a smaller unit: striped, the plain layout.
        assert_eq!(su(Some("64K"), Some("1")).unwrap(), Some(64 << 10));
        assert_eq!(su(Some("65536"), Some("1")).unwrap(), Some(64 << 10));
        // librbd's refusals: one without the other, a unit that is no factor of the
        // object size or under 512 bytes.
        for (u, c, why) in [
            (Some("64K"), None, "both or neither"),
            (None, Some("1"), "both or neither"),
            (Some("3000"), Some("1"), "factor"),
            (Some("8M"), Some("1"), "factor"),
            (Some("256"), Some("1"), "at least 512"),
        ] {
            let e = su(u, c).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidInput, "{u:?} {c:?}");
            assert!(e.message.contains(why), "{u:?} {c:?}: {e}");
        }
        // More than one object per stripe: refused, not served here.
        assert_eq!(
            su(Some("64K"), Some("2")).unwrap_err().kind,
            ErrorKind::Unsupported
        );
        // A count is a number, not a size.
        assert_eq!(
            su(Some("64K"), Some("1K")).unwrap_err().kind,
            ErrorKind::InvalidInput
        );
    }

    #[test]
    fn features_as_librbd_reads_them() {
        assert_eq!(parse_features("61").unwrap(), DEFAULT_FEATURES);
        assert_eq!(
            parse_features("layering,exclusive-lock,object-map,fast-diff,deep-flatten").unwrap(),
            DEFAULT_FEATURES
        );
        assert_eq!(parse_features("layering").unwrap(), RBD_FEATURE_LAYERING);
        assert_eq!(parse_features(" layering, deep-flatten ").unwrap(), 33);
        assert_eq!(parse_features("0").unwrap(), 0);
        // What librbd sets or clears itself is dropped, as librbd drops it; striping is
        // left for the stripe settings to decide.
        assert_eq!(parse_features("3").unwrap(), 3);
        assert_eq!(
            parse_features(&(61 | 128 | 256 | 512).to_string()).unwrap(),
            61
        );
        for (bad, why) in [
            ("layering,bogus", "unknown image feature"),
            ("object-map", "needs exclusive-lock"),
            ("exclusive-lock,fast-diff", "needs object-map"),
            ("layering,journaling,exclusive-lock", "journaling"),
            ("4096", "sets itself or does not know"),
        ] {
            let e = parse_features(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert_eq!(parse_order("20").unwrap(), 20);
        assert!(parse_order("11").is_err() && parse_order("x").is_err());
    }
}
