//! NBD_OPT_STARTTLS: the REQD rules of FORCEDTLS (`require`), plain clients under `allow`,
//! a real upgrade with a rustls client, client-certificate checks, and the ways a client
//! can botch the upgrade. Certificates are made fresh for each test.

mod common;
mod tlscerts;

use common::*;
use nbd_protocol::consts::*;
use nbd_protocol::{
    MemoryBackend, ProtocolError, ServerOptions, TlsConfig, TlsError, TlsMode, TlsSetting,
};
use std::sync::Arc;
use tlscerts::CertDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::rustls::{self, pki_types, ClientConfig, RootCertStore};
use tokio_rustls::{client::TlsStream, TlsConnector};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

const MIB: u64 = 1 << 20;

fn one() -> Arc<nbd_protocol::Exports<MemoryBackend>> {
    exports(vec![("disk", Arc::new(MemoryBackend::new(MIB)))])
}

fn server_config(certs: &CertDir, verify_clients: bool) -> TlsConfig {
    let (c, k) = (certs.path("server-cert.pem"), certs.path("server-key.pem"));
    if verify_clients {
        TlsConfig::from_pem_files_with_client_ca(&c, &k, &certs.path("ca-cert.pem"))
            .expect("server TLS config with client CA")
    } else {
        TlsConfig::from_pem_files(&c, &k).expect("server TLS config")
    }
}

fn opts(mode: TlsMode, certs: &CertDir, verify_clients: bool) -> ServerOptions {
    ServerOptions {
        tls: TlsSetting::new(mode, Some(server_config(certs, verify_clients))).unwrap(),
        ..Default::default()
    }
}

/// A rustls client trusting the test CA, presenting `identity` ("client", "rogue") if any.
fn connector(certs: &CertDir, identity: Option<&str>) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(certs.path("ca-cert.pem")).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match identity {
        None => b.with_no_client_auth(),
        Some(id) => {
            let chain =
                vec![CertificateDer::from_pem_file(certs.path(&format!("{id}-cert.pem"))).unwrap()];
            let key = PrivateKeyDer::from_pem_file(certs.path(&format!("{id}-key.pem"))).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
    };
    TlsConnector::from(Arc::new(cfg))
}

async fn upgrade(
    c: Client,
    certs: &CertDir,
    identity: Option<&str>,
) -> std::io::Result<Client<TlsStream<DuplexStream>>> {
    let name = pki_types::ServerName::try_from("localhost").unwrap();
    let s = tokio::time::timeout(T, connector(certs, identity).connect(name, c.s))
        .await
        .expect("TLS handshake timed out")?;
    Ok(Client { s })
}

/// Every option a plain client could try before STARTTLS under FORCEDTLS.
fn pre_tls_options() -> Vec<(u32, Vec<u8>)> {
    vec![
        (OPT_LIST, vec![]),
        (OPT_INFO, go_data("disk", &[INFO_BLOCK_SIZE])),
        (OPT_GO, go_data("disk", &[])),
        (OPT_STRUCTURED_REPLY, vec![]),
        (OPT_LIST_META_CONTEXT, meta_data("disk", &[])),
        (
            OPT_SET_META_CONTEXT,
            meta_data("disk", &["base:allocation"]),
        ),
        (OPT_PEEK_EXPORT, vec![]),
        (OPT_EXTENDED_HEADERS, vec![]),
        (0x7777, b"unknown".to_vec()),
    ]
}

#[tokio::test]
async fn require_refuses_every_option_before_tls() {
    let certs = CertDir::new("reqd");
    let (mut c, srv) = start(one(), opts(TlsMode::Require, &certs, false), 1 << 16);
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    for (o, data) in pre_tls_options() {
        let r = c.opt(o, &data).await;
        assert_eq!(r.len(), 1, "option {o}: {r:?}");
        assert_eq!(r[0].option, o);
        assert_eq!(r[0].kind, REP_ERR_TLS_REQD, "option {o}");
        assert!(!r[0].data.is_empty(), "TLS_REQD carries a message");
    }
    // ABORT is always allowed, and ends the session cleanly.
    assert_eq!(c.opt(OPT_ABORT, &[]).await[0].kind, REP_ACK);
    assert!(c.at_eof().await);
    srv.finish().await.unwrap();
}

