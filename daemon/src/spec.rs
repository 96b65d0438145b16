//! Image specs (`[POOL/[NAMESPACE/]]NAME[@SNAP]`, as `rbd` parses them) and sizes with
//! K/M/G/T suffixes.

use crate::error::{Error, ErrorKind, Result};

pub use crate::parse::parse_size;

pub const DEFAULT_POOL: &str = "rbd";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    pub pool: String,
    /// The RBD namespace inside the pool (`rbd namespace create`); empty for the pool's
    /// default namespace.
    pub namespace: String,
    pub name: String,
    pub snap: Option<String>,
}

impl ImageSpec {
    /// `POOL` or `POOL/NAMESPACE`: where the image's objects live, as `rbd ls` takes it.
    pub fn pool_spec(&self) -> String {
        pool_spec(&self.pool, &self.namespace)
    }
}

/// `POOL` or `POOL/NAMESPACE`.
pub fn pool_spec(pool: &str, namespace: &str) -> String {
    if namespace.is_empty() {
        pool.to_string()
    } else {
        format!("{pool}/{namespace}")
    }
}

/// Splits `POOL[/NAMESPACE]` (what `ls` takes) and checks both names like an image spec's.
pub fn parse_pool_spec(s: &str) -> Result<(String, String)> {
    let spec: ImageSpec = format!("{s}/x").parse()?;
    Ok((spec.pool, spec.namespace))
}

impl std::fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.pool_spec(), self.name)?;
        if let Some(s) = &self.snap {
            write!(f, "@{s}")?;
        }
        Ok(())
    }
}

/// `s` as one word of a line: `%`, white space, control characters and any character
/// `also` names percent-encoded, byte by byte (UTF-8); the rest as it is (so a name of
/// letters, digits and `-_.+:`, all that names once were, is its own word unless `also`
/// has one of those).
pub fn one_word(s: &str, also: &[char]) -> String {
    let mut w = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '%' || c.is_whitespace() || c.is_control() || also.contains(&c) {
            for b in c.encode_utf8(&mut [0; 4]).bytes() {
                w.push_str(&format!("%{b:02X}"));
            }
        } else {
            w.push(c);
        }
    }
    w
}

/// Names as `rbd` takes them: anything but `/` and `@` (its spec parser's separators),
/// so images, snapshots and namespaces made by rbd with spaces, quotes or any Unicode in
/// their names can be served and managed. Refused as well: the empty name, `.` and `..`
/// (the directory store's pools are directories) and NUL (not in a file name, nor in the
/// kernel's C strings); at most 255 bytes.
fn check_name(what: &str, s: &str, spec: &str) -> Result<()> {
    let why = if s.is_empty() {
        "empty"
    } else if s == "." || s == ".." {
        "\".\" and \"..\" are not names"
    } else if s.len() > 255 {
        "longer than 255 bytes"
    } else if s.contains(['/', '@']) {
        "'/' and '@' separate the parts of a spec"
    } else if s.contains('\0') {
        "it contains a NUL character"
    } else {
        return Ok(());
    };
    Err(Error::new(
        ErrorKind::InvalidInput,
        format!("invalid {what} {s:?} in image spec {spec:?}: {why}"),
    ))
}

impl std::str::FromStr for ImageSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (rest, snap) = match s.split_once('@') {
            Some((r, sn)) => (r, Some(sn)),
            None => (s, None),
        };
        // rbd's `[pool/[namespace/]]image`: one slash names the pool, two the namespace too.
        let parts: Vec<&str> = rest.split('/').collect();
        let (pool, namespace, name) = match parts[..] {
            [name] => (DEFAULT_POOL, "", name),
            [pool, name] => (pool, "", name),
            [pool, ns, name] => {
                check_name("namespace", ns, s)?;
                (pool, ns, name)
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("invalid image spec {s:?} (expected [POOL/[NAMESPACE/]]IMAGE[@SNAP])"),
                ))
            }
        };
        check_name("pool", pool, s)?;
        check_name("image name", name, s)?;
        if let Some(sn) = snap {
            check_name("snapshot name", sn, s)?;
        }
        Ok(ImageSpec {
            pool: pool.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            snap: snap.map(str::to_string),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let s: ImageSpec = "vm1".parse().unwrap();
        assert_eq!(
            (s.pool.as_str(), s.name.as_str(), s.snap),
            ("rbd", "vm1", None)
        );
        let s: ImageSpec = "p/vm1@snap1".parse().unwrap();
        assert_eq!(s.to_string(), "p/vm1@snap1");
        // rbd's namespace form: pool/namespace/image[@snap], and it prints back the same.
        let s: ImageSpec = "p/ns1/vm1@s".parse().unwrap();
        assert_eq!(
            (s.pool.as_str(), s.namespace.as_str(), s.name.as_str()),
            ("p", "ns1", "vm1")
        );
        assert_eq!(s.snap.as_deref(), Some("s"));
        assert_eq!(s.to_string(), "p/ns1/vm1@s");
        assert_eq!(s.pool_spec(), "p/ns1");
        assert_eq!(s.to_string().parse::<ImageSpec>().unwrap(), s);
        assert_eq!("p/vm1".parse::<ImageSpec>().unwrap().namespace, "");
        assert_eq!(
            parse_pool_spec("p/ns1").unwrap(),
            ("p".into(), "ns1".into())
        );
        assert_eq!(parse_pool_spec("p").unwrap(), ("p".into(), "".into()));
        let e = "p//vm1".parse::<ImageSpec>().unwrap_err().to_string();
        assert!(e.contains("namespace"), "{e}");
        let e = "a/b/c/d".parse::<ImageSpec>().unwrap_err().to_string();
        assert!(e.contains("NAMESPACE"), "{e}");
        assert!("".parse::<ImageSpec>().is_err());
        assert!("p/".parse::<ImageSpec>().is_err());
        assert!("../x".parse::<ImageSpec>().is_err());
    }

    /// Any name rbd's spec parser takes (`[^/@]+`) is ours too: white space, quotes,
    /// shell and XML characters, a leading '-', Unicode.
    #[test]
    fn names_as_rbd_takes_them() {
        for name in [
            "a b",
            " sp",
            "tab\tx",
            "x'y\"z",
            "a\\b<c>&d",
            "a=b#c%d,e",
            "-lead",
            "ü名",
            "...",
        ] {
            let s: ImageSpec = format!("p/{name}@{name}").parse().unwrap();
            assert_eq!((s.pool.as_str(), s.name.as_str()), ("p", name));
            assert_eq!(s.snap.as_deref(), Some(name));
            let s: ImageSpec = format!("p/{name}/{name}").parse().unwrap();
            assert_eq!((s.namespace.as_str(), s.name.as_str()), (name, name));
            assert_eq!(s.to_string().parse::<ImageSpec>().unwrap(), s);
        }
        for (bad, why) in [
            ("p/img@a@b", "'/' and '@'"),
            ("p/img@a/b", "'/' and '@'"),
            ("p/img@", "empty"),
            ("./img", "are not names"),
            ("p/..", "are not names"),
            ("p/a\0b", "NUL"),
        ] {
            let e = bad.parse::<ImageSpec>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let long = "x".repeat(256);
        let e = long.parse::<ImageSpec>().unwrap_err().to_string();
        assert!(e.contains("longer than 255 bytes"), "{e}");
        assert!("x".repeat(255).parse::<ImageSpec>().is_ok());
    }
}
