//! The daemon's config file: `key = value` lines, `#` comments. Read from
//! `$RADOS_NBD_CONFIG`, else `/etc/rados-nbd/rados-nbd.conf`; a missing file means
//! defaults, a malformed one is an error naming the file and line.

use crate::error::{Error, ErrorKind, Result};
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG: &str = "/etc/rados-nbd/rados-nbd.conf";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// `shared` for images without a `rados-nbd.shared` metadata key.
    pub shared_default: bool,
}

pub fn config_path() -> PathBuf {
    match std::env::var_os("RADOS_NBD_CONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_CONFIG),
    }
}

impl Config {
    pub fn load() -> Result<Config> {
        Self::load_from(&config_path())
    }

    pub fn load_from(path: &Path) -> Result<Config> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(Error::io(
                format!("reading config file {}", path.display()),
                e,
            )),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let mut c = Config::default();
        for (i, raw) in text.lines().enumerate() {
            let bad = |why: String| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!("config file {} line {}: {why}", path.display(), i + 1),
                )
            };
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(bad(format!("expected `key = value`, got {line:?}")));
            };
            let (k, v) = (k.trim(), v.trim());
            match k {
                "shared_default" => {
                    c.shared_default =
                        crate::parse::parse_bool("shared_default", v).map_err(|e| bad(e.message))?
                }
                _ => return Err(bad(format!("unknown key {k:?} (known: shared_default)"))),
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let p = Path::new("/x.conf");
        assert!(!Config::parse("", p).unwrap().shared_default);
        let c = Config::parse("# c\n\n shared_default = true # yes\n", p).unwrap();
        assert!(c.shared_default);
        let e = Config::parse("shared_default = maybe\n", p).unwrap_err();
        assert!(e.message.contains("/x.conf line 1"), "{}", e.message);
        let e = Config::parse("\nfoo = 1\n", p).unwrap_err();
        assert!(e.message.contains("line 2") && e.message.contains("foo"));
        assert!(Config::parse("shared_default\n", p).is_err());
    }

    #[test]
    fn missing_file_is_defaults() {
        let d = tempfile::tempdir().unwrap();
        let c = Config::load_from(&d.path().join("none.conf")).unwrap();
        assert_eq!(c, Config::default());
        let f = d.path().join("c.conf");
        std::fs::write(&f, "shared_default=yes\n").unwrap();
        assert!(Config::load_from(&f).unwrap().shared_default);
    }
}
