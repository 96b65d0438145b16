mod common;

use common::*;
use nbd_protocol::consts::*;
use nbd_protocol::{MemoryBackend, ServerOptions};
use std::sync::Arc;

const MIB: u64 = 1 << 20;

fn one(size: u64) -> Arc<nbd_protocol::Exports<MemoryBackend>> {
    exports(vec![("disk", Arc::new(MemoryBackend::new(size)))])
}

#[tokio::test]
async fn greeting_flags() {
    let (mut c, srv) = start(one(MIB), ServerOptions::default(), 1 << 16);
    let f = c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    assert_eq!(f, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    let r = c.opt(OPT_ABORT, &[]).await;
    assert_eq!(r[0].kind, REP_ACK);
    assert!(c.at_eof().await);
    srv.finish().await.unwrap();
}

#[tokio::test]
async fn unknown_option_then_go_still_works() {
    let (mut c, srv) = start(one(3 * MIB), ServerOptions::default(), 1 << 16);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    let r = c.opt(0x1234_5678, b"whatever payload").await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, REP_ERR_UNSUP);
    assert!(!r[0].data.is_empty(), "error replies carry a message");
    // A known-but-unimplemented option too.
    assert_eq!(
        c.opt(OPT_EXTENDED_HEADERS, &[]).await[0].kind,
        REP_ERR_UNSUP
    );
    let (size, flags, _) = c.go("disk", &[]).await;
    assert_eq!(size, 3 * MIB);
    assert_ne!(flags & FLAG_HAS_FLAGS, 0);
    assert_eq!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(
        flags & FLAG_SEND_DF,
        0,
        "DF is never advertised without structured replies"
    );
    // Transmission works: a read of an unwritten area is zeros.
    c.request(0, CMD_READ, 1, 0, 512).await;
    assert_eq!(c.simple().await, (0, 1));
    assert_eq!(c.bytes(512).await, vec![0u8; 512]);
    c.request(0, CMD_DISC, 2, 0, 0).await;
    assert!(c.at_eof().await);
    srv.finish().await.unwrap();
}

#[tokio::test]
async fn ten_thousand_options_are_fine() {
    let (mut c, srv) = start(one(MIB), ServerOptions::default(), 1 << 16);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    for i in 0..10_000u32 {
        let r = c.opt(1000 + (i % 50), &[0u8; 8]).await;
        assert_eq!(r[0].kind, REP_ERR_UNSUP);
    }
    c.go("", &[]).await;
    c.request(0, CMD_DISC, 0, 0, 0).await;
    srv.finish().await.unwrap();
}

