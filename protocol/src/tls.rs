//! TLS for the NBD handshake (NBD_OPT_STARTTLS): the server's certificate and key from PEM
//! files, optional client-certificate verification against a CA, and the stream type
//! that a connection becomes once it is upgraded.
//!
//! The spec's three server modes map onto [`TlsMode`]: `Off` is NOTLS (STARTTLS gets
//! ERR_POLICY), `Allow` is SELECTIVETLS with no TLS-only export (plain clients keep
//! working, a client may upgrade), `Require` is FORCEDTLS (every option but STARTTLS and
//! ABORT gets ERR_TLS_REQD until TLS is up, and EXPORT_NAME ends the connection).

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::{self, server::WebPkiClientVerifier, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// Whether a server offers TLS, and whether it insists on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS; STARTTLS is refused with ERR_POLICY.
    #[default]
    Off,
    /// TLS on the client's request; plain clients are served too.
    Allow,
    /// TLS before anything else; plain clients are refused.
    Require,
}

impl FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(TlsMode::Off),
            "allow" => Ok(TlsMode::Allow),
            "require" => Ok(TlsMode::Require),
            _ => Err(format!(
                "invalid TLS mode {s:?} (expected off, allow or require)"
            )),
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::Allow => "allow",
            TlsMode::Require => "require",
        })
    }
}

/// Why a TLS configuration could not be built. Each names the file that was at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS certificate file {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("TLS key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("TLS client CA file {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("TLS configuration rejected: {0}")]
    Config(String),
    #[error("TLS mode {0} needs a certificate and key")]
    MissingConfig(TlsMode),
}

/// A server certificate chain and key, ready to accept TLS connections. Cheap to clone.
#[derive(Clone)]
pub struct TlsConfig {
    acceptor: TlsAcceptor,
    verifies_clients: bool,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("verifies_clients", &self.verifies_clients)
            .finish_non_exhaustive()
    }
}

fn pem_error(e: rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM item of the expected kind".into(),
        rustls_pki_types::pem::Error::Io(e) => e.to_string(),
        other => format!("bad PEM: {other:?}"),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err("no CERTIFICATE in the file".into());
    }
    Ok(certs)
}

impl TlsConfig {
    /// A server certificate chain (leaf first) and its private key (PKCS#8, PKCS#1 or
    /// SEC1), both PEM. Clients are not asked for certificates.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<TlsConfig, TlsError> {
        Self::build(cert, key, None)
    }

    /// As [`from_pem_files`](Self::from_pem_files), and every client must present a
    /// certificate signed by a CA in `client_ca` (PEM, one or more certificates).
    pub fn from_pem_files_with_client_ca(
        cert: &Path,
        key: &Path,
        client_ca: &Path,
    ) -> Result<TlsConfig, TlsError> {
        Self::build(cert, key, Some(client_ca))
    }

    fn build(cert: &Path, key: &Path, ca: Option<&Path>) -> Result<TlsConfig, TlsError> {
        let chain = load_certs(cert).map_err(|reason| TlsError::Cert {
            path: cert.to_path_buf(),
            reason,
        })?;
        let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
            path: key.to_path_buf(),
            reason: pem_error(e),
        })?;
        // An explicit provider, so nothing depends on a process-wide default being
        // installed (and two providers in one binary cannot make this ambiguous).
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let ca_err = |reason: String| TlsError::Ca {
                    path: ca.to_path_buf(),
                    reason,
                };
                let mut roots = RootCertStore::empty();
                for c in load_certs(ca).map_err(ca_err)? {
                    roots.add(c).map_err(|e| ca_err(e.to_string()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| ca_err(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(chain, private)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => TlsError::Key {
                    path: key.to_path_buf(),
                    reason: format!("does not match the certificate in {}", cert.display()),
                },
                other => TlsError::Config(other.to_string()),
            })?;
        Ok(TlsConfig {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            verifies_clients: ca.is_some(),
        })
    }

    /// Whether clients must present a certificate signed by the configured CA.
    pub fn verifies_clients(&self) -> bool {
        self.verifies_clients
    }

    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

/// The TLS part of [`ServerOptions`](crate::ServerOptions).
#[derive(Debug, Clone, Default)]
pub enum TlsSetting {
    #[default]
    Off,
    Allow(TlsConfig),
    Require(TlsConfig),
}

impl TlsSetting {
    /// Combine a mode (from a command line, say) with a configuration; `Allow` and
    /// `Require` need one, `Off` ignores it.
    pub fn new(mode: TlsMode, config: Option<TlsConfig>) -> Result<TlsSetting, TlsError> {
        match (mode, config) {
            (TlsMode::Off, _) => Ok(TlsSetting::Off),
            (TlsMode::Allow, Some(c)) => Ok(TlsSetting::Allow(c)),
            (TlsMode::Require, Some(c)) => Ok(TlsSetting::Require(c)),
            (m, None) => Err(TlsError::MissingConfig(m)),
        }
    }

    pub fn mode(&self) -> TlsMode {
        match self {
            TlsSetting::Off => TlsMode::Off,
            TlsSetting::Allow(_) => TlsMode::Allow,
            TlsSetting::Require(_) => TlsMode::Require,
        }
    }

    pub(crate) fn config(&self) -> Option<&TlsConfig> {
        match self {
            TlsSetting::Off => None,
            TlsSetting::Allow(c) | TlsSetting::Require(c) => Some(c),
        }
    }
}

/// A connection before or after STARTTLS. The upgrade happens mid-handshake, so the
/// stream type cannot be fixed at compile time.
pub(crate) enum MaybeTls<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
}

delegate_read!(MaybeTls<S: [AsyncRead + AsyncWrite + Unpin]>, Plain, Tls);
delegate_write!(MaybeTls<S: [AsyncRead + AsyncWrite + Unpin]>, Plain, Tls);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!("off".parse(), Ok(TlsMode::Off));
        assert_eq!("allow".parse(), Ok(TlsMode::Allow));
        assert_eq!("require".parse(), Ok(TlsMode::Require));
        assert!("on".parse::<TlsMode>().is_err());
        for m in [TlsMode::Off, TlsMode::Allow, TlsMode::Require] {
            assert_eq!(m.to_string().parse(), Ok(m));
        }
    }

    #[test]
    fn setting_needs_config() {
        assert!(matches!(
            TlsSetting::new(TlsMode::Require, None),
            Err(TlsError::MissingConfig(TlsMode::Require))
        ));
        assert!(matches!(
            TlsSetting::new(TlsMode::Off, None),
            Ok(TlsSetting::Off)
        ));
    }

    #[test]
    fn missing_files_name_the_file() {
        let e = TlsConfig::from_pem_files(Path::new("/nonexistent/c.pem"), Path::new("/x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/c.pem"), "{e}");
    }
}