#[tokio::test]
async fn require_closes_on_export_name_without_tls() {
    let certs = CertDir::new("reqd-en");
    let (mut c, srv) = start(one(), opts(TlsMode::Require, &certs, false), 1 << 16);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    c.send_opt(OPT_EXPORT_NAME, b"disk").await;
    assert!(
        c.at_eof().await,
        "EXPORT_NAME cannot be refused, only cut off"
    );
    assert!(matches!(
        srv.finish().await,
        Err(ProtocolError::TlsRequired)
    ));

    // An old-style (not fixed newstyle) client can only send EXPORT_NAME: refused too.
    let (mut c, srv) = start(one(), opts(TlsMode::Require, &certs, false), 1 << 16);
    c.greet(0).await;
    c.send_opt(OPT_EXPORT_NAME, b"").await;
    assert!(c.at_eof().await);
    assert!(srv.finish().await.is_err());
}

#[tokio::test]
async fn require_serves_after_starttls() {
    let certs = CertDir::new("req-ok");
    let (mut c, srv) = start(one(), opts(TlsMode::Require, &certs, false), 1 << 16);
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    assert_eq!(c.opt(OPT_LIST, &[]).await[0].kind, REP_ERR_TLS_REQD);
    assert_eq!(
        c.opt(OPT_STARTTLS, b"junk").await[0].kind,
        REP_ERR_INVALID,
        "STARTTLS takes no data"
    );
    let r = c.opt(OPT_STARTTLS, &[]).await;
    assert_eq!((r[0].kind, r[0].data.len()), (REP_ACK, 0));
    let mut c = upgrade(c, &certs, None).await.expect("TLS handshake");
    // Over TLS: no option gets TLS_REQD, a second STARTTLS is invalid.
    let r = c.opt(OPT_LIST, &[]).await;
    assert_eq!(r[0].kind, REP_SERVER);
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    assert_eq!(c.opt(OPT_STARTTLS, &[]).await[0].kind, REP_ERR_INVALID);
    assert_eq!(c.opt(0x7777, &[]).await[0].kind, REP_ERR_UNSUP);
    c.structured().await;
    let (size, _, _) = c.go("disk", &[]).await;
    assert_eq!(size, MIB);
    let data = pattern(8192, 7);
    c.write(0, 1, 4096, &data).await;
    assert_eq!(c.simple().await, (0, 1));
    c.request(0, CMD_READ, 2, 4096, 8192).await;
    let ch = c.chunk().await;
    assert_eq!((ch.kind, ch.handle), (REPLY_TYPE_OFFSET_DATA, 2));
    assert_eq!(&ch.data[8..], &data[..]);
    c.request(0, CMD_DISC, 3, 0, 0).await;
    srv.finish().await.unwrap();
}

#[tokio::test]
async fn allow_serves_plain_clients() {
    let certs = CertDir::new("allow");
    let (mut c, srv) = start(one(), opts(TlsMode::Allow, &certs, false), 1 << 16);
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    assert_eq!(c.opt(OPT_LIST, &[]).await[0].kind, REP_SERVER);
    let (size, _, _) = c.go("disk", &[]).await;
    assert_eq!(size, MIB);
    c.write(0, 1, 0, b"plain").await;
    assert_eq!(c.simple().await, (0, 1));
    c.request(0, CMD_READ, 2, 0, 5).await;
    assert_eq!(c.simple().await, (0, 2));
    assert_eq!(c.bytes(5).await, b"plain");
    c.request(0, CMD_DISC, 3, 0, 0).await;
    srv.finish().await.unwrap();

    // EXPORT_NAME without TLS is fine under allow.
    let (mut c, srv) = start(one(), opts(TlsMode::Allow, &certs, false), 1 << 16);
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    c.send_opt(OPT_EXPORT_NAME, b"disk").await;
    assert_eq!(c.u64().await, MIB);
    c.u16().await;
    c.request(0, CMD_DISC, 1, 0, 0).await;
    srv.finish().await.unwrap();
}

#[tokio::test]
async fn upgrade_forgets_what_was_negotiated_in_plain_text() {
    let certs = CertDir::new("forget");
    let (mut c, srv) = start(one(), opts(TlsMode::Allow, &certs, false), 1 << 16);
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    c.structured().await;
    assert_eq!(c.opt(OPT_STARTTLS, &[]).await[0].kind, REP_ACK);
    let mut c = upgrade(c, &certs, None).await.expect("TLS handshake");
    // Structured replies were agreed before TLS only: now they are off again, so DF is
    // not advertised and a read gets a simple reply.
    let (_, flags, _) = c.go("disk", &[]).await;
    assert_eq!(flags & FLAG_SEND_DF, 0);
    c.request(0, CMD_READ, 9, 0, 512).await;
    assert_eq!(c.simple().await, (0, 9));
    assert_eq!(c.bytes(512).await, vec![0u8; 512]);
    c.request(0, CMD_DISC, 10, 0, 0).await;
    srv.finish().await.unwrap();
}