#[tokio::test]
async fn list_and_info_with_block_size() {
    let ex = exports(vec![
        ("first", Arc::new(MemoryBackend::new(MIB))),
        ("second", Arc::new(MemoryBackend::new(2 * MIB))),
    ]);
    let (mut c, srv) = start(ex, ServerOptions::default(), 1 << 16);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;

    let r = c.opt(OPT_LIST, &[]).await;
    assert_eq!(r.len(), 3);
    let names: Vec<String> = r[..2]
        .iter()
        .map(|x| {
            assert_eq!(x.kind, REP_SERVER);
            let n = u32::from_be_bytes(x.data[..4].try_into().unwrap()) as usize;
            String::from_utf8(x.data[4..4 + n].to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, ["first", "second"]);
    assert_eq!(r[2].kind, REP_ACK);
    assert_eq!(c.opt(OPT_LIST, b"junk").await[0].kind, REP_ERR_INVALID);

    let r = c
        .opt(
            OPT_INFO,
            &go_data(
                "second",
                &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION, 77],
            ),
        )
        .await;
    let find = |t: u16| {
        r.iter()
            .find(|x| x.kind == REP_INFO && x.data[..2] == t.to_be_bytes())
    };
    let ex = find(INFO_EXPORT).expect("export info");
    assert_eq!(
        u64::from_be_bytes(ex.data[2..10].try_into().unwrap()),
        2 * MIB
    );
    let bs = find(INFO_BLOCK_SIZE).expect("block size info");
    assert_eq!(bs.data.len(), 14);
    let min = u32::from_be_bytes(bs.data[2..6].try_into().unwrap());
    let pref = u32::from_be_bytes(bs.data[6..10].try_into().unwrap());
    let max = u32::from_be_bytes(bs.data[10..14].try_into().unwrap());
    assert_eq!((min, pref, max), (1, 4096, 32 * 1024 * 1024));
    assert_eq!(&find(INFO_NAME).expect("name").data[2..], b"second");
    assert_eq!(
        &find(INFO_DESCRIPTION).expect("description").data[2..],
        b"export second"
    );
    assert_eq!(r.last().unwrap().kind, REP_ACK);

    // INFO without asking for block sizes does not volunteer them.
    let r = c.opt(OPT_INFO, &go_data("first", &[])).await;
    assert_eq!(r.len(), 2);

    // Unknown export: ERR_UNKNOWN and the session goes on.
    assert_eq!(
        c.opt(OPT_INFO, &go_data("nope", &[])).await[0].kind,
        REP_ERR_UNKNOWN
    );
    assert_eq!(
        c.opt(OPT_GO, &go_data("nope", &[])).await[0].kind,
        REP_ERR_UNKNOWN
    );
    // Malformed GO: ERR_INVALID.
    assert_eq!(
        c.opt(OPT_GO, &[0, 0, 0, 9, b'x']).await[0].kind,
        REP_ERR_INVALID
    );
    // The empty name is the default (first) export.
    let (size, _, _) = c.go("", &[]).await;
    assert_eq!(size, MIB);
    c.request(0, CMD_DISC, 0, 0, 0).await;
    srv.finish().await.unwrap();
}

#[tokio::test]
async fn starttls_is_refused_politely() {
    let (mut c, srv) = start(one(MIB), ServerOptions::default(), 1 << 16);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    assert_eq!(c.opt(OPT_STARTTLS, &[]).await[0].kind, REP_ERR_POLICY);
    c.go("", &[]).await;
    c.request(0, CMD_DISC, 0, 0, 0).await;
    srv.finish().await.unwrap();
}

#[tokio::test]
async fn oversized_option_is_too_big_and_absurd_closes() {
    let (mut c, srv) = start(one(MIB), ServerOptions::default(), 1 << 16);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    let r = c.opt(OPT_GO, &vec![0u8; 200 * 1024]).await;
    assert_eq!(r[0].kind, REP_ERR_TOO_BIG);
    // Still in step: the next option works.
    assert_eq!(c.opt(OPT_LIST, &[]).await.last().unwrap().kind, REP_ACK);
    // A length no option could need: the server hangs up without reading it.
    let mut h = Vec::new();
    h.extend_from_slice(&IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    tokio::io::AsyncWriteExt::write_all(&mut c.s, &h)
        .await
        .unwrap();
    assert!(c.at_eof().await);
    assert!(srv.finish().await.is_err());
}

#[tokio::test]
async fn export_name_with_and_without_zeroes() {
    for no_zeroes in [false, true] {
        let (mut c, srv) = start(one(5 * MIB), ServerOptions::default(), 1 << 16);
        let cf = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        c.greet(cf).await;
        c.send_opt(OPT_EXPORT_NAME, b"disk").await;
        assert_eq!(c.u64().await, 5 * MIB);
        let flags = c.u16().await;
        assert_ne!(flags & FLAG_SEND_FLUSH, 0);
        if !no_zeroes {
            assert_eq!(c.bytes(124).await, vec![0u8; 124]);
        }
        // The next bytes are a reply to our first request, not padding.
        c.request(0, CMD_READ, 42, 0, 4).await;
        assert_eq!(c.simple().await, (0, 42));
        assert_eq!(c.bytes(4).await, vec![0u8; 4]);
        c.request(0, CMD_DISC, 0, 0, 0).await;
        srv.finish().await.unwrap();
    }
}

#[tokio::test]
async fn export_name_unknown_closes() {
    let (mut c, srv) = start(one(MIB), ServerOptions::default(), 1 << 16);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    c.send_opt(OPT_EXPORT_NAME, b"missing").await;
    assert!(c.at_eof().await);
    assert!(srv.finish().await.is_err());
}

#[tokio::test]
async fn bad_option_magic_and_client_flags_close() {
    let (mut c, srv) = start(one(MIB), ServerOptions::default(), 1 << 16);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    tokio::io::AsyncWriteExt::write_all(&mut c.s, &[0xAB; 16])
        .await
        .unwrap();
    assert!(c.at_eof().await);
    assert!(srv.finish().await.is_err());

    let (mut c, srv) = start(one(MIB), ServerOptions::default(), 1 << 16);
    c.greet(1 << 7).await;
    assert!(c.at_eof().await);
    assert!(srv.finish().await.is_err());
}

#[tokio::test]
async fn meta_contexts() {
    let (mut c, srv) = start(one(MIB), ServerOptions::default(), 1 << 16);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    // Before structured replies: invalid.
    let r = c.opt(OPT_LIST_META_CONTEXT, &meta_data("", &[])).await;
    assert_eq!(r[0].kind, REP_ERR_INVALID);
    c.structured().await;
    for q in [&[][..], &["base:"][..], &["base:allocation"][..]] {
        let r = c.opt(OPT_LIST_META_CONTEXT, &meta_data("disk", q)).await;
        assert_eq!(r.len(), 2, "query {q:?}");
        assert_eq!(r[0].kind, REP_META_CONTEXT);
        assert_eq!(&r[0].data[4..], b"base:allocation");
        assert_eq!(r[1].kind, REP_ACK);
    }
    // A query for someone else's namespace finds nothing: just ACK.
    let r = c
        .opt(
            OPT_LIST_META_CONTEXT,
            &meta_data("disk", &["qemu:dirty-bitmap:x"]),
        )
        .await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, REP_ACK);
    let r = c
        .opt(
            OPT_SET_META_CONTEXT,
            &meta_data("nope", &["base:allocation"]),
        )
        .await;
    assert_eq!(r[0].kind, REP_ERR_UNKNOWN);
    let r = c.opt(OPT_SET_META_CONTEXT, &[1, 2, 3]).await;
    assert_eq!(r[0].kind, REP_ERR_INVALID);
    let r = c.set_meta("disk", &["base:allocation"]).await;
    assert_eq!(r[0].kind, REP_META_CONTEXT);
    let id = u32::from_be_bytes(r[0].data[..4].try_into().unwrap());
    assert_ne!(id, 0);
    let (_, flags, _) = c.go("disk", &[]).await;
    assert_ne!(flags & FLAG_SEND_DF, 0);
    c.request(0, CMD_BLOCK_STATUS, 5, 0, 4096).await;
    let ch = c.chunk().await;
    assert_eq!(ch.kind, REPLY_TYPE_BLOCK_STATUS);
    assert_eq!(u32::from_be_bytes(ch.data[..4].try_into().unwrap()), id);
    c.request(0, CMD_DISC, 0, 0, 0).await;
    srv.finish().await.unwrap();
}

#[tokio::test]
async fn shutdown_during_handshake_answers_err_shutdown() {
    let (mut c, srv) = start(one(MIB), ServerOptions::default(), 1 << 16);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    assert_eq!(c.opt(OPT_LIST, &[]).await.last().unwrap().kind, REP_ACK);
    srv.shutdown.send(true).unwrap();
    let r = c.opt(OPT_GO, &go_data("", &[])).await;
    assert_eq!(r[0].kind, REP_ERR_SHUTDOWN);
    assert!(c.at_eof().await);
    srv.finish().await.unwrap();
}

#[tokio::test]
async fn client_leaving_mid_handshake_is_quiet() {
    let (mut c, srv) = start(one(MIB), ServerOptions::default(), 1 << 16);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    c.send_opt(OPT_GO, &[]).await; // length 0 GO is malformed, answered, then we leave
    drop(c);
    srv.finish().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn idle_handshake_times_out() {
    let (mut c, srv) = start(one(MIB), ServerOptions::default(), 1 << 16);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    // Send nothing more. With time paused, the runtime jumps to the server's deadline.
    let t0 = tokio::time::Instant::now();
    srv.task.await.unwrap().unwrap();
    let waited = t0.elapsed();
    assert!(
        waited >= nbd_protocol::server::HANDSHAKE_TIMEOUT,
        "closed after {waited:?}"
    );
    assert!(c.at_eof().await);
}
