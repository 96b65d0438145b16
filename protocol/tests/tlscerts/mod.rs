//! Throwaway certificate authorities and certificates for the TLS tests, written as PEM
//! files in the layout libnbd's `tls-certificates=DIR` expects (ca-cert.pem,
//! client-cert.pem, client-key.pem) plus the server's own pair.
#![allow(dead_code)]

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

pub fn new_ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("CA key");
    let cert = p.self_signed(&key).expect("self-sign CA");
    Ca { cert, key }
}

/// A leaf signed by `ca`: (certificate PEM, key PEM).
pub fn leaf(ca: &Ca, name: &str, server: bool) -> (String, String) {
    let mut p = CertificateParams::new(vec![name.to_string()]).expect("leaf params");
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let key = KeyPair::generate().expect("leaf key");
    let cert = p.signed_by(&key, &ca.cert, &ca.key).expect("sign leaf");
    (cert.pem(), key.serialize_pem())
}

/// A directory holding a CA, a server pair for "localhost" and a client pair, all
/// removed on drop.
pub struct CertDir {
    pub dir: PathBuf,
}

impl CertDir {
    pub fn new(tag: &str) -> CertDir {
        let dir =
            std::env::temp_dir().join(format!("nbd-protocol-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cert dir");
        let ca = new_ca("nbd-protocol test CA");
        let w = |n: &str, s: &str| std::fs::write(dir.join(n), s).expect("write PEM");
        w("ca-cert.pem", &ca.cert.pem());
        let (c, k) = leaf(&ca, "localhost", true);
        w("server-cert.pem", &c);
        w("server-key.pem", &k);
        let (c, k) = leaf(&ca, "client", false);
        w("client-cert.pem", &c);
        w("client-key.pem", &k);
        // A client certificate from a CA the server does not trust.
        let rogue = new_ca("rogue CA");
        let (c, k) = leaf(&rogue, "client", false);
        w("rogue-cert.pem", &c);
        w("rogue-key.pem", &k);
        CertDir { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