#[tokio::test]
async fn client_certificates_are_verified_when_a_ca_is_given() {
    let certs = CertDir::new("mtls");
    for (identity, ok) in [
        (Some("client"), true),
        (None, false),
        (Some("rogue"), false),
    ] {
        let (mut c, srv) = start(one(), opts(TlsMode::Require, &certs, true), 1 << 16);
        c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        assert_eq!(c.opt(OPT_STARTTLS, &[]).await[0].kind, REP_ACK);
        match upgrade(c, &certs, identity).await {
            Ok(mut c) if ok => {
                let (size, _, _) = c.go("disk", &[]).await;
                assert_eq!(size, MIB);
                c.request(0, CMD_DISC, 1, 0, 0).await;
                srv.finish().await.unwrap();
            }
            Ok(mut c) => {
                // With TLS 1.3 the client finishes before the server has judged its
                // certificate; the refusal shows on the next exchange.
                c.send_opt(OPT_LIST, &[]).await;
                let _ = c.s.flush().await;
                assert!(c.at_eof().await, "{identity:?} must be refused");
                assert!(
                    matches!(srv.finish().await, Err(ProtocolError::TlsHandshake(_))),
                    "{identity:?}"
                );
            }
            Err(e) => {
                assert!(!ok, "{identity:?} should be accepted: {e}");
                assert!(matches!(
                    srv.finish().await,
                    Err(ProtocolError::TlsHandshake(_))
                ));
            }
        }
    }
}

#[tokio::test]
async fn plain_bytes_after_starttls_close_the_connection() {
    let certs = CertDir::new("smuggle");
    // Bytes pipelined behind STARTTLS, before our ACK, would be plain text treated as
    // part of the TLS session.
    let (mut c, srv) = start(one(), opts(TlsMode::Require, &certs, false), 1 << 16);
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    let mut b = Vec::new();
    for o in [OPT_STARTTLS, OPT_LIST] {
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
    }
    c.s.write_all(&b).await.unwrap();
    assert_eq!(c.opt_reply().await.kind, REP_ACK);
    assert!(c.at_eof().await);
    assert!(matches!(
        srv.finish().await,
        Err(ProtocolError::DataBeforeTls(16))
    ));

    // Garbage instead of a TLS ClientHello.
    let (mut c, srv) = start(one(), opts(TlsMode::Allow, &certs, false), 1 << 16);
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    assert_eq!(c.opt(OPT_STARTTLS, &[]).await[0].kind, REP_ACK);
    c.s.write_all(&[0x55; 300]).await.unwrap();
    // The server may send a TLS alert before it closes; what matters is that it closes.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(T, c.s.read_to_end(&mut rest)).await;
    assert!(matches!(r, Ok(Ok(n)) if n < 64), "{r:?}");
    assert!(matches!(
        srv.finish().await,
        Err(ProtocolError::TlsHandshake(_))
    ));
}

#[test]
fn bad_certificate_files_are_named() {
    let certs = CertDir::new("badfiles");
    let cert = certs.path("server-cert.pem");
    // A key that belongs to another certificate.
    let e = TlsConfig::from_pem_files(&cert, &certs.path("client-key.pem")).unwrap_err();
    assert!(matches!(e, TlsError::Key { .. }), "{e}");
    assert!(e.to_string().contains("does not match"), "{e}");
    // A key file given as the certificate.
    let e = TlsConfig::from_pem_files(&certs.path("server-key.pem"), &cert).unwrap_err();
    assert!(matches!(e, TlsError::Cert { .. }), "{e}");
    assert!(e.to_string().contains("server-key.pem"), "{e}");
    // A certificate given as the key.
    let e = TlsConfig::from_pem_files(&cert, &cert).unwrap_err();
    assert!(matches!(e, TlsError::Key { .. }), "{e}");
    let e = TlsConfig::from_pem_files_with_client_ca(
        &cert,
        &certs.path("server-key.pem"),
        &certs.path("missing-ca.pem"),
    )
    .unwrap_err();
    assert!(matches!(e, TlsError::Ca { .. }), "{e}");
    assert!(e.to_string().contains("missing-ca.pem"), "{e}");
}
