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
use tokio_rustls::rustls::{self, server::WebPkiClientVerifier, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;

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
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| ca_err(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        // Load the key on its own first: rustls reports a key that ring cannot sign with as
        // "failed to parse private key", which hides the real reason (most often an RSA
        // modulus size ring refuses).
        if provider
            .key_provider
            .load_private_key(private.clone_key())
            .is_err()
        {
            return Err(TlsError::Key {
                path: key.to_path_buf(),
                reason: unusable_key(&private),
            });
        }
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

/// What ring signs with, as rustls uses it (ring 0.17: `RsaKeyPair` wants a 2048..=4096-bit
/// modulus whose primes are multiples of 512 bits, and e = 65537; ECDSA only on P-256 and
/// P-384).
const SIGNABLE: &str = "this build's TLS (rustls with ring) signs only with RSA keys of 2048, \
    3072 or 4096 bits (exponent 65537), ECDSA P-256 or P-384 keys, or Ed25519 keys; make one \
    with `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072` or `openssl genpkey \
    -algorithm EC -pkeyopt ec_paramgen_curve:P-256` and a certificate for it";

/// Why a well-formed PEM key cannot sign: what the key is, then what would work.
fn unusable_key(key: &PrivateKeyDer<'_>) -> String {
    let what = match key {
        PrivateKeyDer::Pkcs1(k) => der::rsa_pkcs1(k.secret_pkcs1_der()),
        PrivateKeyDer::Sec1(k) => der::ec_sec1(k.secret_sec1_der()),
        PrivateKeyDer::Pkcs8(k) => der::pkcs8(k.secret_pkcs8_der()),
        _ => None,
    };
    match what {
        Some(what) => format!("{what}: {SIGNABLE}"),
        None => format!("not a key this build can use (or a damaged one): {SIGNABLE}"),
    }
}

/// Just enough DER to say what kind of private key a file holds and how big it is. Every
/// reader returns None on anything unexpected; the caller then says less, never more.
mod der {
    const SEQUENCE: u8 = 0x30;
    const INTEGER: u8 = 0x02;
    const OCTET_STRING: u8 = 0x04;
    const OID: u8 = 0x06;
    const CONTEXT_0: u8 = 0xa0;

    // 1.2.840.113549.1.1.1 rsaEncryption, 1.2.840.113549.1.1.10 RSASSA-PSS
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    const RSA_PSS: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];
    // 1.2.840.10045.2.1 id-ecPublicKey
    const EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    // 1.3.101.112 Ed25519, 1.3.101.113 Ed448
    const ED25519: &[u8] = &[0x2b, 0x65, 0x70];
    const ED448: &[u8] = &[0x2b, 0x65, 0x71];

    /// One TLV: (tag, contents, rest).
    fn tlv(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, d) = d.split_first()?;
        let (&first, d) = d.split_first()?;
        let (len, d) = if first < 0x80 {
            (first as usize, d)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || d.len() < n {
                return None;
            }
            let len = d[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
            (len, &d[n..])
        };
        (d.len() >= len).then(|| (tag, &d[..len], &d[len..]))
    }

    fn expect(d: &[u8], want: u8) -> Option<(&[u8], &[u8])> {
        let (tag, body, rest) = tlv(d)?;
        (tag == want).then_some((body, rest))
    }

    /// Bits in a positive INTEGER's value.
    fn bits(int: &[u8]) -> usize {
        let int = match int.iter().position(|&b| b != 0) {
            Some(i) => &int[i..],
            None => return 0,
        };
        int.len() * 8 - int[0].leading_zeros() as usize
    }

    fn curve(oid: &[u8]) -> String {
        match oid {
            [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07] => "P-256".into(),
            [0x2b, 0x81, 0x04, 0x00, 0x22] => "P-384".into(),
            [0x2b, 0x81, 0x04, 0x00, 0x23] => "P-521".into(),
            [0x2b, 0x81, 0x04, 0x00, 0x0a] => "secp256k1".into(),
            _ => "an unnamed".into(),
        }
    }

    /// RSAPrivateKey (PKCS#1): SEQUENCE { version, modulus, publicExponent, ... }.
    pub fn rsa_pkcs1(d: &[u8]) -> Option<String> {
        let (seq, _) = expect(d, SEQUENCE)?;
        let (_version, rest) = expect(seq, INTEGER)?;
        let (n, rest) = expect(rest, INTEGER)?;
        let (e, _) = expect(rest, INTEGER)?;
        let e = if e.len() <= 8 {
            e.iter().fold(0u64, |a, &b| (a << 8) | b as u64).to_string()
        } else {
            format!("of {} bits", bits(e))
        };
        Some(format!("RSA key of {} bits (exponent {e})", bits(n)))
    }

    /// ECPrivateKey (SEC1): SEQUENCE { version, privateKey, [0] curve OID, [1] public }.
    pub fn ec_sec1(d: &[u8]) -> Option<String> {
        let (seq, _) = expect(d, SEQUENCE)?;
        let (_version, rest) = expect(seq, INTEGER)?;
        let (_private, rest) = expect(rest, OCTET_STRING)?;
        let curve = expect(rest, CONTEXT_0)
            .and_then(|(params, _)| expect(params, OID))
            .map_or_else(|| "an unnamed".into(), |(oid, _)| curve(oid));
        Some(format!("ECDSA key on {curve} curve"))
    }

    /// PrivateKeyInfo (PKCS#8): SEQUENCE { version, AlgorithmIdentifier, OCTET STRING key }.
    pub fn pkcs8(d: &[u8]) -> Option<String> {
        let (seq, _) = expect(d, SEQUENCE)?;
        let (_version, rest) = expect(seq, INTEGER)?;
        let (alg, rest) = expect(rest, SEQUENCE)?;
        let (oid, params) = expect(alg, OID)?;
        let (inner, _) = expect(rest, OCTET_STRING)?;
        match oid {
            RSA => rsa_pkcs1(inner),
            RSA_PSS => rsa_pkcs1(inner).map(|k| format!("RSA-PSS-only {k}")),
            EC => {
                let curve =
                    expect(params, OID).map_or_else(|| "an unnamed".into(), |(o, _)| curve(o));
                Some(format!("ECDSA key on {curve} curve"))
            }
            ED25519 => Some("Ed25519 key".into()),
            ED448 => Some("Ed448 key".into()),
            _ => Some("private key of an algorithm this build does not know".into()),
        }
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

/// A connection before (`Left`, plain) or after (`Right`) STARTTLS. The upgrade happens
/// mid-handshake, so the stream type cannot be fixed at compile time.
pub(crate) type MaybeTls<S> = Either<S, Box<tokio_rustls::server::TlsStream<S>>>;

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

    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        match body.len() {
            n if n < 0x80 => v.push(n as u8),
            n if n < 0x100 => v.extend([0x81, n as u8]),
            n => v.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        v.extend_from_slice(body);
        v
    }

    fn seq(parts: &[Vec<u8>]) -> Vec<u8> {
        tlv(0x30, &parts.concat())
    }

    /// An RSAPrivateKey whose modulus has `bits` bits (the other numbers are placeholders:
    /// only the shape is read).
    fn pkcs1(bits: usize) -> Vec<u8> {
        let mut n = vec![0u8; 1 + bits.div_ceil(8)];
        n[1] = 1 << ((bits - 1) % 8);
        let int = |b: &[u8]| tlv(0x02, b);
        seq(&[int(&[0]), int(&n), int(&[1, 0, 1]), int(&[1]), int(&[1])])
    }

    fn pkcs8(alg: &[u8], params: &[u8], inner: &[u8]) -> Vec<u8> {
        seq(&[
            tlv(0x02, &[0]),
            seq(&[tlv(0x06, alg), params.to_vec()]),
            tlv(0x04, inner),
        ])
    }

    #[test]
    fn unusable_keys_are_described() {
        // What older certtool made: ring wants primes in multiples of 512 bits.
        let k = PrivateKeyDer::Pkcs1(pkcs1(2432).into());
        let e = unusable_key(&k);
        assert!(
            e.starts_with("RSA key of 2432 bits (exponent 65537): "),
            "{e}"
        );
        assert!(e.contains("2048, 3072 or 4096 bits"), "{e}");
        assert!(e.contains("openssl genpkey"), "{e}");
        let k = PrivateKeyDer::Pkcs8(pkcs8(der_oids::RSA, &tlv(0x05, &[]), &pkcs1(8192)).into());
        assert!(unusable_key(&k).starts_with("RSA key of 8192 bits"));
        // P-521, as SEC1 and as PKCS#8.
        let p521 = tlv(0x06, &[0x2b, 0x81, 0x04, 0x00, 0x23]);
        let sec1 = seq(&[tlv(0x02, &[1]), tlv(0x04, &[7; 66]), tlv(0xa0, &p521)]);
        let k = PrivateKeyDer::Sec1(sec1.clone().into());
        assert!(unusable_key(&k).starts_with("ECDSA key on P-521 curve: "));
        let k = PrivateKeyDer::Pkcs8(pkcs8(der_oids::EC, &p521, &sec1).into());
        assert!(unusable_key(&k).starts_with("ECDSA key on P-521 curve: "));
        let k = PrivateKeyDer::Pkcs8(pkcs8(&[0x2b, 0x65, 0x71], &[], &[0; 57]).into());
        assert!(unusable_key(&k).starts_with("Ed448 key: "));
        // Damaged: still one line saying what would work, and no panic on truncation.
        let mut cut = pkcs1(2432);
        cut.truncate(200);
        let k = PrivateKeyDer::Pkcs1(cut.into());
        assert!(unusable_key(&k).starts_with("not a key this build can use"));
    }

    mod der_oids {
        pub const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
        pub const EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    }

    #[test]
    fn missing_files_name_the_file() {
        let e = TlsConfig::from_pem_files(Path::new("/nonexistent/c.pem"), Path::new("/x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/c.pem"), "{e}");
    }
}
